"""Train only some experts of a model's fused expert tensors: gradients, optimizer state and updates for the
selected expert slices alone.

transformers 5.x stores the experts of an MoE layer as fused parameters, e.g. OLMoE's ``mlp.experts.gate_up_proj``
``[E, 2I, H]`` and ``mlp.experts.down_proj`` ``[E, H, I]``, or GPT-OSS' transposed ``gate_up_proj [E, H, 2I]`` (gate
and up columns interleaved) and ``down_proj [E, I, H]`` with ``gate_up_proj_bias [E, 2I]`` and
``down_proj_bias [E, H]``. The model's adapter (:func:`moe_fastmask.integrations.get_adapter`) says where the experts
modules are, the names and layout of their fused tensors as data (:class:`ExpertLayout`), the gated activation of
one expert (:meth:`MoEAdapter.expert_glu`) and which RMSNorm classes may be replaced; nothing here names a family.
``requires_grad`` works per tensor, so marking the fused tensors trainable would give every expert a gradient, AdamW
state and weight decay. :func:`attach_expert_slices` instead

* freezes every parameter of the model (the fused tensors included; shared experts stay frozen);
* gives each selected expert one trainable parameter per fused tensor on its layer's experts module, its row in the
  stored layout: ``fastmask_gate_up_proj_<e>`` (``[2I, H]``, or ``[H, 2I]`` transposed) and
  ``fastmask_down_proj_<e>`` (``[H, I]``, or ``[I, H]``), plus ``fastmask_gate_up_bias_<e>`` ``[2I]`` and
  ``fastmask_down_bias_<e>`` ``[H]`` for biased experts. When they keep the fused tensors' dtype they are *views* of
  the fused rows (no extra memory; an optimizer step updates the fused tensor in place); with another ``dtype``
  (e.g. fp32 master weights for a bf16 model) they are copies. They are the only parameters with
  ``requires_grad=True``, so an optimizer built from the trainable parameters holds nothing else: no gradient, no
  AdamW state and no weight decay ever touches another expert;
* rebinds the experts ``forward`` of every MoE layer to :class:`moe_fastmask.ops.SlicedExpertsFunction`: the
  assignments of the frozen experts run as grouped GEMMs on the frozen fused tensors, those of the selected experts
  as grouped GEMMs on the stacked trainable slices; backward keeps only the layer input (plus the selected experts'
  gate/up output) and recomputes the frozen gate/up projection, so the frozen experts keep almost no activations.
  Output and gradients equal the stock forward's, including the gradient of the routing weights (through the frozen
  router to the hidden states). ``memory_efficient=False`` keeps the stock implementation
  (``config._experts_implementation``) with the selected experts' routing weights zeroed and adds their outputs
  from the slices in an autograd loop;
* (``memory_efficient``) rebinds every RMSNorm of the adapter's norm classes to
  :class:`moe_fastmask.ops.RMSNormFunction`, which keeps its input in the model dtype for backward rather than an
  fp32 copy (same forward bits).

The fused tensors stay the one saved form of the model: a ``state_dict`` pre-hook writes copied slices back (into
their rows, so the stored layout is kept as it was) before
anything is saved and a post-hook drops the slice keys, so ``save_pretrained`` (and every Trainer checkpoint)
writes a plain checkpoint; a ``load_state_dict`` pre-hook loads the slices from loaded fused tensors (resuming
from a checkpoint). :func:`detach_expert_slices` writes the slices back and restores the original module. Under
FSDP2 (``fully_shard``) every parameter is sharded on its own, so :func:`keep_slice_keys` keeps the slices in the
state dict and :func:`merge_expert_slices` folds them into the gathered fused tensors instead.
"""

from __future__ import annotations

import json
import re
import types
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from moe_fastmask.integrations.adapter import ExpertLayout, MoEAdapter
from moe_fastmask.integrations.registry import get_adapter
# the autograd functions live in ops; their names stay importable from here
from moe_fastmask.ops.expert_mlp import ExpertMLP, SlicedExpertsFunction
from moe_fastmask.ops.rmsnorm import RMSNormFunction

GATE_UP_PREFIX = "fastmask_gate_up_proj_"
DOWN_PREFIX = "fastmask_down_proj_"
GATE_UP_BIAS_PREFIX = "fastmask_gate_up_bias_"
DOWN_BIAS_PREFIX = "fastmask_down_bias_"
# per expert, in the order of ExpertLayout.tensor_names(): gate_up, down, then the biases of biased experts
SLICE_PREFIXES = (GATE_UP_PREFIX, DOWN_PREFIX, GATE_UP_BIAS_PREFIX, DOWN_BIAS_PREFIX)
LUT_NAME = "fastmask_expert_lut"
_STATE_ATTR = "_fastmask_slices"
_NORM_ATTR = "_fastmask_lean_norm"


