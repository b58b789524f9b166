"""Benchmark of the fused router op on a CUDA device against the eager and compiled PyTorch chains.

For each T (E=64, top_k=8, bf16 logits), with and without an expert mask, with counts, uniform and skewed loads:

* ``eager``: the chain as Hugging Face OLMoE runs it (softmax in float32, ``torch.topk``, cast back) plus
  ``masked_fill`` for the mask and ``index_add_`` for the counts;
* ``compile``: ``torch.compile`` of that chain;
* ``fastmask``: ``route(..., backend="triton")``; ``kernel`` is the Triton launcher alone (no op dispatch);
* ``cuda``: ``route(..., backend="cuda")`` (the CUDA kernels of ``csrc/route_cuda.cu`` and
  ``csrc/route_cuda_backward.cu``),
  when it builds here.

Modes ``forward`` and ``full`` (forward + backward). Two times per row:

* ``median_us``: median of ``triton.testing.do_bench`` (L2 flushed before each call). It includes host time
  whenever the host launches slower than the device runs, as in eager code;
* ``graph_us``: per-call device time inside a CUDA graph of many calls that rotate over enough input sets to
  exceed the L2 cache; no host time. Achieved GB/s come from it: logits read once plus weights and ids written
  once (``full`` adds the backward's reads of logits, grad and ids and its write of grad_logits), against the
  device-to-device copy bandwidth measured in the same run (bytes read + written).

Section ``cuda`` (``--only-cuda`` runs it alone, after the copy bandwidth): the CUDA kernel against the dispatched
Triton kernel at the issue's setting (E=64, top-8, bf16, a 4-group keep mask, group ids in runs with -1 runs, counts)
for T = 4,096, 65,536 and 262,144, forward and forward + backward, plus wider routers (E up to 512, top-k up to 16;
shapes the CUDA kernel does not take run on Triton under ``backend="cuda"``, and say so). Providers: ``cuda`` and
``triton`` through ``route`` (``validate=False``), ``cuda_plain`` the same op with its kernels launched plainly
rather than as programmatic dependent launches (``cuda_route.dependent_launches(False)``), ``cuda_kernel`` the CUDA
launcher alone
(``cuda_kernel_noprefetch``: its instance without the software prefetch of a warp's next rows), ``cuda_lane`` the
row-per-lane kernel variant (16-bit logits, E in 32 / 64 / 128 or a multiple of 4 below, top-k <= 8), and at E=64
top-8 its benchmark
instances with parts of the work removed (``lane_load_store``: the tiles copied, the first k experts stored;
``lane_topk``: + keys and top-k; ``lane_mask_topk``: + the mask; ``lane_mask_topk_softmax``: + the softmax; the full
kernel adds the counts; these take the top-k by the sorting network, and the ``lane_*_tournament`` rows repeat the
steps with the tournament top-k that the op runs at large T). ``cuda`` runs the op's default variant
(``MOE_FASTMASK_CUDA_VARIANT``). Each provider's ids and counts (not the ablations') are checked against the
reference once before timing. Where the lane kernels apply
with top-8, mode ``backward`` times the CUDA backward alone per variant (``cuda_bwd_lane``, the op's default there;
``cuda_bwd_split``, the row-over-lanes kernel; ``cuda_bwd_lane_ids8``, the lane kernel reading the one-byte ids that
the forward writes for it under autograd; at E=64 with a mask, ``cuda_bwd_lane_ids8_load_store``, that instance's
copies and stores alone, its memory floor).

Section ``families``: ``route`` at each model family's router (E, top-k, scoring, bias, group limit) at
``--family-sizes`` tokens (default 4,096 and 262,144), forward and forward + backward, against that family's own
eager router chain (Hugging Face's code after the gate projection, plus counting), with the same GB/s and % of copy
columns; ``route`` on its Triton kernels too, and where the chunk kernel is the default and the CUDA split kernel
takes the call too (the sigmoid routers of at most 256 experts, the softmax routers of 16-bit logits from 160 experts
on, from 8,192 rows on) the split kernel's forward (``cuda_split``), which the chunk kernel replaced there. ``--smoke``
runs every family's chain and ``route`` once on small CPU inputs and checks they agree (no GPU needed).

The skewed load draws logits whose top-k frequencies follow one layer's ``a1_n`` column of the OLMoE activation
frequencies table (falling back to a Zipf-like profile when the file is missing).

Usage: ``python benchmarks/bench_route.py [--out benchmarks/out/route.csv] [--freqs PATH] [--sweep] [--no-families]
[--no-cuda] [--only-cuda] [--smoke]``
"""

from __future__ import annotations

import argparse
import csv
import datetime
import functools
import math
import statistics
import sys
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_FREQS = REPO_ROOT / "tests" / "data" / "olmoe_expert_activation_frequencies.csv"  # tests/data/README.md
SIZES = [16, 256, 4096, 65536, 262144]
QUANTILES = [0.5, 0.2, 0.8]
NUM_EXPERTS = 64
TOP_K = 8
FAMILY_SIZES = [4096, 262144]
ROTATE_BYTES = 160 << 20  # input sets rotated inside a graph: about three times the H100's 50 MB L2
CUDA_SIZES = [4096, 65536, 262144]
# (E, top_k, T) of the cuda section's wider routers
CUDA_WIDE = [(8, 2, 262144), (60, 4, 262144), (128, 8, 65536), (128, 16, 65536), (256, 8, 65536), (256, 16, 65536),
             (512, 10, 65536), (512, 16, 65536)]
CUDA_GROUPS = 4


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(REPO_ROOT / "benchmarks" / "out" / "route.csv"), help="CSV path")
    parser.add_argument("--freqs", default=str(DEFAULT_FREQS), help="OLMoE expert activation frequencies CSV")
    parser.add_argument("--layer", type=int, default=None, help="layer of the table (default: the most skewed)")
    parser.add_argument("--sizes", type=int, nargs="+", default=SIZES)
    parser.add_argument("--renormalize", action="store_true", help="renormalise the top-k weights")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile provider")
    parser.add_argument("--sweep", action="store_true", help="also time tile/warp settings of the launchers")
    parser.add_argument("--warmup", type=int, default=10, help="do_bench warm-up (ms)")
    parser.add_argument("--rep", type=int, default=50, help="do_bench repetition time (ms)")
    parser.add_argument("--family-sizes", type=int, nargs="+", default=FAMILY_SIZES, help="T of the families section")
    parser.add_argument("--no-families", action="store_true", help="skip the families section")
    parser.add_argument("--only-families", action="store_true", help="copy bandwidth and the families section only")
    parser.add_argument("--families", nargs="+", default=list(FAMILIES), choices=list(FAMILIES),
                        help="families of the families section (default: all)")
    parser.add_argument("--smoke", action="store_true", help="check each family's chain against route on CPU, then exit")
    parser.add_argument("--no-cuda", action="store_true", help="skip the CUDA kernel (section and provider)")
    parser.add_argument("--only-cuda", action="store_true", help="copy bandwidth and the cuda section only")
    parser.add_argument("--cuda-sizes", type=int, nargs="+", default=CUDA_SIZES, help="T of the cuda section")
    parser.add_argument("--cuda-wide", nargs="*", default=[f"{e},{k},{t}" for e, k, t in CUDA_WIDE],
                        help="E,top_k,T of the cuda section's wider routers (default: "
                             + " ".join(f"{e},{k},{t}" for e, k, t in CUDA_WIDE)
                             + "; the flag with no value: none, the E=64 top-8 rows only)")
    parser.add_argument("--cuda-dtype", default="bfloat16", choices=["bfloat16", "float16"],
                        help="logits dtype of the cuda section (default bfloat16: OLMoE's router)")
    parser.add_argument("--cuda-modes", nargs="+", default=["forward", "full"], choices=["forward", "full"],
                        help="modes of the cuda section's op providers")
    return parser.parse_args(argv)


