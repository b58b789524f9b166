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


def test_row_groups_buffer_replaces_host_eos_tracking(model, monkeypatch):
    """A backend's device buffer of per-row groups, rewritten in place (-1 once a row has fed back its EOS), gives
    the counts of the recorder's own EOS tracking, and the hook reads it without any host staging."""
    from transformers import DynamicCache

    import moe_fastmask.integrations.patch as patch

    auto = run(model, mf.RoutingRecorder(model), fresh_cache=False, phases=False)
    prompt, mask, fed = inputs()
    position = (mask.cumsum(-1) - 1).clamp(min=0)
    key = cache_kwarg(model)
    cache = DynamicCache(config=model.config)
    rec = mf.RoutingRecorder(model)
    rows = torch.tensor(GROUPS, dtype=torch.int64)
    finished = torch.zeros(BATCH, dtype=torch.bool)
    staged = []
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self, *a, **k: staged.append(self) or self)
    monkeypatch.setattr(patch.torch, "isin", lambda *a, **k: pytest.fail("host-side EOS tracking ran"))
    with torch.no_grad(), rec.record(GROUPS, eos_token_id=EOS, phase="prefill"):
        staged.clear()  # record() stages the block's groups once, before any forward
        rec.set_row_groups(rows)
        model(input_ids=prompt, attention_mask=mask, position_ids=position, use_cache=True, **{key: cache})
        rec.set_phase("decode")
        for step in range(STEPS):
            finished |= fed[:, step] == EOS
            rows.copy_(torch.where(finished, -1, torch.tensor(GROUPS)))  # in place: the buffer keeps its identity
            mask = torch.cat([mask, torch.ones(BATCH, 1, dtype=torch.long)], dim=1)
            position = position[:, -1:] + 1
            cache = copy.deepcopy(cache)
            model(input_ids=fed[:, step : step + 1], attention_mask=mask, position_ids=position, use_cache=True,
                  **{key: cache})  # fmt: skip
        assert state_alive(model) is None
    assert staged == []
    assert rec.row_groups is None  # ends with the block
    for got, want in zip((rec.prefill_counts, rec.decode_counts, rec.prefill_tokens, rec.decode_tokens), auto):
        assert torch.equal(got, want)


def state_alive(model):
    from moe_fastmask.integrations.state import state_of

    return state_of(model).recording.alive


def test_row_groups_are_checked(model):
    rec = mf.RoutingRecorder(model)
    with pytest.raises(ValueError, match="1-D int64 tensor"):
        rec.set_row_groups(torch.zeros(3, dtype=torch.int32))
    prompt, mask, _ = inputs()
    with torch.no_grad(), rec.record(GROUPS):
        rec.set_row_groups(torch.zeros(BATCH + 1, dtype=torch.int64))
        with pytest.raises(ValueError, match="4 row groups were set but the batch holds 3 sequences"):
            model(input_ids=prompt, attention_mask=mask)


def test_same_shape_mask_keeps_its_buffer(model):
    """A new mask of the current shape is written into the routers' buffer (captured graphs read it at replay);
    the buffer is never the caller's tensor."""
    from moe_fastmask.integrations.state import state_of

    state = state_of(model)
    keep = torch.ones(state.num_layers, 2, state.num_experts, dtype=torch.bool)
    mf.set_expert_mask(model, keep)
    buffer = state.keep
    assert buffer is not keep and buffer.data_ptr() != keep.data_ptr()
    keep[:, 1, :3] = False
    assert bool(buffer.all())  # the caller's later edits do not leak in
    mf.set_expert_mask(model, keep)
    assert state.keep is buffer and torch.equal(buffer, keep)
    mf.set_expert_mask(model, keep[:, :1].clone())  # another shape: a new buffer
    assert state.keep is not buffer and state.keep.shape[1] == 1
    mf.set_expert_mask(model, None)
    assert state.keep is None


def test_decode_sink_holds_the_logged_experts(model):
    """Decode experts written into the caller's device buffers (graph-safe) equal the recorder's host-side log."""
    from transformers import DynamicCache

    prompt, mask, fed = inputs()
    key = cache_kwarg(model)
    results = []
    for use_sink in (False, True):
        rec = mf.RoutingRecorder(model, record_token_experts=True)
        sink = torch.full((BATCH, STEPS + 2, rec.num_layers, rec.top_k), 255, dtype=torch.uint8)
        position = torch.zeros(1, dtype=torch.int64)
        step_mask, step_position = mask, (mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache(config=model.config)
        with torch.no_grad(), rec.record(GROUPS, eos_token_id=EOS):
            model(input_ids=prompt, attention_mask=step_mask, position_ids=step_position, use_cache=True,
                  **{key: cache})  # fmt: skip
            if use_sink:
                rec.set_phase("decode")
                rec.set_decode_sink(sink, position)
            for step in range(STEPS):
                position.fill_(step)
                step_mask = torch.cat([step_mask, torch.ones(BATCH, 1, dtype=torch.long)], dim=1)
                step_position = step_position[:, -1:] + 1
                model(input_ids=fed[:, step : step + 1], attention_mask=step_mask, position_ids=step_position,
                      use_cache=True, **{key: cache})  # fmt: skip
        assert rec.decode_sink is None  # ends with the block
        results.append((rec.token_experts(), sink, rec.decode_counts.clone()))
    (logged, _, counts), (with_sink, sink, sink_counts) = results
    assert torch.equal(sink[:, :STEPS], logged["decode"])  # every step, every layer
    assert bool((sink[:, STEPS:] == 255).all())  # nothing written past the steps run
    assert with_sink["decode"].shape[1] == 0  # nothing went to the host log
    assert torch.equal(with_sink["prefill"], logged["prefill"]) and torch.equal(sink_counts, counts)
    rec = mf.RoutingRecorder(model)
    with pytest.raises(RuntimeError, match="record_token_experts=True"):
        rec.set_decode_sink(sink, position)
    rec = mf.RoutingRecorder(model, record_token_experts=True)
    with pytest.raises(ValueError, match=r"expert_ids must be uint8 \[batch, steps, 2, 2\]"):
        rec.set_decode_sink(sink[..., :1], position)
