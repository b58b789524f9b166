"""The generation seam: the request/output records, the backend registry and the ``hf`` backend on a tiny OLMoE."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import moe_fastmask as mf
from moe_fastmask.pipeline import analyze, generation
from moe_fastmask.pipeline.common import prepare_tokenizer
from moe_fastmask.pipeline.demo import build_tiny_olmoe
from moe_fastmask.pipeline.generation import GenerationRequest, SamplingSettings, get_backend
from moe_fastmask.pipeline.generation.hf import HFGenerateBackend

L, E, K = 2, 8, 2
MAX_NEW = 6


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tiny_olmoe(tmp_path_factory.mktemp("gen") / "model", seed=0, num_layers=L, num_experts=E, top_k=K)


def load(model_dir):
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    return model, prepare_tokenizer(AutoTokenizer.from_pretrained(model_dir))


def prompts(tokenizer) -> list[list[int]]:
    texts = ["Tell me a story about a lock.", "Hi", "How do I bake bread at home, step by step?", "Why?"]
    return [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]


def greedy(max_new_tokens: int = MAX_NEW) -> SamplingSettings:
    return SamplingSettings(max_new_tokens=max_new_tokens)


def stock_generate(model, tokenizer, ids: list[list[int]], max_new_tokens: int = MAX_NEW) -> torch.Tensor:
    """``generate`` on the left-padded batch, no patch: the new tokens [B, max_new_tokens]."""
    tokenizer.padding_side = "left"
    batch = tokenizer.pad({"input_ids": ids}, padding=True, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(
            **batch, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id
        )
    return out[:, batch["input_ids"].shape[1] :]


# --------------------------------------------------------------------------------------------------------------
# Records and registry
# --------------------------------------------------------------------------------------------------------------


def test_request_and_settings_refuse_bad_input():
    with pytest.raises(ValueError, match="max_new_tokens"):
        SamplingSettings(max_new_tokens=0)
    with pytest.raises(ValueError, match="min_new_tokens"):
        SamplingSettings(max_new_tokens=4, min_new_tokens=5)
    with pytest.raises(ValueError, match="temperature"):
        SamplingSettings(max_new_tokens=4, do_sample=True, temperature=0.0)
    with pytest.raises(ValueError, match="at least one prompt"):
        GenerationRequest(prompts=[], sampling=greedy())
    with pytest.raises(ValueError, match="prompt 1 of the request is empty"):
        GenerationRequest(prompts=[[1, 2], []], sampling=greedy())
    with pytest.raises(ValueError, match="groups has 1 entries for 2 prompts"):
        GenerationRequest(prompts=[[1], [2]], sampling=greedy(), groups=[0])
    with pytest.raises(ValueError, match=r"groups must lie in \[-1, 2\)"):
        GenerationRequest(prompts=[[1], [2]], sampling=greedy(), groups=[0, 2])
    with pytest.raises(ValueError, match="record_token_experts needs groups"):
        GenerationRequest(prompts=[[1]], sampling=greedy(), record_token_experts=True)


def test_registry_names_the_choices(model_dir):
    assert "hf" in generation.backend_names()
    model, tokenizer = load(model_dir)
    backend = get_backend("hf", model, tokenizer)
    assert isinstance(backend, HFGenerateBackend) and isinstance(backend, generation.GenerationBackend)
    with pytest.raises(ValueError, match="unknown generation engine 'nope'; choose one of hf"):
        get_backend("nope", model, tokenizer)
    with pytest.raises(ValueError, match="engine must be one of"):
        analyze.AnalysisConfig(model="m", data="d", engine="nope").validate()


# --------------------------------------------------------------------------------------------------------------
# The hf backend
# --------------------------------------------------------------------------------------------------------------


def test_plain_request_equals_stock_generate_and_leaves_the_model_unpatched(model_dir):
    model, tokenizer = load(model_dir)
    ids = prompts(tokenizer)
    want = stock_generate(model, tokenizer, ids)
    out = get_backend("hf", model, tokenizer).generate(GenerationRequest(prompts=ids, sampling=greedy()))
    assert not mf.is_patched(model)
    assert out.texts == tokenizer.batch_decode(want, skip_special_tokens=True)
    assert out.num_prompt_tokens == [len(p) for p in ids]
    assert out.prefill_counts is None and out.decode_counts is None and out.token_experts is None
    eos = model.generation_config.eos_token_id
    for row, tokens in zip(want.tolist(), out.tokens):
        cut = row.index(eos) if eos in row else len(row)
        assert tokens == row[:cut]


def test_tokens_are_cut_before_the_first_eos(model_dir):
    model, tokenizer = load(model_dir)
    ids = prompts(tokenizer)
    free = stock_generate(model, tokenizer, ids)
    eos = int(free[0, 2])  # a token the first row generates third: make it the EOS
    model.generation_config.eos_token_id = eos
    backend = get_backend("hf", model, tokenizer)
    out = backend.generate(GenerationRequest(prompts=ids, sampling=greedy(), groups=[0, 0, 1, 1]))
    assert out.tokens[0] == free[0, :2].tolist()
    assert out.num_generated_tokens[0] == 2
    for tokens in out.tokens:
        assert eos not in tokens


def test_counts_follow_the_counting_rules(model_dir):
    model, tokenizer = load(model_dir)
    ids = prompts(tokenizer)
    groups = [0, -1, 1, 0]
    backend = get_backend("hf", model, tokenizer)
    out = backend.generate(
        GenerationRequest(prompts=ids, sampling=greedy(), groups=groups, record_token_experts=True)
    )
    assert mf.is_patched(model)
    for name in ("prefill_counts", "decode_counts"):
        counts = getattr(out, name)
        assert isinstance(counts, np.ndarray) and counts.dtype == np.int64 and counts.shape == (L, 2, E)
    g = np.asarray(groups)
    # every prompt token of a counted row, no padding, nothing of group -1
    want_prefill = [sum(len(ids[i]) for i in np.flatnonzero(g == group)) for group in (0, 1)]
    assert out.prefill_tokens.tolist() == want_prefill
    # each generated token fed back to the model, before the row's first EOS (the last one is never fed back)
    fed = [min(n, MAX_NEW - 1) for n in out.num_generated_tokens]
    assert out.decode_tokens.tolist() == [sum(fed[i] for i in np.flatnonzero(g == group)) for group in (0, 1)]
    for counts, tokens in ((out.prefill_counts, out.prefill_tokens), (out.decode_counts, out.decode_tokens)):
        assert (counts.sum(axis=-1) == K * tokens[None, :]).all()
    # the per-token experts add up to the group counts
    for phase in ("prefill", "decode"):
        experts, counted = out.token_experts[phase], out.token_experts[f"{phase}_counted"]
        assert experts.dtype == np.uint8 and counted.dtype == bool and experts.shape[:2] == counted.shape
        assert not counted[g == -1].any()
        for group in (0, 1):
            rows = counted & (g == group)[:, None]
            chosen = experts[rows]  # [N, L, K]
            per_layer = np.stack([np.bincount(chosen[:, layer].ravel(), minlength=E) for layer in range(L)])
            assert np.array_equal(per_layer, getattr(out, f"{phase}_counts")[:, group])


def test_outputs_are_host_copies_that_the_next_request_leaves_alone(model_dir):
    model, tokenizer = load(model_dir)
    ids = prompts(tokenizer)
    backend = get_backend("hf", model, tokenizer)
    first = backend.generate(GenerationRequest(prompts=ids, sampling=greedy(), groups=[0, 1, 0, 1]))
    kept = first.prefill_counts.copy()
    backend.generate(GenerationRequest(prompts=ids[:1], sampling=greedy(), groups=[1]))
    assert np.array_equal(first.prefill_counts, kept)


def test_sampling_seed_makes_requests_repeatable(model_dir):
    model, tokenizer = load(model_dir)
    ids = prompts(tokenizer)
    backend = get_backend("hf", model, tokenizer)

    def sample(seed):
        settings = SamplingSettings(max_new_tokens=MAX_NEW, do_sample=True, temperature=1.5, top_p=0.95, seed=seed)
        return backend.generate(GenerationRequest(prompts=ids, sampling=settings)).tokens

    first = sample(11)
    torch.manual_seed(12345)  # the generator state in between does not matter
    assert sample(11) == first
    # the seed is set right before generate: the same draw as seeding by hand
    torch.manual_seed(11)
    tokenizer.padding_side = "left"
    batch = tokenizer.pad({"input_ids": ids}, padding=True, return_tensors="pt")
    with torch.no_grad():
        raw = model.generate(**batch, max_new_tokens=MAX_NEW, do_sample=True, temperature=1.5, top_p=0.95, top_k=0,
                             pad_token_id=tokenizer.pad_token_id)[:, batch["input_ids"].shape[1] :]  # fmt: skip
    eos = model.generation_config.eos_token_id
    assert first == [row[: row.index(eos)] if eos in row else row for row in raw.tolist()]


def test_expert_mask_steers_and_close_restores_the_model(model_dir):
    model, tokenizer = load(model_dir)
    ids = prompts(tokenizer)
    want = stock_generate(model, tokenizer, ids)
    backend = get_backend("hf", model, tokenizer, op_backend="torch")
    keep = torch.ones(L, 1, E, dtype=torch.bool)
    off = [(0, 1), (0, 6), (1, 2), (1, 3)]
    for layer, expert in off:
        keep[layer, 0, expert] = False
    backend.set_expert_mask(keep)
    out = backend.generate(
        GenerationRequest(prompts=ids, sampling=greedy(), groups=[0, 1, 0, 1], record_token_experts=True)
    )
    for layer, expert in off:
        assert out.prefill_counts[layer, :, expert].sum() == 0 and out.decode_counts[layer, :, expert].sum() == 0
    for phase in ("prefill", "decode"):
        experts, counted = out.token_experts[phase], out.token_experts[f"{phase}_counted"]
        for layer, expert in off:
            assert not (experts[counted][:, layer] == expert).any()
    backend.close()
    assert not mf.is_patched(model)
    assert torch.equal(stock_generate(model, tokenizer, ids), want)


def test_close_keeps_a_patch_and_mask_it_did_not_add(model_dir):
    model, tokenizer = load(model_dir)
    mf.apply_to_olmoe(model, backend="torch")
    keep = torch.ones(L, 1, E, dtype=torch.bool)
    keep[0, 0, :3] = False
    mf.set_expert_mask(model, keep)
    backend = get_backend("hf", model, tokenizer, op_backend="torch")
    backend.generate(GenerationRequest(prompts=prompts(tokenizer), sampling=greedy(), groups=[0, 1, 0, 1]))
    backend.close()
    assert mf.is_patched(model)
    out = get_backend("hf", model, tokenizer, op_backend="torch").generate(
        GenerationRequest(prompts=prompts(tokenizer), sampling=greedy(), groups=[0, 0, 0, 0])
    )
    assert out.prefill_counts[0, 0, :3].sum() == 0  # the caller's mask still holds


# --------------------------------------------------------------------------------------------------------------
# A further backend needs no change in analyze
# --------------------------------------------------------------------------------------------------------------


class CountingBackend(HFGenerateBackend):
    """A registered backend of its own (here: the hf one, counting its requests)."""

    name = "counting"
    requests: list[int] = []

    def generate(self, request):
        CountingBackend.requests.append(len(request.prompts))
        return super().generate(request)


def test_a_registered_backend_is_used_by_analyze(model_dir, monkeypatch, tmp_path):
    from moe_fastmask.pipeline.batching import plan_batches
    from moe_fastmask.pipeline.data import validate_records

    monkeypatch.setitem(generation.BACKENDS, "counting", f"{__name__}:CountingBackend")
    model, tokenizer = load(model_dir)
    records = validate_records([
        {"id": i, "goal": f"Explain topic {i}.", "judge_success_gpt4": 1,
         "all_prompt": [{"role": "user", "content": f"Pretend and explain topic {i}."}]}
        for i in range(4)
    ])  # fmt: skip
    batches = plan_batches(records, batch_size=4, safe_ratio=0.5, seed=0)
    results = {}
    for engine in ("hf", "counting"):
        config = analyze.AnalysisConfig(model="m", data="d", engine=engine, max_new_tokens=4, verbose=False)
        config.validate()
        results[engine] = analyze.process_mixed_batches(model, tokenizer, batches, config)
    assert CountingBackend.requests == [4] * len(batches)
    for a, b in zip(results["hf"], results["counting"]):
        assert a["batch_outputs"] == b["batch_outputs"]
        assert np.array_equal(a["safe_routings"], b["safe_routings"])
        assert np.array_equal(a["group_counts"]["decode"], b["group_counts"]["decode"])


def test_closed_backend_keeps_nothing_alive(model_dir):
    import gc
    import weakref

    model, tokenizer = load(model_dir)
    backend = get_backend("hf", model, tokenizer, op_backend="torch")
    keep = torch.ones(L, 1, E, dtype=torch.bool)
    keep[0, 0, :2] = False
    backend.set_expert_mask(keep)
    backend.generate(GenerationRequest(prompts=prompts(tokenizer), sampling=greedy(), groups=[0, 1, 0, 1]))
    ref = weakref.ref(model)
    backend.close()
    backend.close()  # a second close is harmless
    del model
    gc.collect()
    assert ref() is None  # the backend object itself still exists, but no longer holds the model


def test_one_new_token_gives_empty_decode_experts_per_row(model_dir):
    """With one new token no decode forward runs: the per-token decode arrays still hold one (empty) row per
    sequence, [B, 0, L, K], as the other backends give them."""
    model, tokenizer = load(model_dir)
    ids = prompts(tokenizer)
    out = get_backend("hf", model, tokenizer).generate(
        GenerationRequest(prompts=ids, sampling=greedy(1), groups=[0, 1, 0, 1], record_token_experts=True)
    )
    experts = out.token_experts
    assert experts["decode"].shape[:2] == (len(ids), 0) and experts["decode"].shape[2] == L
    assert experts["decode_counted"].shape == (len(ids), 0)
    assert experts["prefill"].shape[0] == len(ids) and experts["prefill_counted"].any()