# --------------------------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------------------------


def load_profile(path: str, layer: int | None, num_experts: int, top_k: int) -> tuple[torch.Tensor, str]:
    """Inclusion probabilities [E] summing to top_k, each <= 1, and where they came from."""
    file = Path(path)
    if file.is_file():
        rows = list(csv.DictReader(file.open()))
        layers = sorted({int(r["layer"]) for r in rows})
        if layer is None:  # the layer whose hottest expert takes the largest share
            layer = max(layers, key=lambda l: max(float(r["a1_n"]) for r in rows if int(r["layer"]) == l))
        freq = torch.zeros(num_experts, dtype=torch.float64)
        for r in rows:
            if int(r["layer"]) == layer:
                freq[int(r["expert"])] = float(r["a1_n"])
        source = f"{file.name} layer {layer} a1_n"
        cap = 1.0
    else:
        freq = 1.0 / torch.arange(1, num_experts + 1, dtype=torch.float64) ** 1.1
        source = "synthetic Zipf (frequencies file missing)"
        cap = 0.9
    for _ in range(50):  # scale to sum top_k with every probability <= cap
        freq = (freq * top_k / freq.sum()).clamp(max=cap)
    return freq, source


def skewed_logits(num_tokens: int, profile: torch.Tensor, dtype, device, gen) -> torch.Tensor:
    """Logits whose top-k sets include expert e with probability profile[e] (systematic sampling per token)."""
    num_experts = profile.numel()
    prob = profile.to(device=device, dtype=torch.float64)
    perm = torch.argsort(torch.rand(num_tokens, num_experts, device=device, generator=gen), dim=1)
    p = prob[perm]
    upper = torch.cumsum(p, dim=1)
    u = torch.rand(num_tokens, 1, device=device, generator=gen, dtype=torch.float64)
    chosen_sorted = torch.floor(upper - u) > torch.floor(upper - p - u)
    chosen = torch.zeros_like(chosen_sorted).scatter_(1, perm, chosen_sorted)
    noise = torch.rand(num_tokens, num_experts, device=device, generator=gen)
    return (chosen.float() * 4.0 + noise).to(dtype)


def make_logits(num_tokens, load, profile, device, seed):
    gen = torch.Generator(device=device).manual_seed(seed)
    if load == "skewed":
        return skewed_logits(num_tokens, profile, torch.bfloat16, device, gen)
    return torch.randn(num_tokens, NUM_EXPERTS, device=device, generator=gen).to(torch.bfloat16)


