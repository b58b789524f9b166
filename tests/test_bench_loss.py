"""The loss benchmark (``benchmarks/bench_loss.py``) runs on CPU and its implementations agree with the reference."""

from __future__ import annotations

import json

import pytest
from conftest import load_benchmark


@pytest.fixture(scope="module")
def bench_loss():
    return load_benchmark("bench_loss")


def test_tiny_run_writes_rows_that_match_the_reference(bench_loss, tmp_path):
    results = bench_loss.main(["--out", str(tmp_path), "--tiny", "--repeats", "1", "--impls", "ours", "reference",
                               "--chunk-size", "16"])
    assert {(r["impl"], r["rows"]) for r in results} == {(i, n) for i in ("ours", "reference") for n in (64, 300)}
    for r in results:
        assert r["loss_abs_diff"] < 1e-5 and r["grad_max_abs_diff"] < 1e-6, r
        assert r["ms"] > 0
    assert json.loads((tmp_path / "bench_loss.json").read_text()) == results
    assert (tmp_path / "bench_loss.md").read_text().count("\n") == 2 + len(results)


def test_unknown_implementation_is_refused(bench_loss):
    with pytest.raises(ValueError, match="impl must be one of"):
        bench_loss.loss_fn("fused", 16)
