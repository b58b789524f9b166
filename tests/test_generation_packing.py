"""Packing several method batches into one generation request: the split results equal one-batch-at-a-time."""

from __future__ import annotations

import warnings

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import moe_fastmask as mf
from moe_fastmask.pipeline.demo import build_tiny_olmoe
from moe_fastmask.pipeline.generation.engine import (
    GenerationOutput,
    GenerationRequest,
    SamplingSettings,
    StaticCacheEngine,
    sequence_seed,
)
from moe_fastmask.pipeline.generation.packing import (
    PackedLayout,
    pack_groups,
    pack_requests,
    split_group_axis,
    split_output,
)

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
    counts = torch.arange(3 * 6 * 4).view(3, 6, 4)
    parts = split_group_axis(counts, 3, 2, axis=1)
    assert [tuple(p.shape) for p in parts] == [(3, 2, 4)] * 3
    assert torch.equal(torch.cat(parts, dim=1), counts)
    with pytest.raises(ValueError, match="axis 1 has 6 groups; 2 batches x 2 groups"):
        split_group_axis(counts, 2, 2, axis=1)


def test_split_output_routes_each_group_back():
    layout = PackedLayout(sizes=(2, 1), num_groups=2)
    counts = torch.arange(1 * 4 * 3).view(1, 4, 3)
    out = GenerationOutput(
        token_ids=[[1], [2, 3], [4]], texts=["a", "b", "c"], prompt_lengths=[5, 6, 7],
        prefill_counts=counts, decode_counts=counts + 100, prefill_tokens=torch.tensor([1, 2, 3, 4]),
        decode_tokens=torch.tensor([5, 6, 7, 8]),
    )  # fmt: skip
    first, second = split_output(out, layout)
    assert first.token_ids == [[1], [2, 3]] and second.texts == ["c"] and second.prompt_lengths == [7]
    assert torch.equal(second.prefill_counts, counts[:, 2:4]) and torch.equal(first.decode_counts, counts[:, :2] + 100)
    assert second.decode_tokens.tolist() == [7, 8] and first.prefill_tokens.tolist() == [1, 2]
    with pytest.raises(ValueError, match="holds 3 sequences; the layout packed 4"):
        split_output(out, PackedLayout(sizes=(2, 2), num_groups=2))


def test_pack_requests_rejects_mixed_settings():
    a = GenerationRequest([[1, 2]], [0], 2)
    with pytest.raises(ValueError, match="request 1: num_groups differs"):
        pack_requests([a, GenerationRequest([[3]], [0], 3)])
    with pytest.raises(ValueError, match="request 1: sampling differs"):
        pack_requests([a, GenerationRequest([[3]], [0], 2, SamplingSettings(max_new_tokens=5))])
    sampled = GenerationRequest([[1, 2]], [0], 2, SamplingSettings(do_sample=True, seed=3))
    unseeded = GenerationRequest([[5]], [1], 2, SamplingSettings(do_sample=True))
    with pytest.raises(ValueError, match="request 1: a packed sampled request needs a seed"):
        pack_requests([sampled, unseeded])
    packed, _ = pack_requests([sampled, GenerationRequest([[5], [6]], [1, 0], 2, SamplingSettings(do_sample=True, seed=4))])
    assert packed.sequence_seeds == [sequence_seed(3, 0), sequence_seed(4, 0), sequence_seed(4, 1)]
    assert len(set(packed.sequence_seeds)) == 3
    with pytest.raises(ValueError, match="either every packed request records"):
        pack_requests([a, GenerationRequest([[3]], None, 2)])
    packed, layout = pack_requests([a, GenerationRequest([[3], [4]], [1, -1], 2)])
    assert packed.prompt_ids == [[1, 2], [3], [4]] and packed.groups == [0, 3, -1] and packed.num_groups == 4
    assert layout == PackedLayout(sizes=(1, 2), num_groups=2)


@pytest.mark.parametrize("do_sample", [False, True], ids=["greedy", "sampled"])
def test_packed_counts_equal_unpacked(tmp_path, do_sample):
    model_dir = build_tiny_olmoe(tmp_path / "tiny", num_layers=2, seed=5)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = mf.apply_to_olmoe(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval())
    requests = []
    for b, (prompts, groups) in enumerate(BATCHES):
        # sampled: each method batch has its own seed, as analyze seeds each batch
        sampling = SamplingSettings(max_new_tokens=8, do_sample=do_sample, temperature=1.5, top_p=0.9, seed=100 + b)
        texts = [
            tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
            for p in prompts
        ]
        ids = [tokenizer(t, add_special_tokens=False).input_ids for t in texts]
        requests.append(GenerationRequest(ids, groups, 2, sampling))
    engine = StaticCacheEngine(model, tokenizer, max_batch_size=16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        alone = [engine.generate(r) for r in requests]
        packed, layout = pack_requests(requests)
        split = split_output(engine.generate(packed), layout)
    assert len(split) == len(alone)
    for b, (one, unpacked) in enumerate(zip(split, alone)):
        assert one.token_ids == unpacked.token_ids, b
        for name in ("prefill_counts", "decode_counts", "prefill_tokens", "decode_tokens"):
            assert torch.equal(getattr(one, name), getattr(unpacked, name)), (b, name)
        assert int(one.prefill_tokens.min()) > 0  # both kinds of every batch counted something
