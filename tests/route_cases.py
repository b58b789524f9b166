"""Shared random cases and an independent oracle for testing every backend of ``route``.

The oracle (:func:`naive_route`) is a per-token Python loop written without the reference's code, so a bug shared
by the reference and a kernel still shows.
"""

from __future__ import annotations

import itertools
import math
import random
import warnings
from dataclasses import dataclass

import torch

from moe_fastmask.ops import reference

POISON_ID = -7  # written into outputs before a run so unwritten elements show


@dataclass
class RouteCase:
    """One random input of ``route`` (CPU tensors; move with :meth:`to`)."""

    logits: torch.Tensor
    top_k: int
    keep: torch.Tensor | None
    group: torch.Tensor | None
    num_groups: int
    renormalize: bool

    def to(self, device) -> "RouteCase":
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return RouteCase(move(self.logits), self.top_k, move(self.keep), move(self.group), self.num_groups, self.renormalize)

    def new_counts(self) -> torch.Tensor:
        return torch.zeros(self.num_groups, self.logits.shape[1], dtype=torch.int64, device=self.logits.device)

    def describe(self) -> str:
        T, E = self.logits.shape
        return (
            f"T={T} E={E} k={self.top_k} dtype={self.logits.dtype} keep={'yes' if self.keep is not None else 'no'} "
            f"group={'yes' if self.group is not None else 'no'} G={self.num_groups} renorm={self.renormalize} "
            f"contiguous={self.logits.is_contiguous()}"
        )


def tie_free_logits(num_tokens: int, num_experts: int, dtype: torch.dtype, generator: torch.Generator) -> torch.Tensor:
    """Logits whose values are distinct within each row even after rounding to ``dtype`` (so top-k ids are unique).

    Each row is a random permutation of evenly spaced values (spacing larger than the dtype's rounding at that
    magnitude) plus small noise, so ids can be compared exactly across backends.
    """
    spacing = {torch.float32: 0.05, torch.float16: 0.05, torch.bfloat16: 0.125, torch.float64: 0.05}[dtype]
    base = (torch.arange(num_experts, dtype=torch.float64) - num_experts / 2) * spacing
    perms = torch.argsort(torch.rand(num_tokens, num_experts, generator=generator), dim=-1)
    values = base[perms] + (torch.rand(num_tokens, 1, generator=generator, dtype=torch.float64) - 0.5)
    return values.to(dtype)


