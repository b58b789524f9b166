"""Several method batches in one generation request, and the results split back per batch.

A method batch (e.g. the 8 safe + 8 unsafe prompts of one statistical unit) counts routing in its own groups
(safe = 0, unsafe = 1). Packed, method batch ``b``'s group ``g`` becomes group ``b * num_groups + g`` of the one
request, so every (method batch, kind) keeps its own counts; -1 (not counted) stays -1. Since each sequence is
counted into its own group only, the split counts of a batch are exactly what the batch gives run on its own.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Sequence

from torch import Tensor

from moe_fastmask.pipeline.generation.engine import GenerationOutput, GenerationRequest, sequence_seed


@dataclass(frozen=True)
class PackedLayout:
    """Where each method batch sits in a packed request: ``sizes[b]`` sequences, ``num_groups`` groups each."""

    sizes: tuple[int, ...]
    num_groups: int

    @property
    def starts(self) -> list[int]:
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


def split_group_axis(tensor: Tensor, num_batches: int, num_groups: int, axis: int) -> list[Tensor]:
    """Cut a packed ``[..., num_batches * num_groups, ...]`` tensor along ``axis`` into one tensor per batch."""
    if tensor.shape[axis] != num_batches * num_groups:
        raise ValueError(
            f"axis {axis} has {tensor.shape[axis]} groups; {num_batches} batches x {num_groups} groups were packed"
        )
    return [piece.contiguous() for piece in tensor.split(num_groups, dim=axis)]


def pack_requests(requests: Sequence[GenerationRequest]) -> tuple[GenerationRequest, PackedLayout]:
    """One request holding every sequence of ``requests`` (in order), each (request, group) its own group.

    The requests must share ``num_groups``, ``record_token_experts`` and sampling settings other than the seed, and
    all record (``groups`` set) or none do. Each sequence keeps the sampling seed it has in its own request, so a
    seeded sampled packed run draws the same tokens as the requests run one by one.
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
    layout = PackedLayout(sizes=tuple(len(r.prompt_ids) for r in requests), num_groups=first.num_groups)
    groups = None
    if first.groups is not None:
        for index, request in enumerate(requests):
            if len(request.groups) != len(request.prompt_ids):
                raise ValueError(
                    f"request {index}: {len(request.groups)} groups for {len(request.prompt_ids)} prompts"
                )
        groups = pack_groups([r.groups for r in requests], first.num_groups)
    seeds = None
    if first.sampling.do_sample:
        seeds = []
        for index, request in enumerate(requests):
            if request.sequence_seeds is not None:
                seeds += request.sequence_seeds
            elif request.sampling.seed is None:
                raise ValueError(f"request {index}: a packed sampled request needs a seed (sampling.seed)")
            else:
                seeds += [sequence_seed(request.sampling.seed, i) for i in range(len(request.prompt_ids))]
    packed = replace(
        first,
        prompt_ids=[ids for request in requests for ids in request.prompt_ids],
        groups=groups,
        num_groups=first.num_groups * len(requests),
        sequence_seeds=seeds,
    )
    return packed, layout


def split_output(output: GenerationOutput, layout: PackedLayout) -> list[GenerationOutput]:
    """The outputs of the packed request's method batches, as if each had been generated on its own."""
    total = sum(layout.sizes)
    if len(output.token_ids) != total:
        raise ValueError(f"the output holds {len(output.token_ids)} sequences; the layout packed {total}")
    n, G = len(layout.sizes), layout.num_groups
    pieces: dict[str, list] = {}
    for name, axis in (("prefill_counts", 1), ("decode_counts", 1), ("prefill_tokens", 0), ("decode_tokens", 0)):
        value = getattr(output, name)
        pieces[name] = [None] * n if value is None else split_group_axis(value, n, G, axis)
    results = []
    for b, (start, size) in enumerate(zip(layout.starts, layout.sizes)):
        rows = slice(start, start + size)
        results.append(
            GenerationOutput(
                token_ids=output.token_ids[rows],
                texts=output.texts[rows],
                prompt_lengths=output.prompt_lengths[rows],
                prefill_counts=pieces["prefill_counts"][b],
                decode_counts=pieces["decode_counts"][b],
                prefill_tokens=pieces["prefill_tokens"][b],
                decode_tokens=pieces["decode_tokens"][b],
                token_experts=output.token_experts[rows] if output.token_experts is not None else None,
            )
        )
    return results
