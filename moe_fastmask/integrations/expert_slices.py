"""Train only some experts of OLMoE's fused expert tensors: gradients, optimizer state and updates for the selected
expert slices alone.

transformers stores the experts of an OLMoE layer as two fused parameters, ``mlp.experts.gate_up_proj``
``[E, 2I, H]`` and ``mlp.experts.down_proj`` ``[E, H, I]``. ``requires_grad`` works per tensor, so marking them
trainable would give every expert a gradient, AdamW state and weight decay. :func:`attach_expert_slices` instead

* freezes every parameter of the model (the fused tensors included);
* gives each selected expert two trainable parameters on its layer's experts module,
  ``fastmask_gate_up_proj_<e>`` ``[2I, H]`` and ``fastmask_down_proj_<e>`` ``[H, I]``. When they keep the fused
  tensors' dtype they are *views* of the fused rows (no extra memory; an optimizer step updates the fused tensor in
  place); with another ``dtype`` (e.g. fp32 master weights for a bf16 model) they are copies. They are the only
  parameters with ``requires_grad=True``, so an optimizer built from the trainable parameters holds nothing else:
  no gradient, no AdamW state and no weight decay ever touches another expert;
* rebinds the experts ``forward`` of every layer to :class:`SlicedExpertsFunction`: the assignments of the frozen
  experts run as grouped GEMMs on the frozen fused tensors, those of the selected experts as grouped GEMMs on the
  stacked trainable slices; backward keeps only the layer input (plus the selected experts' gate/up output) and
  recomputes the frozen gate/up projection, so the frozen experts keep almost no activations. Output and gradients
  equal the stock forward's, including the gradient of the routing weights (through the frozen router to the
  hidden states). ``memory_efficient=False`` keeps the stock implementation (``config._experts_implementation``)
  with the selected experts' routing weights zeroed and adds their outputs from the slices in an autograd loop;
* (``memory_efficient``) rebinds every RMSNorm to :class:`RMSNormFunction`, which keeps its input in the model dtype
  for backward rather than an fp32 copy (same forward bits).

The fused tensors stay the one saved form of the model: a ``state_dict`` pre-hook writes copied slices back before
anything is saved and a post-hook drops the slice keys, so ``save_pretrained`` (and every Trainer checkpoint)
writes a plain OLMoE checkpoint; a ``load_state_dict`` pre-hook loads the slices from loaded fused tensors (resuming
from a checkpoint). :func:`detach_expert_slices` writes the slices back and restores the original module. Under
FSDP2 (``fully_shard``) every parameter is sharded on its own, so :func:`keep_slice_keys` keeps the slices in the
state dict and :func:`merge_expert_slices` folds them into the gathered fused tensors instead.
"""

from __future__ import annotations

import json
import re
import types
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

GATE_UP_PREFIX = "fastmask_gate_up_proj_"
DOWN_PREFIX = "fastmask_down_proj_"
LUT_NAME = "fastmask_expert_lut"
_BACKWARD_CHUNKS = 4  # the frozen experts' backward runs in about this many row blocks
_STATE_ATTR = "_fastmask_slices"


@dataclass
class _SliceState:
    layer: int
    expert_ids: list[int]  # the selected experts of this layer, ascending (slot order)
    memory_efficient: bool
    hook_handles: list
    had_forward: bool  # the instance had its own ``forward`` before patching
    previous_forward: object | None
    keep_slice_keys: bool = False  # sharded training: state dicts keep the slices (see keep_slice_keys)

    def names(self) -> list[tuple[str, str]]:
        return [(f"{GATE_UP_PREFIX}{e}", f"{DOWN_PREFIX}{e}") for e in self.expert_ids]


# --------------------------------------------------------------------------------------------------------------
# Model walking
# --------------------------------------------------------------------------------------------------------------


