"""Packing several method batches into one generation request: the split results equal one-batch-at-a-time."""

from __future__ import annotations

import warnings

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import numpy as np

import moe_fastmask as mf
from moe_fastmask.pipeline.demo import build_tiny_olmoe
from moe_fastmask.pipeline.generation import GenerationOutput, GenerationRequest, SamplingSettings, get_backend
from moe_fastmask.pipeline.generation.packing import (
    PackedLayout,
    canonical_token_experts,
    pack_groups,
    pack_requests,
    sequence_seed,
    split_group_axis,
    split_output,
)


def request_of(prompts, groups=None, num_groups=2, sampling=None, **kwargs):
    return GenerationRequest(
        prompts=prompts, sampling=sampling or SamplingSettings(max_new_tokens=4), groups=groups,
        num_groups=num_groups, **kwargs,
    )  # fmt: skip


# three method batches of different sizes; safe = 0, unsafe = 1, -1 = generated but not counted
BATCHES = [
    (["How do I bake bread at home?", "Tell me how to pick a lock.", "Hi"], [0, 1, 1]),
    (["Write a poem about the sea and the wind, please.", "Describe how to make a dangerous chemical at home."], [1, 0]),
    (["Sure, here is how to do it step by step.", "Explain how to bake bread.", "Flip each word.", "Hello"], [0, -1, 1, 0]),
]


def test_pack_groups_and_split_axis():
    assert pack_groups([[0, 1, -1], [1, 0], [0]], 2) == [0, 1, -1, 3, 2, 4]
    with pytest.raises(ValueError, match="method batch 1, position 0: group 2 is outside"):
        pack_groups([[0], [2]], 2)
    counts = np.arange(3 * 6 * 4).reshape(3, 6, 4)
    parts = split_group_axis(counts, 3, 2, axis=1)
    assert [p.shape for p in parts] == [(3, 2, 4)] * 3
    assert np.array_equal(np.concatenate(parts, axis=1), counts)
    with pytest.raises(ValueError, match="axis 1 has 6 groups; 2 batches x 2 groups"):
        split_group_axis(counts, 2, 2, axis=1)


def test_split_output_routes_each_group_back():
    layout = PackedLayout(sizes=(2, 1), num_groups=2, max_new_tokens=4)
    counts = np.arange(1 * 4 * 3).reshape(1, 4, 3)
    L, K = 1, 2
    experts = {
        "prefill": np.full((3, 7, L, K), 9, np.uint8), "prefill_counted": np.zeros((3, 7), bool),
        "decode": np.full((3, 3, L, K), 9, np.uint8), "decode_counted": np.zeros((3, 3), bool),
    }  # fmt: skip
    experts["prefill_counted"][0, -5:] = experts["prefill_counted"][1, -6:] = experts["prefill_counted"][2, :] = True
    experts["decode_counted"][1, :1] = True  # row 1 generated [2, 3]: one token fed back before its EOS
    out = GenerationOutput(
        tokens=[[1], [2, 3], [4, 5, 6, 7]], texts=["a", "b", "c"], num_prompt_tokens=[5, 6, 7],
        prefill_counts=counts, decode_counts=counts + 100, prefill_tokens=np.array([1, 2, 3, 4]),
        decode_tokens=np.array([5, 6, 7, 8]), token_experts=experts,
    )  # fmt: skip
    first, second = split_output(out, layout)
    assert first.tokens == [[1], [2, 3]] and second.texts == ["c"] and second.num_prompt_tokens == [7]
    assert np.array_equal(second.prefill_counts, counts[:, 2:4]) and np.array_equal(first.decode_counts, counts[:, :2] + 100)
    assert second.decode_tokens.tolist() == [7, 8] and first.prefill_tokens.tolist() == [1, 2]
    # batch 0 alone: prompts padded to 6, at most 3 tokens generated with the EOS -> 2 decode positions
    assert first.token_experts["prefill"].shape == (2, 6, L, K) and first.token_experts["decode"].shape == (2, 2, L, K)
    assert first.token_experts["prefill_counted"].sum(1).tolist() == [5, 6]
    assert int(first.token_experts["prefill"][0, 0].sum()) == 0  # padding: id 0, whatever the packed run held
    assert second.token_experts["decode"].shape == (1, 3, L, K)  # no EOS within max_new_tokens: 3 fed back
    with pytest.raises(ValueError, match="holds 3 sequences; the layout packed 4"):
        split_output(out, PackedLayout(sizes=(2, 2), num_groups=2, max_new_tokens=4))


