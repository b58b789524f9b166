// The lane backward's memory traffic alone, in other arrangements: how close to a device copy can a kernel get that
// per 32-row tile (E = 64, bf16, top-8, one-byte ids) reads 4,096 bytes of logits, 256 of ids and 512 of grads and
// writes 4,096 bytes of gradient (280 bytes a row), with no math or with a fixed amount of it per tile?
// Swept: warps per block, tile stages per warp, blocks per SM (one resident wave, tiles grid-stride per warp), how
// tiles come in (each lane's 16-byte cp.async, as the op's kernel; or one cp.async.bulk per stream per tile, landing
// on an mbarrier) and go out (each lane's 16-byte st.global.cs from shared memory, as the op; or one cp.async.bulk
// store per tile). Standalone (no torch):
//   nvcc -O3 -std=c++17 -gencode arch=compute_90,code=sm_90 -o /tmp/bwd_traffic benchmarks/bench_bwd_traffic.cu
//   /tmp/bwd_traffic [T=262144]
#include <cuda_runtime.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>

#define CHECK(x)                                                                          \
  do {                                                                                    \
    cudaError_t e_ = (x);                                                                 \
    if (e_ != cudaSuccess) {                                                              \
      std::fprintf(stderr, "%s:%d %s: %s\n", __FILE__, __LINE__, #x, cudaGetErrorString(e_)); \
      std::exit(1);                                                                       \
    }                                                                                     \
  } while (0)

constexpr int kLogitBytes = 32 * 64 * 2, kIdsBytes = 32 * 8, kGradBytes = 32 * 8 * 2;
constexpr int kStageBytes = kLogitBytes + kIdsBytes + kGradBytes;  // 4,864
enum Load { kLaneCopies = 0, kBulkCopies = 1 };
enum Store { kLaneStores = 0, kBulkStores = 1 };

__device__ __forceinline__ unsigned smem_addr(const void* p) {
  return static_cast<unsigned>(__cvta_generic_to_shared(p));
}
__device__ __forceinline__ void cp_async16(unsigned dst, const void* src) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(dst), "l"(src) : "memory");
}
__device__ __forceinline__ void bulk_load(unsigned dst, const void* src, int bytes, unsigned bar) {
  asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];"
               ::"r"(dst), "l"(src), "r"(bytes), "r"(bar) : "memory");
}
__device__ __forceinline__ void bar_expect(unsigned bar, int bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(bar), "r"(bytes) : "memory");
}
__device__ __forceinline__ void bar_wait(unsigned bar, unsigned parity) {
  asm volatile(
      "{\n .reg .pred p;\n WAIT_%=:\n mbarrier.try_wait.parity.shared::cta.b64 p, [%0], %1;\n @!p bra WAIT_%=;\n}\n"
      ::"r"(bar), "r"(parity) : "memory");
}

