"""``moe-fastmask analyze``: which experts fire more on jailbreak prompts than on the same goals asked plainly.

The flow (each step is an importable function, for notebooks):

1. :func:`prepare_batches` — load and validate the records, draw the seeded train/test split, cut the train records
   into mixed safe/unsafe batches (:mod:`moe_fastmask.pipeline.batching`; paired at ``safe_ratio=0.5``).
2. :func:`process_mixed_batches` — per batch, greedy (or sampled) batched generation through the generation
   backend of ``engine`` (:mod:`moe_fastmask.pipeline.generation`; ``hf``: ``generate`` with left padding under a
   :class:`moe_fastmask.RoutingRecorder`; ``graph``: the static-cache CUDA-graph engine), several method batches
   packed into one request (``gpu_batch_size``; each (batch, kind) its own counting group, so every batch's results
   are those it gives alone): per-group expert counts per phase, each token's chosen experts as uint8
   ids (never router logits); the refusal judge labels each answer, and the optional pair filter keeps only pairs
   where the plain goal was refused and the jailbreak was not.
3. :func:`risk_diff_per_batch` — per batch and (layer, expert):
   ``a_safe, a_unsafe, d_safe, d_unsafe, a_safe_n, a_unsafe_n, risk_diff = a_unsafe_n - a_safe_n``.
4. :func:`aggregate_risk_diffs` (from :mod:`~moe_fastmask.pipeline.stats`) — mean over batches, summed counts,
   spread.
5. :func:`build_sft_dataset`, artifacts and plots; :func:`run_analysis` runs it all, persisting each batch as it
   finishes, so the same command resumes after a crash and ends with the same artifacts.

Which tokens count (``count_tokens``): ``"generated"`` (default) — each generated token that is fed back to the
model, up to but excluding the sequence's first EOS; ``"prompt"`` — the prompt tokens (never padding);
``"all"`` — both.

The run reads top to bottom in the order it runs; what is not the run itself lives elsewhere: the generation
requests, their plan and the batch records in :mod:`~moe_fastmask.pipeline.analysis_requests`, generation in
:mod:`~moe_fastmask.pipeline.generation`, the statistics in :mod:`~moe_fastmask.pipeline.stats`, the batch plan in
:mod:`~moe_fastmask.pipeline.batching`, the files in :mod:`~moe_fastmask.pipeline.artifacts`. About 650 lines: the
resumable, multi-process run (:func:`run_analysis`) alone is about 180 and stays in one piece.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pandas as pd

from moe_fastmask.integrations.expert_slices import UnsupportedExpertLayoutError
from moe_fastmask.integrations.registry import UnsupportedModelError
from moe_fastmask.pipeline import artifacts, plots, stats
from moe_fastmask.pipeline.analysis_config import DEFAULT_REFUSAL_TEXT, AnalysisConfig
from moe_fastmask.pipeline.analysis_requests import (
    HostWorker,
    PendingRecords,
    generate_batch,
    generate_packed,
    pair_message,
    prepare_requests,
    request_plan,
    warm_plotting_imports,
)
from moe_fastmask.pipeline.artifacts import ConfigMismatchError, RunStore, model_slug
from moe_fastmask.pipeline.batching import Batch, BatchPlanError, check_batch_mix, plan_batches
from moe_fastmask.pipeline.common import (
    SAFE,
    library_progress_bars,
    load_model_and_tokenizer,
    plural,
    prepare_tokenizer,
    resolve_dtype,
)
from moe_fastmask.pipeline.data import DataValidationError, Record, load_records, make_split, select_records
from moe_fastmask.pipeline.generation import (
    DEFAULT_BACKEND,
    GenerationBackend,
    engine_options,
    get_backend,
    load_model,
)
from moe_fastmask.pipeline.judge import Judge, judge_name, resolve_judge
from moe_fastmask.pipeline.preflight import UsageError, check_device, check_paths, resolve_hub_model

SFT_COLUMNS = ["batch_idx", "position", "kind", "id", "messages", "response"]


class AnalysisError(RuntimeError):
    """The analysis cannot produce a result (e.g. no batch kept tokens of both groups)."""


@dataclass
class AnalysisResult:
    """What :func:`run_analysis` returns. ``timings``: seconds of this process's run, by part — ``total_s``;
    ``setup_s`` (records, split, resume, model load); ``prepare_s`` (chat rendering and tokenization);
    ``generate_s`` (in the backend's ``generate``; with the graph engine ``engine_prefill_s``, ``engine_decode_s``,
    ``engine_capture_s`` (compile and capture of the decode step) of it); ``host_s`` (splitting, judging, batch
    records, per-batch files: in the background, overlapping ``generate_s``, with ``config.overlap``) and
    ``host_wait_s`` (generation waiting for it); ``finalize_s`` (gathering, statistics, artifacts, plots)."""

    config: AnalysisConfig
    slug: str
    paths: dict[str, Path]
    split: dict
    batch_data_list: list[dict]
    per_batch: pd.DataFrame
    risk_diff: pd.DataFrame
    sft_dataset: pd.DataFrame
    timings: dict[str, float] = field(default_factory=dict)


def _say(config: AnalysisConfig, message: str) -> None:
    if config.verbose:
        from tqdm.auto import tqdm

        tqdm.write(message)


# ------------------------------------------------------------------------------------------------------------
# Step 1: records -> split -> batches
# ------------------------------------------------------------------------------------------------------------


def prepare_batches(config: AnalysisConfig) -> tuple[list[Record], dict, list[Batch]]:
    """Load the records, draw the split (over all records of the file), batch the train records.

    Returns ``(train_records, split, batches)``; ``only_successful`` filters the train records, not the split.
    """
    records = load_records(config.data)
    split = make_split(records, config.test_fraction, config.seed, config.data)
    train = select_records(records, split["train_ids"])
    if config.only_successful:
        train = [record for record in train if record.judge_success_gpt4 == 1]
    try:
        batches = plan_batches(train, config.batch_size, config.safe_ratio, config.num_batches, config.seed)
    except BatchPlanError as error:
        kept = [f"--test-fraction {config.test_fraction} holds out {len(split['test_ids'])} of {len(records)}"]
        if config.only_successful:
            kept.append("--only-successful keeps the records judged successful")
        raise BatchPlanError(f"{error} (the train records: {'; '.join(kept)})") from None
    return train, split, batches


# ------------------------------------------------------------------------------------------------------------
# Step 2: generation through the backend (the requests and records: moe_fastmask.pipeline.analysis_requests)
# ------------------------------------------------------------------------------------------------------------


def process_mixed_batches(
    model,
    tokenizer,
    batches: Sequence[Batch],
    config: AnalysisConfig | None = None,
    *,
    judge: Judge | None = None,
    backend: GenerationBackend | None = None,
    on_batch: Callable[[dict], None] | None = None,
    progress=None,
    timings: dict | None = None,
) -> list[dict]:
    """Run every batch through :func:`generate_batch`; returns one batch record per batch, in the order of ``batches``.

    ``backend``: the generation backend (default: ``config.engine`` over ``model`` / ``tokenizer``, closed at the
    end). ``on_batch`` is called with each finished batch record (:func:`run_analysis` persists it there).
    ``progress``: a tqdm bar to advance. ``timings``: a dict to add the seconds spent in each part to (see
    :class:`AnalysisResult`).

    Every prompt is rendered and tokenized once, up front. Several method batches go into one generation request
    (``config.gpu_batch_size`` sequences, see :func:`gpu_batch_size` and :func:`request_plan`;
    :mod:`~moe_fastmask.pipeline.generation.packing`): each (batch, kind) is its own counting group and every
    sequence keeps its own sampling seed, so each batch record is the one the batch gives alone. With
    ``config.overlap`` the host part of a request (splitting, judging, the batch records, ``on_batch``) runs in one
    background thread while the next request generates; records and files are the same, a failure there is raised
    here, and the batches finished before a failure (here or there) are still handed to ``on_batch``.
    """
    config = config or AnalysisConfig()
    judge = resolve_judge(judge if judge is not None else config.judge)
    times = {"prepare_s": 0.0, "generate_s": 0.0, "host_s": 0.0, "host_wait_s": 0.0}
    own = backend is None
    if own:
        options = engine_options(config.engine, config.engine_compile)
        if config.engine == "graph":
            options["time_phases"] = True  # one sync per GPU batch, for the prefill / decode split of the timings
            if config.gpu_batch_size is not None:
                options["max_batch_size"] = config.gpu_batch_size
        backend = get_backend(config.engine, model, tokenizer, **options)
    records: dict[int, dict] = {}
    # open except while the backend launches its prefill kernel by kernel: host work holding the GIL then would
    # delay every launch (the decode step's few graph replays do not mind)
    launching = threading.Event()
    launching.set()

    held = [0.0]  # seconds the background host work waited for a prefill to end (not host work)

    def deliver(made) -> None:
        for batch_data in made:
            if not launching.is_set():
                started = time.perf_counter()
                launching.wait()
                held[0] += time.perf_counter() - started
            if (message := pair_message(batch_data, config)) is not None:
                _say(config, message)
            if on_batch is not None:
                on_batch(batch_data)
            records[batch_data["batch_idx"]] = batch_data
            if progress is not None:
                progress.update(1)

    worker = HostWorker() if config.overlap else None
    listens = worker is not None and hasattr(backend, "on_phase")
    if listens:
        previous_hook = backend.on_phase
        backend.on_phase = lambda phase: launching.clear() if phase == "prefill" else launching.set()
    try:
        if worker is not None:
            worker.submit(warm_plotting_imports)  # the final plots' imports (about half a second), off the critical path
        started = time.perf_counter()
        prepared = prepare_requests(tokenizer, batches, config)
        times["prepare_s"] += time.perf_counter() - started
        plan, num_groups = request_plan(config, backend, batches, prepared)
        if hasattr(backend, "plan_work"):  # lets compile="auto" weigh the compile against the decoding ahead
            backend.plan_work(sum(len(batches[i].items) for chunk in plan for i in chunk), config.max_new_tokens)
        for chunk in plan:
            options = {"prepared": [prepared[i] for i in chunk], "defer": True}
            if num_groups is not None:
                options["num_groups"] = num_groups
            started = time.perf_counter()
            if len(chunk) == 1:
                result = generate_batch(backend, tokenizer, batches[chunk[0]], config, judge, **options)
            else:
                result = generate_packed(backend, tokenizer, [batches[i] for i in chunk], config, judge, **options)
            times["generate_s"] += time.perf_counter() - started
            for key, value in (getattr(backend, "last_timings", None) or {}).items():
                if key.endswith("_s"):
                    times[f"engine_{key}"] = times.get(f"engine_{key}", 0.0) + value
            if isinstance(result, PendingRecords):
                made = result.records
            else:  # records already made (a replaced generate_batch / generate_packed)
                made = (lambda ready: lambda: ready)(result if isinstance(result, list) else [result])
            if worker is None:
                started = time.perf_counter()
                deliver(made())
                times["host_s"] += time.perf_counter() - started
            else:
                times["host_wait_s"] += worker.submit(lambda made=made: deliver(made()))
    finally:
        launching.set()
        if worker is not None:  # the requests generated before a failure still reach on_batch
            times["host_wait_s"] += worker.close()
            times["host_s"] += worker.busy_s - held[0]
        if listens:
            backend.on_phase = previous_hook
        if own:
            backend.close()
        if timings is not None:
            for key, value in times.items():
                timings[key] = timings.get(key, 0.0) + value
    if worker is not None:
        worker.raise_failure()
    return [records[batch.batch_idx] for batch in batches]


# ------------------------------------------------------------------------------------------------------------
# Steps 3-4: statistics
# ------------------------------------------------------------------------------------------------------------


def risk_diff_per_batch(batch_data_list: Sequence[dict], config: AnalysisConfig | None = None) -> pd.DataFrame:
    """Per-batch statistics (:func:`moe_fastmask.pipeline.stats.batch_risk_diff`) of every batch, concatenated.

    A batch with no counted token in one group (e.g. no pair left by the filter) is left out, with a message.
    """
    frames = []
    for batch_data in batch_data_list:
        if batch_data["safe_tokens"] == 0 or batch_data["unsafe_tokens"] == 0:
            if config is None or config.verbose:
                print(
                    f"batch {batch_data['batch_idx']}: no counted tokens in the "
                    f"{'safe' if batch_data['safe_tokens'] == 0 else 'unsafe'} group; left out of the statistics",
                    file=sys.stderr,
                )
            continue
        frames.append(
            stats.batch_risk_diff(
                batch_data["safe_routings"],
                batch_data["unsafe_routings"],
                batch_data["safe_tokens"],
                batch_data["unsafe_tokens"],
                batch_data["batch_idx"],
            )
        )
    if not frames:
        return pd.DataFrame({column: pd.Series(dtype=float) for column in stats.PER_BATCH_COLUMNS})
    return pd.concat(frames, ignore_index=True)


aggregate_risk_diffs = stats.aggregate_risk_diffs  # step 4, with the other steps


# ------------------------------------------------------------------------------------------------------------
# Step 5: fine-tuning set
# ------------------------------------------------------------------------------------------------------------


def build_sft_dataset(batch_data_list: Sequence[dict], refusal_text: str = DEFAULT_REFUSAL_TEXT) -> pd.DataFrame:
    """The fine-tuning set: one row per counted prompt (``kept_indices``) of every batch.

    Columns ``batch_idx, position, kind, id, messages, response``. Safe rows: the prompt chat and the model's own
    answer. Unsafe rows: the jailbreak chat and, as target, the model's own answer to the paired plain goal when the
    judge says that answer is a refusal (and it is not empty), else ``refusal_text``.
    """
    rows = []
    for batch_data in batch_data_list:
        outputs = batch_data["batch_outputs"]
        safe_of = {u: s for s, u in batch_data["pairs"]}
        for position in batch_data["kept_indices"]:
            output = outputs[position]
            if output["kind"] == SAFE:
                response = output["generated_text"]
            else:
                paired = outputs[safe_of[position]] if position in safe_of else None
                usable = paired is not None and paired["refused"] and paired["generated_text"].strip()
                response = paired["generated_text"] if usable else refusal_text
            rows.append(
                {
                    "batch_idx": int(batch_data["batch_idx"]),
                    "position": int(position),
                    "kind": output["kind"],
                    "id": output["id"],
                    "messages": output["messages"],
                    "response": response,
                }
            )
    frame = pd.DataFrame(rows, columns=SFT_COLUMNS)
    return frame.astype({"batch_idx": np.int64, "position": np.int64})


# ------------------------------------------------------------------------------------------------------------
# The whole run
# ------------------------------------------------------------------------------------------------------------


def result_settings(config: AnalysisConfig, model_name: str, dtype: str) -> dict:
    """The settings that change the results — the run config written to disk and fingerprinted for resume."""
    model_path = Path(model_name).expanduser()
    return {
        "model": str(model_path.resolve()) if model_path.exists() else model_name,
        "data": str(Path(config.data).resolve()),
        "data_sha256": artifacts.file_sha256(config.data),
        "batch_size": config.batch_size,
        "safe_ratio": config.safe_ratio,
        "num_batches": config.num_batches,
        "seed": config.seed,
        "test_fraction": config.test_fraction,
        "only_successful": config.only_successful,
        "system_prompt": config.system_prompt,
        "max_new_tokens": config.max_new_tokens,
        "min_new_tokens": config.min_new_tokens,
        "temperature": config.temperature,
        "top_p": config.top_p,
        "count_tokens": config.count_tokens,
        "filter_pairs": config.filter_pairs,
        "refusal_text": config.refusal_text,
        "top_n": config.top_n,
        "keep_token_experts": config.keep_token_experts,
        "dtype": dtype,
        "judge": judge_name(config.judge),
        # the default engine adds no key, so that its runs keep the fingerprint they had before engines existed
        **({"engine": config.engine} if config.engine != DEFAULT_BACKEND else {}),
    }


def _counted_totals(batch_data_list: Sequence[dict]) -> np.ndarray:
    """``[batches, safe_tokens, unsafe_tokens, *safe_routings, *unsafe_routings]`` summed over the batches that enter
    the statistics (both groups counted) — what the aggregate table's count columns add up to."""
    used = [b for b in batch_data_list if b["safe_tokens"] > 0 and b["unsafe_tokens"] > 0]
    if not used:
        return np.zeros(3, dtype=np.int64)
    return np.concatenate([
        np.array([len(used), sum(b["safe_tokens"] for b in used), sum(b["unsafe_tokens"] for b in used)], np.int64),
        sum(b["safe_routings"] for b in used).reshape(-1).astype(np.int64),
        sum(b["unsafe_routings"] for b in used).reshape(-1).astype(np.int64),
    ])  # fmt: skip


