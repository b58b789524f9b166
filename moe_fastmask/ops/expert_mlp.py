"""Sliced expert MLPs: one MoE experts layer whose selected experts train through separate weight slices.

:class:`SlicedExpertsFunction` computes ``out[t] = sum_k w[t, k] * expert_{idx[t, k]}(x[t])`` for gated experts
``down(act(gate(x)) * up(x))`` stored fused (``gate_up [E, 2I, H]``, gate rows then up rows; ``down [E, H, I]``),
where the experts named by ``lut`` (``lut[e] = slot`` or -1) use trainable per-expert slices (``gate_up`` then
``down`` per slot) instead of their fused rows. The fused tensors get no gradient. :func:`sliced_expert_mlp_reference`
is the plain-PyTorch reference (a loop over experts with ordinary autograd) that tests compare against.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

_BACKWARD_CHUNKS = 4  # the frozen experts' backward runs in about this many row blocks


def _grouped_gemm(x: Tensor, weight: Tensor):
    """The grouped GEMM op for bf16 CUDA tensors (``F.grouped_mm`` on sm80+, older ``torch._grouped_mm`` on sm90),
    or None."""
    if not (x.is_cuda and x.dtype == torch.bfloat16 and weight.dtype == torch.bfloat16):
        return None
    capability = torch.cuda.get_device_capability(x.device)
    if hasattr(F, "grouped_mm") and capability >= (8, 0):
        return F.grouped_mm
    if hasattr(torch, "_grouped_mm") and capability >= (9, 0):
        return torch._grouped_mm
    return None


def _grouped_mm(x: Tensor, weight: Tensor, offsets: Tensor, counts: Sequence[int]) -> Tensor:
    """``x [S, in]`` rows grouped by expert times ``weight [G, in, out]`` -> ``[S, out]``; group ``g`` owns
    ``counts[g]`` consecutive rows (``offsets``: their int32 cumulative sums on the device). CUDA bf16: one grouped
    GEMM; elsewhere one matmul per non-empty group."""
    fn = _grouped_gemm(x, weight)
    if fn is not None:
        return fn(x, weight, offs=offsets)
    out = x.new_empty(x.shape[0], weight.shape[-1])
    start = 0
    for group, count in enumerate(counts):
        if count:
            torch.mm(x[start : start + count], weight[group].to(x.dtype), out=out[start : start + count])
        start += count
    return out


def _inverse(perm: Tensor) -> Tensor:
    """The inverse permutation (a scatter of ``S`` ints; moving ``[S, H]`` rows is then a gather)."""
    inverse = torch.empty_like(perm)
    inverse[perm] = torch.arange(perm.shape[0], device=perm.device)
    return inverse


def _unsort_sum(rows: Tensor, inverse: Tensor, num_tokens: int) -> Tensor:
    """Sorted per-assignment rows ``[S, H]`` back to flat order, summed per token -> ``[T, H]`` (deterministic)."""
    return rows[inverse].view(num_tokens, -1, rows.shape[-1]).sum(dim=1)


def _gated(gate_up: Tensor, act_fn) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``gate, up, act(gate) (recorded for its backward), act(gate) * up`` of a gate/up projection output."""
    gate, up = gate_up.chunk(2, dim=-1)
    with torch.enable_grad():
        gate = gate.detach().requires_grad_(True)
        act = act_fn(gate)
    return gate, up, act, act.detach() * up


