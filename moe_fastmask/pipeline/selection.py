"""Expert selection: which experts the repair trains, and which experts unsafe tokens may still use.

Input: the analysis table ``risk_diff_<slug>.pkl`` (one row per (layer, expert), with ``layer``, ``expert`` and a
score column, ``risk_diff`` by default: how much more often unsafe tokens route to the expert than safe tokens).
Three ways to choose (at most one; none given: ``per_layer = top_k``):

* ``per_layer``: the n highest-scoring experts of every layer — the default, with n = ``top_k`` of the model (8 for
  OLMoE), the fewest that let every layer be masked;
* ``top_n``: the N highest-scoring experts of the whole model;
* ``threshold``: every expert whose score is above the threshold.

Only experts with a positive risk difference are ever chosen by rank (an expert that fires *less* on jailbreaks is
not an unsafe expert), and never more than ``num_experts - top_k`` of one layer (steering switches the selected
experts off for every token, and each token still needs ``top_k`` experts). When these rules leave fewer experts
than asked, the selection says which and why (a warning, and :attr:`ExpertSelection.notes`).

During masked fine-tuning an unsafe token may only route to the selected experts of a *masked* layer, so a masked
layer needs at least ``top_k`` selected experts. A layer with some, but fewer than ``top_k``, selected experts is
left unmasked (the default; a warning names those layers) or, with ``fill=True``, filled up to ``top_k`` with the
next-ranked experts of that layer whatever their score (an explicit choice; they are listed in
:attr:`ExpertSelection.filled`), which then count as selected. A layer with no selected expert is neither masked
nor trained. Selected experts of unmasked layers are still trained. :func:`masked_layer_report` counts the masked
layers (training refuses to start with none unless told to), :func:`steering_experts` the experts that steering
can switch off.

The result, :class:`ExpertSelection`, is saved as JSON next to the fine-tuned model and read back by training
(the mask and the trainable slices) and by evaluation (steering: the selected experts switched off).
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from moe_fastmask.integrations import get_adapter, layer_expert_label, parse_layer_expert
from moe_fastmask.pipeline.common import SELECTION_FILE, UNSAFE_GROUP


@dataclass
class ExpertSelection:
    """Selected experts of one model, and the layers where unsafe tokens are restricted to them.

    ``experts``: ``(layer, expert)`` pairs, best-ranked first (filled experts after the ranked ones of their layer
    is not guaranteed; use :attr:`filled` to tell them apart). ``masked_layers``: layers whose unsafe tokens may only
    route to selected experts. ``short_layers``: layers left unmasked because they had fewer than ``top_k`` selected
    experts (and no fill). ``method``: how the selection was made (for the record). ``notes``: why fewer experts
    were taken than asked, if they were.
    """

    num_layers: int
    num_experts: int
    top_k: int
    experts: list[tuple[int, int]]
    masked_layers: list[int]
    short_layers: list[int] = field(default_factory=list)
    filled: list[tuple[int, int]] = field(default_factory=list)
    scores: dict[str, float] = field(default_factory=dict)  # label -> score of the ranking column
    method: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.experts = [(int(layer), int(e)) for layer, e in self.experts]
        self.filled = [(int(layer), int(e)) for layer, e in self.filled]
        self.masked_layers = sorted(int(layer) for layer in self.masked_layers)
        self.short_layers = sorted(int(layer) for layer in self.short_layers)
        for layer, expert in self.experts:
            if not (0 <= layer < self.num_layers and 0 <= expert < self.num_experts):
                raise ValueError(
                    f"selected expert {layer_expert_label(layer, expert)} is outside the model: "
                    f"{self.num_layers} layers x {self.num_experts} experts"
                )
        if len(set(self.experts)) != len(self.experts):
            raise ValueError("the selection lists an expert twice")
        by_layer = self.by_layer()
        for layer in self.masked_layers:
            if len(by_layer.get(layer, [])) < self.top_k:
                raise ValueError(
                    f"layer {layer} is masked but has only {len(by_layer.get(layer, []))} selected experts "
                    f"(top_k={self.top_k})"
                )

    # views ---------------------------------------------------------------------------------------------------
    @property
    def labels(self) -> list[str]:
        """``"L08_E42"`` labels of the selected experts, in ranking order."""
        return [layer_expert_label(layer, e) for layer, e in self.experts]

    def __len__(self) -> int:
        return len(self.experts)

    def by_layer(self) -> dict[int, list[int]]:
        """``{layer: sorted experts}`` for layers with at least one selected expert."""
        out: dict[int, list[int]] = {}
        for layer, expert in self.experts:
            out.setdefault(layer, []).append(expert)
        return {layer: sorted(experts) for layer, experts in sorted(out.items())}

    def keep_mask(self, num_groups: int = 2) -> torch.Tensor:
        """The training mask ``[L, num_groups, E]`` for ``set_expert_mask``: group 0 (safe) keeps every expert;
        group 1 (unsafe) keeps only the selected experts of masked layers and every expert elsewhere."""
        if num_groups < 2:
            raise ValueError("the training mask needs a safe group (0) and an unsafe group (1)")
        keep = torch.ones(self.num_layers, num_groups, self.num_experts, dtype=torch.bool)
        by_layer = self.by_layer()
        for layer in self.masked_layers:
            keep[layer, UNSAFE_GROUP] = False
            keep[layer, UNSAFE_GROUP, by_layer[layer]] = True
        return keep

    def steering_mask(self) -> torch.Tensor:
        """The steering mask ``[L, 1, E]`` for ``set_expert_mask``: every selected expert off for every token."""
        keep = torch.ones(self.num_layers, 1, self.num_experts, dtype=torch.bool)
        for layer, expert in self.experts:
            keep[layer, 0, expert] = False
        return keep

    # JSON ----------------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of the selection, with ``Layer_Expert`` labels and the experts by layer."""
        data = asdict(self)
        data["experts"] = self.labels
        data["filled"] = [layer_expert_label(layer, e) for layer, e in self.filled]
        data["by_layer"] = {str(layer): experts for layer, experts in self.by_layer().items()}
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ExpertSelection":
        """The selection :meth:`to_dict` wrote (labels like ``L08_E42`` or ``[layer, expert]`` pairs)."""
        def pairs(items):
            return [parse_layer_expert(x) if isinstance(x, str) else (int(x[0]), int(x[1])) for x in items]

        return cls(
            num_layers=int(data["num_layers"]),
            num_experts=int(data["num_experts"]),
            top_k=int(data["top_k"]),
            experts=pairs(data["experts"]),
            masked_layers=data.get("masked_layers", []),
            short_layers=data.get("short_layers", []),
            filled=pairs(data.get("filled", [])),
            scores={str(k): float(v) for k, v in data.get("scores", {}).items()},
            method=dict(data.get("method", {})),
            notes=[str(note) for note in data.get("notes", [])],
        )

    def save(self, path: str | Path) -> Path:
        """Write the selection as JSON; a directory gets ``expert_selection.json`` inside it."""
        path = Path(path)
        if path.is_dir():
            path = path / SELECTION_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path) -> "ExpertSelection":
        """Read a selection JSON (a directory: its ``expert_selection.json``)."""
        path = Path(path)
        if path.is_dir():
            path = path / SELECTION_FILE
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise FileNotFoundError(f"selection file {str(path)!r} does not exist") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ValueError(f"selection file {str(path)!r} cannot be read as JSON ({error})") from None
        try:
            return cls.from_dict(data)
        except (KeyError, TypeError, ValueError, AttributeError, IndexError) as error:
            raise ValueError(
                f"{path} is not an expert selection (the {SELECTION_FILE} that 'train' writes): "
                f"{type(error).__name__}: {error}"
            ) from None


