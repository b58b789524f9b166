#!/usr/bin/env bash
# The CUDA routing kernel (csrc/route_cuda.cu) on a GPU machine, in one run of about 3-5 minutes (every step has its
# own time limit; together at most 580 s):
#   1. build it in a fresh cache folder and print nvcc's register / spill line of every kernel instance;
#   2. tests/test_route_cuda.py (the kernel against the reference, the loader, the fallbacks);
#   3. benchmarks/bench_route.py --only-cuda: the copy bandwidth, then the CUDA kernel against the dispatched Triton
#      kernel at T = 4,096 / 65,536 / 262,144 (E=64, top-8, bf16, 4-group mask, counts), forward and forward +
#      backward, and the wider routers (E up to 512, top-k up to 16);
#   4. compute-sanitizer memcheck and racecheck on the CUDA kernel (benchmarks/sanitize_route.py --backends cuda).
# Usage: bash benchmarks/check_route_cuda.sh [OUT_DIR]   (PYTEST_WHEELS=DIR where the machine has no pytest)
# Runs from the source tree as benchmarks/run_gpu_suite.sh does: where moe_fastmask is not installed, a package view
# (moe_fastmask + kernels -> moe_fastmask/kernels + csrc -> moe_fastmask/csrc) goes on PYTHONPATH.
set -uo pipefail
export PYTHONUNBUFFERED=1
out=${1:-benchmarks/out/cuda}
mkdir -p "$out"
nvidia-smi --query-gpu=name,driver_version --format=csv
date -u
if ! python3 -c "import moe_fastmask.kernels.route" 2>/dev/null; then
    pkg=$(mktemp -d)
    cp -r moe_fastmask "$pkg/" && cp -r kernels "$pkg/moe_fastmask/kernels" && cp -r csrc "$pkg/moe_fastmask/csrc"
    export PYTHONPATH="$pkg${PYTHONPATH:+:$PYTHONPATH}" PYTHONSAFEPATH=1
fi
if ! python3 -c "import pytest" 2>/dev/null && [ -n "${PYTEST_WHEELS:-}" ]; then
    site=$(mktemp -d) && python3 -m pip install -q --no-index --no-deps --target "$site" "$PYTEST_WHEELS"/*.whl \
        && export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
# a fresh cache: the build runs (and logs its registers) here, and every later step loads that build
export MOE_FASTMASK_CACHE_DIR=$(mktemp -d)
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
nvcc --version | tail -2
start=$(date +%s)
step() { echo "== $1 ($(( $(date +%s) - start )) s)"; }
status=0

step "1. build (nvcc -Xptxas -v)"
timeout 120 python3 - <<'EOF' 2>&1 | tee "$out/build.log"
import re, time
from moe_fastmask.ops import cuda_route
t = time.time()
path = cuda_route.build()
print(f"built {path} in {time.time() - t:.1f} s; archs {cuda_route.target_archs()}")
log = cuda_route.build_log()
name = None
for line in log.splitlines():
    m = re.search(r"Compiling entry function '(\S+)' for '(\S+)'", line)
    if m:
        k = re.search(r"route_fwd_kernelI(\w+?)Li(\d+)ELi(\d+)E", m.group(1))
        name = f"{k.group(1).lstrip('0123456789')} E_PAD={k.group(2)} KMAX={k.group(3)} {m.group(2)}" if k else m.group(1)
    m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)
    if m and name:
        spill = f"spill stores {m.group(1)} B, loads {m.group(2)} B"
    m = re.search(r"Used (\d+) registers", line)
    if m and name:
        print(f"  {name:<40} {m.group(1):>3} registers, {spill}")
        name = None
print("warnings:", [l for l in log.splitlines() if "warning" in l.lower()][:10])
EOF
[ "${PIPESTATUS[0]}" = 0 ] || { echo "== BUILD FAILED"; status=1; }

if python3 -c "import pytest" 2>/dev/null; then
    step "2. tests/test_route_cuda.py"
    timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_route_cuda.py 2>&1 | tee "$out/tests.log" | tail -15
    [ "${PIPESTATUS[0]}" = 0 ] || status=1
else
    echo "== 2. tests skipped: pytest is not installed here (set PYTEST_WHEELS)"
fi

step "3. bench: CUDA kernel vs dispatched Triton vs copy"
timeout 140 python3 benchmarks/bench_route.py --only-cuda --no-compile --out "$out/route_cuda.csv" 2>&1 \
    | tee "$out/bench.log" | grep -v " graph .* us " | tail -40
[ "${PIPESTATUS[0]}" = 0 ] || status=1

step "4. compute-sanitizer on the CUDA kernel (out-of-range groups, validate=False)"
sanitizer=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
if [ -x "$sanitizer" ]; then
    for tool in memcheck racecheck; do
        PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout 100 "$sanitizer" --tool "$tool" --error-exitcode 99 \
            python3 benchmarks/sanitize_route.py --backends cuda --forward-only 2>&1 | tee "$out/sanitize_$tool.log" | tail -6
        rc=${PIPESTATUS[0]}
        echo "== compute-sanitizer --tool $tool: exit status $rc"
        [ "$rc" = 0 ] || status=1
    done
else
    echo "== compute-sanitizer not found: the script's own checks only"
    timeout 100 python3 benchmarks/sanitize_route.py --backends cuda 2>&1 | tee "$out/sanitize.log" | tail -6
    [ "${PIPESTATUS[0]}" = 0 ] || status=1
fi
step "done (status $status)"
exit $status
