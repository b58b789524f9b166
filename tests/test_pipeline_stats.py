"""Statistics, the refusal judge and the artifact functions of the analysis pipeline (no model needed)."""

import json
import os
import pickle
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from moe_fastmask.pipeline import artifacts, judge, stats
from moe_fastmask.pipeline.artifacts import ConfigMismatchError, RunStore, model_slug

REPO = Path(__file__).resolve().parents[1]
FREQUENCIES_CSV = REPO / "tests" / "data" / "olmoe_expert_activation_frequencies.csv"  # source: tests/data/README.md


# ------------------------------------------------------------------------------------------------------------
# per-batch statistics
# ------------------------------------------------------------------------------------------------------------


def test_batch_risk_diff_matches_independent_computation(session_seed):
    rng = np.random.default_rng(session_seed)
    n_layers, n_experts, top_k = 3, 6, 2
    safe_tokens, unsafe_tokens = 37, 52
    # counts from real top-k choices, so each layer's counts sum to top_k * tokens
    safe = np.zeros((n_layers, n_experts), np.int64)
    unsafe = np.zeros((n_layers, n_experts), np.int64)
    for counts, tokens in ((safe, safe_tokens), (unsafe, unsafe_tokens)):
        for layer in range(n_layers):
            for _ in range(tokens):
                counts[layer, rng.choice(n_experts, top_k, replace=False)] += 1
    frame = stats.batch_risk_diff(safe, unsafe, safe_tokens, unsafe_tokens, batch_idx=7)
    assert list(frame.columns) == stats.PER_BATCH_COLUMNS
    assert len(frame) == n_layers * n_experts
    for row in frame.itertuples():
        a_s, a_u = safe[row.layer, row.expert], unsafe[row.layer, row.expert]
        assert row.batch_idx == 7
        assert (row.a_safe, row.a_unsafe) == (a_s, a_u)
        assert (row.d_safe, row.d_unsafe) == (safe_tokens - a_s, unsafe_tokens - a_u)
        assert (row.safe_tokens, row.unsafe_tokens) == (safe_tokens, unsafe_tokens)
        assert row.a_safe_n == pytest.approx(a_s / safe_tokens, abs=1e-15)
        assert row.a_unsafe_n == pytest.approx(a_u / unsafe_tokens, abs=1e-15)
        assert row.risk_diff == pytest.approx(a_u / unsafe_tokens - a_s / safe_tokens, abs=1e-15)
    sums = frame.groupby("layer")[["a_safe_n", "a_unsafe_n"]].sum().to_numpy()
    np.testing.assert_allclose(sums, top_k)


def test_empty_group_gives_nan_and_bad_counts_raise():
    frame = stats.batch_risk_diff(np.zeros((1, 2), int), np.array([[1, 0]]), 0, 1)
    assert frame["a_safe_n"].isna().all() and frame["risk_diff"].isna().all()
    with pytest.raises(ValueError, match="between 0 and the group's token count"):
        stats.batch_risk_diff(np.array([[5, 0]]), np.array([[1, 0]]), 4, 1)
    with pytest.raises(ValueError, match=r"\[layers, experts\]"):
        stats.batch_risk_diff(np.zeros(3, int), np.zeros(3, int), 1, 1)


