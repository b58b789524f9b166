"""Expert selection from the analysis risk table: the three modes and the default, only positive risk differences,
the per-layer cap, short layers (unmasked or filled), the masks, the masked-layer report, the steering subset, and
the JSON round trip; the default on SteerMoE's published OLMoE table."""

import json
import warnings
from pathlib import Path

import pandas as pd
import pytest
import torch

from moe_fastmask.pipeline.preflight import UsageError
from moe_fastmask.pipeline.selection import (
    ExpertSelection,
    load_risk_table,
    masked_layer_report,
    select_experts,
    steering_experts,
)

OLMOE_TABLE = Path(__file__).parent / "data" / "olmoe_expert_activation_frequencies.csv"  # see tests/data/README.md

L, E, K = 3, 6, 2


def risk_table(scores: dict[tuple[int, int], float], *, all_experts: bool = True) -> pd.DataFrame:
    """A table like risk_diff_<slug>.pkl: sorted by risk_diff descending, with Layer_Expert labels."""
    rows = []
    for layer in range(L):
        for expert in range(E):
            if (layer, expert) in scores or all_experts:
                score = scores.get((layer, expert), -1.0 - 0.01 * (layer * E + expert))
                rows.append({"layer": layer, "expert": expert, "Layer_Expert": f"L{layer:02d}_E{expert:02d}",
                             "risk_diff": score, "risk_diff_abs": abs(score)})
    return pd.DataFrame(rows).sort_values("risk_diff", ascending=False).reset_index(drop=True)


SCORES = {(0, 1): 0.9, (0, 4): 0.8, (1, 2): 0.7, (0, 0): 0.6, (2, 5): 0.5, (1, 3): 0.4, (2, 0): 0.3}


def select(table=None, **options):
    return select_experts(risk_table(SCORES) if table is None else table, num_layers=L, num_experts=E, top_k=K, **options)


def test_top_n_takes_the_best_overall_in_rank_order():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sel = select(top_n=4)
    assert sel.experts == [(0, 1), (0, 4), (1, 2), (0, 0)]
    assert sel.labels == ["L00_E01", "L00_E04", "L01_E02", "L00_E00"]
    assert sel.scores["L00_E01"] == pytest.approx(0.9)


def test_per_layer_takes_the_best_of_every_layer():
    sel = select(per_layer=2)
    assert sel.by_layer() == {0: [1, 4], 1: [2, 3], 2: [0, 5]}
    assert sel.masked_layers == [0, 1, 2] and sel.short_layers == []


def test_threshold_takes_every_expert_above_it():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sel = select(threshold=0.45)
    assert set(sel.experts) == {(0, 1), (0, 4), (1, 2), (0, 0), (2, 5)}


def test_at_most_one_mode_and_the_default_is_top_k_per_layer():
    with pytest.raises(ValueError, match="at most one"):
        select(top_n=3, per_layer=1)
    sel = select()
    assert sel.by_layer() == select(per_layer=K).by_layer() == {0: [1, 4], 1: [2, 3], 2: [0, 5]}
    assert sel.masked_layers == [0, 1, 2]
    assert sel.method == {"mode": "per_layer", "per_layer": K, "fill": False, "score_column": "risk_diff",
                          "default": True}  # fmt: skip


def test_only_experts_with_a_positive_risk_diff_are_taken_and_the_rest_is_explained():
    # layer 1 has two positive experts, layer 2 two; E02 of layer 2 scores exactly 0
    table = risk_table({**SCORES, (2, 2): 0.0})
    with pytest.warns(UserWarning, match=r"fewer than per_layer=3 .*layer 1 has 2, layer 2 has 2"):
        sel = select(table, per_layer=3)
    assert sel.by_layer() == {0: [0, 1, 4], 1: [2, 3], 2: [0, 5]}
    assert all(sel.scores[label] > 0 for label in sel.labels)
    assert "layer 1 has 2" in sel.notes[0]
    with pytest.warns(UserWarning, match=r"took 7 of the top_n=20 experts asked: 7 experts have a positive risk_diff"):
        sel = select(table, top_n=20)
    assert len(sel) == 7 and all(sel.scores[label] > 0 for label in sel.labels)
    with pytest.warns(UserWarning, match=r"risk_diff <= 0 were not taken"):
        sel = select(table, threshold=-5.0)
    assert set(sel.experts) == set(SCORES)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing to explain: every one asked for was taken
        assert select(table, top_n=7).notes == []