// one warp's tiles t = first, first + step, ...: STAGES - 1 tiles in flight while one is worked on
template <int WARPS, int STAGES, int MIN_BLOCKS, int LOAD, int STORE>
__global__ void __launch_bounds__(WARPS * 32, MIN_BLOCKS)
traffic(const uint4* __restrict__ logits, const uint2* __restrict__ ids8, const uint4* __restrict__ grads,
        uint4* __restrict__ out, int64_t num_tiles, int work) {
  extern __shared__ __align__(128) unsigned char smem[];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  unsigned char* stages = smem + warp * STAGES * kStageBytes;
  uint64_t* bars = reinterpret_cast<uint64_t*>(smem + WARPS * STAGES * kStageBytes) + warp * STAGES;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * WARPS + warp;
  const int64_t step = static_cast<int64_t>(gridDim.x) * WARPS;
  const int64_t my_tiles = first < num_tiles ? (num_tiles - first + step - 1) / step : 0;
  if (LOAD == kBulkCopies) {
    if (lane < STAGES) asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" ::"r"(smem_addr(bars + lane)));
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
    __syncwarp();
  }
  auto issue = [&](int64_t i) {  // the warp's i-th tile into stage i % STAGES
    const int64_t t = first + i * step;
    const int b = static_cast<int>(i % STAGES);
    const unsigned dst = smem_addr(stages + b * kStageBytes);
    if (LOAD == kLaneCopies) {
#pragma unroll
      for (int q = 0; q < kLogitBytes / 512; ++q) cp_async16(dst + (q * 32 + lane) * 16, logits + t * 256 + q * 32 + lane);
      if (lane < 16) cp_async16(dst + kLogitBytes + lane * 16, ids8 + t * 32 + 2 * lane);
      cp_async16(dst + kLogitBytes + kIdsBytes + lane * 16, grads + t * 32 + lane);
    } else if (lane == 0) {
      const unsigned bar = smem_addr(bars + b);
      bar_expect(bar, kStageBytes);
      bulk_load(dst, logits + t * 256, kLogitBytes, bar);
      bulk_load(dst + kLogitBytes, ids8 + t * 32, kIdsBytes, bar);
      bulk_load(dst + kLogitBytes + kIdsBytes, grads + t * 32, kGradBytes, bar);
    }
  };
  for (int64_t i = 0; i < STAGES - 1; ++i) {
    if (i < my_tiles) issue(i);
    if (LOAD == kLaneCopies) asm volatile("cp.async.commit_group;" ::: "memory");
  }
  for (int64_t i = 0; i < my_tiles; ++i) {
    const int b = static_cast<int>(i % STAGES);
    uint4* stage = reinterpret_cast<uint4*>(stages + b * kStageBytes);
    // the stage tile i + STAGES - 1 goes to was stored at iteration i - 1: (bulk stores) wait until it was read
    if (STORE == kBulkStores && lane == 0) asm volatile("cp.async.bulk.wait_group.read 0;" ::: "memory");
    __syncwarp();
    if (i + STAGES - 1 < my_tiles) issue(i + STAGES - 1);
    if (LOAD == kLaneCopies) {
      asm volatile("cp.async.commit_group;" ::: "memory");
      asm volatile("cp.async.wait_group %0;" ::"n"(STAGES - 1) : "memory");
    } else {
      bar_wait(smem_addr(bars + b), static_cast<unsigned>((i / STAGES) & 1));
    }
    __syncwarp();
    if (work > 0) {  // a fixed amount of dependent math per lane, on the tile's first word of the lane's row
      float x = __uint_as_float(stage[lane * 8].x & 0x3FFFFFFFu);
      for (int w = 0; w < work; ++w) x = fmaf(x, 0.999f, 1e-3f);
      if (x == 1234.5f) stage[lane * 8].x = 0u;  // (never: keeps the math)
      __syncwarp();
    }
    const int64_t t = first + i * step;
    if (STORE == kLaneStores) {
#pragma unroll
      for (int q = 0; q < kLogitBytes / 512; ++q) __stcs(out + t * 256 + q * 32 + lane, stage[q * 32 + lane]);
    } else {
      asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
      __syncwarp();
      if (lane == 0) {
        asm volatile("cp.async.bulk.global.shared::cta.bulk_group [%0], [%1], %2;"
                     ::"l"(out + t * 256), "r"(smem_addr(stage)), "r"(kLogitBytes) : "memory");
        asm volatile("cp.async.bulk.commit_group;" ::: "memory");
      }
    }
  }
  if (STORE == kBulkStores && lane == 0) asm volatile("cp.async.bulk.wait_group 0;" ::: "memory");
}

struct Buffers {
  uint4 *logits, *grads, *out;
  uint2* ids8;
};

int g_sms = 0;
int64_t g_tiles = 0;
Buffers g_buf[2];
double g_copy_gbs = 0;

template <int WARPS, int STAGES, int MIN_BLOCKS, int LOAD, int STORE>
void run(int work) {
  auto kernel = traffic<WARPS, STAGES, MIN_BLOCKS, LOAD, STORE>;
  const int smem = WARPS * STAGES * (kStageBytes + 8);
  CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  int per_sm = 0;
  CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, WARPS * 32, smem));
  if (per_sm > MIN_BLOCKS) per_sm = MIN_BLOCKS;  // (the arrangement as named)
  const int blocks = g_sms * per_sm;
  auto launch = [&](int k) {
    const Buffers& b = g_buf[k & 1];
    kernel<<<blocks, WARPS * 32, smem>>>(b.logits, b.ids8, b.grads, b.out, g_tiles, work);
  };
  for (int k = 0; k < 6; ++k) launch(k);
  CHECK(cudaGetLastError());
  cudaEvent_t start, stop;
  CHECK(cudaEventCreate(&start));
  CHECK(cudaEventCreate(&stop));
  const int reps = 40;
  CHECK(cudaEventRecord(start));
  for (int k = 0; k < reps; ++k) launch(k);
  CHECK(cudaEventRecord(stop));
  CHECK(cudaEventSynchronize(stop));
  float ms = 0;
  CHECK(cudaEventElapsedTime(&ms, start, stop));
  const double us = 1e3 * ms / reps;
  const double gbs = g_tiles * 32.0 * 280 / (us * 1e-6) / 1e9;
  // the copy is right: the gradient buffer holds the logits
  uint4 probe[2];
  CHECK(cudaMemcpy(probe, g_buf[1].out + (g_tiles * 256 - 2), sizeof(probe), cudaMemcpyDeviceToHost));
  uint4 want[2];
  CHECK(cudaMemcpy(want, g_buf[1].logits + (g_tiles * 256 - 2), sizeof(want), cudaMemcpyDeviceToHost));
  const bool ok = probe[1].x == want[1].x && probe[1].w == want[1].w && probe[0].y == want[0].y;
  std::printf("warps/block %d stages %d blocks/SM %d (warps/SM %2d) loads %-5s stores %-5s work %4d: %7.2f us "
              "%5.0f GB/s %5.1f%% of copy%s\n",
              WARPS, STAGES, per_sm, per_sm * WARPS, LOAD == kLaneCopies ? "lane" : "bulk",
              STORE == kLaneStores ? "lane" : "bulk", work, us, gbs, 100 * gbs / g_copy_gbs, ok ? "" : "  WRONG");
  CHECK(cudaEventDestroy(start));
  CHECK(cudaEventDestroy(stop));
}

