"""Putting the fused router op into a model: the patched router forward, the token-group pre-hook, apply/remove.

:func:`apply` rebinds the ``forward`` of every MoE block's router so that its softmax + top-k runs through
:func:`moe_fastmask.route`; the router weight, the expert MLPs and everything else stay untouched (no copies, no
conversions), and :func:`remove` restores the original ``forward``. The model's adapter
(:func:`moe_fastmask.integrations.get_adapter`, chosen by ``config.model_type``) says where the routers are, how
they compute their logits and what their forward returns. A forward pre-hook on the base model turns per-sequence
group labels into per-token groups (padding and tokens after a sequence's EOS become -1) and decides whether the
forward is prefill or decode.
"""

from __future__ import annotations

import types
import weakref

import torch
from torch import Tensor, nn

from moe_fastmask.integrations.registry import get_adapter
from moe_fastmask.integrations.state import DECODE, PREFILL, STATE_ATTR, FastmaskState, in_backward
from moe_fastmask.ops.route import check_variant_args, route_prechecked

_LAYER_ATTR = "_fastmask_layer_idx"


def _fastmask_router_forward(self, hidden_states: Tensor) -> tuple:
    """The router forward with softmax + top-k (+ mask + counts) fused into :func:`route`.

    Returns what the stock forward returns (for OLMoE ``(router_logits, top_k_weights, top_k_index)``), so the
    experts, the ``output_router_logits`` capture and the auxiliary loss are unchanged.
    """
    state: FastmaskState = self._fastmask_state
    adapter = state.adapter
    router_logits = adapter.router_logits(self, hidden_states)
    layer = self._fastmask_layer_idx
    backward = in_backward()
    token_group = state.recompute_token_group if backward else state.token_group
    if token_group is not None and token_group.shape[0] != router_logits.shape[0]:
        token_group = None  # router called outside a model forward: no per-token groups
    # every input was validated when it was set (masks, groups) or is built to fit (counts, token groups)
    weights, ids = route_prechecked(
        adapter.route_input(self, router_logits),
        self.top_k,
        state.keep_for(layer),
        token_group,
        state.counts_for(layer),
        state.renormalize[layer],
        state.backend_for(router_logits.device),
        bias=adapter.selection_bias(self) if state.selection_bias[layer] else None,
        **state.route_kwargs[layer],
    )
    recording = state.recording
    if recording is not None and recording.recorder.record_token_experts and not backward:
        sink = recording.recorder.decode_sink
        if sink is not None and state.phase == DECODE:
            # device buffers (graph-safe): this decode forward's ids at the caller's step position
            expert_ids, position = sink
            rows = expert_ids.shape[0]
            expert_ids[:, :, layer].index_copy_(1, position, ids.view(rows, -1, ids.shape[-1]).to(torch.uint8))
        else:
            recording.recorder._log_token_experts(state.phase, layer, ids)
    return adapter.router_output(self, router_logits, weights, ids)


def _find_arg(args: tuple, kwargs: dict, name: str, position: int):
    if name in kwargs:
        return kwargs[name]
    return args[position] if len(args) > position else None


def _valid_tokens(attention_mask: Tensor | None, batch: int, seq_len: int, device: torch.device) -> Tensor:
    """Bool [B, S]: which of this forward's tokens are real (not padding), from a 2-D or 4-D attention mask.

    ``generate`` passes the 2-D padding mask with a dynamic cache and a prepared 4-D mask ``[B, 1, S, kv_len]``
    with a static cache, where a padding token's query row is fully masked (for models with ``layer_types``, a
    dict of such masks per attention type).
    """
    if isinstance(attention_mask, dict):
        # the prepared masks per attention type of models with ``layer_types`` (a static cache in ``generate``, the
        # graph engine): a padding query row is fully masked in each of them, so any one tells the padding
        masks = [mask for mask in attention_mask.values() if mask is not None]
        attention_mask = attention_mask.get("full_attention", masks[0] if masks else None)
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


def _seen(seen: dict, cache: object) -> bool:
    ref = seen.get(id(cache))
    return ref is not None and ref() is cache  # a freed cache's id may be reused by a new one


def _remember(seen: dict, cache: object) -> None:
    try:
        seen[id(cache)] = weakref.ref(cache)
    except TypeError:  # not weak-referenceable: kept alive for the recording block
        seen[id(cache)] = lambda: cache


def _uncached_continuation(recording, input_ids: Tensor) -> int:
    """How many leading tokens of this uncached forward the recording has counted already: the length of the last
    uncached forward's input when this one extends it (the steps of ``generate(use_cache=False)``), else 0. Only
    forwards run with ``use_cache=False`` come here; the comparison syncs with the device once per such step."""
    previous = recording.uncached_input_ids
    recording.uncached_input_ids = input_ids
    if previous is None or previous.shape[0] != input_ids.shape[0] or previous.shape[1] >= input_ids.shape[1]:
        return 0
    if previous.device != input_ids.device or not torch.equal(input_ids[:, : previous.shape[1]], previous):
        return 0
    return previous.shape[1]


