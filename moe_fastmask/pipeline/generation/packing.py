"""Several method batches in one generation request, and the results split back per batch.

A method batch (e.g. the 8 safe + 8 unsafe prompts of one statistical unit) counts routing in its own groups
(safe = 0, unsafe = 1). Packed, method batch ``b``'s group ``g`` becomes group ``b * num_groups + g`` of the one
request, so every (method batch, kind) keeps its own counts; -1 (not counted) stays -1. Since each sequence is
counted into its own group only, the split counts of a batch are exactly what the batch gives run on its own.

Per-token experts come back in the layout a request of the batch alone gives (:func:`canonical_token_experts`):
prompt positions left-padded to the batch's longest prompt, decode positions up to the batch's longest generation,
ids zero where nothing was counted. Works with any backend of the protocol.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Sequence

import numpy as np

from moe_fastmask.pipeline.generation.base import GenerationOutput, GenerationRequest


def sequence_seed(seed: int, index: int) -> int:
    """The sampling seed of sequence ``index`` of a request seeded with ``seed`` (a signed int64)."""
    golden = 0x9E3779B97F4A7C15
    value = (int(seed) * golden + int(index)) & ((1 << 64) - 1)
    return value - (1 << 64) if value >= 1 << 63 else value


@dataclass(frozen=True)
class PackedLayout:
    """Where each method batch sits in a packed request: ``sizes[b]`` sequences, ``num_groups`` groups each."""

    sizes: tuple[int, ...]
    num_groups: int
    max_new_tokens: int

    @property
    def starts(self) -> list[int]:
        """Where each packed sequence starts in the flat token layout."""
        starts, total = [], 0
        for size in self.sizes:
            starts.append(total)
            total += size
        return starts


def pack_groups(groups_per_batch: Sequence[Sequence[int]], num_groups: int) -> list[int]:
    """The packed request's group labels: batch ``b``'s label ``g`` -> ``b * num_groups + g``; -1 stays -1."""
    packed = []
    for b, groups in enumerate(groups_per_batch):
        for position, g in enumerate(groups):
            g = int(g)
            if not -1 <= g < num_groups:
                raise ValueError(f"method batch {b}, position {position}: group {g} is outside [-1, {num_groups})")
            packed.append(g if g < 0 else b * num_groups + g)
    return packed


def split_group_axis(array: np.ndarray, num_batches: int, num_groups: int, axis: int) -> list[np.ndarray]:
    """Cut a packed ``[..., num_batches * num_groups, ...]`` array along ``axis`` into one array per batch."""
    if array.shape[axis] != num_batches * num_groups:
        raise ValueError(
            f"axis {axis} has {array.shape[axis]} groups; {num_batches} batches x {num_groups} groups were packed"
        )
    return [np.ascontiguousarray(piece) for piece in np.split(array, num_batches, axis=axis)]


def pack_requests(requests: Sequence[GenerationRequest]) -> tuple[GenerationRequest, PackedLayout]:
    """One request holding every sequence of ``requests`` (in order), each (request, group) its own group.

    The requests must share ``num_groups``, ``record_token_experts`` and sampling settings other than the seed, and
    all record (``groups`` set) or none do. Sampled: each sequence keeps the seed it has in its own request
    (``sequence_seeds``, else :func:`sequence_seed` of the request's seed and its index), so a backend drawing per
    sequence (``graph``) samples what the requests draw one by one; the packed ``sampling.seed`` is request 0's.
    """
    if not requests:
        raise ValueError("pack_requests needs at least one request")
    first = requests[0]
    for index, request in enumerate(requests[1:], start=1):
        for name in ("num_groups", "record_token_experts"):
            if getattr(request, name) != getattr(first, name):
                raise ValueError(f"request {index}: {name} differs from request 0's; packed requests must share it")
        if replace(request.sampling, seed=None) != replace(first.sampling, seed=None):
            raise ValueError(f"request {index}: sampling differs from request 0's (other than the seed)")
        if (request.groups is None) != (first.groups is None):
            raise ValueError(f"request {index}: either every packed request records (groups set) or none does")
    layout = PackedLayout(
        sizes=tuple(len(r.prompts) for r in requests),
        num_groups=first.num_groups,
        max_new_tokens=first.sampling.max_new_tokens,
    )
    groups = None
    if first.groups is not None:
        groups = pack_groups([r.groups for r in requests], first.num_groups)
    seeds = None
    if first.sampling.do_sample:
        seeds = []
        for index, request in enumerate(requests):
            if request.sequence_seeds is not None:
                seeds += [int(x) for x in request.sequence_seeds]
            elif request.sampling.seed is None:
                raise ValueError(f"request {index}: a packed sampled request needs a seed (sampling.seed)")
            else:
                seeds += [sequence_seed(request.sampling.seed, i) for i in range(len(request.prompts))]
    packed = GenerationRequest(
        prompts=[list(ids) for request in requests for ids in request.prompts],
        sampling=first.sampling,
        groups=groups,
        num_groups=first.num_groups * len(requests),
        record_token_experts=first.record_token_experts,
        sequence_seeds=seeds,
    )
    return packed, layout


def canonical_token_experts(
    token_experts: dict[str, np.ndarray], num_prompt_tokens: Sequence[int], tokens: Sequence[Sequence[int]],
    max_new_tokens: int,
) -> dict[str, np.ndarray]:
    """Per-token experts of some rows in the layout a request of just these rows gives, whatever else was batched.

    Prompt positions: the last ``max(num_prompt_tokens)`` (left padding). Decode positions: the first ``S - 1``,
    ``S`` the most tokens a row generated counting its EOS (``generate``'s decode forwards). Ids where a position
    is not counted (padding, after EOS) are set to 0: they depend on what shared the batch.
    """
    width = max(num_prompt_tokens)
    steps = max(min(len(row) + 1, max_new_tokens) for row in tokens) - 1
    out = {}
    for phase, window in (("prefill", slice(token_experts["prefill"].shape[1] - width, None)),
                          ("decode", slice(0, steps))):  # fmt: skip
        ids, counted = token_experts[phase][:, window], token_experts[f"{phase}_counted"][:, window]
        need = width if phase == "prefill" else steps
        if ids.shape[1] < need:  # fewer positions ran than the rows need (no forward of this phase): pad
            pad = need - ids.shape[1]
            where = ((0, 0), (pad, 0)) if phase == "prefill" else ((0, 0), (0, pad))
            ids = np.pad(ids, where + ((0, 0),) * (ids.ndim - 2))
            counted = np.pad(counted, where)
        out[phase] = np.where(counted[..., None, None], ids, 0).astype(np.uint8)
        out[f"{phase}_counted"] = np.ascontiguousarray(counted, dtype=bool)
    return out


def split_output(output: GenerationOutput, layout: PackedLayout) -> list[GenerationOutput]:
    """The outputs of the packed request's method batches, as if each had been generated on its own."""
    total = sum(layout.sizes)
    if len(output.tokens) != total:
        raise ValueError(f"the output holds {len(output.tokens)} sequences; the layout packed {total}")
    n, G = len(layout.sizes), layout.num_groups
    pieces: dict[str, list] = {}
    for name, axis in (("prefill_counts", 1), ("decode_counts", 1), ("prefill_tokens", 0), ("decode_tokens", 0)):
        value = getattr(output, name)
        if value is not None and np.asarray(value).shape[axis] > n * G:
            # the request counted in more groups than it packed (a fixed count shared by every request): the extra
            # groups hold no sequence, so nothing may be counted there
            value = np.asarray(value)
            extra = np.take(value, np.arange(n * G, value.shape[axis]), axis=axis)
            if extra.any():
                raise ValueError(f"{name}: groups beyond the {n} x {G} packed ones counted tokens")
            value = np.take(value, np.arange(n * G), axis=axis)
        pieces[name] = [None] * n if value is None else split_group_axis(np.asarray(value), n, G, axis)
    results = []
    for b, (start, size) in enumerate(zip(layout.starts, layout.sizes)):
        rows = slice(start, start + size)
        experts = None
        if output.token_experts is not None:
            experts = canonical_token_experts(
                {key: value[rows] for key, value in output.token_experts.items()},
                output.num_prompt_tokens[rows], output.tokens[rows], layout.max_new_tokens,
            )  # fmt: skip
        results.append(
            GenerationOutput(
                tokens=output.tokens[rows],
                texts=output.texts[rows],
                num_prompt_tokens=output.num_prompt_tokens[rows],
                prefill_counts=pieces["prefill_counts"][b],
                decode_counts=pieces["decode_counts"][b],
                prefill_tokens=pieces["prefill_tokens"][b],
                decode_tokens=pieces["decode_tokens"][b],
                token_experts=experts,
            )
        )
    return results
