"""Expert selection from the analysis risk table: the three modes, short layers (unmasked or filled), the masks,
and the JSON round trip."""

import json
import warnings

import pandas as pd
import pytest
import torch

from moe_fastmask.pipeline.selection import ExpertSelection, load_risk_table, select_experts

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


def test_exactly_one_mode():
    with pytest.raises(ValueError, match="exactly one"):
        select()
    with pytest.raises(ValueError, match="exactly one"):
        select(top_n=3, per_layer=1)


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


def test_other_score_column():
    table = risk_table(SCORES)
    table["risk_diff_abs"] = 0.0
    table.loc[(table.layer == 2) & (table.expert == 4), "risk_diff_abs"] = 5.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert select(table, top_n=1, score_column="risk_diff_abs").experts == [(2, 4)]
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


def test_inconsistent_selections_are_rejected():
    with pytest.raises(ValueError, match="masked but has only"):
        ExpertSelection(num_layers=L, num_experts=E, top_k=K, experts=[(0, 1)], masked_layers=[0])
    with pytest.raises(ValueError, match="outside the model"):
        ExpertSelection(num_layers=L, num_experts=E, top_k=K, experts=[(0, E)], masked_layers=[])
    with pytest.raises(ValueError, match="twice"):
        ExpertSelection(num_layers=L, num_experts=E, top_k=K, experts=[(0, 1), (0, 1)], masked_layers=[])