@dataclass
class _SliceState:
    layer: int
    expert_ids: list[int]  # the selected experts of this layer, ascending (slot order)
    memory_efficient: bool
    hook_handles: list
    had_forward: bool  # the instance had its own ``forward`` before patching
    previous_forward: object | None
    adapter: MoEAdapter
    mlp: ExpertMLP  # how one expert computes (the adapter's layout and gated activation)
    keep_slice_keys: bool = False  # sharded training: state dicts keep the slices (see keep_slice_keys)

    @property
    def layout(self) -> ExpertLayout:
        return self.adapter.expert_layout

    def names(self) -> list[tuple[str, ...]]:
        """Per selected expert, its slice names, matching :meth:`ExpertLayout.tensor_names`."""
        prefixes = SLICE_PREFIXES[: len(self.layout.tensor_names())]
        return [tuple(f"{prefix}{e}" for prefix in prefixes) for e in self.expert_ids]

    def fused(self, module: nn.Module) -> tuple[Tensor, ...]:
        """The fused tensors, in the order of :meth:`ExpertLayout.tensor_names`."""
        return tuple(getattr(module, name) for name in self.layout.tensor_names())


# --------------------------------------------------------------------------------------------------------------
# Model walking (through the model's adapter)
# --------------------------------------------------------------------------------------------------------------


class UnsupportedExpertLayoutError(TypeError):
    """The model's experts modules do not hold the fused tensors their adapter's :class:`ExpertLayout` describes."""


def check_expert_slices_supported(model: nn.Module) -> None:
    """Raise :class:`UnsupportedExpertLayoutError` (or the registry's error for an unknown family) unless expert
    slices can train ``model``; cheap, so callers run it before writing anything."""
    _experts_modules(model)


def _experts_modules(model: nn.Module, adapter: MoEAdapter | None = None) -> list[nn.Module]:
    """The experts module of every MoE layer, checked to hold the fused tensors of the adapter's layout (and, where
    transformers' experts modules say how they are stored, to be stored that way)."""
    adapter = adapter or get_adapter(model)
    layout = adapter.expert_layout
    experts = adapter.experts_modules(adapter.base_model(model))
    for idx, module in enumerate(experts):
        absent = [name for name in layout.tensor_names() if not isinstance(getattr(module, name, None), Tensor)]
        # flags set by transformers' use_experts_implementation on the experts class
        flags = dict(is_transposed=layout.transposed, has_bias=layout.has_bias, is_concatenated=not layout.interleaved)
        differ = [f"{flag}={getattr(module, flag)}" for flag, want in flags.items()
                  if isinstance(getattr(module, flag, None), bool) and getattr(module, flag) != want]
        if absent or differ:
            found = f"no fused {', '.join(absent)}" if absent else f"{', '.join(differ)}"
            raise UnsupportedExpertLayoutError(
                f"MoE layer {idx}: the {adapter.model_type} experts module ({type(module).__name__}) does not match "
                f"its adapter's expert layout {layout}: {found}"
            )
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