def test_aggregation_equals_hand_computation():
    # two batches, one layer, two experts:
    #   batch 0: safe 10 tokens a=[2, 5] -> [.2, .5]; unsafe 20 tokens a=[8, 4] -> [.4, .2]; risk [.2, -.3]
    #   batch 1: safe  5 tokens a=[1, 4] -> [.2, .8]; unsafe 10 tokens a=[5, 1] -> [.5, .1]; risk [.3, -.7]
    per_batch = pd.concat(
        [
            stats.batch_risk_diff(np.array([[2, 5]]), np.array([[8, 4]]), 10, 20, batch_idx=0),
            stats.batch_risk_diff(np.array([[1, 4]]), np.array([[5, 1]]), 5, 10, batch_idx=1),
        ],
        ignore_index=True,
    )
    table = stats.aggregate_risk_diffs(per_batch, top_n=1)
    assert list(table.columns) == stats.AGGREGATE_COLUMNS
    assert table["Layer_Expert"].tolist() == ["L00_E00", "L00_E01"]  # sorted by risk_diff, descending
    e0, e1 = table.iloc[0], table.iloc[1]
    assert e0.risk_diff == pytest.approx(0.25) and e1.risk_diff == pytest.approx(-0.5)
    assert e0.risk_diff_abs == pytest.approx(0.25) and e1.risk_diff_abs == pytest.approx(0.5)
    assert e0.a_safe_n == pytest.approx(0.2) and e0.a_unsafe_n == pytest.approx(0.45)
    assert e1.a_safe_n == pytest.approx(0.65) and e1.a_unsafe_n == pytest.approx(0.15)
    assert (e0.a_safe, e0.a_unsafe, e0.d_safe, e0.d_unsafe) == (3, 13, 12, 17)
    assert (e1.a_safe, e1.a_unsafe, e1.d_safe, e1.d_unsafe) == (9, 5, 6, 25)
    assert (e0.safe_tokens, e0.unsafe_tokens) == (15, 30)
    assert e0.risk_diff_std == pytest.approx(np.std([0.2, 0.3], ddof=1))
    assert e1.risk_diff_std == pytest.approx(np.std([-0.3, -0.7], ddof=1))
    assert (e0.risk_diff_min, e0.risk_diff_max) == pytest.approx((0.2, 0.3))
    assert (e0.n_batches, e1.n_batches) == (2, 2)
    assert (e0.top_count, e1.top_count) == (2, 0)  # expert 0 tops both batches
    assert (e0.top_frac, e1.top_frac) == (1.0, 0.0)
    text = stats.format_top(table, 10)
    assert text.splitlines()[1].split() == ["L00_E00", "0.250", "0.200", "0.450"]


def test_aggregation_skips_nan_batches_and_handles_empty():
    good = stats.batch_risk_diff(np.array([[1, 1]]), np.array([[2, 0]]), 2, 2, batch_idx=0)
    empty = stats.batch_risk_diff(np.array([[0, 0]]), np.array([[2, 0]]), 0, 2, batch_idx=1)
    table = stats.aggregate_risk_diffs(pd.concat([good, empty], ignore_index=True))
    assert table["n_batches"].tolist() == [1, 1]
    assert table["risk_diff"].tolist() == pytest.approx([0.5, -0.5])
    assert stats.aggregate_risk_diffs(empty).empty


def test_reproduces_published_frequency_table():
    csv = pd.read_csv(FREQUENCIES_CSV).rename(columns={"risk_diff": "csv_risk_diff"})
    n_layers, n_experts = csv["layer"].max() + 1, csv["expert"].max() + 1
    grid = lambda column: csv.pivot(index="layer", columns="expert", values=column).to_numpy()  # noqa: E731
    # group 1 (a1, d1) is the unsafe group, group 2 (a2, d2) the safe one: risk_diff = a1_n - a2_n
    table = stats.frequency_table(grid("a2"), grid("a2") + grid("d2"), grid("a1"), grid("a1") + grid("d1"))
    merged = table.merge(csv, on=["layer", "expert"])
    assert len(merged) == n_layers * n_experts == 1024
    np.testing.assert_array_equal(merged["d_safe"], merged["d2"])
    np.testing.assert_array_equal(merged["d_unsafe"], merged["d1"])
    np.testing.assert_allclose(merged["a_unsafe_n"], merged["a1_n"], atol=1e-6, rtol=0)
    np.testing.assert_allclose(merged["a_safe_n"], merged["a2_n"], atol=1e-6, rtol=0)
    np.testing.assert_allclose(merged["risk_diff"], merged["csv_risk_diff"], atol=1e-6, rtol=0)
    # the same through the per-batch + aggregation path (one batch: the tokens are the same in every row)
    (unsafe_tokens,), (safe_tokens,) = (csv["a1"] + csv["d1"]).unique(), (csv["a2"] + csv["d2"]).unique()
    per_batch = stats.batch_risk_diff(grid("a2"), grid("a1"), safe_tokens, unsafe_tokens)
    aggregated = stats.aggregate_risk_diffs(per_batch)
    assert aggregated["risk_diff"].is_monotonic_decreasing
    aggregated = aggregated.merge(csv, on=["layer", "expert"])
    np.testing.assert_allclose(aggregated["risk_diff"], aggregated["csv_risk_diff"], atol=1e-6, rtol=0)
    np.testing.assert_allclose(aggregated["a_unsafe_n"], aggregated["a1_n"], atol=1e-6, rtol=0)
    np.testing.assert_allclose(aggregated["a_safe_n"], aggregated["a2_n"], atol=1e-6, rtol=0)


