"""The lane CUDA routing kernel's launch and option choices, timed against each other and the copy bandwidth.

At the roofline setting of ``bench_route.py``'s cuda section (E=64, top-8, bf16 logits, a 4-group keep mask, group
ids in runs with -1 runs, counts on), for each T and grid policy (``cuda_route.GRID_POLICIES``: one full wave of
blocks, or warps with equal shares of tiles): the loads-and-stores-only instance (the memory floor) and the full
kernel with its top_k == 8 specialisation, with the top-k on one 32-bit key per register and on two 16-bit keys
(``packed16``, an option the op leaves off), and with the softmax denominator summed in a second pass over the row
(``two_pass_softmax``, the op's way before it summed it in the top-k's pass), each under every set of the options that change the memory traffic
(``cuda_route.LANE_OPTIONS``: one tile buffer per warp instead of two; the ids written through shared memory as whole
lines), the full kernel without the specialisation, the op as dispatched, and a device copy of as many bytes as the
forward moves (the bandwidth a kernel of that size reaches). Ids, counts and weights of every instance that computes
them are checked against the reference before timing; times are per call in a CUDA graph over rotating inputs
(``bench_route.graph_us``), with GB/s and % of the copy bandwidth (512 MiB) measured in the same run.

``--profile NAME`` runs instead a few plain calls of one configuration (for ``ncu``): NAME is
``POLICY:OPT+OPT`` (``balanced:topk8+stage_ids``, ``wave:``) or ``POLICY:load_store[+OPT...]``.

``--shift S`` adds S to every logit (``--shift -3``: most rows' top 8 span zero, the case where the packed top-k
(``packed16``) hands its warps to the 32-bit keys).

``--only NAME ...`` times only the configurations named (as printed) and the op as dispatched.

Usage: ``python benchmarks/bench_route_lane.py [--sizes 65536 262144] [--out OUT.csv] [--profile NAME --T N]
[--shift S] [--only NAME ...]``
"""

from __future__ import annotations

import argparse
import csv
import itertools
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_route  # noqa: E402  (the shared inputs, timing and copy-bandwidth helpers)

E, K = 64, 8


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[65536, 262144])
    parser.add_argument("--out", default=None, help="CSV of every timed row")
    parser.add_argument("--profile", default=None, help="POLICY:OPTIONS to call a few times (for ncu), no timing")
    parser.add_argument("--T", type=int, default=262144, help="tokens of --profile")
    parser.add_argument("--warmup", type=int, default=25)
    parser.add_argument("--rep", type=int, default=100)
    parser.add_argument("--policies", nargs="+", default=None, help="grid policies to time (default: all)")
    parser.add_argument("--only", nargs="+", default=None,
                        help="time only these configurations (names as printed, e.g. wave:topk8+stage_ids), and the op")
    parser.add_argument("--shift", type=float, default=0.0,
                        help="add this to every logit (e.g. -3: rows whose top 8 span zero, which the packed top-k "
                             "hands to the 32-bit keys)")
    return parser.parse_args(argv)


def configurations(policies=None):
    """(name, forward kwargs) of every configuration timed: per grid policy, the loads-and-stores-only instance and
    the full kernel (top_k == 8 specialised; 32-bit keys, then packed 16-bit keys) under each set of the options that
    change the memory traffic, plus the full kernel without the top_k specialisation."""
    from moe_fastmask.ops import cuda_route

    memory_options = [o for o in sorted(cuda_route.LANE_OPTIONS)
                      if o != "topk8" and o not in cuda_route.LANE_FULL_KERNEL_OPTIONS]
    subsets = [c for r in range(len(memory_options) + 1) for c in itertools.combinations(memory_options, r)
               if not any(set(pair) <= set(c) for pair in cuda_route.LANE_EXCLUSIVE_OPTIONS)]
    out = []
    for policy in policies or cuda_route.GRID_POLICIES:
        for subset in subsets:
            out.append((f"{policy}:load_store{''.join('+' + o for o in subset)}",
                        dict(_grid_policy=policy, _ablation="load_store", _lane_options=subset)))
        top_k_options_sets = [("topk8",)] + [("topk8", o) for o in cuda_route.LANE_FULL_KERNEL_OPTIONS]
        for top_k_options, subset in itertools.product(top_k_options_sets, subsets):
            out.append((f"{policy}:{'+'.join(top_k_options + subset)}",
                        dict(_grid_policy=policy, _lane_options=top_k_options + subset)))
        out.append((f"{policy}:", dict(_grid_policy=policy, _lane_options=())))
    return out


def shifted(logits, shift: float):
    """``logits + shift`` in the logits' dtype (the logits themselves when shift is 0)."""
    return logits if shift == 0 else (logits.float() + shift).to(logits.dtype)


def parse_profile(name: str) -> dict:
    policy, _, opts = name.partition(":")
    names = tuple(o for o in opts.split("+") if o)
    if names and names[0] == "load_store":
        return dict(_grid_policy=policy, _ablation="load_store", _lane_options=names[1:])
    return dict(_grid_policy=policy, _lane_options=names)


