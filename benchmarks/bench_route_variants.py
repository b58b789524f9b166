"""Sweep of router forward variants against the current Triton forward, with the copy bandwidth of the same run.

Measures, in one run: device-to-device copy bandwidth (bytes read + written), then for each T (E=64, top-8, bf16
logits, a per-group mask, group ids with some -1, per-group counts) the current ``route`` forward
(``triton_route.route_forward``) and every variant of ``route_fast`` (top-k method x tile layout x BLOCK_T x
num_warps), each verified to give the current kernel's ids and counts on the same input before it is timed. Then
rows at E in {128, 256, 512} x top-k in {8, 16}. Times are per call inside a CUDA graph of many calls over rotating
input sets larger than the L2 cache (the helpers of ``bench_route.py``); GB/s count logits and group ids read once,
weights and int64 ids written once. Registers and spills of each compiled variant are printed when Triton reports
them. A time budget skips the remaining variants (listed) rather than overrun.

Usage: ``python benchmarks/bench_route_variants.py [--out benchmarks/out/route_variants.csv] [--budget-s 210]``;
``--smoke`` runs a tiny version on the CPU through Triton's interpreter (wall-clock times, a check of the script).
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import statistics
import sys
import time
from pathlib import Path

if "--smoke" in sys.argv[1:]:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before Triton is imported

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_route  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
NUM_GROUPS = 4
GROUP_RUN = 256  # tokens of one sequence share a group id
ROTATE_BYTES = 160 << 20

# (select, lanes per row (0: the compiler's tile layout), BLOCK_T, num_warps, early softmax denominator) at E=64
MAIN_VARIANTS = (
    [("bitonic", 1, bt, w, False) for bt, w in [(32, 1), (64, 1), (64, 2), (128, 1), (128, 2), (128, 4), (256, 4),
                                                 (256, 8)]]
    + [("bitonic", 1, bt, w, True) for bt, w in [(32, 1), (128, 4)]]
    + [("bitonic", 2, bt, w, False) for bt, w in [(32, 2), (64, 4), (128, 8)]]
    + [("bitonic", 4, bt, w, False) for bt, w in [(32, 4), (64, 8)]]
    + [("bitonic", 0, bt, w, False) for bt, w in [(16, 2), (32, 4), (64, 4)]]
    + [("iterative", 1, bt, w, False) for bt, w in [(32, 1), (64, 2), (128, 4)]]
    + [("tl_topk", 1, bt, w, False) for bt, w in [(32, 1), (64, 2), (128, 4)]]
)
WIDE_VARIANTS = [("bitonic", 1, 32, 1, False), ("bitonic", 2, 32, 2, False), ("bitonic", 4, 32, 4, False),
                 ("bitonic", 0, None, None, False), ("bitonic", 0, 16, 4, False)]
FULL_FEATURES = "mask+groups+counts"
# what the optional inputs cost: the same shape without them, for the current forward and these variants
FEATURE_VARIANTS = [("bitonic", 1, 32, 1, False), ("bitonic", 2, 32, 2, False)]
ROW_REGISTERS_MAX = 128  # keys per thread beyond which a row split over lanes spills
WIDE_SHAPES = [(128, 8), (128, 16), (256, 8), (256, 16), (512, 8), (512, 16)]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(REPO_ROOT / "benchmarks" / "out" / "route_variants.csv"))
    parser.add_argument("--sizes", type=int, nargs="+", default=[4096, 65536, 262144])
    parser.add_argument("--wide-tokens", type=int, default=65536, help="T of the E=128..512 rows")
    parser.add_argument("--budget-s", type=float, default=210.0, help="skip remaining variants after this long")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU through the interpreter")
    parser.add_argument("--jobs", type=int, default=min(12, os.cpu_count() or 1),
                        help="processes compiling the kernels before timing (0: compile while timing)")
    parser.add_argument("--warmup", type=int, default=5, help="do_bench warm-up of the copy (ms)")
    parser.add_argument("--rep", type=int, default=20, help="do_bench repetition of the copy (ms)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.sizes, args.wide_tokens = [40, 130], 24
    return args


def variant_name(select, lanes, block_t, warps, early) -> str:
    layout = f"lanes{lanes}" if lanes else "tile"
    cfg = "default" if block_t is None else f"{block_t}x{warps}"
    return f"{select}/{layout}/{cfg}" + ("/early" if early else "")


def make_inputs(num_tokens, num_experts, device, seed):
    gen = torch.Generator(device=device).manual_seed(seed)
    logits = torch.randn(num_tokens, num_experts, generator=gen, device=device).to(torch.bfloat16)
    runs = -(-num_tokens // GROUP_RUN)
    group = torch.randint(-1, NUM_GROUPS, (runs,), generator=gen, device=device)
    return logits, group.repeat_interleave(GROUP_RUN)[:num_tokens].to(torch.int32).contiguous()


def make_keep(num_experts, top_k, device, seed):
    gen = torch.Generator(device="cpu").manual_seed(seed)
    keep = torch.ones(NUM_GROUPS, num_experts, dtype=torch.bool)
    for g in range(NUM_GROUPS):  # a quarter of the experts masked, at least top_k allowed
        masked = min(num_experts // 4, num_experts - top_k)
        keep[g, torch.randperm(num_experts, generator=gen)[:masked]] = False
    return keep.to(device)


def forward_bytes(num_tokens, num_experts, top_k) -> int:
    return num_tokens * (num_experts * 2 + 4 + top_k * 2 + top_k * 8)


def time_us(fns, num_tokens, sets, on_gpu) -> float:
    if on_gpu:
        return bench_route.graph_us(fns, bench_route.graph_calls(num_tokens, sets))
    times = []
    for i in range(3):
        start = time.perf_counter()
        fns[i % len(fns)]()
        times.append((time.perf_counter() - start) * 1e6)
    return statistics.median(times)


def kernel_resources(handle) -> str:
    try:
        return f"regs={handle.n_regs} spills={handle.n_spills}"
    except Exception:  # the interpreter, or a Triton without these fields
        return "regs=? spills=?"


def _compile_one(job) -> str:
    """Compile one kernel specialisation by launching it on a small input (run in a worker process)."""
    num_experts, top_k, variant, features = job if len(job) == 4 else (*job, FULL_FEATURES)
    from moe_fastmask.ops import route_fast_launch, triton_route

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # cpu: the --smoke check of this path
    logits, group = make_inputs(256, num_experts, device, 0)  # 256 keeps T's divisibility by 16 as at full size
    use_groups = "groups" in features
    group = group if use_groups else None
    keep = make_keep(num_experts, top_k, device, 0) if "mask" in features else None
    if keep is not None and not use_groups:
        keep = keep[:1].contiguous()
    counts = None
    if "counts" in features:
        counts = torch.zeros(NUM_GROUPS if use_groups else 1, num_experts, dtype=torch.int64, device=device)
    start = time.monotonic()
    try:
        if variant is None:
            triton_route.route_forward(logits, top_k, keep, group, counts, False)
        else:
            select, lanes, block_t, warps, early = variant
            if select == "tl_topk" and not route_fast_launch.tl_topk_available():
                return "no tl.topk"
            route_fast_launch.route_fast_forward(logits, top_k, keep, group, counts, False, select=select,
                                                 lanes_per_row=lanes, early_denom=early, block_t=block_t,
                                                 num_warps=warps)
        if device.type == "cuda":
            torch.cuda.synchronize()
    except Exception as exc:  # reported again, with context, when the main process runs it
        return f"{type(exc).__name__}"
    return f"{time.monotonic() - start:.1f} s"


def precompile(jobs: list, workers: int) -> None:
    """Fill Triton's on-disk cache from ``workers`` processes, so the timed run does not compile serially."""
    import concurrent.futures
    import multiprocessing

    start = time.monotonic()
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context) as pool:
        results = list(pool.map(_compile_one, jobs))
    slow = sorted(zip(results, jobs), key=lambda r: -float(r[0].split()[0]) if r[0].endswith(" s") else 0)[:3]
    print(f"compiled {len(jobs)} kernels in {workers} processes: {time.monotonic() - start:.0f} s "
          f"(slowest: {slow})", flush=True)