def check_selection_fits(
    selection: ExpertSelection, model_config, what: str = "the selection", model: str = "the model"
) -> None:
    """The selection was made for this model's layers, experts and top_k (else ``ValueError`` naming ``what`` and
    ``model``)."""
    num_layers, num_experts, top_k = model_sizes(model_config)
    if (num_layers, num_experts, top_k) != (selection.num_layers, selection.num_experts, selection.top_k):
        raise ValueError(
            f"{what} is for {selection.num_layers} layers x {selection.num_experts} experts, top_k "
            f"{selection.top_k}; {model} has {num_layers} x {num_experts}, top_k {top_k}"
        )


# --------------------------------------------------------------------------------------------------------------
# Choosing
# --------------------------------------------------------------------------------------------------------------


def load_risk_table(source):
    """The analysis table as a pandas DataFrame with int ``layer``/``expert`` columns (from a path or a frame)."""
    import pandas as pd

    from moe_fastmask.pipeline.artifacts import read_pickled_frame

    frame = source if isinstance(source, pd.DataFrame) else read_pickled_frame(source, "risk table")
    frame = frame.copy()
    if "layer" not in frame.columns or "expert" not in frame.columns:
        if "Layer_Expert" not in frame.columns:
            raise ValueError("the risk table needs 'layer' and 'expert' columns (or 'Layer_Expert' labels)")
        parsed = [parse_layer_expert(label) for label in frame["Layer_Expert"]]
        frame["layer"] = [layer for layer, _ in parsed]
        frame["expert"] = [expert for _, expert in parsed]
    frame["layer"] = frame["layer"].astype(int)
    frame["expert"] = frame["expert"].astype(int)
    if frame.duplicated(["layer", "expert"]).any():
        raise ValueError("the risk table lists some (layer, expert) twice")
    return frame