def check(logits, keep, group, kwargs) -> str:
    """'' when the configuration's ids and counts equal the reference's, else what differs."""
    from moe_fastmask.ops import cuda_route, reference

    if "_ablation" in kwargs:
        return ""
    counts = torch.zeros(bench_route.CUDA_GROUPS, E, dtype=torch.int64, device=logits.device)
    ref_counts = torch.zeros_like(counts)
    weights, ids = cuda_route.route_forward(logits, K, keep, group, counts, False, variant="lane", **kwargs)
    ref_w, ref_ids = reference.route_reference(logits, K, keep, group, ref_counts, False)
    if not torch.equal(ids, ref_ids):
        return f"ids differ in {int((ids != ref_ids).any(1).sum())} rows"
    if not torch.equal(counts, ref_counts):
        return "counts differ"
    if not torch.allclose(weights.float(), ref_w.float(), atol=8e-3, rtol=1.6e-2):
        return "weights differ"
    return ""


def main(argv=None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_route_lane.py needs a CUDA device")
        return 1
    from moe_fastmask.ops import cuda_route

    device = torch.device("cuda")
    if not cuda_route.is_available():
        print(f"the CUDA kernel is not available: {cuda_route.load_error()[:500]}")
        return 1
    if args.profile:
        logits, keep, group, _ = bench_route.cuda_case(args.T, E, K, device, 1)
        logits = shifted(logits, args.shift)
        counts = torch.zeros(bench_route.CUDA_GROUPS, E, dtype=torch.int64, device=device)
        kwargs = parse_profile(args.profile)
        for _ in range(8):
            cuda_route.route_forward(logits, K, keep, group, counts, False, variant="lane", **kwargs)
        torch.cuda.synchronize()
        print(f"profiled {args.profile} at T={args.T}")
        return 0

    props = torch.cuda.get_device_properties(device)
    print(f"device: {props.name} ({props.multi_processor_count} SMs) | torch {torch.__version__}")
    copy_bench, copy_graph = bench_route.copy_bandwidth_gbs(device, args)
    copy_gbs = max(copy_bench, copy_graph)
    print(f"device-to-device copy: {copy_gbs:.0f} GB/s (read + write)")
    rows = []
    failed = False
    for num_tokens in args.sizes:
        sets = max(1, min(16, math.ceil(bench_route.ROTATE_BYTES / bench_route.cuda_bytes(num_tokens, E, K, "full"))))
        calls = bench_route.graph_calls(num_tokens, sets)
        data = [bench_route.cuda_case(num_tokens, E, K, device, 9000 * s + num_tokens) for s in range(sets)]
        data = [(shifted(x, args.shift), *rest) for x, *rest in data]
        counts = torch.zeros(bench_route.CUDA_GROUPS, E, dtype=torch.int64, device=device)
        nbytes = bench_route.cuda_bytes(num_tokens, E, K, "forward")
        # the copy of as many bytes (read + write) as the forward moves: the bandwidth a kernel of this size reaches
        half = nbytes // 2
        srcs = [torch.empty(half, dtype=torch.uint8, device=device) for _ in range(sets)]
        dsts = [torch.empty_like(t) for t in srcs]
        per_call = bench_route.graph_us([(lambda a=a, b=b: b.copy_(a)) for a, b in zip(srcs, dsts)], calls)
        gbs = 2 * half / (per_call * 1e-6) / 1e9
        rows.append(dict(T=num_tokens, config="copy of the same bytes", graph_us=per_call, gbs=gbs,
                         pct_copy=100 * gbs / copy_gbs, problem=""))
        print(f"T={num_tokens:>7} {'copy of the same bytes':<34} {per_call:8.2f} us {gbs:6.0f} GB/s "
              f"({100 * gbs / copy_gbs:5.1f}% of copy)", flush=True)
        del srcs, dsts
        configs = [c for c in configurations(args.policies) if not args.only or c[0] in args.only]
        configs += [("op default", {})]
        for name, kwargs in configs:
            problem = check(*data[0][:3], kwargs)
            if problem:
                failed = True
            fns = [
                (lambda x=x, kp=kp, g=g, kw=kwargs: cuda_route.route_forward(x, K, kp, g, counts, False, **kw))
                for x, kp, g, _ in data
            ]
            per_call = bench_route.graph_us(fns, calls)
            gbs = nbytes / (per_call * 1e-6) / 1e9
            rows.append(dict(T=num_tokens, config=name, graph_us=per_call, gbs=gbs, pct_copy=100 * gbs / copy_gbs,
                             problem=problem))
            print(f"T={num_tokens:>7} {name:<34} {per_call:8.2f} us {gbs:6.0f} GB/s ({100 * gbs / copy_gbs:5.1f}% of "
                  f"copy) {'WRONG: ' + problem if problem else ''}", flush=True)
        del data
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        with open(args.out, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    print(f"copy {copy_gbs:.0f} GB/s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
