"""The settings of ``moe-fastmask train`` (:class:`MaskedFinetuneArguments`, one ``HfArgumentParser`` dataclass)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any

from moe_fastmask.pipeline.batching import check_batch_mix
from moe_fastmask.pipeline.common import DTYPES


@dataclass
class MaskedFinetuneArguments:
    """Settings of ``moe-fastmask train`` (each field is the flag ``--foo-bar``; the old ``--foo_bar`` spelling is
    still accepted, see :mod:`moe_fastmask.pipeline.cli_args`)."""

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
        default=None, metadata={"help": "with --gradient-checkpointing: recompute only this many decoder layers (default: all)"}
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
    backend: str = field(
        default="auto",
        metadata={"help": "router op backend (auto: on cuda the CUDA kernel where it builds, else triton; on cpu the "
                  "C++ kernel, else the PyTorch reference)", "choices": ["auto", "triton", "cpp", "torch"]},
    )
    routing_stats: bool = field(
        default=True,
        metadata={"help": "count routing per group and log the mask statistics",
                  "negative_help": "do not count routing per group or log the mask statistics (masking still "
                  "applies)"},
    )
    # checkpoints and logging
    save_steps: int = field(default=500, metadata={"help": "checkpoint every N steps"})
    save_total_limit: int | None = field(default=2, metadata={"help": "checkpoints kept"})
    logging_steps: int = field(default=10, metadata={"help": "log every N steps"})
    resume: str | None = field(
        default=None,
        metadata={"help": "continue from a checkpoint: a checkpoint directory, or no value for the latest one in "
                  "OUT/checkpoints", "nargs": "?", "const": "latest"},
    )
    overwrite: bool = field(
        default=False,
        metadata={"help": "delete the checkpoints and final model of an earlier run in --out and start over "
                  "(without it, an --out holding an earlier run is refused unless --resume continues it)"},
    )
    progress: bool = field(
        default=True,
        metadata={"help": "show the progress bar over training steps", "negative": "--no-progress",
                  "negative_help": "no progress bar (the loss and routing metrics are still logged)"},
    )
    report_to: str = field(default="none", metadata={"help": "transformers report_to (none, tensorboard, wandb, ...)"})

    def __post_init__(self) -> None:
        for spec in fields(self):  # (NaN and inf pass every range check below, and train to NaN weights)
            value = getattr(self, spec.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"{spec.name} must be a finite number (--{spec.name.replace('_', '-')}), got {value}")
        modes = [name for name in ("top_n", "per_layer", "threshold") if getattr(self, name) is not None]
        if len(modes) > 1:
            raise ValueError(f"give at most one of --top-n, --per-layer, --threshold (got {', '.join(modes)})")
        choosing = [f"--{name.replace('_', '-')}" for name in modes] + (["--fill"] if self.fill else []) + (
            ["--score-column"] if self.score_column != "risk_diff" else [])
        if self.selection and choosing:
            raise ValueError(
                f"--selection takes its experts from the file; {', '.join(choosing)} choose them from the risk table: "
                "give one or the other"
            )
        if self.resume and self.overwrite:
            raise ValueError("--resume continues the run in --out and --overwrite deletes it: give one or the other")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if not 0.0 <= self.safe_ratio <= 1.0:
            raise ValueError(f"safe_ratio must be in [0, 1], got {self.safe_ratio}")
        if 0.0 < self.safe_ratio < 1.0:  # a mixed batch holds whole pairs, as in analyze (0 or 1: one kind only)
            check_batch_mix(self.batch_size, self.safe_ratio)
        if self.max_length < 2:
            raise ValueError(f"max_length must be >= 2, got {self.max_length}")
        if self.checkpoint_layers is not None and self.checkpoint_layers < 0:
            raise ValueError(f"checkpoint_layers must be >= 0, got {self.checkpoint_layers}")
        if self.checkpoint_layers is not None and not self.gradient_checkpointing:
            raise ValueError("--checkpoint-layers needs --gradient-checkpointing")
        at_least = {"gradient_accumulation_steps": 1, "logging_steps": 1, "save_steps": 1, "warmup_steps": 0,
                    "loss_chunk_size": 0, "learning_rate": 0.0, "weight_decay": 0.0, "max_grad_norm": 0.0}
        for name, low in at_least.items():
            if getattr(self, name) < low:
                raise ValueError(f"{name} must be >= {low} (--{name.replace('_', '-')}), got {getattr(self, name)}")
        if self.save_total_limit is not None and self.save_total_limit < 1:
            raise ValueError(f"save_total_limit must be >= 1 (--save-total-limit), got {self.save_total_limit}")
        if self.max_steps <= 0 and not self.num_epochs > 0:
            raise ValueError(f"num_epochs must be > 0 (or give --max-steps), got {self.num_epochs}")

    def selection_options(self) -> dict[str, Any]:
        """The keyword arguments of the expert selection, from these settings."""
        options: dict[str, Any] = {"fill": self.fill, "score_column": self.score_column}
        if self.per_layer is not None:
            options["per_layer"] = self.per_layer
        elif self.threshold is not None:
            options["threshold"] = self.threshold
        elif self.top_n is not None:
            options["top_n"] = self.top_n
        return options  # no mode: the selection's default, per_layer = top_k


__all__ = ["MaskedFinetuneArguments"]
