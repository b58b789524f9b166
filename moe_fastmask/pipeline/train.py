"""``moe-fastmask train``: masked fine-tuning of the selected (unsafe) experts of an OLMoE model.

The repair step of the pipeline, on the artifacts of ``moe-fastmask analyze``:

1. :mod:`moe_fastmask.pipeline.selection` picks experts from ``risk_diff_<slug>.pkl`` (top-N, top-n per layer or a
   threshold) and saves the choice as ``expert_selection.json``.
2. :func:`prepare_model` patches the routers (:func:`moe_fastmask.apply_to_olmoe`), sets the per-group mask — safe
   samples (group 0) route freely; unsafe samples (group 1) see every non-selected expert of a masked layer at -inf
   — and makes the selected experts' slices of the fused expert tensors the only trainable parameters
   (:mod:`moe_fastmask.integrations.expert_slices`): router, attention, embeddings, norms, lm_head and every other
   expert get no gradient, no optimizer state, no update and no weight decay.
3. :class:`ExpertMaskingTrainer` (a ``transformers.Trainer``) trains on ``sft_dataset_<slug>.pkl`` with every batch
   at the analysis mix (:class:`MixedBatchSampler`, e.g. 8 safe + 8 unsafe), the loss on response tokens only
   (:class:`SFTDataset`, :class:`MaskedSFTCollator`), the unsafe mask applied per sequence, and writes
   checkpoints that ``--resume`` continues from.
4. ``OUT/final_model`` is a plain OLMoE checkpoint (model + tokenizer) that loads with
   ``AutoModelForCausalLM.from_pretrained`` without this package; ``OUT/expert_selection.json`` and
   ``OUT/training_config.json`` sit next to it (copies inside it too).

Several processes (``accelerate launch``, ``torchrun``): the Trainer's own data parallelism — DDP, or FSDP2 from an
accelerate config (``fsdp_version: 2``; FSDP1 is refused). Each process takes every ``world_size``-th batch of the
sampler's order, so every process's batch has the analysis mix; the masks are applied per process; only the
selected slices get gradients (averaged over the processes) and updates; the JSON files and the final model are
written once, by the main process (under FSDP from the gathered full state dict, slices folded in).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import random
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset, Sampler
from transformers import Trainer, TrainerCallback

from moe_fastmask.pipeline.cli_args import add_dataclass_subcommand, dataclass_from_args
from moe_fastmask.pipeline.preflight import check_paths
from moe_fastmask.pipeline.selection import SELECTION_FILE, ExpertSelection, masked_layer_report, model_sizes
from moe_fastmask.pipeline.selection import select_experts

SAFE, UNSAFE = "safe", "unsafe"
GROUP_OF_KIND = {SAFE: 0, UNSAFE: 1}
IGNORE_INDEX = -100
TRAINING_CONFIG_FILE = "training_config.json"
FINAL_MODEL_DIR = "final_model"
CHECKPOINT_DIR = "checkpoints"
DTYPES = ("auto", "float32", "bfloat16", "float16")


# --------------------------------------------------------------------------------------------------------------
# Arguments
# --------------------------------------------------------------------------------------------------------------


@dataclass
class MaskedFinetuneArguments:
    """Settings of ``moe-fastmask train`` (parsed with ``transformers.HfArgumentParser``; every ``foo_bar`` flag is
    also accepted as ``--foo-bar``)."""

    model: str = field(
        metadata={"help": "base model path or hub id", "aliases": ["--model_name", "--model-name", "--model_name_or_path"]}
    )
    sft: str = field(metadata={"help": "sft_dataset_<slug>.pkl, or the analysis output directory holding it"})
    out: str = field(metadata={"help": "output directory (checkpoints/, final_model/, selection and config JSON)"})
    # selection
    risk_table: str | None = field(
        default=None, metadata={"help": "risk_diff_<slug>.pkl (default: next to the SFT file)"}
    )
    selection: str | None = field(
        default=None, metadata={"help": "use this expert_selection.json instead of selecting from the risk table"}
    )
    top_n: int | None = field(default=None, metadata={"help": "select the N highest-scoring experts overall"})
    per_layer: int | None = field(
        default=None,
        metadata={"help": "select the n highest-scoring experts of every layer (default, with none of --top-n, "
                  "--per-layer, --threshold: the model's top_k, 8 for OLMoE). Only experts with a positive risk_diff, "
                  "at most num_experts - top_k per layer"},
    )
    threshold: float | None = field(default=None, metadata={"help": "select every expert scoring above this"})
    fill: bool = field(
        default=False,
        metadata={"help": "top layers with fewer than top_k selected experts up with their next-ranked experts "
                  "(default: leave them unmasked, with a warning)"},
    )
    score_column: str = field(default="risk_diff", metadata={"help": "ranking column of the risk table"})
    allow_unmasked: bool = field(
        default=False,
        metadata={"help": "train even when no layer has top_k selected experts, so no layer is masked for unsafe "
                  "samples (default: refuse)"},
    )
    # batches
    batch_size: int = field(default=16, metadata={"help": "samples per batch (per device)"})
    safe_ratio: float = field(default=0.5, metadata={"help": "share of safe samples in every batch"})
    batch_order: str = field(
        default="auto",
        metadata={"help": "analysis: replay the analysis batches (batch_idx); shuffle: new mixed batches each epoch; "
                  "auto: analysis when every analysis batch has the mix, else shuffle",
                  "choices": ["auto", "analysis", "shuffle"]},
    )
    max_length: int = field(default=512, metadata={"help": "max tokens per sample (prompt + response)"})
    # optimisation
    num_epochs: float = field(default=3.0, metadata={"help": "training epochs"})
    max_steps: int = field(default=-1, metadata={"help": "stop after this many steps (overrides num_epochs)"})
    learning_rate: float = field(default=5e-5, metadata={"help": "AdamW learning rate"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay (selected experts only)"})
    warmup_steps: int = field(default=0, metadata={"help": "linear warm-up steps"})
    lr_scheduler_type: str = field(default="linear", metadata={"help": "transformers scheduler name"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient clipping norm (0: off)"})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "batches per optimizer step"})
    seed: int = field(default=0, metadata={"help": "seed of the batch order and of training"})
    # runtime
    device: str | None = field(default=None, metadata={"help": "cuda or cpu (default: cuda if available)"})
    dtype: str = field(
        default="auto", metadata={"help": "model dtype; auto: bfloat16 on cuda, float32 on cpu", "choices": list(DTYPES)}
    )
    slice_dtype: str = field(
        default="auto",
        metadata={"help": "dtype of the trainable expert slices; auto: the model's (views of the fused tensors, no "
                  "extra memory); float32: fp32 master copies for a bf16 model", "choices": list(DTYPES)},
    )
    gradient_checkpointing: bool = field(default=False, metadata={"help": "recompute decoder layers in backward"})
    checkpoint_layers: int | None = field(
        default=None, metadata={"help": "with --gradient-checkpointing: recompute only this many decoder layers"}
    )
    loss_chunk_size: int = field(
        default=1024,
        metadata={"help": "response tokens per lm_head/cross-entropy chunk (0: the model's own loss over all logits)"},
    )
    stock_experts: bool = field(
        default=False,
        metadata={"help": "run the frozen experts through the stock transformers implementation (keeps its "
                  "activations) instead of the recomputing one"},
    )
    backend: str = field(default="auto", metadata={"help": "router op backend: auto, triton, cpp, torch"})
    routing_stats: bool = field(default=True, metadata={"help": "count routing per group and log mask statistics"})
    # checkpoints and logging
    save_steps: int = field(default=500, metadata={"help": "checkpoint every N steps"})
    save_total_limit: int | None = field(default=2, metadata={"help": "checkpoints kept"})
    logging_steps: int = field(default=10, metadata={"help": "log every N steps"})
    resume: str | None = field(
        default=None,
        metadata={"help": "continue from a checkpoint: a checkpoint directory, or no value for the latest one in "
                  "OUT/checkpoints", "nargs": "?", "const": "latest"},
    )
    report_to: str = field(default="none", metadata={"help": "transformers report_to (none, tensorboard, wandb, ...)"})

    def __post_init__(self) -> None:
        modes = [name for name in ("top_n", "per_layer", "threshold") if getattr(self, name) is not None]
        if len(modes) > 1:
            raise ValueError(f"give at most one of --top-n, --per-layer, --threshold (got {', '.join(modes)})")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if not 0.0 <= self.safe_ratio <= 1.0:
            raise ValueError(f"safe_ratio must be in [0, 1], got {self.safe_ratio}")
        if self.max_length < 2:
            raise ValueError(f"max_length must be >= 2, got {self.max_length}")
        if self.checkpoint_layers is not None and self.checkpoint_layers < 0:
            raise ValueError(f"checkpoint_layers must be >= 0, got {self.checkpoint_layers}")

    def selection_options(self) -> dict[str, Any]:
        options: dict[str, Any] = {"fill": self.fill, "score_column": self.score_column}
        if self.per_layer is not None:
            options["per_layer"] = self.per_layer
        elif self.threshold is not None:
            options["threshold"] = self.threshold
        elif self.top_n is not None:
            options["top_n"] = self.top_n
        return options  # no mode: the selection's default, per_layer = top_k


# --------------------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------------------


def split_counts(batch_size: int, safe_ratio: float) -> tuple[int, int]:
    """``(n_safe, n_unsafe)`` of a batch: ``n_safe = round(batch_size * safe_ratio)`` (half up), as the analysis."""
    n_safe = math.floor(batch_size * safe_ratio + 0.5)
    return n_safe, batch_size - n_safe


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
    import pandas as pd

    frame = pd.read_pickle(path)
    if not isinstance(frame, pd.DataFrame):
        raise ValueError(f"{path}: expected a pandas DataFrame, got {type(frame).__name__}")
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
                    f"no analysis batch holds {self.n_safe} safe + {self.n_unsafe} unsafe samples; use order='shuffle'"
                )

    def has_mix(self, batch: Sequence[int]) -> bool:
        kinds = [self.groups[i] for i in batch]
        return kinds.count(GROUP_OF_KIND[SAFE]) == self.n_safe and kinds.count(GROUP_OF_KIND[UNSAFE]) == self.n_unsafe

    def _ordered(self, batch: Sequence[int]) -> list[int]:
        safe = [i for i in batch if self.groups[i] == GROUP_OF_KIND[SAFE]]
        return safe + [i for i in batch if self.groups[i] == GROUP_OF_KIND[UNSAFE]]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    @property
    def num_batches(self) -> int:
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


# --------------------------------------------------------------------------------------------------------------
# Model preparation
# --------------------------------------------------------------------------------------------------------------


def prepare_model(
    model: nn.Module,
    selection: ExpertSelection,
    *,
    slice_dtype: torch.dtype | None = None,
    memory_efficient: bool = True,
    backend: str = "auto",
) -> list[nn.Parameter]:
    """Patch ``model`` for masked fine-tuning; returns the trainable parameters (the selected expert slices).

    Routers through the fused op with the selection's two-group mask (:meth:`ExpertSelection.keep_mask`), every
    parameter frozen, the selected experts as trainable slices. Call it with the model on its training device.
    """
    import moe_fastmask as mf
    from moe_fastmask.integrations.expert_slices import attach_expert_slices

    num_layers, num_experts, top_k = model_sizes(model.config)
    if (num_layers, num_experts, top_k) != (selection.num_layers, selection.num_experts, selection.top_k):
        raise ValueError(
            f"the selection is for {selection.num_layers} layers x {selection.num_experts} experts, top_k "
            f"{selection.top_k}; the model has {num_layers} x {num_experts}, top_k {top_k}"
        )
    mf.apply_to_olmoe(model, backend=backend)
    mf.set_expert_mask(model, selection.keep_mask())
    return attach_expert_slices(model, selection.by_layer(), dtype=slice_dtype, memory_efficient=memory_efficient)


def release_model(model: nn.Module) -> nn.Module:
    """Undo :func:`prepare_model`: slices written back and removed, mask cleared, routers restored."""
    import moe_fastmask as mf
    from moe_fastmask.integrations.expert_slices import detach_expert_slices

    detach_expert_slices(model)
    if hasattr(model, "activation_checkpointing_disable"):  # the newer names (transformers >= 5.2x)
        if model.is_activation_checkpointing:
            model.activation_checkpointing_disable()
    elif model.is_gradient_checkpointing:
        model.gradient_checkpointing_disable()
    if mf.is_patched(model):
        mf.set_expert_mask(model, None)
        mf.remove_from_olmoe(model)
    return model


def enable_gradient_checkpointing(model: nn.Module, num_layers: int | None = None, first_layer: int = 0) -> list[int]:
    """Non-reentrant gradient checkpointing on the decoder layers; with ``num_layers``, only that many, starting at
    ``first_layer`` (layers before the first trainable expert keep no activations anyway). Returns the layers."""
    if hasattr(model, "activation_checkpointing_enable"):  # the newer name (transformers >= 5.2x)
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    layers = model.model.layers
    chosen = list(range(len(layers))) if num_layers is None else list(range(first_layer, min(len(layers), first_layer + num_layers)))
    for idx, layer in enumerate(layers):
        if hasattr(layer, "gradient_checkpointing"):
            layer.gradient_checkpointing = idx in chosen
    model.config.use_cache = False
    return chosen


# --------------------------------------------------------------------------------------------------------------
# Loss over response tokens with a frozen lm_head, chunked
# --------------------------------------------------------------------------------------------------------------


class FrozenHeadCrossEntropy(torch.autograd.Function):
    """Mean (or sum / ``divisor``) token cross-entropy of ``hidden @ weight.T`` for a frozen ``weight``.

    Works through ``chunk_size`` rows at a time and computes the gradient of ``hidden`` during the forward, so no
    ``[N, vocab]`` logits outlive a chunk (the gradient needs only ``hidden``'s shape). Logits are upcast to fp32 as
    in transformers' ``ForCausalLMLoss``.
    """

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, targets: Tensor, divisor: Tensor, chunk_size: int):
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        for start in range(0, hidden.shape[0], chunk_size):
            end = min(start + chunk_size, hidden.shape[0])
            logits = (hidden[start:end] @ weight.t()).float()
            target = targets[start:end]
            lse = torch.logsumexp(logits, dim=-1)
            total += (lse - logits.gather(1, target[:, None]).squeeze(1)).sum()
            if grad is not None:
                probs = logits.sub_(lse[:, None]).exp_()
                probs[torch.arange(end - start, device=probs.device), target] -= 1.0
                grad[start:end] = (probs.to(weight.dtype) @ weight).to(hidden.dtype)
            del logits
        divisor = divisor.to(device=hidden.device, dtype=torch.float32)
        ctx.save_for_backward(grad, divisor)
        return total / divisor

    @staticmethod
    def backward(ctx, grad_loss):
        grad, divisor = ctx.saved_tensors
        scale = (grad_loss.float() / divisor).to(grad.dtype) if grad is not None else None
        return (grad * scale if grad is not None else None), None, None, None, None


def response_token_loss(
    hidden: Tensor, lm_head_weight: Tensor, labels: Tensor, num_items_in_batch=None, chunk_size: int = 1024
) -> Tensor:
    """Causal LM loss on the labelled (response) positions only: ``hidden [B, S, H]`` predicts ``labels[:, 1:]``.

    Same value as ``ForCausalLMLoss`` (sum / ``num_items_in_batch`` when given, else the mean), without building
    the logits of unlabelled positions.
    """
    shift_labels = labels[:, 1:]
    keep = shift_labels != IGNORE_INDEX
    rows = hidden[:, :-1][keep]
    targets = shift_labels[keep]
    if num_items_in_batch is None:
        divisor = torch.tensor(float(max(int(targets.numel()), 1)))
    else:
        divisor = torch.as_tensor(num_items_in_batch).detach().float()
    if targets.numel() == 0:
        return hidden.sum() * 0.0
    return FrozenHeadCrossEntropy.apply(rows, lm_head_weight.detach(), targets, divisor, int(chunk_size))


def response_lm_loss(model: nn.Module, inputs: dict[str, Tensor], num_items_in_batch=None, chunk_size: int = 1024) -> Tensor:
    """The training loss of an ``OlmoeForCausalLM`` on a collated batch: the base model's last hidden states, then
    :func:`response_token_loss` (frozen lm_head, response tokens only, chunked)."""
    hidden = model.model(
        input_ids=inputs["input_ids"], attention_mask=inputs.get("attention_mask"), use_cache=False
    ).last_hidden_state
    return response_token_loss(hidden, model.lm_head.weight, inputs["labels"], num_items_in_batch, chunk_size)


# --------------------------------------------------------------------------------------------------------------
# Trainer
# --------------------------------------------------------------------------------------------------------------


class ExpertMaskingTrainer(Trainer):
    """``transformers.Trainer`` for masked fine-tuning of selected experts.

    Hooks it overrides: ``_get_train_sampler`` (:class:`MixedBatchSampler`: every batch at the analysis mix) and
    ``compute_loss`` (the batch's ``groups`` select each sequence's expert-mask row; with ``loss_chunk_size`` the
    loss runs on response tokens through a chunked frozen lm_head), plus ``_load_from_checkpoint`` so that
    ``resume`` reads OLMoE checkpoints in their saved (per-expert) layout. Give ``selection`` to have the model
    prepared here (:func:`prepare_model`; it is moved to the training device first), or prepare it yourself.

    ``routing_recorder``: a :class:`moe_fastmask.RoutingRecorder` counting each forward's routing per group (what
    :class:`RoutingStatsCallback` reads); None: masks only. Under a DDP/FSDP wrapper (several processes) the loss is
    the model's own (over all logits): the chunked path calls the inner model, which a wrapper must not be bypassed
    for.
    """

    def __init__(
        self,
        *args,
        selection: ExpertSelection | None = None,
        safe_ratio: float = 0.5,
        batch_order: str = "shuffle",
        loss_chunk_size: int = 1024,
        routing_recorder=None,
        slice_dtype: torch.dtype | None = None,
        memory_efficient: bool = True,
        backend: str = "auto",
        **kwargs,
    ) -> None:
        model = kwargs.get("model", args[0] if args else None)
        training_args = kwargs.get("args", args[1] if len(args) > 1 else None)
        if selection is not None and model is not None:
            if training_args is not None:
                model.to(training_args.device)
            prepare_model(model, selection, slice_dtype=slice_dtype, memory_efficient=memory_efficient, backend=backend)
        super().__init__(*args, **kwargs)
        self.args.remove_unused_columns = False  # the collator's ``groups`` is no model argument but must stay
        if self.is_fsdp_enabled:
            from moe_fastmask.integrations.expert_slices import keep_slice_keys

            if not getattr(self.accelerator, "is_fsdp2", False):
                raise ValueError(
                    "masked fine-tuning under FSDP needs FSDP2 (accelerate config: fsdp_version: 2): the trainable "
                    "expert slices are views of rows of the frozen fused expert tensors, which FSDP1's flat "
                    "parameters cannot hold"
                )
            keep_slice_keys(self.model)  # fully_shard shards slices and fused tensors apart; _save merges them
        self.selection = selection
        self.safe_ratio = safe_ratio
        self.batch_order = batch_order
        self.loss_chunk_size = int(loss_chunk_size or 0)
        self.routing_recorder = routing_recorder

    def _get_train_sampler(self, train_dataset=None, *args, **kwargs):
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        groups = dataset.groups if hasattr(dataset, "groups") else [int(dataset[i]["group"]) for i in range(len(dataset))]
        analysis = dataset.analysis_batches() if self.batch_order == "analysis" else None
        return MixedBatchSampler(
            groups, self._train_batch_size, self.safe_ratio, seed=self.args.seed, order=self.batch_order,
            analysis_batches=analysis,
        )

    def _routing_context(self, model, groups):
        import moe_fastmask as mf

        if groups is None:
            return contextlib.nullcontext()
        if self.routing_recorder is not None and model.training:
            return self.routing_recorder.record(groups)
        return mf.token_groups(model, groups)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = dict(inputs)
        groups = inputs.pop("groups", None)
        unwrapped = self.accelerator.unwrap_model(model)
        chunked = (
            self.loss_chunk_size > 0
            and not return_outputs
            and unwrapped is model  # a DDP/FSDP wrapper must run its own forward
            and not self.is_fsdp_enabled  # FSDP2 shards in place: the root module's forward gathers its parameters
            and "labels" in inputs
            and self.label_smoother is None
            and self.compute_loss_func is None
            and hasattr(unwrapped, "lm_head")
            and not unwrapped.lm_head.weight.requires_grad
        )
        with self._routing_context(unwrapped, groups):
            if not chunked:
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            with self.accelerator.autocast():
                return response_lm_loss(unwrapped, inputs, num_items_in_batch, self.loss_chunk_size)

    def _save(self, output_dir=None, state_dict=None):
        if state_dict is not None:  # gathered by FSDP / DeepSpeed: fold the trained slices into the fused tensors
            from moe_fastmask.integrations.expert_slices import merge_expert_slices

            state_dict = merge_expert_slices(state_dict)
        return super()._save(output_dir, state_dict=state_dict)

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        from moe_fastmask.integrations.expert_slices import load_fused_state_dict

        model = self.model if model is None else model
        state = load_fused_state_dict(resume_from_checkpoint)
        if state is None:
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        if self.is_fsdp_enabled:  # sharded parameters: the full tensors (slices added) go in through DCP
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

            from moe_fastmask.integrations.expert_slices import add_slice_entries

            options = StateDictOptions(full_state_dict=True, strict=False)
            result = set_model_state_dict(model, add_slice_entries(state, model), options=options)
        else:
            result = model.load_state_dict(state, strict=False)
        missing = [k for k in result.missing_keys if not k.endswith("rotary_emb.inv_freq")]
        if missing or result.unexpected_keys:
            raise RuntimeError(
                f"checkpoint {resume_from_checkpoint} does not match the model: missing {missing[:5]}, "
                f"unexpected {result.unexpected_keys[:5]}"
            )


class RoutingStatsCallback(TrainerCallback):
    """Copies the trainer's routing counts to the host once per logging step and logs mask statistics.

    Logged: ``routing/unsafe_on_selected`` and ``routing/safe_on_selected`` — the share of token-expert assignments
    in the masked layers that went to selected experts (1.0 for unsafe tokens when the mask holds). ``totals``
    accumulates the host copies ``[L, G, E]`` over the whole run.
    """

    def __init__(self, recorder, selection: ExpertSelection) -> None:
        self.recorder = recorder
        self.selection = selection
        self.totals: Tensor | None = None
        self._selected = torch.zeros(selection.num_layers, selection.num_experts, dtype=torch.bool)
        for layer, expert in selection.experts:
            self._selected[layer, expert] = True
        self._masked = torch.zeros(selection.num_layers, dtype=torch.bool)
        self._masked[selection.masked_layers] = True

    def _flush(self) -> Tensor:
        counts = self.recorder.prefill_counts.detach().to("cpu", copy=True)
        self.recorder.reset()
        self.totals = counts if self.totals is None else self.totals + counts
        return counts

    def shares(self, counts: Tensor) -> dict[str, float]:
        out = {}
        for group, name in ((1, "unsafe"), (0, "safe")):
            in_masked = counts[self._masked, group]
            total = int(in_masked.sum())
            on_selected = int(in_masked[self._selected[self._masked]].sum())
            if total:
                out[f"routing/{name}_on_selected"] = on_selected / total
        return out

    def on_log(self, args, state, control, logs=None, **kwargs):
        counts = self._flush()
        if logs is None or not self.selection.masked_layers:
            return
        shares = self.shares(counts)
        logs.update(shares)  # seen by the callbacks after this one (put it first: see ``train``)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(shares)

    def on_train_end(self, args, state, control, **kwargs):
        self._flush()


# --------------------------------------------------------------------------------------------------------------
# The whole run
# --------------------------------------------------------------------------------------------------------------


@dataclass
class TrainResult:
    out: Path
    final_model: Path
    selection: ExpertSelection
    config: dict
    trainer: ExpertMaskingTrainer
    routing_totals: Tensor | None


def _torch_dtype(name: str, device: str) -> torch.dtype:
    if name == "auto":
        name = "bfloat16" if str(device).startswith("cuda") else "float32"
    return getattr(torch, name)


def _latest_checkpoint(directory: Path) -> Path | None:
    from transformers.trainer_utils import get_last_checkpoint

    if not directory.is_dir():
        return None
    last = get_last_checkpoint(str(directory))
    return Path(last) if last else None


def _check_split(sft_frame, split_path: Path | None) -> dict | None:
    if split_path is None:
        return None
    from moe_fastmask.pipeline.data import load_split

    split = load_split(split_path)
    if "id" in sft_frame.columns:
        leaked = sorted(set(int(i) for i in sft_frame["id"]) & set(int(i) for i in split["test_ids"]))
        if leaked:
            raise ValueError(f"the SFT set holds held-out test records of {split_path}: ids {leaked[:10]}")
    return split


def build_selection(config: MaskedFinetuneArguments, model_config, risk_table: Path | None) -> ExpertSelection:
    """The selection of a run: ``config.selection`` if given, else chosen from the risk table."""
    if config.selection:
        return ExpertSelection.load(config.selection)
    if risk_table is None:
        raise FileNotFoundError("no risk table: pass --risk-table (risk_diff_<slug>.pkl) or --selection")
    num_layers, num_experts, top_k = model_sizes(model_config)
    return select_experts(
        risk_table, num_layers=num_layers, num_experts=num_experts, top_k=top_k, **config.selection_options()
    )


def train(config: MaskedFinetuneArguments, *, model=None, tokenizer=None, callbacks=None) -> TrainResult:
    """Run masked fine-tuning as configured; returns where things went and the trainer."""
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainingArguments

    from moe_fastmask.pipeline import artifacts

    check_paths(config.out, model=config.model if model is None else None)
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    device = config.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = _torch_dtype(config.dtype, device)
    training_args = TrainingArguments(
        output_dir=str(out / CHECKPOINT_DIR),
        per_device_train_batch_size=config.batch_size,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        num_train_epochs=config.num_epochs,
        max_steps=config.max_steps,
        learning_rate=config.learning_rate,
        weight_decay=config.weight_decay,
        warmup_steps=config.warmup_steps,
        lr_scheduler_type=config.lr_scheduler_type,
        max_grad_norm=config.max_grad_norm,
        logging_steps=config.logging_steps,
        save_strategy="steps",
        save_steps=config.save_steps,
        save_total_limit=config.save_total_limit,
        seed=config.seed,
        bf16=device.startswith("cuda") and dtype == torch.bfloat16,
        use_cpu=not device.startswith("cuda"),
        remove_unused_columns=False,
        # every slice gets a gradient each step (zeros when no token chose it), except in the stock experts' loop
        ddp_find_unused_parameters=bool(config.stock_experts),
        dataloader_num_workers=0,
        report_to=config.report_to,
        disable_tqdm=not sys.stderr.isatty(),
    )
    main_process = training_args.should_save  # under a launcher, one process writes the files
    paths = resolve_sft_paths(config.sft)
    risk_table = Path(config.risk_table) if config.risk_table else paths["risk_table"]
    frame = load_sft_frame(paths["sft"])
    split = _check_split(frame, paths["split"])

    if tokenizer is None:
        tokenizer = AutoTokenizer.from_pretrained(config.model)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if model is None:
        model = AutoModelForCausalLM.from_pretrained(config.model, dtype=dtype)
    model.to(training_args.device)
    use_cache = model.config.use_cache
    model.config.use_cache = False

    selection_path = out / SELECTION_FILE
    if config.resume and not config.selection and selection_path.is_file():
        selection = ExpertSelection.load(selection_path)  # the checkpoint's optimizer state matches this one
    else:
        selection = build_selection(config, model.config, risk_table)
    if not selection.experts:
        raise ValueError("the selection is empty: nothing to train (lower --threshold or raise --top-n)")
    _, masked_message = masked_layer_report(selection, allow_unmasked=config.allow_unmasked)
    if main_process:
        print(masked_message, file=sys.stderr)
        selection.save(selection_path)

    dataset = SFTDataset(frame, tokenizer, config.max_length)
    batch_order = choose_batch_order(dataset, config.batch_size, config.safe_ratio, config.batch_order)
    slice_dtype = None if config.slice_dtype == "auto" else getattr(torch, config.slice_dtype)

    recorder = None
    trainer_callbacks = list(callbacks or [])
    prepare_model(
        model, selection, slice_dtype=slice_dtype, memory_efficient=not config.stock_experts, backend=config.backend
    )
    if config.routing_stats:
        import moe_fastmask as mf

        recorder = mf.RoutingRecorder(model, num_groups=2)
        stats_callback = RoutingStatsCallback(recorder, selection)
        trainer_callbacks.append(stats_callback)
    checkpointed: list[int] = []
    if config.gradient_checkpointing:
        first = min(selection.by_layer()) if selection.experts else 0
        checkpointed = enable_gradient_checkpointing(model, config.checkpoint_layers, first)

    trainer = ExpertMaskingTrainer(
        model=model,
        args=training_args,
        train_dataset=dataset,
        data_collator=MaskedSFTCollator(tokenizer.pad_token_id),
        processing_class=tokenizer,
        callbacks=trainer_callbacks,
        safe_ratio=config.safe_ratio,
        batch_order=batch_order,
        loss_chunk_size=config.loss_chunk_size,
        routing_recorder=recorder,
    )
    if config.routing_stats:  # first, so that the loggers after it see the routing shares
        trainer.callback_handler.callbacks.remove(stats_callback)
        trainer.callback_handler.callbacks.insert(0, stats_callback)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    run_config = {
        "arguments": dataclasses.asdict(config),
        "base_model": str(Path(config.model).resolve()) if Path(config.model).exists() else config.model,
        "sft": str(paths["sft"].resolve()),
        "risk_table": str(risk_table.resolve()) if risk_table else None,
        "split_file": str(paths["split"].resolve()) if paths["split"] else None,
        "data_path": split["data_path"] if split else None,
        "selection_file": str(selection_path.resolve()),
        "num_selected": len(selection),
        "masked_layers": selection.masked_layers,
        "short_layers": selection.short_layers,
        "batch_order": batch_order,
        "samples": {"safe": dataset.groups.count(0), "unsafe": dataset.groups.count(1)},
        "batch_mix": dict(zip(("safe", "unsafe"), split_counts(config.batch_size, config.safe_ratio))),
        "checkpointed_layers": checkpointed,
        "trainable_parameters": trainable,
        "device": str(training_args.device),
        "world_size": training_args.world_size,
        "global_batch_size": config.batch_size * config.gradient_accumulation_steps * training_args.world_size,
        "distributed": str(getattr(trainer.accelerator.distributed_type, "value", "NO")),
        "dtype": str(dtype).replace("torch.", ""),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
    }
    if main_process:
        artifacts.atomic_write_json(out / TRAINING_CONFIG_FILE, run_config)

    resume = None
    if config.resume:
        resume = _latest_checkpoint(out / CHECKPOINT_DIR) if config.resume == "latest" else Path(config.resume)
        if resume is None:
            raise FileNotFoundError(f"--resume: no checkpoint in {out / CHECKPOINT_DIR}")
    trainer.train(resume_from_checkpoint=str(resume) if resume else None)

    final = out / FINAL_MODEL_DIR
    model.config.use_cache = use_cache
    if trainer.is_fsdp_enabled:  # the final model as one full checkpoint, whatever the checkpoints' format
        trainer.accelerator.state.fsdp_plugin.set_state_dict_type("FULL_STATE_DICT")
    trainer.save_model(str(final))  # hooks write the slices back and drop their keys: a plain OLMoE checkpoint
    if main_process:
        for extra in (TRAINING_CONFIG_FILE, SELECTION_FILE):
            (final / extra).write_text((out / extra).read_text())
    trainer.accelerator.wait_for_everyone()  # every process returns once the final model is on disk
    totals = stats_callback.totals if config.routing_stats else None
    release_model(model)
    return TrainResult(out=out, final_model=final, selection=selection, config=run_config, trainer=trainer,
                       routing_totals=totals)


# --------------------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------------------


def add_cli_arguments(subparsers) -> argparse.ArgumentParser:
    """Add the ``train`` subcommand (its flags come from :class:`MaskedFinetuneArguments`)."""
    return add_dataclass_subcommand(
        subparsers,
        "train",
        MaskedFinetuneArguments,
        help="masked fine-tuning of the selected (unsafe) experts",
        description=__doc__.split("\n\n")[0],
        func=run_cli,
    )


def config_from_args(args: argparse.Namespace) -> MaskedFinetuneArguments:
    return dataclass_from_args(MaskedFinetuneArguments, args)


def run_cli(args: argparse.Namespace) -> int:
    from moe_fastmask.pipeline import distributed

    try:
        result = train(config_from_args(args))
    except (ValueError, FileNotFoundError) as error:
        print(f"moe-fastmask train: error: {error}", file=sys.stderr)
        return 2
    finally:
        distributed.teardown(owned_only=False)  # the group accelerate created for the Trainer
    print(f"final model: {result.final_model}")
    print(f"selection: {result.out / SELECTION_FILE} ({len(result.selection)} experts, "
          f"masked layers {result.selection.masked_layers})")
    return 0


__all__ = [
    "ExpertMaskingTrainer",
    "FrozenHeadCrossEntropy",
    "MaskedFinetuneArguments",
    "MaskedSFTCollator",
    "MixedBatchSampler",
    "RoutingStatsCallback",
    "SFTDataset",
    "TrainResult",
    "add_cli_arguments",
    "choose_batch_order",
    "enable_gradient_checkpointing",
    "prepare_model",
    "release_model",
    "resolve_sft_paths",
    "response_lm_loss",
    "response_token_loss",
    "split_counts",
    "train",
]
