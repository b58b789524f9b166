"""The static-cache engine on a tiny random OLMoE (float32, CPU: the eager path of the same decode step)."""

from __future__ import annotations

import warnings

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import moe_fastmask as mf
from moe_fastmask.pipeline.demo import build_tiny_olmoe
import numpy as np

from moe_fastmask.pipeline.generation import GenerationRequest, SamplingSettings, get_backend
from moe_fastmask.pipeline.generation.engine import StaticCacheEngine, counter_uniform, top_p_filter
from moe_fastmask.pipeline.generation.packing import sequence_seed


def request_of(prompts, groups=None, num_groups=2, sampling=None, **kwargs):
    return GenerationRequest(
        prompts=prompts, sampling=sampling or SamplingSettings(max_new_tokens=NEW), groups=groups,
        num_groups=num_groups, **kwargs,
    )  # fmt: skip

PROMPTS = [
    "How do I bake bread at home?",
    "Hi",
    "Write a poem about the sea and the wind, please.",
    "Tell me how to pick a lock.",
    "Sure, here is how to do it step by step.",
]
GROUPS = [0, 1, -1, 1, 0]
NEW = 12


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tiny_olmoe(tmp_path_factory.mktemp("tiny_olmoe_engine"), num_layers=3, seed=3)


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    return AutoTokenizer.from_pretrained(model_dir)


def load(model_dir, attn="sdpa"):
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation=attn).eval()
    return mf.apply(model)


@pytest.fixture(scope="module")
def batch(tokenizer):
    texts = [
        tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
        for p in PROMPTS
    ]
    enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    ids = [row[mask.bool()].tolist() for row, mask in zip(enc.input_ids, enc.attention_mask)]
    assert len({len(i) for i in ids}) > 2  # prompts of different lengths: left padding matters
    return enc, ids


@pytest.fixture(scope="module")
def eos_id(model_dir, tokenizer, batch):
    """A token some rows emit mid-way under greedy decoding and others never emit: EOS mid-batch."""
    enc, _ = batch
    model = load(model_dir)
    with torch.no_grad():
        free = model.generate(**enc, max_new_tokens=NEW, do_sample=False, eos_token_id=None, pad_token_id=tokenizer.pad_token_id)
    generated = free[:, enc.input_ids.shape[1] :].tolist()
    for row in generated:
        for t in range(2, NEW - 3):
            token = row[t]
            firsts = [r.index(token) if token in r else None for r in generated]
            finishing = [f for f in firsts if f is not None]
            if token not in row[:t] and None in firsts and all(f >= 2 for f in finishing):
                return token
    pytest.fail(f"no token ends some rows mid-way in {generated}")


def reference(model, tokenizer, enc, groups, eos, num_groups=2, **kwargs):
    """``model.generate`` under the recorder: sequences cut before the first EOS, and the counts."""
    rec = mf.RoutingRecorder(model, num_groups=num_groups)
    with torch.no_grad(), rec.record(groups, eos_token_id=eos):
        seq = model.generate(**enc, do_sample=False, eos_token_id=eos, pad_token_id=tokenizer.pad_token_id, **kwargs)
    tokens = []
    for row in seq[:, enc.input_ids.shape[1] :].tolist():
        tokens.append(row[: row.index(eos)] if eos in row else row)
    return tokens, rec


def engine_run(model, tokenizer, ids, groups, eos, num_groups=2, sampling=None, **engine_kwargs):
    engine = StaticCacheEngine(model, tokenizer, eos_token_id=eos, pad_token_id=tokenizer.pad_token_id, **engine_kwargs)
    request = request_of(ids, groups, num_groups, sampling)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return engine.generate(request)


def assert_counts_equal(out, rec):
    for name in ("prefill_counts", "decode_counts", "prefill_tokens", "decode_tokens"):
        assert np.array_equal(getattr(out, name), getattr(rec, name).cpu().numpy()), name