def test_never_more_than_num_experts_minus_top_k_per_layer():
    everything_positive = risk_table({(layer, e): 1.1 + 0.1 * e - 0.5 * layer for layer in range(L) for e in range(E)})
    with pytest.warns(UserWarning, match=rf"per_layer={E} is more than .*{E - K} per layer"):
        sel = select(everything_positive, per_layer=E)
    assert sel.by_layer() == {layer: [2, 3, 4, 5] for layer in range(L)}  # the E - K best of each layer
    assert sel.masked_layers == [0, 1, 2]
    # top_n goes on down the ranking past a full layer
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sel = select(everything_positive, top_n=6)
    assert sel.experts == [(0, 5), (0, 4), (0, 3), (0, 2), (1, 5), (1, 4)]
    with pytest.warns(UserWarning, match=r"took 12 of the top_n=20 .*layers \[0, 1, 2\] reached it"):
        assert len(select(everything_positive, top_n=20)) == L * (E - K)
    with pytest.warns(UserWarning, match=r"took 12 of the 18 experts above the threshold"):
        assert len(select(everything_positive, threshold=0.0)) == L * (E - K)


def test_default_masks_every_layer_of_olmoe_on_the_published_table():
    table = pd.read_csv(OLMOE_TABLE)[["layer", "expert", "risk_diff"]]
    positive = table[table.risk_diff > 0].groupby("layer").size()
    assert len(positive) == 16 and positive.min() >= 8  # the data allows 8 per layer everywhere
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no short layer, nothing taken short
        sel = select_experts(table, num_layers=16, num_experts=64, top_k=8)
    assert sel.masked_layers == list(range(16)) and sel.short_layers == []
    assert {layer: len(experts) for layer, experts in sel.by_layer().items()} == {layer: 8 for layer in range(16)}
    best = table.sort_values(["risk_diff", "expert"], ascending=[False, True]).groupby("layer").head(8)
    assert set(sel.experts) == set(zip(best.layer, best.expert))
    assert masked_layer_report(sel)[0] == 16
    labels, message = steering_experts(sel)
    assert labels == sel.labels and message is None


def test_short_layers_stay_unmasked_with_a_warning_naming_them():
    # top 4: layer 0 has 3 (masked), layer 1 has 1 (< top_k: unmasked), layer 2 has none (neither masked nor warned)
    with pytest.warns(UserWarning, match=r"layer 1 \(1 selected\)") as caught:
        sel = select(top_n=4)
    assert "layer 2" not in str(caught[0].message)
    assert sel.masked_layers == [0]
    assert sel.short_layers == [1]
    assert (1, 2) in sel.experts  # still trained
    keep = sel.keep_mask()
    assert keep.shape == (L, 2, E) and keep.dtype == torch.bool
    assert keep[:, 0].all()  # safe tokens route freely everywhere
    assert keep[0, 1].tolist() == [True, True, False, False, True, False]
    assert keep[1, 1].all() and keep[2, 1].all()  # unmasked layers


def test_fill_tops_short_layers_up_with_their_next_ranked_experts():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning when filling
        sel = select(top_n=5, fill=True)
    # layer 1 had only E02; its next-ranked expert is E03 (0.4); layer 2 had E05, next is E00 (0.3)
    assert sel.filled == [(1, 3), (2, 0)]
    assert sel.masked_layers == [0, 1, 2]
    assert sel.short_layers == []
    assert sel.by_layer() == {0: [0, 1, 4], 1: [2, 3], 2: [0, 5]}
    assert sel.keep_mask()[1, 1].sum() == K


def test_fill_ranks_experts_missing_from_the_table_last():
    table = risk_table({(0, 3): 0.9, (1, 1): 0.5}, all_experts=False)  # layer 1 has one scored expert only
    sel = select(table, top_n=2, fill=True)
    assert sel.filled == [(0, 0), (1, 0)]  # unscored experts, lowest index first
    assert sel.masked_layers == [0, 1]


def test_no_selection_leaves_everything_unmasked():
    sel = select(threshold=10.0)
    assert sel.experts == [] and sel.masked_layers == []
    assert sel.keep_mask().all()


def test_ties_go_to_the_lower_layer_then_expert():
    table = risk_table({(2, 1): 0.5, (0, 3): 0.5, (0, 2): 0.5})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sel = select(table, top_n=2)
    assert sel.experts == [(0, 2), (0, 3)]


