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

One file of about 780 lines on purpose: the steps, the resumable (multi-process) run and the subcommand read top to
bottom in the order they run. What is not specific to the analysis lives elsewhere: generation in
:mod:`~moe_fastmask.pipeline.generation`, the statistics in :mod:`~moe_fastmask.pipeline.stats`, the batch plan in
:mod:`~moe_fastmask.pipeline.batching`, the files in :mod:`~moe_fastmask.pipeline.artifacts`.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pandas as pd

from moe_fastmask.pipeline import artifacts, plots, stats
from moe_fastmask.pipeline.analysis_config import COUNT_TOKENS, DEFAULT_REFUSAL_TEXT, AnalysisConfig
from moe_fastmask.pipeline.artifacts import ConfigMismatchError, RunStore, model_slug
from moe_fastmask.pipeline.batching import Batch, BatchPlanError, check_batch_mix, plan_batches
from moe_fastmask.pipeline.common import (
    DTYPES,
    NUM_GROUPS,
    SAFE,
    SAFE_GROUP,
    UNSAFE_GROUP,
    load_model_and_tokenizer,
    prepare_tokenizer,
    resolve_dtype,
)
from moe_fastmask.pipeline.data import (
    DEFAULT_SYSTEM_PROMPT,
    DataValidationError,
    Record,
    load_records,
    make_split,
    render_prompt,
    safe_messages,
    select_records,
    unsafe_messages,
)
from moe_fastmask.pipeline.generation import (
    DEFAULT_BACKEND,
    GenerationBackend,
    GenerationOutput,
    GenerationRequest,
    SamplingSettings,
    backend_names,
    engine_options,
    get_backend,
    load_model,
)
from moe_fastmask.pipeline.generation.packing import pack_requests, split_output
from moe_fastmask.pipeline.judge import Judge, judge_name, resolve_judge
from moe_fastmask.pipeline.preflight import UsageError, check_device, check_paths, resolve_hub_model

SFT_COLUMNS = ["batch_idx", "position", "kind", "id", "messages", "response"]
PHASES = ("prefill", "decode")


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
    batches = plan_batches(train, config.batch_size, config.safe_ratio, config.num_batches, config.seed)
    return train, split, batches


def _messages(item, system_prompt: str) -> list[dict]:
    return safe_messages(item.record, system_prompt) if item.kind == SAFE else unsafe_messages(item.record)


# ------------------------------------------------------------------------------------------------------------
# Step 2: generation through the backend (moe_fastmask.pipeline.generation)
# ------------------------------------------------------------------------------------------------------------


def _batch_seed(seed: int, batch_idx: int) -> int:
    # sampling seed of one batch: a resumed run draws the same tokens as an uninterrupted one
    return (seed * 1_000_003 + batch_idx) % (2**63)


def generation_request(
    tokenizer, batch: Batch, config: AnalysisConfig
) -> tuple[list[list[dict]], list[str], GenerationRequest]:
    """The chats, rendered prompts and :class:`GenerationRequest` of one mixed batch (groups 0 safe, 1 unsafe)."""
    return prepare_requests(tokenizer, [batch], config)[0]


def prepare_requests(
    tokenizer, batches: Sequence[Batch], config: AnalysisConfig
) -> list[tuple[list[list[dict]], list[str], GenerationRequest]]:
    """:func:`generation_request` of every batch, the prompts of all of them tokenized in one call (once per run:
    the generation loop then only generates)."""
    messages = [[_messages(item, config.system_prompt) for item in batch.items] for batch in batches]
    prompts = [[render_prompt(tokenizer, chat) for chat in chats] for chats in messages]
    flat = [prompt for batch_prompts in prompts for prompt in batch_prompts]
    token_ids = tokenizer(flat, add_special_tokens=False)["input_ids"] if flat else []
    prepared, start = [], 0
    for batch, chats, batch_prompts in zip(batches, messages, prompts):
        ids = token_ids[start : start + len(batch_prompts)]
        start += len(batch_prompts)
        prepared.append((chats, batch_prompts, _request(batch, config, ids)))
    return prepared


def _request(batch: Batch, config: AnalysisConfig, token_ids: list[list[int]]) -> GenerationRequest:
    sampling = SamplingSettings(
        max_new_tokens=config.max_new_tokens,
        min_new_tokens=config.min_new_tokens,
        do_sample=config.do_sample,
        temperature=config.temperature if config.do_sample else 1.0,
        top_p=config.top_p,
        seed=_batch_seed(config.seed, batch.batch_idx) if config.do_sample else None,
    )
    return GenerationRequest(
        prompts=token_ids, sampling=sampling, groups=batch.groups, num_groups=NUM_GROUPS,
        record_token_experts=config.keep_token_experts,
    )  # fmt: skip


