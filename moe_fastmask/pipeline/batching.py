"""Mixed safe/unsafe batches.

A batch of ``batch_size`` prompts holds ``n_safe = round(batch_size * safe_ratio)`` (half up) safe prompts and
``n_unsafe = batch_size - n_safe`` unsafe prompts, **in two halves**: positions ``0 .. n_safe - 1`` are the safe
prompts, positions ``n_safe .. batch_size - 1`` the unsafe ones.

Each batch draws ``max(n_safe, n_unsafe)`` records (after one seeded shuffle of the records); the safe half holds the
safe forms of the first ``n_safe`` of them, the unsafe half the unsafe forms of the first ``n_unsafe``. So at
``safe_ratio = 0.5`` a batch holds the safe and the unsafe form of the same records — position ``i`` and
``n_safe + i`` are a pair — and topic does not leak into the safe/unsafe comparison; at other ratios the smaller
half is paired with part of the larger one. :func:`plan_batches` refuses a batch size whose ``batch_size *
safe_ratio`` is not a whole number (e.g. 15 at 0.5), naming the nearest sizes that are.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Sequence

from moe_fastmask.pipeline.common import GROUP_OF_KIND, SAFE, UNSAFE, plural, split_counts
from moe_fastmask.pipeline.data import Record


class BatchPlanError(ValueError):
    """The batch request cannot be met (empty group, or not enough records)."""


@dataclass(frozen=True)
class BatchItem:
    """One prompt of a batch: its position in the batch, ``kind`` (``"safe"`` or ``"unsafe"``) and record."""
    position: int
    kind: str  # "safe" | "unsafe"
    record: Record


@dataclass(frozen=True)
class Batch:
    """One mixed batch: its index in the run and its items, safe ones first."""
    batch_idx: int
    items: tuple[BatchItem, ...]

    @property
    def safe_indices(self) -> list[int]:
        """Positions of the safe items."""
        return [item.position for item in self.items if item.kind == SAFE]

    @property
    def unsafe_indices(self) -> list[int]:
        """Positions of the unsafe items."""
        return [item.position for item in self.items if item.kind == UNSAFE]

    @property
    def groups(self) -> list[int]:
        """Recorder group of each position: 0 safe, 1 unsafe."""
        return [GROUP_OF_KIND[item.kind] for item in self.items]

    def pairs(self) -> list[tuple[int, int]]:
        """``(safe_position, unsafe_position)`` of every record present in both forms, in safe-position order."""
        unsafe_by_id = {item.record.id: item.position for item in self.items if item.kind == UNSAFE}
        return [
            (item.position, unsafe_by_id[item.record.id])
            for item in self.items
            if item.kind == SAFE and item.record.id in unsafe_by_id
        ]


def group_sizes(batch_size: int, safe_ratio: float) -> tuple[int, int]:
    """``(n_safe, n_unsafe)`` of a batch; rejects ratios that leave a group empty."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 2:
        raise BatchPlanError(f"batch_size must be an integer >= 2 (one safe and one unsafe prompt), got {batch_size!r}")
    if not isinstance(safe_ratio, (int, float)) or not 0.0 < safe_ratio < 1.0:
        raise BatchPlanError(f"safe_ratio must be strictly between 0 and 1, got {safe_ratio!r}")
    n_safe, n_unsafe = split_counts(batch_size, safe_ratio)
    if n_safe == 0 or n_unsafe == 0:
        raise BatchPlanError(
            f"safe_ratio {safe_ratio} with batch_size {batch_size} gives {n_safe} safe and {n_unsafe} unsafe prompts "
            f"per batch; both groups need at least one"
        )
    return n_safe, n_unsafe


def nearest_whole_sizes(batch_size: int, safe_ratio: float, search: int = 1000) -> list[int]:
    """The batch sizes nearest to ``batch_size`` (at most one below, one above) whose ``size * safe_ratio`` safe
    prompts are a whole number, both groups non-empty; empty when none lies within ``search``."""

    def whole(size: int) -> bool:
        n_safe = size * safe_ratio
        return abs(n_safe - round(n_safe)) < 1e-9 and 0 < round(n_safe) < size

    below = next((s for s in range(batch_size - 1, 1, -1) if whole(s)), None)
    above = next((s for s in range(batch_size + 1, batch_size + search) if whole(s)), None)
    return [s for s in (below, above) if s is not None]