def _check_reduced_counts(local: Sequence[dict], gathered: Sequence[dict], device: str) -> np.ndarray:
    """All-reduce each rank's counted totals and check them against those of the gathered batches."""
    import torch

    from moe_fastmask.pipeline import distributed

    expected = _counted_totals(gathered)
    mine = _counted_totals(local)
    if mine.shape != expected.shape:  # this rank counted nothing: zeros of the full size
        mine = np.zeros_like(expected)
    reduced = distributed.all_reduce_sum(torch.from_numpy(mine).to(device)).cpu().numpy()
    if not np.array_equal(reduced, expected):
        raise AnalysisError(
            "the batches gathered from the ranks do not add up to the counts the ranks reduced; the per-batch files "
            "are kept, rerun the same command to resume"
        )
    return reduced


def _write_once(write: Callable[[], object]) -> None:
    """``write()`` on rank 0 only; every rank waits for it and raises if it failed (a single process just writes)."""
    from moe_fastmask.pipeline import distributed

    if distributed.get_world_size() == 1:
        write()
        return
    failure = None
    if distributed.is_main_process():
        try:
            write()
        except Exception as error:  # noqa: BLE001 - re-raised below, and reported to the other ranks
            failure = error
    if distributed.any_rank(failure is not None):
        raise failure if failure is not None else AnalysisError("rank 0 could not write the artifacts (see its error)")


