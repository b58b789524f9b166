"""The routing state a patched model carries (on its base model), shared by its patched routers and hooks."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from moe_fastmask.integrations.adapter import MoEAdapter
from moe_fastmask.integrations.registry import get_adapter
from moe_fastmask.ops.route import resolve_backend

if TYPE_CHECKING:
    from moe_fastmask.integrations.recorder import RoutingRecorder

STATE_ATTR = "_fastmask_state"
PREFILL, DECODE = "prefill", "decode"
PHASES = (PREFILL, DECODE)


@dataclass
class Recording:
    """What an active :meth:`RoutingRecorder.record` block needs on every forward."""

    recorder: "RoutingRecorder"
    groups: Tensor  # [B] int64 on the model's device
    eos_ids: Tensor | None  # [n_eos] int64, or None when EOS is not tracked
    seen_caches: dict = field(default_factory=dict)  # id(cache) -> weak reference to it
    alive: Tensor | None = None  # [B] bool: sequences that have not produced EOS yet
    uncached_input_ids: Tensor | None = None  # the last forward's input_ids when run with use_cache=False


@dataclass
class FastmaskState:
    """Routing state shared by the patched routers of one model (lives on the base model)."""

    num_layers: int
    num_experts: int
    top_k: int
    backend: str = "auto"
    adapter: MoEAdapter | None = None
    routers: list = field(default_factory=list)  # the patched routers, in MoE layer order
    renormalize: list = field(default_factory=list)  # per router, from the adapter's router semantics
    route_kwargs: list = field(default_factory=list)  # per router: route's variant arguments (RouterSemantics)
    selection_bias: list = field(default_factory=list)  # per router: whether to pass the adapter's selection bias
    keep: Tensor | None = None  # bool [L, G, E]
    groups: Tensor | None = None  # [B] per-sequence groups of the active token_groups()/record() block
    # rows a one-group mask is widened to under token_groups() (its highest label + 1; record() uses its recorder's)
    group_span: int = 1
    recording: Recording | None = None
    # set by the pre-hook for the forward in flight
    token_group: Tensor | None = None  # [T] int64, -1 = unmasked and not counted
    # the last forward's token groups, kept after its groups context has exited: gradient checkpointing recomputes
    # layers during backward, which usually runs after the context, and must route exactly as the forward did
    recompute_token_group: Tensor | None = None
    phase: str = PREFILL
    hook_handle: object | None = None
    # ``backend`` resolved per device once: the routers skip route()'s per-call checks (their inputs are built here)
    resolved_backends: dict = field(default_factory=dict)

    @property
    def device(self) -> torch.device:
        """The device of the routers' weights (where masks, groups and counts live)."""
        return self.routers[0].weight.device

    def backend_for(self, device: torch.device) -> str:
        """The route backend for calls on ``device``, resolved once per device and cached."""
        resolved = self.resolved_backends.get(device)
        if resolved is None:
            resolved = self.resolved_backends[device] = resolve_backend(self.backend, device)
        return resolved

    def keep_for(self, layer: int) -> Tensor | None:
        """The ``[G, E]`` keep mask of MoE layer ``layer`` (one mask widened to every group), or None when unmasked."""
        if self.keep is None:
            return None
        keep = self.keep[layer]
        if keep.shape[0] == 1:  # one mask for every group
            span = self.recording.recorder.num_groups if self.recording is not None else self.group_span
            if span > 1:
                keep = keep.expand(span, -1).contiguous()
        return keep

    def counts_for(self, layer: int) -> Tensor | None:
        """The recorder's ``[G, E]`` counts of ``layer`` for the current phase, or None when nothing is counted."""
        if self.recording is None or in_backward():
            # no recorder, or a forward recomputed during backward (gradient checkpointing): count nothing
            return None
        return self.recording.recorder._layer_counts[self.phase][layer]


def in_backward() -> bool:
    """True while autograd runs a backward pass: a layer forward now is a gradient-checkpointing recomputation."""
    if torch.compiler.is_compiling():
        return False  # compiled graphs are traced once; the check is not traceable
    return torch._C._current_graph_task_id() != -1


def state_of(model: nn.Module) -> FastmaskState:
    """The patch state of ``model``; raises if it is not patched."""
    state = getattr(get_adapter(model).base_model(model), STATE_ATTR, None)
    if state is None:
        raise RuntimeError("this model is not patched: call moe_fastmask.apply(model) first")
    return state


def is_patched(model: nn.Module) -> bool:
    """True if :func:`moe_fastmask.apply` has patched ``model`` (and it was not removed since)."""
    return getattr(get_adapter(model).base_model(model), STATE_ATTR, None) is not None
