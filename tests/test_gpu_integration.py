"""The OLMoE integration on a CUDA device (Triton backend): equality, no host syncs, CUDA-graph capture.

Skipped on machines without a GPU.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import moe_fastmask as mf
from moe_fastmask.pipeline.demo import build_tiny_olmoe

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

PROMPTS = ["How do I bake bread at home?", "Hi", "Write a poem about the sea.", "Tell me how to pick a lock."]
GROUPS = [0, 1, 0, 1]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tiny_olmoe(tmp_path_factory.mktemp("tiny_gpu"), num_layers=3, num_experts=8, top_k=2, seed=5)


def load(model_dir, dtype=torch.float32):
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).cuda().eval()


def encode(model_dir):
    tok = AutoTokenizer.from_pretrained(model_dir)
    texts = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True) for p in PROMPTS]
    return tok(texts, return_tensors="pt", padding=True, add_special_tokens=False).to("cuda")


def test_patched_matches_unpatched_on_gpu(model_dir):
    model = load(model_dir)
    enc = encode(model_dir)
    with torch.no_grad():
        ref_logits = model(**enc).logits
        ref_gen = model.generate(**enc, max_new_tokens=8, do_sample=False)
        mf.apply_to_olmoe(model)
        assert mf.integrations.state.state_of(model).backend == "auto"
        logits = model(**enc).logits
        rec = mf.RoutingRecorder(model, num_groups=2)
        with rec.record(GROUPS):
            gen = model.generate(**enc, max_new_tokens=8, do_sample=False)
    torch.testing.assert_close(logits, ref_logits, atol=1e-4, rtol=1e-4)
    assert torch.equal(gen, ref_gen)
    assert rec.prefill_counts.is_cuda and int(rec.prefill_tokens.sum()) == int(enc.attention_mask.sum())


def test_recorder_counts_same_on_triton_and_reference(model_dir):
    enc = encode(model_dir)
    results = []
    for backend in ("triton", "torch"):
        model = mf.apply_to_olmoe(load(model_dir), backend=backend)
        rec = mf.RoutingRecorder(model, num_groups=2)
        with torch.no_grad(), rec.record(GROUPS):
            model.generate(**enc, max_new_tokens=8, do_sample=False)
        results.append((rec.prefill_counts.clone(), rec.decode_counts.clone()))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


def test_decode_step_with_recorder_does_not_sync(model_dir):
    from transformers import StaticCache

    # bf16: torch's float32 grouped_mm (the experts, not the routing) synchronises on its offsets
    model = mf.apply_to_olmoe(load(model_dir, torch.bfloat16))
    enc = encode(model_dir)
    rec = mf.RoutingRecorder(model, num_groups=2)
    mask = torch.ones_like(enc.input_ids)
    cache = StaticCache(config=model.config, max_cache_len=64)
    with torch.no_grad(), rec.record(GROUPS):
        out = model(input_ids=enc.input_ids, attention_mask=mask, past_key_values=cache, use_cache=True)
        token = out.logits[:, -1:].argmax(-1)
        step_mask = torch.ones(len(PROMPTS), enc.input_ids.shape[1] + 1, dtype=mask.dtype, device="cuda")
        position_ids = torch.full((len(PROMPTS), 1), enc.input_ids.shape[1], device="cuda")
        torch.cuda.synchronize()
        # route + counting + group expansion must not synchronise; the model's own mask code is left out by
        # passing the prepared 4-D mask
        mask4d = step_mask[:, None, None, :].bool()
        mask4d = torch.nn.functional.pad(mask4d, (0, 64 - mask4d.shape[-1]))
        torch.cuda.set_sync_debug_mode("error")
        try:
            model(input_ids=token, attention_mask=mask4d, position_ids=position_ids, past_key_values=cache, use_cache=True)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert int(rec.decode_tokens.sum()) == len(PROMPTS)


def test_route_captured_in_cuda_graph_accumulates_counts():
    logits = torch.randn(256, 64, device="cuda", dtype=torch.bfloat16)
    keep = torch.ones(2, 64, dtype=torch.bool, device="cuda")
    keep[1, 32:] = False
    group = torch.randint(-1, 2, (256,), device="cuda")
    counts = torch.zeros(2, 64, dtype=torch.int64, device="cuda")
    route = lambda: mf.route(logits, 8, keep, group, counts, False, "triton", validate=False)  # noqa: E731
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        route()  # warm-up (compiles the kernel)
    torch.cuda.current_stream().wait_stream(stream)
    counts.zero_()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        weights, ids = route()
    counts.zero_()
    for _ in range(3):
        graph.replay()
    torch.cuda.synchronize()
    ref_counts = torch.zeros_like(counts)
    ref_w, ref_ids = mf.route(logits, 8, keep, group, ref_counts, False, "torch")
    assert torch.equal(ids, ref_ids)
    assert torch.equal(counts, 3 * ref_counts)


def test_record_entry_does_not_sync(model_dir):
    model = mf.apply_to_olmoe(load(model_dir, torch.bfloat16))
    rec = mf.RoutingRecorder(model, num_groups=2)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with rec.record(GROUPS), mf.token_groups(model, GROUPS):
            pass
    finally:
        torch.cuda.set_sync_debug_mode("default")
