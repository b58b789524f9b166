"""Expert masks and sequence groups of a patched model: masked fine-tuning and SteerMoE-style steering.

* :func:`set_expert_mask`: per-layer, per-group masks — tokens of group ``g`` never choose an expert whose
  ``keep[layer, g, expert]`` is False; :func:`steering_mask` builds one that switches experts off for everyone;
* :func:`token_groups`: per-sequence group labels for the forwards run inside the block, expanded to tokens by the
  base-model pre-hook, which also marks padding (attention mask 0) as group -1 (routed without a mask).
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

import torch
from torch import Tensor, nn

from moe_fastmask.integrations.labels import parse_layer_expert
from moe_fastmask.integrations.state import state_of


def steering_mask(model: nn.Module, deactivate: Sequence[str | tuple[int, int]], num_groups: int = 1) -> Tensor:
    """A keep mask ``[L, num_groups, E]`` that deactivates the given experts (``"L08_E42"`` or ``(8, 42)``) for every
    group, for :func:`set_expert_mask` (SteerMoE-style steering)."""
    state = state_of(model)
    keep = torch.ones(state.num_layers, num_groups, state.num_experts, dtype=torch.bool)
    for item in deactivate:
        layer, expert = parse_layer_expert(item) if isinstance(item, str) else (int(item[0]), int(item[1]))
        if not (0 <= layer < state.num_layers and 0 <= expert < state.num_experts):
            raise ValueError(
                f"expert {item!r} is outside the model: {state.num_layers} layers x {state.num_experts} experts"
            )
        keep[layer, :, expert] = False
    return keep


def set_expert_mask(model: nn.Module, keep: Tensor | None) -> None:
    """Set (or clear with ``None``) the per-layer, per-group expert mask of a patched model.

    ``keep`` is bool ``[num_layers, num_groups, num_experts]``: tokens of group ``g`` (see :func:`token_groups` and
    :meth:`RoutingRecorder.record`; without groups every token is group 0) may only choose experts with
    ``keep[layer, g, expert]`` True. Group -1 tokens (padding, finished sequences) route without a mask. A mask with
    one group applies to every group. Every (layer, group) must keep at least ``top_k`` experts; otherwise a
    ``ValueError`` names the layer. The mask is validated here once (one host sync) and copied to the model's device;
    a mask of the shape of the current one is copied into the current buffer (its address stays, so decode steps
    captured as CUDA graphs see the change).
    """
    state = state_of(model)
    if keep is None:
        state.keep = None
        return
    if not isinstance(keep, Tensor) or keep.dtype != torch.bool:
        raise TypeError(f"keep must be a bool tensor [num_layers, num_groups, num_experts], got {keep!r:.80}")
    if keep.dim() != 3 or keep.shape[0] != state.num_layers or keep.shape[2] != state.num_experts or keep.shape[1] < 1:
        raise ValueError(
            f"keep must have shape [num_layers, num_groups, num_experts] = [{state.num_layers}, G, "
            f"{state.num_experts}], got {tuple(keep.shape)}"
        )
    kept = keep.sum(dim=-1).cpu()  # [L, G]
    short = (kept < state.top_k).nonzero().tolist()
    if short:
        details = ", ".join(f"layer {layer} group {group} keeps {int(kept[layer, group])}" for layer, group in short)
        raise ValueError(f"expert mask leaves fewer than top_k={state.top_k} experts: {details}")
    if state.groups is not None and keep.shape[1] > 1:
        check_groups_fit(state.groups.cpu(), keep.shape[1], "the active groups")
    current = state.keep
    if current is not None and current.shape == keep.shape:
        # same shape: written into the buffer the routers already read, so CUDA graphs captured with it read the
        # new mask at replay
        current.copy_(keep)
    else:
        state.keep = keep.to(state.device, copy=True).contiguous()  # owned: never the caller's tensor


def check_groups_fit(groups: Tensor, num_groups: int | None, what: str) -> None:
    """Range check on a CPU copy of the per-sequence groups (a handful of values)."""
    if groups.numel() == 0:
        return
    low, high = int(groups.min()), int(groups.max())
    if low < -1 or (num_groups is not None and high >= num_groups):
        bound = f"[-1, {num_groups})" if num_groups is not None else "[-1, ...)"
        raise ValueError(f"{what} must be in {bound}; got {groups.tolist()}")


def host_groups(groups: Sequence[int] | Tensor) -> Tensor:
    """Per-sequence groups as an int64 CPU tensor (validated on the host: no device sync for list inputs)."""
    tensor = torch.as_tensor(groups)
    if tensor.dim() != 1 or tensor.dtype.is_floating_point or tensor.dtype == torch.bool:
        raise ValueError(f"groups must be a 1-D integer sequence, one label per sequence; got {groups!r:.80}")
    return tensor.to(device="cpu", dtype=torch.int64)


def to_device(tensor: Tensor, device: torch.device) -> Tensor:
    """Copy a small CPU tensor to ``device`` without blocking the host (pinned staging on CUDA)."""
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


@contextlib.contextmanager
def token_groups(model: nn.Module, groups: Sequence[int] | Tensor) -> Iterator[None]:
    """Label each sequence of the batches run inside the block (``groups[b]`` for sequence ``b``; -1 = none).

    The labels pick each token's row of the expert mask; padding tokens (attention mask 0) get -1. Nothing is
    counted (use :meth:`RoutingRecorder.record` for that). The groups are validated once here.
    """
    state = state_of(model)
    host = host_groups(groups)
    check_groups_fit(host, state.keep.shape[1] if state.keep is not None and state.keep.shape[1] > 1 else None, "groups")
    previous, previous_span = state.groups, state.group_span
    state.groups = to_device(host, state.device)
    state.group_span = max(1, int(host.max()) + 1) if host.numel() else 1
    try:
        yield
    finally:
        state.groups, state.group_span = previous, previous_span
        state.token_group = None
