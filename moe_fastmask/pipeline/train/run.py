"""One masked fine-tuning run (:func:`train`) and the ``moe-fastmask train`` subcommand."""

from __future__ import annotations

import argparse
import dataclasses
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from moe_fastmask.integrations.expert_slices import UnsupportedExpertLayoutError, check_expert_slices_supported
from moe_fastmask.integrations.registry import UnsupportedModelError
from moe_fastmask.pipeline.cli_args import add_subcommand, dataclass_from_args
from moe_fastmask.pipeline.common import (
    CHECKPOINT_DIR,
    FINAL_MODEL_DIR,
    SELECTION_FILE,
    TRAINING_CONFIG_FILE,
    prepare_tokenizer,
    split_counts,
    torch_dtype,
)
from moe_fastmask.pipeline.preflight import UsageError, check_device, check_paths, one_line
from moe_fastmask.pipeline.selection import (
    ExpertSelection,
    check_selection_fits,
    masked_layer_report,
    model_sizes,
    select_experts,
)
from moe_fastmask.pipeline.train.arguments import MaskedFinetuneArguments
from moe_fastmask.pipeline.train.data import (
    MaskedSFTCollator,
    SFTDataset,
    choose_batch_order,
    load_sft_frame,
    resolve_sft_paths,
)
from moe_fastmask.pipeline.train.trainer import (
    ExpertMaskingTrainer,
    RoutingStatsCallback,
    enable_gradient_checkpointing,
    release_model,
)

DESCRIPTION = "``moe-fastmask train``: masked fine-tuning of the selected (unsafe) experts of an OLMoE model."
ROUTING_METRICS = (
    "logged routing metrics, over the masked layers: routing/unsafe_on_selected = share of the jailbreak tokens' "
    "expert choices that went to selected experts (1 while the mask holds); routing/safe_on_selected = the same "
    "share for safe tokens, which route freely"
)


# --------------------------------------------------------------------------------------------------------------
# The whole run
# --------------------------------------------------------------------------------------------------------------


@dataclass
class TrainResult:
    """What :func:`train` returns: the output folder, the saved final model, the selection, the run's config,
    the trainer and the routing counts of training (None when not recorded)."""
    out: Path
    final_model: Path
    selection: ExpertSelection
    config: dict
    trainer: ExpertMaskingTrainer
    routing_totals: Tensor | None


def _checkpoints(directory: Path) -> list[Path]:
    """The ``checkpoint-N`` folders in ``directory``, newest (highest N) first."""
    if not directory.is_dir():
        return []
    found = [path for path in directory.glob("checkpoint-*") if path.is_dir() and path.name[11:].isdigit()]
    return sorted(found, key=lambda path: int(path.name[11:]), reverse=True)


def _latest_checkpoint(directory: Path) -> Path | None:
    """The newest complete checkpoint in ``directory``. The Trainer writes a checkpoint's ``trainer_state.json``
    last, so a checkpoint without it was cut short (a kill while saving): it is skipped, said in a warning."""
    from transformers.trainer import TRAINER_STATE_NAME

    skipped = []
    for checkpoint in _checkpoints(directory):
        if (checkpoint / TRAINER_STATE_NAME).is_file():
            if skipped:
                warnings.warn(f"--resume: skipping {', '.join(skipped)} (incomplete: no {TRAINER_STATE_NAME}, "
                              f"cut short while saving); continuing from {checkpoint.name}", stacklevel=2)
            return checkpoint
        skipped.append(checkpoint.name)
    return None


def _earlier_run(out: Path) -> list[str]:
    """What an earlier training run left in ``out`` (its checkpoints, its final model), as relative paths."""
    found = [f"{CHECKPOINT_DIR}/{path.name}" for path in _checkpoints(out / CHECKPOINT_DIR)]
    return found + ([FINAL_MODEL_DIR] if (out / FINAL_MODEL_DIR).exists() else [])


def _delete_earlier_run(out: Path) -> None:
    import shutil

    for path in _checkpoints(out / CHECKPOINT_DIR) + [out / FINAL_MODEL_DIR]:
        shutil.rmtree(path, ignore_errors=True)


