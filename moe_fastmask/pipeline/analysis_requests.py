"""Step 2 of ``moe-fastmask analyze``: method batches through a generation backend, as batch records.

What :func:`moe_fastmask.pipeline.analyze.process_mixed_batches` runs for each generation request: the chats rendered
and tokenized once (:func:`prepare_requests`), the plan of which method batches share a request
(:func:`request_plan`, GPU batch size from :func:`gpu_batch_size`), one request per method batch
(:func:`generate_batch`) or several packed into one (:func:`generate_packed`; each (batch, kind) its own counting
group, so every batch's record is the one it gives alone), and the record of each batch (:func:`batch_record`:
per-sample counts, answers, judge labels). The record-making host part is deferred (:class:`PendingRecords`) so that
it can run in a background thread (:class:`HostWorker`) while the next request generates.
"""

from __future__ import annotations

import dataclasses
import threading
import time
import warnings
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from moe_fastmask.pipeline import stats
from moe_fastmask.pipeline.analysis_config import COUNT_TOKENS, AnalysisConfig
from moe_fastmask.pipeline.batching import Batch
from moe_fastmask.pipeline.common import NUM_GROUPS, SAFE, SAFE_GROUP, UNSAFE_GROUP
from moe_fastmask.pipeline.data import render_prompt, safe_messages, unsafe_messages
from moe_fastmask.pipeline.generation import GenerationBackend, GenerationOutput, GenerationRequest, SamplingSettings
from moe_fastmask.pipeline.generation.packing import pack_requests, split_output
from moe_fastmask.pipeline.judge import Judge

PHASES = ("prefill", "decode")


def method_messages(item, system_prompt: str) -> list[dict]:
    """The chat of one batch item: the plain goal for a safe item, the jailbreak chat for an unsafe one."""
    return safe_messages(item.record, system_prompt) if item.kind == SAFE else unsafe_messages(item.record)


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
    messages = [[method_messages(item, config.system_prompt) for item in batch.items] for batch in batches]
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
        """The batch records of the request, all at once."""
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


def pair_message(batch_data: dict, config: AnalysisConfig) -> str | None:
    """The pair filter's verdict on one batch; None with the filter off (every prompt counts, nothing to say)."""
    if not config.filter_pairs:
        return None
    passed, total = sum(batch_data["pair_passed"]), len(batch_data["pairs"])
    text = f"batch {batch_data['batch_idx']}: {passed}/{total} pairs pass the pair filter"
    if passed == 0:
        return text + " -> no pair left; this batch is left out of the statistics"
    return text


def warm_plotting_imports() -> None:
    """Import matplotlib's backend ahead of the plots (in the background, off the critical path)."""
    try:
        import matplotlib.backends.backend_agg  # noqa: F401
        import matplotlib.figure  # noqa: F401
    except Exception:  # noqa: BLE001 - the plots themselves say what is wrong, at the end
        pass


class HostWorker:
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
        """Re-raise, in the caller's thread, the exception the worker thread hit, if any."""
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
    """The device type (``"cuda"``, ``"cpu"``, ...) of a torch.device or a device string."""
    return getattr(device, "type", str(device).split(":")[0])
