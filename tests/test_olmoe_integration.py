"""The OLMoE integration on a tiny random OLMoE (3 layers, 8 experts, top-2) and an offline tokenizer."""

from __future__ import annotations

import copy
import inspect
import json
import warnings

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import moe_fastmask as mf
from moe_fastmask.pipeline.demo import build_tiny_olmoe

PROMPTS = [
    "How do I bake bread at home?",
    "Hi",
    "Write a poem about the sea and the wind, please.",
    "Tell me how to pick a lock.",
]
GROUPS = [0, 1, 0, 1]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tiny_olmoe(tmp_path_factory.mktemp("tiny_olmoe"), num_layers=3, seed=3)


@pytest.fixture
def tokenizer(model_dir):
    return AutoTokenizer.from_pretrained(model_dir)


def load(model_dir, dtype=torch.float32):
    # float64 runs need the eager experts (grouped_mm has no float64 kernel); they keep routing free of near-ties
    extra = {"experts_implementation": "eager"} if dtype == torch.float64 else {}
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, **extra)
    return model.eval()


def encode(tokenizer, prompts=PROMPTS):
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True) for p in prompts]
    return tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)


def test_patch_is_reversible_and_idempotent(model_dir):
    model = load(model_dir)
    gate = model.model.layers[0].mlp.gate
    original_source = inspect.getsource(gate.forward)
    assert mf.apply_to_olmoe(model) is model
    assert mf.is_patched(model)
    assert gate.forward.__func__ is mf.integrations.patch._fastmask_router_forward
    assert inspect.getsource(gate.forward) != original_source
    mf.apply_to_olmoe(model)  # idempotent
    assert len(model.model._forward_pre_hooks) == 1
    mf.remove_from_olmoe(model)
    assert not mf.is_patched(model)
    assert inspect.getsource(gate.forward) == original_source
    assert "forward" not in gate.__dict__ and not model.model._forward_pre_hooks


def test_recorder_outlives_remove_and_reapply(model_dir, tokenizer):
    """A recorder made before the patch was removed and applied again records on the new patch."""
    model = mf.apply_to_olmoe(load(model_dir))
    rec = mf.RoutingRecorder(model, num_groups=2)
    enc = encode(tokenizer)
    mf.remove_from_olmoe(model)
    with pytest.raises(RuntimeError, match="not patched"), rec.record(GROUPS):
        pass
    mf.apply_to_olmoe(model)
    with torch.no_grad(), rec.record(GROUPS):
        model(**enc)
    assert int(rec.prefill_tokens.sum()) == int(enc.attention_mask.sum())


