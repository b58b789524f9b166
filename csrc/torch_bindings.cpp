// Registers the ops of moe_fastmask_C with the PyTorch dispatcher; Python calls them as torch.ops.moe_fastmask_C.<op>.
#include <torch/all.h>
#include <torch/library.h>

#include "moe_ops.h"

TORCH_LIBRARY(moe_fastmask_C, ops) {
  // Fused masked softmax + top-k + per-group expert counts on CPU; see moe_ops.h.
  ops.def(
      "route_cpu(Tensor! topk_weights, Tensor! topk_ids, Tensor!? counts, Tensor logits, Tensor? keep, "
      "Tensor? group, bool renormalize, int scoring=0, Tensor? bias=None, int n_group=1, int topk_group=1, "
      "float scale=1.) -> ()");
  ops.impl("route_cpu", torch::kCPU, &route_cpu);
}