def test_pack_requests_rejects_mixed_settings():
    a = request_of([[1, 2]], [0])
    with pytest.raises(ValueError, match="request 1: num_groups differs"):
        pack_requests([a, request_of([[3]], [0], 3)])
    with pytest.raises(ValueError, match="request 1: sampling differs"):
        pack_requests([a, request_of([[3]], [0], 2, SamplingSettings(max_new_tokens=5))])
    sampled = request_of([[1, 2]], [0], 2, SamplingSettings(max_new_tokens=4, do_sample=True, seed=3))
    unseeded = request_of([[5]], [1], 2, SamplingSettings(max_new_tokens=4, do_sample=True))
    with pytest.raises(ValueError, match="request 1: a packed sampled request needs a seed"):
        pack_requests([sampled, unseeded])
    packed, _ = pack_requests(
        [sampled, request_of([[5], [6]], [1, 0], 2, SamplingSettings(max_new_tokens=4, do_sample=True, seed=4))]
    )
    assert packed.sequence_seeds == [sequence_seed(3, 0), sequence_seed(4, 0), sequence_seed(4, 1)]
    assert len(set(packed.sequence_seeds)) == 3
    with pytest.raises(ValueError, match="either every packed request records"):
        pack_requests([a, request_of([[3]], None, 2)])
    packed, layout = pack_requests([a, request_of([[3], [4]], [1, -1], 2)])
    assert packed.prompts == [[1, 2], [3], [4]] and packed.groups == [0, 3, -1] and packed.num_groups == 4
    assert layout == PackedLayout(sizes=(1, 2), num_groups=2, max_new_tokens=4)


@pytest.mark.parametrize(
    "engine, do_sample", [("graph", False), ("graph", True), ("hf", False)], ids=["graph-greedy", "graph-sampled", "hf"]
)
def test_packed_counts_equal_unpacked(tmp_path, engine, do_sample):
    model_dir = build_tiny_olmoe(tmp_path / "tiny", num_layers=2, seed=5)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = mf.apply(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval())
    requests = []
    for b, (prompts, groups) in enumerate(BATCHES):
        # sampled: each method batch has its own seed, as analyze seeds each batch
        sampling = SamplingSettings(max_new_tokens=8, do_sample=do_sample, temperature=1.5, top_p=0.9, seed=100 + b)
        texts = [
            tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
            for p in prompts
        ]
        ids = [tokenizer(t, add_special_tokens=False).input_ids for t in texts]
        requests.append(request_of(ids, groups, 2, sampling, record_token_experts=True))
    backend = get_backend(engine, model, tokenizer, **({"max_batch_size": 16} if engine == "graph" else {}))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        alone = [backend.generate(r) for r in requests]
        packed, layout = pack_requests(requests)
        split = split_output(backend.generate(packed), layout)
    assert len(split) == len(alone)
    for b, (one, unpacked) in enumerate(zip(split, alone)):
        assert one.tokens == unpacked.tokens and one.texts == unpacked.texts, b
        for name in ("prefill_counts", "decode_counts", "prefill_tokens", "decode_tokens"):
            assert np.array_equal(getattr(one, name), getattr(unpacked, name)), (b, name)
        assert int(one.prefill_tokens.min()) > 0  # both kinds of every batch counted something
        reference = canonical_token_experts(unpacked.token_experts, unpacked.num_prompt_tokens, unpacked.tokens, 8)
        for key, value in reference.items():
            assert np.array_equal(one.token_experts[key], value), (b, key)
