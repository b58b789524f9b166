"""Plain-PyTorch reference of the fused router op: the CPU fallback and the oracle every kernel is tested against.

The default semantics are Hugging Face OLMoE's router (``OlmoeTopKRouter``): softmax in float32 over the experts,
top-k, optional renormalisation, cast back to the logits' dtype; plus a per-group expert mask (masked experts get a
logit of -inf before the softmax) and per-group expert counts. The router variants (``scoring``, ``bias``,
``n_group``/``topk_group``, ``scale``) are described in :func:`route_reference`; each is one small function here.

Tie rule (the same in every backend of ``route``): experts are ordered by their masked logit, highest first — every
expert a token may use ranks above every masked expert (even an allowed logit of -inf), -0.0 equals +0.0, and equal
logits go to the lower expert index. Ordering by the logit is ordering by the weight wherever the weights differ, and
decides between logits whose weights round to the same float (or underflow to 0) identically on every backend.
``torch.topk`` promises no tie order, so this is two stable sorts.

Group ids outside ``[-1, G)`` are treated as -1: routed without a mask and not counted.
"""

from __future__ import annotations

import torch
from torch import Tensor


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the softmax runs in: float32, or float64 for float64 logits (so gradcheck sees exact math)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def group_in_range(group: Tensor, num_groups: int) -> Tensor:
    """Bool [T]: the tokens whose group id is in ``[0, num_groups)`` (masked and counted); the others act as -1."""
    return (group >= 0) & (group < num_groups)


def allowed_experts(num_tokens: int, keep: Tensor | None, group: Tensor | None) -> Tensor | None:
    """Bool [T, E]: which experts each token may use; None when nothing is masked.

    A token of group ``g`` in ``[0, G)`` uses ``keep[g]``; a token of any other group (-1, or out of range) uses
    every expert; with ``group=None`` every token is group 0.
    """
    if keep is None:
        return None
    if group is None:
        return keep[0].expand(num_tokens, keep.shape[1])
    in_range = group_in_range(group, keep.shape[0])
    return torch.where(in_range[:, None], keep[torch.where(in_range, group, 0).long()], True)


def order_experts(logits: Tensor, allowed: Tensor | None) -> Tensor:
    """int64 [T, E]: each token's experts in routing order (the tie rule of this module's docstring).

    Masked experts come last; before them the allowed ones by descending logit, -0.0 equal to +0.0, equal logits
    by ascending index. A negative NaN ranks as -inf and a positive one above +inf (as the kernels' integer keys do).
    """
    z = logits
    z = torch.where(z == 0, torch.zeros_like(z), z)
    z = torch.where(torch.isnan(z) & torch.signbit(z), torch.full_like(z, float("-inf")), z)
    if allowed is not None:
        z = z.masked_fill(~allowed, float("-inf"))
    order = torch.sort(z, dim=-1, descending=True, stable=True).indices
    if allowed is not None:
        # stable: the allowed experts keep their logit order, ahead of the masked ones
        first = torch.sort(allowed.gather(1, order).to(torch.uint8), dim=-1, descending=True, stable=True).indices
        order = order.gather(1, first)
    return order


SCORINGS = ("softmax", "softmax_chosen", "sigmoid")
SIGMOID_RENORM_EPS = 1e-20  # DeepSeek-V3's denominator guard: weights / (sum + 1e-20)


