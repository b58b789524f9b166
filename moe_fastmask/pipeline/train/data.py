"""The fine-tuning data: the SFT table, its tokenized samples, the collator and the mixed-batch sampler."""

from __future__ import annotations

import math
import random
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from torch import Tensor
from torch.utils.data import Dataset, Sampler

from moe_fastmask.pipeline.common import GROUP_OF_KIND, SAFE, UNSAFE, split_counts
from moe_fastmask.ops.cross_entropy import IGNORE_INDEX


def resolve_sft_paths(sft: str | Path) -> dict[str, Path | None]:
    """``{"sft", "risk_table", "split"}`` for an SFT file or the analysis directory holding one.

    The risk table and the split are looked up next to the SFT file under the same slug (``sft_dataset_<slug>.pkl``
    -> ``risk_diff_<slug>.pkl``, ``split_<slug>.json``); missing ones are None.
    """
    path = Path(sft)
    if path.is_dir():
        found = sorted(path.glob("sft_dataset_*.pkl"))
        if not found:
            raise FileNotFoundError(f"no sft_dataset_<slug>.pkl in {path}")
        if len(found) > 1:
            raise ValueError(f"{path} holds several SFT files ({', '.join(p.name for p in found)}); pass one of them")
        path = found[0]
    if not path.exists():
        raise FileNotFoundError(f"SFT file {path} does not exist")
    slug = path.stem[len("sft_dataset_") :] if path.stem.startswith("sft_dataset_") else None
    risk = path.with_name(f"risk_diff_{slug}.pkl") if slug else None
    split = path.with_name(f"split_{slug}.json") if slug else None
    return {
        "sft": path,
        "risk_table": risk if risk is not None and risk.exists() else None,
        "split": split if split is not None and split.exists() else None,
    }


def load_sft_frame(path: str | Path):
    """The fine-tuning set as a DataFrame; checks the columns and the kinds."""
    from moe_fastmask.pipeline.artifacts import read_pickled_frame

    frame = read_pickled_frame(path, "SFT table")
    missing = [c for c in ("kind", "messages", "response") if c not in frame.columns]
    if missing:
        raise ValueError(f"{path}: the SFT table lacks columns {missing}")
    kinds = set(frame["kind"]) - set(GROUP_OF_KIND)
    if kinds:
        raise ValueError(f"{path}: unknown kinds {sorted(kinds)} (expected 'safe' and 'unsafe')")
    return frame.reset_index(drop=True)


class SFTDataset(Dataset):
    """Tokenized fine-tuning samples: prompt (chat template, generation prompt) + response + EOS.

    Each item: ``input_ids`` and ``labels`` (lists; prompt positions labelled -100, so the loss covers the response
    and its EOS only), ``group`` (0 safe, 1 unsafe). Samples longer than ``max_length`` lose the start of their
    prompt (and, for prompts longer than half of it, the end of the response beyond the other half).
    """

    def __init__(self, frame, tokenizer, max_length: int = 512) -> None:
        from moe_fastmask.pipeline.data import render_prompt

        if tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer has no EOS token; responses must end with one")
        self.frame = frame.reset_index(drop=True)
        self.items: list[dict[str, Any]] = []
        self.truncated = 0
        for row in self.frame.itertuples(index=False):
            prompt = tokenizer(render_prompt(tokenizer, list(row.messages)), add_special_tokens=False)["input_ids"]
            response = tokenizer(str(row.response), add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            if len(prompt) + len(response) > max_length:
                self.truncated += 1
                response = response[: max(max_length - len(prompt), max_length // 2)]
                prompt = prompt[len(prompt) - (max_length - len(response)) :]
            self.items.append(
                {
                    "input_ids": prompt + response,
                    "labels": [IGNORE_INDEX] * len(prompt) + response,
                    "group": GROUP_OF_KIND[row.kind],
                }
            )
        if self.truncated:
            warnings.warn(f"{self.truncated} of {len(self.items)} samples were cut to max_length={max_length} "
                          f"(--max-length sets it)")

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.items[index]

    @property
    def groups(self) -> list[int]:
        """Each item's group: 0 safe, 1 unsafe."""
        return [item["group"] for item in self.items]

    def analysis_batches(self) -> list[list[int]] | None:
        """Dataset indices of each analysis batch (``batch_idx`` column, ordered by ``position``), or None."""
        if "batch_idx" not in self.frame.columns:
            return None
        order = self.frame.assign(_i=range(len(self.frame)))
        if "position" in order.columns:
            order = order.sort_values(["batch_idx", "position"], kind="mergesort")
        return [list(group["_i"]) for _, group in order.groupby("batch_idx", sort=True)]


@dataclass
class MaskedSFTCollator:
    """Right-pads ``input_ids`` (pad token) and ``labels`` (-100), builds the attention mask and the per-sequence
    ``groups`` tensor that :class:`ExpertMaskingTrainer` turns into the expert mask rows."""

    pad_token_id: int
    pad_to_multiple_of: int | None = 8

    def __call__(self, features: Sequence[dict[str, Any]]) -> dict[str, Tensor]:
        length = max(len(f["input_ids"]) for f in features)
        if self.pad_to_multiple_of:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
        input_ids = torch.full((len(features), length), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(features), length), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(features), length), dtype=torch.long)
        for row, feature in enumerate(features):
            n = len(feature["input_ids"])
            input_ids[row, :n] = torch.tensor(feature["input_ids"])
            labels[row, :n] = torch.tensor(feature["labels"])
            attention_mask[row, :n] = 1
        groups = torch.tensor([int(f["group"]) for f in features], dtype=torch.long)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels, "groups": groups}