def make_keep(masked, device, seed):
    if not masked:
        return None
    gen = torch.Generator(device=device).manual_seed(seed)
    keep = torch.ones(1, NUM_EXPERTS, dtype=torch.bool, device=device)
    keep[0, torch.randperm(NUM_EXPERTS, device=device, generator=gen)[: NUM_EXPERTS // 4]] = False
    return keep


def rotation(num_tokens: int) -> int:
    """Input sets to rotate over so that one pass over them exceeds the L2 cache."""
    return max(1, min(16, math.ceil(ROTATE_BYTES / max(1, full_bytes(num_tokens)))))


def forward_bytes(num_tokens: int) -> int:
    return num_tokens * (NUM_EXPERTS * 2 + TOP_K * 2 + TOP_K * 8)


def full_bytes(num_tokens: int) -> int:
    # forward + backward: logits, grad_weights and ids read, grad_logits written
    return forward_bytes(num_tokens) + num_tokens * (NUM_EXPERTS * 2 + TOP_K * 2 + TOP_K * 8 + NUM_EXPERTS * 2)


# --------------------------------------------------------------------------------------------------------------
# Providers
# --------------------------------------------------------------------------------------------------------------


def eager_chain(logits, drop, counts, top_k: int, renormalize: bool):
    """Hugging Face OLMoE's router after the gate projection, plus masking and counting."""
    if drop is not None:
        logits = logits.masked_fill(drop, float("-inf"))
    probs = torch.nn.functional.softmax(logits, dtype=torch.float, dim=-1)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    weights = weights.to(logits.dtype)
    flat = ids.reshape(-1)
    counts.view(-1).index_add_(0, flat, torch.ones_like(flat))
    return weights, ids


def make_call(name, mode, logits, grad, keep, counts, renormalize, compiled_chain):
    """A no-argument callable running provider ``name`` once in ``mode`` on one input set."""
    from moe_fastmask import route
    from moe_fastmask.ops import triton_route

    drop = None if keep is None else ~keep
    if name == "eager":
        fwd = lambda x: eager_chain(x, drop, counts, TOP_K, renormalize)  # noqa: E731
    elif name == "compile":
        fwd = lambda x: compiled_chain(x, drop, counts, TOP_K, renormalize)  # noqa: E731
    elif name == "fastmask":
        fwd = lambda x: route(x, TOP_K, keep, None, counts, renormalize, backend="triton", validate=False)  # noqa: E731
    elif name == "kernel":
        fwd = lambda x: triton_route.route_forward(x, TOP_K, keep, None, counts, renormalize)  # noqa: E731
    elif name == "cuda":
        fwd = lambda x: route(x, TOP_K, keep, None, counts, renormalize, backend="cuda", validate=False)  # noqa: E731
    else:
        raise ValueError(name)
    if mode == "forward":
        return lambda: fwd(logits)
    # forward + backward to the logits, without the extra kernel that accumulating into x.grad would add
    x = logits.detach().clone().requires_grad_()
    return lambda: torch.autograd.grad(fwd(x)[0], x, grad)


# --------------------------------------------------------------------------------------------------------------
# Model families: each router's shape and route arguments, and its own eager chain
# --------------------------------------------------------------------------------------------------------------

# dtype: the router logits' dtype in the family's modeling code (DeepSeek-style routers project in float32)
FAMILIES = {
    "olmoe": dict(E=64, top_k=8, dtype=torch.bfloat16, route=dict(scoring="softmax")),
    "qwen2_moe": dict(E=60, top_k=4, dtype=torch.bfloat16, route=dict(scoring="softmax")),
    "qwen3_moe": dict(E=128, top_k=8, dtype=torch.bfloat16, route=dict(scoring="softmax", renormalize=True)),
    "qwen3_next": dict(E=512, top_k=10, dtype=torch.bfloat16, route=dict(scoring="softmax", renormalize=True)),
    "mixtral": dict(E=8, top_k=2, dtype=torch.float32, route=dict(scoring="softmax", renormalize=True)),
    "gpt_oss": dict(E=128, top_k=4, dtype=torch.bfloat16, route=dict(scoring="softmax_chosen")),
    "deepseek_v3": dict(E=256, top_k=8, dtype=torch.float32, route=dict(
        scoring="sigmoid", bias=True, n_group=8, topk_group=4, renormalize=True, scale=2.5)),
    "kimi_k2": dict(E=384, top_k=8, dtype=torch.float32, route=dict(
        scoring="sigmoid", bias=True, renormalize=True, scale=2.827)),
    "glm4_moe": dict(E=160, top_k=8, dtype=torch.float32, route=dict(
        scoring="sigmoid", bias=True, renormalize=True, scale=2.5)),
}


def family_inputs(name: str, num_tokens: int, device, seed: int, dtype=None) -> tuple[torch.Tensor, dict]:
    """Random router logits of family ``name`` (in its dtype unless ``dtype`` is given) and its route keyword
    arguments (a random selection bias where the family has one)."""
    spec = FAMILIES[name]
    gen = torch.Generator(device=device).manual_seed(seed)
    logits = torch.randn(num_tokens, spec["E"], device=device, generator=gen).to(dtype or spec["dtype"])
    kwargs = dict(spec["route"])
    if kwargs.pop("bias", False):
        kwargs["bias"] = torch.randn(spec["E"], device=device, generator=gen) * 0.1
    return logits, kwargs


def family_eager(logits, top_k: int, counts, scoring="softmax", bias=None, n_group=1, topk_group=1,
                 renormalize=False, scale=1.0):
    """The family's router after the gate projection, as its Hugging Face modeling code writes it, plus counting."""
    if scoring == "softmax_chosen":  # GPT-OSS
        values, ids = torch.topk(logits, top_k, dim=-1)
        weights = torch.nn.functional.softmax(values, dim=1, dtype=values.dtype)
    elif scoring == "sigmoid":  # DeepSeek-V3 / GLM-4.5 / Kimi-K2
        scores = logits.sigmoid()
        choice = scores + bias if bias is not None else scores
        if n_group > 1:
            num_tokens, num_experts = logits.shape
            group_scores = choice.view(num_tokens, n_group, -1).topk(2, dim=-1)[0].sum(dim=-1)
            group_idx = torch.topk(group_scores, k=topk_group, dim=-1, sorted=False)[1]
            group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1)
            score_mask = group_mask.unsqueeze(-1).expand(-1, n_group, num_experts // n_group).reshape(num_tokens, -1)
            choice = choice.masked_fill(~score_mask.bool(), float("-inf"))
        ids = torch.topk(choice, k=top_k, dim=-1, sorted=False)[1]
        weights = scores.gather(1, ids)
        if renormalize:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        weights = weights * scale
    else:  # OLMoE, Qwen2/3-MoE, Mixtral
        probs = torch.nn.functional.softmax(logits, dtype=torch.float, dim=-1)
        weights, ids = torch.topk(probs, top_k, dim=-1)
        if renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        weights = weights.to(logits.dtype)
    flat = ids.reshape(-1)
    counts.view(-1).index_add_(0, flat, torch.ones_like(flat))
    return weights, ids


def family_call(provider: str, mode: str, name: str, logits, grad, counts):
    """A no-argument callable running ``provider`` of family ``name`` once: ``eager`` (the family's own chain),
    ``fastmask`` (``route``, its default backend: the CUDA kernels where they take the call), ``triton`` (``route``
    on its Triton kernels), ``cuda_split`` (forward only: the CUDA split kernel, for the routers whose default is
    the chunk kernel: chunk_by_default) or ``cuda_gathered`` (forward + backward only: the CUDA kernels without the
    forward's saved logits, the backward gathering them, for the calls whose forward saves them:
    saves_chosen_logits)."""
    from moe_fastmask import route
    from moe_fastmask.ops import cuda_route

    top_k = FAMILIES[name]["top_k"]
    _, kwargs = family_inputs(name, 1, logits.device, 0)
    if provider == "eager":
        fwd = lambda x: family_eager(x, top_k, counts, **kwargs)  # noqa: E731
    elif provider == "cuda_split":
        if mode != "forward":
            raise ValueError("cuda_split times the forward only")
        renormalize = kwargs.pop("renormalize", False)
        fwd = lambda x: cuda_route.route_forward(  # noqa: E731
            x, top_k, None, None, counts, renormalize, variant="split", **kwargs)
    elif provider == "cuda_gathered":
        if mode != "full":
            raise ValueError("cuda_gathered times forward + backward only")
        renormalize = kwargs.pop("renormalize", False)

        def full():
            ids = cuda_route.route_forward(logits, top_k, None, None, counts, renormalize, **kwargs)[1]
            return cuda_route.route_backward(grad, logits, None, None, ids, renormalize, scoring=kwargs["scoring"],
                                             scale=kwargs.get("scale", 1.0))

        return full
    else:
        renormalize = kwargs.pop("renormalize", False)
        backend = "triton" if provider == "triton" else "auto"
        fwd = lambda x: route(  # noqa: E731
            x, top_k, None, None, counts, renormalize, backend, validate=False, **kwargs)
    if mode == "forward":
        return lambda: fwd(logits)
    x = logits.detach().clone().requires_grad_()
    return lambda: torch.autograd.grad(fwd(x)[0], x, grad)


def family_bytes(name: str, num_tokens: int, mode: str) -> int:
    """Bytes the fused op must move: logits read, weights and ids written (full: the backward's traffic too)."""
    spec = FAMILIES[name]
    elt = torch.finfo(spec["dtype"]).bits // 8
    forward = num_tokens * (spec["E"] * elt + spec["top_k"] * (elt + 8))
    if mode == "forward":
        return forward
    return forward + num_tokens * (2 * spec["E"] * elt + spec["top_k"] * (elt + 8))


def smoke() -> int:
    """Every family's eager chain against route on small float32 CPU inputs: same experts and counts, close
    weights."""
    from moe_fastmask import route

    for name, spec in FAMILIES.items():
        # float32: bf16 logits tie often, and torch.topk breaks ties in no stated order
        logits, kwargs = family_inputs(name, 33, "cpu", 0, dtype=torch.float32)
        counts_eager = torch.zeros(1, spec["E"], dtype=torch.int64)
        counts_route = torch.zeros(1, spec["E"], dtype=torch.int64)
        weights_eager, ids_eager = family_eager(logits, spec["top_k"], counts_eager, **kwargs)
        renormalize = kwargs.pop("renormalize", False)
        weights, ids = route(logits, spec["top_k"], None, None, counts_route, renormalize, **kwargs)
        order, order_eager = ids.argsort(dim=1), ids_eager.argsort(dim=1)
        same = torch.equal(ids.gather(1, order), ids_eager.gather(1, order_eager))
        diff = (weights.gather(1, order).float() - weights_eager.gather(1, order_eager).float()).abs().max().item()
        ok = same and torch.equal(counts_route, counts_eager) and diff <= 1e-2
        print(f"{name:<12} E={spec['E']:>3} k={spec['top_k']:>2} {spec['route']['scoring']:<15} same experts={same} "
              f"max |dw|={diff:.2e} {'ok' if ok else 'MISMATCH'}")
        if not ok:
            return 1
    return 0


def chunk_by_default(name: str, num_tokens: int) -> bool:
    """Whether ``route``'s CUDA default for family ``name`` at ``num_tokens`` rows is the chunk kernel where the split
    kernel takes the call too (the sigmoid routers of at most 256 experts, the wide softmax routers of 16-bit
    logits): then ``cuda_split`` times the kernel it replaced."""
    from moe_fastmask.ops import cuda_route

    spec = FAMILIES[name]
    scoring = spec["route"]["scoring"]
    logits = torch.empty(1, spec["E"], dtype=spec["dtype"]).expand(num_tokens, spec["E"])
    chosen = cuda_route.forward_variant(logits, spec["top_k"], scoring=scoring,
                                        n_group=spec["route"].get("n_group", 1))
    return chosen == "chunk" and (scoring != "sigmoid" or spec["E"] <= cuda_route.MAX_SIGMOID_EXPERTS)


def saves_chosen_by_default(name: str, num_tokens: int) -> bool:
    """Whether ``route``'s CUDA forward for family ``name`` at ``num_tokens`` rows saves the chosen experts' logits
    for its backward (then ``cuda_gathered`` times forward + backward without them)."""
    from moe_fastmask.ops import cuda_route

    spec = FAMILIES[name]
    logits = torch.empty(1, spec["E"], dtype=spec["dtype"]).expand(num_tokens, spec["E"])
    return cuda_route.saves_chosen_logits(logits, spec["top_k"], scoring=spec["route"]["scoring"],
                                          n_group=spec["route"].get("n_group", 1))


def run_families(device, args, rows, copy_gbs):
    """The families section: route against each family's eager chain, forward and full, at args.family_sizes."""
    print("\n# families: route at each family's router against its own eager chain (graph us, GB/s, % of copy)")
    for num_tokens in args.family_sizes:
        for name, spec in FAMILIES.items():
            if name not in args.families:
                continue
            sets = max(1, min(16, math.ceil(ROTATE_BYTES / max(1, family_bytes(name, num_tokens, "full")))))
            calls = graph_calls(num_tokens, sets)
            inputs = [family_inputs(name, num_tokens, device, 1000 * s + num_tokens)[0] for s in range(sets)]
            grads = [torch.randn(num_tokens, spec["top_k"], device=device).to(spec["dtype"]) for _ in range(sets)]
            counts = torch.zeros(1, spec["E"], dtype=torch.int64, device=device)
            split = torch.cuda.is_available() and chunk_by_default(name, num_tokens)
            gathered = torch.cuda.is_available() and saves_chosen_by_default(name, num_tokens)
            only = {"cuda_split": ("forward",), "cuda_gathered": ("full",)}
            for provider in ("eager", "fastmask", "triton") + (("cuda_split",) if split else ()) + (
                    ("cuda_gathered",) if gathered else ()):
                for mode in only.get(provider, ("forward", "full")):
                    fns = [family_call(provider, mode, name, x, g, counts) for x, g in zip(inputs, grads)]
                    try:
                        med, lo, hi = bench(fns[0], args)
                        per_call = graph_us(fns, calls)
                    except Exception as exc:
                        print(f"{name} T={num_tokens} {provider} {mode}: failed: {type(exc).__name__}: {str(exc)[:200]}")
                        continue
                    gbs = family_bytes(name, num_tokens, mode) / (per_call * 1e-6) / 1e9
                    rows.append(dict(section="families", family=name, T=num_tokens, provider=provider, mode=mode,
                                     median_us=med * 1e3, p20_us=lo * 1e3, p80_us=hi * 1e3, graph_us=per_call,
                                     gbs=gbs, pct_copy=100 * gbs / copy_gbs))
                    print(f"{name:<12} T={num_tokens:>6} {provider:<8} {mode:<7} median {med * 1e3:9.2f} us  "
                          f"graph {per_call:9.2f} us  {gbs:6.0f} GB/s ({100 * gbs / copy_gbs:5.1f}%)", flush=True)
            del inputs, grads, counts
            torch.cuda.empty_cache()


# --------------------------------------------------------------------------------------------------------------
# The CUDA kernel against the dispatched Triton kernel
# --------------------------------------------------------------------------------------------------------------


def cuda_case(num_tokens: int, num_experts: int, top_k: int, device, seed: int, dtype=torch.bfloat16):
    """Logits [T, E] of ``dtype`` (bf16 by default), a [4, E] keep mask (each group keeps 3/4 of the experts, at
    least top_k), group ids in runs of 256 tokens over [-1, 4) and a grad [T, top_k] of ``dtype``."""
    gen = torch.Generator(device=device).manual_seed(seed)
    logits = torch.randn(num_tokens, num_experts, device=device, generator=gen).to(dtype)
    keep = torch.rand(CUDA_GROUPS, num_experts, device=device, generator=gen) < 0.75
    keep[:, :top_k] = True
    runs = torch.randint(-1, CUDA_GROUPS, (-(-num_tokens // 256),), device=device, generator=gen)
    group = runs.repeat_interleave(256)[:num_tokens].contiguous()
    grad = torch.randn(num_tokens, top_k, device=device, generator=gen).to(dtype)
    return logits, keep, group, grad


def cuda_bytes(num_tokens: int, num_experts: int, top_k: int, mode: str) -> int:
    """Logits read, weights (bf16) and ids written; full adds the backward's logits, grad and ids reads and its
    grad_logits write."""
    forward = num_tokens * (num_experts * 2 + top_k * (2 + 8))
    return forward if mode == "forward" else forward + num_tokens * (2 * num_experts * 2 + top_k * (2 + 8))


def cuda_call(provider: str, mode: str, logits, keep, group, grad, counts, top_k: int):
    from moe_fastmask import route
    from moe_fastmask.ops import cuda_route

    if provider.startswith("cuda_kernel"):
        prefetch = provider != "cuda_kernel_noprefetch"
        fwd = lambda x: cuda_route.route_forward(x, top_k, keep, group, counts, False, prefetch=prefetch,  # noqa: E731
                                                 variant="split")
    elif provider == "cuda_lane":
        fwd = lambda x: cuda_route.route_forward(x, top_k, keep, group, counts, False, variant="lane")  # noqa: E731
    elif provider.startswith("lane_"):
        ablation = provider[len("lane_"):]
        fwd = lambda x: cuda_route.route_forward(x, top_k, keep, group, counts, False,  # noqa: E731
                                                 _ablation=ablation)
    else:  # (cuda_plain: the op, its kernels launched plainly, below)
        backend = "cuda" if provider == "cuda_plain" else provider
        fwd = lambda x: route(x, top_k, keep, group, counts, False, backend, validate=False)  # noqa: E731
    if mode == "forward":
        call = lambda: fwd(logits)  # noqa: E731
    else:
        x = logits.detach().clone().requires_grad_()
        call = lambda: torch.autograd.grad(fwd(x)[0], x, grad)  # noqa: E731
    if provider != "cuda_plain":
        return call

    def plain():  # (no programmatic dependent launch)
        with cuda_route.dependent_launches(False):
            return call()

    return plain


def check_cuda_provider(provider, logits, keep, group, top_k) -> str:
    """'' when the provider's ids and counts equal the reference's on this input, else what differs."""
    from moe_fastmask import route
    from moe_fastmask.ops import cuda_route, reference

    counts = torch.zeros(CUDA_GROUPS, logits.shape[1], dtype=torch.int64, device=logits.device)
    ref_counts = torch.zeros_like(counts)
    if provider.startswith("lane_"):
        return ""  # the ablations' results are not the op's
    if provider.startswith("cuda_kernel"):
        prefetch = provider != "cuda_kernel_noprefetch"
        _, ids = cuda_route.route_forward(logits, top_k, keep, group, counts, False, prefetch=prefetch,
                                          variant="split")
    elif provider == "cuda_lane":
        _, ids = cuda_route.route_forward(logits, top_k, keep, group, counts, False, variant="lane")
    elif provider == "cuda_plain":
        with cuda_route.dependent_launches(False):
            _, ids = route(logits, top_k, keep, group, counts, False, "cuda", validate=False)
    else:
        _, ids = route(logits, top_k, keep, group, counts, False, provider, validate=False)
    _, ref_ids = reference.route_reference(logits, top_k, keep, group, ref_counts, False)
    if not torch.equal(ids, ref_ids):
        return f"ids differ from the reference in {int((ids != ref_ids).any(1).sum())} rows"
    if not torch.equal(counts, ref_counts):
        return "counts differ from the reference"
    return ""


def run_backward_variants(data, num_experts: int, top_k: int, num_tokens: int, calls: int, rows, copy_gbs) -> None:
    """The CUDA backward alone, per kernel variant (``cuda_route.BACKWARD_VARIANTS``: ``lane``, the op's default
    where it applies, and ``split``; ``lane_ids8``, the lane kernel reading the ids a byte each, as ``route``'s
    autograd has it do; ``lane_ids8_load_store``, that instance's copies and stores alone, its memory floor, where it
    applies: bf16, E=64, a mask), on the forward's ids, without renormalisation: mode ``backward``, bytes = logits and
    grad read, ids read, grad_logits written. Each variant's largest error against the float64 reference is printed
    before it is timed (the loads-and-stores-only one: against the logits it copies)."""
    from moe_fastmask.ops import cuda_route, reference

    inputs = []
    for x, keep, group, grad in data:
        _, ids = cuda_route.route_forward(x, top_k, keep, group, None, False)
        inputs.append((x, keep, group, grad, ids, ids.to(torch.uint8), torch.empty_like(x)))
    cases = [(variant, False, None) for variant in cuda_route.BACKWARD_VARIANTS]
    if cuda_route.compact_ids_apply(data[0][0], top_k, data[0][1]):
        cases.append(("lane", True, None))  # the ids a byte each, as route's autograd passes them
        if data[0][0].dtype == torch.bfloat16 and num_experts == 64 and data[0][1] is not None:
            cases.append(("lane", True, "load_store"))
    for variant, byte_ids, ablation in cases:
        nbytes = num_tokens * (2 * num_experts * 2 + top_k * (2 + (1 if byte_ids else 8)))
        x, keep, group, grad, ids, ids8, _ = inputs[0]
        got = cuda_route.route_backward(grad, x, keep, group, ids, False, variant=variant,
                                        ids8=ids8 if byte_ids else None, _ablation=ablation)
        if ablation is None:
            exact = reference.route_backward_reference(grad.double(), x.double(), keep, group, ids, False)
        else:
            exact = x.double()  # (the loads-and-stores-only instance copies the logits)
        error = float((got.double() - exact).abs().max())
        fns = [functools.partial(cuda_route.route_backward, g, x, k, gr, i, False, out=o, variant=variant,
                                 ids8=i8 if byte_ids else None, _ablation=ablation)
               for x, k, gr, g, i, i8, o in inputs]
        per_call = graph_us(fns, calls)
        gbs = nbytes / (per_call * 1e-6) / 1e9
        provider = f"cuda_bwd_{variant}" + ("_ids8" if byte_ids else "") + (f"_{ablation}" if ablation else "")
        note = f"max abs error {error:.2e}"
        rows.append(dict(section="cuda", E=num_experts, top_k=top_k, T=num_tokens, provider=provider,
                         mode="backward", graph_us=per_call, gbs=gbs, pct_copy=100 * gbs / copy_gbs, note=note))
        print(f"E={num_experts:>3} k={top_k:>2} T={num_tokens:>6} {provider:<24} {'backward':<8} graph "
              f"{per_call:9.2f} us {gbs:6.0f} GB/s ({100 * gbs / copy_gbs:5.1f}% of copy) {note}", flush=True)


def run_cuda_section(device, args, rows, copy_gbs) -> None:
    """The cuda section (see the module docstring)."""
    from moe_fastmask.ops import cuda_route

    if not cuda_route.is_available():
        print(f"\n# cuda section skipped: {cuda_route.load_error()[:500]}")
        return
    print(f"\n# cuda: CUDA kernel vs dispatched Triton ({args.cuda_dtype}, {CUDA_GROUPS}-group keep mask, group ids "
          f"with -1 runs, counts); per call in a CUDA graph over rotating inputs; op default variant "
          f"{cuda_route._variant_default()!r}")
    wide = [tuple(int(v) for v in case.split(",")) for case in args.cuda_wide]
    cases = [(NUM_EXPERTS, TOP_K, t) for t in args.cuda_sizes] + wide
    dtype = getattr(torch, args.cuda_dtype)
    for num_experts, top_k, num_tokens in cases:
        sets = max(1, min(16, math.ceil(ROTATE_BYTES / max(1, cuda_bytes(num_tokens, num_experts, top_k, "full")))))
        calls = graph_calls(num_tokens, sets)
        data = [cuda_case(num_tokens, num_experts, top_k, device, 7000 * s + num_tokens + num_experts, dtype)
                for s in range(sets)]
        counts = torch.zeros(CUDA_GROUPS, num_experts, dtype=torch.int64, device=device)
        covered = cuda_route.supports(data[0][0], top_k, data[0][1])
        providers = ["cuda", "cuda_plain", "triton"] + (["cuda_kernel", "cuda_kernel_noprefetch"] if covered else [])
        if cuda_route.lane_takes(data[0][0], top_k, data[0][1]):
            providers.append("cuda_lane")
            if num_experts == 64 and top_k == 8 and dtype == torch.bfloat16:  # (the ablations: bf16 instances)
                providers += [f"lane_{name}" for name in cuda_route.LANE_ABLATIONS]
        for provider in providers:
            try:
                problem = check_cuda_provider(provider, *data[0][:3], top_k)
            except Exception as exc:  # noqa: BLE001 - reported, and the provider is not timed
                problem = f"failed: {type(exc).__name__}: {str(exc)[:200]}"
            if problem:
                print(f"E={num_experts} k={top_k} T={num_tokens} {provider}: WRONG RESULT: {problem}")
                rows.append(dict(section="cuda", E=num_experts, top_k=top_k, T=num_tokens, provider=provider,
                                 mode="check", note=problem))
                if problem.startswith("failed") or provider in ("cuda", "cuda_plain", "triton"):
                    continue  # (a wrong kernel variant is still timed, its rows marked)
            op = provider in ("cuda", "cuda_plain", "triton")
            for mode in [m for m in args.cuda_modes if op or m == "forward"]:
                fns = [cuda_call(provider, mode, x, keep, group, grad, counts, top_k) for x, keep, group, grad in data]
                try:
                    per_call = graph_us(fns, calls)
                except Exception as exc:
                    print(f"E={num_experts} k={top_k} T={num_tokens} {provider} {mode}: failed: "
                          f"{type(exc).__name__}: {str(exc)[:200]}")
                    continue
                gbs = cuda_bytes(num_tokens, num_experts, top_k, mode) / (per_call * 1e-6) / 1e9
                note = "" if covered or provider == "triton" else "runs on Triton (shape not covered)"
                note = "ablation: not the op's results" if provider.startswith("lane_") else note
                note = f"WRONG RESULT: {problem}" if problem else note
                rows.append(dict(section="cuda", E=num_experts, top_k=top_k, T=num_tokens, provider=provider,
                                 mode=mode, graph_us=per_call, gbs=gbs, pct_copy=100 * gbs / copy_gbs, note=note))
                print(f"E={num_experts:>3} k={top_k:>2} T={num_tokens:>6} {provider:<24} {mode:<7} graph "
                      f"{per_call:9.2f} us {gbs:6.0f} GB/s ({100 * gbs / copy_gbs:5.1f}% of copy) {note}", flush=True)
        if cuda_route.lane_takes(data[0][0], top_k, data[0][1]) and top_k == 8:
            run_backward_variants(data, num_experts, top_k, num_tokens, calls, rows, copy_gbs)
        del data, counts
        torch.cuda.empty_cache()

    print(f"\n# cuda summary ({args.cuda_dtype}, copy {copy_gbs:.0f} GB/s): us per call, % of copy")
    print(f"{'E':>4} {'k':>3} {'T':>7} {'mode':<7} {'cuda':>9} {'%copy':>6} {'triton':>9} {'%copy':>6} {'x triton':>8}"
          f" {'kernel':>9} {'no prefetch':>11} {'lane':>9} {'%copy':>6} {'plain':>9} {'%copy':>6}")
    for num_experts, top_k, num_tokens in cases:
        for mode in ("forward", "full"):
            sel = {r["provider"]: r for r in rows if r.get("section") == "cuda" and r["E"] == num_experts
                   and r["top_k"] == top_k and r["T"] == num_tokens and r["mode"] == mode}
            if not sel:
                continue
            c, t, k = sel.get("cuda", {}), sel.get("triton", {}), sel.get("cuda_kernel", {})
            n = sel.get("cuda_kernel_noprefetch", {})
            lane, plain = sel.get("cuda_lane", {}), sel.get("cuda_plain", {})
            speedup = t.get("graph_us", math.nan) / c.get("graph_us", math.nan)
            print(f"{num_experts:>4} {top_k:>3} {num_tokens:>7} {mode:<7} {c.get('graph_us', math.nan):9.2f} "
                  f"{c.get('pct_copy', math.nan):6.1f} {t.get('graph_us', math.nan):9.2f} "
                  f"{t.get('pct_copy', math.nan):6.1f} {speedup:8.2f} {k.get('graph_us', math.nan):9.2f} "
                  f"{n.get('graph_us', math.nan):11.2f} {lane.get('graph_us', math.nan):9.2f} "
                  f"{lane.get('pct_copy', math.nan):6.1f} {plain.get('graph_us', math.nan):9.2f} "
                  f"{plain.get('pct_copy', math.nan):6.1f} {c.get('note', '')}")
    ablations = [r for r in rows if r.get("section") == "cuda" and str(r.get("provider", "")).startswith("lane_")
                 and r.get("mode") == "forward"]
    if ablations:
        print("\n# lane kernel, E=64 top-8 bf16 forward, work added step by step: us per call (% of copy)")
        for num_tokens in sorted({r["T"] for r in ablations}):
            sel = {r["provider"]: r for r in rows if r.get("section") == "cuda" and r["E"] == NUM_EXPERTS
                   and r["top_k"] == TOP_K and r["T"] == num_tokens and r.get("mode") == "forward"}
            network = [f"lane_{name}" for name in cuda_route.LANE_ABLATIONS if not name.endswith("_tournament")]
            tournament = ["lane_load_store"] + [f"lane_{name}" for name in cuda_route.LANE_ABLATIONS
                                                if name.endswith("_tournament")]
            for label, steps in (("network", network + ["cuda_lane", "cuda_kernel"]),
                                 ("tournament", tournament + ["cuda_lane"])):
                cells = [f"{p.removeprefix('lane_').removesuffix('_tournament')} {sel[p]['graph_us']:.2f} "
                         f"({sel[p]['pct_copy']:.1f}%)" for p in steps if p in sel and "graph_us" in sel[p]]
                print(f"T={num_tokens:>7} {label:>10}: " + " | ".join(cells)
                      .replace("cuda_lane", "+counts (the op's lane kernel)").replace("cuda_kernel", "split"))


# --------------------------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------------------------


def bench(fn, args) -> tuple[float, float, float]:
    """(median, p20, p80) in ms of ``triton.testing.do_bench`` (L2 flushed before each call)."""
    import triton.testing

    res = triton.testing.do_bench(fn, warmup=args.warmup, rep=args.rep, quantiles=QUANTILES)
    return tuple(float(v) for v in res)


def graph_us(fns, calls: int, replays: int = 7) -> float:
    """Per-call device time of a CUDA graph of ``calls`` calls cycling over ``fns`` (median over replays)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for fn in fns:
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(calls):
            fns[i % len(fns)]()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / calls)
    del graph
    return statistics.median(times)


def graph_calls(num_tokens: int, sets: int) -> int:
    return max(sets, 100 if num_tokens <= 4096 else 20 if num_tokens <= 65536 else 8)


def copy_bandwidth_gbs(device, args) -> tuple[float, float]:
    """Device-to-device copy of 512 MiB, bytes read + written: (do_bench, CUDA graph) in GB/s."""
    n = 1 << 29
    src = torch.empty(n, dtype=torch.uint8, device=device).random_(0, 255)
    dst = torch.empty_like(src)
    ms = bench(lambda: dst.copy_(src), args)[0]
    us = graph_us([lambda: dst.copy_(src)], calls=10)
    del src, dst
    torch.cuda.empty_cache()
    return 2 * n / (ms * 1e-3) / 1e9, 2 * n / (us * 1e-6) / 1e9


# --------------------------------------------------------------------------------------------------------------
# Sweeps of launcher settings
# --------------------------------------------------------------------------------------------------------------


def run_sweep(device, args, rows, copy_gbs):
    """Tile/warp settings of the launchers (uniform load, no mask), timed in graphs over rotating inputs."""
    from moe_fastmask.ops import triton_route

    print("\n# sweep: launcher settings (uniform, no mask), per-call device time in a CUDA graph")
    configs = [(16, 2), (32, 2), (32, 4), (64, 4), (64, 8), (128, 4), (128, 8)]
    for num_tokens in (65536, 262144):
        sets = rotation(num_tokens)
        data = []
        for s in range(sets):
            logits = make_logits(num_tokens, "uniform", None, device, s)
            grad = torch.randn(num_tokens, TOP_K, device=device).to(torch.bfloat16)
            _, ids = triton_route.route_forward(logits, TOP_K, None, None, None, args.renormalize)
            data.append((logits, grad, ids, torch.empty_like(logits)))
        counts = torch.zeros(1, NUM_EXPERTS, dtype=torch.int64, device=device)
        calls = graph_calls(num_tokens, sets)
        for block_t, warps in configs:
            for what in ("fwd", "fwd_nocounts", "bwd"):
                if what == "bwd":
                    fns = [lambda d=d: triton_route.route_backward(d[1], d[0], None, None, d[2], args.renormalize,
                                                                   out=d[3], block_t=block_t, num_warps=warps)
                           for d in data]
                    nbytes = full_bytes(num_tokens) - forward_bytes(num_tokens)
                else:
                    cnt = counts if what == "fwd" else None
                    fns = [lambda d=d, cnt=cnt: triton_route.route_forward(d[0], TOP_K, None, None, cnt,
                                                                           args.renormalize, block_t=block_t,
                                                                           num_warps=warps) for d in data]
                    nbytes = forward_bytes(num_tokens)
                try:
                    us = graph_us(fns, calls)
                except Exception as exc:  # a setting that does not compile
                    print(f"T={num_tokens} {what} BLOCK_T={block_t} warps={warps}: failed ({type(exc).__name__})")
                    continue
                gbs = nbytes / (us * 1e-6) / 1e9
                print(f"T={num_tokens:>6} {what:<12} BLOCK_T={block_t:<3} warps={warps}: {us:8.2f} us "
                      f"{gbs:7.0f} GB/s ({100 * gbs / copy_gbs:5.1f}% of copy)", flush=True)
                rows.append(dict(section="sweep", T=num_tokens, mask=False, load="uniform", provider="kernel",
                                 mode=what, block_t=block_t, num_warps=warps, graph_us=us, gbs=gbs,
                                 pct_copy=100 * gbs / copy_gbs))
        fns = [lambda d=d: triton_route.route_forward(d[0], 1, None, None, counts, args.renormalize) for d in data]
        us = graph_us(fns, calls)
        print(f"T={num_tokens:>6} fwd top_k=1 (default settings): {us:8.2f} us")
        rows.append(dict(section="sweep", T=num_tokens, mask=False, load="uniform", provider="kernel",
                         mode="fwd_topk1", graph_us=us))
        if num_tokens == 262144:
            describe_kernel(data[0][0], counts, args)
        del data
        torch.cuda.empty_cache()

    print("\n# sweep: small T, per-call time in a CUDA graph of 100 calls (uniform, counts, no mask)")
    for num_tokens in (16, 256, 4096):
        logits = make_logits(num_tokens, "uniform", None, device, 0)
        counts = torch.zeros(1, NUM_EXPERTS, dtype=torch.int64, device=device)
        for block_t in (1, 2, 4, 8, 16, 32):
            for warps in (1, 2, 4):
                if block_t > num_tokens:
                    continue
                fn = lambda: triton_route.route_forward(logits, TOP_K, None, None, counts, args.renormalize,
                                                        block_t=block_t, num_warps=warps)
                us = graph_us([fn], 100)
                print(f"T={num_tokens:>5} BLOCK_T={block_t:<3} warps={warps}: {us:6.2f} us")
                rows.append(dict(section="sweep_graph", T=num_tokens, mask=False, load="uniform", provider="kernel",
                                 mode="forward", block_t=block_t, num_warps=warps, graph_us=us))


def describe_kernel(logits, counts, args):
    """Registers, spills and a SASS opcode count of the default forward kernel."""
    import collections
    import re

    from moe_fastmask.ops import triton_route

    weights = torch.empty(logits.shape[0], TOP_K, dtype=logits.dtype, device=logits.device)
    ids = torch.empty(logits.shape[0], TOP_K, dtype=torch.int64, device=logits.device)
    handle = triton_route._forward_into(weights, ids, logits, TOP_K, None, None, counts, args.renormalize)
    try:
        sass = handle.asm["sass"]
    except Exception as exc:  # no disassembler
        print(f"forward kernel: regs={handle.n_regs} spills={handle.n_spills} (no SASS: {type(exc).__name__})")
        return
    ops = collections.Counter(m.group(1) for m in re.finditer(r"^[^\t\n]*\t(?:@!?U?P[T0-9]+\s+)?([A-Z0-9_]+)",
                                                              sass, flags=re.M))
    print(f"forward kernel: regs={handle.n_regs} spills={handle.n_spills} SASS instructions={sum(ops.values())} "
          f"top: {ops.most_common(14)}")


# --------------------------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------------------------


def device_info():
    import triton

    try:
        device = triton.runtime.driver.active.get_active_torch_device()
    except Exception:  # a Triton without this helper
        device = torch.device("cuda", torch.cuda.current_device())
    return device, torch.cuda.get_device_properties(device)


def main(argv=None):
    args = parse_args(argv)
    if args.smoke:
        return smoke()
    if not torch.cuda.is_available():
        print("bench_route.py needs a CUDA device")
        return 1
    import triton

    from moe_fastmask.ops import triton_route

    device, props = device_info()
    header = (f"device: {props.name} ({props.multi_processor_count} SMs) | torch {torch.__version__} | "
              f"triton {triton.__version__} | {datetime.datetime.now().isoformat(timespec='seconds')}")
    print(header, flush=True)
    profile, source = load_profile(args.freqs, args.layer, NUM_EXPERTS, TOP_K)
    print(f"skewed load: {source}; hottest expert's share {profile.max().item():.3f}")
    copy_bench, copy_graph = copy_bandwidth_gbs(device, args)
    copy_gbs = max(copy_bench, copy_graph)
    print(f"device-to-device copy: {copy_bench:.0f} GB/s (do_bench), {copy_graph:.0f} GB/s (graph); "
          f"reference {copy_gbs:.0f} GB/s (read + write)")
    rows = [dict(section="copy", provider="torch.copy_", mode="do_bench", gbs=copy_bench),
            dict(section="copy", provider="torch.copy_", mode="graph", gbs=copy_graph)]

    from moe_fastmask.ops import cuda_route

    with_cuda = not args.no_cuda and cuda_route.is_available()
    if not args.no_cuda and not args.only_families:
        run_cuda_section(device, args, rows, copy_gbs)
    if args.only_cuda or args.only_families:
        args.sizes = []
    if args.sweep and not args.only_cuda and not args.only_families:
        run_sweep(device, args, rows, copy_gbs)
    if not args.no_families and not args.only_cuda:
        run_families(device, args, rows, copy_gbs)

    compiled_chain = None
    providers = ["eager", "fastmask"] + (["cuda"] if with_cuda else []) + ["kernel"]
    if not args.no_compile and not args.only_cuda and not args.only_families:
        compiled_chain = torch.compile(eager_chain, dynamic=True)
        providers.insert(1, "compile")

    print("\n# providers (median: do_bench; graph: per call in a CUDA graph over rotating inputs)")
    for num_tokens in args.sizes:
        sets = rotation(num_tokens)
        calls = graph_calls(num_tokens, sets)
        for masked in (False, True):
            keep = make_keep(masked, device, num_tokens)
            for load in ("uniform", "skewed"):
                inputs = [make_logits(num_tokens, load, profile, device, 1000 * s + num_tokens) for s in range(sets)]
                grads = [torch.randn(num_tokens, TOP_K, device=device).to(torch.bfloat16) for _ in range(sets)]
                counts = torch.zeros(1, NUM_EXPERTS, dtype=torch.int64, device=device)
                hottest = float("nan")
                if load == "skewed":
                    _, ids = triton_route.route_forward(inputs[0], TOP_K, keep, None, None, False)
                    hottest = torch.bincount(ids.flatten(), minlength=NUM_EXPERTS).max().item() / num_tokens
                for name in providers:
                    for mode in ["forward"] if name == "kernel" else ["forward", "full"]:
                        fns = [make_call(name, mode, x, g, keep, counts, args.renormalize, compiled_chain)
                               for x, g in zip(inputs, grads)]
                        nbytes = forward_bytes(num_tokens) if mode == "forward" else full_bytes(num_tokens)
                        try:
                            med, lo, hi = bench(fns[0], args)
                            per_call = graph_us(fns, calls)
                        except Exception as exc:
                            print(f"T={num_tokens} {name} {mode}: failed: {type(exc).__name__}: {str(exc)[:200]}")
                            continue
                        gbs = nbytes / (per_call * 1e-6) / 1e9
                        row = dict(section="providers", T=num_tokens, mask=masked, load=load, provider=name,
                                   mode=mode, median_us=med * 1e3, p20_us=lo * 1e3, p80_us=hi * 1e3,
                                   graph_us=per_call, gbs=gbs, pct_copy=100 * gbs / copy_gbs, hottest=hottest)
                        rows.append(row)
                        print(f"T={num_tokens:>6} mask={masked:d} {load:<7} {name:<8} {mode:<7} "
                              f"median {med * 1e3:9.2f} us  graph {per_call:9.2f} us  {gbs:6.0f} GB/s "
                              f"({row['pct_copy']:5.1f}%)", flush=True)
                del inputs, grads, counts
            torch.cuda.empty_cache()

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = dict(device=props.name, torch=torch.__version__, triton=triton.__version__, skew=source)
    fields = ["device", "torch", "triton", "skew", "section", "family", "E", "top_k", "T", "mask", "load", "provider",
              "mode", "block_t", "num_warps", "median_us", "p20_us", "p80_us", "graph_us", "gbs", "pct_copy", "hottest",
              "note"]
    with out.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(dict(r, **meta) for r in rows)

    print("\n" + header)
    print(f"copy bandwidth {copy_gbs:.0f} GB/s; skew: {source}")
    table = [r for r in rows if r["section"] == "providers"]
    # the summary's last columns describe what route(backend="auto") runs here: the CUDA kernels where they built
    default = "cuda" if any(r["provider"] == "cuda" for r in table) else "fastmask"
    print(f"per-call device time in a CUDA graph, us; the do_bench median, GB/s, % of copy and speedup over eager of "
          f"{default} (route's default backend here)")
    print(f"{'T':>7} {'mask':>4} {'load':<7} {'mode':<7} " + " ".join(f"{p:>9}" for p in providers)
          + f" {'(median)':>10} {'GB/s':>6} {'%copy':>6} {'x eager':>7}")
    for num_tokens in args.sizes:
        for masked in (False, True):
            for load in ("uniform", "skewed"):
                for mode in ("forward", "full"):
                    sel = {r["provider"]: r for r in table if r["T"] == num_tokens and r["mask"] == masked
                           and r["load"] == load and r["mode"] == mode}
                    if not sel:
                        continue
                    times = " ".join(f"{sel[p]['graph_us']:9.2f}" if p in sel else f"{'-':>9}" for p in providers)
                    ours = sel.get(default, {})
                    eager = sel.get("eager", {})
                    speedup = eager.get("graph_us", math.nan) / ours.get("graph_us", math.nan)
                    print(f"{num_tokens:>7} {int(masked):>4} {load:<7} {mode:<7} {times} "
                          f"{ours.get('median_us', math.nan):10.2f} {ours.get('gbs', math.nan):6.0f} "
                          f"{ours.get('pct_copy', math.nan):6.1f} {speedup:7.1f}")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