@pytest.mark.parametrize(
    "engine_kwargs",
    [
        {},  # one batch, bucket of 8 with 3 dummy rows
        {"max_batch_size": 2, "check_every": 1},  # three batches (the last a single row), early completion checks
        {"prefill_chunk_tokens": 12, "cache_multiple": 7},  # prefill in chunks of a few positions
    ],
    ids=["one-batch", "three-batches", "chunked-prefill"],
)
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_greedy_tokens_and_counts_equal_generate(model_dir, tokenizer, batch, eos_id, engine_kwargs, attn):
    enc, ids = batch
    model = load(model_dir, attn)
    expected, rec = reference(model, tokenizer, enc, GROUPS, eos_id, max_new_tokens=NEW)
    finished = [len(row) < NEW for row in expected]
    assert any(finished) and not all(finished)  # EOS mid-batch
    assert int(rec.decode_tokens.sum()) > 0
    out = engine_run(model, tokenizer, ids, GROUPS, eos_id, **engine_kwargs)
    assert out.tokens == expected
    assert out.num_prompt_tokens == [len(i) for i in ids]
    assert out.texts == tokenizer.batch_decode([row + [eos_id] * (len(row) < NEW) for row in expected], skip_special_tokens=True)
    assert_counts_equal(out, rec)


def test_chunked_prefill_equals_unchunked(model_dir, tokenizer, batch, eos_id):
    _, ids = batch
    model = load(model_dir)
    whole = engine_run(model, tokenizer, ids, GROUPS, eos_id)
    chunked = engine_run(model, tokenizer, ids, GROUPS, eos_id, prefill_chunk_tokens=8)  # 1 position per chunk
    assert chunked.tokens == whole.tokens
    for name in ("prefill_counts", "decode_counts", "prefill_tokens", "decode_tokens"):
        assert np.array_equal(getattr(chunked, name), getattr(whole, name)), name