def _group_sum(config: AnalysisConfig, per_phase: dict[str, np.ndarray]) -> np.ndarray:
    return sum(per_phase[phase] for phase in COUNT_TOKENS[config.count_tokens])


def _per_sample_counts(batch: Batch, output: GenerationOutput, group_counts: dict, group_tokens: dict) -> dict:
    """``sample_counts`` / ``sample_tokens`` per phase from the per-token experts, checked against the group counts."""
    token_experts = output.token_experts
    num_experts = group_counts["prefill"].shape[-1]
    groups = np.asarray(batch.groups)
    sample_counts, sample_tokens = {}, {}
    for phase in PHASES:
        sample_counts[phase], sample_tokens[phase] = stats.sample_counts(
            token_experts[phase], token_experts[f"{phase}_counted"], num_experts
        )
        if sample_counts[phase].shape[0] == 0:  # no forward of this phase ran (e.g. every row ended at once)
            sample_counts[phase] = np.zeros((len(batch.items), *group_counts[phase].shape[::2]), dtype=np.int64)
            sample_tokens[phase] = np.zeros(len(batch.items), dtype=np.int64)
        for g in (SAFE_GROUP, UNSAFE_GROUP):
            if not (np.array_equal(sample_counts[phase][groups == g].sum(0), group_counts[phase][:, g])
                    and sample_tokens[phase][groups == g].sum() == group_tokens[phase][g]):  # fmt: skip
                warnings.warn(
                    f"batch {batch.batch_idx}: the per-token experts and the {phase} counts of group {g} disagree "
                    f"(unfiltered batches use the group counts, filtered ones the per-token experts)",
                    RuntimeWarning,
                    stacklevel=3,
                )
    return {"sample_counts": sample_counts, "sample_tokens": sample_tokens, "token_experts": token_experts}


def generate_batch(
    backend: GenerationBackend, tokenizer, batch: Batch, config: AnalysisConfig, judge: Judge, **options
) -> dict | PendingRecords:
    """Generate one mixed batch through ``backend`` and return its batch record (host data only, numpy arrays).

    Keys: ``batch_idx``; ``batch_outputs`` (one dict per position: position, id, kind, messages, prompt,
    generated_text, refused, num_prompt_tokens, num_generated_tokens); ``safe_indices``, ``unsafe_indices``;
    ``pairs`` ((safe_pos, unsafe_pos) of each record in both forms), ``pair_passed`` (the pair filter's verdict,
    computed whether or not the filter is on), ``kept_indices`` (positions counted: every position, or the passing
    pairs with ``filter_pairs``); ``safe_routings``, ``unsafe_routings`` (int64 ``[L, E]`` counts of the kept
    tokens of each group, tokens chosen by ``count_tokens``) and ``safe_tokens``, ``unsafe_tokens``;
    ``group_counts`` / ``group_tokens`` (the backend's ``[L, 2, E]`` / ``[2]`` per phase, all positions);
    ``sample_counts`` / ``sample_tokens`` (``[B, L, E]`` / ``[B]`` per phase) and ``token_experts`` (uint8
    ``[B, T, L, K]`` ids + bool ``[B, T]`` counted, per phase) when ``keep_token_experts``. ``tokenizer`` renders
    and tokenizes the prompts. ``options``: those of :func:`generate_packed` (with ``defer``: the
    :class:`PendingRecords` of the one batch).
    """
    result = generate_packed(backend, tokenizer, [batch], config, judge, **options)
    return result if isinstance(result, PendingRecords) else result[0]


def generate_packed(
    backend: GenerationBackend, tokenizer, batches: Sequence[Batch], config: AnalysisConfig, judge: Judge, *,
    prepared: Sequence[tuple] | None = None, num_groups: int | None = None, defer: bool = False,
) -> list[dict] | PendingRecords:
    """Generate several method batches in one request (:mod:`~moe_fastmask.pipeline.generation.packing`: each
    (batch, kind) its own counting group) and return each batch's record, equal to :func:`generate_batch`'s.

    ``prepared``: the batches' :func:`prepare_requests` entries (default: rendered and tokenized here).
    ``num_groups``: count in this many groups (at least the packed ones; the extra stay empty), so that requests of
    fewer batches reuse the captured decode step of full ones. ``defer``: return the :class:`PendingRecords`
    instead (generated; judging and the records left to its ``finish()``).
    """
    if prepared is None:
        prepared = prepare_requests(tokenizer, batches, config)
    packed, layout = pack_requests([request for *_, request in prepared])
    if num_groups is not None and num_groups > packed.num_groups:
        packed = dataclasses.replace(packed, num_groups=num_groups)
    pending = PendingRecords(list(batches), list(prepared), backend.generate(packed), layout, config, judge)
    return pending if defer else pending.finish()