def run_analysis(config: AnalysisConfig, *, model=None, tokenizer=None) -> AnalysisResult:
    """Run the whole analysis and write the artifacts to ``config.out``; resumes a matching run found there.

    ``model`` / ``tokenizer``: an already loaded model (e.g. in a notebook or a benchmark); ``config.model`` then only
    names it (slug, fingerprint). Raises ``ValueError`` subclasses with clear messages for bad input
    (:class:`DataValidationError`, :class:`BatchPlanError`), :class:`ConfigMismatchError` for a directory holding
    another run, :class:`AnalysisError` when no batch keeps tokens of both groups.

    Several processes (``torchrun --nproc-per-node N``, ``accelerate launch``;
    :mod:`moe_fastmask.pipeline.distributed`): batch ``i`` is generated by rank ``i % N``, which saves it to its
    per-batch file as usual (so each rank resumes its own share); the batches are gathered in order on every rank,
    the counted totals all-reduced and checked against them, and rank 0 alone writes the final artifacts — the same
    content as a single-process run of the same config. Every rank returns the same result.
    """
    with library_progress_bars(config.progress and config.verbose):  # --no-progress / --quiet: theirs too
        return _run_analysis(config, model=model, tokenizer=tokenizer)


def _run_analysis(config: AnalysisConfig, *, model=None, tokenizer=None) -> AnalysisResult:
    from moe_fastmask.pipeline import distributed

    run_started = time.perf_counter()
    timings: dict[str, float] = {}
    model_given = model is not None  # then config.model only names it: no files to tie a resumed run to
    config = dataclasses.replace(config)
    config.validate()
    check_paths(config.out)  # an --out that cannot be a directory fails here, before the demo is built
    check_device(config.device)
    dist = distributed.setup(config.device)
    if not dist.is_main:
        config.verbose = config.progress = False
    if not config.verbose:  # --quiet
        config.progress = False
    if config.demo:
        from moe_fastmask.pipeline.demo import build_demo

        with distributed.main_process_first():
            model_dir, data_path = build_demo(config.out)
        config.model, config.data, config.demo = str(model_dir), str(data_path), False
    config.validate()
    if config.data is not None and not Path(config.data).exists():
        raise DataValidationError(f"data file {config.data!r} does not exist")
    if model is None:
        check_paths(model=config.model)  # before the run config and the split are written
        resolve_hub_model(config.model)  # a hub id that does not load fails here too

    device = dist.device
    dtype = resolve_dtype(config.dtype, device) if model is None else str(model.dtype).replace("torch.", "")
    slug = model_slug(config.model)
    out = Path(config.out)
    store = RunStore(out, slug)

    train, split, batches = prepare_batches(config)
    settings = result_settings(config, config.model, dtype)
    settings["model_slug"] = slug
    paths = store.final_paths()
    failure = None
    out_existed, fresh = out.exists(), not store.config_path.exists()
    if config.overwrite and model is None:
        # a model that does not load must not cost the run that --overwrite would delete: load it first
        model, tokenizer = load_model(config.engine, config.model, device, dtype)
        prepare_tokenizer(tokenizer)
    if dist.is_main:  # rank 0 binds the directory to the config; every rank gets its verdict
        try:
            identity = artifacts.model_identity(config.model) if not model_given else None
            store.prepare(settings, overwrite=config.overwrite, model_files=identity)
            artifacts.atomic_write_json(paths["split"], split)
        except Exception as error:  # noqa: BLE001 - re-raised on every rank below
            failure = error
    failure = distributed.broadcast_object(failure)
    if failure is not None:
        raise failure

    mine = [batches[i] for i in distributed.shard(len(batches), dist.rank, dist.world_size)]
    done = store.load_batches([batch.batch_idx for batch in mine])
    for batch in mine:
        batch_data = done.get(batch.batch_idx)
        if batch_data is not None and [o["id"] for o in batch_data["batch_outputs"]] != [
            item.record.id for item in batch.items
        ]:
            raise ConfigMismatchError(
                f"{store.batch_path(batch.batch_idx)} does not hold the planned batch {batch.batch_idx}; "
                f"use --overwrite to start over"
            )
    shares = (f"; {dist.world_size} processes, batch i on rank i % {dist.world_size}: rank 0 has {len(mine)}"
              if dist.enabled else "")  # fmt: skip
    unused = len(train) - len(batches) * max(check_batch_mix(config.batch_size, config.safe_ratio))
    unused_note = f", {plural(unused, 'record')} left over unused" if unused else ""
    _say(config, f"analyze {slug}: {len(train)} train records -> {plural(len(batches), 'batch')} of "
                 f"{config.batch_size} (safe_ratio {config.safe_ratio}{unused_note}){shares}; {len(done)} already "
                 f"done in {out}")
    for batch_idx in sorted(done):
        if (message := pair_message(done[batch_idx], config)) is not None:
            _say(config, message + " [resumed]")

    remaining = [batch for batch in mine if batch.batch_idx not in done]
    local = dict(done)
    failure = None
    saved_now: list[int] = []

    def save_batch(batch_data: dict) -> None:
        store.save_batch(batch_data)
        saved_now.append(batch_data["batch_idx"])

    try:
        if remaining:
            if model is None:
                model, tokenizer = load_model(config.engine, config.model, device, dtype)
            elif tokenizer is None:
                raise ValueError("pass the tokenizer together with the model")
            prepare_tokenizer(tokenizer)
            from tqdm.auto import tqdm

            timings["setup_s"] = time.perf_counter() - run_started
            with tqdm(total=len(mine), initial=len(done), desc="analyze", unit="batch",
                      disable=not config.progress) as bar:  # fmt: skip
                new = process_mixed_batches(
                    model, tokenizer, remaining, config, judge=config.judge, on_batch=save_batch, progress=bar,
                    timings=timings,
                )
            local.update((batch_data["batch_idx"], batch_data) for batch_data in new)
    except BaseException as error:
        if fresh and not done and not saved_now and not dist.enabled:
            # this run wrote only its config and split: a model that does not load, a tokenizer without a chat
            # template or an engine that fails to start leaves nothing behind (a rerun with other options is no
            # resume of a run that never produced a batch)
            store.clear()
            if not out_existed and not any(out.iterdir()):
                out.rmdir()
        if not dist.enabled:
            raise
        failure = error
    if distributed.any_rank(failure is not None):  # no rank waits forever for one that failed
        if failure is not None:
            raise failure
        raise AnalysisError(
            "another rank failed (see its error); the finished batches are saved, rerun the same command to resume"
        )
    finalize_started = time.perf_counter()
    timings.setdefault("setup_s", finalize_started - run_started)
    batch_data_list = distributed.gather_in_order(local, len(batches))
    if dist.enabled:
        totals = _check_reduced_counts(list(local.values()), batch_data_list, device)
        _say(config, f"{dist.world_size} ranks: {plural(int(totals[0]), 'batch')} counted, {totals[1]} safe and "
                     f"{totals[2]} unsafe "
                     f"tokens (all-reduced)")  # fmt: skip

    config_dict = {**settings, "fingerprint": artifacts.config_fingerprint(settings)}
    outputs = {"batch_data_list": batch_data_list, "config": config_dict}
    write_outputs = lambda: artifacts.atomic_pickle(paths["batch_outputs"], outputs)  # noqa: E731
    writing = None
    if distributed.get_world_size() == 1:
        from concurrent.futures import ThreadPoolExecutor

        writing = ThreadPoolExecutor(1)  # the largest file, written while the statistics are computed
        written = writing.submit(write_outputs)
    else:
        _write_once(write_outputs)
    try:
        passed = [sum(b["pair_passed"]) for b in batch_data_list]
        total = sum(len(b["pairs"]) for b in batch_data_list)
        if config.filter_pairs:
            _say(config, f"pair filter: {sum(passed)}/{total} pairs pass; per batch {passed}")

        per_batch = risk_diff_per_batch(batch_data_list, config)
        if per_batch.empty:
            raise AnalysisError(
                f"no batch kept counted tokens of both groups ({plural(len(batch_data_list), 'batch')}"
                + (f", {sum(passed)} pairs passed the filter" if config.filter_pairs else "")
                + "); nothing to aggregate. The generations are saved in "
                f"{paths['batch_outputs']}" + (
                    f"; try without --filter-pairs, with another --out or with --overwrite ({config.out} holds this "
                    "run's settings)" if config.filter_pairs else "")
            )
        table = stats.aggregate_risk_diffs(per_batch, top_n=config.top_n)
        sft = build_sft_dataset(batch_data_list, config.refusal_text)
    finally:
        if writing is not None:
            writing.shutdown(wait=True)
            written.result()  # its error, if the write failed

    def write_results() -> None:
        artifacts.atomic_pickle(paths["risk_diff"], table)
        artifacts.atomic_write_csv(paths["risk_diff_csv"], table)
        artifacts.atomic_pickle(paths["sft_dataset"], sft)
        plots.plot_heatmap(table, paths["heatmap"],
                           title=f"risk_diff, {slug} ({plural(per_batch['batch_idx'].nunique(), 'batch')})")
        plots.plot_top_experts(table, paths["top_experts"], n=min(20, len(table)))

    _write_once(write_results)  # every rank returns once the artifacts are on disk

    _say(config, f"top {min(10, len(table))} experts by risk_diff (mean over "
                 f"{plural(per_batch['batch_idx'].nunique(), 'batch')}):\n" + stats.format_top(table, 10))  # fmt: skip
    _say(config, "artifacts:\n" + "\n".join(f"  {path}" for path in paths.values()))
    timings["finalize_s"] = time.perf_counter() - finalize_started
    timings["total_s"] = time.perf_counter() - run_started
    return AnalysisResult(
        config=config, slug=slug, paths=paths, split=split, batch_data_list=batch_data_list,
        per_batch=per_batch, risk_diff=table, sft_dataset=sft, timings=timings,
    )  # fmt: skip