def _check_analysis_model(sft_path: Path, model_name: str, model_config, warn: bool = True) -> None:
    """The analysis that chose the experts and wrote the SFT answers was made with ``model_name``: a model of
    another family is refused; another path or id is said in a warning (it may be a copy of the same model)."""
    import json

    slug = sft_path.stem[len("sft_dataset_"):] if sft_path.stem.startswith("sft_dataset_") else None
    config_file = sft_path.with_name(f"analysis_config_{slug}.json") if slug else None
    if config_file is None or not config_file.is_file():
        return
    try:
        analysed = json.loads(config_file.read_text(encoding="utf-8"))["config"]["model"]
    except (OSError, ValueError, KeyError, TypeError):
        return
    here = str(Path(model_name).expanduser().resolve()) if Path(model_name).expanduser().exists() else model_name
    if analysed == here:
        return
    analysed_type = None
    if (Path(analysed) / "config.json").is_file():
        try:
            analysed_type = json.loads((Path(analysed) / "config.json").read_text(encoding="utf-8")).get("model_type")
        except (OSError, ValueError, AttributeError):
            analysed_type = None
    if analysed_type is not None and analysed_type != model_config.model_type:
        raise UsageError(
            f"--sft {sft_path}: that analysis was made with {analysed} (a {analysed_type} model), not with --model "
            f"{model_name} (a {model_config.model_type} model); its experts and answers belong to the other model"
        )
    if warn:
        warnings.warn(f"--sft {sft_path}: that analysis was made with {analysed}, and --model is {model_name}; its "
                      f"experts and answers are that model's, so make sure both are the same model", stacklevel=2)


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


def _trained_records(sft_frame, split: dict | None) -> dict[str, str] | None:
    """Record id -> content fingerprint of every record in the SFT set (None without a split holding fingerprints)."""
    if split is None or "id" not in sft_frame.columns or not isinstance(split.get("fingerprints"), dict):
        return None
    fingerprints = split["fingerprints"]
    ids = sorted({int(i) for i in sft_frame["id"]})
    return {str(i): fingerprints[str(i)] for i in ids if str(i) in fingerprints}


def _check_report_to(report_to: str) -> None:
    """Each ``--report-to`` integration must be installed (the Trainer would fail only after the model loaded)."""
    from transformers.integrations import get_available_reporting_integrations

    names = [name.strip() for name in str(report_to).split(",") if name.strip()]
    available = set(get_available_reporting_integrations())
    wanted = [name for name in names if name not in ("none", "all")]
    absent = [name for name in wanted if name not in available]
    if absent:
        raise UsageError(
            f"--report-to {','.join(absent)}: not installed or not a transformers integration (installed: "
            f"{', '.join(sorted(available)) or 'none'}); pip install the tracker's package, or use --report-to none"
        )


# the flags that choose the experts, with their defaults
_CHOICE_FLAGS = {field.name: field.default for field in dataclasses.fields(MaskedFinetuneArguments)
                 if field.name in ("top_n", "per_layer", "threshold", "fill", "score_column")}  # fmt: skip


def _check_resumed_selection(config: MaskedFinetuneArguments, out: Path) -> None:
    """``--resume`` trains the selection saved in ``out`` (its checkpoint's optimizer state is for those experts):
    selection flags that differ from the saved run's would be ignored, so they are refused."""
    import json

    saved_path = out / TRAINING_CONFIG_FILE
    try:
        saved = json.loads(saved_path.read_text(encoding="utf-8")).get("arguments", {})
    except (OSError, ValueError, AttributeError):
        saved = {}
    differing = [
        f"--{name.replace('_', '-')} {getattr(config, name)!r} (the run's: {saved.get(name, default)!r})"
        for name, default in _CHOICE_FLAGS.items()
        if getattr(config, name) != saved.get(name, default)
    ]
    if differing:
        raise UsageError(
            f"--resume continues the run in {out} with its saved {SELECTION_FILE}, but {'; '.join(differing)} "
            "would choose other experts; drop those flags, or train into a new --out"
        )


