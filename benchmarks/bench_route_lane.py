"""The lane CUDA routing kernel's launch and option choices, timed against each other and the copy bandwidth.

At the roofline setting of ``bench_route.py``'s cuda section (E=64, top-8, bf16 logits, a 4-group keep mask, group ids
in runs with -1 runs, counts on), for each T and grid policy (``cuda_route.GRID_POLICIES``: one full wave of blocks,
or warps with equal shares of tiles): the loads-and-stores-only instance (the memory floor) and the full kernel with
its top_k == 8 specialisation, with the top-k on one 32-bit key per register and on two 16-bit keys (``packed16``, an
option the op leaves off), by a tournament over the chunks of 8 experts (``tournament``, the op's from one tile per
warp of a full wave on), and with the softmax denominator summed in a second pass over the row
(``two_pass_softmax``, the op's way before it summed it in the top-k's pass), each under every set of the options that
change the memory traffic (``cuda_route.LANE_OPTIONS``: one tile buffer per warp instead of two; the ids written
through shared memory as whole lines; one block of 24 warps per multiprocessor whose second copies wait for every
first tile), the full kernel without the specialisation, the op as dispatched, and a device copy of as many bytes as
the forward moves (the bandwidth a kernel of that size reaches). Ids, counts and weights of every instance that
computes them are checked against the reference before timing; times are per call in a CUDA graph over rotating inputs
(``bench_route.graph_us``), with GB/s and % of the copy bandwidth (512 MiB) measured in the same run.

``--profile NAME`` runs instead a few plain calls of one configuration (for ``ncu``): NAME is
``POLICY:OPT+OPT`` (``balanced:topk8+stage_ids``, ``wave:``) or ``POLICY:load_store[+OPT...]``.

``--shift S`` adds S to every logit (``--shift -3``: most rows' top 8 span zero, the case where the packed top-k
(``packed16``) hands its warps to the 32-bit keys).

``--only NAME ...`` times only the configurations named (as printed) and the op as dispatched.

``--timeline`` runs instead the op's instance (``--timeline-options sm_block``: with that option) with per-warp stamps
(``cuda_route.route_forward``'s ``_timeline``) at ``--T`` and prints where a warp's time goes: the wait for its first
tile, each tile's top-k and softmax, its stores, the wait for its next tile, and when the warps end (``--timeline-out
CSV``: every warp's raw stamps).

Usage: ``python benchmarks/bench_route_lane.py [--sizes 65536 262144] [--out OUT.csv] [--profile NAME --T N]
[--shift S] [--only NAME ...] [--timeline [--T N] [--timeline-out CSV]]``
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
    parser.add_argument("--timeline", action="store_true",
                        help="per-warp stamps of the op's instance at --T instead of timing (see the docstring)")
    parser.add_argument("--timeline-out", default=None, help="CSV of every warp's raw stamps (--timeline)")
    parser.add_argument("--timeline-options", nargs="*", default=[],
                        help="lane options of the stamped instance (--timeline): none, or sm_block")
    return parser.parse_args(argv)


# slots of a warp's stamps (csrc/route_cuda.cu, kTimeline)
SM, START_NS, START_CYCLES, END_NS, END_CYCLES, TILES, KERNEL_END_CYCLES, FIRST_TILE_SLOT, STAMPED_TILES = (
    0, 1, 2, 3, 4, 5, 6, 8, 8)


def timeline_steps(timeline: torch.Tensor) -> tuple[dict, dict[str, torch.Tensor]]:
    """The stamps of the timeline instance (int64 [warps, slots] on the CPU; rows of warps that did not run are zero)
    as (facts, steps): facts ``warps``, ``tiles`` (warps per tile count), ``ghz`` (the SM clock: cycles per ns of the
    global timer, median over the warps) and ``kernel_us`` (first warp's start to last warp's end); steps, per name,
    each warp's time in us for that step (the first tile's wait; per tile the top-k and softmax, the stores, the wait
    for the next tile; the warps' start and end times from the first warp's start)."""
    ran = timeline[timeline[:, START_CYCLES] != 0].double()
    if len(ran) == 0:
        return dict(warps=0, tiles={}, ghz=float("nan"), kernel_us=float("nan")), {}
    ns = ran[:, END_NS] - ran[:, START_NS]
    cycles = ran[:, END_CYCLES] - ran[:, START_CYCLES]
    ghz = float((cycles[ns > 0] / ns[ns > 0]).median()) if bool((ns > 0).any()) else float("nan")
    us_per_cycle = 1e-3 / ghz
    tiles = ran[:, TILES].long()
    facts = dict(warps=len(ran), tiles={int(n): int((tiles == n).sum()) for n in tiles.unique()}, ghz=ghz,
                 kernel_us=float((ran[:, END_NS].max() - ran[:, START_NS].min()) / 1e3))
    t0 = ran[:, START_NS].min()
    steps = {"warp start (from the first warp's)": (ran[:, START_NS] - t0) / 1e3,
             "wait for the first tile": ((ran[:, FIRST_TILE_SLOT] - ran[:, START_CYCLES]) * us_per_cycle)[tiles > 0]}
    for i in range(int(min(tiles.max(), STAMPED_TILES))):
        rows = tiles > i
        landed, weighed, stored = (ran[rows, FIRST_TILE_SLOT + 3 * i + j] for j in range(3))
        if i > 0:
            steps[f"tile {i}: wait after the previous tile"] = (
                (landed - ran[rows, FIRST_TILE_SLOT + 3 * i - 1]) * us_per_cycle)
        steps[f"tile {i}: top-k and softmax"] = (weighed - landed) * us_per_cycle
        steps[f"tile {i}: stores and counts"] = (stored - weighed) * us_per_cycle
    for n in tiles.unique().tolist():
        steps[f"end of the tile loop, warps of {n} tiles"] = (ran[tiles == n, END_NS] - t0) / 1e3
    steps["end of the kernel's histogram flush"] = (ran[:, KERNEL_END_CYCLES] - ran[:, END_CYCLES]) * us_per_cycle
    return facts, steps


def timeline_summary(timeline: torch.Tensor) -> list[str]:
    """Lines describing timeline_steps: the warps and their tiles, the SM clock and the kernel's span, then p10, p50,
    p90 and max in us of each step."""
    facts, steps = timeline_steps(timeline)
    if facts["warps"] == 0:
        return ["no warp stamped"]
    lines = [f"warps {facts['warps']}, tiles per warp: "
             + ", ".join(f"{n}: {count}" for n, count in facts["tiles"].items())
             + f"; SM clock {facts['ghz']:.2f} GHz; kernel {facts['kernel_us']:.2f} us (first warp start to last warp "
             "end, global timer)"]
    for name, values in steps.items():
        if len(values):
            q = torch.quantile(values, torch.tensor([0.1, 0.5, 0.9], dtype=values.dtype))
            lines.append(f"  {name:<44} p10 {q[0]:7.2f}  p50 {q[1]:7.2f}  p90 {q[2]:7.2f}  max {values.max():7.2f} us"
                         f"  ({len(values)})")
    return lines


def run_timeline(args) -> int:
    """--timeline: a few plain calls of the instance, then one stamped call; prints timeline_summary."""
    from moe_fastmask.ops import cuda_route

    device = torch.device("cuda")
    logits, keep, group, _ = bench_route.cuda_case(args.T, E, K, device, 1)
    logits = shifted(logits, args.shift)
    counts = torch.zeros(bench_route.CUDA_GROUPS, E, dtype=torch.int64, device=device)
    props = torch.cuda.get_device_properties(device)
    timeline = torch.zeros(props.multi_processor_count * 64, cuda_route.timeline_slots(), dtype=torch.int64,
                           device=device)
    options = tuple(args.timeline_options) or None
    for _ in range(5):
        cuda_route.route_forward(logits, K, keep, group, counts, False, _timeline=timeline, _lane_options=options)
    timeline.zero_()
    cuda_route.route_forward(logits, K, keep, group, counts, False, _timeline=timeline, _lane_options=options)
    stamps = timeline.cpu()
    print(f"device: {props.name} | T={args.T} E={E} top-{K} bf16, 4-group mask, counts; the op's lane instance"
          f"{' with ' + '+'.join(options) if options else ''}")
    for line in timeline_summary(stamps):
        print(line)
    if args.timeline_out:
        Path(args.timeline_out).parent.mkdir(parents=True, exist_ok=True)
        with open(args.timeline_out, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow([f"slot{i}" for i in range(stamps.shape[1])])
            writer.writerows(stamps[stamps[:, START_CYCLES] != 0].tolist())
    return 0


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
            if any(set(pair) <= set(top_k_options + subset) for pair in cuda_route.LANE_EXCLUSIVE_OPTIONS):
                continue
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
    if args.timeline:
        return run_timeline(args)
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