# ------------------------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------------------------


def add_cli_arguments(subparsers) -> argparse.ArgumentParser:
    """Add the ``analyze`` subcommand (its flags come from :class:`AnalysisConfig`) to the ``moe-fastmask`` parser."""
    from moe_fastmask.pipeline.cli_args import add_subcommand

    return add_subcommand(subparsers, "analyze")


def config_from_args(args: argparse.Namespace) -> AnalysisConfig:
    """The ``analyze`` settings from parsed command-line arguments."""
    from moe_fastmask.pipeline.cli_args import dataclass_from_args

    return dataclass_from_args(AnalysisConfig, args)


def run_cli(args: argparse.Namespace) -> int:
    """Run ``moe-fastmask analyze`` from parsed arguments; returns the exit status."""
    from moe_fastmask.pipeline import distributed

    try:
        run_analysis(config_from_args(args))
    except (ValueError, ImportError, ConfigMismatchError, AnalysisError, UnsupportedModelError,
            UnsupportedExpertLayoutError) as error:
        where = f" (rank {distributed.get_rank()})" if distributed.get_world_size() > 1 else ""
        print(f"moe-fastmask analyze: error{where}: {error}", file=sys.stderr)
        return 2
    finally:
        distributed.teardown()
    return 0


__all__ = [
    "AnalysisConfig",
    "AnalysisError",
    "AnalysisResult",
    "BatchPlanError",
    "ConfigMismatchError",
    "DataValidationError",
    "add_cli_arguments",
    "aggregate_risk_diffs",
    "build_sft_dataset",
    "generate_batch",
    "load_model_and_tokenizer",
    "prepare_batches",
    "process_mixed_batches",
    "risk_diff_per_batch",
    "run_analysis",
]