def run_shape(num_tokens, num_experts, top_k, variants, device, copy_gbs, rows, deadline, skipped,
              features=FULL_FEATURES):
    """Time the current forward and ``variants`` on one shape; ``features`` names the optional inputs used."""
    from moe_fastmask.ops import route_fast_launch, triton_route

    on_gpu = device.type == "cuda"
    use_groups = "groups" in features
    nbytes = forward_bytes(num_tokens, num_experts, top_k) - (0 if use_groups else 4 * num_tokens)
    sets = max(1, min(16, math.ceil(ROTATE_BYTES / nbytes))) if on_gpu else 2
    data = [make_inputs(num_tokens, num_experts, device, 100 * s + num_tokens) for s in range(sets)]
    if not use_groups:
        data = [(logits, None) for logits, _ in data]
    keep = make_keep(num_experts, top_k, device, num_experts + top_k) if "mask" in features else None
    counts = None
    if "counts" in features:
        counts = torch.zeros(NUM_GROUPS if use_groups else 1, num_experts, dtype=torch.int64, device=device)
    if keep is not None and not use_groups:
        keep = keep[:1].contiguous()
    outs = [(torch.empty(num_tokens, top_k, dtype=torch.bfloat16, device=device),
             torch.empty(num_tokens, top_k, dtype=torch.int64, device=device)) for _ in range(sets)]

    fresh_counts = lambda: None if counts is None else torch.zeros_like(counts)  # noqa: E731
    ref_counts = fresh_counts()
    _, ref_ids = triton_route.route_forward(data[0][0], top_k, keep, data[0][1], ref_counts, False)

    def record(name, us, resources):
        gbs = nbytes / (us * 1e-6) / 1e9
        pct = 100 * gbs / copy_gbs if copy_gbs else math.nan
        rows.append(dict(T=num_tokens, E=num_experts, top_k=top_k, features=features, variant=name, us=us, gbs=gbs,
                         pct_copy=pct, resources=resources))
        print(f"T={num_tokens:>6} E={num_experts:>3} k={top_k:>2} {features:<18} {name:<26} {us:9.2f} us "
              f"{gbs:7.0f} GB/s ({pct:5.1f}% of copy) {resources}", flush=True)

    fns = [lambda d=d, o=o: triton_route.route_forward(d[0], top_k, keep, d[1], counts, False, out=o)
           for d, o in zip(data, outs)]
    record("current", time_us(fns, num_tokens, sets, on_gpu), "")

    for select, lanes, block_t, warps, early in variants:
        name = variant_name(select, lanes, block_t, warps, early)
        if lanes and num_experts // lanes > ROW_REGISTERS_MAX:
            continue
        if select == "tl_topk" and not route_fast_launch.tl_topk_available():
            skipped.append(f"{name} (no tl.topk in this Triton)")
            continue
        if time.monotonic() > deadline:
            skipped.append(f"T={num_tokens} E={num_experts} k={top_k} {name} (time budget)")
            continue
        opts = dict(select=select, lanes_per_row=lanes, early_denom=early, block_t=block_t, num_warps=warps)
        try:
            check_counts = fresh_counts()
            weights, ids = outs[0]
            handle = route_fast_launch.forward_into(weights, ids, data[0][0], top_k, keep, data[0][1], check_counts,
                                                    False, **opts)
            counts_equal = counts is None or torch.equal(check_counts, ref_counts)
            if not (torch.equal(ids, ref_ids) and counts_equal):
                bad = int((ids != ref_ids).any(dim=1).sum())
                print(f"T={num_tokens} E={num_experts} k={top_k} {name}: MISMATCH ({bad} rows of ids differ, "
                      f"counts equal: {counts_equal}); not timed", flush=True)
                rows.append(dict(T=num_tokens, E=num_experts, top_k=top_k, features=features, variant=name,
                                 resources="mismatch"))
                continue
            fns = [lambda d=d, o=o: route_fast_launch.forward_into(o[0], o[1], d[0], top_k, keep, d[1], counts,
                                                                   False, **opts) for d, o in zip(data, outs)]
            record(name, time_us(fns, num_tokens, sets, on_gpu), kernel_resources(handle))
        except Exception as exc:  # a configuration that does not compile or run
            print(f"T={num_tokens} E={num_experts} k={top_k} {name}: failed: {type(exc).__name__}: "
                  f"{str(exc)[:200]}", flush=True)
            rows.append(dict(T=num_tokens, E=num_experts, top_k=top_k, features=features, variant=name,
                             resources="failed"))
    del data, outs
    if on_gpu:
        torch.cuda.empty_cache()


