"""The host emulation of the CUDA device API (tests/cuda_emulation.py) that the CUDA kernels' CPU tests run on: warp
and block barriers, shuffles and votes behave as on the device; a missing barrier shows (the threads run in a fresh
order each round); a divergent barrier ends the process with a message; out-of-bounds shared-memory reads are
AddressSanitizer reports."""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import cuda_emulation

pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="g++ not found")

SOURCE = r"""
#include "emu_cuda.h"

// per warp: the sum of its lanes' values (butterfly shuffles), the max through __reduce_max_sync, a ballot of the odd
// values; per block: the warps' sums added through shared memory after __syncthreads
__global__ void reduce(const int* x, int* warp_sums, unsigned int* warp_max, unsigned int* ballots, int* block_sums) {
  __shared__ int sums[8];
  const int t = blockIdx.x * blockDim.x + threadIdx.x, lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  int v = x[t];
  const unsigned int m = __reduce_max_sync(0xffffffffu, static_cast<unsigned int>(v));
  const unsigned int odd = __ballot_sync(0xffffffffu, (v & 1) != 0);
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  if (lane == 0) {
    warp_sums[t / 32] = v;
    warp_max[t / 32] = m;
    ballots[t / 32] = odd;
    sums[warp] = v;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    int total = 0;
    for (int w = 0; w < static_cast<int>(blockDim.x / 32); ++w) total += sums[w];
    block_sums[blockIdx.x] = total;
  }
}

// each round every lane writes its slot, then reads its neighbour's: with the barrier, always this round's value;
// without it, the neighbour's write of this round or of the last, whichever the order of the two threads gives
__global__ void neighbour_reads(int* seen, int rounds, int with_barrier) {
  __shared__ int slots[32];
  const int lane = threadIdx.x & 31;
  for (int r = 0; r < rounds; ++r) {
    slots[lane] = r;
    if (with_barrier) __syncwarp();
    seen[r * 32 + lane] = slots[(lane + 1) & 31];
    __syncwarp();
  }
}

// half the warp waits on a barrier the other half never reaches
__global__ void divergent(int* out) {
  if ((threadIdx.x & 31) < 16) __syncwarp();
  out[threadIdx.x] = 1;
}

// every thread reads one element past the block's shared array
__global__ void past_shared(int* out) {
  __shared__ int slots[64];
  slots[threadIdx.x] = static_cast<int>(threadIdx.x);
  __syncthreads();
  out[threadIdx.x] = slots[threadIdx.x + 1];
}

extern "C" {
void run_reduce(const int* x, int* warp_sums, unsigned int* warp_max, unsigned int* ballots, int* block_sums,
                int grid, int threads) {
  emu_launch(grid, threads, 0, [&] { reduce(x, warp_sums, warp_max, ballots, block_sums); });
}
void run_neighbour_reads(int* seen, int rounds, int with_barrier) {
  emu_launch(1, 32, 0, [&] { neighbour_reads(seen, rounds, with_barrier); });
}
void run_divergent(int* out) { emu_launch(1, 32, 0, [&] { divergent(out); }); }
void run_past_shared(int* out) { emu_launch(1, 64, 0, [&] { past_shared(out); }); }
}
"""


@pytest.fixture(scope="module")
def library(tmp_path_factory) -> Path:
    return cuda_emulation.build_emulation(SOURCE, {}, tmp_path_factory.mktemp("emu_plain"), "emu_selftest", False)


def _ints(values) -> ctypes.Array:
    return (ctypes.c_int * len(values))(*values)


def test_shuffles_votes_and_barriers_give_the_devices_results(library):
    import random

    lib = ctypes.CDLL(str(library))
    rng = random.Random(7)
    grid, threads = 3, 256
    x = [rng.randrange(-1000, 1000) for _ in range(grid * threads)]
    warps = grid * threads // 32
    warp_sums, block_sums = _ints([-1] * warps), _ints([-1] * grid)
    warp_max, ballots = (ctypes.c_uint * warps)(), (ctypes.c_uint * warps)()
    lib.run_reduce(_ints(x), warp_sums, warp_max, ballots, block_sums, grid, threads)
    for w in range(warps):
        lanes = x[32 * w: 32 * (w + 1)]
        assert warp_sums[w] == sum(lanes)
        assert warp_max[w] == max(v & 0xFFFFFFFF for v in lanes)  # (unsigned, as the device compares them)
        assert ballots[w] == sum(1 << lane for lane, v in enumerate(lanes) if v & 1)
    assert list(block_sums) == [sum(x[b * threads: (b + 1) * threads]) for b in range(grid)]


def test_a_missing_barrier_shows_in_both_orders_of_writer_and_reader(library):
    lib = ctypes.CDLL(str(library))
    rounds = 256
    for with_barrier in (1, 0):
        seen = _ints([-1] * (rounds * 32))
        lib.run_neighbour_reads(seen, rounds, with_barrier)
        # each read saw this round's write (r) or, without the barrier, possibly the last round's (r - 1)
        fresh = [sum(seen[r * 32 + lane] == r for r in range(1, rounds)) for lane in range(32)]
        stale = [sum(seen[r * 32 + lane] == r - 1 for r in range(1, rounds)) for lane in range(32)]
        if with_barrier:
            assert fresh == [rounds - 1] * 32
            continue
        assert all(f + s == rounds - 1 for f, s in zip(fresh, stale))
        # each pair of neighbours ran in either order about as often (a fixed order of the threads gives each lane
        # the one outcome nearly throughout: a missing barrier would go unnoticed in one of the two orders)
        assert min(fresh + stale) >= rounds // 4, (fresh, stale)


def _run_in_subprocess(library: Path, function: str, threads: int, env: dict | None = None):
    code = (f"import ctypes\nout = (ctypes.c_int * {threads})()\nctypes.CDLL({str(library)!r}).{function}(out)\n"
            "print('returned')\n")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, **(env or {})))


def test_a_divergent_barrier_ends_the_process_with_a_message(library):
    out = _run_in_subprocess(library, "run_divergent", 32)
    assert out.returncode == 3 and "returned" not in out.stdout
    assert "never reached a barrier" in out.stderr


@pytest.mark.skipif(cuda_emulation.asan_runtime() is None, reason="g++ has no AddressSanitizer")
def test_a_read_past_shared_memory_is_an_address_sanitizer_report(tmp_path):
    library = cuda_emulation.build_emulation(SOURCE, {}, tmp_path, "emu_selftest", True)
    out = _run_in_subprocess(library, "run_past_shared", 64,
                             dict(LD_PRELOAD=cuda_emulation.asan_runtime(), ASAN_OPTIONS="detect_leaks=0"))
    if "AddressSanitizer: CHECK failed" in out.stderr:
        pytest.skip("the AddressSanitizer runtime cannot run under this Python")
    assert out.returncode != 0 and "returned" not in out.stdout
    assert "global-buffer-overflow" in out.stderr, out.stderr[-3000:]
