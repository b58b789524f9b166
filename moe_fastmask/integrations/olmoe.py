"""OLMoE (Hugging Face transformers 5.x) integration: the fused router op in every MoE block.

``apply_to_olmoe(model)`` rebinds the ``forward`` of each layer's router (``mlp.gate``, an ``OlmoeTopKRouter``) so
that its softmax + top-k runs through :func:`moe_fastmask.route`; the router weight, the expert MLPs and everything
else stay untouched (no copies, no conversions), and ``remove_from_olmoe`` restores the original ``forward``.
On top of that the patch adds, with no host synchronisation on the routing path:

* per-layer, per-group expert masks (:func:`set_expert_mask`): tokens of group ``g`` never choose an expert whose
  ``keep[layer, g, expert]`` is False — masked fine-tuning and SteerMoE-style steering;
* per-sequence group labels (:func:`token_groups`, or :meth:`RoutingRecorder.record`), expanded to tokens by a
  forward pre-hook on the base model that also marks padding (attention mask 0) and tokens generated after a
  sequence's EOS as group -1 (routed without a mask, never counted);
* a :class:`RoutingRecorder` whose int64 count buffers on the model's device are filled by the op itself,
  separately for prompt (prefill) and generated (decode) tokens.
"""

from __future__ import annotations

import contextlib
import re
import types
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moe_fastmask.ops.route import resolve_backend, route_prechecked

MIN_SUPPORTED_TRANSFORMERS_VERSION = "5.0.0"
MAX_SUPPORTED_TRANSFORMERS_VERSION = "6.0.0"  # exclusive

_STATE_ATTR = "_fastmask_state"
_LAYER_ATTR = "_fastmask_layer_idx"
PREFILL, DECODE = "prefill", "decode"


def _check_transformers_version() -> None:
    import transformers
    from packaging.version import Version

    version = Version(transformers.__version__)
    if not Version(MIN_SUPPORTED_TRANSFORMERS_VERSION) <= version < Version(MAX_SUPPORTED_TRANSFORMERS_VERSION):
        raise RuntimeError(
            f"moe_fastmask's OLMoE integration supports transformers >= {MIN_SUPPORTED_TRANSFORMERS_VERSION}, "
            f"< {MAX_SUPPORTED_TRANSFORMERS_VERSION}; found {transformers.__version__}"
        )


# --------------------------------------------------------------------------------------------------------------
# Shared state of a patched model
# --------------------------------------------------------------------------------------------------------------


@dataclass
class _Recording:
    """What an active :meth:`RoutingRecorder.record` block needs on every forward."""

    recorder: "RoutingRecorder"
    groups: Tensor  # [B] int64 on the model's device
    eos_ids: Tensor | None  # [n_eos] int64, or None when EOS is not tracked
    seen_caches: set = field(default_factory=set)
    alive: Tensor | None = None  # [B] bool: sequences that have not produced EOS yet


@dataclass
class FastmaskState:
    """Routing state shared by the patched routers of one model (lives on the base model)."""

    num_layers: int
    num_experts: int
    top_k: int
    backend: str = "auto"
    keep: Tensor | None = None  # bool [L, G, E]
    groups: Tensor | None = None  # [B] per-sequence groups of the active token_groups()/record() block
    recording: _Recording | None = None
    # set by the pre-hook for the forward in flight
    token_group: Tensor | None = None  # [T] int64, -1 = unmasked and not counted
    # the last forward's token groups, kept after its groups context has exited: gradient checkpointing recomputes
    # layers during backward, which usually runs after the context, and must route exactly as the forward did
    recompute_token_group: Tensor | None = None
    phase: str = PREFILL
    hook_handle: object | None = None
    # ``backend`` resolved per device once: the routers skip route()'s per-call checks (their inputs are built here)
    resolved_backends: dict = field(default_factory=dict)

    def backend_for(self, device: torch.device) -> str:
        resolved = self.resolved_backends.get(device)
        if resolved is None:
            resolved = self.resolved_backends[device] = resolve_backend(self.backend, device)
        return resolved

    def keep_for(self, layer: int) -> Tensor | None:
        if self.keep is None:
            return None
        keep = self.keep[layer]
        if self.recording is not None and keep.shape[0] == 1 and self.recording.recorder.num_groups > 1:
            keep = keep.expand(self.recording.recorder.num_groups, -1).contiguous()
        return keep

    def counts_for(self, layer: int) -> Tensor | None:
        if self.recording is None or _in_backward():
            # no recorder, or a forward recomputed during backward (gradient checkpointing): count nothing
            return None
        return self.recording.recorder._layer_counts[self.phase][layer]


