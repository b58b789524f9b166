"""Sliced expert MLPs: one MoE experts layer whose selected experts train through separate weight slices.

:class:`SlicedExpertsFunction` computes ``out[t] = sum_k w[t, k] * expert_{idx[t, k]}(x[t])`` for gated experts
``down(glu(gate_up(x) + b_gate_up)) + b_down`` stored fused, where the experts named by ``lut`` (``lut[e] = slot`` or
-1) use trainable per-expert slices instead of their fused rows. :class:`ExpertMLP` says how the weights are stored
and what the gated activation is: ``gate_up [E, 2I, H]`` and ``down [E, H, I]`` (``y = x @ W.T``, OLMoE, Mixtral,
Qwen-MoE, DeepSeek-V3) or ``transposed`` ``[E, H, 2I]`` / ``[E, I, H]`` (``y = x @ W``, GPT-OSS); the activation
maps the gate/up projection output ``[N, 2I]`` to ``[N, I]`` and so also owns how gate and up columns are arranged
(concatenated or interleaved). Biases (``gate_up_bias [E, 2I]``, ``down_bias [E, H]``) are optional; with them
every slot has four slices (``gate_up``, ``down``, ``gate_up_bias``, ``down_bias``), without them two. The fused
tensors get no gradient. :func:`sliced_expert_mlp_reference` is the plain-PyTorch reference (a loop over experts
with ordinary autograd) that tests compare against.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

_BACKWARD_CHUNKS = 4  # the frozen experts' backward runs in about this many row blocks


class GatedActivation:
    """``act(gate) * up`` of a gate/up projection output ``[..., 2I]``: gate columns then up columns, or
    ``interleaved`` (gate and up columns alternate)."""

    def __init__(self, act_fn: Callable[[Tensor], Tensor], interleaved: bool = False):
        self.act_fn = act_fn
        self.interleaved = bool(interleaved)

    def __call__(self, gate_up: Tensor) -> Tensor:
        if self.interleaved:
            gate, up = gate_up[..., ::2], gate_up[..., 1::2]
        else:
            gate, up = gate_up.chunk(2, dim=-1)
        return self.act_fn(gate) * up

    def __repr__(self) -> str:
        return f"GatedActivation({self.act_fn!r}, interleaved={self.interleaved})"


@dataclass(frozen=True)
class ExpertMLP:
    """How one gated expert is stored and computed: ``glu`` maps the gate/up projection output ``[N, 2I]`` (bias
    added) to the down projection's input ``[N, I]``; ``transposed``: weights are ``[in, out]`` (``y = x @ W``)
    instead of ``[out, in]`` (``y = x @ W.T``)."""

    glu: Callable[[Tensor], Tensor]
    transposed: bool = False

    @classmethod
    def of(cls, mlp: "ExpertMLP | Callable[[Tensor], Tensor]") -> "ExpertMLP":
        """``mlp`` itself, or for a plain gate activation ``act`` the concatenated, untransposed
        ``act(gate) * up`` expert."""
        return mlp if isinstance(mlp, ExpertMLP) else cls(GatedActivation(mlp))

    def in_out(self, weight: Tensor) -> Tensor:
        """``weight`` (one expert's or stacked) as ``[..., in, out]``."""
        return weight if self.transposed else weight.transpose(-2, -1)

    def out_in(self, weight: Tensor) -> Tensor:
        """``weight`` (one expert's or stacked) as ``[..., out, in]``."""
        return weight.transpose(-2, -1) if self.transposed else weight

    def linear(self, x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
        """``x [N, in]`` through one expert's projection ``weight`` (+ ``bias``), in ``x``'s dtype; the order of
        operations of the families' own expert loops (a matmul, then the bias added)."""
        weight = weight.to(x.dtype)
        y = x @ weight if self.transposed else F.linear(x, weight)
        return y if bias is None else y + bias.to(x.dtype)

    def forward(
        self, x: Tensor, gate_up: Tensor, down: Tensor, gate_up_bias: Tensor | None = None,
        down_bias: Tensor | None = None,
    ) -> Tensor:
        """One expert on rows ``x [N, H]`` with its weights (rows of the fused tensors, or slices); ``[N, H]``."""
        return self.linear(self.glu(self.linear(x, gate_up, gate_up_bias)), down, down_bias)


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


def _project(mlp: ExpertMLP, x: Tensor, weight: Tensor, bias: Tensor | None, group: Tensor | None, offsets, counts):
    """Rows ``x`` grouped by expert through the stacked ``weight`` (``[G, ...]`` in the layout of ``mlp``), plus
    ``bias[group]`` per row when biased (``group``: each row's index into ``bias``)."""
    y = _grouped_mm(x, mlp.in_out(weight), offsets, counts)
    if bias is not None:
        y += bias.to(y.dtype)[group]
    return y


class SlicedExpertsFunction(torch.autograd.Function):
    """One experts layer, ``out[t] = sum_k w[t, k] * expert_{idx[t, k]}(x[t])``, whose selected experts use the
    trainable slices and every other expert the frozen fused tensors.

    ``apply(hidden, top_k_index, top_k_weights, lut, gate_up, down, mlp, gate_up_bias, down_bias, *slices)``;
    ``mlp``: an :class:`ExpertMLP` (or a plain gate activation, for ``act(gate) * up``); the biases are None for
    bias-free experts. The ``T*K`` assignments are sorted by expert with the selected experts last (one host sync
    per layer reads the group sizes); the frozen ones run as one grouped GEMM pair on the fused tensors, the selected
    ones as one on the stacked slices. Kept for backward: the layer input ``x``, the routing, and the gate/up output
    of the selected assignments only. Backward recomputes the frozen gate/up projection, gets the routing-weight
    gradient as ``<glu, down^T dy> + <b_down, dy>`` (no down projection recomputed) and returns gradients for ``x``,
    the routing weights and the slices — none for the fused tensors.
    """

    @staticmethod
    def forward(ctx, hidden, top_k_index, top_k_weights, lut, gate_up, down, mlp, gate_up_bias, down_bias, *slices):
        mlp = ExpertMLP.of(mlp)
        biased = gate_up_bias is not None
        per_slot = 4 if biased else 2
        num_tokens, num_top_k = top_k_index.shape
        num_experts, num_slots = gate_up.shape[0], len(slices) // per_slot
        local = lut[top_k_index]
        key = torch.where(local >= 0, local + num_experts, top_k_index).reshape(-1)
        sorted_key, perm = torch.sort(key)
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
            group = sorted_key[:num_frozen]
            gu = _project(mlp, x[:num_frozen], gate_up, gate_up_bias, group, offsets_frozen, frozen_counts)
            rows[:num_frozen] = _project(mlp, mlp.glu(gu), down, down_bias, group, offsets_frozen, frozen_counts)
            del gu
        slot_gate_up = None
        if num_frozen < x.shape[0]:
            group = sorted_key[num_frozen:] - num_experts
            w_gate_up, w_down, b_gate_up, b_down = _stack_slots(slices, per_slot, x.dtype)
            slot_gate_up = _project(mlp, x[num_frozen:], w_gate_up, b_gate_up, group, offsets_slots, slot_counts)
            rows[num_frozen:] = _project(mlp, mlp.glu(slot_gate_up), w_down, b_down, group, offsets_slots,
                                         slot_counts)
        rows.mul_(weights.unsqueeze(-1).to(rows.dtype))
        ctx.save_for_backward(
            hidden, perm, inverse, sorted_key, weights, offsets_frozen, offsets_slots, gate_up, down, gate_up_bias,
            down_bias, slot_gate_up, *slices,
        )
        ctx.mlp, ctx.counts, ctx.num_frozen, ctx.num_top_k = mlp, (frozen_counts, slot_counts), num_frozen, num_top_k
        ctx.per_slot, ctx.weights_dtype = per_slot, top_k_weights.dtype
        return _unsort_sum(rows, inverse, num_tokens).to(hidden.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        (hidden, perm, inverse, sorted_key, weights, offsets_frozen, offsets_slots, gate_up, down, gate_up_bias,
         down_bias, slot_gate_up, *slices) = ctx.saved_tensors
        frozen_counts, slot_counts = ctx.counts
        num_frozen, mlp, per_slot = ctx.num_frozen, ctx.mlp, ctx.per_slot
        num_experts = gate_up.shape[0]
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[2]
        need_slices = any(ctx.needs_input_grad[9:])
        num_tokens, dtype = hidden.shape[0], hidden.dtype
        num_rows = perm.shape[0]
        token = perm // ctx.num_top_k
        grad_x = hidden.new_empty(num_rows, hidden.shape[1]) if need_x else None
        grad_w = torch.empty(num_rows, dtype=torch.float32, device=hidden.device) if need_w else None
        slice_grads: list[Tensor | None] = [None] * len(slices)

        def backward_rows(rows, w_gate_up, w_down, b_gate_up, b_down, group, offsets, counts, gu=None, slots=None):
            """Gradients for the sorted rows ``rows`` (whole groups ``counts`` of ``w_gate_up``/``w_down``;
            ``group``: each row's index into the biases ``b_gate_up``/``b_down``)."""
            x = hidden[token[rows]]
            if gu is None:
                gu = _project(mlp, x, w_gate_up, b_gate_up, group, offsets, counts)
            with torch.enable_grad():
                gu = gu.detach().requires_grad_(True)
                inner = mlp.glu(gu)  # recorded for its backward
            dy = grad_out[token[rows]].to(dtype)  # dL/d(weighted expert output)
            z = _grouped_mm(dy, mlp.out_in(w_down), offsets, counts)  # dL/d(inner), before the routing weight
            if need_w:
                grad = (inner.detach() * z).sum(dim=-1, dtype=torch.float32)
                if b_down is not None:
                    grad += (dy * b_down.to(dtype)[group]).sum(dim=-1, dtype=torch.float32)
                grad_w[rows] = grad
            w = weights[rows].unsqueeze(-1).to(dtype)
            d_inner = z * w
            del z
            (d_gate_up,) = torch.autograd.grad(inner, gu, d_inner)
            d_gate_up = d_gate_up.to(dtype)
            inner = inner.detach()
            del d_inner, gu
            if need_x:
                grad_x[rows] = _grouped_mm(d_gate_up, mlp.out_in(w_gate_up), offsets, counts)
            if slots is not None and need_slices:
                weighted = dy * w
                start = 0
                for slot, count in zip(slots, counts):
                    part = slice(start, start + count)
                    if mlp.transposed:  # [H, 2I] and [I, H], as stored
                        grads = [x[part].t() @ d_gate_up[part], inner[part].t() @ weighted[part]]
                    else:  # [2I, H] and [H, I]
                        grads = [d_gate_up[part].t() @ x[part], weighted[part].t() @ inner[part]]
                    if per_slot == 4:
                        grads += [d_gate_up[part].sum(dim=0), weighted[part].sum(dim=0)]
                    for j, grad in enumerate(grads):
                        slice_grads[per_slot * slot + j] = grad.to(slices[per_slot * slot + j].dtype)
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
                part = slice(row, row + rows)
                backward_rows(part, gate_up[first:last], down[first:last], gate_up_bias, down_bias, sorted_key[part],
                              offsets_frozen[first:last] - base, frozen_counts[first:last])
            first, row = last, row + rows
        if slot_gate_up is not None:
            part = slice(num_frozen, num_rows)
            w_gate_up, w_down, b_gate_up, b_down = _stack_slots(slices, per_slot, dtype)
            backward_rows(part, w_gate_up, w_down, b_gate_up, b_down, sorted_key[part] - num_experts, offsets_slots,
                          slot_counts, gu=slot_gate_up, slots=range(len(slot_counts)))
        elif need_slices:  # no token chose a selected expert: zero gradients (every process of a DDP run has one)
            slice_grads = [torch.zeros_like(p) for p in slices]
        grad_hidden = _unsort_sum(grad_x, inverse, num_tokens).to(dtype) if need_x else None
        grad_weights = grad_w[inverse].view(num_tokens, -1).to(ctx.weights_dtype) if need_w else None
        return (grad_hidden, None, grad_weights, None, None, None, None, None, None, *slice_grads)


def _stack_slots(slices: Sequence[Tensor], per_slot: int, dtype: torch.dtype):
    """``(gate_up, down, gate_up_bias, down_bias)`` of the slots, each stacked ``[slots, ...]`` in ``dtype``
    (biases None when the slots have none)."""
    stacked = [torch.stack([p.to(dtype) for p in slices[j::per_slot]]) for j in range(per_slot)]
    return (*stacked, None, None) if per_slot == 2 else tuple(stacked)


def _check_slices(lut: Tensor, slices: Sequence[Tensor], gate_up_bias: Tensor | None, down_bias: Tensor | None):
    if (gate_up_bias is None) != (down_bias is None):
        raise ValueError("gate_up_bias and down_bias: give both (biased experts) or neither")
    per_slot, names = (4, "a gate_up, a down, a gate_up_bias and a down_bias tensor") if gate_up_bias is not None \
        else (2, "a gate_up and a down tensor")
    if len(slices) % per_slot:
        raise ValueError(f"slices must hold {names} per slot; got {len(slices)} tensors")
    num_slots = int((lut >= 0).sum())
    if len(slices) != per_slot * num_slots:
        raise ValueError(f"lut names {num_slots} sliced experts but {len(slices) // per_slot} slices were given")


def sliced_expert_mlp(
    hidden: Tensor,
    top_k_index: Tensor,
    top_k_weights: Tensor,
    lut: Tensor,
    gate_up: Tensor,
    down: Tensor,
    mlp: ExpertMLP | Callable[[Tensor], Tensor],
    slices: Sequence[Tensor] = (),
    *,
    gate_up_bias: Tensor | None = None,
    down_bias: Tensor | None = None,
) -> Tensor:
    """:class:`SlicedExpertsFunction` with the slices as one sequence (``gate_up``, ``down`` per slot, then
    ``gate_up_bias``, ``down_bias`` when the experts are biased).

    ``hidden [T, H]``, ``top_k_index [T, K]`` (int64), ``top_k_weights [T, K]``, ``lut [E]`` int64 (slot or -1),
    ``gate_up [E, 2I, H]``, ``down [E, H, I]`` (``[E, H, 2I]``, ``[E, I, H]`` when ``mlp.transposed``), optional
    ``gate_up_bias [E, 2I]`` and ``down_bias [E, H]``; ``mlp``: an :class:`ExpertMLP` or a plain gate activation
    (``act(gate) * up``, gate rows then up rows); returns ``[T, H]`` in ``hidden``'s dtype.
    """
    _check_slices(lut, slices, gate_up_bias, down_bias)
    return SlicedExpertsFunction.apply(
        hidden, top_k_index, top_k_weights, lut, gate_up, down, mlp, gate_up_bias, down_bias, *slices
    )


def sliced_expert_mlp_reference(
    hidden: Tensor,
    top_k_index: Tensor,
    top_k_weights: Tensor,
    lut: Tensor,
    gate_up: Tensor,
    down: Tensor,
    mlp: ExpertMLP | Callable[[Tensor], Tensor],
    slices: Sequence[Tensor] = (),
    *,
    gate_up_bias: Tensor | None = None,
    down_bias: Tensor | None = None,
) -> Tensor:
    """Plain-PyTorch reference of :func:`sliced_expert_mlp`: one expert at a time (:meth:`ExpertMLP.forward`), in
    ``hidden``'s dtype, autograd.

    Per-assignment outputs are weighted, then summed per token in assignment order (what the transformers eager
    experts forward does with ``index_add``).
    """
    _check_slices(lut, slices, gate_up_bias, down_bias)
    mlp = ExpertMLP.of(mlp)
    per_slot = 2 if gate_up_bias is None else 4
    num_tokens, num_top_k = top_k_index.shape
    rows = hidden.new_zeros(num_tokens * num_top_k, hidden.shape[-1])
    flat = top_k_index.reshape(-1)
    for expert in range(gate_up.shape[0]):
        where = (flat == expert).nonzero().squeeze(-1)
        if where.numel() == 0:
            continue
        slot = int(lut[expert])
        if slot >= 0:
            weights = slices[per_slot * slot : per_slot * (slot + 1)]
        else:
            weights = [gate_up[expert], down[expert]]
            if gate_up_bias is not None:
                weights += [gate_up_bias[expert], down_bias[expert]]
        y = mlp.forward(hidden[where // num_top_k], *weights)
        rows = rows.index_copy(0, where, y * top_k_weights.reshape(-1)[where].unsqueeze(-1).to(y.dtype))
    return rows.view(num_tokens, num_top_k, -1).sum(dim=1).to(hidden.dtype)
