// Entry points of the moe_fastmask C++ op library ``moe_fastmask_C`` (schemas in torch_bindings.cpp).
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

// Fused MoE routing on CPU: per-group expert mask, softmax over the allowed experts (float32), top-k, optional
// renormalisation, and per-group expert counts; router variants as in moe_fastmask.route (scoring: softmax over the
// chosen experts only, or sigmoid scores with a selection bias and group-limited top-k; a weight scale).
//
// Tie rule (the same in every backend of moe_fastmask.route): experts are ordered by their masked logit, highest
// first; every expert a token may use ranks above every masked expert (even an allowed logit of -inf), -0.0 equals
// +0.0, and equal logits go to the lower expert index.
//
// A token of group g in [0, G) may use the experts with keep[g, e] == true (the others get weight 0) and is counted
// into counts[g]; a token of any other group (-1, or an id out of range) uses every expert and is not counted;
// without group every token is group 0. A row with a NaN or +inf logit among its allowed experts, or with all of them
// -inf, gets NaN weights; its ids follow the tie rule and are counted like any other row.
void route_cpu(at::Tensor& topk_weights,                    // [T, K] logits.dtype, contiguous; written
               at::Tensor& topk_ids,                        // [T, K] int64, contiguous; written
               const std::optional<at::Tensor>& counts,     // [G, E] int64, contiguous; accumulated in place
               const at::Tensor& logits,                    // [T, E] float32 / float16 / bfloat16, any strides
               const std::optional<at::Tensor>& keep,       // [G, E] bool, contiguous
               const std::optional<at::Tensor>& group,      // [T] int32 / int64, contiguous; ids out of [-1, G): -1
               bool renormalize,
               int64_t scoring,                             // 0 softmax, 1 softmax over the chosen, 2 sigmoid
               const std::optional<at::Tensor>& bias,       // [E] float32 selection bias (sigmoid), contiguous
               int64_t n_group,                             // group-limited top-k (sigmoid); 1 = none
               int64_t topk_group,                          // groups kept per token
               double scale);                               // multiplies the weights
