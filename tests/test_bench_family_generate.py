"""The Qwen3-MoE generation benchmark (``benchmarks/bench_family_generate.py``) end to end on a tiny config, on CPU."""

from __future__ import annotations

import copy

import pandas as pd
import pytest
import torch
from conftest import load_benchmark


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("bench_family_generate")  # (it imports its sibling bench_engine)


SMALL = ["--tiny", "--batches", "2", "3", "--prompt-len", "6", "--new-tokens", "4"]


def test_full_config_is_qwen3_30b_a3b_sized(bench):
    # on the meta device: sizes only, no memory
    model = bench.build_model(bench.QWEN3_30B_A3B, layers=None, device="meta", dtype=torch.bfloat16)
    cfg = model.config
    assert (cfg.num_hidden_layers, cfg.num_experts, cfg.num_experts_per_tok, cfg.head_dim) == (48, 128, 8, 128)
    params = sum(p.numel() for p in model.parameters())
    assert 30.3e9 < params < 30.7e9  # Qwen3-30B-A3B: 30.5 B
    shrunk = bench.build_model(bench.QWEN3_30B_A3B, layers=3, device="meta", dtype=torch.bfloat16)
    assert shrunk.config.num_hidden_layers == 3


def test_every_variant_runs_and_recording_rows_count_exactly(bench, session_seed):
    args = bench.parse_args(SMALL)
    model = bench.build_model(bench.TINY, layers=None, device="cpu", dtype=torch.float32, seed=session_seed)
    lines = []
    table = bench.run_benchmark(model, args, log=lines.append)
    assert list(zip(table["variant"], table["batch"])) == [(v, b) for v in bench.VARIANTS for b in (2, 3)]
    assert len(lines) == len(table)
    assert "skipped" not in table
    assert (table["new_tok_s"] > 0).all() and (table["wall_s"] > 0).all()
    assert table["recording"].tolist() == [v.endswith("+rec") for v in table["variant"]]
    assert not table[table["variant"] == "generate"]["patched"].any()  # the baseline really is unpatched
    assert table[table["variant"] != "generate"]["patched"].all()
    rec = table[table["recording"]]
    assert rec["counts_exact"].map(bool).all()
    assert table[~table["recording"]]["counts_exact"].isna().all()
    engine_rows = table[table["variant"].str.startswith("engine")]
    assert engine_rows["decode_tok_s"].notna().all()
    assert engine_rows["notes"].str.contains("eagerly").any()  # on CPU the engine says (once) it runs without graphs
    text = bench.markdown(table, "# header")
    assert text.count("\n| ") == 1 + len(table)  # header row + one row per measurement
    assert "| engine+rec | 3 |" in text


def test_counts_check_catches_a_miscount(bench, session_seed):
    from moe_fastmask.pipeline.generation import GenerationRequest, SamplingSettings
    from moe_fastmask.pipeline.generation.engine import StaticCacheEngine

    model = bench.build_model(bench.TINY, layers=None, device="cpu", dtype=torch.float32, seed=session_seed)
    ids, groups = bench.be.prompts(3, 6, model.config.vocab_size)
    engine = StaticCacheEngine(model, max_batch_size=4)
    with pytest.warns(UserWarning, match="eagerly"):
        out = engine.generate(GenerationRequest(prompts=ids, sampling=SamplingSettings(4, 4), groups=groups))
    assert bench.be.totals_match_tokens(out, ids, groups, 4)
    for field in ("prefill_counts", "decode_counts", "decode_tokens"):
        bad = copy.deepcopy(out)
        getattr(bad, field).flat[0] += 1
        assert not bench.be.totals_match_tokens(bad, ids, groups, 4), field


def test_budget_skips_rows_and_main_writes_both_tables(bench, tmp_path):
    args = bench.parse_args([*SMALL, "--budget-s", "0", "--variants", "engine", "engine+rec"])
    model = bench.build_model(bench.TINY, layers=1, device="cpu", dtype=torch.float32)
    table = bench.run_benchmark(model, args, log=lambda line: None)
    assert table["skipped"].str.startswith("budget").all() and len(table) == 4
    assert "skipped: budget" in bench.markdown(table, "#")

    assert bench.main([*SMALL, "--layers", "1", "--out", str(tmp_path)]) == 0
    written = pd.read_csv(tmp_path / "family_generate.csv")
    assert len(written) == 8 and written["counts_exact"].dropna().astype(bool).all()
    assert (tmp_path / "family_generate.md").read_text().startswith("# Qwen3-MoE generation")
    with pytest.raises(SystemExit):
        bench.parse_args(["--variants", "engine+rec"])  # a recording row needs its recording-off twin