def _in_backward() -> bool:
    """True while autograd runs a backward pass: a layer forward now is a gradient-checkpointing recomputation."""
    if torch.compiler.is_compiling():
        return False  # compiled graphs are traced once; the check is not traceable
    return torch._C._current_graph_task_id() != -1


def _base_model(model: nn.Module) -> nn.Module:
    """The module holding the decoder ``layers`` (``OlmoeModel``), for a causal LM, a base model or a wrapper."""
    from transformers.models.olmoe.modeling_olmoe import OlmoeModel

    if isinstance(model, OlmoeModel):
        return model
    for module in model.modules():
        if isinstance(module, OlmoeModel):
            return module
    raise TypeError(f"expected an OLMoE model (OlmoeForCausalLM or OlmoeModel), got {type(model).__name__}")


def _routers(base: nn.Module) -> list[nn.Module]:
    from transformers.models.olmoe.modeling_olmoe import OlmoeTopKRouter

    routers = []
    for idx, layer in enumerate(base.layers):
        gate = getattr(getattr(layer, "mlp", None), "gate", None)
        if not isinstance(gate, OlmoeTopKRouter):
            raise TypeError(
                f"layer {idx}: mlp.gate is {type(gate).__name__}, not OlmoeTopKRouter; moe_fastmask supports the "
                f"transformers 5.x OLMoE layout (transformers >= {MIN_SUPPORTED_TRANSFORMERS_VERSION}, "
                f"< {MAX_SUPPORTED_TRANSFORMERS_VERSION})"
            )
        routers.append(gate)
    return routers


def _state(model: nn.Module) -> FastmaskState:
    state = getattr(_base_model(model), _STATE_ATTR, None)
    if state is None:
        raise RuntimeError("this model is not patched: call moe_fastmask.apply_to_olmoe(model) first")
    return state


def is_patched(model: nn.Module) -> bool:
    """True if :func:`apply_to_olmoe` has patched ``model`` (and it was not removed since)."""
    return getattr(_base_model(model), _STATE_ATTR, None) is not None


# --------------------------------------------------------------------------------------------------------------
# The patched router forward and the base-model pre-hook
# --------------------------------------------------------------------------------------------------------------


