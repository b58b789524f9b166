"""The selection-network counter of ``benchmarks/count_topk_networks.py`` (RESULTS.md, the router's eleventh round)."""

from __future__ import annotations

import random

import pytest

from conftest import load_benchmark


@pytest.fixture(scope="module")
def counter():
    return load_benchmark("count_topk_networks")


def lane_scheme_top8(keys: list[int]) -> list[int]:
    """The lane kernel's top 8, run as the kernel runs it: runs of 8 sorted, each merged by 8 maxima against the
    running top 8 reversed and a bitonic clean-up."""
    top: list[int] = []
    for start in range(0, len(keys), 8):
        run = sorted(keys[start:start + 8], reverse=True)
        if not top:
            top = run
            continue
        bitonic = [max(top[i], run[7 - i]) for i in range(8)]
        for half in (4, 2, 1):
            for i in range(8):
                if i & half == 0 and bitonic[i] < bitonic[i + half]:
                    bitonic[i], bitonic[i + half] = bitonic[i + half], bitonic[i]
        top = bitonic
    return top


@pytest.mark.parametrize("n", [2, 8, 16, 64])
def test_both_networks_sort(counter, n):
    for build in (counter.odd_even_merge_sort, counter.bitonic_sort):
        counter.check_sorts(build(n), n)


def test_a_network_missing_a_comparator_is_caught(counter):
    network = counter.odd_even_merge_sort(16)
    with pytest.raises(AssertionError, match="does not sort"):
        counter.check_sorts(network[:-1], 16)


def test_pruning_keeps_everything_for_all_outputs_and_less_for_the_top_k(counter):
    network = counter.odd_even_merge_sort(64)
    assert counter.pruned_cost(network, range(64)) == (len(network), 2 * len(network))
    comparators, operations = counter.pruned_cost(network, range(8))
    assert comparators < len(network)
    assert comparators <= operations < 2 * comparators  # some comparators keep one output only
    # the maximum alone needs at least n - 1 comparisons
    assert counter.pruned_cost(network, range(1))[0] >= 63


def test_the_lane_scheme_it_counts_selects_the_top_8(counter, session_seed):
    rng = random.Random(session_seed)
    for n in (8, 64, 128):
        for _ in range(50):
            keys = rng.sample(range(1 << 20), n)
            assert lane_scheme_top8(keys) == sorted(keys, reverse=True)[:8]
    assert counter.lane_kernel_cost(8) == 2 * 19  # one run: its sort only
    assert counter.lane_kernel_cost(64) == 8 * 38 + 7 * (8 + 24)
    with pytest.raises(ValueError, match="runs of 8"):
        counter.lane_kernel_cost(64, k=4)


def test_main_prints_each_network_and_refuses_bad_sizes(counter, capsys):
    assert counter.main(["--n", "32", "--k", "8"]) == 0
    out = capsys.readouterr().out
    assert "odd-even merge sort" in out and "bitonic sort" in out and "lane kernel" in out
    with pytest.raises(SystemExit):
        counter.main(["--n", "60"])
    assert "--n must be a power of two" in capsys.readouterr().err
