"""Plain-PyTorch reference of the fused router op: the CPU fallback and the oracle every kernel is tested against.

The semantics are Hugging Face OLMoE's router (``OlmoeTopKRouter``): softmax in float32 over the experts, top-k,
optional renormalisation, cast back to the logits' dtype; plus a per-group expert mask (masked experts get a logit
of -inf before the softmax) and per-group expert counts. Ties go to the lower expert index (a stable sort), which
``torch.topk`` does not promise.
"""

from __future__ import annotations

import torch
from torch import Tensor


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the softmax runs in: float32, or float64 for float64 logits (so gradcheck sees exact math)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def allowed_experts(num_tokens: int, keep: Tensor | None, group: Tensor | None) -> Tensor | None:
    """Bool [T, E]: which experts each token may use; None when nothing is masked.

    A token of group ``g >= 0`` uses ``keep[g]``; a token of group -1 uses every expert; with ``group=None``
    every token is group 0.
    """
    if keep is None:
        return None
    if group is None:
        return keep[0].expand(num_tokens, keep.shape[1])
    group = group.long()
    return torch.where((group >= 0)[:, None], keep[group.clamp(min=0)], True)


def masked_probs(logits: Tensor, keep: Tensor | None, group: Tensor | None) -> Tensor:
    """Softmax over each token's allowed experts, in float32 (float64 for float64 logits); masked experts get 0."""
    z = logits.to(compute_dtype(logits.dtype))
    allowed = allowed_experts(logits.shape[0], keep, group)
    if allowed is not None:
        z = z.masked_fill(~allowed, float("-inf"))
    return torch.softmax(z, dim=-1)


def accumulate_counts(counts: Tensor, ids: Tensor, group: Tensor | None) -> None:
    """``counts[g, e] += 1`` for every (token, chosen expert) whose token group ``g >= 0``; no host sync."""
    num_experts = counts.shape[1]
    top_k = ids.shape[1]
    if group is None:
        flat = ids.reshape(-1)
        counted = torch.ones_like(flat)
    else:
        group = group.long()
        flat = (group.clamp(min=0)[:, None] * num_experts + ids).reshape(-1)
        counted = (group >= 0)[:, None].expand(-1, top_k).reshape(-1).to(torch.int64)
    counts.view(-1).index_add_(0, flat, counted)


def route_reference(
    logits: Tensor,
    top_k: int,
    keep: Tensor | None = None,
    group: Tensor | None = None,
    counts: Tensor | None = None,
    renormalize: bool = False,
) -> tuple[Tensor, Tensor]:
    """Masked softmax + top-k + counts in plain PyTorch; differentiable with respect to ``logits``.

    Arguments are those of :func:`moe_fastmask.route` (already validated). Returns ``weights`` [T, top_k] in
    ``logits.dtype`` and ``ids`` [T, top_k] int64, ordered by descending weight, ties to the lower expert index.
    """
    probs = masked_probs(logits, keep, group)
    sorted_probs, sorted_ids = torch.sort(probs, dim=-1, descending=True, stable=True)
    weights = sorted_probs[:, :top_k]
    ids = sorted_ids[:, :top_k]
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    if counts is not None:
        accumulate_counts(counts, ids, group)
    return weights.to(logits.dtype), ids


def route_backward_reference(
    grad_weights: Tensor,
    logits: Tensor,
    keep: Tensor | None,
    group: Tensor | None,
    ids: Tensor,
    renormalize: bool,
) -> Tensor:
    """Closed-form gradient of ``route``'s weights with respect to the logits, in one fused torch expression.

    Without renormalisation, with p the masked softmax and G the incoming gradient scattered to the chosen experts:
    ``dz = p * (G - sum_j g_j w_j)``. With renormalisation the weights are a softmax over the chosen experts alone,
    so ``dz = w_j * (g_j - sum_l g_l w_l)`` on the chosen experts and 0 elsewhere.
    """
    probs = masked_probs(logits, keep, group)
    grad = grad_weights.to(probs.dtype)
    chosen = probs.gather(1, ids)
    if renormalize:
        weights = chosen / chosen.sum(dim=-1, keepdim=True)
        dot = (grad * weights).sum(dim=-1, keepdim=True)
        grad_logits = torch.zeros_like(probs).scatter_(1, ids, weights * (grad - dot))
    else:
        dot = (grad * chosen).sum(dim=-1, keepdim=True)
        scattered = torch.zeros_like(probs).scatter_(1, ids, grad)
        grad_logits = probs * (scattered - dot)
    return grad_logits.to(logits.dtype)