def with_negative_nans(values: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """``values`` with the sign bit set on about half of its NaNs (dtype conversions may drop a NaN's sign, so the
    bit is set in the final dtype)."""
    bits = values.view({8: torch.int64, 4: torch.int32, 2: torch.int16}[values.element_size()])
    negative = values.isnan() & (torch.rand(values.shape, generator=gen) < 0.5)
    bits[negative] = bits[negative] | torch.iinfo(bits.dtype).min
    return values


def adversarial_logits(kind: str, T: int, E: int, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    """[T, E] CPU logits of an adversarial ``kind`` (the CUDA kernels' tests pick their kinds from these)."""
    inf, nan = math.inf, math.nan
    if kind == "distinct":
        return tie_free_logits(T, E, dtype, gen)
    if kind == "normal":
        return torch.randn(T, E, generator=gen).to(dtype)
    if kind == "wide":  # probabilities underflow to 0; bf16 / fp16 saturate to +-inf at the ends (NaN rows)
        values = torch.randn(T, E, generator=gen, dtype=torch.float64) * 30
        values[torch.rand(T, E, generator=gen) < 0.05] *= 1e3
        return values.to(dtype)
    if kind == "ties":  # many exact ties, equal rows included
        values = torch.randint(-4, 5, (T, E), generator=gen).double() / 2
        values[::7] = 1.5
        return values.to(dtype)
    if kind == "bf16_quantised":
        return torch.randn(T, E, generator=gen).to(torch.bfloat16).to(dtype)
    if kind == "signed_zeros":
        values = torch.randint(-1, 2, (T, E), generator=gen).double() * (torch.rand(T, E, generator=gen) < 0.2)
        signs = torch.where(torch.rand(T, E, generator=gen) < 0.5, -1.0, 1.0).double()
        return torch.where(values == 0, signs * 0.0, values).to(dtype)
    if kind == "subnormal":  # values below the dtype's normal range (and zeros of both signs): none may be flushed
        tiny = {torch.float32: 1e-40, torch.float16: 1e-6, torch.bfloat16: 1e-39}[dtype]
        values = torch.randint(-3, 4, (T, E), generator=gen).double() * tiny
        return torch.where(torch.rand(T, E, generator=gen) < 0.1, -0.0, values).to(dtype)
    if kind == "neg_inf":  # -inf on random experts; rows 0 and 5 entirely -inf
        values = torch.randn(T, E, generator=gen, dtype=torch.float64)
        values[torch.rand(T, E, generator=gen) < 0.5] = -inf
        values[0] = -inf
        values[5 % T] = -inf
        return values.to(dtype)
    if kind == "nan_inf":  # NaN of both signs, +inf and -inf in some rows (NaN / +inf rows are NaN unless masked)
        values = torch.randn(T, E, generator=gen, dtype=torch.float64)
        for value in (nan, inf, -inf):
            rows = torch.randint(0, T, (max(1, T // 6),), generator=gen)
            values[rows, torch.randint(0, E, (rows.numel(),), generator=gen)] = value
        values[1 % T] = nan
        return with_negative_nans(values.to(dtype), gen)
    raise ValueError(kind)


def random_keep(num_groups: int, num_experts: int, top_k: int, generator: torch.Generator) -> torch.Tensor:
    """Bool [G, E]: each group keeps a different random subset of at least ``top_k`` experts."""
    keep = torch.zeros(num_groups, num_experts, dtype=torch.bool)
    for g in range(num_groups):
        n_kept = int(torch.randint(top_k, num_experts + 1, (1,), generator=generator))
        keep[g, torch.randperm(num_experts, generator=generator)[:n_kept]] = True
    return keep


def make_case(
    num_tokens: int,
    num_experts: int,
    top_k: int,
    dtype: torch.dtype,
    *,
    seed: int,
    mask: str = "none",
    groups: str = "none",
    num_groups: int = 2,
    renormalize: bool = False,
    contiguous: bool = True,
) -> RouteCase:
    """Build a random case.

    mask: "none", "random" (one random subset for every group), "per_group" (a different subset per group).
    groups: "none" (every token group 0), "random" (ids in [0, G)), "with_unassigned" (some -1 entries).
    contiguous: False gives logits that are a transposed view (column stride != 1).
    """
    gen = torch.Generator().manual_seed(seed)
    logits = tie_free_logits(num_tokens, num_experts, dtype, gen)
    if not contiguous:
        logits = logits.t().contiguous().t()  # same values, column-major strides
    G = 1 if groups == "none" else num_groups
    keep = None
    if mask == "random":
        keep = random_keep(1, num_experts, top_k, gen).expand(G, num_experts).contiguous()
    elif mask == "per_group":
        keep = random_keep(G, num_experts, top_k, gen)
    group = None
    if groups == "random":
        group = torch.randint(0, G, (num_tokens,), generator=gen)
    elif groups == "with_unassigned":
        group = torch.randint(-1, G, (num_tokens,), generator=gen)
    return RouteCase(logits, top_k, keep, group, G, renormalize)


def naive_route(case: RouteCase) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token Python loop: (weights float64 [T, k], ids int64 [T, k], counts int64 [G, E])."""
    T, E = case.logits.shape
    logits = case.logits.detach().double().cpu()
    weights = torch.zeros(T, case.top_k, dtype=torch.float64)
    ids = torch.zeros(T, case.top_k, dtype=torch.int64)
    counts = torch.zeros(case.num_groups, E, dtype=torch.int64)
    for t in range(T):
        g = 0 if case.group is None else int(case.group[t])
        if not 0 <= g < case.num_groups:
            g = -1  # out-of-range ids act as -1
        allowed = [True] * E
        if case.keep is not None and g >= 0:
            allowed = [bool(v) for v in case.keep[g]]
        row = [float(logits[t, e]) if allowed[e] else -math.inf for e in range(E)]
        peak = max(row)
        exps = [math.exp(v - peak) if v != -math.inf else 0.0 for v in row]
        total = sum(exps)
        probs = [x / total for x in exps]
        order = tie_rule_order([float(v) for v in logits[t]], allowed)[: case.top_k]
        chosen = [probs[e] for e in order]
        if case.renormalize:
            s = sum(chosen)
            chosen = [c / s for c in chosen]
        weights[t] = torch.tensor(chosen, dtype=torch.float64)
        ids[t] = torch.tensor(order)
        if g >= 0:
            for e in order:
                counts[g, e] += 1
    return weights, ids, counts


def tie_rule_order(logits: list[float], allowed: list[bool]) -> list[int]:
    """Experts in routing order: allowed before masked, then by descending logit (-0.0 == +0.0, which Python's
    comparison already gives), then by ascending index. No NaN."""
    return sorted(range(len(logits)), key=lambda e: (not allowed[e], -logits[e], e))


def tolerance(dtype: torch.dtype) -> tuple[float, float]:
    """(atol, rtol) for weights in ``dtype``."""
    return {
        torch.float64: (1e-12, 1e-12),
        torch.float32: (1e-6, 1e-5),
        torch.float16: (1e-3, 2e-3),
        torch.bfloat16: (8e-3, 1.6e-2),
    }[dtype]


def random_grid(count: int, seed: int) -> list[dict]:
    """``count`` random case specs covering shapes, dtypes, masks, groups and flags (seeded, reproducible)."""
    rng = random.Random(seed)
    specs = []
    for i in range(count):
        E = rng.choice([8, 60, 64, 128])
        spec = dict(
            num_tokens=rng.choice([1, 2, 7, 33, 100, 257]),
            num_experts=E,
            top_k=rng.choice([1, 2, 8]),
            dtype=rng.choice([torch.float32, torch.float16, torch.bfloat16]),
            seed=rng.randrange(1 << 30),
            mask=rng.choice(["none", "random", "per_group"]),
            groups=rng.choice(["none", "random", "with_unassigned"]),
            num_groups=rng.choice([1, 2, 3, 5]),
            renormalize=rng.choice([False, True]),
            contiguous=rng.random() < 0.75,
        )
        specs.append(spec)
    return specs


def assert_compiled_matches_eager(case: RouteCase, backend: str) -> None:
    """``torch.compile(fullgraph=True)`` of route + a loss, forward and backward, equals eager (ids, counts, grads)."""
    from moe_fastmask import route

    def step(logits, counts):
        weights, ids = route(logits, case.top_k, case.keep, case.group, counts, case.renormalize, backend)
        return (weights.float() ** 2).sum(), ids

    x_eager = case.logits.clone().requires_grad_()
    x_comp = case.logits.clone().requires_grad_()
    counts_eager, counts_comp = case.new_counts(), case.new_counts()
    loss_eager, ids_eager = step(x_eager, counts_eager)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loss_comp, ids_comp = torch.compile(step, fullgraph=True, backend="aot_eager")(x_comp, counts_comp)
    loss_eager.backward()
    loss_comp.backward()
    assert torch.equal(ids_comp, ids_eager) and torch.equal(counts_comp, counts_eager)
    assert int(counts_comp.sum()) > 0
    torch.testing.assert_close(loss_comp, loss_eager)
    torch.testing.assert_close(x_comp.grad, x_eager.grad)


ADVERSARIAL_KINDS = ("wide", "zeros", "half_integers", "signed_zeros", "bf16_quantised", "neg_inf_allowed")


def adversarial_case(kind: str, seed: int, *, exact_mask: bool) -> RouteCase:
    """A small case built to break tie and mask handling.

    kind: "wide" (std-30 logits: allowed probabilities underflow to 0), "zeros" (every logit +-0.0),
    "half_integers" (many exact ties), "signed_zeros" (+-0.0 among a few +-1), "bf16_quantised" (values rounded to
    bfloat16, in any dtype), "neg_inf_allowed" (-inf on random experts, allowed ones included, some rows all -inf).
    exact_mask: every group keeps exactly ``top_k`` experts (else a random subset of at least ``top_k``).
    Groups include -1 tokens.
    """
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    T = rng.choice([1, 5, 17])
    E = rng.choice([4, 8, 12, 64])
    top_k = rng.choice([k for k in (1, 2, 4, 8) if k <= E])
    dtype = rng.choice([torch.float32, torch.float16, torch.bfloat16])
    G = rng.choice([1, 2, 3])
    if kind == "wide":
        values = torch.randn(T, E, generator=gen, dtype=torch.float64) * 30
    elif kind == "zeros":
        values = torch.zeros(T, E, dtype=torch.float64)
    elif kind == "half_integers":
        values = torch.randint(-4, 5, (T, E), generator=gen).double() / 2
    elif kind == "signed_zeros":
        values = torch.randint(-1, 2, (T, E), generator=gen).double() * (torch.rand(T, E, generator=gen) < 0.2)
    elif kind == "bf16_quantised":
        values = torch.randn(T, E, generator=gen).to(torch.bfloat16).double()
    elif kind == "neg_inf_allowed":
        values = torch.randn(T, E, generator=gen, dtype=torch.float64)
        values[torch.rand(T, E, generator=gen) < 0.5] = -math.inf
        values[0] = -math.inf  # a row whose allowed experts are all -inf
    else:
        raise ValueError(f"unknown kind {kind!r}")
    signs = torch.where(torch.rand(T, E, generator=gen) < 0.5, -1.0, 1.0).double()
    values = torch.where(values == 0, signs * 0.0, values)  # +0.0 and -0.0 both present
    keep = torch.zeros(G, E, dtype=torch.bool)
    for g in range(G):
        n_kept = top_k if exact_mask else rng.randint(top_k, E)
        keep[g, torch.randperm(E, generator=gen)[:n_kept]] = True
    group = torch.randint(-1, G, (T,), generator=gen)
    return RouteCase(values.to(dtype), top_k, keep, group, G, rng.random() < 0.5)


def extreme_grads_case(gen: torch.Generator, renormalize: bool, forward, device="cpu") -> tuple[torch.Tensor, ...]:
    """(logits, ids, grad) on ``device`` for route's backward: bf16 logits [6, 64], their top-8 ids from ``forward``
    (a backend's ``route_forward``), and bf16 grads near the largest value with opposite signs, so that g - dot lies
    beyond float32's range while every gradient lies within it (the closed form must take w g - w dot)."""
    logits = torch.randn(6, 64, generator=gen).to(torch.bfloat16).to(device)
    _, ids = forward(logits, 8, None, None, None, renormalize)
    big = torch.finfo(torch.bfloat16).max
    grad = torch.full((6, 8), -0.9 * big)
    grad[:, 7] = 0.9 * big  # (the smallest chosen weight)
    return logits, ids, grad.to(torch.bfloat16).to(device)


def recount(ids: torch.Tensor, group: torch.Tensor | None, num_groups: int, num_experts: int) -> torch.Tensor:
    """int64 [G, E]: the counts ``ids`` should add (tokens of groups outside [0, G) not counted)."""
    counts = torch.zeros(num_groups, num_experts, dtype=torch.int64)
    ids = ids.cpu()
    for t in range(ids.shape[0]):
        g = 0 if group is None else int(group[t])
        if 0 <= g < num_groups:
            counts[g] += torch.bincount(ids[t], minlength=num_experts)
    return counts


# ----------------------------------------------------------------------------------------------------------------
# Router variants (scoring, selection bias, group-limited top-k, scale)
# ----------------------------------------------------------------------------------------------------------------

# one variant per family router, plus the combinations the families do not use
VARIANTS = {
    "softmax": dict(scoring="softmax"),
    "softmax_renorm_scaled": dict(scoring="softmax", renormalize=True, scale=2.5),
    "softmax_chosen": dict(scoring="softmax_chosen"),
    "sigmoid": dict(scoring="sigmoid"),
    "sigmoid_bias_renorm": dict(scoring="sigmoid", bias=True, renormalize=True, scale=1.5),
    "sigmoid_groups": dict(scoring="sigmoid", bias=True, n_group=4, topk_group=2, renormalize=True, scale=2.5),
}


def variant_kwargs(name: str, num_experts: int, generator: torch.Generator, top_k: int = 1) -> dict:
    """route keyword arguments of variant ``name``: ``bias=True`` becomes a random float32 bias [E] (std 0.1, so it
    reorders experts); n_group shrinks to a divisor of E that leaves groups of at least 2 experts, and topk_group
    grows until the kept groups hold ``top_k`` experts."""
    kwargs = dict(VARIANTS[name])
    if kwargs.pop("bias", False):
        kwargs["bias"] = torch.randn(num_experts, generator=generator) * 0.1
    n_group = kwargs.get("n_group", 1)
    while n_group > 1 and (num_experts % n_group or num_experts // n_group < 2):
        n_group //= 2
    if "n_group" in kwargs:
        kwargs["n_group"] = n_group
        kwargs["topk_group"] = max(min(kwargs["topk_group"], n_group), -(-top_k // (num_experts // n_group)))
        if n_group == 1:
            kwargs["topk_group"] = 1
    return kwargs


def naive_variant_route(
    logits: torch.Tensor,
    top_k: int,
    allowed: torch.Tensor,
    *,
    scoring: str = "softmax",
    bias: torch.Tensor | None = None,
    n_group: int = 1,
    topk_group: int = 1,
    renormalize: bool = False,
    scale: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token float64 Python loop of every variant: (weights [T, k], ids [T, k]). ``allowed``: bool [T, E].

    Written from the routers' definitions (DeepSeek-V3's group limit, GPT-OSS' softmax over the chosen), not from the
    reference's code. Use on inputs whose selection values are well separated (float64 vs float32 order).
    """
    T, E = logits.shape
    weights = torch.zeros(T, top_k, dtype=torch.float64)
    ids = torch.zeros(T, top_k, dtype=torch.int64)
    b = [0.0] * E if bias is None else [float(v) for v in bias]
    for t in range(T):
        z = [float(v) for v in logits[t].double()]
        ok = [bool(v) for v in allowed[t]]
        if scoring == "sigmoid":
            s = [1.0 / (1.0 + math.exp(-v)) for v in z]
            sel = [s[e] + b[e] if ok[e] else -math.inf for e in range(E)]
            if n_group > 1:
                size = E // n_group
                scores = []
                for g in range(n_group):
                    top2 = sorted(sel[g * size:(g + 1) * size], reverse=True)[:2]
                    scores.append(sum(top2))
                kept = sorted(range(n_group), key=lambda g: (-scores[g], g))[:topk_group]
                sel = [sel[e] if e // size in kept else -math.inf for e in range(E)]
        else:
            sel = [z[e] if ok[e] else -math.inf for e in range(E)]
        order = sorted(range(E), key=lambda e: (not ok[e], -sel[e], e))[:top_k]
        if scoring == "softmax":
            peak = max(z[e] for e in range(E) if ok[e])
            total = sum(math.exp(z[e] - peak) for e in range(E) if ok[e])
            w = [math.exp(z[e] - peak) / total for e in order]
            if renormalize:
                w = [v / sum(w) for v in w]
        elif scoring == "softmax_chosen":
            peak = max(z[e] for e in order)
            w = [math.exp(z[e] - peak) for e in order]
            w = [v / sum(w) for v in w]
        else:
            w = [1.0 / (1.0 + math.exp(-z[e])) for e in order]
            if renormalize:
                w = [v / (sum(w) + 1e-20) for v in w]
        weights[t] = torch.tensor([v * scale for v in w], dtype=torch.float64)
        ids[t] = torch.tensor(order)
    return weights, ids


def selection_of(logits: torch.Tensor, allowed: torch.Tensor, kwargs: dict) -> torch.Tensor:
    """float64 selection values of the reference under route keyword arguments ``kwargs`` (for comparing orders of
    near-equal values)."""
    return reference.selection_values(
        logits.double(), allowed, kwargs.get("scoring", "softmax"), kwargs.get("bias"),
        kwargs.get("n_group", 1), kwargs.get("topk_group", 1),
    )


def near_tie_group_choices(logits: torch.Tensor, allowed: torch.Tensor, kwargs: dict, atol: float = 1e-5,
                           limit: int = 64) -> list[torch.Tensor]:
    """float64 selection values [E] of one row (``logits`` [E], ``allowed`` [E]) under each other choice of kept
    groups that the group limit could make within rounding: where group scores lie within ``atol`` of the last kept
    one's, a backend computing them with its own exp may keep any of those groups. Empty without a group limit or
    without such near-ties; at most ``limit`` choices."""
    n_group, topk_group = kwargs.get("n_group", 1), kwargs.get("topk_group", 1)
    if kwargs.get("scoring", "softmax") != "sigmoid" or n_group <= 1:
        return []
    values = torch.sigmoid(logits.double())
    if kwargs.get("bias") is not None:
        values = values + kwargs["bias"].double()
    scores = values.masked_fill(~allowed, float("-inf")).view(n_group, -1).topk(2, dim=-1).values.sum(dim=-1)
    last_kept = scores.sort(descending=True).values[topk_group - 1]
    near = (scores == last_kept) | ((scores - last_kept).abs() <= atol)
    certain = (scores > last_kept) & ~near
    ambiguous = near.nonzero().flatten().tolist()
    need = topk_group - int(certain.sum())
    choices = []
    for combo in itertools.islice(itertools.combinations(ambiguous, need), limit):
        kept = certain.clone()
        kept[list(combo)] = True
        in_kept = kept.repeat_interleave(logits.shape[0] // n_group)
        choices.append(values.masked_fill(~in_kept, float("-inf")))
    return choices if len(choices) > 1 else []


def matching_rows(ids: torch.Tensor, ref_ids: torch.Tensor, logits: torch.Tensor, allowed: torch.Tensor,
                  kwargs: dict, exact: bool, where: str = "") -> torch.Tensor:
    """Bool [T]: rows whose ids equal the reference's, for a call of route with keyword arguments ``kwargs`` on
    ``logits`` with experts ``allowed`` [T, E]. ``exact``: all must. Otherwise (sigmoid selection values are computed
    with each backend's own exp) a differing row must choose experts of the same selection values within rounding,
    or, where the group limit's choice of groups rests on group scores within rounding of each other, the experts the
    row would choose under another such choice (near_tie_group_choices; its allowed experts, by value). ``where``
    names the case in the failure message."""
    same = (ids == ref_ids).all(dim=1)
    if exact:
        assert torch.equal(ids, ref_ids), f"rows {(~same).nonzero().flatten().tolist()} differ; {where}"
        return same
    values = selection_of(logits, allowed, kwargs)

    def close(a: torch.Tensor, b: torch.Tensor) -> bool:
        return a.shape == b.shape and bool(torch.isclose(a, b, atol=1e-5, rtol=0, equal_nan=True).all())

    for t in (~same).nonzero().flatten().tolist():
        mine = values[t, ids[t]].sort().values
        theirs = values[t, ref_ids[t]].sort().values
        if close(mine, theirs):
            continue
        picked_allowed = ids[t][allowed[t, ids[t]]]
        if any(
            close(alt[picked_allowed].sort().values,
                  alt[allowed[t]].topk(picked_allowed.numel()).values.sort().values)
            for alt in near_tie_group_choices(logits[t], allowed[t], kwargs)
        ):
            continue
        raise AssertionError(f"{where}: row {t} chose {ids[t].tolist()} (selection values {mine.tolist()}), the "
                             f"reference {ref_ids[t].tolist()} ({theirs.tolist()})")
    return same