template <int WARPS, int STAGES, int MIN_BLOCKS>
void run_all(int work) {
  run<WARPS, STAGES, MIN_BLOCKS, kLaneCopies, kLaneStores>(work);
  run<WARPS, STAGES, MIN_BLOCKS, kBulkCopies, kLaneStores>(work);
  run<WARPS, STAGES, MIN_BLOCKS, kLaneCopies, kBulkStores>(work);
  run<WARPS, STAGES, MIN_BLOCKS, kBulkCopies, kBulkStores>(work);
}

int main(int argc, char** argv) {
  const int64_t T = argc > 1 ? std::atoll(argv[1]) : 262144;
  g_tiles = T / 32;
  CHECK(cudaDeviceGetAttribute(&g_sms, cudaDevAttrMultiProcessorCount, 0));
  for (auto& b : g_buf) {
    CHECK(cudaMalloc(&b.logits, g_tiles * kLogitBytes));
    CHECK(cudaMalloc(&b.ids8, g_tiles * kIdsBytes));
    CHECK(cudaMalloc(&b.grads, g_tiles * kGradBytes));
    CHECK(cudaMalloc(&b.out, g_tiles * kLogitBytes));
    CHECK(cudaMemset(b.logits, 0x3c, g_tiles * kLogitBytes));
    CHECK(cudaMemset(b.ids8, 1, g_tiles * kIdsBytes));
    CHECK(cudaMemset(b.grads, 2, g_tiles * kGradBytes));
  }
  CHECK(cudaMemcpy(g_buf[1].logits + 7, &g_tiles, sizeof(g_tiles), cudaMemcpyHostToDevice));  // (a probe)
  {  // the device-to-device copy of the same bytes (read + write), the reference
    const size_t n = g_tiles * kLogitBytes;
    for (int k = 0; k < 4; ++k) CHECK(cudaMemcpyAsync(g_buf[k & 1].out, g_buf[k & 1].logits, n, cudaMemcpyDeviceToDevice));
    cudaEvent_t start, stop;
    CHECK(cudaEventCreate(&start));
    CHECK(cudaEventCreate(&stop));
    CHECK(cudaEventRecord(start));
    for (int k = 0; k < 40; ++k) CHECK(cudaMemcpyAsync(g_buf[k & 1].out, g_buf[k & 1].logits, n, cudaMemcpyDeviceToDevice));
    CHECK(cudaEventRecord(stop));
    CHECK(cudaEventSynchronize(stop));
    float ms = 0;
    CHECK(cudaEventElapsedTime(&ms, start, stop));
    g_copy_gbs = 2.0 * n / (ms * 1e-3 / 40) / 1e9;
    std::printf("T=%lld: device-to-device copy of the logits: %.0f GB/s (read + write)\n", static_cast<long long>(T),
                g_copy_gbs);
  }
  const int works[] = {0, 200};
  for (int work : works) {
    run_all<2, 2, 8>(work);   // the op's arrangement: 16 warps per SM, two stages each
    run_all<1, 2, 16>(work);
    run_all<1, 2, 23>(work);
    run_all<4, 2, 5>(work);
    run_all<2, 3, 7>(work);
    run_all<1, 3, 15>(work);
    run_all<1, 4, 11>(work);
    run_all<2, 4, 5>(work);
  }
  return 0;
}
