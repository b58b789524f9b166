#!/usr/bin/env bash
# The lane CUDA routing kernel's choices on a GPU machine (about 3 minutes): benchmarks/bench_route_lane.py (grid
# policies x option sets, the loads-and-stores-only floor, a copy of the same bytes; ids, counts and weights checked
# against the reference first), then Nsight Compute on the op's default instance and on the loads-and-stores-only one
# with and without the ids staged through shared memory (T = 262,144, E=64, top-8, bf16, 4-group mask, counts):
# duration, SM clock, issue and pipe utilisation, occupancy, warp stall reasons and the executed instruction mix;
# last, the op's instance's per-instruction stall samples and the instructions its warps stall on most
# (benchmarks/ncu_top_stalls.py).
# Usage: bash benchmarks/profile_route_lane.sh [OUT_DIR]
set -uo pipefail
export PYTHONUNBUFFERED=1
out=${1:-benchmarks/out/lane}
mkdir -p "$out"
source "$(dirname "$0")/gpu_env.sh"
export MOE_FASTMASK_CACHE_DIR=$(mktemp -d)
start=$(date +%s)
step() { echo "== $1 ($(( $(date +%s) - start )) s)"; }
status=0

step "1. build"
timeout 200 python3 -c "from moe_fastmask.ops import cuda_route; print(cuda_route.build())" || status=1

step "2. sweep (bench_route_lane.py)"
timeout 240 python3 benchmarks/bench_route_lane.py --policies wave balanced --out "$out/lane_sweep.csv" 2>&1 \
    | tee "$out/lane_sweep.log"
[ "${PIPESTATUS[0]}" = 0 ] || status=1

ncu=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
for cfg in "wave:topk8+stage_ids" "wave:load_store" "wave:load_store+stage_ids"; do
    step "3. ncu $cfg"
    if [ -z "$ncu" ]; then echo "ncu not found"; break; fi
    name=$(echo "$cfg" | tr ':+' '__')
    timeout 150 "$ncu" --clock-control none --kernel-name regex:route_lane --launch-skip 3 --launch-count 1 \
        --section SpeedOfLight --section ComputeWorkloadAnalysis --section Occupancy --section SchedulerStats \
        --section WarpStateStats --section InstructionStats --section MemoryWorkloadAnalysis --section SourceCounters \
        --print-details all \
        python3 benchmarks/bench_route_lane.py --profile "$cfg" --T 262144 > "$out/ncu_$name.txt" 2>&1
    grep -E "SM Frequency|Duration|DRAM Throughput|Compute \(SM\)|Issue Slots Busy|Executed Ipc Active|Achieved Occ|highest-utilized|Stall [A-Z]|stall" \
        "$out/ncu_$name.txt" | head -40
done
step "4. ncu per-instruction stall samples, wave:topk8+stage_ids (benchmarks/ncu_top_stalls.py)"
if [ -n "$ncu" ]; then
    timeout 150 "$ncu" --clock-control none --kernel-name regex:route_lane --launch-skip 3 --launch-count 1 \
        --section SourceCounters --section WarpStateStats --page source --print-source sass --csv \
        python3 benchmarks/bench_route_lane.py --profile wave:topk8+stage_ids --T 262144 > "$out/ncu_source_wave_topk8.csv" 2>&1
    python3 benchmarks/ncu_top_stalls.py "$out/ncu_source_wave_topk8.csv" --top 12 || status=1
fi
step "done (status $status)"
exit $status