def _decoder_layers(model: nn.Module) -> nn.ModuleList:
    from transformers.models.olmoe.modeling_olmoe import OlmoeModel

    for module in [model, *model.modules()]:
        if isinstance(module, OlmoeModel):
            return module.layers
    raise TypeError(f"expected an OLMoE model (OlmoeForCausalLM or OlmoeModel), got {type(model).__name__}")


def _experts_modules(model: nn.Module) -> list[nn.Module]:
    experts = []
    for idx, layer in enumerate(_decoder_layers(model)):
        module = getattr(getattr(layer, "mlp", None), "experts", None)
        if module is None or not isinstance(getattr(module, "gate_up_proj", None), Tensor):
            raise TypeError(
                f"layer {idx}: mlp.experts has no fused gate_up_proj tensor; expert slices support the transformers "
                "5.x OLMoE layout (mlp.experts.gate_up_proj [E, 2I, H], mlp.experts.down_proj [E, H, I])"
            )
        if getattr(module, "is_transposed", False) or getattr(module, "has_bias", False):
            raise TypeError(f"layer {idx}: transposed or biased expert tensors are not supported")
        experts.append(module)
    return experts


def normalize_selection(
    selected: Mapping[int, Iterable[int]] | Iterable[tuple[int, int]], num_layers: int, num_experts: int
) -> dict[int, list[int]]:
    """``{layer: [experts]}`` (sorted, unique) from a mapping or from ``(layer, expert)`` pairs; checks ranges."""
    pairs = (
        [(int(layer), int(e)) for layer, experts in selected.items() for e in experts]
        if isinstance(selected, Mapping)
        else [(int(layer), int(e)) for layer, e in selected]
    )
    by_layer: dict[int, set[int]] = {}
    for layer, expert in pairs:
        if not (0 <= layer < num_layers and 0 <= expert < num_experts):
            raise ValueError(f"expert ({layer}, {expert}) is outside the model: {num_layers} layers x {num_experts}")
        by_layer.setdefault(layer, set()).add(expert)
    return {layer: sorted(experts) for layer, experts in sorted(by_layer.items())}


