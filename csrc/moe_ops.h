// Entry points of the moe_fastmask C++ op library ``moe_fastmask_C`` (schemas in torch_bindings.cpp).
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

// Fused MoE routing on CPU: per-group expert mask, softmax over the allowed experts (float32), top-k by descending
// weight with ties to the lower expert index, optional renormalisation, and per-group expert counts.
//
// A token of group g >= 0 may use the experts with keep[g, e] == true (the others are -inf before the softmax) and is
// counted into counts[g]; a token of group -1 uses every expert and is not counted; without group every token is
// group 0. A row with a NaN or +inf logit among its allowed experts, or with all of them -inf, gets NaN weights and
// the ids 0..K-1 (what the PyTorch reference gives), counted like any other row.
void route_cpu(at::Tensor& topk_weights,                    // [T, K] logits.dtype, contiguous; written
               at::Tensor& topk_ids,                        // [T, K] int64, contiguous; written
               const std::optional<at::Tensor>& counts,     // [G, E] int64, contiguous; accumulated in place
               const at::Tensor& logits,                    // [T, E] float32 / float16 / bfloat16, any strides
               const std::optional<at::Tensor>& keep,       // [G, E] bool, contiguous
               const std::optional<at::Tensor>& group,      // [T] int32 / int64, contiguous, values in [-1, G)
               bool renormalize);
