"""``moe-fastmask train``: masked fine-tuning of the selected (unsafe) experts of an OLMoE model.

The repair step of the pipeline, on the artifacts of ``moe-fastmask analyze``:

1. :mod:`moe_fastmask.pipeline.selection` picks experts from ``risk_diff_<slug>.pkl`` (top-N, top-n per layer or a
   threshold) and saves the choice as ``expert_selection.json``.
2. :func:`prepare_model` patches the routers (:func:`moe_fastmask.apply`), sets the per-group mask — safe
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

Modules: :mod:`~.arguments` (the settings), :mod:`~.data` (SFT set, collator, mixed-batch sampler),
:mod:`~.trainer` (model preparation, the response-token loss, the Trainer and its routing callback), :mod:`~.run`
(:func:`train` and the subcommand). The chunked frozen-head cross entropy is the op
:mod:`moe_fastmask.ops.cross_entropy`.
"""

import importlib
from typing import Any

# The names load on first use: ``moe-fastmask`` builds its parser from :mod:`~.arguments` without importing torch.
_LAZY = {
    "CHECKPOINT_DIR": "moe_fastmask.pipeline.common",
    "FINAL_MODEL_DIR": "moe_fastmask.pipeline.common",
    "GROUP_OF_KIND": "moe_fastmask.pipeline.common",
    "IGNORE_INDEX": "moe_fastmask.ops.cross_entropy",
    "SAFE": "moe_fastmask.pipeline.common",
    "SELECTION_FILE": "moe_fastmask.pipeline.common",
    "TRAINING_CONFIG_FILE": "moe_fastmask.pipeline.common",
    "UNSAFE": "moe_fastmask.pipeline.common",
    "ExpertMaskingTrainer": "moe_fastmask.pipeline.train.trainer",
    "FrozenHeadCrossEntropy": "moe_fastmask.ops.cross_entropy",
    "MaskedFinetuneArguments": "moe_fastmask.pipeline.train.arguments",
    "MaskedSFTCollator": "moe_fastmask.pipeline.train.data",
    "MixedBatchSampler": "moe_fastmask.pipeline.train.data",
    "RoutingStatsCallback": "moe_fastmask.pipeline.train.trainer",
    "SFTDataset": "moe_fastmask.pipeline.train.data",
    "TrainResult": "moe_fastmask.pipeline.train.run",
    "add_cli_arguments": "moe_fastmask.pipeline.train.run",
    "build_selection": "moe_fastmask.pipeline.train.run",
    "choose_batch_order": "moe_fastmask.pipeline.train.data",
    "config_from_args": "moe_fastmask.pipeline.train.run",
    "enable_gradient_checkpointing": "moe_fastmask.pipeline.train.trainer",
    "load_sft_frame": "moe_fastmask.pipeline.train.data",
    "prepare_model": "moe_fastmask.pipeline.train.trainer",
    "release_model": "moe_fastmask.pipeline.train.trainer",
    "resolve_sft_paths": "moe_fastmask.pipeline.train.data",
    "response_lm_loss": "moe_fastmask.pipeline.train.trainer",
    "response_token_loss": "moe_fastmask.pipeline.train.trainer",
    "run_cli": "moe_fastmask.pipeline.train.run",
    "split_counts": "moe_fastmask.pipeline.common",
    "train": "moe_fastmask.pipeline.train.run",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "CHECKPOINT_DIR",
    "FINAL_MODEL_DIR",
    "GROUP_OF_KIND",
    "IGNORE_INDEX",
    "SAFE",
    "SELECTION_FILE",
    "TRAINING_CONFIG_FILE",
    "UNSAFE",
    "ExpertMaskingTrainer",
    "FrozenHeadCrossEntropy",
    "MaskedFinetuneArguments",
    "MaskedSFTCollator",
    "MixedBatchSampler",
    "RoutingStatsCallback",
    "SFTDataset",
    "TrainResult",
    "add_cli_arguments",
    "build_selection",
    "choose_batch_order",
    "config_from_args",
    "enable_gradient_checkpointing",
    "load_sft_frame",
    "prepare_model",
    "release_model",
    "resolve_sft_paths",
    "response_lm_loss",
    "response_token_loss",
    "run_cli",
    "split_counts",
    "train",
]
