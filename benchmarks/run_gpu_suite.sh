#!/usr/bin/env bash
# The GPU checks and benchmarks of record, in one run: CUDA tests, then the generation, analysis and training
# benchmarks at the sizes benchmarks/RESULTS.md reports.
# Usage: bash benchmarks/run_gpu_suite.sh [OUT_DIR [STAGE ...]]   stages: tests generate analyze train (default: all;
# about 1.5, 5, 5 and 1 minutes on an H100), and multi (data-parallel analysis over 1 and all GPUs of the machine;
# never a default: it wants a machine with several GPUs; MULTI_PAIRS sets its pair count, default 256), and overhead
# (host cost of patched routing in the decode loop, interleaved generate timings; about 3.5 minutes; not a default),
# engine (the static-cache CUDA-graph engine: its GPU tests, then its decode benchmark; about 5 minutes; not a default),
# analyze-engine (analyze through the engine vs one prompt at a time, and the route kernel at many groups: about 7
# minutes; not a default), and sanitize (compute-sanitizer memcheck and racecheck on the Triton routing kernels, forward and backward, with
# out-of-range group ids and validate=False: benchmarks/sanitize_route.py; a few minutes; not a default). The tests stage needs pytest; where it is missing, set PYTEST_WHEELS to a
# folder of the pytest, pluggy and iniconfig wheels. GENERATE_ARGS: extra arguments of bench_olmoe_generate.py (e.g.
# "--pin-cpu -1").
set -uo pipefail
export PYTHONUNBUFFERED=1
out=${1:-benchmarks/out}
shift || true
stages=${*:-tests generate analyze train}
want() { [[ " $stages " == *" $1 "* ]]; }
mkdir -p "$out"
nvidia-smi --query-gpu=name,driver_version --format=csv
date -u
if ! python3 -c "import moe_fastmask.kernels.route" 2>/dev/null; then
    # not installed: use the source tree with kernels/ and csrc/ placed where the package expects them
    pkg=$(mktemp -d)
    cp -r moe_fastmask "$pkg/" && cp -r kernels "$pkg/moe_fastmask/kernels" && cp -r csrc "$pkg/moe_fastmask/csrc"
    export PYTHONPATH="$pkg${PYTHONPATH:+:$PYTHONPATH}" PYTHONSAFEPATH=1
fi
if ! python3 -c "import pytest" 2>/dev/null && [ -n "${PYTEST_WHEELS:-}" ]; then
    # a machine without pytest (and without an index): install it from wheels brought along, for this run only
    site=$(mktemp -d) && python3 -m pip install -q --no-index --no-deps --target "$site" "$PYTEST_WHEELS"/*.whl \
        && export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
start=$(date +%s)
step() { echo "== $1 ($(( $(date +%s) - start )) s)"; }
if want tests && python3 -c "import pytest" 2>/dev/null; then
    step "CUDA tests"
    timeout 300 python3 -m pytest -q -p no:cacheprovider tests/test_gpu_integration.py 2>&1 | tee "$out/gpu_tests.log" | tail -5
    timeout 300 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_route_triton.py 2>&1 | tee -a "$out/gpu_tests.log" | tail -3
elif want tests; then
    echo "== CUDA tests skipped: pytest is not installed here (set PYTEST_WHEELS)"
fi
want generate && step "generation" && timeout 480 python3 benchmarks/bench_olmoe_generate.py --out "$out" ${GENERATE_ARGS:-} 2>&1 | tee "$out/generate.log" | tail -8
want analyze && step "analysis (64 pairs)" && timeout 600 python3 benchmarks/bench_analyze.py --out "$out/analyze" 2>&1 | tee "$out/analyze.log" | tail -6
want train && step "training (16 layers)" && timeout 300 python3 benchmarks/bench_train.py --out "$out/train" 2>&1 | tee "$out/train.log" | tail -6
want overhead && step "decode overhead" && timeout 420 python3 benchmarks/bench_decode_overhead.py --out "$out" 2>&1 | tee "$out/overhead.log" | tail -24
if want sanitize; then
    step "compute-sanitizer on the routing kernels (out-of-range groups, validate=False)"
    sanitizer=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
    if [ -x "$sanitizer" ]; then
        for tool in memcheck racecheck; do
            # no caching allocator: each tensor its own allocation, so an access past one is reported
            PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout 900 "$sanitizer" --tool "$tool" --error-exitcode 99 \
                python3 benchmarks/sanitize_route.py 2>&1 | tee "$out/sanitize_$tool.log" | tail -8
            echo "== compute-sanitizer --tool $tool: exit status ${PIPESTATUS[0]}"
        done
    else
        echo "== compute-sanitizer not found: the script's own checks only"
        timeout 300 python3 benchmarks/sanitize_route.py 2>&1 | tee "$out/sanitize.log" | tail -8
    fi
fi
if want engine; then
    step "generation engine (GPU tests, decode benchmark)"
    if python3 -c "import pytest" 2>/dev/null; then
        timeout 300 python3 -m pytest -q -p no:cacheprovider tests/test_generation_engine_gpu.py 2>&1 | tee "$out/engine_tests.log" | tail -5
    fi
    timeout 600 python3 benchmarks/bench_engine.py --out "$out" 2>&1 | tee "$out/engine.log" | tail -12
fi
want analyze-engine && step "analysis through the engine (2,048 pairs at 128 tokens, 1,024-token prompts, route at many groups)" \
    && timeout 480 python3 benchmarks/bench_analyze_engine.py --out "$out/analyze_engine" 2>&1 | tee "$out/analyze_engine.log" | tail -40
if want multi; then
    gpus=$(nvidia-smi -L | wc -l)
    step "data-parallel analysis (1 and $gpus GPUs, ${MULTI_PAIRS:-256} pairs)"
    timeout 580 python3 benchmarks/bench_analyze_multi_gpu.py --out "$out/multi" --gpus 1 "$gpus" \
        --pairs "${MULTI_PAIRS:-256}" 2>&1 | tee "$out/multi.log" | tail -8
fi
step "done"