def selection_values(
    logits: Tensor,
    allowed: Tensor | None,
    scoring: str,
    bias: Tensor | None,
    n_group: int,
    topk_group: int,
) -> Tensor:
    """The values experts are ordered by (before the tie rule), in the compute dtype.

    ``softmax`` / ``softmax_chosen``: the logit itself (ordering by the logit is ordering by the probability).
    ``sigmoid``: ``sigmoid(z) + bias``, equal for equal logits and biases wherever they sit in the row (so they tie
    exactly), a NaN of either sign made the positive NaN that ranks above +inf (as ``torch.topk`` ranks the families'
    own scores); with ``n_group > 1`` the experts outside each token's kept groups (:func:`kept_groups`) get -inf, so
    they rank below every expert of a kept group, and above masked experts.
    """
    z = logits.to(compute_dtype(logits.dtype))
    if scoring != "sigmoid":
        return _with_nan_signs(z, logits)
    values = _sigmoid_of_equal_values_equal(z)
    if bias is not None:
        values = values + bias.to(values.dtype)
    values = torch.where(values.isnan(), torch.full_like(values, float("nan")).abs(), values)
    if n_group > 1:
        kept = kept_groups(values, allowed, n_group, topk_group)  # [T, n_group]
        in_kept = kept.repeat_interleave(logits.shape[1] // n_group, dim=1)
        values = values.masked_fill(~in_kept, float("-inf"))
    return values


def _with_nan_signs(z: Tensor, logits: Tensor) -> Tensor:
    """``z`` (``logits`` in the compute dtype) with each NaN's sign that of the logit: float16's conversion drops it,
    and the sign orders a NaN (:func:`order_experts`)."""
    if logits.dtype != torch.float16:
        return z
    return torch.where(torch.isnan(z) & torch.signbit(logits), -z.abs(), z)


def _sigmoid_of_equal_values_equal(z: Tensor) -> Tensor:
    """``torch.sigmoid(z)``, the same for equal values wherever they sit: its vectorised loop and its scalar tail may
    round one value apart, so each run of equal values (in sorted order) takes its first one's sigmoid. No host
    synchronisation (CUDA-graph safe)."""
    flat = z.reshape(-1)
    if flat.numel() == 0:
        return torch.sigmoid(z)
    ordered, order = torch.sort(flat)
    values = torch.sigmoid(ordered)
    starts = torch.ones_like(ordered, dtype=torch.bool)
    starts[1:] = ordered[1:] != ordered[:-1]  # (NaN != NaN: each its own run)
    positions = torch.arange(flat.numel(), device=flat.device)
    first = torch.cummax(torch.where(starts, positions, 0), dim=0).values
    return torch.empty_like(flat).scatter_(0, order, values[first]).view_as(z)


def kept_groups(values: Tensor, allowed: Tensor | None, n_group: int, topk_group: int) -> Tensor:
    """Bool [T, n_group]: DeepSeek-V3's group limit. Experts are split into ``n_group`` contiguous groups; a group
    scores the sum of its two highest selection values (masked experts count as -inf, so a group with fewer than two
    allowed experts scores -inf); the ``topk_group`` best groups are kept, equal scores going to the lower group
    index (-0.0 equal to +0.0)."""
    if allowed is not None:
        values = values.masked_fill(~allowed, float("-inf"))
    num_tokens, num_experts = values.shape
    scores = values.view(num_tokens, n_group, num_experts // n_group).topk(2, dim=-1).values.sum(dim=-1)
    scores = torch.where(scores == 0, torch.zeros_like(scores), scores)
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices[:, :topk_group]
    return torch.zeros(num_tokens, n_group, dtype=torch.bool, device=values.device).scatter_(1, order, True)


def chosen_weights(
    logits: Tensor,
    allowed: Tensor | None,
    ids: Tensor,
    scoring: str,
    renormalize: bool,
    scale: float,
) -> Tensor:
    """Weights of the chosen experts ``ids`` in the compute dtype (differentiable with respect to ``logits``).

    ``softmax``: the softmax over all allowed experts at ``ids`` (optionally renormalised to sum 1).
    ``softmax_chosen``: the softmax over the chosen experts' logits only (GPT-OSS' ``softmax(topk(logits))``).
    ``sigmoid``: ``sigmoid(z)`` at ``ids`` (no bias), optionally divided by ``sum + 1e-20`` (DeepSeek-V3).
    A chosen masked expert (only possible with unvalidated masks) weighs 0. All are then multiplied by ``scale``.
    """
    z = logits.to(compute_dtype(logits.dtype))
    if scoring == "softmax":
        probs = torch.softmax(z if allowed is None else z.masked_fill(~allowed, float("-inf")), dim=-1)
        weights = probs.gather(1, ids)
        if renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
    elif scoring == "softmax_chosen":
        picked = z.gather(1, ids)
        if allowed is not None:
            picked = picked.masked_fill(~allowed.gather(1, ids), float("-inf"))
        weights = torch.softmax(picked, dim=-1)
    else:
        # sigmoid over the whole row, then gathered: the families' own expression, so the weights match theirs to
        # the bit (a vectorised sigmoid of the gathered values can round the last bit differently)
        weights = torch.sigmoid(z).gather(1, ids)
        if allowed is not None:
            weights = weights.masked_fill(~allowed.gather(1, ids), 0.0)
        if renormalize:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + SIGMOID_RENORM_EPS)
    if scale != 1.0:
        weights = weights * scale
    return weights


def masked_probs(logits: Tensor, keep: Tensor | None, group: Tensor | None) -> Tensor:
    """Softmax over each token's allowed experts, in float32 (float64 for float64 logits); masked experts get 0."""
    z = logits.to(compute_dtype(logits.dtype))
    allowed = allowed_experts(logits.shape[0], keep, group)
    if allowed is not None:
        z = z.masked_fill(~allowed, float("-inf"))
    return torch.softmax(z, dim=-1)


def accumulate_counts(counts: Tensor, ids: Tensor, group: Tensor | None) -> None:
    """``counts[g, e] += 1`` for every (token, chosen expert) whose group ``g`` is in ``[0, G)``; no host sync."""
    num_groups, num_experts = counts.shape
    top_k = ids.shape[1]
    if group is None:
        flat = ids.reshape(-1)
        counted = torch.ones_like(flat)
    else:
        in_range = group_in_range(group, num_groups)
        flat = (torch.where(in_range, group, 0).long()[:, None] * num_experts + ids).reshape(-1)
        counted = in_range[:, None].expand(-1, top_k).reshape(-1).to(torch.int64)
    counts.view(-1).index_add_(0, flat, counted)


def route_reference(
    logits: Tensor,
    top_k: int,
    keep: Tensor | None = None,
    group: Tensor | None = None,
    counts: Tensor | None = None,
    renormalize: bool = False,
    *,
    scoring: str = "softmax",
    bias: Tensor | None = None,
    n_group: int = 1,
    topk_group: int = 1,
    scale: float = 1.0,
) -> tuple[Tensor, Tensor]:
    """Masked routing + top-k + counts in plain PyTorch; differentiable with respect to ``logits``.

    Arguments are those of :func:`moe_fastmask.route` (already validated). Experts are ordered by
    :func:`selection_values` under the tie rule (:func:`order_experts`); weights come from :func:`chosen_weights`.
    Returns ``weights`` [T, top_k] in ``logits.dtype`` and ``ids`` [T, top_k] int64, in routing order. A ``top_k``
    outside ``[1, E]`` raises ValueError (the registered ops reach this function without ``route``'s checks).
    """
    if not 1 <= top_k <= logits.shape[-1]:
        raise ValueError(f"top_k must be in [1, E] = [1, {logits.shape[-1]}], got {top_k}")
    z = logits.to(compute_dtype(logits.dtype))
    allowed = allowed_experts(logits.shape[0], keep, group)
    if scoring == "softmax" and scale == 1.0:
        # the original expression, kept verbatim so the default route is unchanged to the bit
        probs = torch.softmax(z if allowed is None else z.masked_fill(~allowed, float("-inf")), dim=-1)
        ids = order_experts(_with_nan_signs(z.detach(), logits), allowed)[:, :top_k]
        weights = probs.gather(1, ids)
        if renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
    else:
        values = selection_values(logits.detach(), allowed, scoring, bias, n_group, topk_group)
        ids = order_experts(values, allowed)[:, :top_k]
        weights = chosen_weights(logits, allowed, ids, scoring, renormalize, scale)
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
    *,
    scoring: str = "softmax",
    scale: float = 1.0,
) -> Tensor:
    """Closed-form gradient of ``route``'s weights with respect to the logits, in one fused torch expression.

    Without renormalisation, with p the masked softmax and G the incoming gradient scattered to the chosen experts:
    ``dz = p * (G - sum_j g_j w_j)``. With renormalisation (and for ``softmax_chosen``) the weights are a softmax
    over the chosen experts alone, so ``dz = w_j * (g_j - sum_l g_l w_l)`` on the chosen experts and 0 elsewhere.
    ``sigmoid``: ``dz_j = g_j s_j (1 - s_j)``; renormalised, with ``S = sum s + 1e-20`` and ``u = s / S``,
    ``dz_j = (g_j - sum_l g_l u_l) / S * s_j (1 - s_j)``. Everything is multiplied by ``scale``. Neither the
    selection bias nor the group limit has a gradient (they only choose).
    """
    if scale != 1.0:
        grad_weights = grad_weights * scale
    if scoring == "sigmoid":
        return _sigmoid_backward(grad_weights, logits, keep, group, ids, renormalize)
    if scoring == "softmax_chosen":
        renormalize = True  # the same formula: a softmax over the chosen experts
    probs = masked_probs(logits, keep, group)
    grad = grad_weights.to(probs.dtype)
    chosen = probs.gather(1, ids)
    if renormalize:
        weights = chosen / chosen.sum(dim=-1, keepdim=True)
        dot = (grad * weights).sum(dim=-1, keepdim=True)
        # (w g - w dot rather than w (g - dot), which overflows where g and -dot are both near the dtype's largest)
        grad_logits = torch.zeros_like(probs).scatter_(1, ids, weights * grad - weights * dot)
    else:
        dot = (grad * chosen).sum(dim=-1, keepdim=True)
        scattered = torch.zeros_like(probs).scatter_(1, ids, grad)
        grad_logits = probs * scattered - probs * dot
    return grad_logits.to(logits.dtype)