def select_experts(
    risk_table,
    *,
    num_layers: int,
    num_experts: int,
    top_k: int,
    top_n: int | None = None,
    per_layer: int | None = None,
    threshold: float | None = None,
    fill: bool = False,
    score_column: str = "risk_diff",
    warn: bool = True,
) -> ExpertSelection:
    """Choose experts from the analysis table (a DataFrame or the path of ``risk_diff_<slug>.pkl``).

    At most one of ``top_n`` (best N overall), ``per_layer`` (best n of every layer) and ``threshold`` (every expert
    scoring above it) is given; none: ``per_layer = top_k``. Ranking: ``score_column`` descending, ties to the lower
    layer, then lower expert. Only experts with a positive risk difference (the ``risk_diff`` column; the score
    column when the table has none) are eligible, and at most ``num_experts - top_k`` per layer (``top_n`` then
    goes on down the ranking). When fewer are taken than asked, :attr:`ExpertSelection.notes` says which and why
    (and a warning, with ``warn``). Layers with between 1 and ``top_k - 1`` selected experts are left unmasked with a
    warning, or with ``fill`` topped up to ``top_k`` with the next-ranked experts of that layer, whatever their score
    (experts missing from the table rank last, by index). ``num_layers``, ``num_experts``, ``top_k`` come from the
    model's config.
    """
    modes = {"top_n": top_n, "per_layer": per_layer, "threshold": threshold}
    given = [name for name, value in modes.items() if value is not None]
    if len(given) > 1:
        raise ValueError(f"give at most one of top_n, per_layer, threshold (got {', '.join(given)})")
    if top_k < 1 or top_k > num_experts:
        raise ValueError(f"top_k must be in [1, num_experts={num_experts}], got {top_k}")
    default = not given
    if default:
        per_layer = top_k
        given = ["per_layer"]
        modes["per_layer"] = per_layer
    frame = load_risk_table(risk_table)
    if score_column not in frame.columns:
        raise ValueError(f"the risk table has no column {score_column!r}; columns: {list(frame.columns)}")
    outside = frame[(frame.layer < 0) | (frame.layer >= num_layers) | (frame.expert < 0) | (frame.expert >= num_experts)]
    if len(outside):
        raise ValueError(
            f"the risk table names experts outside the model ({num_layers} layers x {num_experts} experts), e.g. "
            f"{layer_expert_label(int(outside.layer.iloc[0]), int(outside.expert.iloc[0]))}: wrong model or wrong table?"
        )
    frame = frame[frame[score_column].notna()]
    ranked = frame.sort_values([score_column, "layer", "expert"], ascending=[False, True, True], kind="mergesort")
    sign_column = "risk_diff" if "risk_diff" in ranked.columns else score_column
    eligible = ranked[ranked[sign_column] > 0]
    cap = num_experts - top_k  # steering must leave top_k experts of every layer
    positive = eligible.groupby("layer").size().to_dict()
    notes: list[str] = []

    def capped(rows, limit: int | None = None):
        """Walk ``rows`` in rank order taking at most ``cap`` per layer (and ``limit`` in all)."""
        taken, per = [], {}
        for layer, expert in zip(rows.layer, rows.expert):
            if limit is not None and len(taken) >= limit:
                break
            if per.get(layer, 0) < cap:
                per[layer] = per.get(layer, 0) + 1
                taken.append((int(layer), int(expert)))
        return taken

    why_cap = (f"at most num_experts - top_k = {num_experts} - {top_k} = {cap} per layer, so that steering leaves "
               f"top_k experts to route to")
    if top_n is not None:
        if top_n < 0:
            raise ValueError(f"top_n must be >= 0, got {top_n}")
        experts = capped(eligible, top_n)
        if len(experts) < top_n:
            reasons = [f"{len(eligible)} experts have a positive {sign_column}"]
            full = sorted(layer for layer, n in positive.items() if n > cap)
            if full:
                reasons.append(f"{why_cap} (layers {full} reached it)")
            notes.append(f"took {len(experts)} of the top_n={top_n} experts asked: " + "; ".join(reasons))
    elif per_layer is not None:
        if per_layer < 0:
            raise ValueError(f"per_layer must be >= 0, got {per_layer}")
        chosen = eligible.groupby("layer", sort=False).head(min(per_layer, cap))  # keeps the rank order
        experts = [(int(layer), int(e)) for layer, e in zip(chosen.layer, chosen.expert)]
        if per_layer > cap:
            notes.append(f"per_layer={per_layer} is more than {why_cap}: took at most {cap} per layer")
        want = min(per_layer, cap)
        few = {layer: positive.get(layer, 0) for layer in range(num_layers) if positive.get(layer, 0) < want}
        if few:
            details = ", ".join(f"layer {layer} has {n}" for layer, n in few.items())
            notes.append(f"some layers have fewer than per_layer={per_layer} experts with a positive {sign_column} "
                         f"and got only those: {details}")
    else:
        if not math.isfinite(float(threshold)):
            raise ValueError(f"threshold must be finite, got {threshold}")
        above = eligible[eligible[score_column] > float(threshold)]
        experts = capped(above)
        if len(experts) < len(above):
            notes.append(f"took {len(experts)} of the {len(above)} experts above the threshold: {why_cap}")
        if float(threshold) < 0 and len(ranked[ranked[score_column] > float(threshold)]) > len(above):
            notes.append(f"experts above the threshold {threshold} with a {sign_column} <= 0 were not taken: "
                         f"only a positive {sign_column} marks an unsafe expert")
    if notes and warn:
        warnings.warn("expert selection: " + "; ".join(notes), UserWarning, stacklevel=2)

    scores = {layer_expert_label(layer, e): float(s) for layer, e, s in zip(ranked.layer, ranked.expert, ranked[score_column])}
    counts: dict[int, int] = {}
    for layer, _ in experts:
        counts[layer] = counts.get(layer, 0) + 1
    short = sorted(layer for layer, n in counts.items() if n < top_k)

    filled: list[tuple[int, int]] = []
    if fill and short:
        taken = set(experts)
        for layer in short:
            in_layer = ranked[ranked.layer == layer]
            order = [int(e) for e in in_layer.expert]
            order += [e for e in range(num_experts) if e not in set(order)]  # unscored experts rank last
            for expert in order:
                if counts[layer] >= top_k:
                    break
                if (layer, expert) not in taken:
                    taken.add((layer, expert))
                    filled.append((layer, expert))
                    counts[layer] += 1
        experts = experts + filled
        short_left: list[int] = []
    else:
        short_left = short
    if short_left and warn:
        details = ", ".join(f"layer {layer} ({counts[layer]} selected)" for layer in short_left)
        warnings.warn(
            f"layers with fewer than top_k={top_k} selected experts are left unmasked (their selected experts are "
            f"still trained; --fill (fill=True) tops them up): {details}",
            UserWarning,
            stacklevel=2,
        )
    masked = sorted(layer for layer, n in counts.items() if n >= top_k)
    method = {"mode": given[0], given[0]: modes[given[0]], "fill": bool(fill), "score_column": score_column}
    if default:
        method["default"] = True
    return ExpertSelection(
        num_layers=num_layers,
        num_experts=num_experts,
        top_k=top_k,
        experts=experts,
        masked_layers=masked,
        short_layers=short_left,
        filled=filled,
        scores={label: scores[label] for label in (layer_expert_label(layer, e) for layer, e in experts) if label in scores},
        method=method,
        notes=notes,
    )


