#!/usr/bin/env bash
# The CUDA routing kernels (csrc/route_cuda.cu, csrc/route_cuda_backward.cu) on a GPU machine, in one run of about 5-7
# minutes (every step has its own time limit):
#   1. build it in a fresh cache folder and print nvcc's register / spill lines of the bf16 instances that the
#      benchmark times (split E=64 top-8, lane E=32/64/128 and the lane benchmark instances, the lane backward);
#   2. tests/test_route_cuda.py and tests/test_route_cuda_backward.py (the forward variants and the backward against
#      the reference, the loader, the fallbacks);
#   3. benchmarks/bench_route.py --only-cuda at T = 65,536 and 262,144 (E=64, top-8, bf16, 4-group mask, counts) and
#      its wider routers (E up to 512, top-k up to 16): the copy bandwidth; the op (its "cuda" provider runs the lane variant here)
#      forward and forward + backward against the dispatched Triton kernel; the split kernel with and without
#      prefetch; the lane kernel; at E=64 the lane kernel with parts of its work removed (the cost of each part);
#      the backward alone, lane and split kernels;
#   4. while time is left: compute-sanitizer memcheck, then racecheck, with the lane variant as the default (the split
#      kernel runs what the lane one does not take) on small cases with out-of-range group ids
#      (benchmarks/sanitize_route.py).
# Usage: bash benchmarks/check_route_cuda.sh [OUT_DIR]   (PYTEST_WHEELS=DIR where the machine has no pytest)
# Runs from the source tree as benchmarks/run_gpu_suite.sh does: where moe_fastmask is not installed, a package view
# (moe_fastmask + kernels -> moe_fastmask/kernels + csrc -> moe_fastmask/csrc) goes on PYTHONPATH.
set -uo pipefail
export PYTHONUNBUFFERED=1
out=${1:-benchmarks/out/cuda}
mkdir -p "$out"
source "$(dirname "$0")/gpu_env.sh"
# a fresh cache: the build runs (and logs its registers) here, and every later step loads that build
export MOE_FASTMASK_CACHE_DIR=$(mktemp -d)
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
nvcc --version | tail -2
start=$(date +%s)
step() { echo "== $1 ($(( $(date +%s) - start )) s)"; }
status=0

step "1. build (nvcc -Xptxas -v)"
timeout 150 python3 - <<'PYEOF' 2>&1 | tee "$out/build.log"
import re, time
from moe_fastmask.ops import cuda_route
t = time.time()
path = cuda_route.build()
print(f"built {path} in {time.time() - t:.1f} s; archs {cuda_route.target_archs()}")
log = cuda_route.build_log()
name, spill, shown, total = None, "", 0, 0
for line in log.splitlines():
    m = re.search(r"Compiling entry function '(\S+)' for '(\S+)'", line)
    if m:
        name = None
        k = re.search(r"route_(fwd|lane)_kernelI(\w+?)Li(\d+)ELi(\d+)E(Lb(\d))?", m.group(1))
        if k:
            total += 1
            dtype = k.group(2).lstrip("0123456789")
            if k.group(1) == "fwd" and dtype == "__nv_bfloat16" and k.group(3) == "64" and k.group(4) == "8":
                name = f"split bf16 E_PAD=64 KMAX=8 prefetch={k.group(6)} {m.group(2)}"
            elif k.group(1) == "lane" and dtype == "__nv_bfloat16":
                name = f"lane bf16 E={k.group(3)} FLAGS={k.group(4)} {m.group(2)}"
        k = re.search(r"route_bwd_lane_kernelI13__nv_bfloat16Li(\d+)ELb(\d)ELb(\d)ELb(\d)E", m.group(1))
        if k:
            total += 1
            name = (f"backward lane bf16 E={k.group(1)} mask={k.group(2)} ids8={k.group(3)} "
                    f"load_store={k.group(4)} {m.group(2)}")
    m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)
    if m and name:
        spill = f"spill stores {m.group(1)} B, loads {m.group(2)} B"
    m = re.search(r"Used (\d+) registers", line)
    if m and name:
        print(f"  {name:<45} {m.group(1):>3} registers, {spill}")
        name, shown = None, shown + 1
print(f"{total} kernel instances ({shown} shown; lane FLAGS 15 = full, 7 = without a mask, 0 / 1 / 9 / 11 = the "
      "benchmark's load_store / topk / mask_topk / mask_topk_softmax; + 16 top_k == 8, + 32 / 64 one stage / ids "
      "staged, + 128 packed 16-bit keys, + 256 two-pass softmax, + 4096 timeline stamps, + 8192 one block per SM, "
      "+ 16384 the tournament top-k: the op's at large T, and the benchmark's *_tournament steps)")
print("warnings:", [l for l in log.splitlines() if "warning" in l.lower()][:10])
PYEOF
[ "${PIPESTATUS[0]}" = 0 ] || { echo "== BUILD FAILED"; status=1; }

if python3 -c "import pytest" 2>/dev/null; then
    step "2. tests/test_route_cuda.py, tests/test_route_cuda_backward.py"
    timeout 320 python3 -m pytest -q -p no:cacheprovider tests/test_route_cuda.py tests/test_route_cuda_backward.py 2>&1 \
        | tee "$out/tests.log" | tail -25
    [ "${PIPESTATUS[0]}" = 0 ] || status=1
else
    echo "== 2. tests skipped: pytest is not installed here (set PYTEST_WHEELS)"
fi

step "3. bench: lane and split CUDA kernels vs dispatched Triton vs copy, lane ablations"
MOE_FASTMASK_CUDA_VARIANT=lane timeout 240 python3 benchmarks/bench_route.py --only-cuda --no-compile \
    --cuda-sizes 65536 262144 --out "$out/route_cuda.csv" 2>&1 \
    | tee "$out/bench.log" | tail -60
[ "${PIPESTATUS[0]}" = 0 ] || status=1

step "4. compute-sanitizer, lane variant as the default (small cases, out-of-range groups, validate=False)"
sanitizer=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
for tool in memcheck racecheck; do
    if [ $(( $(date +%s) - start )) -gt 480 ]; then
        echo "== compute-sanitizer --tool $tool skipped: out of time"
        continue
    fi
    if [ -x "$sanitizer" ]; then
        MOE_FASTMASK_CUDA_VARIANT=lane PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout 90 "$sanitizer" --tool "$tool" \
            --error-exitcode 99 python3 benchmarks/sanitize_route.py --backends cuda 2>&1 \
            | tee "$out/sanitize_$tool.log" | tail -4
        rc=${PIPESTATUS[0]}
        echo "== compute-sanitizer --tool $tool: exit status $rc"
        [ "$rc" = 0 ] || status=1
    else
        echo "== compute-sanitizer not found: the script's own checks only"
        MOE_FASTMASK_CUDA_VARIANT=lane timeout 60 python3 benchmarks/sanitize_route.py --backends cuda 2>&1 \
            | tee "$out/sanitize.log" | tail -4
        [ "${PIPESTATUS[0]}" = 0 ] || status=1
        break
    fi
done
step "done (status $status)"
exit $status