def test_min_new_tokens_and_expert_mask_equal_generate(model_dir, tokenizer, batch, eos_id):
    enc, ids = batch
    model = load(model_dir)
    keep = torch.ones(3, 2, 8, dtype=torch.bool)
    keep[:, 1, :3] = False  # group 1 may not use experts 0-2
    keep[1, 0, 5:] = False
    mf.set_expert_mask(model, keep)
    expected, rec = reference(model, tokenizer, enc, GROUPS, eos_id, max_new_tokens=NEW, min_new_tokens=4)
    mf.set_expert_mask(model, None)
    engine = StaticCacheEngine(model, tokenizer, eos_token_id=eos_id, pad_token_id=tokenizer.pad_token_id)
    engine.set_expert_mask(torch.ones_like(keep))  # replaced below in place: the engine must read the new mask
    engine.set_expert_mask(keep)
    request = request_of(ids, GROUPS, 2, SamplingSettings(max_new_tokens=NEW, min_new_tokens=4))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = engine.generate(request)
    assert out.tokens == expected
    assert all(len(row) >= 4 for row in out.tokens)
    assert_counts_equal(out, rec)
    assert int(out.prefill_counts[:, 1, :3].sum() + out.decode_counts[:, 1, :3].sum()) == 0
    # a mask cleared on the model directly is no longer applied by the engine
    mf.set_expert_mask(model, None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        unmasked = engine.generate(request)
    assert int(unmasked.prefill_counts[:, 1, :3].sum()) > 0


def test_token_experts_match_counts(model_dir, tokenizer, batch, eos_id):
    _, ids = batch
    model = load(model_dir)
    engine = StaticCacheEngine(model, tokenizer, eos_token_id=eos_id, max_batch_size=2)
    request = request_of(ids, GROUPS, 2, record_token_experts=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = engine.generate(request)
    experts = out.token_experts
    for phase, counts in (("prefill", out.prefill_counts), ("decode", out.decode_counts)):
        recount = np.zeros_like(counts)
        for seq, group in enumerate(GROUPS):
            counted = experts[f"{phase}_counted"][seq]
            if group < 0:
                assert not counted.any()
                continue
            ids_seq = experts[phase][seq][counted].astype(np.int64)  # [T, L, K]
            for layer in range(counts.shape[0]):
                recount[layer, group] += np.bincount(ids_seq[:, layer].reshape(-1), minlength=counts.shape[2])
        assert np.array_equal(recount, counts), phase
    # counted prompt tokens are the real ones (right-aligned); counted decode tokens those fed back before EOS
    assert experts["prefill_counted"].sum(1).tolist() == [len(i) if g >= 0 else 0 for i, g in zip(ids, GROUPS)]
    assert all(experts["prefill_counted"][s, -len(i):].all() for s, (i, g) in enumerate(zip(ids, GROUPS)) if g >= 0)
    fed = [min(len(t), NEW - 1) for t in out.tokens]
    assert experts["decode_counted"].sum(1).tolist() == [f if g >= 0 else 0 for f, g in zip(fed, GROUPS)]
    assert experts["decode"].shape[1] == max(min(len(t) + 1, NEW) for t in out.tokens) - 1


def test_sampling_is_reproducible_and_independent_of_batching(model_dir, tokenizer, batch):
    _, ids = batch
    model = load(model_dir)
    sampling = SamplingSettings(max_new_tokens=NEW, do_sample=True, temperature=1.5, top_p=0.95, seed=7)
    first = engine_run(model, tokenizer, ids, None, tokenizer.eos_token_id, sampling=sampling)
    again = engine_run(model, tokenizer, ids, None, tokenizer.eos_token_id, sampling=sampling, max_batch_size=2)
    assert first.tokens == again.tokens
    assert first.prefill_counts is None  # no groups: nothing recorded
    other = SamplingSettings(max_new_tokens=NEW, do_sample=True, temperature=1.5, top_p=0.95, seed=8)
    assert engine_run(model, tokenizer, ids, None, tokenizer.eos_token_id, sampling=other).tokens != first.tokens
    greedy = engine_run(model, tokenizer, ids, None, tokenizer.eos_token_id)
    assert first.tokens != greedy.tokens
    # a nucleus this small holds only the most likely token: sampling becomes greedy
    narrow = SamplingSettings(max_new_tokens=NEW, do_sample=True, temperature=2.0, top_p=1e-6, seed=3)
    assert engine_run(model, tokenizer, ids, None, tokenizer.eos_token_id, sampling=narrow).tokens == greedy.tokens


def test_counter_uniform_and_top_p_filter():
    seeds, step = torch.tensor([sequence_seed(5, i) for i in range(4)]), torch.tensor(9)
    u = counter_uniform(seeds, step, 5000)
    assert u.shape == (4, 5000) and bool((u > 0).all() and (u < 1).all())
    assert abs(float(u.mean()) - 0.5) < 0.01
    assert torch.equal(u[1:], counter_uniform(seeds[1:], step, 5000))  # a row's numbers ignore the others
    assert not torch.equal(u, counter_uniform(seeds, step + 1, 5000))
    assert not torch.equal(u[0], u[1])
    # neighbouring seeds and steps give unrelated numbers
    assert abs(float(torch.corrcoef(torch.stack([u[0], u[1]]))[0, 1])) < 0.1
    assert sequence_seed(5, 0) != sequence_seed(6, 0) and -(2**63) <= sequence_seed(2**62, 7) < 2**63
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.25, 0.25, 0.25, 0.25]]))
    kept = top_p_filter(logits, torch.tensor(0.7)).isfinite()
    assert kept.tolist() == [[True, True, False, False], [True, True, True, False]]
    assert top_p_filter(logits, torch.tensor(1.0)).isfinite().all()