@pytest.mark.parametrize("train_mode", [False, True])
def test_patched_logits_and_aux_loss_match(model_dir, tokenizer, train_mode):
    model = load(model_dir)
    model.train(train_mode)
    enc = encode(tokenizer)
    torch.manual_seed(0)
    ref = model(**enc, output_router_logits=True, labels=enc.input_ids)
    mf.apply_to_olmoe(model)
    out = model(**enc, output_router_logits=True, labels=enc.input_ids)
    torch.testing.assert_close(out.logits, ref.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.aux_loss, ref.aux_loss, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(out.loss, ref.loss, atol=1e-6, rtol=1e-6)
    assert len(out.router_logits) == model.config.num_hidden_layers


def test_training_step_gradients_match(model_dir, tokenizer):
    enc = encode(tokenizer)
    labels = enc.input_ids.masked_fill(enc.attention_mask == 0, -100)
    grads = []
    for patched in (False, True):
        model = load(model_dir).train()
        if patched:
            mf.apply_to_olmoe(model)
        out = model(**enc, labels=labels, output_router_logits=True)
        out.loss.backward()
        grads.append({name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    router_grads = [name for name in grads[0] if name.endswith("mlp.gate.weight")]
    assert router_grads and all(grads[0][name].abs().sum() > 0 for name in router_grads)
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.parametrize("cache_implementation", [None, "static"])
def test_greedy_generation_matches_on_left_padded_batch(model_dir, tokenizer, cache_implementation):
    model = load(model_dir)
    enc = encode(tokenizer)
    assert (enc.attention_mask == 0).any(), "the batch must be left-padded"
    kwargs = dict(max_new_tokens=10, do_sample=False, cache_implementation=cache_implementation)
    with torch.no_grad():
        expected = model.generate(**enc, **kwargs)
        mf.apply_to_olmoe(model)
        rec = mf.RoutingRecorder(model, num_groups=2)
        with rec.record(GROUPS):
            got = model.generate(**enc, **kwargs)
    assert torch.equal(got, expected)
    assert int(rec.prefill_tokens.sum()) == int(enc.attention_mask.sum())


def _independent_counts(model_dir, sequences, prompt_mask, groups, eos_id, num_groups=2):
    """Counts recomputed from the unpatched model's ``output_router_logits`` on the finished sequences."""
    model = load(model_dir, torch.float64)
    batch, total = sequences.shape
    prompt_len = prompt_mask.shape[1]
    attention = torch.cat([prompt_mask, torch.ones(batch, total - prompt_len, dtype=prompt_mask.dtype)], dim=1)
    with torch.no_grad():
        out = model(input_ids=sequences, attention_mask=attention, output_router_logits=True)
    top_k, num_experts = model.config.num_experts_per_tok, model.config.num_experts
    # which positions count: prompt tokens that are not padding; generated tokens fed back before the first EOS
    prefill_pos = torch.zeros(batch, total, dtype=torch.bool)
    prefill_pos[:, :prompt_len] = prompt_mask.bool()
    decode_pos = torch.zeros(batch, total, dtype=torch.bool)
    for b in range(batch):
        for pos in range(prompt_len, total - 1):  # the last generated token is never fed back
            if int(sequences[b, pos]) == eos_id:
                break
            decode_pos[b, pos] = True
    result = {}
    for phase, positions in (("prefill", prefill_pos), ("decode", decode_pos)):
        counts = torch.zeros(len(out.router_logits), num_groups, num_experts, dtype=torch.int64)
        for layer, logits in enumerate(out.router_logits):
            probs = torch.softmax(logits.view(batch, total, -1).float(), dim=-1)
            ids = torch.topk(probs, top_k, dim=-1).indices
            for b in range(batch):
                if groups[b] < 0:
                    continue
                for pos in positions[b].nonzero().flatten().tolist():
                    for e in ids[b, pos].tolist():
                        counts[layer, groups[b], e] += 1
        result[phase] = counts
        result[f"{phase}_tokens"] = torch.tensor([int(positions[[b for b in range(batch) if groups[b] == g]].sum()) for g in range(num_groups)])
    return result


def test_recorder_counts_equal_independent_recount(model_dir, tokenizer):
    enc = encode(tokenizer)
    groups = [0, 1, -1, 1]
    model = load(model_dir, torch.float64)
    with torch.no_grad():
        free = model.generate(**enc, max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=tokenizer.pad_token_id)
    # make one sequence finish early: use a token it generates mid-way as the EOS of the run
    generated = free[0, enc.input_ids.shape[1]:]
    eos_id = int(generated[4])
    mf.apply_to_olmoe(model)
    rec = mf.RoutingRecorder(model, num_groups=2)
    with torch.no_grad(), rec.record(groups, eos_token_id=eos_id):
        sequences = model.generate(**enc, max_new_tokens=12, do_sample=False, eos_token_id=eos_id, pad_token_id=tokenizer.pad_token_id)
    assert sequences.shape[1] > enc.input_ids.shape[1] + 5, "other sequences must go on after one finishes"
    expected = _independent_counts(model_dir, sequences, enc.attention_mask, groups, eos_id)
    assert torch.equal(rec.prefill_counts.cpu(), expected["prefill"])
    assert torch.equal(rec.decode_counts.cpu(), expected["decode"])
    assert torch.equal(rec.prefill_tokens.cpu(), expected["prefill_tokens"])
    assert torch.equal(rec.decode_tokens.cpu(), expected["decode_tokens"])
    top_k = model.config.num_experts_per_tok
    assert torch.equal(rec.prefill_counts.sum(-1), (rec.prefill_tokens * top_k).expand(3, -1))

    frame = rec.to_frame()
    assert set(frame.columns) >= {"phase", "layer", "group", "expert", "count", "tokens"}
    assert int(frame[frame.phase == "decode"]["count"].sum()) == int(rec.decode_counts.sum())
    rec.reset()
    assert int(rec.prefill_counts.sum()) == 0 and int(rec.decode_tokens.sum()) == 0


def test_token_experts_match_counts(model_dir, tokenizer):
    model = mf.apply_to_olmoe(load(model_dir))
    enc = encode(tokenizer)
    rec = mf.RoutingRecorder(model, num_groups=2, record_token_experts=True)
    with torch.no_grad(), rec.record(GROUPS):
        model.generate(**enc, max_new_tokens=6, do_sample=False)
    te = rec.token_experts()
    L, E = model.config.num_hidden_layers, model.config.num_experts
    for phase in ("prefill", "decode"):
        ids, counted = te[phase], te[f"{phase}_counted"]
        assert ids.dtype == torch.uint8 and ids.shape[:2] == counted.shape and ids.shape[2] == L
        counts = torch.zeros(L, 2, E, dtype=torch.int64)
        for b, g in enumerate(GROUPS):
            sel = ids[b][counted[b]].long()  # [n, L, K]
            for layer in range(L):
                counts[layer, g] += torch.bincount(sel[:, layer].reshape(-1), minlength=E)
        assert torch.equal(counts, rec.counts(phase).cpu()), phase


def test_masked_experts_are_never_chosen(model_dir, tokenizer):
    model = mf.apply_to_olmoe(load(model_dir))
    L, E, K = model.config.num_hidden_layers, model.config.num_experts, model.config.num_experts_per_tok
    gen = torch.Generator().manual_seed(1)
    keep = torch.ones(L, 2, E, dtype=torch.bool)
    for layer in range(L):
        keep[layer, 1] = False
        keep[layer, 1, torch.randperm(E, generator=gen)[:K + 1]] = True  # unsafe group: only K+1 experts
    mf.set_expert_mask(model, keep)
    enc = encode(tokenizer)
    rec = mf.RoutingRecorder(model, num_groups=2)
    with torch.no_grad(), rec.record(GROUPS):
        model.generate(**enc, max_new_tokens=8, do_sample=False)
    for counts in (rec.prefill_counts, rec.decode_counts):
        assert int(counts[:, 1][~keep[:, 1]].sum()) == 0
        assert int(counts[:, 1].sum()) > 0
    # the unmasked group did use experts the other group may not
    assert int(rec.prefill_counts[:, 0][~keep[:, 1]].sum()) > 0
    mf.set_expert_mask(model, None)


def test_token_groups_mask_in_training_forward(model_dir, tokenizer):
    model = mf.apply_to_olmoe(load(model_dir).train())
    L, E, K = model.config.num_hidden_layers, model.config.num_experts, model.config.num_experts_per_tok
    keep = torch.ones(L, 2, E, dtype=torch.bool)
    keep[:, 1, K:] = False  # unsafe sequences may only use experts 0..K-1
    mf.set_expert_mask(model, keep)
    enc = encode(tokenizer)
    rec = mf.RoutingRecorder(model, num_groups=2)
    with rec.record(GROUPS):
        loss = model(**enc, labels=enc.input_ids).loss
    loss.backward()
    assert int(rec.prefill_counts[:, 1, K:].sum()) == 0
    with mf.token_groups(model, GROUPS):
        masked = model(**enc).logits
    unmasked = model(**enc).logits  # no groups: every token is group 0, which keeps everything
    unsafe = torch.tensor(GROUPS) == 1
    assert not torch.allclose(masked[unsafe], unmasked[unsafe])
    torch.testing.assert_close(masked[~unsafe], unmasked[~unsafe])


def test_gradient_checkpointing_counts_once(model_dir, tokenizer):
    enc = encode(tokenizer)
    totals = []
    for checkpointing in (False, True):
        model = mf.apply_to_olmoe(load(model_dir).train())
        if checkpointing:
            model.gradient_checkpointing_enable()
        rec = mf.RoutingRecorder(model, num_groups=2)
        with rec.record(GROUPS):
            model(**enc, labels=enc.input_ids).loss.backward()
        totals.append(rec.prefill_counts.clone())
    assert torch.equal(totals[0], totals[1])


def test_gradient_checkpointing_recomputes_with_the_forward_groups(model_dir, tokenizer):
    """Backward usually runs after the groups context; checkpointed layers must still route as in the forward."""
    enc = encode(tokenizer)
    grads = []
    for checkpointing in (False, True):
        model = mf.apply_to_olmoe(load(model_dir).train())
        L, E, K = model.config.num_hidden_layers, model.config.num_experts, model.config.num_experts_per_tok
        keep = torch.ones(L, 2, E, dtype=torch.bool)
        keep[:, 1, K + 1:] = False
        mf.set_expert_mask(model, keep)
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        with mf.token_groups(model, GROUPS):
            loss = model(**enc, labels=enc.input_ids).loss
        loss.backward()  # outside the context, as the Trainer does
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-6, rtol=1e-5, msg=name)


def test_steering_changes_generation(model_dir, tokenizer):
    model = mf.apply_to_olmoe(load(model_dir))
    enc = encode(tokenizer)
    rec = mf.RoutingRecorder(model, num_groups=1)
    with torch.no_grad(), rec.record([0] * len(PROMPTS)):
        plain = model.generate(**enc, max_new_tokens=10, do_sample=False)
    # deactivate the two most used experts of every layer
    top = rec.prefill_counts[:, 0].topk(2, dim=-1).indices
    labels = [mf.layer_expert_label(layer, int(e)) for layer in range(top.shape[0]) for e in top[layer]]
    assert labels[0].startswith("L00_E")
    mf.set_expert_mask(model, mf.steering_mask(model, labels))
    rec.reset()
    with torch.no_grad(), rec.record([0] * len(PROMPTS)):
        steered = model.generate(**enc, max_new_tokens=10, do_sample=False)
    assert not torch.equal(plain, steered)
    for layer in range(top.shape[0]):
        assert int(rec.counts("all")[layer, 0, top[layer]].sum()) == 0
    mf.set_expert_mask(model, None)
    with torch.no_grad():
        assert torch.equal(model.generate(**enc, max_new_tokens=10, do_sample=False), plain)


def test_bad_masks_and_groups_raise(model_dir):
    model = mf.apply_to_olmoe(load(model_dir))
    L, E, K = model.config.num_hidden_layers, model.config.num_experts, model.config.num_experts_per_tok
    keep = torch.ones(L, 2, E, dtype=torch.bool)
    keep[1, 1, 1:] = False  # layer 1, group 1 keeps a single expert < top_k
    with pytest.raises(ValueError, match="layer 1 group 1"):
        mf.set_expert_mask(model, keep)
    with pytest.raises(ValueError, match="shape"):
        mf.set_expert_mask(model, torch.ones(L + 1, 2, E, dtype=torch.bool))
    with pytest.raises(TypeError, match="bool"):
        mf.set_expert_mask(model, torch.ones(L, 2, E))
    with pytest.raises(ValueError, match=r"L<layer>_E<expert>"):
        mf.steering_mask(model, ["layer8-expert42"])
    with pytest.raises(ValueError, match="outside the model"):
        mf.steering_mask(model, ["L09_E01"])
    rec = mf.RoutingRecorder(model, num_groups=2)
    with pytest.raises(ValueError, match=r"groups must be in \[-1, 2\)"):
        with rec.record([0, 2]):
            pass
    mf.set_expert_mask(model, torch.ones(L, 3, E, dtype=torch.bool))
    with pytest.raises(ValueError, match="3 groups but the recorder counts 2"):
        with rec.record([0, 1]):
            pass
    with pytest.raises(ValueError, match="positive int"):
        mf.RoutingRecorder(model, num_groups=0)
    with pytest.raises(RuntimeError, match="not patched"):
        mf.RoutingRecorder(load(model_dir))


def test_save_pretrained_leaves_no_trace(model_dir, tmp_path):
    model = load(model_dir)
    mf.apply_to_olmoe(model)
    mf.set_expert_mask(model, torch.ones(3, 2, 8, dtype=torch.bool))
    model.save_pretrained(tmp_path / "patched")
    plain = load(model_dir)
    plain.save_pretrained(tmp_path / "plain")
    assert json.loads((tmp_path / "patched" / "config.json").read_text()) == json.loads(
        (tmp_path / "plain" / "config.json").read_text()
    )
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "patched")
    assert not mf.is_patched(reloaded)
    assert "forward" not in reloaded.model.layers[0].mlp.gate.__dict__
    state, expected = reloaded.state_dict(), plain.state_dict()
    assert state.keys() == expected.keys()
    assert all(torch.equal(state[k], expected[k]) for k in state)


def test_patched_router_compiles_fullgraph(model_dir):
    model = mf.apply_to_olmoe(load(model_dir), backend="torch")
    gate = model.model.layers[0].mlp.gate
    hidden = torch.randn(5, model.config.hidden_size)
    eager = gate(hidden)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        compiled = torch.compile(gate, fullgraph=True, backend="aot_eager")(hidden)
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(a, b)


def test_deepcopy_of_patched_model_routes_like_the_original(model_dir, tokenizer):
    model = mf.apply_to_olmoe(load(model_dir))
    enc = encode(tokenizer)
    clone = copy.deepcopy(model)
    with torch.no_grad():
        torch.testing.assert_close(clone(**enc).logits, model(**enc).logits)


def test_static_cache_records_the_same_counts_as_dynamic(model_dir, tokenizer):
    model = mf.apply_to_olmoe(load(model_dir))
    enc = encode(tokenizer)
    recorded = []
    for cache_implementation in (None, "static"):
        rec = mf.RoutingRecorder(model, num_groups=2)
        with torch.no_grad(), rec.record(GROUPS):
            model.generate(**enc, max_new_tokens=8, do_sample=False, cache_implementation=cache_implementation)
        recorded.append(rec)
    dynamic, static = recorded
    assert int(dynamic.decode_tokens.sum()) == 7 * len(PROMPTS)
    for name in ("prefill_counts", "decode_counts", "prefill_tokens", "decode_tokens"):
        assert torch.equal(getattr(static, name), getattr(dynamic, name)), name


def _recorded_generate(model, enc, groups, eos_id, pad_id, *, record_token_experts=False, **generate_kwargs):
    rec = mf.RoutingRecorder(model, num_groups=2, record_token_experts=record_token_experts)
    with torch.no_grad(), rec.record(groups, eos_token_id=eos_id):
        sequences = model.generate(
            **enc, max_new_tokens=10, do_sample=False, eos_token_id=eos_id, pad_token_id=pad_id, **generate_kwargs
        )
    return sequences, rec


@pytest.mark.parametrize(
    "generate_kwargs",
    [{"use_cache": False}, {"prefill_chunk_size": 3}, {"prefill_chunk_size": 4, "cache_implementation": "static"}],
    ids=["uncached", "chunked-prefill", "chunked-prefill-static"],
)
def test_uncached_and_chunked_generate_count_like_plain_generate(model_dir, tokenizer, generate_kwargs):
    """generate without a cache feeds the whole sequence at every step, and chunked prefill feeds the prompt in
    pieces into one cache: both count prompt tokens once as prefill and generated tokens once as decode, stopping at
    EOS, as the plain cached generate does (whose counts another test checks against an independent recount)."""
    model = mf.apply_to_olmoe(load(model_dir, torch.float64))
    enc = encode(tokenizer)
    groups, pad_id = [0, 1, -1, 1], tokenizer.pad_token_id
    with torch.no_grad():
        free = model.generate(**enc, max_new_tokens=10, do_sample=False, eos_token_id=None, pad_token_id=pad_id)
    row = free[3, enc.input_ids.shape[1] :].tolist()
    eos_id = next(token for i, token in enumerate(row) if i >= 2 and token not in row[:i])  # row 3 ends mid-way
    expected_seq, expected = _recorded_generate(model, enc, groups, eos_id, pad_id, record_token_experts=True)
    got_seq, got = _recorded_generate(
        model, enc, groups, eos_id, pad_id, record_token_experts=True, **generate_kwargs
    )
    assert torch.equal(got_seq, expected_seq)
    assert int(expected.decode_tokens.sum()) > 0
    for name in ("prefill_counts", "decode_counts", "prefill_tokens", "decode_tokens"):
        assert torch.equal(getattr(got, name), getattr(expected, name)), name
    if "prefill_chunk_size" not in generate_kwargs:  # (chunks log the prompt's experts per chunk)
        for name, value in expected.token_experts().items():
            assert torch.equal(got.token_experts()[name], value), name


def test_one_group_mask_applies_to_every_token_group(model_dir, tokenizer):
    """A one-group mask (steering_mask's default) restricts the tokens of every label under token_groups, not only
    group 0's: labels 1 and 2 are routed with it too."""
    model = mf.apply_to_olmoe(load(model_dir))
    L, E = model.config.num_hidden_layers, model.config.num_experts
    keep = torch.zeros(L, 1, E, dtype=torch.bool)
    keep[:, 0, E - 3 :] = True  # the last three experts only
    mf.set_expert_mask(model, keep)
    enc = encode(tokenizer)
    used = []
    handles = [
        layer.mlp.gate.register_forward_hook(lambda m, a, out: used.append(out[2].detach().clone()))
        for layer in model.model.layers
    ]
    try:
        with torch.no_grad(), mf.token_groups(model, [0, 1, 2, -1]):
            model(**enc)
    finally:
        for handle in handles:
            handle.remove()
    batch, seq = enc.input_ids.shape
    real = enc.attention_mask.bool()
    for ids in used:
        ids = ids.view(batch, seq, -1)
        for row in range(3):  # labelled rows: every real token within the mask
            assert (ids[row][real[row]] >= E - 3).all(), row
        assert (ids[3][real[3]] < E - 3).any()  # the unlabelled row routes freely


def test_eos_ids_of_numpy_and_tensor_types(model_dir, tokenizer):
    import numpy as np

    model = mf.apply_to_olmoe(load(model_dir))
    enc = encode(tokenizer)
    rec = mf.RoutingRecorder(model, num_groups=2)
    eos = tokenizer.eos_token_id
    for eos_token_id in (np.int64(eos), torch.tensor(eos), np.array([eos, eos + 1]), torch.tensor([eos])):
        with torch.no_grad(), rec.record(GROUPS, eos_token_id=eos_token_id):
            model(**enc)
    for bad in (1.5, "eos", torch.tensor([[eos]]), [eos, 0.5]):
        with pytest.raises(ValueError, match="eos_token_id must be an int or a sequence of ints"):
            with rec.record(GROUPS, eos_token_id=bad):
                pass
