"""Plots of the aggregated risk-difference table (matplotlib, Agg canvas: no display needed).

Figures are built with ``matplotlib.figure.Figure`` + the Agg canvas, so the global backend (and a notebook's
inline backend) is left alone; files are written atomically.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from moe_fastmask.pipeline.artifacts import atomic_savefig


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=120)
    FigureCanvasAgg(figure)
    return figure


def risk_diff_matrix(table: pd.DataFrame, value: str = "risk_diff") -> np.ndarray:
    """``table[value]`` as a ``[layers, experts]`` array (NaN where a (layer, expert) is missing)."""
    n_layers = int(table["layer"].max()) + 1
    n_experts = int(table["expert"].max()) + 1
    matrix = np.full((n_layers, n_experts), np.nan)
    matrix[table["layer"].to_numpy(int), table["expert"].to_numpy(int)] = table[value].to_numpy(float)
    return matrix


def plot_heatmap(table: pd.DataFrame, path: str | Path, title: str = "risk_diff (a_unsafe_n - a_safe_n)") -> Path:
    """Heatmap of ``risk_diff``, layers (rows) x experts (columns), diverging colours centred on 0."""
    matrix = risk_diff_matrix(table)
    n_layers, n_experts = matrix.shape
    figure = _figure(min(4 + 0.18 * n_experts, 20), min(2.5 + 0.35 * n_layers, 12))
    axes = figure.add_subplot(1, 1, 1)
    limit = float(np.nanmax(np.abs(matrix))) if np.isfinite(matrix).any() else 1.0
    limit = limit or 1.0
    image = axes.imshow(matrix, aspect="auto", cmap="RdBu_r", vmin=-limit, vmax=limit, interpolation="nearest")
    axes.set_xlabel("expert")
    axes.set_ylabel("layer")
    axes.set_title(title)
    axes.set_yticks(range(n_layers))
    step = max(1, n_experts // 16)
    axes.set_xticks(range(0, n_experts, step))
    figure.colorbar(image, ax=axes, label="risk_diff")
    figure.tight_layout()
    return atomic_savefig(path, figure)


def top_experts_figure(table: pd.DataFrame, n: int = 20, title: str | None = None):
    """The bar chart of :func:`plot_top_experts` as a matplotlib ``Figure`` (not saved)."""
    top = table.head(n)
    figure = _figure(max(6.0, 0.4 * len(top) + 2), 4.5)
    axes = figure.add_subplot(1, 1, 1)
    errors = top["risk_diff_std"].fillna(0.0).to_numpy() if "risk_diff_std" in top.columns else None
    colours = ["#c0392b" if value >= 0 else "#2471a3" for value in top["risk_diff"]]
    bars = axes.bar(range(len(top)), top["risk_diff"].to_numpy(), yerr=errors, color=colours, capsize=2)
    if bars.errorbar is not None:  # say what the whiskers are
        bars.errorbar.set_label("error bars: ±1 standard deviation of risk_diff over batches")
        axes.legend(handles=[bars.errorbar], loc="upper right", fontsize=8)
    axes.set_xticks(range(len(top)))
    axes.set_xticklabels(top["Layer_Expert"].tolist(), rotation=60, ha="right", fontsize=8)
    axes.axhline(0.0, color="black", linewidth=0.8)
    axes.set_ylabel("risk_diff (mean over batches)")
    axes.set_title(title or f"top {len(top)} experts by risk_diff")
    figure.tight_layout()
    return figure


def plot_top_experts(table: pd.DataFrame, path: str | Path, n: int = 20, title: str | None = None) -> Path:
    """Bar chart of the ``n`` experts with the highest ``risk_diff`` (the table's first rows), with the spread over
    batches (sample standard deviation) as labelled error bars when the table has ``risk_diff_std``."""
    return atomic_savefig(path, top_experts_figure(table, n, title))
