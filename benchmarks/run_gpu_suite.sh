#!/usr/bin/env bash
# The GPU checks and benchmarks of record, in one run.
# Usage: bash benchmarks/run_gpu_suite.sh [OUT_DIR [STAGE ...]]   (default stages: tests generate analyze train)
# Stages (minutes on an H200, roughly):
#   tests           CUDA tests (1.5)
#   generate        patched + recording generate vs plain (5); GENERATE_ARGS: extra arguments of bench_olmoe_generate.py
#   route           the route op against the eager and compiled chains at T = 4,096, 65,536 and 262,144, with the
#                   copy bandwidth, the CUDA kernels' section (work added step by step, the wider routers of the
#                   other families) and the families' rows (4); ROUTE_ARGS: extra arguments of bench_route.py
#   analyze         the analysis pipeline on 64 pairs (5)
#   train           the training step, plain vs masked, 16 layers (1)
#   train-liger     the masked step with our loss vs Liger-Kernel's fused linear cross entropy, then the loss alone
#                   (benchmarks/bench_loss.py) (3); LIGER_WHEELS: a folder
#                   holding the liger-kernel wheel, installed for this run only
#   overhead        host cost of patched routing in the decode loop (3.5)
#   engine          the static-cache CUDA-graph engine: its GPU tests, then its decode benchmark (5)
#   analyze-engine  analyze through the engine vs one prompt at a time, and the route kernel at many groups (7)
#   family-generate generation on a random-weight Qwen3-MoE of Qwen3-30B-A3B's size (61 GB in bf16): generate and the
#                   engine, recording on vs off, counts checked exactly (3-5; about 80 GB of GPU memory);
#                   FAMILY_GENERATE_ARGS: extra arguments, e.g. "--layers 24"
#   diag-cpp        build facts of the C++ CPU kernel and each of its argument errors in its own process (2)
#   multi           data-parallel analysis over 1 and all GPUs (a machine with several GPUs); MULTI_PAIRS (256)
#   sanitize        compute-sanitizer memcheck and racecheck on the routing kernels (benchmarks/sanitize_route.py)
# Only the defaults run without naming stages. The tests stages need pytest; where it is missing, set PYTEST_WHEELS
# to a folder of the pytest, pluggy and iniconfig wheels.
set -uo pipefail
export PYTHONUNBUFFERED=1
out=${1:-benchmarks/out}
shift || true
stages=${*:-tests generate analyze train}
want() { [[ " $stages " == *" $1 "* ]]; }
mkdir -p "$out"
source "$(dirname "$0")/gpu_env.sh"
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
want route && step "route op (benchmarks/bench_route.py)" && timeout 900 python3 benchmarks/bench_route.py --sizes 4096 65536 262144 --out "$out/route.csv" ${ROUTE_ARGS:-} 2>&1 | tee "$out/route.log" | tail -40
want generate && step "generation" && timeout 480 python3 benchmarks/bench_olmoe_generate.py --out "$out" ${GENERATE_ARGS:-} 2>&1 | tee "$out/generate.log" | tail -8
want analyze && step "analysis (64 pairs)" && timeout 600 python3 benchmarks/bench_analyze.py --out "$out/analyze" 2>&1 | tee "$out/analyze.log" | tail -6
want train && step "training (16 layers)" && timeout 300 python3 benchmarks/bench_train.py --out "$out/train" 2>&1 | tee "$out/train.log" | tail -6
if want train-liger; then
    # the masked step's loss: ours (chunked frozen-head cross entropy) vs Liger-Kernel's fused linear cross entropy;
    # liger-kernel must be importable (LIGER_WHEELS: a folder holding its wheel, installed for this run only)
    if [ -n "${LIGER_WHEELS:-}" ]; then
        site=$(mktemp -d) && python3 -m pip install -q --no-index --no-deps --target "$site" "$LIGER_WHEELS"/*.whl \
            && export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$site"
    fi
    step "training loss: ours vs Liger-Kernel (masked mode, 16 layers)"
    for impl in ours liger; do
        timeout 240 python3 benchmarks/bench_train.py --out "$out/train_$impl" --modes masked --loss-impl "$impl" 2>&1 \
            | tee "$out/train_$impl.log" | tail -4
    done
    step "the loss alone: ours vs Liger-Kernel vs plain PyTorch (OLMoE head, 2k-32k rows)"
    timeout 180 python3 benchmarks/bench_loss.py --out "$out/loss" 2>&1 | tee "$out/loss.log" | tail -12
fi
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
want family-generate && step "Qwen3-MoE generation (Qwen3-30B-A3B size), recording on vs off" \
    && timeout 420 python3 benchmarks/bench_family_generate.py --out "$out" ${FAMILY_GENERATE_ARGS:-} 2>&1 \
    | tee "$out/family_generate.log" | tail -14
want diag-cpp && step "C++ kernel: build facts and argument errors, one process each" \
    && timeout 150 python3 benchmarks/diag_cpp_errors.py 2>&1 | tee "$out/diag_cpp.log" | tail -40
step "done"
