"""A generation backend on a static KV cache whose decode step replays as a CUDA graph.

About 780 lines in one module on purpose: the captured step, the device buffers it replays over, and the eager path
that must give the same results change together.

:class:`StaticCacheEngine` (registry name ``"graph"``) generates for many prompts at once and counts routing per
group exactly as :class:`~moe_fastmask.RoutingRecorder` counts it under ``model.generate``: prompt tokens that are
not padding (prefill), and generated tokens fed back before their sequence's first EOS (decode). How it runs:

* the request's sequences are sorted by prompt length and cut into GPU batches of at most ``max_batch_size``;
  each batch is left-padded to its longest prompt and, so that few graphs serve many batches, to a batch-size
  bucket (a power of two) with dummy rows that are never counted;
* a transformers ``StaticCache`` of ``prompt + max_new_tokens`` positions (rounded up) holds the batch; prefill
  runs eagerly in sequence chunks of at most ``prefill_chunk_tokens`` tokens, computing logits for the last
  position only;
* one decode step — EOS bookkeeping, mask and positions, the model, token choice — works only on device buffers,
  so it is captured once per (bucket, cache length, settings) as a CUDA graph and replayed; the host checks for
  completion every ``check_every`` steps, never in between;
* optionally (``compile``; ``"auto"``: on CUDA) the model forward of the decode step is ``torch.compile``d before
  the capture: one compile for the first shape, at most one more (dynamic) for all later ones;
* greedy decoding, or sampling with temperature and top-p from counter-based noise (a per-sequence seed, the step,
  the token id), so a seeded run gives the same tokens whatever the batching;
* per-token experts, when asked for, are written by the decode step into device buffers (inside the graph);
* on CPU, or where capture fails, the same step runs eagerly with identical results, and the engine says why once
  (with where the capture broke).

The recorder is driven through its public API only: the phase (:meth:`RoutingRecorder.set_phase`), the per-row
groups on the device (:meth:`RoutingRecorder.set_row_groups`) and the decode expert sink
(:meth:`RoutingRecorder.set_decode_sink`); the expert mask keeps its buffer (:func:`moe_fastmask.set_expert_mask`).
"""

from __future__ import annotations

import copy
import inspect
import math
import time
import warnings
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
from torch import Tensor, nn

import moe_fastmask as mf
from moe_fastmask.pipeline.generation.base import (
    GenerationOutput,
    GenerationRequest,
    SamplingSettings,
    resolve_eos_ids,
)
from moe_fastmask.pipeline.generation.packing import sequence_seed

BACKEND_NAME = "graph"

def _bind_row_groups(recorder, live_groups: Tensor | None) -> None:
    """Count with ``live_groups`` (a device buffer the decode step rewrites: -1 once a sequence has fed back its
    EOS) instead of the recorder's own host-side EOS tracking, which does not run when the step replays as a CUDA
    graph."""
    if recorder is not None:
        recorder.set_row_groups(live_groups)


# --------------------------------------------------------------------------------------------------------------
# Token choice (device-only ops: capturable)
# --------------------------------------------------------------------------------------------------------------

_MIX1 = 0xBF58476D1CE4E5B9 - (1 << 64)  # splitmix64 constants as signed int64
_MIX2 = 0x94D049BB133111EB - (1 << 64)
_GOLDEN = 0x9E3779B97F4A7C15 - (1 << 64)


def counter_uniform(row_seeds: Tensor, step: Tensor, vocab: int) -> Tensor:
    """Uniform (0, 1) float32 ``[B, vocab]`` from a hash of (row seed, step, token id): the same numbers on every
    device and whatever the batch holds (int64 arithmetic wraps identically on CPU and CUDA)."""
    base = row_seeds * _MIX1 + step * _GOLDEN  # [B]
    x = base[:, None] + torch.arange(vocab, device=row_seeds.device, dtype=torch.int64) * _GOLDEN
    x = (x ^ (x >> 30)) * _MIX1
    x = (x ^ (x >> 27)) * _MIX2
    x = x ^ (x >> 31)
    return (((x >> 20) & 0xFFFFFF).to(torch.float32) + 0.5) * (1.0 / (1 << 24))