def masked_layer_report(selection: ExpertSelection, *, allow_unmasked: bool = False) -> tuple[int, str]:
    """``(number of masked layers, a one-line message saying so)`` for the start of training.

    With no masked layer the masked routing that defines the repair would be applied nowhere: that raises
    :class:`~moe_fastmask.pipeline.preflight.UsageError` (naming each layer's selected count and the ways out) unless
    ``allow_unmasked``, in which case the message says the training is unmasked.
    """
    from moe_fastmask.pipeline.preflight import UsageError

    count = len(selection.masked_layers)
    if count:
        short = f"; unmasked (fewer than top_k selected): {selection.short_layers}" if selection.short_layers else ""
        return count, (
            f"masked layers for unsafe samples: {count} of {selection.num_layers}, layers {selection.masked_layers} "
            f"(unsafe tokens there may route only to the selected experts){short}"
        )
    by_layer = selection.by_layer()
    counts = ", ".join(f"layer {layer} {len(experts)}" for layer, experts in by_layer.items()) or "none"
    why = (
        f"no layer is masked for unsafe samples: a masked layer needs top_k={selection.top_k} selected experts, "
        f"selected per layer: {counts}"
    )
    if not allow_unmasked:
        raise UsageError(
            f"{why}. Select more experts per layer (e.g. --per-layer {selection.top_k}) or --fill, or pass "
            f"--allow-unmasked to train the selected experts without the mask"
        )
    return 0, f"{why}; training the selected experts without the mask (--allow-unmasked)"


