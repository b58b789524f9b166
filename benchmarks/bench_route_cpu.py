"""CPU benchmark of the fused router op: the PyTorch reference chain against the C++ kernel.

Providers, timed in the same run on the same inputs:

* ``torch``   — ``route(..., backend="torch")``: masked_fill, softmax, stable sort, index_add_ (the reference chain);
* ``cpp``     — ``route(..., backend="cpp")``: the full public path (argument checks, custom op, autograd Function);
* ``cpp_raw`` — ``torch.ops.moe_fastmask_C.route_cpu`` on preallocated outputs (the kernel alone).

Every configuration runs at each thread count (``torch.set_num_threads``); providers are interleaved round-robin so
background load hits them alike. Reports the median and the 20th / 80th percentiles, ns per token, the speedup of
``cpp`` over ``torch`` and the wrapper overhead (``cpp`` - ``cpp_raw``). Prints a table and writes a CSV.

    python benchmarks/bench_route_cpu.py [--tokens 4096,65536] [--threads 1,2] [--out benchmarks/out/route_cpu.csv]
"""

from __future__ import annotations

import argparse
import csv
import datetime
import platform
import statistics
import time
from pathlib import Path

import torch

from moe_fastmask import route
from moe_fastmask.ops import cpp_route

QUANTILES = [0.5, 0.2, 0.8]
PROVIDERS = ("torch", "cpp", "cpp_raw")
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def setup_route(num_tokens: int, num_experts: int, top_k: int, dtype: torch.dtype, mask: bool, seed: int = 0) -> dict:
    """Inputs of one configuration. mask=True: 4 token groups, each keeping a random 3/4 of the experts, and some
    tokens in group -1; mask=False: no keep mask and no groups (every token counted in row 0)."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(num_tokens, num_experts, generator=gen).to(dtype)
    if mask:
        num_groups = 4
        keep = torch.rand(num_groups, num_experts, generator=gen) < 0.75
        keep[:, :top_k] = True
        group = torch.randint(-1, num_groups, (num_tokens,), generator=gen)
    else:
        num_groups, keep, group = 1, None, None
    return dict(
        logits=logits,
        top_k=top_k,
        keep=keep,
        group=group,
        counts=torch.zeros(num_groups, num_experts, dtype=torch.int64),
        weights=torch.empty(num_tokens, top_k, dtype=dtype),
        ids=torch.empty(num_tokens, top_k, dtype=torch.int64),
    )


def provider_fn(provider: str, inputs: dict):
    logits, top_k, keep, group, counts = (inputs[k] for k in ("logits", "top_k", "keep", "group", "counts"))
    if provider == "torch":
        return lambda: route(logits, top_k, keep, group, counts, backend="torch")
    if provider == "cpp":
        return lambda: route(logits, top_k, keep, group, counts, backend="cpp")
    op = torch.ops.moe_fastmask_C.route_cpu
    weights, ids = inputs["weights"], inputs["ids"]
    return lambda: op(weights, ids, counts, logits, keep, group, False)


def check_agreement(inputs: dict) -> None:
    """The two backends must agree before their timings mean anything."""
    logits, top_k, keep, group = (inputs[k] for k in ("logits", "top_k", "keep", "group"))
    counts_ref, counts_cpp = inputs["counts"].clone(), inputs["counts"].clone()
    weights_ref, ids_ref = route(logits, top_k, keep, group, counts_ref, backend="torch")
    weights, ids = route(logits, top_k, keep, group, counts_cpp, backend="cpp")
    if not (torch.equal(ids, ids_ref) and torch.equal(counts_cpp, counts_ref)):
        raise AssertionError("cpp and torch backends disagree on ids or counts")
    torch.testing.assert_close(weights, weights_ref, atol=8e-3, rtol=1.6e-2)


def time_round_robin(fns: dict, min_seconds: float, min_reps: int) -> dict[str, list[float]]:
    """Call every function once per round until each has min_reps samples and min_seconds have passed. The order
    rotates from round to round, so no provider always runs right after the same one (warm or cold caches)."""
    samples = {name: [] for name in fns}
    names = list(fns)
    for fn in fns.values():  # warm-up
        fn()
    start = time.perf_counter()
    round_index = 0
    while min(len(s) for s in samples.values()) < min_reps or time.perf_counter() - start < min_seconds:
        for k in range(len(names)):
            name = names[(round_index + k) % len(names)]
            t0 = time.perf_counter()
            fns[name]()
            samples[name].append(time.perf_counter() - t0)
        round_index += 1
    return samples


def quantiles(values: list[float]) -> list[float]:
    ordered = sorted(values)
    cuts = statistics.quantiles(ordered, n=100, method="inclusive") if len(ordered) > 1 else ordered * 99
    return [statistics.median(ordered) if q == 0.5 else cuts[round(q * 100) - 1] for q in QUANTILES]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", default="4096,65536", help="comma-separated T values")
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--dtypes", default="bf16,fp32", help=f"comma-separated, from {sorted(DTYPES)}")
    parser.add_argument("--threads", default="1,2", help="comma-separated torch.set_num_threads values")
    parser.add_argument("--min-seconds", type=float, default=1.5, help="per configuration (all providers together)")
    parser.add_argument("--min-reps", type=int, default=15)
    parser.add_argument("--out", default="benchmarks/out/route_cpu.csv")
    args = parser.parse_args()

    if not cpp_route.is_available():
        raise SystemExit(f"the C++ kernel is not available: {cpp_route.load_error()}")
    threads_before = torch.get_num_threads()
    rows = []
    for threads in (int(v) for v in args.threads.split(",")):
        torch.set_num_threads(threads)
        for num_tokens in (int(v) for v in args.tokens.split(",")):
            for dtype_name in args.dtypes.split(","):
                for mask in (False, True):
                    inputs = setup_route(num_tokens, args.experts, args.top_k, DTYPES[dtype_name], mask)
                    check_agreement(inputs)
                    fns = {p: provider_fn(p, inputs) for p in PROVIDERS}
                    samples = time_round_robin(fns, args.min_seconds, args.min_reps)
                    row = dict(threads=threads, tokens=num_tokens, experts=args.experts, top_k=args.top_k,
                               dtype=dtype_name, mask="per-group" if mask else "none", counts="yes")
                    for p in PROVIDERS:
                        median, low, high = quantiles(samples[p])
                        row[f"{p}_ms"] = median * 1e3
                        row[f"{p}_p20_ms"] = low * 1e3
                        row[f"{p}_p80_ms"] = high * 1e3
                        row[f"{p}_ns_per_token"] = median * 1e9 / num_tokens
                    row["speedup"] = row["torch_ms"] / row["cpp_ms"]
                    row["speedup_raw"] = row["torch_ms"] / row["cpp_raw_ms"]
                    row["route_overhead_us"] = (row["cpp_ms"] - row["cpp_raw_ms"]) * 1e3
                    row["reps"] = min(len(s) for s in samples.values())
                    rows.append(row)
                    print_row(row, header=len(rows) == 1)

    overhead_rows = measure_overhead(args.experts, args.top_k)
    torch.set_num_threads(threads_before)

    out = Path(args.out)
    write_csv(out, rows)
    write_csv(out.with_name(f"{out.stem}_overhead{out.suffix}"), overhead_rows)
    print(f"\n{platform.machine()}, torch {torch.__version__}, {datetime.date.today().isoformat()}; "
          f"wrote {out} and {out.with_name(f'{out.stem}_overhead{out.suffix}')}")


def measure_overhead(num_experts: int, top_k: int) -> list[dict]:
    """Per-call cost of the layers around the kernel, on one thread: the raw op, route(validate=False) (custom op +
    autograd Function) and route() (plus the value checks: group range, cached keep check), with mask and groups."""
    torch.set_num_threads(1)
    rows = []
    print("\n| T | cpp raw us | route(validate=False) us | route() us | route() - raw us |")
    print("|---:|---:|---:|---:|---:|")
    for num_tokens in (1, 64, 4096):
        inputs = setup_route(num_tokens, num_experts, top_k, torch.bfloat16, mask=True)
        logits, keep, group, counts = (inputs[k] for k in ("logits", "keep", "group", "counts"))
        fns = {
            "cpp_raw": provider_fn("cpp_raw", inputs),
            "route_novalidate": lambda: route(logits, top_k, keep, group, counts, backend="cpp", validate=False),
            "route": provider_fn("cpp", inputs),
        }
        reps = 2000 if num_tokens <= 64 else 100
        samples = time_round_robin(fns, 0.5, reps)
        row = dict(tokens=num_tokens, experts=num_experts, top_k=top_k, dtype="bf16", mask="per-group")
        for name, values in samples.items():
            row[f"{name}_us"] = statistics.median(values) * 1e6
        row["overhead_us"] = row["route_us"] - row["cpp_raw_us"]
        rows.append(row)
        print(f"| {num_tokens} | {row['cpp_raw_us']:.1f} | {row['route_novalidate_us']:.1f} | {row['route_us']:.1f} "
              f"| {row['overhead_us']:.1f} |", flush=True)
    return rows


def write_csv(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def print_row(row: dict, header: bool) -> None:
    if header:
        print("| threads | T | dtype | mask | torch ms | cpp ms | cpp raw ms | torch ns/tok | cpp ns/tok | speedup "
              "| route() overhead us |")
        print("|---:|---:|---|---|---:|---:|---:|---:|---:|---:|---:|")
    print(f"| {row['threads']} | {row['tokens']} | {row['dtype']} | {row['mask']} | {row['torch_ms']:.3f} "
          f"| {row['cpp_ms']:.3f} | {row['cpp_raw_ms']:.3f} | {row['torch_ns_per_token']:.0f} "
          f"| {row['cpp_ns_per_token']:.0f} | {row['speedup']:.1f}x | {row['route_overhead_us']:.0f} |", flush=True)


if __name__ == "__main__":
    main()