def top_p_filter(logits: Tensor, top_p: Tensor) -> Tensor:
    """``logits`` with tokens outside the smallest set whose probability reaches ``top_p`` set to -inf (the most
    likely token always stays)."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probs = sorted_logits.softmax(dim=-1)
    before = probs.cumsum(dim=-1) - probs  # probability mass of the more likely tokens
    drop_sorted = before > top_p
    drop_sorted[:, 0] = False
    drop = torch.empty_like(drop_sorted).scatter_(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


# --------------------------------------------------------------------------------------------------------------
# The engine
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _SlotKey:
    batch: int
    cache_len: int
    num_groups: int | None
    keep_shape: tuple | None
    do_sample: bool
    top_p: bool
    min_new: bool
    graphed: bool
    token_experts: bool = False


def _attention_windows(config) -> tuple[str, int | None, object]:
    """How the model's layers attend, for the engine's masks and caches: ``(layout, window, cache_config)``.

    ``layout`` is ``"full"`` (every layer sees the whole sequence), ``"sliding"`` (every layer a sliding window of
    ``window`` positions: Mixtral or Qwen3-MoE with ``sliding_window`` set; the model takes one mask) or
    ``"per_layer"`` (``layer_types`` mixing full and sliding layers, as GPT-OSS; the model takes a dict of masks per
    attention type). ``cache_config``: the config the static caches are built from, every layer a full-length cache
    (transformers' sliding cache layers are rolling buffers of the window, which the engine's masks over absolute
    cache positions do not index), so sliding layers are windowed by their masks alone.
    """
    def text_config(config):
        return config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config

    window = getattr(text_config(config), "sliding_window", None)
    layer_types = getattr(text_config(config), "layer_types", None)
    if layer_types is not None:
        layout = "per_layer" if "sliding_attention" in layer_types and window else "full"
    else:
        layout = "sliding" if window else "full"
    if layout == "full":
        return layout, None, config
    cache_config = copy.deepcopy(config)
    text_config(cache_config).sliding_window = None
    if layer_types is not None:
        text_config(cache_config).layer_types = [
            "full_attention" if t == "sliding_attention" else t for t in layer_types
        ]
    return layout, int(window), cache_config


class _Slot:
    """A static cache and the device buffers of one decode step; its graph, once captured, is replayed."""

    def __init__(self, key: _SlotKey, config, device: torch.device, vocab: int) -> None:
        from transformers import StaticCache

        B, M = key.batch, key.cache_len
        self.key = key
        self.cache = StaticCache(config=config, max_cache_len=M)
        i64 = dict(dtype=torch.int64, device=device)
        self.tokens = torch.zeros(B, 1, **i64)  # the token fed in this step
        self.step = torch.zeros((), **i64)  # tokens generated so far
        self.prompt_pad = torch.zeros((), **i64)  # cache index of the first generated token
        self.base_pos = torch.zeros(B, **i64)  # position id of the first generated token (= real prompt length)
        self.key_valid = torch.zeros(B, M, dtype=torch.bool, device=device)
        self.cache_index = torch.arange(M, **i64)
        self.groups = torch.full((B,), -1, **i64)
        self.live_groups = torch.full((B,), -1, **i64)
        self.finished = torch.zeros(B, dtype=torch.bool, device=device)
        self.out = torch.zeros(B, M, **i64)
        self.row_seeds = torch.zeros(B, **i64)
        self.temperature = torch.ones((), dtype=torch.float32, device=device)
        self.top_p = torch.ones((), dtype=torch.float32, device=device)
        self.min_new = torch.zeros((), **i64)
        self.vocab = vocab
        self.graph = None
        self.recorder = None
        self.keep = None
        self.expert_ids = None  # uint8 [B, M, L, K]: decode experts per step (device sink of the recorder)
        self.expert_counted = None  # bool [B, M]: which decode positions are counted
        self.fed_position = torch.zeros(1, **i64)  # the decode position the step writes


class StaticCacheEngine:
    """Batched generation with a static KV cache and a CUDA-graph decode step, with exact per-group routing counts.

    ``model``: a causal LM of a supported MoE family (patched with :func:`moe_fastmask.apply` here, router op
    backend ``op_backend``, if it is not yet). ``tokenizer``: for the output texts (empty strings without one).
    ``eos_token_id``: default :func:`~moe_fastmask.pipeline.generation.base.resolve_eos_ids` (generation config, model
    config, tokenizer). ``pad_token_id``: default from the model's generation config, else the tokenizer's. ``max_batch_size``: sequences per GPU batch.
    ``prefill_chunk_tokens``: most tokens (batch x chunk length) per prefill forward (default: sized from free
    memory, :func:`prefill_chunk_for_memory`). ``use_cuda_graph``: capture the decode step on CUDA (ignored on CPU).
    ``compile``: ``torch.compile`` the model forward of the decode step first (True / False, or ``"auto"``: on CUDA
    where ``torch.compile`` is supported, once :meth:`plan_work` announces enough decoding to repay the compile; never
    on CPU; a forward that fails to compile runs uncompiled, said once; :attr:`compiled` tells which runs). ``check_every``: decode steps
    between completion checks (the only host syncs of the decode loop).
    ``cache_multiple``: cache lengths are rounded up to this, so batches of similar length share a graph.
    ``max_slots``: captured graphs (each with its cache) kept for reuse. ``time_phases``: synchronise after prefill
    and after decode to time them (``last_timings``; off by default: it costs a host sync per batch).
    """

    name = BACKEND_NAME

    def __init__(
        self,
        model: nn.Module,
        tokenizer=None,
        *,
        op_backend: str = "auto",
        eos_token_id: int | Sequence[int] | None = None,
        pad_token_id: int | None = None,
        max_batch_size: int = 256,
        prefill_chunk_tokens: int | None = None,
        use_cuda_graph: bool = True,
        compile: bool | str = False,
        check_every: int = 16,
        cache_multiple: int = 64,
        max_slots: int = 2,
        time_phases: bool = False,
    ) -> None:
        for arg, value in (("max_batch_size", max_batch_size), ("prefill_chunk_tokens", prefill_chunk_tokens or 1),
                           ("check_every", check_every), ("cache_multiple", cache_multiple), ("max_slots", max_slots)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{arg} must be a positive int, got {value!r}")  # fmt: skip
        self.model = mf.apply(model, backend=op_backend) if not mf.is_patched(model) else model
        self.tokenizer = tokenizer
        config = getattr(model, "generation_config", None)
        self.eos_ids = resolve_eos_ids(eos_token_id, generation_config=config,
                                       model_config=getattr(model, "config", None), tokenizer=tokenizer)
        if not self.eos_ids:
            raise ValueError("eos_token_id is needed: pass it or set the model's generation_config.eos_token_id")
        vocab = model.get_output_embeddings().weight.shape[0]
        if not all(0 <= e < vocab for e in self.eos_ids):
            raise ValueError(f"eos_token_id must be token ids in [0, {vocab}), got {self.eos_ids!r}")
        pad = pad_token_id if pad_token_id is not None else getattr(config, "pad_token_id", None)
        if pad is None and tokenizer is not None:
            pad = tokenizer.pad_token_id
        self.pad_token_id = int(pad) if pad is not None else self.eos_ids[0]
        self.max_batch_size = max_batch_size
        self._prefill_chunk_tokens = prefill_chunk_tokens
        self.check_every = check_every
        self.cache_multiple = cache_multiple
        self.max_slots = max_slots
        self.time_phases = time_phases
        self.last_timings: dict[str, float] = {}
        # called with "prefill" before a GPU batch's prefill (eager: kernel launches from Python), "decode" before its
        # decode loop (graph replays) and None after it: a caller running host work in another thread can hold it
        # back while the prefill launches
        self.on_phase: Callable[[str | None], None] | None = None
        self.decoder = model.get_decoder()
        self.lm_head = model.get_output_embeddings()
        params = inspect.signature(self.decoder.forward).parameters
        self._cache_kwarg = "cache" if "cache" in params else "past_key_values"
        weight = self.lm_head.weight
        self.device, self.dtype = weight.device, weight.dtype
        self.vocab = weight.shape[0]
        attn = getattr(model.config, "_attn_implementation", "sdpa") or "sdpa"
        if attn not in ("sdpa", "eager"):
            raise ValueError(f"StaticCacheEngine supports the 'sdpa' and 'eager' attention implementations, not {attn!r}")
        self._bool_mask = attn == "sdpa"
        self._window_layout, self._window, self._cache_config = _attention_windows(model.config)
        self.use_cuda_graph = use_cuda_graph and self.device.type == "cuda"
        self._eager_reason: str | None = None
        if self.device.type != "cuda":
            self._eager_reason = f"the model is on {self.device.type}; CUDA graphs need a CUDA device"
        elif not use_cuda_graph:
            self._eager_reason = "use_cuda_graph=False"
        self._said: set[str] = set()
        self._slots: dict[_SlotKey, _Slot] = {}
        self._recorders: dict[tuple[int, bool], mf.RoutingRecorder] = {}
        self._keep: Tensor | None = None
        self._mask_set = False
        self._eos_device = torch.tensor(self.eos_ids, dtype=torch.int64, device=self.device)
        self._eos_bias = torch.zeros(self.vocab, dtype=torch.float32, device=self.device)
        self._eos_bias[self._eos_device] = float("-inf")
        self._forward_decode = self._model_forward
        self._compile_when_planned = False  # compile="auto" on CUDA: decided by plan_work
        self.compile = self._resolve_compile(compile)
        if self.compile:
            self._enable_compile()

    def _enable_compile(self) -> None:
        self.compile = True
        try:
            # dynamic=None: one static compile, then at most one more with the dimensions that changed made
            # symbolic (batch bucket, cache length), instead of a compile per shape
            self._forward_decode = torch.compile(self._model_forward, dynamic=None)
        except Exception as exc:  # noqa: BLE001 - any compile failure leaves the eager forward
            self._say(f"torch.compile is unavailable ({type(exc).__name__}: {exc}); the decode step runs uncompiled")

    def _resolve_compile(self, compile: bool | str) -> bool:
        if compile == "auto":
            if self.device.type != "cuda":
                return False
            reason = compile_unavailable()
            if reason is not None:
                self._say(f"torch.compile is unavailable ({reason}); the decode step runs uncompiled")
            self._compile_when_planned = reason is None
            return False
        if not isinstance(compile, bool):
            raise ValueError(f"compile must be True, False or 'auto', got {compile!r}")
        return compile

    @property
    def compiled(self) -> bool:
        """Whether the decode step's model forward is (still) the ``torch.compile``d one."""
        return self._forward_decode != self._model_forward  # bound methods: equal, never identical

    # public API ----------------------------------------------------------------------------------------------
    @property
    def prefill_chunk_tokens(self) -> int:
        """Most tokens (batch x chunk length) per prefill forward: as given, else sized from the device's memory
        (see :func:`prefill_chunk_for_memory`)."""
        if self._prefill_chunk_tokens is None:
            free = torch.cuda.mem_get_info(self.device)[0] if self.device.type == "cuda" else None
            self._prefill_chunk_tokens = prefill_chunk_for_memory(self._prefill_token_bytes(CACHE_LEN_FOR_SIZING), free)
        return self._prefill_chunk_tokens

    def plan_work(self, sequences: int, max_new_tokens: int) -> None:
        """Say how much decoding the coming requests hold (``sequences`` x ``max_new_tokens`` sequence-steps at
        most). With ``compile="auto"`` on CUDA, the decode step is compiled when that much work repays the compile
        (:data:`COMPILE_PAYS_AFTER_SEQUENCE_STEPS`); call it before generating (captured graphs are dropped)."""
        work = int(sequences) * int(max_new_tokens)
        if self._compile_when_planned and not self.compile and work >= COMPILE_PAYS_AFTER_SEQUENCE_STEPS:
            self._say(f"compiling the decode step: {work:,} sequence-steps planned repay its compile (about half a minute)")
            self._slots.clear()
            self._enable_compile()

    def set_expert_mask(self, keep: Tensor | None) -> None:
        """Set (or clear) the per-layer, per-group expert mask (see :func:`moe_fastmask.set_expert_mask`).

        A mask of the same shape as the current one is copied into the same buffer, so captured graphs stay valid.
        A mask set on the model directly is taken up the same way at the next :meth:`generate`.
        """
        self._mask_set = keep is not None
        mf.set_expert_mask(self.model, keep)  # validates; a mask of the current shape is copied into the same buffer
        self._adopt_mask()

    def batch_size_for_memory(
        self, prompt_len: int, max_new_tokens: int, free_bytes: int | None = None, *, fraction: float = 0.85,
        largest: int = 4096,
    ) -> int:
        """The largest power-of-two GPU batch whose static cache, logits and prefill activations fit in ``fraction``
        of ``free_bytes`` (default: the device's free memory now; on CPU, ``largest``), at least 1.

        An estimate: per sequence the KV cache of ``prompt_len + max_new_tokens`` positions (rounded up like the
        engine's caches) plus float32 logits and the token-choice temporaries; once, a prefill chunk's activations.
        """
        if free_bytes is None:
            if self.device.type != "cuda":
                return largest
            free_bytes, _ = torch.cuda.mem_get_info(self.device)
        cfg = self.model.config
        cache_len = -(-(prompt_len + max_new_tokens) // self.cache_multiple) * self.cache_multiple
        size = self.dtype.itemsize
        heads = cfg.num_attention_heads
        kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
        per_sequence = cache_len * cfg.num_hidden_layers * 2 * kv_heads * head_dim * size + self.vocab * 4 * 6
        per_prefill_token = self._prefill_token_bytes(cache_len)
        if self._prefill_chunk_tokens is None:
            self._prefill_chunk_tokens = prefill_chunk_for_memory(per_prefill_token, free_bytes)
        room = int(free_bytes * fraction) - self.prefill_chunk_tokens * per_prefill_token
        fitting = max(1, room // per_sequence)
        return int(min(largest, 1 << (int(fitting).bit_length() - 1)))

    def _prefill_token_bytes(self, cache_len: int) -> int:
        """Estimated activation bytes per token of a prefill forward (hidden states, expert intermediates, attention
        scores over a cache of ``cache_len`` positions and its mask)."""
        cfg = self.model.config
        size = self.dtype.itemsize
        top_k = getattr(cfg, "num_experts_per_tok", 1)
        intermediate = getattr(cfg, "moe_intermediate_size", None) or cfg.intermediate_size
        return (cfg.hidden_size * size * 16 + top_k * intermediate * size * 4
                + cfg.num_attention_heads * cache_len * 4 + cache_len)  # fmt: skip

    def _adopt_mask(self) -> None:
        # the mask buffer the routers read (set_expert_mask keeps its address while the shape stays): a new buffer
        # makes the slots capture again
        from moe_fastmask.integrations.state import state_of

        self._keep = state_of(self.model).keep

    def close(self) -> None:
        """Lift a mask set through this engine, drop captured graphs, caches and count buffers."""
        if self._mask_set:
            mf.set_expert_mask(self.model, None)
            self._mask_set = False
        self._keep = None
        self._slots.clear()
        self._recorders.clear()

    @torch.no_grad()
    def generate(self, request: GenerationRequest) -> GenerationOutput:
        """Generate for every prompt of ``request``; see :class:`GenerationOutput`."""
        prompts, groups, sampling = self._check(request)
        self._adopt_mask()
        n = len(prompts)
        recorder = None
        if groups is not None:
            recorder = self._recorder(request.num_groups, request.record_token_experts)
            recorder.reset()
        seeds = request.sequence_seeds
        if seeds is None:
            seed = sampling.seed
            if sampling.do_sample and seed is None:
                seed = int(torch.randint(0, 2**62, ()).item())
            seeds = [sequence_seed(seed or 0, i) for i in range(n)]
        generated: list[list[int]] = [[] for _ in range(n)]
        experts: dict | None = None
        if request.record_token_experts:
            L, K = recorder.num_layers, recorder.top_k
            P, D = max(len(p) for p in prompts), sampling.max_new_tokens
            experts = {
                "prefill": np.zeros((n, P, L, K), dtype=np.uint8), "prefill_counted": np.zeros((n, P), dtype=bool),
                "decode": np.zeros((n, D, L, K), dtype=np.uint8), "decode_counted": np.zeros((n, D), dtype=bool),
            }  # fmt: skip
        order = sorted(range(n), key=lambda i: (len(prompts[i]), i))
        self.last_timings = {"prefill_s": 0.0, "decode_s": 0.0, "capture_s": 0.0, "decode_steps": 0, "batches": 0}
        for start in range(0, n, self.max_batch_size):
            rows = order[start : start + self.max_batch_size]
            self._run_batch(rows, prompts, groups, sampling, seeds, recorder, generated, experts)
        eos = set(self.eos_ids)
        tokens = [row[:-1] if row and row[-1] in eos else row for row in generated]  # the EOS is not kept
        texts = [""] * n
        if self.tokenizer is not None:
            # with the EOS, as the ``hf`` backend decodes its rows (special tokens skipped either way)
            texts = self.tokenizer.batch_decode(generated, skip_special_tokens=True)
        output = GenerationOutput(tokens=tokens, texts=texts, num_prompt_tokens=[len(p) for p in prompts])
        if recorder is not None:
            # real copies: on the CPU ``.cpu()`` would alias the recorder's buffers, which the next request zeroes
            output.prefill_counts = recorder.prefill_counts.to("cpu", copy=True).numpy()
            output.decode_counts = recorder.decode_counts.to("cpu", copy=True).numpy()
            output.prefill_tokens = recorder.prefill_tokens.to("cpu", copy=True).numpy()
            output.decode_tokens = recorder.decode_tokens.to("cpu", copy=True).numpy()
        if experts is not None:
            # decode positions: as many as the longest sequence fed back (generate's decode forwards)
            fed = max(len(row) for row in generated) - 1
            experts["decode"], experts["decode_counted"] = experts["decode"][:, :fed], experts["decode_counted"][:, :fed]
            output.token_experts = experts
        return output

    # request checks ------------------------------------------------------------------------------------------
    def _check(self, request: GenerationRequest):
        prompts = [list(map(int, ids)) for ids in request.prompts]
        if not prompts:
            raise ValueError("request.prompts is empty: nothing to generate")
        for index, ids in enumerate(prompts):
            if len(ids) == 0:
                raise ValueError(f"request.prompts[{index}] is empty: every prompt needs at least one token")
            if min(ids) < 0 or max(ids) >= self.vocab:
                raise ValueError(f"request.prompts[{index}] holds token ids outside [0, {self.vocab})")
        sampling = request.sampling
        if sampling.max_new_tokens < 1:
            raise ValueError(f"sampling.max_new_tokens must be at least 1, got {sampling.max_new_tokens}")
        if not 0 <= sampling.min_new_tokens <= sampling.max_new_tokens:
            raise ValueError(f"sampling.min_new_tokens must be in [0, max_new_tokens], got {sampling.min_new_tokens}")
        if sampling.do_sample and not (sampling.temperature > 0 and 0 < sampling.top_p <= 1):
            raise ValueError(
                f"sampling needs temperature > 0 and top_p in (0, 1]; got {sampling.temperature}, {sampling.top_p}"
            )
        groups = request.groups
        if groups is not None:
            if len(groups) != len(prompts):
                raise ValueError(f"request.groups has {len(groups)} labels for {len(prompts)} prompts")
            bad = [g for g in groups if not -1 <= int(g) < request.num_groups]
            if bad:
                raise ValueError(f"request.groups must be in [-1, {request.num_groups}); got {bad[:5]}")
            groups = [int(g) for g in groups]
        elif request.record_token_experts:
            raise ValueError("request.record_token_experts needs request.groups (the tokens to record)")
        seeds = request.sequence_seeds
        if seeds is not None and (len(seeds) != len(prompts) or not all(-(2**63) <= int(x) < 2**63 for x in seeds)):
            raise ValueError(f"request.sequence_seeds needs one int64 per prompt ({len(prompts)}), got {len(seeds)}")
        return prompts, groups, sampling

    def _recorder(self, num_groups: int, token_experts: bool) -> mf.RoutingRecorder:
        key = (num_groups, token_experts)
        if key not in self._recorders:
            self._recorders[key] = mf.RoutingRecorder(self.model, num_groups, record_token_experts=token_experts)
        return self._recorders[key]

    def _say(self, message: str) -> None:
        if message not in self._said:
            self._said.add(message)
            warnings.warn(f"StaticCacheEngine: {message}", stacklevel=3)

    # one GPU batch ---------------------------------------------------------------------------------------------
    def _bucket(self, rows: int) -> int:
        return min(1 << max(0, math.ceil(math.log2(rows))), max(self.max_batch_size, rows))

    def _slot(self, key: _SlotKey) -> _Slot:
        slot = self._slots.pop(key, None)
        if slot is None:
            while len(self._slots) >= self.max_slots:
                self._slots.pop(next(iter(self._slots)))  # least recently used
            slot = _Slot(key, self._cache_config, self.device, self.vocab)
        self._slots[key] = slot  # most recently used last
        return slot

    def _run_batch(self, rows, prompts, groups, sampling, seeds, recorder, generated, experts) -> None:
        n_real = len(rows)
        B = self._bucket(n_real)
        P = max(len(prompts[i]) for i in rows)
        N = sampling.max_new_tokens
        M = -(-(P + N) // self.cache_multiple) * self.cache_multiple
        graphed = self.use_cuda_graph
        token_experts = recorder is not None and recorder.record_token_experts
        if not graphed and self._eager_reason is not None:
            self._say(f"the decode step runs eagerly: {self._eager_reason}")
        key = _SlotKey(
            batch=B,
            cache_len=M,
            num_groups=recorder.num_groups if recorder is not None else None,
            keep_shape=tuple(self._keep.shape) if self._keep is not None else None,
            do_sample=sampling.do_sample,
            top_p=sampling.do_sample and sampling.top_p < 1,
            min_new=sampling.min_new_tokens > 0,
            graphed=graphed,
            token_experts=token_experts,
        )
        slot = self._slot(key)
        if slot.recorder is not recorder or slot.keep is not self._keep:
            slot.graph = None  # a graph writes into its recorder's buffers and reads its mask buffer
            slot.recorder, slot.keep = recorder, self._keep
        if token_experts and slot.expert_ids is None:
            slot.expert_ids = torch.zeros(B, M, recorder.num_layers, recorder.top_k, dtype=torch.uint8,
                                          device=self.device)  # fmt: skip
            slot.expert_counted = torch.zeros(B, M, dtype=torch.bool, device=self.device)

        # host-side batch layout: left padding; dummy rows (bucket fill) hold one pad token and are never counted
        # (numpy, vectorised: a GPU batch holds thousands of rows)
        lengths = np.fromiter((len(prompts[i]) for i in rows), dtype=np.int64, count=n_real)
        valid_np = np.zeros((B, P), dtype=bool)
        valid_np[:n_real] = np.arange(P)[None, :] >= (P - lengths)[:, None]
        valid_np[n_real:, P - 1] = True
        ids_np = np.full((B, P), self.pad_token_id, dtype=np.int64)
        ids_np[:n_real][valid_np[:n_real]] = np.fromiter(
            (token for i in rows for token in prompts[i]), dtype=np.int64, count=int(lengths.sum())
        )  # row-major order of the valid positions: each row's prompt, left to right
        row_groups_np = np.full(B, -1, dtype=np.int64)
        if groups is not None:
            row_groups_np[:n_real] = [groups[i] for i in rows]
        row_seeds_np = np.zeros(B, dtype=np.int64)
        row_seeds_np[:n_real] = [int(seeds[i]) for i in rows]
        ids, valid = torch.from_numpy(ids_np), torch.from_numpy(valid_np)
        row_groups, row_seeds = torch.from_numpy(row_groups_np), torch.from_numpy(row_seeds_np)
        positions = (valid.long().cumsum(-1) - 1).masked_fill(~valid, 1)

        dev = self.device
        slot.cache.reset()
        slot.key_valid.fill_(True)
        slot.key_valid[:, :P].copy_(valid)
        slot.base_pos.copy_(valid.sum(-1))
        slot.groups.copy_(row_groups)
        slot.row_seeds.copy_(row_seeds)
        slot.finished.zero_()
        slot.finished[n_real:] = True
        slot.prompt_pad.fill_(P)
        slot.temperature.fill_(float(sampling.temperature))
        slot.top_p.fill_(float(sampling.top_p))
        slot.min_new.fill_(int(sampling.min_new_tokens))
        slot.step.zero_()
        if token_experts:
            slot.expert_ids.zero_()
            slot.expert_counted.zero_()
        ids_dev, positions_dev = ids.to(dev), positions.to(dev)

        start = time.perf_counter()
        capture_before = self.last_timings["capture_s"]
        slot.live_groups.copy_(slot.groups)
        # the engine states the phase (chunked prefill continues its cache, which the automatic rule would call a
        # decode step) and keeps the per-row groups on the device itself (-1 once a sequence has fed back its EOS)
        record = recorder.record(row_groups.tolist(), phase="prefill") if recorder is not None else None
        if record is not None:
            record.__enter__()
            _bind_row_groups(recorder, slot.live_groups)
        try:
            self._phase("prefill")
            # prefill, in sequence chunks; logits of the last position only
            chunk = max(1, self.prefill_chunk_tokens // B)
            hidden = None
            for s in range(0, P, chunk):
                e = min(P, s + chunk)
                query_index = torch.arange(s, e, device=dev)
                visible = (slot.cache_index[None, None, :] <= query_index[None, :, None]) & (
                    slot.key_valid[:, None, :]
                )
                hidden = self._decoder_forward(
                    ids_dev[:, s:e], visible, positions_dev[:, s:e], slot.cache, slot.cache_index, query_index
                )
            logits = self.lm_head(hidden[:, -1]).float()
            first = self._choose(slot, logits)
            slot.out[:, 0] = first
            slot.tokens[:, 0] = first
            slot.step.fill_(1)
            prefilled = self._clock()
            self._phase("decode")

            if recorder is not None:
                recorder.set_phase("decode")
                if token_experts:
                    recorder.set_decode_sink(slot.expert_ids, slot.fed_position)
            done_steps = 1
            while done_steps < N:
                self._decode(slot)
                done_steps += 1
                if done_steps % self.check_every == 0 and done_steps < N and bool(self._all_done(slot)):
                    break
            decoded = self._clock()
        finally:
            self._phase(None)
            if record is not None:
                record.__exit__(None, None, None)
        timings = self.last_timings
        timings["prefill_s"] += prefilled - start
        timings["decode_s"] += decoded - prefilled - (timings["capture_s"] - capture_before)
        timings["decode_steps"] += done_steps - 1
        timings["batches"] += 1

        out = slot.out[:n_real, :done_steps].cpu().numpy()
        is_eos = np.isin(out, self.eos_ids)
        # each row up to and with its first EOS (all of it without one)
        ends = np.where(is_eos.any(axis=1), is_eos.argmax(axis=1) + 1, done_steps)
        for r, (i, tokens) in enumerate(zip(rows, out.tolist())):
            generated[i] = tokens[: ends[r]]
        if experts is not None:
            self._collect_experts(recorder, slot, done_steps - 1, rows, prompts, experts)

    def _phase(self, phase: str | None) -> None:
        if self.on_phase is not None:
            self.on_phase(phase)

    def _clock(self) -> float:
        if self.time_phases and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def _collect_experts(self, recorder, slot, decode_steps: int, rows, prompts, experts) -> None:
        """This GPU batch's per-token experts into the request's arrays: prompt positions right-aligned (left
        padding, as ``generate`` lays them out), decode positions from the first step; ids only where counted.
        Prefill experts come from the recorder's log, decode experts from the slot's device sink."""
        logged = recorder.token_experts()
        logged["decode"] = slot.expert_ids[:, :decode_steps].cpu()
        logged["decode_counted"] = slot.expert_counted[:, :decode_steps].cpu()
        index = np.asarray(rows, dtype=np.int64)
        for phase in ("prefill", "decode"):
            ids, counted = logged[phase].numpy(), logged[f"{phase}_counted"].numpy()
            if ids.shape[1] == 0:
                continue
            n_real = len(rows)
            ids, counted = ids[:n_real], counted[:n_real]
            ids = np.where(counted[..., None, None], ids, 0).astype(np.uint8)
            # whole windows at once: a position outside a row's prompt (its left padding) is never counted, so it
            # copies the zeros the request's arrays already hold there
            if phase == "prefill":  # right-aligned: the batch's prompt width within the request's
                width = ids.shape[1]
                experts[phase][index, -width:] = ids
                experts[f"{phase}_counted"][index, -width:] = counted
            else:
                width = min(ids.shape[1], experts[phase].shape[1])
                experts[phase][index, :width] = ids[:, :width]
                experts[f"{phase}_counted"][index, :width] = counted[:, :width]

    # the model and the step ------------------------------------------------------------------------------------
    def _mask(self, visible: Tensor) -> Tensor:
        """[B, q, M] bool visibility -> the 4-D mask the attention implementation takes."""
        mask = visible[:, None]
        if self._bool_mask:
            return mask
        return torch.zeros(mask.shape, dtype=self.dtype, device=mask.device).masked_fill_(
            ~mask, torch.finfo(self.dtype).min
        )

    def _attention_mask(self, visible: Tensor, key_index: Tensor, query_index: Tensor):
        """The attention mask(s) the decoder takes: ``visible`` [B, q, M] as is, or with the sliding window (keys
        less than ``window`` cache positions behind the query: within a row, cache positions and position ids differ
        by the row's left padding, so this is transformers' window) for the sliding layers (see
        :func:`_attention_windows`)."""
        if self._window_layout == "full":
            return self._mask(visible)
        in_window = key_index[None, None, :] > query_index[None, :, None] - self._window
        sliding = self._mask(visible & in_window)
        if self._window_layout == "sliding":
            return sliding
        return {"full_attention": self._mask(visible), "sliding_attention": sliding}

    def _decoder_forward(
        self, input_ids: Tensor, visible: Tensor, position_ids: Tensor, cache, key_index: Tensor, query_index: Tensor
    ) -> Tensor:
        kwargs = {self._cache_kwarg: cache}
        mask = self._attention_mask(visible, key_index, query_index)
        out = self.decoder(input_ids=input_ids, attention_mask=mask, position_ids=position_ids, use_cache=True, **kwargs)
        return out.last_hidden_state

    def _model_forward(
        self, tokens: Tensor, visible: Tensor, position_ids: Tensor, cache, key_index: Tensor, query_index: Tensor
    ) -> Tensor:
        hidden = self._decoder_forward(tokens, visible, position_ids, cache, key_index, query_index)
        return self.lm_head(hidden[:, -1]).float()

    def _choose(self, slot: _Slot, logits: Tensor) -> Tensor:
        """The next token of every row from float32 logits ``[B, V]`` (``slot.step`` tokens generated so far)."""
        key = slot.key
        if key.min_new:  # no EOS before min_new_tokens, as generate's MinNewTokensLengthLogitsProcessor
            logits = logits + torch.where(slot.step < slot.min_new, self._eos_bias, 0.0)
        if not key.do_sample:
            return logits.argmax(dim=-1)
        logits = logits / slot.temperature
        if key.top_p:
            logits = top_p_filter(logits, slot.top_p)
        noise = counter_uniform(slot.row_seeds, slot.step, logits.shape[-1])
        return (logits - torch.log(-torch.log(noise))).argmax(dim=-1)

    def _step(self, slot: _Slot) -> None:
        """One decode step on device buffers only: feed ``slot.tokens``, write the next token."""
        fed = slot.tokens[:, 0]
        # a sequence whose fed-back token is EOS is finished: it and everything after it is never counted
        slot.finished.logical_or_(torch.isin(fed, self._eos_device))
        slot.live_groups.copy_(torch.where(slot.finished, -1, slot.groups))
        if slot.expert_ids is not None:  # per-token experts: this step's position and whether it counts
            slot.fed_position.copy_((slot.step - 1).view(1))
            slot.expert_counted.index_copy_(1, slot.fed_position, (slot.live_groups >= 0)[:, None])
        pos = slot.prompt_pad + slot.step - 1  # cache index of the fed token
        visible = ((slot.cache_index <= pos)[None, :] & slot.key_valid)[:, None, :]
        position_ids = (slot.base_pos + slot.step - 1)[:, None]
        logits = self._forward_decode(slot.tokens, visible, position_ids, slot.cache, slot.cache_index, pos.view(1))
        token = torch.where(slot.finished, self.pad_token_id, self._choose(slot, logits))
        slot.out.index_copy_(1, slot.step.view(1), token[:, None])
        slot.tokens.copy_(token[:, None])
        slot.step.add_(1)

    def _all_done(self, slot: _Slot) -> Tensor:
        return (slot.finished | torch.isin(slot.tokens[:, 0], self._eos_device)).all()

    def _decode(self, slot: _Slot) -> None:
        if not slot.key.graphed:
            self._step_with_fallback(slot)
            return
        if slot.graph is not None:
            slot.graph.replay()
            return
        # first decode step of this slot: run it for real on a side stream (warm-up), then capture the next one
        started = time.perf_counter()
        try:
            self._warm_up_and_capture(slot)
        finally:
            self.last_timings["capture_s"] = self.last_timings.get("capture_s", 0.0) + self._clock() - started

    def _warm_up_and_capture(self, slot: _Slot) -> None:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            self._step_with_fallback(slot)
        torch.cuda.current_stream().wait_stream(stream)
        try:
            graph = torch.cuda.CUDAGraph()  # a private memory pool: slots never share temporaries
            with torch.cuda.graph(graph):
                self._step(slot)
        except Exception as exc:  # noqa: BLE001 - capture can fail for many reasons; eager is always correct
            slot.key = _replace(slot.key, graphed=False)
            self._say(f"CUDA graph capture failed ({type(exc).__name__}: {str(exc)[:200]}, at {_origin(exc)}); decoding "
                      f"eagerly{_capture_hint(self.model)}")
            torch.cuda.synchronize()
            return
        # capture records without running anything: the captured step is the one the next call replays
        slot.graph = graph

    def _step_with_fallback(self, slot: _Slot) -> None:
        """:meth:`_step`; a compiled forward that fails to compile is replaced by the eager one (said once).

        Compilation fails before anything runs, and the step's bookkeeping before the forward is idempotent, so the
        step is simply run again."""
        try:
            self._step(slot)
        except Exception as exc:  # noqa: BLE001
            if not self.compiled:
                raise
            self._forward_decode = self._model_forward
            self._say(f"torch.compile of the decode step failed ({type(exc).__name__}: {str(exc)[:200]}); uncompiled")
            self._step(slot)


# Measured on an H200 (benchmarks/RESULTS.md, analysis through the engine): compiling and capturing OLMoE-1B-7B's
# decode step took 38 s and saved about 6 us per sequence-step (12.5 ms a step at batch 2,048), so the compile repays
# itself after about 6 M sequence-steps (for example 94 k prompts of 64 new tokens).
COMPILE_PAYS_AFTER_SEQUENCE_STEPS = 6_000_000
# prefill activations are sized for caches of this length when no batch sizing has run yet
CACHE_LEN_FOR_SIZING = 2048
# Larger prefill forwards launch fewer kernels and run the expert GEMMs fuller; beyond this the gain is small
MAX_PREFILL_CHUNK_TOKENS = 65536
MIN_PREFILL_CHUNK_TOKENS = 4096


def prefill_chunk_for_memory(per_token_bytes: int, free_bytes: int | None, *, fraction: float = 0.15) -> int:
    """Tokens per prefill forward: the largest power of two whose activations (``per_token_bytes`` each) take at most
    ``fraction`` of ``free_bytes``, within [4,096, 65,536]; 16,384 where the free memory is unknown (CPU)."""
    if free_bytes is None:
        return 16384
    fitting = max(1, int(free_bytes * fraction) // max(1, per_token_bytes))
    return int(min(MAX_PREFILL_CHUNK_TOKENS, max(MIN_PREFILL_CHUNK_TOKENS, 1 << (fitting.bit_length() - 1))))


def compile_unavailable() -> str | None:
    """Why ``torch.compile`` cannot compile for CUDA here (None when it can): dynamo unsupported on this Python, or
    no Triton for inductor's GPU kernels."""
    try:
        import torch._dynamo
        from torch.utils._triton import has_triton
    except Exception as exc:  # noqa: BLE001 - a broken install is a reason like any other
        return f"{type(exc).__name__}: {exc}"
    if not torch._dynamo.is_dynamo_supported():
        return "torch._dynamo does not support this Python"
    if not has_triton():
        return "Triton is not installed"
    return None


def _origin(exc: BaseException) -> str:
    """``file:line in function`` of the innermost Python frame that raised ``exc`` (where a capture broke)."""
    import traceback

    frames = traceback.extract_tb(exc.__traceback__)
    if not frames:
        return "?"
    frame = frames[-1]
    return f"{frame.filename.rsplit('/', 2)[-1] if '/' in frame.filename else frame.filename}:{frame.lineno} in {frame.name}"


def _capture_hint(model: nn.Module) -> str:
    """Why a capture commonly fails: transformers' ``grouped_mm`` experts fall back to a loop over host-side offsets
    (a device-to-host copy) for weights other than bfloat16 on some versions; ``batched_mm`` stays on the device."""
    implementation = getattr(model.config, "_experts_implementation", None)
    dtype = next(model.parameters()).dtype
    if implementation == "grouped_mm" and dtype != torch.bfloat16:
        return (f" (the experts run transformers' grouped_mm on {dtype} weights, which can loop over host-side "
                "offsets; model.set_experts_implementation('batched_mm') keeps the step on the device)")
    return ""


def _replace(key: _SlotKey, **changes) -> _SlotKey:
    from dataclasses import replace

    return replace(key, **changes)