def _fastmask_router_forward(self, hidden_states: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``OlmoeTopKRouter.forward`` with softmax + top-k (+ mask + counts) fused into :func:`route`.

    Returns what the original returns — ``(router_logits, top_k_weights, top_k_index)`` — so the experts, the
    ``output_router_logits`` capture (element 0) and the auxiliary loss are unchanged.
    """
    hidden_states = hidden_states.reshape(-1, self.hidden_dim)
    router_logits = F.linear(hidden_states, self.weight)
    state: FastmaskState = self._fastmask_state
    layer = self._fastmask_layer_idx
    in_backward = _in_backward()
    token_group = state.recompute_token_group if in_backward else state.token_group
    if token_group is not None and token_group.shape[0] != router_logits.shape[0]:
        token_group = None  # router called outside a model forward: no per-token groups
    # every input was validated when it was set (masks, groups) or is built to fit (counts, token groups)
    weights, ids = route_prechecked(
        router_logits,
        self.top_k,
        state.keep_for(layer),
        token_group,
        state.counts_for(layer),
        bool(self.norm_topk_prob),
        state.backend_for(router_logits.device),
    )
    recording = state.recording
    if recording is not None and recording.recorder.record_token_experts and not in_backward:
        recording.recorder._log_token_experts(state.phase, layer, ids)
    return router_logits, weights, ids


def _find_arg(args: tuple, kwargs: dict, name: str, position: int):
    if name in kwargs:
        return kwargs[name]
    return args[position] if len(args) > position else None


def _valid_tokens(attention_mask: Tensor | None, batch: int, seq_len: int, device: torch.device) -> Tensor:
    """Bool [B, S]: which of this forward's tokens are real (not padding), from a 2-D or 4-D attention mask.

    ``generate`` passes the 2-D padding mask with a dynamic cache and a prepared 4-D mask ``[B, 1, S, kv_len]``
    with a static cache, where a padding token's query row is fully masked.
    """
    if attention_mask is None:
        return torch.ones(batch, seq_len, dtype=torch.bool, device=device)
    if attention_mask.dim() == 2:
        return attention_mask[:, -seq_len:].to(device=device, dtype=torch.bool)
    if attention_mask.dim() == 4 and attention_mask.shape[2] == seq_len:
        visible = attention_mask if attention_mask.dtype == torch.bool else attention_mask == 0
        return visible[:, 0].any(dim=-1).to(device).expand(batch, seq_len)
    raise ValueError(
        "moe_fastmask needs a 2-D attention mask [batch, length] or a 4-D mask [batch, 1, query, key] to tell "
        f"padding from tokens; got shape {tuple(attention_mask.shape)}"
    )


def _base_model_pre_hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
    """Expand per-sequence groups to per-token groups for this forward; decide prefill vs decode."""
    state: FastmaskState = getattr(module, _STATE_ATTR)
    state.phase = PREFILL
    state.token_group = None
    state.recompute_token_group = None
    if state.groups is None:
        return
    input_ids = _find_arg(args, kwargs, "input_ids", 0)
    attention_mask = _find_arg(args, kwargs, "attention_mask", 1)
    inputs_embeds = kwargs.get("inputs_embeds")
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    reference = input_ids if input_ids is not None else inputs_embeds
    if reference is None:
        return
    batch, seq_len = reference.shape[0], reference.shape[1]
    groups = state.groups
    if groups.shape[0] != batch:
        raise ValueError(f"{groups.shape[0]} sequence groups were given but the batch holds {batch} sequences")

    valid = _valid_tokens(attention_mask, batch, seq_len, groups.device)

    recording = state.recording
    if recording is not None:
        if cache is not None and id(cache) in recording.seen_caches:
            state.phase = DECODE
        elif cache is not None:
            recording.seen_caches.add(id(cache))
        if state.phase == PREFILL:
            recording.alive = torch.ones(batch, dtype=torch.bool, device=groups.device)
        elif recording.eos_ids is not None and input_ids is not None and recording.alive is not None:
            # the token fed back now was generated last step: once it is EOS the sequence is finished
            fed = input_ids[:, -1].to(groups.device)
            recording.alive = recording.alive & torch.isin(fed, recording.eos_ids, invert=True)
        if recording.alive is not None:
            valid = valid & recording.alive[:, None]

    # few, small ops: in a decode step this hook's host time counts as much as a layer's
    token_group = torch.where(valid, groups[:, None], -1).reshape(-1)
    state.token_group = token_group
    state.recompute_token_group = token_group
    if recording is not None and recording.recorder.record_token_experts and not _in_backward():
        recording.recorder._log_counted_tokens(state.phase, (token_group >= 0).view(batch, seq_len))


# --------------------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------------------


def apply_to_olmoe(model: nn.Module, *, backend: str = "auto") -> nn.Module:
    """Patch every OLMoE MoE router of ``model`` in place to route through :func:`moe_fastmask.route`.

    Idempotent (a second call only updates ``backend``). Nothing is copied or converted, the saved checkpoint is
    unchanged, and :func:`remove_from_olmoe` restores the original behaviour exactly. Returns ``model``.
    """
    _check_transformers_version()
    base = _base_model(model)
    routers = _routers(base)
    state = getattr(base, _STATE_ATTR, None)
    if state is not None:
        state.backend = backend
        state.resolved_backends.clear()
        return model
    first = routers[0]
    state = FastmaskState(num_layers=len(routers), num_experts=first.num_experts, top_k=first.top_k, backend=backend)
    for idx, router in enumerate(routers):
        router._fastmask_state = state
        setattr(router, _LAYER_ATTR, idx)
        router.forward = types.MethodType(_fastmask_router_forward, router)
    state.hook_handle = base.register_forward_pre_hook(_base_model_pre_hook, with_kwargs=True)
    setattr(base, _STATE_ATTR, state)
    return model


def remove_from_olmoe(model: nn.Module) -> nn.Module:
    """Undo :func:`apply_to_olmoe`: original router forwards back, masks and recorders detached. Returns ``model``."""
    base = _base_model(model)
    state = getattr(base, _STATE_ATTR, None)
    if state is None:
        return model
    for router in _routers(base):
        for attr in ("forward", "_fastmask_state", _LAYER_ATTR):
            if attr in router.__dict__:
                delattr(router, attr)
    state.hook_handle.remove()
    delattr(base, _STATE_ATTR)
    return model


_LAYER_EXPERT = re.compile(r"^L(\d+)_E(\d+)$")


def parse_layer_expert(label: str) -> tuple[int, int]:
    """``"L08_E42"`` -> ``(8, 42)``."""
    match = _LAYER_EXPERT.match(label.strip())
    if match is None:
        raise ValueError(f"expert label {label!r} is not of the form 'L<layer>_E<expert>', e.g. 'L08_E42'")
    return int(match.group(1)), int(match.group(2))


def layer_expert_label(layer: int, expert: int) -> str:
    """``(8, 42)`` -> ``"L08_E42"``."""
    return f"L{layer:02d}_E{expert:02d}"


def steering_mask(model: nn.Module, deactivate: Sequence[str | tuple[int, int]], num_groups: int = 1) -> Tensor:
    """A keep mask ``[L, num_groups, E]`` that deactivates the given experts (``"L08_E42"`` or ``(8, 42)``) for every
    group, for :func:`set_expert_mask` (SteerMoE-style steering)."""
    state = _state(model)
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
    ``ValueError`` names the layer. The mask is validated here once (one host sync) and moved to the model's device.
    """
    state = _state(model)
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
        _check_groups_fit(state.groups.cpu(), keep.shape[1], "the active groups")
    device = _base_model(model).layers[0].mlp.gate.weight.device
    state.keep = keep.to(device).contiguous()


def _check_groups_fit(groups: Tensor, num_groups: int | None, what: str) -> None:
    """Range check on a CPU copy of the per-sequence groups (a handful of values)."""
    if groups.numel() == 0:
        return
    low, high = int(groups.min()), int(groups.max())
    if low < -1 or (num_groups is not None and high >= num_groups):
        bound = f"[-1, {num_groups})" if num_groups is not None else "[-1, ...)"
        raise ValueError(f"{what} must be in {bound}; got {groups.tolist()}")


def _host_groups(groups: Sequence[int] | Tensor) -> Tensor:
    """Per-sequence groups as an int64 CPU tensor (validated on the host: no device sync for list inputs)."""
    tensor = torch.as_tensor(groups)
    if tensor.dim() != 1 or tensor.dtype.is_floating_point or tensor.dtype == torch.bool:
        raise ValueError(f"groups must be a 1-D integer sequence, one label per sequence; got {groups!r:.80}")
    return tensor.to(device="cpu", dtype=torch.int64)


def _to_device(tensor: Tensor, device: torch.device) -> Tensor:
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
    state = _state(model)
    device = _base_model(model).layers[0].mlp.gate.weight.device
    host = _host_groups(groups)
    _check_groups_fit(host, state.keep.shape[1] if state.keep is not None and state.keep.shape[1] > 1 else None, "groups")
    previous = state.groups
    state.groups = _to_device(host, device)
    try:
        yield
    finally:
        state.groups = previous
        state.token_group = None


class RoutingRecorder:
    """Per-(layer, group, expert) routing counts of a patched OLMoE model, accumulated on its device by the op.

    ``prefill_counts`` / ``decode_counts``: int64 ``[num_layers, num_groups, num_experts]`` for prompt tokens and
    for generated tokens; ``prefill_tokens`` / ``decode_tokens``: int64 ``[num_groups]`` tokens counted per group
    (the same for every layer; derived from the counts, since every counted token adds exactly ``top_k`` to its
    group's counts in each layer). Padding tokens and tokens generated after a sequence's EOS are never counted.
    Nothing synchronises with the host while recording; reading the buffers is a plain tensor access.

    A forward is *prefill* unless it continues a cache this recording has already seen (the decode steps of
    ``generate``); forwards recomputed during backward (gradient checkpointing) are not counted twice.
    """

    def __init__(self, model: nn.Module, num_groups: int = 2, *, record_token_experts: bool = False) -> None:
        if isinstance(num_groups, bool) or not isinstance(num_groups, int) or num_groups < 1:
            raise ValueError(f"num_groups must be a positive int, got {num_groups!r}")
        self.model = model
        state = _state(model)
        self.num_layers, self.num_experts, self.top_k = state.num_layers, state.num_experts, state.top_k
        self.num_groups = num_groups
        self.record_token_experts = record_token_experts
        device = _base_model(model).layers[0].mlp.gate.weight.device
        shape = (self.num_layers, num_groups, self.num_experts)
        self.prefill_counts = torch.zeros(shape, dtype=torch.int64, device=device)
        self.decode_counts = torch.zeros(shape, dtype=torch.int64, device=device)
        # per-layer views made once: the routers fetch theirs in every step
        self._layer_counts = {PREFILL: self.prefill_counts.unbind(0), DECODE: self.decode_counts.unbind(0)}
        self._token_log: dict[str, list] = {PREFILL: [], DECODE: []}

    @property
    def device(self) -> torch.device:
        return self.prefill_counts.device

    @property
    def prefill_tokens(self) -> Tensor:
        """Prompt tokens counted per group, int64 ``[num_groups]`` (a new tensor on each read)."""
        return self.prefill_counts[0].sum(dim=-1) // self.top_k

    @property
    def decode_tokens(self) -> Tensor:
        """Generated tokens counted per group, int64 ``[num_groups]`` (a new tensor on each read)."""
        return self.decode_counts[0].sum(dim=-1) // self.top_k

    def reset(self) -> None:
        """Zero every count in place (buffers keep their identity, so CUDA graphs that write them stay valid)."""
        self.prefill_counts.zero_()
        self.decode_counts.zero_()
        self._token_log = {PREFILL: [], DECODE: []}

    @contextlib.contextmanager
    def record(
        self, groups: Sequence[int] | Tensor, *, eos_token_id: int | Sequence[int] | None = None
    ) -> Iterator["RoutingRecorder"]:
        """Count routing of the forwards (or ``generate``) run inside the block.

        ``groups``: one label per sequence in ``[-1, num_groups)``; they also select each token's expert-mask row.
        ``eos_token_id``: the ids that end a sequence (default: the model's generation config).
        """
        # the model's patch state now: a model unpatched and patched again since the recorder was made has a new one
        state = _state(self.model)
        if (state.num_layers, state.num_experts, state.top_k) != (self.num_layers, self.num_experts, self.top_k):
            raise ValueError("the model's routing layout changed since this recorder was made; make a new recorder")
        if state.recording is not None:
            raise RuntimeError("a RoutingRecorder is already recording on this model")
        host = _host_groups(groups)
        _check_groups_fit(host, self.num_groups, "groups")
        tensor = _to_device(host, self.device)
        if state.keep is not None and state.keep.shape[1] not in (1, self.num_groups):
            raise ValueError(
                f"the expert mask has {state.keep.shape[1]} groups but the recorder counts {self.num_groups}"
            )
        eos = self._eos_ids(eos_token_id)
        self._token_log = {PREFILL: [], DECODE: []}
        previous_groups = state.groups
        state.groups = tensor
        state.recording = _Recording(recorder=self, groups=tensor, eos_ids=eos)
        try:
            yield self
        finally:
            state.recording = None
            state.groups = previous_groups
            state.token_group = None

    def _eos_ids(self, eos_token_id) -> Tensor | None:
        if eos_token_id is None:
            config = getattr(self.model, "generation_config", None)
            eos_token_id = getattr(config, "eos_token_id", None)
        if eos_token_id is None:
            return None
        ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
        return _to_device(torch.tensor(ids, dtype=torch.int64), self.device)

    # called from the hooks ---------------------------------------------------------------------------------
    def _log_counted_tokens(self, phase: str, counted: Tensor) -> None:
        """``counted``: bool [B, S], the tokens of this forward that are counted."""
        self._token_log[phase].append({"counted": counted, "layers": {}})

    def _log_token_experts(self, phase: str, layer: int, ids: Tensor) -> None:
        log = self._token_log[phase]
        if log:
            log[-1]["layers"][layer] = ids.to(torch.uint8)

    # reading ---------------------------------------------------------------------------------------------
    def counts(self, phase: str = "all") -> Tensor:
        """Counts of ``phase`` (``"prefill"``, ``"decode"`` or ``"all"``), int64 ``[L, G, E]``."""
        if phase == PREFILL:
            return self.prefill_counts
        if phase == DECODE:
            return self.decode_counts
        if phase == "all":
            return self.prefill_counts + self.decode_counts
        raise ValueError(f"phase must be 'prefill', 'decode' or 'all', got {phase!r}")

    def tokens(self, phase: str = "all") -> Tensor:
        """Tokens counted per group in ``phase``, int64 ``[G]``."""
        if phase == PREFILL:
            return self.prefill_tokens
        if phase == DECODE:
            return self.decode_tokens
        if phase == "all":
            return self.prefill_tokens + self.decode_tokens
        raise ValueError(f"phase must be 'prefill', 'decode' or 'all', got {phase!r}")

    def to_frame(self):
        """A long pandas DataFrame: ``phase, layer, group, expert, count, tokens`` (one host copy)."""
        import pandas as pd

        frames = []
        for phase, counts, tokens in (
            (PREFILL, self.prefill_counts, self.prefill_tokens),
            (DECODE, self.decode_counts, self.decode_tokens),
        ):
            c = counts.cpu()
            L, G, E = c.shape
            layer, group, expert = torch.meshgrid(torch.arange(L), torch.arange(G), torch.arange(E), indexing="ij")
            frames.append(
                pd.DataFrame(
                    {
                        "phase": phase,
                        "layer": layer.reshape(-1).numpy(),
                        "group": group.reshape(-1).numpy(),
                        "expert": expert.reshape(-1).numpy(),
                        "count": c.reshape(-1).numpy(),
                        "tokens": tokens.cpu()[group.reshape(-1)].numpy(),
                    }
                )
            )
        return pd.concat(frames, ignore_index=True)

    def token_experts(self) -> dict[str, Tensor]:
        """Each token's chosen experts from the last :meth:`record` block (needs ``record_token_experts=True``).

        Returns CPU tensors: ``"prefill"`` uint8 ``[B, P, L, K]`` and ``"prefill_counted"`` bool ``[B, P]`` for the
        prompt positions; ``"decode"`` uint8 ``[B, D, L, K]`` and ``"decode_counted"`` bool ``[B, D]`` for the D
        decode steps. ``*_counted`` is False for padding and for tokens after a sequence's EOS.
        """
        if not self.record_token_experts:
            raise RuntimeError("create the recorder with record_token_experts=True to keep per-token experts")
        out = {}
        L, K = self.num_layers, self.top_k
        for phase in (PREFILL, DECODE):
            entries = [entry for entry in self._token_log[phase] if len(entry["layers"]) == L]
            if not entries:
                out[phase] = torch.zeros(0, 0, L, K, dtype=torch.uint8)
                out[f"{phase}_counted"] = torch.zeros(0, 0, dtype=torch.bool)
                continue
            per_forward = []
            for entry in entries:
                batch, seq = entry["counted"].shape
                ids = torch.stack([entry["layers"][layer].view(batch, seq, K) for layer in range(L)], dim=2)
                per_forward.append(ids)
            out[phase] = torch.cat(per_forward, dim=1).cpu()
            out[f"{phase}_counted"] = torch.cat([entry["counted"] for entry in entries], dim=1).cpu()
        return out
