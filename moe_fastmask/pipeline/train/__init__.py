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

from moe_fastmask.ops.cross_entropy import IGNORE_INDEX, FrozenHeadCrossEntropy
from moe_fastmask.pipeline.common import (
    CHECKPOINT_DIR,
    FINAL_MODEL_DIR,
    GROUP_OF_KIND,
    SAFE,
    SELECTION_FILE,
    TRAINING_CONFIG_FILE,
    UNSAFE,
    split_counts,
)
from moe_fastmask.pipeline.train.arguments import MaskedFinetuneArguments
from moe_fastmask.pipeline.train.data import (
    MaskedSFTCollator,
    MixedBatchSampler,
    SFTDataset,
    choose_batch_order,
    load_sft_frame,
    resolve_sft_paths,
)
from moe_fastmask.pipeline.train.run import (
    TrainResult,
    add_cli_arguments,
    build_selection,
    config_from_args,
    run_cli,
    train,
)
from moe_fastmask.pipeline.train.trainer import (
    ExpertMaskingTrainer,
    RoutingStatsCallback,
    enable_gradient_checkpointing,
    prepare_model,
    release_model,
    response_lm_loss,
    response_token_loss,
)

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