# --------------------------------------------------------------------------------------------------------------
# Grouped expert computation
# --------------------------------------------------------------------------------------------------------------


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
    """One OLMoE experts layer, ``out[t] = sum_k w[t, k] * expert_{idx[t, k]}(x[t])``, whose selected experts use the
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


# --------------------------------------------------------------------------------------------------------------
# The patched experts forward
# --------------------------------------------------------------------------------------------------------------


def _stock_forward(module: nn.Module):
    state: _SliceState = getattr(module, _STATE_ATTR)
    if state.had_forward:
        return state.previous_forward
    return types.MethodType(type(module).forward, module)


def _slice_params(module: nn.Module) -> list[Tensor]:
    state: _SliceState = getattr(module, _STATE_ATTR)
    return [getattr(module, name) for names in state.names() for name in names]


def _memory_efficient_experts_forward(self, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor) -> Tensor:
    """The experts forward through :class:`SlicedExpertsFunction` (layers with or without selected experts)."""
    return SlicedExpertsFunction.apply(
        hidden_states, top_k_index, top_k_weights, getattr(self, LUT_NAME), self.gate_up_proj, self.down_proj,
        self.act_fn, *_slice_params(self),
    )


def _stock_sliced_experts_forward(self, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor) -> Tensor:
    """The stock experts forward with the selected experts' routing weights zeroed, plus their outputs computed from
    the trainable slices by a loop with plain autograd (``memory_efficient=False``)."""
    state: _SliceState = getattr(self, _STATE_ATTR)
    lut: Tensor = getattr(self, LUT_NAME)
    local = lut[top_k_index]
    out = _stock_forward(self)(hidden_states, top_k_index, top_k_weights.masked_fill(local >= 0, 0.0))
    if not state.expert_ids:
        return out
    num_top_k, num_slots = top_k_index.shape[-1], len(state.expert_ids)
    flat_local = local.reshape(-1)
    counts = torch.bincount(flat_local + 1, minlength=num_slots + 1).tolist()  # one host sync
    if counts[0] == flat_local.numel():
        return out
    order = torch.sort(flat_local, stable=True).indices[counts[0] :]
    token_idx = order // num_top_k
    x = hidden_states[token_idx]
    pieces, start = [], 0
    for slot, (gate_up_name, down_name) in enumerate(state.names()):
        end = start + counts[slot + 1]
        if end > start:
            gate, up = F.linear(x[start:end], getattr(self, gate_up_name).to(x.dtype)).chunk(2, dim=-1)
            pieces.append(F.linear(self.act_fn(gate) * up, getattr(self, down_name).to(x.dtype)))
        start = end
    contrib = torch.cat(pieces) * top_k_weights.reshape(-1)[order].unsqueeze(-1).to(x.dtype)
    return out.index_add(0, token_idx, contrib.to(out.dtype))


# --------------------------------------------------------------------------------------------------------------
# RMSNorm that keeps its input in the model dtype for backward
# --------------------------------------------------------------------------------------------------------------

_NORM_ATTR = "_fastmask_lean_norm"


class RMSNormFunction(torch.autograd.Function):
    """OLMoE's RMSNorm (fp32 statistics, ``weight * normed.to(input dtype)``), bit-identical forward, keeping the
    input in its own dtype and the ``[..., 1]`` inverse RMS for backward instead of an fp32 copy of the input."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        h = x.to(torch.float32)
        rstd = torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(x, weight, rstd)
        return weight * (h * rstd).to(x.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, rstd = ctx.saved_tensors
        normed = x.to(torch.float32) * rstd
        grad_normed = (grad_out * weight).to(torch.float32)
        grad_x = rstd * (grad_normed - normed * (grad_normed * normed).mean(-1, keepdim=True))
        grad_weight = None
        if ctx.needs_input_grad[1]:
            grad_weight = (grad_out * normed.to(x.dtype)).reshape(-1, x.shape[-1]).sum(0).to(weight.dtype)
        return grad_x.to(x.dtype), grad_weight, None


def _lean_rmsnorm_forward(self, hidden_states: Tensor) -> Tensor:
    if torch.is_grad_enabled() and (hidden_states.requires_grad or self.weight.requires_grad):
        return RMSNormFunction.apply(hidden_states, self.weight, self.variance_epsilon)
    return type(self).forward(self, hidden_states)


def attach_lean_norms(model: nn.Module) -> int:
    """Rebind every ``OlmoeRMSNorm`` of ``model`` to :class:`RMSNormFunction` when it records a graph (training);
    inference runs the stock forward. Returns how many norms were patched."""
    from transformers.models.olmoe.modeling_olmoe import OlmoeRMSNorm

    count = 0
    for module in model.modules():
        if isinstance(module, OlmoeRMSNorm) and not hasattr(module, _NORM_ATTR) and "forward" not in module.__dict__:
            module.forward = types.MethodType(_lean_rmsnorm_forward, module)
            setattr(module, _NORM_ATTR, True)
            count += 1
    return count


def detach_lean_norms(model: nn.Module) -> None:
    """Undo :func:`attach_lean_norms`."""
    for module in model.modules():
        if hasattr(module, _NORM_ATTR):
            del module.forward
            delattr(module, _NORM_ATTR)


# --------------------------------------------------------------------------------------------------------------
# State-dict hooks: the fused tensors are the saved form
# --------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def _write_back(module: nn.Module) -> None:
    state: _SliceState = getattr(module, _STATE_ATTR)
    for expert, (gate_up_name, down_name) in zip(state.expert_ids, state.names()):
        for fused, name in ((module.gate_up_proj, gate_up_name), (module.down_proj, down_name)):
            piece = getattr(module, name)
            if piece.data_ptr() != fused[expert].data_ptr():  # a copy (a view of the fused row needs nothing)
                fused[expert].copy_(piece)


def _state_dict_pre_hook(module: nn.Module, prefix: str, keep_vars: bool) -> None:
    if not getattr(module, _STATE_ATTR).keep_slice_keys:
        _write_back(module)


def _state_dict_post_hook(module: nn.Module, state_dict: dict, prefix: str, local_metadata) -> None:
    if getattr(module, _STATE_ATTR).keep_slice_keys:
        return
    for names in getattr(module, _STATE_ATTR).names():
        for name in names:
            state_dict.pop(prefix + name, None)


def _load_state_dict_pre_hook(module, state_dict, prefix, local_metadata, strict, missing, unexpected, errors) -> None:
    """Loading fused tensors (a checkpoint) also loads the selected slices from them."""
    state: _SliceState = getattr(module, _STATE_ATTR)
    for expert, names in zip(state.expert_ids, state.names()):
        for fused_name, name in zip(("gate_up_proj", "down_proj"), names):
            fused = state_dict.get(prefix + fused_name)
            if fused is not None and prefix + name not in state_dict:
                state_dict[prefix + name] = fused[expert]


# --------------------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------------------


def attach_expert_slices(
    model: nn.Module,
    selected: Mapping[int, Iterable[int]] | Iterable[tuple[int, int]],
    *,
    dtype: torch.dtype | None = None,
    memory_efficient: bool = True,
    freeze: bool = True,
) -> list[nn.Parameter]:
    """Make only the ``selected`` experts of an OLMoE ``model`` trainable, as separate per-expert parameters.

    ``selected``: ``{layer: [expert, ...]}`` or ``(layer, expert)`` pairs. ``dtype``: dtype of the trainable
    parameters; by default the fused tensors' dtype, and then they are views of the fused rows (no extra memory);
    ``torch.float32`` for a bf16 model keeps fp32 master copies (more precise updates, 6x the slice bytes with AdamW
    state). ``memory_efficient``: every layer's experts run through :class:`SlicedExpertsFunction` (keeps the layer
    input and the selected experts' gate/up output for backward, recomputes the frozen experts' gate/up projection);
    False: the stock implementation with the selected experts' routing weights zeroed, plus an autograd loop over the
    selected experts (keeps every activation). With ``memory_efficient`` every RMSNorm also keeps its input in the
    model dtype instead of an fp32 copy (:func:`attach_lean_norms`). ``freeze``: ``requires_grad=False`` on every
    other parameter.

    Attach after the model is on its final device and dtype (a later ``.to(dtype)`` would turn views into copies;
    saving still writes them back). Returns the new trainable parameters (gate/up then down per expert, in layer
    order). Calling it again detaches the previous slices first (writing them back).
    """
    experts = _experts_modules(model)
    if has_expert_slices(model):
        detach_expert_slices(model)
    first = experts[0]
    by_layer = normalize_selection(selected, len(experts), first.gate_up_proj.shape[0])
    if freeze:
        for param in model.parameters():
            param.requires_grad_(False)
    params: list[nn.Parameter] = []
    for layer, module in enumerate(experts):
        expert_ids = by_layer.get(layer, [])
        if not expert_ids and not memory_efficient:
            continue  # the stock forward already trains nothing here
        device = module.gate_up_proj.device
        state = _SliceState(
            layer=layer,
            expert_ids=list(expert_ids),
            memory_efficient=bool(memory_efficient),
            hook_handles=[],
            had_forward="forward" in module.__dict__,
            previous_forward=module.__dict__.get("forward"),
        )
        for expert, names in zip(expert_ids, state.names()):
            for fused, name in zip((module.gate_up_proj, module.down_proj), names):
                row = fused.detach()[expert]
                if dtype is not None and dtype != fused.dtype:
                    row = row.to(dtype).clone()
                param = nn.Parameter(row, requires_grad=True)
                module.register_parameter(name, param)
                params.append(param)
        lut = torch.full((module.gate_up_proj.shape[0],), -1, dtype=torch.long, device=device)
        if expert_ids:
            lut[torch.tensor(expert_ids, device=device)] = torch.arange(len(expert_ids), device=device)
        module.register_buffer(LUT_NAME, lut, persistent=False)
        setattr(module, _STATE_ATTR, state)
        state.hook_handles = [
            module.register_state_dict_pre_hook(_state_dict_pre_hook),
            module.register_state_dict_post_hook(_state_dict_post_hook),
            module.register_load_state_dict_pre_hook(_load_state_dict_pre_hook),
        ]
        forward = _memory_efficient_experts_forward if memory_efficient else _stock_sliced_experts_forward
        module.forward = types.MethodType(forward, module)
    if memory_efficient:
        attach_lean_norms(model)
    return params


def has_expert_slices(model: nn.Module) -> bool:
    """True if :func:`attach_expert_slices` is active on any layer of ``model``."""
    return any(hasattr(module, _STATE_ATTR) for module in _experts_modules(model))


def sliced_experts(model: nn.Module) -> dict[int, list[int]]:
    """``{layer: [experts]}`` whose weights currently live in trainable slices."""
    return {
        getattr(module, _STATE_ATTR).layer: list(getattr(module, _STATE_ATTR).expert_ids)
        for module in _experts_modules(model)
        if hasattr(module, _STATE_ATTR) and getattr(module, _STATE_ATTR).expert_ids
    }


def expert_slice_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The trainable slice parameters of ``model`` (gate/up then down per expert), in layer order."""
    params = []
    for module in _experts_modules(model):
        state = getattr(module, _STATE_ATTR, None)
        if state is not None:
            params.extend(getattr(module, name) for names in state.names() for name in names)
    return params


def keep_slice_keys(model: nn.Module, keep: bool = True) -> None:
    """Sharded training (FSDP2's ``fully_shard``): state dicts keep the slice keys and touch no fused tensor.

    Sharding turns every parameter into a shard of its own, so the slices stop being views of the fused rows and a
    sharded fused tensor cannot take a row write-back. With ``keep``, ``state_dict()`` returns the (possibly sharded)
    slices as parameters of their own; gather the full state dict as the sharding library does, then fold them into
    the fused tensors with :func:`merge_expert_slices`. :func:`detach_expert_slices` then writes nothing back.
    """
    for module in _experts_modules(model):
        state = getattr(module, _STATE_ATTR, None)
        if state is not None:
            state.keep_slice_keys = bool(keep)


@torch.no_grad()
def merge_expert_slices(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """Fold the slice entries of a full state dict (``...experts.fastmask_gate_up_proj_<e>`` and
    ``...fastmask_down_proj_<e>``) into row ``e`` of their fused tensors and drop them, in place; returns it.

    Writes into the fused tensors held by ``state_dict``: use it on a gathered copy (what FSDP's full state dict
    and ``Accelerator.get_state_dict`` return), where it gives the plain OLMoE checkpoint of the trained model.
    """
    for key in [k for k in state_dict if GATE_UP_PREFIX in k or DOWN_PREFIX in k]:
        prefix, _, name = key.rpartition(".")
        for slice_prefix, fused_name in ((GATE_UP_PREFIX, "gate_up_proj"), (DOWN_PREFIX, "down_proj")):
            if name.startswith(slice_prefix) and name[len(slice_prefix):].isdigit():
                fused = state_dict[f"{prefix}.{fused_name}" if prefix else fused_name]
                fused[int(name[len(slice_prefix):])].copy_(state_dict.pop(key))
    return state_dict


def add_slice_entries(state_dict: dict[str, Tensor], model: nn.Module) -> dict[str, Tensor]:
    """The inverse of :func:`merge_expert_slices`: add to a full state dict of fused tensors (a checkpoint) the slice
    entries of ``model``'s selected experts, taken from their fused rows; in place, returns it. What loading a plain
    checkpoint into a sharded model needs (``torch.distributed.checkpoint.state_dict.set_model_state_dict``)."""
    for prefix, module in model.named_modules():
        state = getattr(module, _STATE_ATTR, None)
        if state is None:
            continue
        base = f"{prefix}." if prefix else ""
        for expert, names in zip(state.expert_ids, state.names()):
            for fused_name, name in zip(("gate_up_proj", "down_proj"), names):
                fused = state_dict.get(base + fused_name)
                if fused is not None and base + name not in state_dict:
                    state_dict[base + name] = fused[expert]
    return state_dict


def write_back_expert_slices(model: nn.Module) -> None:
    """Copy trainable slices that are copies (not views) into the fused tensors (saving does this by itself)."""
    for module in _experts_modules(model):
        if hasattr(module, _STATE_ATTR):
            _write_back(module)


def detach_expert_slices(model: nn.Module, *, write_back: bool = True) -> nn.Module:
    """Remove the slices: write them back into the fused tensors (unless ``write_back=False``; views of the fused
    rows have already updated them), restore the original experts ``forward`` and drop the hooks, parameters and
    buffers. ``requires_grad`` flags stay as they are (all False after a freezing attach). Returns ``model``."""
    for module in _experts_modules(model):
        state: _SliceState | None = getattr(module, _STATE_ATTR, None)
        if state is None:
            continue
        if write_back and not state.keep_slice_keys:
            _write_back(module)
        for handle in state.hook_handles:
            handle.remove()
        if state.had_forward:
            module.forward = state.previous_forward
        else:
            del module.forward
        for names in state.names():
            for name in names:
                del module._parameters[name]
        del module._buffers[LUT_NAME]
        delattr(module, _STATE_ATTR)
    detach_lean_norms(model)
    return model


# --------------------------------------------------------------------------------------------------------------
# Reading checkpoints in either expert layout
# --------------------------------------------------------------------------------------------------------------

_PER_EXPERT_KEY = re.compile(r"^(.*\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")


def load_fused_state_dict(checkpoint: str | Path) -> dict[str, Tensor] | None:
    """The weights of a saved OLMoE checkpoint directory under the module names of the loaded model.

    ``save_pretrained`` in transformers 5 writes experts in the original per-expert layout
    (``...experts.<e>.gate_proj.weight``), which plain ``Module.load_state_dict`` cannot take: this stacks them into
    the fused ``...experts.gate_up_proj`` ``[E, 2I, H]`` (gate rows, then up rows) and ``...experts.down_proj``
    ``[E, H, I]``. Fused keys pass through unchanged. Returns None when the directory has no safetensors weights.
    """
    from safetensors import safe_open

    path = Path(checkpoint)
    if (path / "model.safetensors").is_file():
        files = [path / "model.safetensors"]
    elif (path / "model.safetensors.index.json").is_file():
        index = json.loads((path / "model.safetensors.index.json").read_text())
        files = [path / name for name in sorted(set(index["weight_map"].values()))]
    else:
        return None
    state: dict[str, Tensor] = {}
    per_expert: dict[str, dict[tuple[int, str], Tensor]] = {}
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            for key in handle.keys():
                match = _PER_EXPERT_KEY.match(key)
                if match is None:
                    state[key] = handle.get_tensor(key)
                else:
                    per_expert.setdefault(match.group(1), {})[(int(match.group(2)), match.group(3))] = handle.get_tensor(key)
    for prefix, parts in per_expert.items():
        num_experts = 1 + max(expert for expert, _ in parts)
        try:
            state[f"{prefix}.gate_up_proj"] = torch.stack(
                [torch.cat([parts.pop((e, "gate_proj")), parts.pop((e, "up_proj"))], dim=0) for e in range(num_experts)]
            )
            state[f"{prefix}.down_proj"] = torch.stack([parts.pop((e, "down_proj")) for e in range(num_experts)])
        except KeyError as missing:
            raise ValueError(f"{path}: checkpoint lacks {prefix}.{missing.args[0][0]}.{missing.args[0][1]}.weight") from None
    return state
