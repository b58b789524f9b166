"""Routing statistics: activation frequencies, the per-batch risk difference, aggregation over batches.

For one batch and one (layer, expert), with ``safe_tokens`` / ``unsafe_tokens`` the counted tokens of each group:

* ``a_safe``, ``a_unsafe``: tokens of the group that routed to the expert (it was among their top-k);
* ``d_safe = safe_tokens - a_safe``, ``d_unsafe = unsafe_tokens - a_unsafe``: tokens that did not;
* ``a_safe_n = a_safe / safe_tokens``, ``a_unsafe_n = a_unsafe / unsafe_tokens``: activation frequencies;
* ``risk_diff = a_unsafe_n - a_safe_n``: positive when the expert fires more on jailbreak prompts.

Every function here takes host copies (numpy arrays / pandas frames); nothing touches the GPU.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from moe_fastmask.integrations.labels import layer_expert_label

COUNT_COLUMNS = ["a_safe", "a_unsafe", "d_safe", "d_unsafe", "safe_tokens", "unsafe_tokens"]
PER_BATCH_COLUMNS = ["batch_idx", "layer", "expert", *COUNT_COLUMNS, "a_safe_n", "a_unsafe_n", "risk_diff"]
SPREAD_COLUMNS = ["risk_diff_std", "risk_diff_min", "risk_diff_max", "n_batches", "top_count", "top_frac"]
AGGREGATE_COLUMNS = [
    "layer", "expert", "Layer_Expert", "risk_diff", "risk_diff_abs", "a_safe_n", "a_unsafe_n",
    *COUNT_COLUMNS, *SPREAD_COLUMNS,
]  # fmt: skip


def _frequency(count: np.ndarray, tokens: np.ndarray) -> np.ndarray:
    count = count.astype(np.float64)
    tokens = np.broadcast_to(np.asarray(tokens, dtype=np.float64), count.shape)
    out = np.full(count.shape, np.nan)
    np.divide(count, tokens, out=out, where=tokens > 0)
    return out


def frequency_table(
    a_safe: np.ndarray, safe_tokens, a_unsafe: np.ndarray, unsafe_tokens
) -> pd.DataFrame:
    """The statistics table of one set of counts.

    ``a_safe``, ``a_unsafe``: routed-token counts ``[L, E]``; ``safe_tokens``, ``unsafe_tokens``: counted tokens of
    each group, a scalar or anything broadcastable to ``[L, E]`` (e.g. ``[L, 1]`` per layer). A group with no tokens
    gives NaN frequencies. Rows in (layer, expert) order.
    """
    a_safe = np.asarray(a_safe, dtype=np.int64)
    a_unsafe = np.asarray(a_unsafe, dtype=np.int64)
    if a_safe.ndim != 2 or a_safe.shape != a_unsafe.shape:
        raise ValueError(f"a_safe and a_unsafe must both be [layers, experts], got {a_safe.shape} and {a_unsafe.shape}")
    n_layers, n_experts = a_safe.shape
    safe_tok = np.broadcast_to(np.asarray(safe_tokens, dtype=np.int64), a_safe.shape)
    unsafe_tok = np.broadcast_to(np.asarray(unsafe_tokens, dtype=np.int64), a_safe.shape)
    if (a_safe > safe_tok).any() or (a_unsafe > unsafe_tok).any() or (a_safe < 0).any() or (a_unsafe < 0).any():
        raise ValueError("routed counts must lie between 0 and the group's token count")
    a_safe_n = _frequency(a_safe, safe_tok)
    a_unsafe_n = _frequency(a_unsafe, unsafe_tok)
    layer, expert = np.meshgrid(np.arange(n_layers), np.arange(n_experts), indexing="ij")
    return pd.DataFrame(
        {
            "layer": layer.reshape(-1),
            "expert": expert.reshape(-1),
            "a_safe": a_safe.reshape(-1),
            "a_unsafe": a_unsafe.reshape(-1),
            "d_safe": (safe_tok - a_safe).reshape(-1),
            "d_unsafe": (unsafe_tok - a_unsafe).reshape(-1),
            "safe_tokens": safe_tok.reshape(-1),
            "unsafe_tokens": unsafe_tok.reshape(-1),
            "a_safe_n": a_safe_n.reshape(-1),
            "a_unsafe_n": a_unsafe_n.reshape(-1),
            "risk_diff": (a_unsafe_n - a_safe_n).reshape(-1),
        }
    )


def batch_risk_diff(
    safe_counts: np.ndarray, unsafe_counts: np.ndarray, safe_tokens: int, unsafe_tokens: int, batch_idx: int = 0
) -> pd.DataFrame:
    """Per-(layer, expert) statistics of one batch, from its per-group counts ``[L, E]`` and token totals.

    Columns: ``batch_idx, layer, expert, a_safe, a_unsafe, d_safe, d_unsafe, safe_tokens, unsafe_tokens, a_safe_n,
    a_unsafe_n, risk_diff``.
    """
    frame = frequency_table(safe_counts, int(safe_tokens), unsafe_counts, int(unsafe_tokens))
    frame.insert(0, "batch_idx", int(batch_idx))
    return frame


def aggregate_risk_diffs(per_batch: pd.DataFrame, top_n: int = 10) -> pd.DataFrame:
    """Aggregate per-batch tables (rows of :func:`batch_risk_diff`, concatenated) over batches.

    Per (layer, expert): mean ``risk_diff``, ``a_safe_n``, ``a_unsafe_n`` over batches; summed counts
    (``a_safe, a_unsafe, d_safe, d_unsafe, safe_tokens, unsafe_tokens``); ``Layer_Expert`` (``L08_E42``);
    ``risk_diff_abs = |risk_diff|``; and the spread over batches: ``risk_diff_std`` (sample standard deviation,
    NaN with one batch), ``risk_diff_min``, ``risk_diff_max``, ``n_batches``, ``top_count`` (in how many batches the
    expert is among the ``top_n`` highest risk_diff of the batch, ties to the lower layer, then expert) and
    ``top_frac = top_count / n_batches``. Rows with a NaN risk_diff (a batch whose group had no tokens) are left out.
    Sorted by ``risk_diff`` descending (ties: layer, expert ascending), index reset.
    """
    missing = [c for c in ("batch_idx", "layer", "expert", "risk_diff", "a_safe_n", "a_unsafe_n", *COUNT_COLUMNS)
               if c not in per_batch.columns]  # fmt: skip
    if missing:
        raise ValueError(f"per-batch table lacks columns {missing}")
    frame = per_batch.dropna(subset=["risk_diff"])
    if frame.empty:
        return pd.DataFrame({column: pd.Series(dtype=float) for column in AGGREGATE_COLUMNS})
    keys = ["layer", "expert"]
    grouped = frame.groupby(keys, sort=True)
    out = grouped[["risk_diff", "a_safe_n", "a_unsafe_n"]].mean()
    out = out.join(grouped[COUNT_COLUMNS].sum())
    spread = grouped["risk_diff"].agg(["std", "min", "max", "count"])
    spread.columns = ["risk_diff_std", "risk_diff_min", "risk_diff_max", "n_batches"]
    out = out.join(spread)

    ranked = frame.sort_values(["batch_idx", "risk_diff", "layer", "expert"], ascending=[True, False, True, True],
                               kind="mergesort")  # fmt: skip
    top = ranked.groupby("batch_idx", sort=False).head(top_n)
    out["top_count"] = top.groupby(keys).size().reindex(out.index, fill_value=0).astype(np.int64)
    out["top_frac"] = out["top_count"] / out["n_batches"]
    out = out.reset_index()
    out["Layer_Expert"] = [layer_expert_label(int(l), int(e)) for l, e in zip(out["layer"], out["expert"])]
    out["risk_diff_abs"] = out["risk_diff"].abs()
    out["n_batches"] = out["n_batches"].astype(np.int64)
    for column in COUNT_COLUMNS:
        out[column] = out[column].astype(np.int64)
    out = out.sort_values(["risk_diff", "layer", "expert"], ascending=[False, True, True], kind="mergesort")
    return out[AGGREGATE_COLUMNS].reset_index(drop=True)


def format_top(table: pd.DataFrame, n: int = 10) -> str:
    """The first ``n`` rows as aligned text: ``L08_E42  0.234  0.123  0.357`` (risk_diff, a_safe_n, a_unsafe_n)."""
    lines = [f"{'expert':<8} {'risk_diff':>9} {'a_safe_n':>9} {'a_unsafe_n':>10}"]
    for row in table.head(n).itertuples(index=False):
        lines.append(f"{row.Layer_Expert:<8} {row.risk_diff:>9.3f} {row.a_safe_n:>9.3f} {row.a_unsafe_n:>10.3f}")
    return "\n".join(lines)


def sample_counts(expert_ids: np.ndarray, counted: np.ndarray, num_experts: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-sample routing counts from each token's chosen experts.

    ``expert_ids``: uint8 ``[B, T, L, K]`` (``RoutingRecorder.token_experts()``), ``counted``: bool ``[B, T]``.
    Returns ``(counts, tokens)``: int64 ``[B, L, E]`` (tokens of sample ``b`` that routed to expert ``e`` in layer
    ``l``) and int64 ``[B]`` (counted tokens of each sample).
    """
    expert_ids = np.asarray(expert_ids)
    counted = np.asarray(counted, dtype=bool)
    if expert_ids.ndim != 4 or counted.shape != expert_ids.shape[:2]:
        raise ValueError(
            f"expected expert ids [B, T, L, K] and counted [B, T], got {expert_ids.shape}, {counted.shape}"
        )
    batch, _, n_layers, _ = expert_ids.shape
    counts = np.zeros((batch, n_layers, num_experts), dtype=np.int64)
    tokens = counted.sum(axis=1).astype(np.int64)
    if expert_ids.size == 0:
        return counts, tokens
    b_idx, t_idx = np.nonzero(counted)
    chosen = expert_ids[b_idx, t_idx].astype(np.int64)  # [N, L, K]
    if chosen.size and chosen.max() >= num_experts:
        raise ValueError(f"expert id {int(chosen.max())} is out of range for {num_experts} experts")
    flat = (b_idx[:, None, None] * n_layers + np.arange(n_layers)[None, :, None]) * num_experts + chosen
    counts += np.bincount(flat.reshape(-1), minlength=batch * n_layers * num_experts).reshape(counts.shape)
    return counts, tokens