def check_batch_mix(batch_size: int, safe_ratio: float) -> tuple[int, int]:
    """``(n_safe, n_unsafe)`` when a batch of ``batch_size`` holds exactly ``safe_ratio`` safe prompts; otherwise
    :class:`BatchPlanError` naming the nearest sizes that do. Rounding would change the mix silently, and at
    ``safe_ratio = 0.5`` leave a prompt of every batch without its other form."""
    n_safe, n_unsafe = group_sizes(batch_size, safe_ratio)
    exact = batch_size * safe_ratio
    if abs(exact - n_safe) > 1e-9:
        # sizes far above the asked one are no sensible fix (3 at 0.333 would give 1000)
        sizes = [s for s in nearest_whole_sizes(batch_size, safe_ratio) if s <= max(4 * batch_size, 64)]
        if abs(safe_ratio - 0.5) < 1e-12:
            effect = "leaving one prompt of every batch without its other form"
        else:
            effect = f"a safe share of {n_safe / batch_size:g} instead of {safe_ratio:g}"
        ratio = f"--safe-ratio {n_safe / batch_size!r} ({n_safe} of {batch_size})"
        fix = (f"use --batch-size {' or '.join(str(s) for s in sizes)}, or {ratio}" if sizes
               else f"use {ratio}, or a batch size whose product with the safe ratio is a whole number")
        raise BatchPlanError(
            f"batch size {batch_size} at safe ratio {safe_ratio:g} gives {exact:g} safe prompts per batch, which "
            f"would be rounded to {n_safe} safe + {n_unsafe} jailbreak prompts, {effect}; {fix}"
        )
    return n_safe, n_unsafe


def plan_batches(
    records: Sequence[Record],
    batch_size: int = 16,
    safe_ratio: float = 0.5,
    num_batches: int | None = None,
    seed: int = 0,
) -> list[Batch]:
    """Shuffle ``records`` (seeded) and cut them into ``num_batches`` mixed batches (default: as many as fill).

    Raises :class:`BatchPlanError` when the data cannot fill the request, saying how many batches it can fill.
    """
    n_safe, n_unsafe = check_batch_mix(batch_size, safe_ratio)
    per_batch = max(n_safe, n_unsafe)
    fillable = len(records) // per_batch
    if num_batches is None:
        num_batches = fillable
        if num_batches == 0:
            raise BatchPlanError(
                f"{plural(len(records), 'record')} cannot fill one batch: a batch of {batch_size} at safe_ratio "
                f"{safe_ratio} needs {plural(per_batch, 'record')}"
            )
    elif isinstance(num_batches, bool) or not isinstance(num_batches, int) or num_batches < 1:
        raise BatchPlanError(f"num_batches must be a positive integer or None, got {num_batches!r}")
    elif num_batches > fillable:
        need = f"each batch of {batch_size} at safe_ratio {safe_ratio} needs {plural(per_batch, 'record')}"
        hint = f"; use --num-batches {fillable} or fewer" if fillable else ""
        raise BatchPlanError(
            f"{plural(num_batches, 'batch')} requested but the {plural(len(records), 'record')} "
            f"{'fills' if len(records) == 1 else 'fill'} only {fillable} ({need}){hint}"
        )
    order = sorted(records, key=lambda r: r.index)
    random.Random(seed).shuffle(order)
    batches = []
    for batch_idx in range(num_batches):
        chunk = order[batch_idx * per_batch : (batch_idx + 1) * per_batch]
        items = [BatchItem(i, SAFE, record) for i, record in enumerate(chunk[:n_safe])]
        items += [BatchItem(n_safe + i, UNSAFE, record) for i, record in enumerate(chunk[:n_unsafe])]
        batches.append(Batch(batch_idx=batch_idx, items=tuple(items)))
    return batches