def _sigmoid_backward(
    grad_weights: Tensor, logits: Tensor, keep: Tensor | None, group: Tensor | None, ids: Tensor, renormalize: bool
) -> Tensor:
    z = logits.to(compute_dtype(logits.dtype))
    allowed = allowed_experts(logits.shape[0], keep, group)
    s = torch.sigmoid(z.gather(1, ids))
    if allowed is not None:
        s = s.masked_fill(~allowed.gather(1, ids), 0.0)
    grad = grad_weights.to(s.dtype)
    if renormalize:
        total = s.sum(dim=-1, keepdim=True) + SIGMOID_RENORM_EPS
        grad = (grad - (grad * s).sum(dim=-1, keepdim=True) / total) / total
    return torch.zeros_like(z).scatter_(1, ids, grad * s * (1 - s)).to(logits.dtype)

def chosen_logits_reference(
    logits: Tensor, ids: Tensor, keep: Tensor | None = None, group: Tensor | None = None
) -> Tensor:
    """The sigmoid router's saved logits, as the CUDA forward writes them for its backward (``chosen_logits``):
    float32 [T, k], each chosen expert's logit, -inf where the pick is masked (its weight and gradient are 0 either
    way). Entries of ids outside ``[0, E)`` hold an unspecified value (the backward skips those entries)."""
    num_tokens, num_experts = logits.shape
    safe = ids.clamp(0, num_experts - 1)
    chosen = logits.gather(1, safe).float()
    allowed = allowed_experts(num_tokens, keep, group)
    if allowed is not None:
        chosen = torch.where(allowed.gather(1, safe), chosen, float("-inf"))
    return chosen.contiguous()