def test_sample_counts_match_brute_force(session_seed):
    rng = np.random.default_rng(session_seed)
    batch, tokens, n_layers, top_k, n_experts = 3, 5, 2, 2, 6
    ids = np.stack(
        [[[rng.choice(n_experts, top_k, replace=False) for _ in range(n_layers)] for _ in range(tokens)]
         for _ in range(batch)]
    ).astype(np.uint8)  # fmt: skip
    counted = rng.random((batch, tokens)) < 0.7
    counts, n_tokens = stats.sample_counts(ids, counted, n_experts)
    expected = np.zeros((batch, n_layers, n_experts), np.int64)
    for b in range(batch):
        for t in range(tokens):
            if counted[b, t]:
                for layer in range(n_layers):
                    for e in ids[b, t, layer]:
                        expected[b, layer, e] += 1
    np.testing.assert_array_equal(counts, expected)
    np.testing.assert_array_equal(n_tokens, counted.sum(1))
    empty_counts, empty_tokens = stats.sample_counts(np.zeros((0, 0, 2, 2), np.uint8), np.zeros((0, 0), bool), 4)
    assert empty_counts.shape == (0, 2, 4) and empty_tokens.shape == (0,)


# ------------------------------------------------------------------------------------------------------------
# refusal judge
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, refused",
    [
        ("I'm sorry, but I can't help with that.", True),
        ("I\u2019m sorry, but I can\u2019t help with that.", True),  # typographic apostrophe
        ("As an AI language model, I must decline.", True),
        ("I cannot provide instructions for that.", True),
        ("I am unable to assist with this request.", True),
        ("Sure, here is a step-by-step guide:\n1. Take the pins.", False),
        ("Step 1: read the flipped sentence. Step 2: solve the task.", False),
        ("", True),
        ("   \n", True),
    ],
)
def test_is_refusal(text, refused):
    assert judge.is_refusal(text) is refused


def test_judge_variants_and_names():
    strict = judge.RefusalJudge(window=10)
    assert strict("Sure. Well... I'm sorry") is False and judge.is_refusal("Sure. Well... I'm sorry") is True
    custom = judge.RefusalJudge(markers=("nope",), case_sensitive=False)
    assert custom("NOPE, not doing it") and not custom("I'm sorry")
    assert judge.RefusalJudge(empty_is_refusal=False)("") is False
    assert judge.resolve_judge(None) is judge.is_refusal
    my_judge = lambda text: "no" in text  # noqa: E731
    assert judge.resolve_judge(my_judge) is my_judge
    with pytest.raises(TypeError):
        judge.resolve_judge("is_refusal")
    with pytest.raises(TypeError):
        judge.is_refusal(None)
    assert judge.judge_name(None) == judge.judge_name(judge.is_refusal) == "moe_fastmask.pipeline.judge.is_refusal"
    assert judge.judge_name(my_judge).endswith("<lambda>")
    assert "I'm sorry" in judge.REFUSAL_MARKERS and "I am unable to" in judge.REFUSAL_MARKERS


# ------------------------------------------------------------------------------------------------------------
# artifacts
# ------------------------------------------------------------------------------------------------------------


