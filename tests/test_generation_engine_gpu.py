"""The static-cache engine on a CUDA device: the replayed decode graph against ``generate`` and the eager step.

Skipped on machines without a GPU.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import moe_fastmask as mf
from moe_fastmask.pipeline.demo import build_tiny_olmoe
from moe_fastmask.pipeline.generation import GenerationRequest, SamplingSettings
from moe_fastmask.pipeline.generation.engine import StaticCacheEngine

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

from test_generation_engine import GROUPS, NEW, PROMPTS  # noqa: E402  (the CPU tests' batch: the same cases)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tiny_olmoe(tmp_path_factory.mktemp("tiny_engine_gpu"), num_layers=3, seed=3)


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    return AutoTokenizer.from_pretrained(model_dir)


def load(model_dir, dtype=torch.float32):
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).cuda().eval()
    if dtype != torch.bfloat16 and hasattr(model, "set_experts_implementation"):
        # transformers' grouped_mm experts loop over host-side offsets for float32 weights on some versions (a
        # device-to-host copy, which a CUDA graph cannot capture); batched_mm stays on the device
        model.set_experts_implementation("batched_mm")
    return mf.apply(model)


@pytest.fixture(scope="module")
def batch(tokenizer):
    texts = [
        tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
        for p in PROMPTS
    ]
    enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to("cuda")
    ids = [row[mask.bool()].tolist() for row, mask in zip(enc.input_ids.cpu(), enc.attention_mask.cpu())]
    return enc, ids


def run(engine, ids, groups=GROUPS, **sampling):
    settings = SamplingSettings(**{"max_new_tokens": NEW, **sampling})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = engine.generate(GenerationRequest(prompts=ids, sampling=settings, groups=groups, num_groups=2))
    return out, [str(w.message) for w in caught if "StaticCacheEngine" in str(w.message)]


def assert_same(a, b):
    assert a.tokens == b.tokens
    for name in ("prefill_counts", "decode_counts", "prefill_tokens", "decode_tokens"):
        assert np.array_equal(getattr(a, name), getattr(b, name)), name


def assert_totals_match_tokens(out, ids, groups, new):
    """The counted tokens recounted from what was generated: every real prompt token; each generated token fed
    back before its sequence's EOS (at most ``new - 1``); ``top_k`` experts per token and layer."""
    prefill, decode = np.zeros(2, np.int64), np.zeros(2, np.int64)
    for prompt, tokens, g in zip(ids, out.tokens, groups):
        if g >= 0:
            prefill[g] += len(prompt)
            decode[g] += min(len(tokens), new - 1)
    assert out.prefill_tokens.tolist() == prefill.tolist() and out.decode_tokens.tolist() == decode.tolist()
    top_k = out.prefill_counts[0].sum() // max(1, prefill.sum())
    for counts, tokens in ((out.prefill_counts, prefill), (out.decode_counts, decode)):
        assert (counts.sum(-1) == tokens[None, :] * top_k).all()


def test_graph_equals_generate_with_eos_mid_batch(model_dir, tokenizer, batch):
    enc, ids = batch
    model = load(model_dir)
    with torch.no_grad():
        free = model.generate(**enc, max_new_tokens=NEW, do_sample=False, eos_token_id=None, pad_token_id=tokenizer.pad_token_id)
    generated = free[:, enc.input_ids.shape[1] :].tolist()
    eos = next(
        row[t] for row in generated for t in range(2, NEW - 3)
        if row[t] not in row[:t] and any(row[t] not in other for other in generated)
    )  # fmt: skip
    rec = mf.RoutingRecorder(model, num_groups=2)
    with torch.no_grad(), rec.record(GROUPS, eos_token_id=eos):
        seq = model.generate(**enc, max_new_tokens=NEW, do_sample=False, eos_token_id=eos, pad_token_id=tokenizer.pad_token_id)
    expected = [row[: row.index(eos)] if eos in row else row for row in seq[:, enc.input_ids.shape[1] :].tolist()]
    engine = StaticCacheEngine(model, tokenizer, eos_token_id=eos, pad_token_id=tokenizer.pad_token_id, check_every=2)
    out, said = run(engine, ids)
    assert not said  # captured: nothing to say
    assert all(slot.graph is not None for slot in engine._slots.values())
    assert out.tokens == expected
    assert any(len(row) < NEW for row in expected) and not all(len(row) < NEW for row in expected)  # EOS mid-batch
    assert np.array_equal(out.prefill_counts, rec.prefill_counts.cpu().numpy())
    assert np.array_equal(out.decode_counts, rec.decode_counts.cpu().numpy())
    again, _ = run(engine, ids)  # the graph replayed for a second request
    assert_same(again, out)