def test_bad_requests_raise(model_dir, tokenizer, batch):
    _, ids = batch
    model = load(model_dir)
    engine = StaticCacheEngine(model, tokenizer)
    with pytest.raises(ValueError, match=r"prompts\[1\] is empty"):
        engine.generate(_with_prompts(request_of([[1], [5]]), [[1], []]))
    with pytest.raises(ValueError, match=r"holds token ids outside"):
        engine.generate(request_of([[1, 10**6]]))
    with pytest.raises(ValueError, match="sequence_seeds has 2 entries for 5 prompts"):
        request_of(ids, sequence_seeds=[1, 2])
    with pytest.raises(ValueError, match="record_token_experts needs groups"):
        request_of(ids, record_token_experts=True)
    with pytest.raises(ValueError, match=r"eos_token_id must be token ids in \[0, "):
        StaticCacheEngine(model, eos_token_id=10**6)
    with pytest.raises(ValueError, match="max_batch_size must be a positive int"):
        StaticCacheEngine(model, max_batch_size=0)


def test_cpu_says_once_why_it_runs_eagerly(model_dir, tokenizer, batch):
    _, ids = batch
    engine = StaticCacheEngine(load(model_dir), tokenizer, max_batch_size=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        engine.generate(request_of(ids, sampling=SamplingSettings(max_new_tokens=3)))
    messages = [str(w.message) for w in caught if "StaticCacheEngine" in str(w.message)]
    assert len(messages) == 1 and "eagerly" in messages[0] and "cpu" in messages[0]


def test_batch_size_for_memory(model_dir, tokenizer):
    engine = StaticCacheEngine(load(model_dir), tokenizer, prefill_chunk_tokens=64, cache_multiple=16)
    cfg = engine.model.config
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    # 20 + 12 positions -> a cache of 32; float32 K and V of every layer, plus the logits' share
    per_sequence = 32 * cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * head_dim * 4 + engine.vocab * 4 * 6
    sizes = [engine.batch_size_for_memory(20, 12, free_bytes=n * per_sequence * 2, fraction=1.0, largest=1 << 20)
             for n in (64, 128, 1024)]  # fmt: skip
    # room for a little under 2n sequences once the prefill chunk is set aside: the power of two below
    assert sizes == [64, 128, 1024]
    assert engine.batch_size_for_memory(20, 12, free_bytes=10) == 1
    assert engine.batch_size_for_memory(20, 12, free_bytes=10**15) == 4096
    assert engine.batch_size_for_memory(20, 12) == 4096  # CPU: no device limit


def _with_prompts(request, prompts):
    """``request`` with other prompts, bypassing the request's own checks (to reach the engine's)."""
    object.__setattr__(request, "prompts", prompts)
    return request


def test_registered_as_graph_backend(model_dir, tokenizer, batch, eos_id):
    enc, ids = batch
    model = load(model_dir)
    model.generation_config.eos_token_id = eos_id
    backend = get_backend("graph", model, tokenizer)
    assert isinstance(backend, StaticCacheEngine) and backend.name == "graph"
    hf = get_backend("hf", model, tokenizer)
    request = request_of(ids, GROUPS, 2, record_token_experts=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a, b = backend.generate(request), hf.generate(request)
    assert a.tokens == b.tokens and a.texts == b.texts and a.num_prompt_tokens == b.num_prompt_tokens
    for name in ("prefill_counts", "decode_counts", "prefill_tokens", "decode_tokens"):
        assert np.array_equal(getattr(a, name), getattr(b, name)), name
    for key in ("prefill_counted", "decode_counted"):
        assert np.array_equal(a.token_experts[key], b.token_experts[key]), key
    for phase in ("prefill", "decode"):
        counted = a.token_experts[f"{phase}_counted"]
        assert np.array_equal(a.token_experts[phase][counted], b.token_experts[phase][counted]), phase


@pytest.mark.parametrize("where", ["generation_config", "model_config", "tokenizer"])
def test_backends_stop_at_the_same_eos_wherever_it_is_set(model_dir, batch, eos_id, where):
    """The EOS may live in the generation config, only in the model config, or only in the tokenizer: every backend
    resolves it the same way, stops there, and counts the same routing."""
    from moe_fastmask.pipeline.generation.hf import eos_token_ids

    enc, ids = batch
    model = load(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model.generation_config.eos_token_id = eos_id if where == "generation_config" else None
    model.config.eos_token_id = eos_id if where == "model_config" else None
    if where == "tokenizer":
        tokenizer.eos_token = tokenizer.convert_ids_to_tokens(eos_id)
    else:
        tokenizer.eos_token = None
    assert eos_token_ids(model, tokenizer) == [eos_id]
    request = request_of(ids, GROUPS, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = get_backend("hf", model, tokenizer).generate(request)
        graph = get_backend("graph", model, tokenizer).generate(request)
    want, rec = reference(model, tokenizer, enc, GROUPS, eos_id, max_new_tokens=NEW)
    assert hf.tokens == graph.tokens == want
    assert any(len(t) < NEW for t in want)  # some rows did stop at the EOS
    # the text runs to the EOS, included (here a plain token, so it shows), and not past it
    cut = [t + [eos_id] if len(t) < NEW else t for t in want]
    assert hf.texts == graph.texts == tokenizer.batch_decode(cut, skip_special_tokens=True)
    assert_counts_equal(hf, rec)
    assert_counts_equal(graph, rec)


def test_eos_resolution_rule():
    from types import SimpleNamespace as NS

    from moe_fastmask.pipeline.generation import resolve_eos_ids

    assert resolve_eos_ids(5, generation_config=NS(eos_token_id=1), tokenizer=NS(eos_token_id=2)) == [5]
    assert resolve_eos_ids(generation_config=NS(eos_token_id=[1, 3]), tokenizer=NS(eos_token_id=2)) == [1, 3]
    assert resolve_eos_ids(generation_config=NS(eos_token_id=None), model_config=NS(eos_token_id=np.int64(4)),
                           tokenizer=NS(eos_token_id=2)) == [4]
    assert resolve_eos_ids(generation_config=NS(eos_token_id=[]), model_config=NS(), tokenizer=NS(eos_token_id=2)) == [2]
    assert resolve_eos_ids(generation_config=None, model_config=None, tokenizer=None) == []
    with pytest.raises(ValueError, match="eos_token_id must be an int"):
        resolve_eos_ids(generation_config=NS(eos_token_id="</s>"))


def test_evaluate_answers_through_the_graph_engine(model_dir, tokenizer, batch, eos_id):
    from moe_fastmask.pipeline.evaluate import generate_answers

    model = load(model_dir)
    model.generation_config.eos_token_id = eos_id
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
             for p in PROMPTS]  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        graph = generate_answers(model, tokenizer, texts, batch_size=3, max_new_tokens=NEW, engine="graph")
    hf = generate_answers(model, tokenizer, texts, batch_size=3, max_new_tokens=NEW, engine="hf")
    assert graph == hf and any(graph)


def test_compile_auto_stays_eager_on_cpu(model_dir, tokenizer, batch, eos_id):
    _, ids = batch
    model = load(model_dir)
    plain = engine_run(model, tokenizer, ids, GROUPS, eos_id, compile=False)
    engine = StaticCacheEngine(model, tokenizer, eos_token_id=eos_id, pad_token_id=tokenizer.pad_token_id,
                               compile="auto")  # fmt: skip
    assert engine.compile is False and not engine.compiled
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        auto = engine.generate(request_of(ids, GROUPS))
    assert not [w for w in caught if "compile" in str(w.message)]
    assert auto.tokens == plain.tokens and auto.texts == plain.texts
    for name in ("prefill_counts", "decode_counts", "prefill_tokens", "decode_tokens"):
        assert np.array_equal(getattr(auto, name), getattr(plain, name)), name
    with pytest.raises(ValueError, match="compile must be True, False or 'auto', got 'yes'"):
        StaticCacheEngine(model, tokenizer, eos_token_id=eos_id, compile="yes")


def test_auto_compile_waits_for_enough_planned_work(model_dir, tokenizer, batch, eos_id, monkeypatch):
    """compile="auto" (where it may compile) compiles once plan_work announces enough decoding, not before."""
    from moe_fastmask.pipeline.generation import engine as engine_module

    _, ids = batch
    model = load(model_dir)
    plain = engine_run(model, tokenizer, ids, GROUPS, eos_id, compile=False)
    compiled_fns = []

    def spy_compile(fn, **kwargs):
        compiled_fns.append(fn)
        return lambda *args, **kw: fn(*args, **kw)

    monkeypatch.setattr(torch, "compile", spy_compile)
    engine = StaticCacheEngine(model, tokenizer, eos_token_id=eos_id, pad_token_id=tokenizer.pad_token_id)
    engine._compile_when_planned = True  # what compile="auto" leaves on a CUDA device where torch.compile works
    threshold = engine_module.COMPILE_PAYS_AFTER_SEQUENCE_STEPS
    engine.plan_work(threshold // 64 - 1, 64)
    assert not compiled_fns and not engine.compiled
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        engine.plan_work(threshold // 64, 64)
        engine.plan_work(threshold, 64)  # already compiled: not again
    assert len(compiled_fns) == 1 and engine.compiled
    assert any("compiling the decode step" in str(w.message) for w in caught)
    out = engine.generate(request_of(ids, GROUPS))
    assert out.tokens == plain.tokens
    for name in ("prefill_counts", "decode_counts"):
        assert np.array_equal(getattr(out, name), getattr(plain, name)), name
    eager = StaticCacheEngine(model, tokenizer, eos_token_id=eos_id, compile=False)
    eager.plan_work(threshold, 64)  # compile=False stays uncompiled whatever the work
    assert len(compiled_fns) == 1 and not eager.compiled


def test_prefill_chunk_sized_from_free_memory():
    from moe_fastmask.pipeline.generation.engine import (
        MAX_PREFILL_CHUNK_TOKENS,
        MIN_PREFILL_CHUNK_TOKENS,
        prefill_chunk_for_memory,
    )

    per_token = 150_000
    assert prefill_chunk_for_memory(per_token, None) == 16384  # unknown free memory (CPU)
    assert prefill_chunk_for_memory(per_token, 120 << 30) == MAX_PREFILL_CHUNK_TOKENS
    assert prefill_chunk_for_memory(per_token, 1 << 30) == MIN_PREFILL_CHUNK_TOKENS
    middle = prefill_chunk_for_memory(per_token, 10 << 30)
    assert MIN_PREFILL_CHUNK_TOKENS < middle < MAX_PREFILL_CHUNK_TOKENS and middle & (middle - 1) == 0
    assert middle * per_token <= 0.15 * (10 << 30) < 2 * middle * per_token


def test_a_forward_that_fails_to_compile_runs_uncompiled(model_dir, tokenizer, batch, eos_id, monkeypatch):
    _, ids = batch
    model = load(model_dir)
    plain = engine_run(model, tokenizer, ids, GROUPS, eos_id)
    calls = []

    def failing_compile(fn, **kwargs):
        def compiled(*args, **kw):
            calls.append(kwargs)
            raise RuntimeError("inductor broke")

        return compiled

    monkeypatch.setattr(torch, "compile", failing_compile)
    engine = StaticCacheEngine(model, tokenizer, eos_token_id=eos_id, pad_token_id=tokenizer.pad_token_id, compile=True)
    assert engine.compiled
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = engine.generate(request_of(ids, GROUPS))
    said = [str(w.message) for w in caught if "compile" in str(w.message)]
    assert len(calls) == 1 and not engine.compiled  # tried once, then the eager forward for good
    assert len(said) == 1 and "inductor broke" in said[0] and "uncompiled" in said[0]
    assert out.tokens == plain.tokens
    for name in ("prefill_counts", "decode_counts", "prefill_tokens", "decode_tokens"):
        assert np.array_equal(getattr(out, name), getattr(plain, name)), name


def test_on_phase_is_told_prefill_then_decode_per_gpu_batch(model_dir, tokenizer, batch, eos_id):
    _, ids = batch
    engine = StaticCacheEngine(load(model_dir), tokenizer, eos_token_id=eos_id, max_batch_size=2)
    phases = []
    engine.on_phase = phases.append
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        engine.generate(request_of(ids, GROUPS))
    assert phases == ["prefill", "decode", None] * 3  # five prompts: three GPU batches of at most two