def test_layer_expert_labels_alone_are_enough():
    table = risk_table(SCORES)[["Layer_Expert", "risk_diff"]]
    assert load_risk_table(table)[["layer", "expert"]].iloc[0].tolist() == [0, 1]
    assert select(table, per_layer=2).by_layer() == select(per_layer=2).by_layer()


def test_other_score_column_ranks_the_experts_with_a_positive_risk_diff():
    table = risk_table(SCORES)
    table["risk_diff_abs"] = 0.0
    table.loc[(table.layer == 2) & (table.expert == 4), "risk_diff_abs"] = 9.0  # risk_diff < 0: never taken
    table.loc[(table.layer == 2) & (table.expert == 0), "risk_diff_abs"] = 5.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert select(table, top_n=1, score_column="risk_diff_abs").experts == [(2, 0)]
    with pytest.raises(ValueError, match="no column"):
        select(table, top_n=1, score_column="nope")


def test_table_for_another_model_is_rejected():
    table = risk_table(SCORES)
    with pytest.raises(ValueError, match="outside the model"):
        select_experts(table, num_layers=2, num_experts=E, top_k=K, top_n=3)


def test_json_round_trip(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sel = select(top_n=5, fill=True)
    path = sel.save(tmp_path)
    assert path.name == "expert_selection.json"
    data = json.loads(path.read_text())
    assert data["experts"][0] == "L00_E01" and data["by_layer"]["1"] == [2, 3]
    again = ExpertSelection.load(tmp_path)
    assert again == sel
    assert torch.equal(again.keep_mask(), sel.keep_mask())


def test_masked_layer_report_counts_and_refuses_an_unmasked_run():
    count, message = masked_layer_report(select(per_layer=K))
    assert count == 3 and "masked layers for unsafe samples: 3 of 3" in message
    with pytest.warns(UserWarning):
        partly = select(top_n=4)  # layer 0 masked, layer 1 short
    count, message = masked_layer_report(partly)
    assert count == 1 and "1 of 3" in message and "unmasked (fewer than top_k selected): [1]" in message
    with pytest.warns(UserWarning):
        unmasked = select(per_layer=1)
    with pytest.raises(UsageError, match=r"no layer is masked .*top_k=2 .*layer 0 1, layer 1 1, layer 2 1.*"
                                         r"--per-layer 2.*--allow-unmasked"):  # fmt: skip
        masked_layer_report(unmasked)
    count, message = masked_layer_report(unmasked, allow_unmasked=True)
    assert count == 0 and "without the mask" in message and "\n" not in message


def test_steering_keeps_top_k_experts_of_every_layer_with_the_best_scoring_subset():
    scores = {"L00_E00": 0.1, "L00_E01": 0.9, "L00_E02": 0.5, "L00_E03": 0.7, "L00_E04": 0.5, "L00_E05": -0.2}
    everything = ExpertSelection(num_layers=L, num_experts=E, top_k=K, masked_layers=[0, 1],
                                 experts=[(0, e) for e in range(E)] + [(1, 0), (1, 1)], scores=scores)  # fmt: skip
    labels, message = steering_experts(everything)
    # layer 0: the E - K = 4 best (0.9, 0.7, then the tie at 0.5 in index order); layer 1 untouched
    assert labels == ["L00_E01", "L00_E02", "L00_E03", "L00_E04", "L01_E00", "L01_E01"]
    assert "layer 0 (6 selected, steered 4; left on: L00_E00, L00_E05)" in message and "layer 1" not in message
    unscored = ExpertSelection(num_layers=L, num_experts=E, top_k=K, masked_layers=[],
                               experts=[(2, e) for e in (5, 4, 3, 2, 1)], scores={"L02_E01": 0.3})  # fmt: skip
    labels, message = steering_experts(unscored)
    assert labels == ["L02_E04", "L02_E03", "L02_E02", "L02_E01"]  # unscored E05 ranks last
    assert "left on: L02_E05" in message
    assert steering_experts(select(per_layer=K)) == (select(per_layer=K).labels, None)


def test_inconsistent_selections_are_rejected():
    with pytest.raises(ValueError, match="masked but has only"):
        ExpertSelection(num_layers=L, num_experts=E, top_k=K, experts=[(0, 1)], masked_layers=[0])
    with pytest.raises(ValueError, match="outside the model"):
        ExpertSelection(num_layers=L, num_experts=E, top_k=K, experts=[(0, E)], masked_layers=[])
    with pytest.raises(ValueError, match="twice"):
        ExpertSelection(num_layers=L, num_experts=E, top_k=K, experts=[(0, 1), (0, 1)], masked_layers=[])
