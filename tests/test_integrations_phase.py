"""Prefill vs decode: the automatic rule (cache identity, what transformers' ``generate`` gives) and the explicit
override a generation backend sets (``RoutingRecorder.set_phase`` / ``record(..., phase=...)``)."""

from __future__ import annotations

import copy
import inspect

import pytest
import torch

import moe_fastmask as mf
from moe_fastmask.pipeline.demo import tiny_olmoe_config


BATCH, PROMPT, STEPS, VOCAB, EOS = 3, 6, 5, 96, 7
GROUPS = [0, 1, 1]


def cache_kwarg(model) -> str:
    """``cache`` in newer transformers, ``past_key_values`` before (both reach the pre-hook)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


@pytest.fixture(scope="module")
def model():
    from transformers import OlmoeForCausalLM

    torch.manual_seed(0)
    model = OlmoeForCausalLM(tiny_olmoe_config(VOCAB, num_layers=2, num_experts=8, top_k=2, eos_token_id=EOS))
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.gate.weight.mul_(4.0)
    return mf.apply(model.eval(), backend="torch")


def inputs():
    gen = torch.Generator().manual_seed(3)
    prompt = torch.randint(8, VOCAB, (BATCH, PROMPT), generator=gen)
    mask = torch.ones(BATCH, PROMPT, dtype=torch.long)
    mask[2, :2] = 0  # left padding
    fed = torch.randint(8, VOCAB, (BATCH, STEPS), generator=gen)
    fed[0, 1] = EOS  # sequence 0 finished: the tokens from this step on are not counted
    return prompt, mask, fed


def run(model, rec, *, fresh_cache: bool, phases: bool):
    """A hand-driven prefill + ``STEPS`` decode forwards; ``fresh_cache``: each step gets a copy of the cache (as a
    backend that manages its own cache would pass), so cache identity can no longer tell decode from prefill."""
    from transformers import DynamicCache

    prompt, mask, fed = inputs()
    position = (mask.cumsum(-1) - 1).clamp(min=0)
    key = cache_kwarg(model)
    cache = DynamicCache(config=model.config)  # made before the prefill, as ``generate`` does
    with torch.no_grad(), rec.record(GROUPS, eos_token_id=EOS):
        if phases:
            rec.set_phase("prefill")
        model(input_ids=prompt, attention_mask=mask, position_ids=position, use_cache=True, **{key: cache})
        if phases:
            rec.set_phase("decode")
        for step in range(STEPS):
            mask = torch.cat([mask, torch.ones(BATCH, 1, dtype=torch.long)], dim=1)
            position = position[:, -1:] + 1
            if fresh_cache:  # the previous copy is freed: its id may come back, which must not make this decode
                cache = copy.deepcopy(cache)
            model(
                input_ids=fed[:, step : step + 1], attention_mask=mask, position_ids=position,
                use_cache=True, **{key: cache},
            )
    return rec.prefill_counts.clone(), rec.decode_counts.clone(), rec.prefill_tokens, rec.decode_tokens


def expected_tokens():
    prompt, mask, fed = inputs()
    prefill = torch.zeros(2, dtype=torch.int64)
    decode = torch.zeros(2, dtype=torch.int64)
    for b, g in enumerate(GROUPS):
        prefill[g] += int(mask[b].sum())
        finished = (fed[b] == EOS).cumsum(0) > 0  # a fed EOS: this and every later step are after the end
        decode[g] += int((~finished).sum())
    return prefill, decode


def test_automatic_rule_follows_cache_identity(model):
    prefill, decode, prefill_tokens, decode_tokens = run(model, mf.RoutingRecorder(model), fresh_cache=False, phases=False)
    want_prefill, want_decode = expected_tokens()
    assert torch.equal(prefill_tokens, want_prefill) and torch.equal(decode_tokens, want_decode)
    # a backend passing new cache objects defeats the automatic rule: every forward counts as a prompt
    rec = mf.RoutingRecorder(model)
    fresh_prefill, fresh_decode, fresh_prefill_tokens, fresh_decode_tokens = run(model, rec, fresh_cache=True, phases=False)
    assert int(fresh_decode.sum()) == 0 and int(fresh_decode_tokens.sum()) == 0
    assert int(fresh_prefill_tokens.sum()) > int(want_prefill.sum())


def test_set_phase_overrides_cache_identity(model):
    auto = run(model, mf.RoutingRecorder(model), fresh_cache=False, phases=False)
    rec = mf.RoutingRecorder(model)
    explicit = run(model, rec, fresh_cache=True, phases=True)
    for got, want in zip(explicit, auto):
        assert torch.equal(got, want)  # same counts, prefill and decode, EOS handling included
    assert rec.phase_override is None  # a phase set inside a block ends with it
    rec.set_phase("decode")
    rec.set_phase(None)
    assert rec.phase_override is None


def test_record_phase_argument_applies_to_the_block_only(model):
    prompt, mask, _ = inputs()
    rec = mf.RoutingRecorder(model)
    with torch.no_grad(), rec.record(GROUPS, phase="decode"):
        model(input_ids=prompt, attention_mask=mask)  # no cache at all: automatically a prompt
    assert rec.phase_override is None  # restored on exit
    assert int(rec.prefill_counts.sum()) == 0
    assert torch.equal(rec.decode_tokens, expected_tokens()[0])
    rec.reset()
    rec.set_phase("prefill")
    with torch.no_grad(), rec.record(GROUPS, phase="decode"):
        model(input_ids=prompt, attention_mask=mask)
    assert rec.phase_override == "prefill" and int(rec.prefill_counts.sum()) == 0
    with torch.no_grad(), rec.record(GROUPS):
        model(input_ids=prompt, attention_mask=mask)
    assert torch.equal(rec.prefill_tokens, expected_tokens()[0])


def test_bad_phase_is_refused(model):
    rec = mf.RoutingRecorder(model)
    with pytest.raises(ValueError, match="phase must be 'prefill', 'decode' or None, got 'all'"):
        rec.set_phase("all")
    with pytest.raises(ValueError, match="got 'generate'"), rec.record(GROUPS, phase="generate"):
        pass
    assert rec.phase_override is None
