"""Min / max operations of exact top-k selection networks (no GPU; benchmarks/RESULTS.md, eleventh round).

A compare-exchange costs two operations (min and max) where both of its outputs are used later, one where only one
is. Each sorting network is pruned backwards from the outputs that hold the top k, and every network is checked on
random keys first. Compared: Batcher's odd-even merge sort and the bitonic sort of n keys, pruned to their top k, and
the scheme of the CUDA lane kernel (``csrc/route_cuda.cu``): runs of 8 sorted by a 19-comparator network, each
merged into the running top 8 by 8 maxima and a 12-comparator bitonic clean-up.

Usage: ``python benchmarks/count_topk_networks.py [--n 64] [--k 8]``
"""

from __future__ import annotations

import argparse
import random

Network = list[tuple[int, int]]  # (i, j): after the comparator, key i holds the larger of keys i and j


def odd_even_merge_sort(n: int) -> Network:
    """Batcher's odd-even merge sort of n keys (n a power of two), descending."""
    network: Network = []

    def merge(lo: int, hi: int, r: int) -> None:
        step = r * 2
        if step < hi - lo:
            merge(lo, hi, step)
            merge(lo + r, hi, step)
            network.extend((i, i + r) for i in range(lo + r, hi - r, step))
        else:
            network.append((lo, lo + r))

    def sort(lo: int, hi: int) -> None:
        if hi - lo >= 1:
            mid = lo + (hi - lo) // 2
            sort(lo, mid)
            sort(mid + 1, hi)
            merge(lo, hi, 1)

    sort(0, n - 1)
    return network


def bitonic_sort(n: int) -> Network:
    """The bitonic sort of n keys (n a power of two), descending."""
    network: Network = []
    k = 2
    while k <= n:
        j = k // 2
        while j > 0:
            for i in range(n):
                partner = i ^ j
                if partner > i:
                    network.append((i, partner) if i & k == 0 else (partner, i))
            j //= 2
        k *= 2
    return network


def run(network: Network, keys: list[int]) -> list[int]:
    out = list(keys)
    for i, j in network:
        if out[i] < out[j]:
            out[i], out[j] = out[j], out[i]
    return out


def check_sorts(network: Network, n: int, trials: int = 200) -> None:
    rng = random.Random(0)
    for _ in range(trials):
        keys = rng.sample(range(10 * n), n)
        if run(network, keys) != sorted(keys, reverse=True):
            raise AssertionError("the network does not sort")


def pruned_cost(network: Network, outputs: range) -> tuple[int, int]:
    """(comparators, min / max operations) of ``network`` once pruned to ``outputs``."""
    needed = set(outputs)
    comparators = operations = 0
    for i, j in reversed(network):
        uses_i, uses_j = i in needed, j in needed
        if not (uses_i or uses_j):
            continue
        comparators += 1
        operations += 2 if uses_i and uses_j else 1
        needed.update((i, j))
    return comparators, operations


def lane_kernel_cost(n: int, k: int = 8) -> int:
    """Operations of the lane kernel's scheme for the top 8 of n keys (n a multiple of 8)."""
    if k != 8 or n % 8:
        raise ValueError("the lane kernel's scheme takes the top 8 of runs of 8")
    runs = n // 8
    sort8, merge = 19 * 2, 8 + 12 * 2
    return runs * sort8 + (runs - 1) * merge


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=64, help="keys per row (a power of two)")
    parser.add_argument("--k", type=int, default=8, help="how many of the largest, sorted")
    args = parser.parse_args(argv)
    if args.n < 2 or args.n & (args.n - 1):
        parser.error(f"--n must be a power of two >= 2, got {args.n}")
    if not 1 <= args.k <= args.n:
        parser.error(f"--k must be in [1, --n], got {args.k}")
    for name, build in (("odd-even merge sort", odd_even_merge_sort), ("bitonic sort", bitonic_sort)):
        network = build(args.n)
        check_sorts(network, args.n)
        comparators, operations = pruned_cost(network, range(args.k))
        print(f"{name:<22} {len(network):5d} comparators; pruned to the top {args.k}: {comparators} comparators, "
              f"{operations} min/max operations")
    if args.k == 8 and args.n % 8 == 0:
        print(f"{'lane kernel (runs of 8)':<22} {lane_kernel_cost(args.n)} min/max operations")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