def main(argv=None):
    args = parse_args(argv)
    started = time.monotonic()
    deadline = started + args.budget_s
    if args.smoke:
        device = torch.device("cpu")
        header = f"smoke run on the CPU (Triton interpreter) | torch {torch.__version__}"
        copy_gbs = 0.0
    else:
        if not torch.cuda.is_available():
            print("bench_route_variants.py needs a CUDA device (or --smoke)")
            return 1
        import triton

        device, props = bench_route.device_info()
        header = (f"device: {props.name} ({props.multi_processor_count} SMs) | torch {torch.__version__} | "
                  f"triton {triton.__version__}")
        copy_bench, copy_graph = bench_route.copy_bandwidth_gbs(device, args)
        copy_gbs = max(copy_bench, copy_graph)
        print(f"device-to-device copy: {copy_bench:.0f} GB/s (do_bench), {copy_graph:.0f} GB/s (graph); "
              f"reference {copy_gbs:.0f} GB/s (read + write)", flush=True)
    print(header, flush=True)

    rows, skipped = [], []
    main_variants = MAIN_VARIANTS if not args.smoke else [v for v in MAIN_VARIANTS if v[2] in (32, 64)][::3]
    if args.smoke:  # exercise the compile pool on two small jobs
        precompile([(8, 2, None), (8, 2, main_variants[0], "counts")], min(2, max(1, args.jobs)))
    elif args.jobs > 0:
        jobs = [(64, 8, None)] + [(64, 8, v) for v in main_variants]
        jobs += [(64, 8, v, f) for f in ("counts", "none") for v in [None] + FEATURE_VARIANTS]
        for num_experts, top_k in WIDE_SHAPES:
            jobs += [(num_experts, top_k, None)] + [(num_experts, top_k, v) for v in WIDE_VARIANTS
                                                    if not v[1] or num_experts // v[1] <= ROW_REGISTERS_MAX]
        try:
            precompile(jobs, args.jobs)
        except Exception as exc:  # e.g. no CUDA in spawned processes: compile while timing instead
            print(f"parallel compilation failed ({type(exc).__name__}: {str(exc)[:200]}); compiling serially")
    for num_tokens in args.sizes:
        run_shape(num_tokens, 64, 8, main_variants, device, copy_gbs, rows, deadline, skipped)
    for features in ("counts", "none"):
        run_shape(args.sizes[-1], 64, 8, FEATURE_VARIANTS, device, copy_gbs, rows, deadline, skipped, features)
    for num_experts, top_k in WIDE_SHAPES:
        run_shape(args.wide_tokens, num_experts, top_k, WIDE_VARIANTS, device, copy_gbs, rows, deadline, skipped)

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fields = ["T", "E", "top_k", "features", "variant", "us", "gbs", "pct_copy", "resources"]
    with out.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)

    print("\n" + header)
    print(f"copy bandwidth {copy_gbs:.0f} GB/s; bf16 logits, per-group mask ({NUM_GROUPS} groups, -1 runs), counts; "
          f"per-call time in a CUDA graph over rotating inputs ({time.monotonic() - started:.0f} s run)")
    print(f"{'T':>7} {'E':>4} {'k':>3} {'features':<18} {'variant':<26} {'us':>9} {'GB/s':>7} {'%copy':>6} "
          f"{'x cur':>6}  resources")
    for r in rows:
        where = f"{r['T']:>7} {r['E']:>4} {r['top_k']:>3} {r['features']:<18} {r['variant']:<26}"
        if "us" not in r:
            print(f"{where} {'-':>9} {'-':>7} {'-':>6} {'-':>6}  {r['resources']}")
            continue
        cur = next(c for c in rows if c["variant"] == "current" and (c["T"], c["E"], c["top_k"], c["features"]) ==
                   (r["T"], r["E"], r["top_k"], r["features"]))
        print(f"{where} {r['us']:9.2f} {r['gbs']:7.0f} {r['pct_copy']:6.1f} {cur['us'] / r['us']:6.2f}  "
              f"{r['resources']}")
    for size in args.sizes:
        timed = [r for r in rows if r["T"] == size and r["E"] == 64 and "us" in r and r["variant"] != "current"
                 and r["features"] == FULL_FEATURES]
        if timed:
            best = min(timed, key=lambda r: r["us"])
            print(f"best at T={size}, E=64, k=8: {best['variant']} {best['us']:.2f} us "
                  f"({best['pct_copy']:.1f}% of copy)")
    if skipped:
        print("skipped: " + "; ".join(skipped))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