@dataclass
class PendingRecords:
    """A generated request whose host part is still to do: :meth:`finish` splits the output per method batch,
    judges the answers and builds the batch records (no GPU work: it can run while the next request generates)."""

    batches: list[Batch]
    prepared: list[tuple]
    output: GenerationOutput
    layout: object
    config: AnalysisConfig
    judge: Judge

    def finish(self) -> list[dict]:
        return list(self.records())

    def records(self):
        """The batch records one at a time (:meth:`finish` makes them all)."""
        outputs = split_output(self.output, self.layout)
        for batch, (messages, prompts, _), output in zip(self.batches, self.prepared, outputs):
            yield batch_record(batch, messages, prompts, output, self.config, self.judge)


def batch_record(
    batch: Batch, messages: list, prompts: list[str], output: GenerationOutput, config: AnalysisConfig, judge: Judge
) -> dict:
    """The batch record of :func:`generate_batch` from one method batch's generation output."""
    group_counts = {"prefill": output.prefill_counts, "decode": output.decode_counts}
    group_tokens = {"prefill": output.prefill_tokens, "decode": output.decode_tokens}

    record: dict = {"batch_idx": batch.batch_idx}
    if config.keep_token_experts:
        record.update(_per_sample_counts(batch, output, group_counts, group_tokens))

    refused = [bool(judge(text)) for text in output.texts]
    pairs = batch.pairs()
    pair_passed = [refused[s] and not refused[u] for s, u in pairs]
    if config.filter_pairs:
        kept = sorted([p for (s, u), ok in zip(pairs, pair_passed) if ok for p in (s, u)])
        kept_arr = np.zeros(len(batch.items), dtype=bool)
        kept_arr[kept] = True
        groups = np.asarray(batch.groups)
        per_sample = _group_sum(config, record["sample_counts"])
        per_sample_tokens = _group_sum(config, record["sample_tokens"])
        safe_routings = per_sample[kept_arr & (groups == SAFE_GROUP)].sum(0)
        unsafe_routings = per_sample[kept_arr & (groups == UNSAFE_GROUP)].sum(0)
        safe_tokens = int(per_sample_tokens[kept_arr & (groups == SAFE_GROUP)].sum())
        unsafe_tokens = int(per_sample_tokens[kept_arr & (groups == UNSAFE_GROUP)].sum())
    else:
        kept = [item.position for item in batch.items]
        counts = _group_sum(config, group_counts)
        tokens = _group_sum(config, group_tokens)
        safe_routings, unsafe_routings = counts[:, SAFE_GROUP], counts[:, UNSAFE_GROUP]
        safe_tokens, unsafe_tokens = int(tokens[SAFE_GROUP]), int(tokens[UNSAFE_GROUP])

    record.update(
        batch_outputs=[
            {
                "position": item.position,
                "id": item.record.id,
                "kind": item.kind,
                "messages": chat,
                "prompt": prompt,
                "generated_text": text,
                "refused": flag,
                "num_prompt_tokens": int(n_prompt),
                "num_generated_tokens": int(n_generated),
            }
            for item, chat, prompt, text, flag, n_prompt, n_generated in zip(
                batch.items, messages, prompts, output.texts, refused, output.num_prompt_tokens,
                output.num_generated_tokens,
            )
        ],
        safe_indices=batch.safe_indices,
        unsafe_indices=batch.unsafe_indices,
        pairs=pairs,
        pair_passed=pair_passed,
        kept_indices=kept,
        safe_routings=np.ascontiguousarray(safe_routings, dtype=np.int64),
        unsafe_routings=np.ascontiguousarray(unsafe_routings, dtype=np.int64),
        safe_tokens=safe_tokens,
        unsafe_tokens=unsafe_tokens,
        group_counts=group_counts,
        group_tokens=group_tokens,
    )
    return record


def plural(count: int, noun: str) -> str:
    """``"1 batch"``, ``"2 batches"``."""
    return f"{count} {noun}" if count == 1 else f"{count} {noun}{'es' if noun.endswith(('s', 'ch')) else 's'}"