class MixedBatchSampler(Sampler[int]):
    """Sample indices in an order whose every consecutive ``batch_size`` chunk is one batch at the analysis mix:
    ``n_safe`` safe then ``n_unsafe`` unsafe samples (``split_counts``).

    ``order="shuffle"``: each epoch, the safe and the unsafe pool are shuffled (seed + epoch) and dealt into batches;
    the epoch has as many batches as the larger pool needs, the smaller pool is dealt again (reshuffled) when it runs
    out, so every sample is seen at least once per epoch. ``order="analysis"``: the analysis batches (lists of
    indices, each at the mix) in a shuffled order each epoch. A plain ``Sampler`` (not a batch sampler), so the
    stock DataLoader batching of ``transformers.Trainer`` keeps the batches intact; ``set_epoch`` is called by the
    Trainer, which makes resuming replay the same order.
    """

    def __init__(
        self,
        groups: Sequence[int],
        batch_size: int,
        safe_ratio: float = 0.5,
        *,
        seed: int = 0,
        order: str = "shuffle",
        analysis_batches: Sequence[Sequence[int]] | None = None,
    ) -> None:
        self.groups = [int(g) for g in groups]
        self.batch_size = int(batch_size)
        self.n_safe, self.n_unsafe = split_counts(batch_size, safe_ratio)
        self.seed = seed
        self.epoch = 0
        self.safe = [i for i, g in enumerate(self.groups) if g == GROUP_OF_KIND[SAFE]]
        self.unsafe = [i for i, g in enumerate(self.groups) if g == GROUP_OF_KIND[UNSAFE]]
        if self.n_safe and not self.safe:
            raise ValueError(f"batches need {self.n_safe} safe samples but the dataset has none")
        if self.n_unsafe and not self.unsafe:
            raise ValueError(f"batches need {self.n_unsafe} unsafe samples but the dataset has none")
        if order not in ("shuffle", "analysis"):
            raise ValueError(f"order must be 'shuffle' or 'analysis', got {order!r}")
        self.order = order
        self.analysis_batches: list[list[int]] = []
        if order == "analysis":
            if analysis_batches is None:
                raise ValueError("order='analysis' needs the analysis batches (the SFT table's batch_idx)")
            self.analysis_batches = [self._ordered(batch) for batch in analysis_batches if self.has_mix(batch)]
            if not self.analysis_batches:
                raise ValueError(
                    f"no analysis batch holds {self.n_safe} safe + {self.n_unsafe} unsafe samples; use order='shuffle' (--batch-order shuffle)"
                )

    def has_mix(self, batch: Sequence[int]) -> bool:
        """True when ``batch`` holds exactly the configured numbers of safe and unsafe items."""
        kinds = [self.groups[i] for i in batch]
        return kinds.count(GROUP_OF_KIND[SAFE]) == self.n_safe and kinds.count(GROUP_OF_KIND[UNSAFE]) == self.n_unsafe

    def _ordered(self, batch: Sequence[int]) -> list[int]:
        safe = [i for i in batch if self.groups[i] == GROUP_OF_KIND[SAFE]]
        return safe + [i for i in batch if self.groups[i] == GROUP_OF_KIND[UNSAFE]]

    def set_epoch(self, epoch: int) -> None:
        """Reshuffle for ``epoch`` (the order depends on the seed and the epoch)."""
        self.epoch = int(epoch)

    @property
    def num_batches(self) -> int:
        """Batches per epoch."""
        if self.order == "analysis":
            return len(self.analysis_batches)
        need = [math.ceil(len(pool) / n) for pool, n in ((self.safe, self.n_safe), (self.unsafe, self.n_unsafe)) if n]
        return max(need)

    def batches(self, epoch: int | None = None) -> list[list[int]]:
        """The batches of ``epoch`` (default: the current one), as lists of dataset indices."""
        rng = random.Random(f"{self.seed}-{self.epoch if epoch is None else epoch}")
        if self.order == "analysis":
            batches = [list(batch) for batch in self.analysis_batches]
            rng.shuffle(batches)
            return batches

        def deal(pool: list[int], per_batch: int) -> Iterator[list[int]]:
            queue: list[int] = []
            while True:
                while len(queue) < per_batch:
                    refill = list(pool)
                    rng.shuffle(refill)
                    queue.extend(refill)
                yield queue[:per_batch]
                queue = queue[per_batch:]

        safe, unsafe = deal(self.safe, self.n_safe), deal(self.unsafe, self.n_unsafe)
        return [(next(safe) if self.n_safe else []) + (next(unsafe) if self.n_unsafe else []) for _ in range(self.num_batches)]

    def __iter__(self) -> Iterator[int]:
        for batch in self.batches():
            yield from batch

    def __len__(self) -> int:
        return self.num_batches * self.batch_size


def choose_batch_order(dataset: SFTDataset, batch_size: int, safe_ratio: float, order: str = "auto") -> str:
    """``auto`` -> ``analysis`` when the dataset has analysis batches and every one has the mix, else ``shuffle``."""
    if order != "auto":
        return order
    batches = dataset.analysis_batches()
    if not batches:
        return "shuffle"
    probe = MixedBatchSampler(dataset.groups, batch_size, safe_ratio)
    return "analysis" if all(probe.has_mix(batch) for batch in batches) else "shuffle"


__all__ = [
    "MaskedSFTCollator",
    "MixedBatchSampler",
    "SFTDataset",
    "choose_batch_order",
    "load_sft_frame",
    "resolve_sft_paths",
]