def _remove_created(paths: list[Path]) -> None:
    """Remove the files and directories a failed run created (deepest first; a directory only when emptied)."""
    import shutil

    for path in reversed(paths):
        if path.is_file():
            path.unlink()
        elif path.is_dir() and path.name == CHECKPOINT_DIR:
            shutil.rmtree(path)
        elif path.is_dir() and not any(path.iterdir()):
            path.rmdir()


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
    """Run masked fine-tuning as configured; returns where things went and the trainer (``--no-progress`` also
    hides transformers' own bars)."""
    from moe_fastmask.pipeline.common import library_progress_bars

    with library_progress_bars(config.progress):
        return _train(config, model=model, tokenizer=tokenizer, callbacks=callbacks)


def _train(config: MaskedFinetuneArguments, *, model=None, tokenizer=None, callbacks=None) -> TrainResult:
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainingArguments

    from moe_fastmask.pipeline import artifacts

    check_paths(config.out, model=config.model if model is None else None)
    check_device(config.device)
    for flag, value in (("--selection", config.selection), ("--risk-table", config.risk_table)):
        if value and not Path(value).is_file():
            raise UsageError(f"{flag} {value!r} does not exist")
    _check_report_to(config.report_to)
    out = Path(config.out)
    resume = None  # found before anything is loaded or written
    if config.resume:
        resume = _latest_checkpoint(out / CHECKPOINT_DIR) if config.resume == "latest" else Path(config.resume)
        if resume is None:
            raise UsageError(f"--resume: no checkpoint in {out / CHECKPOINT_DIR} to continue from (a checkpoint cut "
                             f"short while saving does not count)")
        if not resume.is_dir():
            raise UsageError(f"--resume {config.resume!r}: no such checkpoint directory")
    elif (earlier := _earlier_run(out)) and not config.overwrite:
        # a new run must not leave another run's checkpoints for a later --resume to pick up
        raise UsageError(
            f"--out {out} holds an earlier training run ({', '.join(earlier)}); --resume continues it, --overwrite "
            f"deletes it and starts over, or use another --out"
        )
    device = config.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch_dtype(config.dtype, device)
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
        disable_tqdm=not config.progress,  # the Trainer's bar over steps
    )
    main_process = training_args.should_save  # under a launcher, one process writes the files
    paths = resolve_sft_paths(config.sft)
    risk_table = Path(config.risk_table) if config.risk_table else paths["risk_table"]
    frame = load_sft_frame(paths["sft"])
    split = _check_split(frame, paths["split"])

    try:
        if tokenizer is None:
            tokenizer = AutoTokenizer.from_pretrained(config.model)
        if model is None:
            model = AutoModelForCausalLM.from_pretrained(config.model, dtype=dtype)
    except OSError as error:  # not found locally or on the hub, no access, no network: one line, nothing written
        raise UsageError(f"cannot load model {config.model!r}: {one_line(error)}") from error
    prepare_tokenizer(tokenizer, padding_side=None)
    check_expert_slices_supported(model)  # an unsupported family is refused before anything is written
    _check_analysis_model(paths["sft"], config.model, model.config, warn=main_process)  # every process: all refuse
    use_cache = model.config.use_cache
    model.config.use_cache = False

    selection_path = out / SELECTION_FILE
    if config.resume and not config.selection and selection_path.is_file():
        _check_resumed_selection(config, out)
        selection = ExpertSelection.load(selection_path)  # the checkpoint's optimizer state matches this one
    else:
        selection = build_selection(config, model.config, risk_table)
        if config.resume and selection_path.is_file():
            saved = ExpertSelection.load(selection_path)
            if sorted(selection.experts) != sorted(saved.experts):
                raise UsageError(
                    f"--resume continues the run in {out}, which trained the experts of its {SELECTION_FILE} "
                    f"({len(saved)} experts; its checkpoint holds them and their optimizer state), but --selection "
                    f"{config.selection} names other experts ({len(selection)}); drop --selection, or train into a "
                    f"new --out"
                )
    if not selection.experts:
        raise ValueError("the selection is empty: nothing to train (lower --threshold or raise --top-n)")
    check_selection_fits(selection, model.config)
    _, masked_message = masked_layer_report(selection, allow_unmasked=config.allow_unmasked)
    if config.safe_ratio == 1 and selection.masked_layers:
        masked_message += "; but --safe-ratio 1 leaves no jailbreak sample in the batches, so the mask never applies"
    dataset = SFTDataset(frame, tokenizer, config.max_length)  # (a tokenizer without a chat template fails here)
    batch_order = choose_batch_order(dataset, config.batch_size, config.safe_ratio, config.batch_order)
    slice_dtype = None if config.slice_dtype == "auto" else getattr(torch, config.slice_dtype)
    # what this run creates, removed again if it fails before training starts (a mistake leaves nothing behind)
    created = [path for path in (out, out / CHECKPOINT_DIR, selection_path, out / TRAINING_CONFIG_FILE)
               if not path.exists()]  # fmt: skip
    if main_process:
        print(masked_message, file=sys.stderr)
        if config.routing_stats and selection.masked_layers:
            print(ROUTING_METRICS, file=sys.stderr)
        out.mkdir(parents=True, exist_ok=True)
        selection.save(selection_path)

    try:
        # the one model-preparation path: the trainer moves the model to its device and calls prepare_model
        trainer = ExpertMaskingTrainer(
            model=model,
            args=training_args,
            train_dataset=dataset,
            data_collator=MaskedSFTCollator(tokenizer.pad_token_id),
            processing_class=tokenizer,
            callbacks=list(callbacks or []),
            selection=selection,
            slice_dtype=slice_dtype,
            memory_efficient=not config.stock_experts,
            backend=config.backend,
            safe_ratio=config.safe_ratio,
            batch_order=batch_order,
            loss_chunk_size=config.loss_chunk_size,
        )
        trainer._get_train_sampler()  # its checks (an analysis order no batch can keep) before anything trains
        if config.routing_stats:
            import moe_fastmask as mf

            trainer.routing_recorder = mf.RoutingRecorder(model, num_groups=2)
            stats_callback = RoutingStatsCallback(trainer.routing_recorder, selection)
            # first, so that the loggers after it see the routing shares
            trainer.callback_handler.callbacks.insert(0, stats_callback)
        checkpointed: list[int] = []
        if config.gradient_checkpointing:
            first = min(selection.by_layer()) if selection.experts else 0
            checkpointed = enable_gradient_checkpointing(model, config.checkpoint_layers, first)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        run_config = {
            "arguments": dataclasses.asdict(config),
            "base_model": str(Path(config.model).resolve()) if Path(config.model).exists() else config.model,
            "sft": str(paths["sft"].resolve()),
            "risk_table": str(risk_table.resolve()) if risk_table else None,
            "split_file": str(paths["split"].resolve()) if paths["split"] else None,
            "data_path": split["data_path"] if split else None,
            "split_sha256": artifacts.file_sha256(paths["split"]) if paths["split"] else None,
            # what evaluation must never count as held out, by content (ids can be renumbered, splits redrawn)
            "trained_records": _trained_records(frame, split),
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
    except BaseException:
        if main_process:
            _remove_created(created)
        raise

    if config.overwrite and main_process:  # only now: a run that fails to set up leaves the earlier one intact
        _delete_earlier_run(out)
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
    return add_subcommand(subparsers, "train")


def config_from_args(args: argparse.Namespace) -> MaskedFinetuneArguments:
    """The ``train`` settings from parsed command-line arguments."""
    return dataclass_from_args(MaskedFinetuneArguments, args)


def run_cli(args: argparse.Namespace) -> int:
    """Run ``moe-fastmask train`` from parsed arguments; returns the exit status."""
    from moe_fastmask.pipeline import distributed
    from moe_fastmask.pipeline import train as package

    try:
        # the package's ``train``: the name users see (and may wrap) is the one the command runs
        result = package.train(config_from_args(args))
    except (ValueError, FileNotFoundError, UnsupportedModelError, UnsupportedExpertLayoutError) as error:
        print(f"moe-fastmask train: error: {error}", file=sys.stderr)
        return 2
    finally:
        distributed.teardown(owned_only=False)  # the group accelerate created for the Trainer
    if distributed.launched_rank() == 0:  # under a launcher, one process reports
        print(f"final model: {result.final_model}")
        print(f"selection: {result.out / SELECTION_FILE} ({len(result.selection)} experts, "
              f"masked layers {result.selection.masked_layers})")
    return 0


__all__ = ["DESCRIPTION", "TrainResult", "add_cli_arguments", "build_selection", "config_from_args", "run_cli", "train"]