@pytest.mark.parametrize("sampling", [{}, {"do_sample": True, "temperature": 1.3, "top_p": 0.9, "seed": 4}])
def test_graph_equals_eager_bf16(model_dir, tokenizer, batch, sampling):
    _, ids = batch
    model = load(model_dir, torch.bfloat16)
    graphed = StaticCacheEngine(model, tokenizer, max_batch_size=4)  # two batches: buckets 4 and 1
    eager = StaticCacheEngine(model, tokenizer, max_batch_size=4, use_cuda_graph=False)
    out_graph, _ = run(graphed, ids, min_new_tokens=3, **sampling)
    out_eager, said = run(eager, ids, min_new_tokens=3, **sampling)
    assert said == ["StaticCacheEngine: the decode step runs eagerly: use_cuda_graph=False"]
    assert_totals_match_tokens(out_graph, ids, GROUPS, NEW)
    assert_totals_match_tokens(out_eager, ids, GROUPS, NEW)
    assert_same(out_graph, out_eager)


def test_mask_changed_after_capture_is_read_by_the_graph(model_dir, tokenizer, batch):
    _, ids = batch
    model = load(model_dir)
    engine = StaticCacheEngine(model, tokenizer)
    keep = torch.ones(3, 2, 8, dtype=torch.bool)
    engine.set_expert_mask(keep)
    run(engine, ids)  # captures with the all-keep mask
    keep[:, 1, :4] = False
    engine.set_expert_mask(keep)
    out, _ = run(engine, ids)
    eager = StaticCacheEngine(model, tokenizer, use_cuda_graph=False)
    expected, _ = run(eager, ids)
    assert_same(out, expected)
    assert int(out.decode_counts[:, 1, :4].sum()) == 0
    assert all(slot.graph is not None for slot in engine._slots.values())  # the mask change did not force eager


def test_compiled_decode_counts_every_step(model_dir, tokenizer, batch):
    """Compiled kernels may round differently, so tokens can differ; the counted token totals cannot."""
    _, ids = batch
    model = load(model_dir)
    compiled = StaticCacheEngine(model, tokenizer, compile=True)
    eager = StaticCacheEngine(model, tokenizer, use_cuda_graph=False)
    out, said = run(compiled, ids, min_new_tokens=NEW)
    expected, _ = run(eager, ids, min_new_tokens=NEW)
    assert not said, said
    assert np.array_equal(out.prefill_counts, expected.prefill_counts)  # prefill is never compiled
    assert np.array_equal(out.decode_tokens, expected.decode_tokens)
    assert np.array_equal(out.decode_counts.sum(-1), expected.decode_counts.sum(-1))
    assert_totals_match_tokens(out, ids, GROUPS, NEW)


def test_analysis_packed_through_the_graph_engine_equals_unpacked(tmp_path):
    """analyze on the GPU with the graph engine: several method batches per request give the artifacts of one
    batch per request (float32, capturable experts)."""
    import sys
    from pathlib import Path

    from moe_fastmask.pipeline.analyze import AnalysisConfig, run_analysis
    from moe_fastmask.pipeline.demo import build_demo

    sys.path.insert(0, str(Path(__file__).parent))
    from compare_artifacts import compare

    model_dir, data = build_demo(tmp_path / "inputs")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = load(model_dir)
    runs = {}
    for name, size in (("alone", 8), ("packed", 32)):
        config = AnalysisConfig(model=str(model_dir), data=str(data), out=str(tmp_path / name), batch_size=8,
                                num_batches=6, max_new_tokens=8, engine="graph", gpu_batch_size=size, device="cuda",
                                engine_compile="off", progress=False, verbose=False)  # fmt: skip
        runs[name] = run_analysis(config, model=model, tokenizer=tokenizer)
    assert compare(tmp_path / "alone", tmp_path / "packed") == []


def test_token_experts_recorded_inside_the_graph(model_dir, tokenizer, batch):
    """Per-token decode experts go to device buffers: the step stays captured and gives the eager step's experts."""
    _, ids = batch
    model = load(model_dir)
    request = GenerationRequest(prompts=ids, sampling=SamplingSettings(max_new_tokens=NEW), groups=GROUPS,
                                num_groups=2, record_token_experts=True)  # fmt: skip
    graphed = StaticCacheEngine(model, tokenizer)
    eager = StaticCacheEngine(model, tokenizer, use_cuda_graph=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = graphed.generate(request)
    assert not [str(w.message) for w in caught if "StaticCacheEngine" in str(w.message)]
    assert all(slot.graph is not None for slot in graphed._slots.values())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = eager.generate(request)
    assert_same(out, expected)
    for key, value in expected.token_experts.items():
        assert np.array_equal(out.token_experts[key], value), key
    counted = out.token_experts["decode_counted"]
    assert counted.sum() == out.decode_tokens.sum() and counted.any()