def _pair_message(batch_data: dict, config: AnalysisConfig) -> str | None:
    """The pair filter's verdict on one batch; None with the filter off (every prompt counts, nothing to say)."""
    if not config.filter_pairs:
        return None
    passed, total = sum(batch_data["pair_passed"]), len(batch_data["pairs"])
    text = f"batch {batch_data['batch_idx']}: {passed}/{total} pairs pass the pair filter"
    if passed == 0:
        return text + " -> no pair left; this batch is left out of the statistics"
    return text


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
            if (message := _pair_message(batch_data, config)) is not None:
                _say(config, message)
            if on_batch is not None:
                on_batch(batch_data)
            records[batch_data["batch_idx"]] = batch_data
            if progress is not None:
                progress.update(1)

    worker = _HostWorker() if config.overlap else None
    listens = worker is not None and hasattr(backend, "on_phase")
    if listens:
        previous_hook = backend.on_phase
        backend.on_phase = lambda phase: launching.clear() if phase == "prefill" else launching.set()
    try:
        if worker is not None:
            worker.submit(_import_plotting)  # the final plots' imports (about half a second), off the critical path
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


def _import_plotting() -> None:
    try:
        import matplotlib.backends.backend_agg  # noqa: F401
        import matplotlib.figure  # noqa: F401
    except Exception:  # noqa: BLE001 - the plots themselves say what is wrong, at the end
        pass


