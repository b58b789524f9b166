"""``moe-fastmask evaluate``: refusal rate and attack success rate before vs after the repair, and with steering.

For every held-out record (``--split test`` of the analysis split file, so evaluation never sees a record that the
analysis or the fine-tuning used) two prompts are generated for, greedily:

* ``jailbreak`` — the jailbreak chat (``all_prompt``), the attack the repair targets;
* ``goal`` — the plain goal under the system prompt, which a safe model refuses as well.

Each answer is judged by a refusal judge (the offline keyword judge :func:`moe_fastmask.pipeline.judge.is_refusal`,
a list of refusal phrases, unless another ``str -> bool`` callable is given). Attack success rate = 1 - refusal rate
(all prompts are harmful). The output and ``evaluation.md`` say both after the table.

Conditions, the columns of the table:

* ``before`` — the base model (``--base-model``);
* ``steering`` — the base model with the selected experts (``--selection``) switched off for every token at
  inference time, no training (``set_expert_mask`` with the selection's experts False, one group for all tokens);
  a layer with more than ``num_experts - top_k`` selected experts is steered with its ``num_experts - top_k``
  highest-scoring ones (checked before any generation, and said);
* ``after`` — the fine-tuned model (``--model``).

Given only ``--model`` of a training run (``OUT/final_model``), the base model, the selection and the split file
are read from the run's ``training_config.json``. Writes ``evaluation.json`` (rates, counts, settings),
``evaluation.md`` (the table) and ``answers.jsonl`` (every prompt, answer and verdict) to ``--out``.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import importlib
import importlib.util
import json
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from moe_fastmask.pipeline import artifacts
from moe_fastmask.pipeline.cli_args import add_subcommand, dataclass_from_args
from moe_fastmask.pipeline.common import DTYPES, SELECTION_FILE, TRAINING_CONFIG_FILE
from moe_fastmask.pipeline.generation import (
    COMPILE_CHOICES,
    DEFAULT_BACKEND,
    backend_names,
    check_engine_compile,
    engine_options,
)

CONDITIONS = ("before", "steering", "after")
KINDS = ("jailbreak", "goal")


@dataclass
class EvaluationArguments:
    """Settings of ``moe-fastmask evaluate`` (each field is the flag ``--foo-bar``; the old ``--foo_bar`` spelling is
    still accepted, see :mod:`moe_fastmask.pipeline.cli_args`)."""

    data: str = field(metadata={"help": "records file (JSON list of {id, goal, all_prompt, judge_success_gpt4})"})
    model: str | None = field(default=None, metadata={
        "help": "fine-tuned model ('after'), e.g. OUT/final_model",
        "aliases": ["--model_name", "--model-name", "--model_name_or_path"]})
    base_model: str | None = field(
        default=None, metadata={"help": "model before the repair ('before', and 'steering'); default: from the run"}
    )
    selection: str | None = field(
        default=None, metadata={"help": "expert_selection.json for the 'steering' column; default: from the run"}
    )
    split_file: str | None = field(default=None, metadata={"help": "split_<slug>.json; default: from the run"})
    split: str = field(
        default="test",
        metadata={"help": "records to evaluate: test (held out), train, or all", "choices": ["test", "train", "all"]},
    )
    out: str | None = field(default=None, metadata={"help": "output directory (default: MODEL/../evaluation)"})
    steering: bool = field(
        default=True,
        metadata={"help": "add the steering column when a selection is known",
                  "negative_help": "leave out the steering column (the base model with the selected experts off)"},
    )
    device: str | None = field(default=None, metadata={"help": "cuda or cpu (default: cuda if available)"})
    dtype: str = field(
        default="auto",
        metadata={"help": "auto: bfloat16 on cuda, float32 on cpu", "choices": list(DTYPES)},
    )
    batch_size: int = field(default=8, metadata={"help": "prompts per generate call"})
    max_new_tokens: int = field(default=128, metadata={"help": "tokens generated per answer (greedy)"})
    system_prompt: str | None = field(
        default=None, metadata={"help": "system message of the goal prompts (default: the analysis default, "
                                "'You are a helpful assistant.'; the one used is saved in evaluation.json)"}
    )
    limit: int | None = field(default=None, metadata={"help": "evaluate only the first N records of the split (default: all of them)"})
    judge: str | None = field(
        default=None, metadata={"help": "refusal judge 'module:function' or 'file.py:function' (str -> bool; default: the keyword "
                                "judge, moe_fastmask.pipeline.judge)"}
    )
    backend: str = field(
        default="auto",
        metadata={"help": "router op backend for steering (auto: on cuda the CUDA kernel where it builds, else "
                  "triton; on cpu the C++ kernel, else the PyTorch reference)",
                  "choices": ["auto", "triton", "cpp", "torch"]},
    )
    engine: str = field(
        default=DEFAULT_BACKEND,
        metadata={"help": "generation backend (moe_fastmask.pipeline.generation)", "choices": list(backend_names())},
    )
    engine_compile: str = field(
        default="auto",
        metadata={"help": "torch.compile the decode step of --engine graph: auto = on CUDA where torch.compile works and "
                  "the run decodes enough to repay the compile (about 6 M prompt x new-token steps), never on CPU", "choices": list(COMPILE_CHOICES)},
    )
    progress: bool = field(
        default=True,
        metadata={"help": "show progress bars and the step messages", "negative": "--no-progress",
                  "negative_help": "no progress bars or step messages (the table and the written files are printed)"},
    )

    def __post_init__(self) -> None:
        check_engine_compile(self.engine, self.engine_compile)
        for name in ("batch_size", "max_new_tokens", "limit"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be >= 1 (--{name.replace('_', '-')}), got {value!r}")


@dataclass
class EvaluationResult:
    """What :func:`evaluate` returns: the per-condition summary, every answer, the markdown table, the settings and
    the files written."""
    summary: Any  # DataFrame: condition, kind, n, refusals, refusal_rate, attack_success_rate
    answers: Any  # DataFrame: condition, kind, id, prompt, answer, refusal
    table: str  # markdown: the table, then how refusal was judged
    settings: dict
    paths: dict[str, Path] = field(default_factory=dict)

    def rates(self) -> dict[str, dict[str, dict[str, float]]]:
        """``{condition: {kind: {"n", "refusals", "refusal_rate", "attack_success_rate"}}}``."""
        out: dict[str, dict[str, dict[str, float]]] = {}
        for row in self.summary.itertuples(index=False):
            out.setdefault(row.condition, {})[row.kind] = {
                "n": int(row.n),
                "refusals": int(row.refusals),
                "refusal_rate": float(row.refusal_rate),
                "attack_success_rate": float(row.attack_success_rate),
            }
        return out


# --------------------------------------------------------------------------------------------------------------
# Pieces
# --------------------------------------------------------------------------------------------------------------


def load_judge(spec: str | Callable[[str], bool] | None) -> Callable[[str], bool]:
    """A judge from a callable, ``None`` (the offline keyword judge), ``"module:attr"`` or ``"path.py:attr"``."""
    from moe_fastmask.pipeline.judge import resolve_judge

    if spec is None or callable(spec):
        return resolve_judge(spec)
    if ":" not in spec:
        raise ValueError(f"--judge must look like 'module:function' or 'file.py:function', got {spec!r}")
    target, attr = spec.rsplit(":", 1)
    if not target or not attr:
        raise ValueError(f"--judge must look like 'module:function' or 'file.py:function', got {spec!r}")
    if target.endswith(".py"):
        module_spec = importlib.util.spec_from_file_location(Path(target).stem, target)
        if module_spec is None or module_spec.loader is None or not Path(target).is_file():
            raise ValueError(f"--judge {spec!r}: no judge file {target!r}")
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(target)
        except (ImportError, ValueError) as error:
            raise ValueError(f"--judge {spec!r}: cannot import {target!r} ({error})") from error
    if not hasattr(module, attr):
        raise ValueError(f"--judge {spec!r}: {target!r} has no {attr!r}")
    if not callable(getattr(module, attr)):
        raise ValueError(f"--judge {spec!r}: {attr!r} is not a function (str -> bool) but {getattr(module, attr)!r:.60}")
    return resolve_judge(getattr(module, attr))


def run_settings(model: str | None) -> dict | None:
    """The ``training_config.json`` of the run that produced ``model`` (in its directory or the parent), or None."""
    if model is None:
        return None
    path = Path(model)
    for directory in (path, path.parent):
        candidate = directory / TRAINING_CONFIG_FILE
        if candidate.is_file():
            return json.loads(candidate.read_text())
    return None


def resolve_arguments(args: EvaluationArguments) -> EvaluationArguments:
    """Fill ``base_model``, ``selection`` and ``split_file`` from the training run of ``model`` where not given."""
    args = dataclasses.replace(args)
    run = run_settings(args.model)
    if run:
        args.base_model = args.base_model or run.get("base_model")
        if args.selection is None:
            local = Path(args.model) / SELECTION_FILE
            args.selection = str(local) if local.is_file() else run.get("selection_file")
        args.split_file = args.split_file or run.get("split_file")
    if args.model is None and args.base_model is None:
        raise ValueError("give --model (after) and/or --base-model (before)")
    return args


def evaluation_records(
    data: str, split: str, split_file: str | None, limit: int | None = None, trained: dict[str, str] | None = None,
):
    """The records to evaluate: the ``split`` ids of ``split_file`` (``all``: every record), in file order.

    For ``split="test"`` a record whose content (goal and jailbreak chat) is a training record is left out with a
    warning: a train record of the split file, or one of ``trained`` (record id -> :func:`record_fingerprint`, from
    the model's ``training_config.json``). So a data file re-exported with other ids, or a split redrawn since the
    model was trained, never puts training records into the held-out numbers.
    """
    from moe_fastmask.pipeline.data import load_records, load_split, select_records

    records = load_records(data)
    if split != "all":
        if split_file is None:
            raise ValueError(
                f"--split {split} needs the analysis split file (split_<slug>.json) so that evaluation never sees "
                "training records; pass --split-file, or --split all to evaluate every record"
            )
        chosen = load_split(split_file)
        ids = chosen[f"{split}_ids"]
        drawn_on = chosen.get("data_sha256")
        if drawn_on and drawn_on != artifacts.file_sha256(data):
            warnings.warn(f"{data} is not the file the split {split_file} was drawn on ({chosen['data_path']}, "
                          "since changed or re-exported): matching by record id", stacklevel=2)
        elif Path(chosen["data_path"]).resolve() != Path(data).resolve():
            warnings.warn(f"the split was drawn on {chosen['data_path']}, evaluating {data}: matching by record id",
                          stacklevel=2)
        records = select_records(records, ids)
        missing = len(set(ids)) - len(records)
        if missing:
            warnings.warn(f"{missing} {split} ids of {split_file} are not in {data}", stacklevel=2)
        if split == "test":
            records = _without_training_records(records, chosen, trained, data)
    if limit is not None:
        records = records[:limit]
    if not records:
        raise ValueError(f"no records to evaluate (split {split!r})")
    return records


def _without_training_records(records, split: dict, trained: dict[str, str] | None, data: str):
    """``records`` less those whose content is a training record (of the split, or of the trained model)."""
    from moe_fastmask.pipeline.data import record_fingerprint

    training: set[str] = set((trained or {}).values())
    fingerprints = split.get("fingerprints")
    if isinstance(fingerprints, dict):
        training.update(fingerprints[str(i)] for i in split["train_ids"] if str(i) in fingerprints)
    if not training:
        return records
    leaked = [record.id for record in records if record_fingerprint(record) in training]
    left_out = set(leaked)
    if leaked:
        shown = ", ".join(str(i) for i in leaked[:10]) + (", ..." if len(leaked) > 10 else "")
        warnings.warn(
            f"{len(leaked)} held-out records of {data} have the goal and jailbreak chat of a training record (ids "
            f"{shown}): left out of the evaluation. The split file or the data changed since training, or the data "
            "holds duplicates", stacklevel=3,
        )
    return [record for record in records if record.id not in left_out]


def build_prompts(records, tokenizer, system_prompt: str | None = None) -> list[dict]:
    """Two rendered prompts per record: ``jailbreak`` (the jailbreak chat) and ``goal`` (the plain goal)."""
    from moe_fastmask.pipeline.data import DEFAULT_SYSTEM_PROMPT, render_prompt, safe_messages, unsafe_messages

    system = DEFAULT_SYSTEM_PROMPT if system_prompt is None else system_prompt
    prompts = []
    for record in records:
        prompts.append({"kind": "jailbreak", "id": record.id, "prompt": render_prompt(tokenizer, unsafe_messages(record))})
        prompts.append({"kind": "goal", "id": record.id, "prompt": render_prompt(tokenizer, safe_messages(record, system))})
    return prompts


def generate_answers(
    model, tokenizer, prompts: Sequence[str], *, batch_size: int = 8, max_new_tokens: int = 128, backend=None,
    engine: str = DEFAULT_BACKEND, progress: bool = True,
) -> list[str]:
    """Greedy answers to rendered prompts, in batches of ``batch_size`` (prompts sorted by length to pad less).

    ``backend``: the generation backend to use (default: one of ``engine`` over ``model`` / ``tokenizer``, closed at
    the end). ``progress``: a progress bar over the batches.
    """
    from tqdm.auto import tqdm

    from moe_fastmask.pipeline.common import prepare_tokenizer
    from moe_fastmask.pipeline.generation import GenerationRequest, SamplingSettings, get_backend

    prepare_tokenizer(tokenizer)
    encoded = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
    answers: list[str] = [""] * len(prompts)
    if hasattr(model, "eval"):  # a transformers model (the vllm engine has no train mode)
        model.eval()
    own = backend is None
    if own:
        backend = get_backend(engine, model, tokenizer)
    sampling = SamplingSettings(max_new_tokens=max_new_tokens)
    if hasattr(backend, "plan_work"):  # lets compile="auto" weigh the compile against the decoding ahead
        backend.plan_work(len(prompts), max_new_tokens)
    try:
        for start in tqdm(range(0, len(order), batch_size), desc="generating", unit="batch", leave=False,
                          disable=not progress):
            chunk = order[start : start + batch_size]
            output = backend.generate(GenerationRequest(prompts=[encoded[i] for i in chunk], sampling=sampling))
            for i, text in zip(chunk, output.texts):
                answers[i] = text
    finally:
        if own:
            backend.close()
    return answers


def summarize(answers) -> Any:
    """Per condition and kind: ``n``, ``refusals``, ``refusal_rate``, ``attack_success_rate`` (= 1 - refusal rate)."""
    import pandas as pd

    rows = []
    for (condition, kind), group in answers.groupby(["condition", "kind"], sort=False):
        n = len(group)
        refusals = int(group["refusal"].sum())
        rows.append(
            {
                "condition": condition,
                "kind": kind,
                "n": n,
                "refusals": refusals,
                "refusal_rate": refusals / n,
                "attack_success_rate": 1.0 - refusals / n,
            }
        )
    frame = pd.DataFrame(rows, columns=["condition", "kind", "n", "refusals", "refusal_rate", "attack_success_rate"])
    order = {c: i for i, c in enumerate(CONDITIONS)}
    kinds = {k: i for i, k in enumerate(KINDS)}
    return frame.sort_values(by=["condition", "kind"], key=lambda s: s.map({**order, **kinds})).reset_index(drop=True)


def markdown_table(summary) -> str:
    """Rows: kind x metric; columns: the conditions present (before, steering, after)."""
    conditions = [c for c in CONDITIONS if c in set(summary["condition"])]
    header = "| prompts | metric | " + " | ".join(conditions) + " |"
    lines = [header, "|" + "---|" * (2 + len(conditions))]
    for kind in [k for k in KINDS if k in set(summary["kind"])]:
        cells = {row.condition: row for row in summary[summary["kind"] == kind].itertuples(index=False)}
        n = next(iter(cells.values())).n
        for label, column in (("refusal rate", "refusal_rate"), ("attack success rate", "attack_success_rate")):
            values = [f"{100 * getattr(cells[c], column):.1f}%" if c in cells else "-" for c in conditions]
            lines.append(f"| {kind} (n={n}) | {label} | " + " | ".join(values) + " |")
    return "\n".join(lines) + "\n"


def judge_description(judge: Callable[[str], bool]) -> str:
    """One line on how answers are judged, for the output and ``evaluation.md``."""
    from moe_fastmask.pipeline.judge import REFUSAL_MARKERS, judge_name

    name = judge_name(judge)
    if name == "moe_fastmask.pipeline.judge.is_refusal":
        how = (f"a keyword list ({name}: an answer containing one of {len(REFUSAL_MARKERS)} refusal phrases of "
               f"GCG/HarmBench and Arditi et al., or an empty answer, is a refusal)")  # fmt: skip
    else:
        how = name
    return (f"Refusal is judged by {how}; attack success rate = 1 - refusal rate (every prompt asks for something "
            f"harmful).")  # fmt: skip


def _free_memory() -> None:
    """Collect the model just dropped (its modules hold reference cycles) and return its CUDA memory."""
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------------------------------------------
# The whole run
# --------------------------------------------------------------------------------------------------------------


def evaluate(args: EvaluationArguments, *, judge: Callable[[str], bool] | None = None, progress: bool = True) -> EvaluationResult:
    """Generate, judge and tabulate every condition that the arguments allow; write the outputs to ``args.out``.

    ``progress`` (and ``args.progress``): progress bars and step messages (``False`` also hides transformers' bars)."""
    from moe_fastmask.pipeline.common import library_progress_bars

    progress = progress and args.progress
    with library_progress_bars(progress):
        return _evaluate(args, judge=judge, progress=progress)


def _evaluate(args: EvaluationArguments, *, judge: Callable[[str], bool] | None, progress: bool) -> EvaluationResult:
    import pandas as pd

    import torch

    import moe_fastmask as mf
    from moe_fastmask.pipeline.common import resolve_device, resolve_dtype
    from moe_fastmask.pipeline.data import DEFAULT_SYSTEM_PROMPT
    from moe_fastmask.pipeline.generation import get_backend, load_model
    from moe_fastmask.pipeline.judge import judge_name
    from moe_fastmask.pipeline.preflight import check_device, check_paths
    from moe_fastmask.pipeline.selection import ExpertSelection, check_selection_fits, steering_experts

    args = resolve_arguments(args)
    out = Path(args.out) if args.out else Path(args.model or args.base_model).parent / "evaluation"
    if args.out is None and not Path(args.model or args.base_model).exists():
        out = Path("evaluation")
    check_paths(out, model=args.model, base_model=args.base_model)
    check_device(args.device)
    if args.selection and args.steering and not Path(args.selection).is_file():
        raise ValueError(f"--selection {args.selection!r} does not exist")
    judge_fn = load_judge(judge if judge is not None else args.judge)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    training_run = run_settings(args.model) or {}
    if (training_run.get("split_sha256") and args.split_file and Path(args.split_file).is_file()
            and artifacts.file_sha256(args.split_file) != training_run["split_sha256"]):
        warnings.warn(f"--split-file {args.split_file} changed since {args.model} was trained (the analysis was "
                      "rerun?): records it trained on are left out of the held-out set by content")
    records = evaluation_records(
        args.data, args.split, args.split_file, args.limit, trained=training_run.get("trained_records"),
    )
    selection = ExpertSelection.load(args.selection) if (args.selection and args.steering) else None
    system_prompt = DEFAULT_SYSTEM_PROMPT if args.system_prompt is None else args.system_prompt

    def say(message: str) -> None:
        if progress:
            print(message, file=sys.stderr)

    steered, steering_note = steering_experts(selection) if selection is not None else ([], None)
    if steering_note and args.base_model is not None:
        say(steering_note)

    frames = []

    def answer_condition(condition: str, model, tokenizer, backend) -> None:
        prompts = build_prompts(records, tokenizer, system_prompt)
        say(f"[{condition}] generating {len(prompts)} answers")
        texts = generate_answers(
            model, tokenizer, [p["prompt"] for p in prompts], batch_size=args.batch_size,
            max_new_tokens=args.max_new_tokens, backend=backend, progress=progress,
        )
        frame = pd.DataFrame(prompts)
        frame.insert(0, "condition", condition)
        frame["answer"] = texts
        frame["refusal"] = [bool(judge_fn(text)) for text in texts]
        frames.append(frame)

    if args.base_model is not None:
        if selection is not None:  # from the model's config, before anything loads (whatever the engine)
            from transformers import AutoConfig

            try:
                base_config = AutoConfig.from_pretrained(args.base_model)
            except OSError:
                base_config = None  # (loading reports it)
            if base_config is not None:
                check_selection_fits(selection, base_config, str(args.selection), str(args.base_model))
        model, tokenizer = load_model(args.engine, args.base_model, device, dtype)
        options = engine_options(args.engine, args.engine_compile, op_backend=args.backend)
        backend = get_backend(args.engine, model, tokenizer, **options)
        answer_condition("before", model, tokenizer, backend)
        if selection is not None:
            keep = torch.ones(selection.num_layers, 1, selection.num_experts, dtype=torch.bool)
            for layer, expert in map(mf.parse_layer_expert, steered):
                keep[layer, 0, expert] = False  # steered: off for every token
            backend.set_expert_mask(keep)
            answer_condition("steering", model, tokenizer, backend)
        backend.close()
        del backend, model, tokenizer  # the only references: the "after" model loads into freed memory
        _free_memory()
    elif selection is not None:
        warnings.warn("no base model: the steering column needs --base-model")
    if args.model is not None:
        model, tokenizer = load_model(args.engine, args.model, device, dtype)
        options = engine_options(args.engine, args.engine_compile, op_backend=args.backend)
        backend = get_backend(args.engine, model, tokenizer, **options)
        answer_condition("after", model, tokenizer, backend)
        backend.close()
        del backend, model, tokenizer
        _free_memory()

    answers = pd.concat(frames, ignore_index=True)
    summary = summarize(answers)
    description = judge_description(judge_fn)
    table = markdown_table(summary) + "\n" + description + "\n"
    settings = {
        "data": str(Path(args.data).resolve()),
        "split": args.split,
        "split_file": str(Path(args.split_file).resolve()) if args.split_file else None,
        "records": len(records),
        "record_ids": [record.id for record in records],
        "base_model": args.base_model,
        "model": args.model,
        "selection": args.selection if selection is not None else None,
        "num_steered_experts": len(steered) if selection is not None and args.base_model is not None else 0,
        "steered_experts": steered if selection is not None and args.base_model is not None else [],
        "steering_note": steering_note if args.base_model is not None else None,
        "judge": judge_name(judge_fn),
        "judge_description": description,
        "max_new_tokens": args.max_new_tokens,
        "system_prompt": system_prompt,
        "device": device,
        "dtype": dtype,
        # the default engine adds no key: its evaluation.json stays as it was before engines existed
        **({"engine": args.engine} if args.engine != DEFAULT_BACKEND else {}),
    }
    result = EvaluationResult(summary=summary, answers=answers, table=table, settings=settings)
    result.paths = {
        "json": artifacts.atomic_write_json(out / "evaluation.json", {"settings": settings, "results": result.rates()}),
        "table": artifacts.atomic_write_text(out / "evaluation.md", table),
        "answers": artifacts.atomic_write_text(
            out / "answers.jsonl", "".join(json.dumps(row) + "\n" for row in answers.to_dict(orient="records"))
        ),
    }
    return result


# --------------------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------------------


def add_cli_arguments(subparsers) -> argparse.ArgumentParser:
    """Add the ``evaluate`` subcommand (its flags come from :class:`EvaluationArguments`)."""
    return add_subcommand(subparsers, "evaluate")


def run_cli(args: argparse.Namespace) -> int:
    """Run ``moe-fastmask evaluate`` from parsed arguments; returns the exit status."""
    from moe_fastmask.integrations.registry import UnsupportedModelError

    try:
        result = evaluate(dataclass_from_args(EvaluationArguments, args))
    except (ValueError, ImportError, FileNotFoundError, UnsupportedModelError) as error:
        print(f"moe-fastmask evaluate: error: {error}", file=sys.stderr)
        return 2
    print(result.table, end="")
    print(f"written: {', '.join(str(p) for p in result.paths.values())}")
    return 0


__all__ = [
    "EvaluationArguments",
    "EvaluationResult",
    "add_cli_arguments",
    "build_prompts",
    "evaluate",
    "evaluation_records",
    "generate_answers",
    "judge_description",
    "load_judge",
    "markdown_table",
    "summarize",
]