class SlicedExpertsFunction(torch.autograd.Function):
    """One experts layer, ``out[t] = sum_k w[t, k] * expert_{idx[t, k]}(x[t])``, whose selected experts use the
    trainable slices and every other expert the frozen fused tensors.

    The ``T*K`` assignments are sorted by expert with the selected experts last (one host sync per layer reads the
    group sizes); the frozen ones run as one grouped GEMM pair on the fused tensors, the selected ones as one on the
    stacked slices. Kept for backward: the layer input ``x``, the routing, and the gate/up output of the selected
    assignments only. Backward recomputes the frozen gate/up projection, gets the routing-weight gradient as
    ``<act(gate) * up, down^T dy>`` (no down projection recomputed) and returns gradients for ``x``, the routing
    weights and the slices — none for the fused tensors.
    """

    @staticmethod
    def forward(ctx, hidden, top_k_index, top_k_weights, lut, gate_up, down, act_fn, *slices):
        num_tokens, num_top_k = top_k_index.shape
        num_experts, num_slots = gate_up.shape[0], len(slices) // 2
        local = lut[top_k_index]
        key = torch.where(local >= 0, local + num_experts, top_k_index).reshape(-1)
        perm = torch.sort(key).indices
        inverse = _inverse(perm)
        counts_dev = torch.bincount(key, minlength=num_experts + num_slots)
        counts = counts_dev.tolist()  # the one host sync
        frozen_counts, slot_counts = counts[:num_experts], counts[num_experts:]
        num_frozen = sum(frozen_counts)
        offsets_frozen = torch.cumsum(counts_dev[:num_experts], dim=0, dtype=torch.int32)
        offsets_slots = torch.cumsum(counts_dev[num_experts:], dim=0, dtype=torch.int32)
        x = hidden[perm // num_top_k]
        weights = top_k_weights.reshape(-1)[perm]
        rows = x.new_empty(x.shape)
        if num_frozen:
            gu = _grouped_mm(x[:num_frozen], gate_up.transpose(-2, -1), offsets_frozen, frozen_counts)
            gate, up = gu.chunk(2, dim=-1)
            rows[:num_frozen] = _grouped_mm(act_fn(gate) * up, down.transpose(-2, -1), offsets_frozen, frozen_counts)
            del gu, gate, up
        slot_gate_up = None
        if num_frozen < x.shape[0]:
            w_gate_up = torch.stack([p.to(x.dtype) for p in slices[0::2]])
            w_down = torch.stack([p.to(x.dtype) for p in slices[1::2]])
            slot_gate_up = _grouped_mm(x[num_frozen:], w_gate_up.transpose(-2, -1), offsets_slots, slot_counts)
            gate, up = slot_gate_up.chunk(2, dim=-1)
            rows[num_frozen:] = _grouped_mm(act_fn(gate) * up, w_down.transpose(-2, -1), offsets_slots, slot_counts)
        rows.mul_(weights.unsqueeze(-1).to(rows.dtype))
        ctx.save_for_backward(
            hidden, perm, inverse, weights, offsets_frozen, offsets_slots, gate_up, down, slot_gate_up, *slices
        )
        ctx.act_fn, ctx.counts, ctx.num_frozen, ctx.num_top_k = act_fn, (frozen_counts, slot_counts), num_frozen, num_top_k
        ctx.weights_dtype = top_k_weights.dtype
        return _unsort_sum(rows, inverse, num_tokens).to(hidden.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        hidden, perm, inverse, weights, offsets_frozen, offsets_slots, gate_up, down, slot_gate_up, *slices = (
            ctx.saved_tensors
        )
        frozen_counts, slot_counts = ctx.counts
        num_frozen, act_fn = ctx.num_frozen, ctx.act_fn
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[2]
        need_slices = any(ctx.needs_input_grad[7:])
        num_tokens, dtype = hidden.shape[0], hidden.dtype
        num_rows = perm.shape[0]
        token = perm // ctx.num_top_k
        grad_x = hidden.new_empty(num_rows, hidden.shape[1]) if need_x else None
        grad_w = torch.empty(num_rows, dtype=torch.float32, device=hidden.device) if need_w else None
        slice_grads: list[Tensor | None] = [None] * len(slices)

        def backward_rows(rows, w_gate_up, w_down, offsets, counts, gu=None, slots=None):
            """Gradients for the sorted rows ``rows`` (whole groups ``counts`` of ``w_gate_up``/``w_down``)."""
            x = hidden[token[rows]]
            if gu is None:
                gu = _grouped_mm(x, w_gate_up.transpose(-2, -1), offsets, counts)
            gate, up, act, inner = _gated(gu, act_fn)
            del gu
            dy = grad_out[token[rows]].to(dtype)  # dL/d(weighted expert output)
            z = _grouped_mm(dy, w_down, offsets, counts)  # dL/d(inner), before the routing weight
            if need_w:
                grad_w[rows] = (inner * z).sum(dim=-1, dtype=torch.float32)
            w = weights[rows].unsqueeze(-1).to(dtype)
            d_inner = z * w
            del z
            (d_gate,) = torch.autograd.grad(act, gate, d_inner * up)
            d_gate_up = torch.cat([d_gate.to(dtype), (d_inner * act.detach()).to(dtype)], dim=-1)
            del d_gate, d_inner, act, gate, up
            if need_x:
                grad_x[rows] = _grouped_mm(d_gate_up, w_gate_up, offsets, counts)
            if slots is not None and need_slices:
                weighted = dy * w
                start = 0
                for slot, count in zip(slots, counts):
                    part = slice(start, start + count)
                    slice_grads[2 * slot] = (d_gate_up[part].t() @ x[part]).to(slices[2 * slot].dtype)
                    slice_grads[2 * slot + 1] = (weighted[part].t() @ inner[part]).to(slices[2 * slot + 1].dtype)
                    start += count

        # The frozen rows in chunks of whole experts, to bound the temporaries of the recomputation.
        max_rows = max(1, -(-num_rows // _BACKWARD_CHUNKS))
        first, row = 0, 0
        while first < len(frozen_counts):
            last, rows = first, 0
            while last < len(frozen_counts) and (rows == 0 or rows + frozen_counts[last] <= max_rows):
                rows += frozen_counts[last]
                last += 1
            if rows:
                base = offsets_frozen[first - 1] if first else 0
                backward_rows(slice(row, row + rows), gate_up[first:last], down[first:last],
                              offsets_frozen[first:last] - base, frozen_counts[first:last])
            first, row = last, row + rows
        if slot_gate_up is not None:
            w_gate_up = torch.stack([p.to(dtype) for p in slices[0::2]])
            w_down = torch.stack([p.to(dtype) for p in slices[1::2]])
            backward_rows(slice(num_frozen, num_rows), w_gate_up, w_down, offsets_slots, slot_counts,
                          gu=slot_gate_up, slots=range(len(slot_counts)))
        elif need_slices:  # no token chose a selected expert: zero gradients (every process of a DDP run has one)
            slice_grads = [torch.zeros_like(p) for p in slices]
        grad_hidden = _unsort_sum(grad_x, inverse, num_tokens).to(dtype) if need_x else None
        grad_weights = grad_w[inverse].view(num_tokens, -1).to(ctx.weights_dtype) if need_w else None
        return (grad_hidden, None, grad_weights, None, None, None, None, *slice_grads)


def sliced_expert_mlp(
    hidden: Tensor,
    top_k_index: Tensor,
    top_k_weights: Tensor,
    lut: Tensor,
    gate_up: Tensor,
    down: Tensor,
    act_fn: Callable[[Tensor], Tensor],
    slices: Sequence[Tensor] = (),
) -> Tensor:
    """:class:`SlicedExpertsFunction` with the slices as one sequence (``gate_up``, ``down`` per slot).

    ``hidden [T, H]``, ``top_k_index [T, K]`` (int64), ``top_k_weights [T, K]``, ``lut [E]`` int64 (slot or -1),
    ``gate_up [E, 2I, H]``, ``down [E, H, I]``; returns ``[T, H]`` in ``hidden``'s dtype.
    """
    if len(slices) % 2:
        raise ValueError(f"slices must hold a gate_up and a down tensor per slot; got {len(slices)} tensors")
    num_slots = int((lut >= 0).sum())
    if len(slices) != 2 * num_slots:
        raise ValueError(f"lut names {num_slots} sliced experts but {len(slices) // 2} slices were given")
    return SlicedExpertsFunction.apply(hidden, top_k_index, top_k_weights, lut, gate_up, down, act_fn, *slices)


def sliced_expert_mlp_reference(
    hidden: Tensor,
    top_k_index: Tensor,
    top_k_weights: Tensor,
    lut: Tensor,
    gate_up: Tensor,
    down: Tensor,
    act_fn: Callable[[Tensor], Tensor],
    slices: Sequence[Tensor] = (),
) -> Tensor:
    """Plain-PyTorch reference of :func:`sliced_expert_mlp`: one expert at a time, in ``hidden``'s dtype, autograd.

    Per-assignment outputs are weighted, then summed per token in assignment order (what the transformers eager
    experts forward does with ``index_add``).
    """
    num_tokens, num_top_k = top_k_index.shape
    rows = hidden.new_zeros(num_tokens * num_top_k, hidden.shape[-1])
    flat = top_k_index.reshape(-1)
    for expert in range(gate_up.shape[0]):
        where = (flat == expert).nonzero().squeeze(-1)
        if where.numel() == 0:
            continue
        slot = int(lut[expert])
        w_gate_up, w_down = (slices[2 * slot], slices[2 * slot + 1]) if slot >= 0 else (gate_up[expert], down[expert])
        x = hidden[where // num_top_k]
        gate, up = F.linear(x, w_gate_up.to(x.dtype)).chunk(2, dim=-1)
        y = F.linear(act_fn(gate) * up, w_down.to(x.dtype))
        rows = rows.index_copy(0, where, y * top_k_weights.reshape(-1)[where].unsqueeze(-1).to(y.dtype))
    return rows.view(num_tokens, num_top_k, -1).sum(dim=1).to(hidden.dtype)