def steering_experts(selection: ExpertSelection) -> tuple[list[str], str | None]:
    """The experts that steering switches off, and a message when that is not all of the selection.

    Steering switches the selected experts off for every token, so each layer must keep ``top_k`` experts: a layer
    with more than ``num_experts - top_k`` selected experts is steered with its ``num_experts - top_k`` highest-
    scoring ones (:attr:`ExpertSelection.scores`; unscored experts last, ties to the lower index). Returns the
    ``"L08_E42"`` labels in the selection's order and ``None``, or the reduced labels and a message naming each
    reduced layer and the experts left on.
    """
    cap = selection.num_experts - selection.top_k
    keep: set[tuple[int, int]] = set(selection.experts)
    reduced = []
    for layer, experts in selection.by_layer().items():
        if len(experts) <= cap:
            continue

        def rank(expert: int, layer: int = layer) -> tuple[float, int]:
            score = selection.scores.get(layer_expert_label(layer, expert))
            return (-score if score is not None else math.inf, expert)

        ordered = sorted(experts, key=rank)
        dropped = ordered[cap:]
        keep -= {(layer, expert) for expert in dropped}
        reduced.append(
            f"layer {layer} ({len(experts)} selected, steered {cap}; left on: "
            f"{', '.join(layer_expert_label(layer, e) for e in sorted(dropped))})"
        )
    labels = [layer_expert_label(layer, e) for layer, e in selection.experts if (layer, e) in keep]
    if not reduced:
        return labels, None
    rule = "the highest-scoring" if selection.scores else "the lowest indices: the selection holds no scores"
    return labels, (
        f"steering: switching off every selected expert would leave fewer than top_k={selection.top_k} experts in "
        f"some layers, so each is steered with {cap} of its selected experts ({rule}): " + "; ".join(reduced)
    )


def model_sizes(config) -> tuple[int, int, int]:
    """``(num_layers, num_experts, top_k)`` of a supported MoE config; layers are the MoE layers (families with
    dense layers, e.g. DeepSeek-V3, have fewer than ``num_hidden_layers``)."""
    num_experts = getattr(config, "num_experts", None) or getattr(config, "num_local_experts")
    num_layers = get_adapter(config.model_type).num_moe_layers(config)
    return int(num_layers), int(num_experts), int(config.num_experts_per_tok)