class _HostWorker:
    """One background thread running submitted tasks in order; at most one task waits while another runs (the
    host part of the previous request overlaps the generation of the next, no further: memory stays bounded).

    A task that raises stops the worker from running later tasks; :meth:`submit` and :meth:`raise_failure`
    raise that error in the calling thread."""

    def __init__(self) -> None:
        import queue

        self._queue: queue.Queue = queue.Queue(maxsize=1)
        self._failure: BaseException | None = None
        self.busy_s = 0.0
        self._thread = threading.Thread(target=self._run, name="analyze-host-work", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            task = self._queue.get()
            if task is None:
                return
            if self._failure is not None:
                continue  # drained, not run: the caller raises the failure
            started = time.perf_counter()
            try:
                task()
            except BaseException as error:  # noqa: BLE001 - handed to the submitting thread
                self._failure = error
            self.busy_s += time.perf_counter() - started

    def submit(self, task: Callable[[], None]) -> float:
        """Queue ``task``; returns the seconds spent waiting for room. Raises a failure of an earlier task."""
        self.raise_failure()
        started = time.perf_counter()
        self._queue.put(task)
        return time.perf_counter() - started

    def close(self) -> float:
        """Run what is queued, stop the thread; returns the seconds waited."""
        started = time.perf_counter()
        self._queue.put(None)
        self._thread.join()
        return time.perf_counter() - started

    def raise_failure(self) -> None:
        if self._failure is not None:
            raise self._failure


def _draws_per_sequence(backend: GenerationBackend) -> bool:
    # the graph engine samples each sequence from its own seed (``sequence_seeds``), whatever shares the request
    return getattr(backend, "name", None) == "graph"


def _sizes_from_memory(config: AnalysisConfig, backend: GenerationBackend) -> bool:
    estimate = getattr(backend, "batch_size_for_memory", None)
    device = getattr(backend, "device", None)
    return (config.gpu_batch_size is None and estimate is not None and device is not None
            and torch_device_type(device) == "cuda")  # fmt: skip


def gpu_batch_size(
    config: AnalysisConfig, backend: GenerationBackend, tokenizer, batches: Sequence[Batch],
    prepared: Sequence[tuple] | None = None,
) -> int:
    """Sequences per generation request: ``config.gpu_batch_size``; else, with a backend that estimates it
    (``batch_size_for_memory``) on CUDA, what fits in free memory at the longest prompt; else one method batch
    (``config.batch_size``: exactly the requests of an unpacked run). ``prepared``: the batches'
    :func:`prepare_requests` entries (default: made here)."""
    if config.gpu_batch_size is not None:
        return config.gpu_batch_size
    if not _sizes_from_memory(config, backend) or not batches:
        return config.batch_size
    if prepared is None:
        prepared = prepare_requests(tokenizer, batches, config)
    longest = max(len(p) for *_, request in prepared for p in request.prompts)
    size = int(backend.batch_size_for_memory(longest, config.max_new_tokens))
    if hasattr(backend, "max_batch_size"):
        backend.max_batch_size = max(backend.max_batch_size, size)
    return size


def request_plan(
    config: AnalysisConfig, backend: GenerationBackend, batches: Sequence[Batch], prepared: Sequence[tuple]
) -> tuple[list[list[int]], int | None]:
    """Which batches (indices into ``batches``) go into each generation request, and the group count every request
    counts in (None: its own).

    ``per_request = gpu_batch_size // batch_size`` batches per request (1 when sampling through a backend with one
    generator per request: packing would change what each batch draws). With the graph engine:

    * the batches are ordered by the cache length their longest prompt needs (stable: batches whose caches round to
      the same length keep their order), so a request pads its prompts little;
    * every request counts in ``per_request * 2`` groups, so that a last, shorter request reuses the captured
      decode step;
    * with the size from free memory, the batches are spread evenly over the fewest requests that fit, and over at
      least two, so that the host part of one overlaps the generation of the other.
    """
    if not batches:
        return [], None
    per_request = max(1, gpu_batch_size(config, backend, None, batches, prepared) // config.batch_size)
    if config.do_sample and not _draws_per_sequence(backend):
        per_request = 1  # one generator per request: packing would change what each batch draws
    order = list(range(len(batches)))
    num_groups = None
    if _draws_per_sequence(backend):
        multiple = int(getattr(backend, "cache_multiple", 1))
        longest = [max(len(p) for p in request.prompts) for *_, request in prepared]
        order.sort(key=lambda i: -(-(longest[i] + config.max_new_tokens) // multiple))
        if _sizes_from_memory(config, backend):
            requests = max(min(2, len(batches)), -(-len(batches) // per_request))
            per_request = -(-len(batches) // requests)
        if per_request > 1:
            num_groups = per_request * NUM_GROUPS
    return [order[start : start + per_request] for start in range(0, len(order), per_request)], num_groups


def torch_device_type(device) -> str:
    return getattr(device, "type", str(device).split(":")[0])


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
    from moe_fastmask.pipeline import distributed

    run_started = time.perf_counter()
    timings: dict[str, float] = {}
    config = dataclasses.replace(config)
    config.validate()
    check_paths(config.out)  # an --out that cannot be a directory fails here, before the demo is built
    check_device(config.device)
    dist = distributed.setup(config.device)
    if not dist.is_main:
        config.verbose = config.progress = False
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
    if dist.is_main:  # rank 0 binds the directory to the config; every rank gets its verdict
        try:
            store.prepare(settings, overwrite=config.overwrite)
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
    _say(config, f"analyze {slug}: {len(train)} train records -> {plural(len(batches), 'batch')} of "
                 f"{config.batch_size} (safe_ratio {config.safe_ratio}){shares}; {len(done)} already done in {out}")
    for batch_idx in sorted(done):
        if (message := _pair_message(done[batch_idx], config)) is not None:
            _say(config, message + " [resumed]")

    remaining = [batch for batch in mine if batch.batch_idx not in done]
    local = dict(done)
    failure = None
    try:
        if remaining:
            if model is None:
                try:
                    model, tokenizer = load_model(config.engine, config.model, device, dtype)
                except UsageError:
                    if fresh and not done and not dist.enabled:  # this run wrote only its config and split
                        store.clear()
                        if not out_existed and not any(out.iterdir()):
                            out.rmdir()
                    raise
            elif tokenizer is None:
                raise ValueError("pass the tokenizer together with the model")
            prepare_tokenizer(tokenizer)
            from tqdm.auto import tqdm

            timings["setup_s"] = time.perf_counter() - run_started
            with tqdm(total=len(mine), initial=len(done), desc="analyze", unit="batch",
                      disable=not config.progress) as bar:  # fmt: skip
                new = process_mixed_batches(
                    model, tokenizer, remaining, config, judge=config.judge, on_batch=store.save_batch, progress=bar,
                    timings=timings,
                )
            local.update((batch_data["batch_idx"], batch_data) for batch_data in new)
    except BaseException as error:
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
                f"no batch kept counted tokens of both groups ({plural(len(batch_data_list), 'batch')}, {sum(passed)} "
                f"pairs passed the filter); nothing to aggregate. The generations are saved in "
                f"{paths['batch_outputs']}" + ("; try without --filter-pairs" if config.filter_pairs else "")
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
    from moe_fastmask.pipeline.cli_args import dataclass_from_args

    return dataclass_from_args(AnalysisConfig, args)


def run_cli(args: argparse.Namespace) -> int:
    from moe_fastmask.pipeline import distributed

    try:
        run_analysis(config_from_args(args))
    except (ValueError, ImportError, ConfigMismatchError, AnalysisError) as error:
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
