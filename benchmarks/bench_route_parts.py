"""What the route op's optional work costs per router shape: the CUDA op (``backend="cuda"``) with and without the
keep mask, the group ids and the counts, on one GPU.

For each ``E,k,T`` case: logits, keep mask, group ids and counts as ``bench_route.py``'s CUDA section makes them
(4 groups, ids in runs of 256 tokens), timed per call in a CUDA graph over rotating inputs, forward only; every
variant's ids and counts are checked against the reference first. The rows show where a shape's time goes, e.g.
whether a small expert count's shared-memory counters (few addresses, many atomics) dominate.

``--profile`` instead calls the op (mask, group ids and counts) a few times per case, untimed, for Nsight Compute
(``benchmarks/profile_route_split.sh``).

Usage: python3 benchmarks/bench_route_parts.py [--cases 8,2,262144 64,8,262144 ...] [--profile]
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_route import ROTATE_BYTES, cuda_bytes, cuda_case, device_info, graph_calls, graph_us  # noqa: E402

DEFAULT_CASES = ("8,2,262144", "60,4,262144", "64,8,262144", "128,16,65536", "256,8,65536")
VARIANTS = {  # name: (keep mask, group ids, counts)
    "plain": (False, False, False),
    "counts": (False, False, True),
    "groups+counts": (False, True, True),
    "mask+groups": (True, True, False),
    "mask+groups+counts (the op)": (True, True, True),
}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", default=list(DEFAULT_CASES), help="E,top_k,T (default: %(default)s)")
    parser.add_argument("--profile", action="store_true", help="call the op 4 times per case, untimed (for ncu)")
    args = parser.parse_args(argv)
    cases = []
    for case in args.cases:
        try:
            num_experts, top_k, num_tokens = (int(v) for v in case.split(","))
        except ValueError:
            parser.error(f"--cases {case!r}: expected E,top_k,T (three integers), e.g. 64,8,262144")
        if not 1 <= top_k <= num_experts or num_tokens < 1:
            parser.error(f"--cases {case!r}: needs 1 <= top_k <= E and T >= 1")
        cases.append((num_experts, top_k, num_tokens))
    if not torch.cuda.is_available():
        parser.error("needs a CUDA device")
    from moe_fastmask import route
    from moe_fastmask.ops import reference

    device = torch.device("cuda")
    print(device_info())
    if args.profile:
        for num_experts, top_k, num_tokens in cases:
            logits, keep, group, _ = cuda_case(num_tokens, num_experts, top_k, device, num_experts)
            counts = torch.zeros(4, num_experts, dtype=torch.int64, device=device)
            for _ in range(4):
                route(logits, top_k, keep, group, counts, False, "cuda", validate=False)
            torch.cuda.synchronize()
            print(f"profiled E={num_experts} k={top_k} T={num_tokens}")
        return
    for num_experts, top_k, num_tokens in cases:
        sets = max(1, min(16, math.ceil(ROTATE_BYTES / cuda_bytes(num_tokens, num_experts, top_k, "forward"))))
        data = [cuda_case(num_tokens, num_experts, top_k, device, 9000 * s + num_experts) for s in range(sets)]
        for name, (with_mask, with_groups, with_counts) in VARIANTS.items():
            counts = torch.zeros(4, num_experts, dtype=torch.int64, device=device) if with_counts else None

            def call(logits, keep, group, counts=counts, with_mask=with_mask, with_groups=with_groups):
                return route(logits, top_k, keep if with_mask else None, group if with_groups else None, counts,
                             False, "cuda", validate=False)

            logits, keep, group, _ = data[0]
            ref_counts = None if counts is None else torch.zeros_like(counts)
            _, ids = call(logits, keep, group)
            _, ref_ids = reference.route_reference(logits, top_k, keep if with_mask else None,
                                                   group if with_groups else None, ref_counts, False)
            exact = torch.equal(ids, ref_ids) and (counts is None or torch.equal(counts, ref_counts))
            us = graph_us([lambda d=d: call(*d[:3]) for d in data], graph_calls(num_tokens, sets))
            print(f"E={num_experts:3d} k={top_k:2d} T={num_tokens:7d} {name:28s} {us:9.2f} us"
                  f"{'' if exact else '   DIFFERS FROM THE REFERENCE'}")


if __name__ == "__main__":
    main()