def _base_model_pre_hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
    """Expand per-sequence groups to per-token groups for this forward; decide prefill vs decode."""
    state: FastmaskState = getattr(module, STATE_ATTR)
    state.phase = PREFILL
    already_counted = 0
    state.token_group = None
    state.recompute_token_group = None
    if state.groups is None:
        return
    input_ids = _find_arg(args, kwargs, "input_ids", 0)
    attention_mask = _find_arg(args, kwargs, "attention_mask", 1)
    inputs_embeds = kwargs.get("inputs_embeds")
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
        override = recording.recorder.phase_override
        if override is not None:
            state.phase = override  # set by the generation backend driving the forwards
        else:
            # automatic: a forward feeding one token per sequence into a cache this recording has seen is a decode
            # step of ``generate``; more tokens into a seen cache are more prompt (chunked prefill, a next turn)
            cache = kwargs.get("cache", kwargs.get("past_key_values"))
            if cache is not None and _seen(recording.seen_caches, cache):
                if seq_len == 1:
                    state.phase = DECODE
            elif cache is not None:
                _remember(recording.seen_caches, cache)
            elif kwargs.get("use_cache") is False and input_ids is not None:
                # ``generate(use_cache=False)`` feeds the whole sequence at every step
                already_counted = _uncached_continuation(recording, input_ids)
                if already_counted:
                    state.phase = DECODE
                    valid = valid.clone()
                    valid[:, :already_counted] = False
        rows = recording.recorder.row_groups
        if rows is not None:
            # the backend's device buffer, EOS already applied: read as is (nothing here may copy from the host or
            # sync, since the forward may be captured in a CUDA graph)
            if rows.shape[0] != batch:
                raise ValueError(f"{rows.shape[0]} row groups were set but the batch holds {batch} sequences")
            groups = rows
            recording.alive = None
        elif state.phase == PREFILL:
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
    sink = recording.recorder.decode_sink if recording is not None else None
    if (recording is not None and recording.recorder.record_token_experts and not in_backward()
            and not (sink is not None and state.phase == DECODE)):  # fmt: skip
        recording.recorder._log_counted_tokens(
            state.phase, (token_group >= 0).view(batch, seq_len)[:, already_counted:], skip=already_counted
        )


def apply(model: nn.Module, *, backend: str = "auto") -> nn.Module:
    """Patch every MoE router of ``model`` in place to route through :func:`moe_fastmask.route`.

    The model family is picked by ``config.model_type`` (:func:`moe_fastmask.integrations.get_adapter`; an
    unsupported type raises an error naming it and the supported ones). Idempotent (a second call only updates
    ``backend``). Nothing is copied or converted, the saved checkpoint is unchanged, and :func:`remove` restores
    the original behaviour exactly. Returns ``model``.
    """
    adapter = get_adapter(model)
    adapter.check_transformers()
    base = adapter.base_model(model)
    routers = adapter.routers(base)
    if not routers:
        raise ValueError(f"{type(model).__name__} has no MoE layers to patch")
    renormalize, route_kwargs, selection_bias = [], [], []
    for idx, router in enumerate(routers):
        semantics = adapter.router_semantics(router)
        unsupported = semantics.unsupported_by_route()
        if unsupported:
            raise NotImplementedError(
                f"{adapter.model_type} layer {idx}: the fused router op does not implement {', '.join(unsupported)}"
            )
        kwargs = semantics.route_kwargs()
        bias = adapter.selection_bias(router) if semantics.selection_bias else None
        try:  # once here, on the router's shape: the patched forward skips route's checks
            check_variant_args(
                torch.empty(0, adapter.num_experts(router), device="meta"), adapter.top_k(router),
                bool(semantics.renormalize), bias=None if bias is None else bias.to("meta"), **kwargs,
            )
        except (TypeError, ValueError) as exc:
            raise NotImplementedError(
                f"{adapter.model_type} layer {idx}: the fused router op cannot run this router: {exc}"
            ) from exc
        renormalize.append(bool(semantics.renormalize))
        route_kwargs.append(kwargs)
        selection_bias.append(bool(semantics.selection_bias))
    state = getattr(base, STATE_ATTR, None)
    if state is not None:
        state.backend = backend
        state.resolved_backends.clear()
        state.renormalize = renormalize
        state.route_kwargs = route_kwargs
        state.selection_bias = selection_bias
        return model
    first = routers[0]
    state = FastmaskState(
        num_layers=len(routers),
        num_experts=adapter.num_experts(first),
        top_k=adapter.top_k(first),
        backend=backend,
        adapter=adapter,
        routers=list(routers),
        renormalize=renormalize,
        route_kwargs=route_kwargs,
        selection_bias=selection_bias,
    )
    for idx, router in enumerate(routers):
        router._fastmask_state = state
        setattr(router, _LAYER_ATTR, idx)
        router.forward = types.MethodType(_fastmask_router_forward, router)
    state.hook_handle = base.register_forward_pre_hook(_base_model_pre_hook, with_kwargs=True)
    setattr(base, STATE_ATTR, state)
    return model


def remove(model: nn.Module) -> nn.Module:
    """Undo :func:`apply`: original router forwards back, masks and recorders detached. Returns ``model``."""
    adapter = get_adapter(model)
    base = adapter.base_model(model)
    state = getattr(base, STATE_ATTR, None)
    if state is None:
        return model
    for router in adapter.routers(base):
        for attr in ("forward", "_fastmask_state", _LAYER_ATTR):
            if attr in router.__dict__:
                delattr(router, attr)
    state.hook_handle.remove()
    delattr(base, STATE_ATTR)
    return model


# the names of the OLMoE-only API, kept: ``apply`` dispatches on the model type
apply_to_olmoe = apply
remove_from_olmoe = remove