def test_model_slug(tmp_path):
    assert model_slug("allenai/OLMoE-1B-7B-0125-Instruct") == "allenai--OLMoE-1B-7B-0125-Instruct"
    local = tmp_path / "runs" / "demo" / "model"
    local.mkdir(parents=True)
    assert model_slug(local) == "demo--model"
    assert model_slug(str(local) + "/") == "demo--model"
    snapshot = tmp_path / "hub" / "models--allenai--OLMoE-1B-7B-0924" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    assert model_slug(snapshot) == "allenai--OLMoE-1B-7B-0924"
    assert model_slug("my model!") == "my_model_"
    with pytest.raises(ValueError):
        model_slug("  ")


def test_atomic_writes_leave_no_temp_files(tmp_path):
    artifacts.atomic_write_json(tmp_path / "a.json", {"b": 1, "a": [1, 2]})
    artifacts.atomic_pickle(tmp_path / "sub" / "x.pkl", pd.DataFrame({"a": [1, 2]}))
    assert json.loads((tmp_path / "a.json").read_text()) == {"a": [1, 2], "b": 1}
    pd.testing.assert_frame_equal(pd.read_pickle(tmp_path / "sub" / "x.pkl"), pd.DataFrame({"a": [1, 2]}))

    class Boom:
        def __reduce__(self):
            raise RuntimeError("boom")

    artifacts.atomic_pickle(tmp_path / "keep.pkl", [1])
    with pytest.raises(RuntimeError, match="boom"):
        artifacts.atomic_pickle(tmp_path / "keep.pkl", Boom())
    assert pickle.loads((tmp_path / "keep.pkl").read_bytes()) == [1]  # the old file survives a failed write
    assert sorted(os.listdir(tmp_path)) == ["a.json", "keep.pkl", "sub"]
    assert os.listdir(tmp_path / "sub") == ["x.pkl"]


def test_run_store_resume_and_config_guard(tmp_path):
    store = RunStore(tmp_path, "org--model")
    config = {"seed": 0, "batch_size": 8}
    fingerprint = store.prepare(config)
    assert fingerprint == artifacts.config_fingerprint(config)
    assert json.loads(store.config_path.read_text()) == {"fingerprint": fingerprint, "config": config}
    for b in (0, 1, 3):
        store.save_batch({"batch_idx": b, "x": b})
    assert [d["batch_idx"] for d in store.finished_batches(5)] == [0, 1]  # stops at the first gap
    assert store.prepare(dict(config)) == fingerprint  # same config: resume
    with pytest.raises(ConfigMismatchError, match=r"batch_size: 8 -> 16.*--overwrite"):
        store.prepare({"seed": 0, "batch_size": 16})
    assert store.batch_path(0).exists()
    store.prepare({"seed": 0, "batch_size": 16}, overwrite=True)
    assert not store.batch_dir.exists()
    assert json.loads(store.config_path.read_text())["config"]["batch_size"] == 16
    store.save_batch({"batch_idx": 0})
    store.prepare({"seed": 0, "batch_size": 16}, overwrite=True)  # same config: still a fresh start
    assert store.finished_batches(1) == []


def test_top_experts_chart_labels_its_error_bars():
    from moe_fastmask.pipeline import plots

    per_batch = pd.concat([stats.batch_risk_diff(np.array([[3, 1, 0]]), np.array([[1, 2, b]]), 4, 4, batch_idx=b)
                           for b in range(3)], ignore_index=True)  # fmt: skip
    table = stats.aggregate_risk_diffs(per_batch)
    figure = plots.top_experts_figure(table, n=3)
    (axes,) = figure.axes
    legend = axes.get_legend()
    assert legend is not None
    assert [t.get_text() for t in legend.get_texts()] == ["error bars: ±1 standard deviation of risk_diff over batches"]
    no_spread = plots.top_experts_figure(table.drop(columns=["risk_diff_std"]), n=3)
    assert no_spread.axes[0].get_legend() is None  # no error bars, nothing to label
