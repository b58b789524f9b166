#!/usr/bin/env bash
# Nsight Compute on the CUDA route op's kernels for the router shapes that the row-per-lane kernel does not take
# (the split kernel: E = 8, 256, 512, top-16), one case at a time (the op with mask, group ids and counts; the
# 4th call profiled): duration, issue and pipe use, occupancy, warp stall reasons, the executed instruction mix by
# opcode per 32 rows, and the instructions the warps stall on most (benchmarks/ncu_top_stalls.py).
# Usage: bash benchmarks/profile_route_split.sh [OUT_DIR [E,k,T ...]]   (about 1 minute a case after the build)
set -uo pipefail
export PYTHONUNBUFFERED=1
out=${1:-benchmarks/out/split}
shift || true
cases=${*:-8,2,262144 256,8,65536 512,10,65536}
mkdir -p "$out"
source "$(dirname "$0")/gpu_env.sh"
timeout 200 python3 -c "from moe_fastmask.ops import cuda_route; print(cuda_route.build())" || exit 1
ncu=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu /usr/local/cuda/bin/ncu 2>/dev/null | head -1)
[ -n "$ncu" ] || { echo "ncu not found"; exit 1; }
for case in $cases; do
    name=$(echo "$case" | tr ',' '_')
    T=${case##*,}
    echo "== $case"
    timeout 150 "$ncu" --clock-control none --kernel-name regex:route_ --launch-skip 3 --launch-count 1 \
        --section SpeedOfLight --section ComputeWorkloadAnalysis --section Occupancy --section SchedulerStats \
        --section WarpStateStats --section InstructionStats --section LaunchStats --print-details all \
        python3 benchmarks/bench_route_parts.py --profile --cases "$case" > "$out/ncu_$name.txt" 2>&1
    grep -E "route_|SM Frequency|Duration|DRAM Throughput|Compute \(SM\)|Issue Slots Busy|Executed Ipc Active|Registers Per|Achieved Occ|Theoretical Occ|Grid Size|Block Size|Stall [A-Z]" \
        "$out/ncu_$name.txt" | head -40
    timeout 150 "$ncu" --clock-control none --kernel-name regex:route_ --launch-skip 3 --launch-count 1 \
        --section SourceCounters --section WarpStateStats --page source --print-source sass --csv \
        python3 benchmarks/bench_route_parts.py --profile --cases "$case" > "$out/ncu_src_$name.csv" 2>&1
    python3 benchmarks/ncu_top_stalls.py "$out/ncu_src_$name.csv" --top 12 --reasons 2
    python3 benchmarks/ncu_top_stalls.py "$out/ncu_src_$name.csv" --opcodes --per "$(( T / 32 ))"
done
