"""Per-(layer, group, expert) routing counts of a patched model, filled on its device by the router op itself."""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Iterator, Sequence

import torch
from torch import Tensor, nn

from moe_fastmask.integrations.masks import check_groups_fit, host_groups, to_device
from moe_fastmask.integrations.state import DECODE, PHASES, PREFILL, Recording, state_of

if TYPE_CHECKING:
    import pandas as pd


class RoutingRecorder:
    """Per-(layer, group, expert) routing counts of a patched model, accumulated on its device by the op.

    ``prefill_counts`` / ``decode_counts``: int64 ``[num_layers, num_groups, num_experts]`` for prompt tokens and
    for generated tokens; ``prefill_tokens`` / ``decode_tokens``: int64 ``[num_groups]`` tokens counted per group
    (the same for every layer; derived from the counts, since every counted token adds exactly ``top_k`` to its
    group's counts in each layer). Padding tokens and tokens generated after a sequence's EOS are never counted.
    Nothing synchronises with the host while recording; reading the buffers is a plain tensor access.

    Prefill or decode, per forward: by default a forward is *prefill* unless it feeds one token per sequence into a
    cache this recording has already seen (the decode steps of transformers' ``generate``, which passes one cache
    object through every step; prompt chunks fed into that cache, as ``generate(prefill_chunk_size=...)`` does,
    stay prefill). Under ``generate(use_cache=False)``, which feeds the whole sequence at every step, a forward run
    with ``use_cache=False`` whose input extends the previous such forward's counts only its new tokens, as decode.
    A generation backend that drives the forwards itself (its own cache, CUDA graphs, another engine) says
    which phase the next forwards are with :meth:`set_phase` (``"prefill"``, ``"decode"``, or ``None`` for the
    automatic rule again) or for a whole block with ``record(..., phase=...)``. A prefill forward restarts the
    EOS tracking of the batch; a decode forward stops counting a sequence once the token it is fed is an EOS.
    A backend that tracks EOS itself on the device (a decode step replayed as a CUDA graph, where host-side
    bookkeeping does not run) hands the recorder a device buffer of per-sequence groups with :meth:`set_row_groups`,
    rewritten in place as sequences finish (-1); the hook then reads it as is, with no host copy and no sync.
    Forwards recomputed during backward (gradient checkpointing) are not counted twice.
    """

    def __init__(self, model: nn.Module, num_groups: int = 2, *, record_token_experts: bool = False) -> None:
        if isinstance(num_groups, bool) or not isinstance(num_groups, int) or num_groups < 1:
            raise ValueError(f"num_groups must be a positive int, got {num_groups!r}")
        self.model = model
        state = state_of(model)
        self.num_layers, self.num_experts, self.top_k = state.num_layers, state.num_experts, state.top_k
        self.num_groups = num_groups
        self.record_token_experts = record_token_experts
        device = state.device
        shape = (self.num_layers, num_groups, self.num_experts)
        self.prefill_counts = torch.zeros(shape, dtype=torch.int64, device=device)
        self.decode_counts = torch.zeros(shape, dtype=torch.int64, device=device)
        # per-layer views made once: the routers fetch theirs in every step
        self._layer_counts = {PREFILL: self.prefill_counts.unbind(0), DECODE: self.decode_counts.unbind(0)}
        self._token_log: dict[str, list] = {PREFILL: [], DECODE: []}
        self.phase_override: str | None = None
        self.row_groups: Tensor | None = None
        self.decode_sink: tuple[Tensor, Tensor] | None = None

    @property
    def device(self) -> torch.device:
        """The device the counts live on (the model's routers' device)."""
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

    def set_phase(self, phase: str | None) -> None:
        """Count the following forwards as ``"prefill"`` or ``"decode"``; ``None``: decide by cache identity again.

        For generation backends that run the forwards themselves; transformers' ``generate`` needs nothing. Set
        inside a :meth:`record` block, the setting ends with the block; set outside, it holds for the blocks after.
        """
        if phase is not None and phase not in PHASES:
            raise ValueError(f"phase must be 'prefill', 'decode' or None, got {phase!r}")
        self.phase_override = phase

    def set_row_groups(self, groups: Tensor | None) -> None:
        """Count the following forwards with ``groups``, a device buffer the caller owns; ``None``: the block's groups.

        ``groups``: int64 ``[batch]`` on the recorder's device, values in ``[-1, num_groups)`` (-1: not counted),
        typically rewritten in place by the caller between forwards (e.g. -1 once a sequence has fed back its EOS).
        While it is set the hook uses it as it is, in every phase, and does no EOS tracking of its own: each forward
        reads the buffer's current values on the device, so a forward captured in a CUDA graph keeps reading it at
        replay. The values are not checked (that would sync with the host); the buffer must keep its identity for
        captured graphs. Set inside a :meth:`record` block, the setting ends with the block.
        """
        if groups is not None:
            if not isinstance(groups, Tensor) or groups.dim() != 1 or groups.dtype != torch.int64:
                raise ValueError(f"row groups must be a 1-D int64 tensor, got {groups!r:.80}")
            if groups.device != self.device:
                raise ValueError(f"row groups must be on the recorder's device {self.device}, not {groups.device}")
        self.row_groups = groups

    def set_decode_sink(self, expert_ids: Tensor | None, position: Tensor | None = None) -> None:
        """Write each decode forward's chosen experts into device buffers instead of the host-side log.

        ``expert_ids``: uint8 ``[batch, steps, num_layers, top_k]`` on the recorder's device; ``position``: int64
        ``[1]`` on the device, the step index the next decode forward writes (the caller advances it). Every
        layer's ids of a one-token decode forward go to ``expert_ids[:, position, layer]`` with device ops only,
        so a decode step captured in a CUDA graph keeps writing them at replay; which positions count is the
        caller's business (it knows its finished rows). Needs ``record_token_experts=True``; ``None`` ends it.
        Set inside a :meth:`record` block, the setting ends with the block.
        """
        if expert_ids is None:
            self.decode_sink = None
            return
        if not self.record_token_experts:
            raise RuntimeError("create the recorder with record_token_experts=True to keep per-token experts")
        if (expert_ids.dtype != torch.uint8 or expert_ids.dim() != 4
                or tuple(expert_ids.shape[2:]) != (self.num_layers, self.top_k)):  # fmt: skip
            raise ValueError(
                f"expert_ids must be uint8 [batch, steps, {self.num_layers}, {self.top_k}], got "
                f"{expert_ids.dtype} {tuple(expert_ids.shape)}"
            )
        if position is None or position.dtype != torch.int64 or position.shape != (1,):
            raise ValueError("position must be an int64 tensor of shape [1]")
        if expert_ids.device != self.device or position.device != self.device:
            raise ValueError(f"the sink buffers must be on the recorder's device {self.device}")
        self.decode_sink = (expert_ids, position)

    @contextlib.contextmanager
    def record(
        self,
        groups: Sequence[int] | Tensor,
        *,
        eos_token_id: int | Sequence[int] | None = None,
        phase: str | None = None,
    ) -> Iterator["RoutingRecorder"]:
        """Count routing of the forwards (or ``generate``) run inside the block.

        ``groups``: one label per sequence in ``[-1, num_groups)``; they also select each token's expert-mask row.
        ``eos_token_id``: the ids that end a sequence (default: the model's generation config).
        ``phase``: count the block's forwards as this phase (until :meth:`set_phase` changes it); by default the
        phase set before the block, or the automatic rule. The setting from before the block is restored on exit.
        """
        # the model's patch state now: a model unpatched and patched again since the recorder was made has a new one
        state = state_of(self.model)
        if (state.num_layers, state.num_experts, state.top_k) != (self.num_layers, self.num_experts, self.top_k):
            raise ValueError("the model's routing layout changed since this recorder was made; make a new recorder")
        if state.recording is not None:
            raise RuntimeError("a RoutingRecorder is already recording on this model")
        host = host_groups(groups)
        check_groups_fit(host, self.num_groups, "groups")
        tensor = to_device(host, self.device)
        if state.keep is not None and state.keep.shape[1] not in (1, self.num_groups):
            raise ValueError(
                f"the expert mask has {state.keep.shape[1]} groups but the recorder counts {self.num_groups}"
            )
        eos = self._eos_ids(eos_token_id)
        previous_phase, previous_rows, previous_sink = self.phase_override, self.row_groups, self.decode_sink
        if phase is not None:
            self.set_phase(phase)
        self._token_log = {PREFILL: [], DECODE: []}
        previous_groups = state.groups
        state.groups = tensor
        state.recording = Recording(recorder=self, groups=tensor, eos_ids=eos)
        try:
            yield self
        finally:
            self.phase_override, self.row_groups, self.decode_sink = previous_phase, previous_rows, previous_sink
            state.recording = None
            state.groups = previous_groups
            state.token_group = None

    def _eos_ids(self, eos_token_id) -> Tensor | None:
        if eos_token_id is None:
            config = getattr(self.model, "generation_config", None)
            eos_token_id = getattr(config, "eos_token_id", None)
        if eos_token_id is None:
            return None
        try:  # an int, a sequence of ints, a numpy integer or array, a 0-d or 1-d integer tensor
            ids = torch.as_tensor(eos_token_id).detach().cpu()
        except (TypeError, ValueError, RuntimeError):
            ids = None
        if ids is not None and ids.numel() == 0 and ids.dim() == 1:
            ids = ids.to(torch.int64)  # no EOS: (``[]`` reads as float32)
        if ids is None or ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool or ids.dim() > 1:
            raise ValueError(f"eos_token_id must be an int or a sequence of ints, got {eos_token_id!r:.80}")
        return to_device(ids.reshape(-1).to(torch.int64), self.device)

    # called from the hooks ---------------------------------------------------------------------------------
    def _log_counted_tokens(self, phase: str, counted: Tensor, skip: int = 0) -> None:
        """``counted``: bool [B, S - skip], which of this forward's tokens after its first ``skip`` (tokens an uncached
        ``generate`` step feeds again) are counted."""
        self._token_log[phase].append({"counted": counted, "layers": {}, "skip": skip})

    def _log_token_experts(self, phase: str, layer: int, ids: Tensor) -> None:
        log = self._token_log[phase]
        if log:
            entry = log[-1]
            batch = entry["counted"].shape[0]
            ids = ids.view(batch, -1, ids.shape[-1])[:, entry["skip"]:]
            entry["layers"][layer] = ids.to(torch.uint8)

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

    def to_frame(self) -> pd.DataFrame:
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