def _memory_efficient_experts_forward(
    self, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor
) -> Tensor:
    """The experts forward through :class:`SlicedExpertsFunction` (layers with or without selected experts)."""
    state: _SliceState = getattr(self, _STATE_ATTR)
    gate_up, down, *biases = state.fused(self)
    gate_up_bias, down_bias = biases or (None, None)
    return SlicedExpertsFunction.apply(
        hidden_states, top_k_index, top_k_weights, getattr(self, LUT_NAME), gate_up, down, state.mlp, gate_up_bias,
        down_bias, *_slice_params(self),
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
    for slot, names in enumerate(state.names()):
        end = start + counts[slot + 1]
        if end > start:
            pieces.append(state.mlp.forward(x[start:end], *(getattr(self, name) for name in names)))
        start = end
    contrib = torch.cat(pieces) * top_k_weights.reshape(-1)[order].unsqueeze(-1).to(x.dtype)
    return out.index_add(0, token_idx, contrib.to(out.dtype))


# --------------------------------------------------------------------------------------------------------------
# RMSNorm that keeps its input in the model dtype for backward
# --------------------------------------------------------------------------------------------------------------


def _lean_rmsnorm_forward(self, hidden_states: Tensor) -> Tensor:
    if torch.is_grad_enabled() and (hidden_states.requires_grad or self.weight.requires_grad):
        return RMSNormFunction.apply(hidden_states, self.weight, self.variance_epsilon)
    return type(self).forward(self, hidden_states)


def attach_lean_norms(model: nn.Module) -> int:
    """Rebind every RMSNorm of ``model`` whose class the adapter lists (:meth:`MoEAdapter.norm_classes`) to
    :class:`RMSNormFunction` when it records a graph (training); inference runs the stock forward. Returns how many
    norms were patched."""
    classes = get_adapter(model).norm_classes()
    count = 0
    for module in model.modules():
        if isinstance(module, classes) and not hasattr(module, _NORM_ATTR) and "forward" not in module.__dict__:
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
    tensors = state.fused(module)
    for expert, names in zip(state.expert_ids, state.names()):
        for fused, name in zip(tensors, names):  # each slice is its row in the stored layout: a plain row copy
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
        for fused_name, name in zip(state.layout.tensor_names(), names):
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
    """Make only the ``selected`` experts of ``model`` (an MoE model with a registered adapter) trainable, as
    separate per-expert parameters.

    ``selected``: ``{layer: [expert, ...]}`` or ``(layer, expert)`` pairs (layers counted among the MoE layers); each
    selected expert trains every fused tensor of its layout (its weights and, for biased experts, its biases).
    ``dtype``: dtype of the trainable parameters; by default the fused tensors' dtype, and then they are views of the
    fused rows (no extra memory); ``torch.float32`` for a bf16 model keeps fp32 master copies (more precise updates,
    6x the slice bytes with AdamW state). ``memory_efficient``: every layer's experts run through
    :class:`SlicedExpertsFunction` (keeps the layer input and the selected experts' gate/up output for backward,
    recomputes the frozen experts' gate/up projection);
    False: the stock implementation with the selected experts' routing weights zeroed, plus an autograd loop over the
    selected experts (keeps every activation). With ``memory_efficient`` every RMSNorm also keeps its input in the
    model dtype instead of an fp32 copy (:func:`attach_lean_norms`). ``freeze``: ``requires_grad=False`` on every
    other parameter.

    Attach after the model is on its final device and dtype (a later ``.to(dtype)`` would turn views into copies;
    saving still writes them back). Returns the new trainable parameters (per selected expert, in layer order:
    gate/up, down, then gate/up bias and down bias for biased experts). Calling it again detaches the previous slices
    first (writing them back).
    """
    adapter = get_adapter(model)
    experts = _experts_modules(model, adapter)
    if has_expert_slices(model):
        detach_expert_slices(model)
    layout = adapter.expert_layout
    by_layer = normalize_selection(selected, len(experts), getattr(experts[0], layout.gate_up).shape[0])
    if freeze:
        for param in model.parameters():
            param.requires_grad_(False)
    params: list[nn.Parameter] = []
    for layer, module in enumerate(experts):
        expert_ids = by_layer.get(layer, [])
        if not expert_ids and not memory_efficient:
            continue  # the stock forward already trains nothing here
        tensors = tuple(getattr(module, name) for name in layout.tensor_names())
        gate_up = tensors[0]
        device = gate_up.device
        state = _SliceState(
            layer=layer,
            expert_ids=list(expert_ids),
            memory_efficient=bool(memory_efficient),
            hook_handles=[],
            had_forward="forward" in module.__dict__,
            previous_forward=module.__dict__.get("forward"),
            adapter=adapter,
            mlp=adapter.expert_mlp_spec(module),
        )
        for expert, names in zip(expert_ids, state.names()):
            for fused, name in zip(tensors, names):
                row = fused.detach()[expert]
                if dtype is not None and dtype != fused.dtype:
                    row = row.to(dtype).clone()
                param = nn.Parameter(row, requires_grad=True)
                module.register_parameter(name, param)
                params.append(param)
        lut = torch.full((gate_up.shape[0],), -1, dtype=torch.long, device=device)
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
def merge_expert_slices(state_dict: dict[str, Tensor], *, layout: ExpertLayout | None = None) -> dict[str, Tensor]:
    """Fold the slice entries of a full state dict (``...experts.fastmask_gate_up_proj_<e>``,
    ``...fastmask_down_proj_<e>`` and, for biased experts, ``...fastmask_gate_up_bias_<e>`` /
    ``...fastmask_down_bias_<e>``) into row ``e`` of their fused tensors and drop them, in place; returns it.

    Writes into the fused tensors held by ``state_dict``: use it on a gathered copy (what FSDP's full state dict
    and ``Accelerator.get_state_dict`` return), where it gives the plain checkpoint of the trained model.
    ``layout``: the names of the fused tensors (default: ``gate_up_proj`` / ``down_proj`` and
    ``gate_up_proj_bias`` / ``down_proj_bias``).
    """
    layout = layout or ExpertLayout()
    fused_names = (layout.gate_up, layout.down, layout.gate_up_bias, layout.down_bias)
    for key in [k for k in state_dict if any(prefix in k for prefix in SLICE_PREFIXES)]:
        prefix, _, name = key.rpartition(".")
        for slice_prefix, fused_name in zip(SLICE_PREFIXES, fused_names):
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
            for fused_name, name in zip(state.layout.tensor_names(), names):
                fused = state_dict.get(base + fused_name)
                if fused is not None and base + name not in state_dict:
                    state_dict[base + name] = fused[expert]
    return state_dict


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
    """The weights of a saved checkpoint directory under the module names of the loaded model (fused experts).

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