def kernel_num_groups(keep: Tensor | None, counts: Tensor | None) -> int:
    """G of a kernel's group range check: the rows of ``keep`` or ``counts`` (any id is in range without them)."""
    if keep is not None:
        return keep.shape[0]
    if counts is not None:
        return counts.shape[0]
    return (1 << 31) - 1


def output_buffers(logits: Tensor, top_k: int, out: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor]:
    """The ``(weights [T, top_k] in the logits' dtype, ids [T, top_k] int64)`` a kernel writes: new tensors, or ``out``
    after checking that both are contiguous and of that shape and dtype."""
    num_tokens = logits.shape[0]
    if out is None:
        weights = torch.empty((num_tokens, top_k), dtype=logits.dtype, device=logits.device)
        ids = torch.empty((num_tokens, top_k), dtype=torch.int64, device=logits.device)
    else:
        weights, ids = out
        if weights.shape != (num_tokens, top_k) or weights.dtype != logits.dtype or not weights.is_contiguous():
            raise ValueError(f"out weights must be contiguous {logits.dtype} [{num_tokens}, {top_k}]")
        if ids.shape != (num_tokens, top_k) or ids.dtype != torch.int64 or not ids.is_contiguous():
            raise ValueError(f"out ids must be contiguous int64 [{num_tokens}, {top_k}]")
    return weights, ids


def grad_logits_buffer(logits: Tensor, out: Tensor | None = None) -> Tensor:
    """The ``grad_logits`` [T, E] in the logits' dtype a backward kernel writes: a new contiguous tensor, or ``out``
    after checking that it is contiguous and of that shape and dtype."""
    if out is None:
        return torch.empty(tuple(logits.shape), dtype=logits.dtype, device=logits.device)
    if out.shape != logits.shape or out.dtype != logits.dtype or not out.is_contiguous():
        raise ValueError(f"out must be contiguous {logits.dtype} {tuple(logits.shape)}")
    return out
