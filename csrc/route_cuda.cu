// CUDA forward of moe_fastmask.route (default variant: softmax over the allowed experts, top-k by masked logit,
// optional renormalisation, per-group expert counts). Torch-free: the library exports a plain C launcher that
// moe_fastmask/ops/cuda_route.py calls through ctypes with raw pointers and the caller's CUDA stream.
//
// Layout (after vLLM's topk_softmax): a row of E_PAD (power of two >= E) experts is spread over LANES lanes of one
// warp, each lane holding V = E_PAD / LANES logits in registers (16-byte vector loads when the rows allow it); a warp
// holds 32 / LANES rows and walks the rows grid-stride.
//
// Top-k on packed integer keys (one integer comparison orders by value, then by index):
//   key = ordered(logit) with the low IDX_BITS bits replaced by E_PAD - 1 - e   (allowed expert e)
//   key = E_PAD | (E_PAD - 1 - e)                                               (masked expert or padding column)
// ordered() maps float bits to an unsigned integer of the same order (-0.0 is made +0.0 first, so signed zeros
// tie), so every allowed expert (even -inf) ranks above every masked one and equal logits go to the lower index.
// 16-bit logits leave at least 13 zero low bits in their fp32 value, so a 32-bit key holds the logit exactly;
// float32 logits use 64-bit keys (logit above, index below; a negative NaN ranks as -inf).
// Each lane sorts its keys (bitonic network on registers; only the first min(K, V) are kept), then K rounds of
// a butterfly max (__shfl_xor_sync over the row's lanes) pick the winners; the lane holding the winner pops it.
// Weights: exp(z - max) / sum over the allowed experts, in fp32 (NaN when the row's allowed logits are all -inf or
// hold NaN / +inf); a chosen masked expert (fewer than K allowed, unvalidated) weighs 0.
//
// Group ids outside [0, G) act as -1 (no mask, not counted): nothing outside keep and counts is ever read or
// written. Counts go to a per-block shared-memory histogram flushed with one 64-bit atomic per touched counter, or
// (large G * E) straight to global memory.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <stdint.h>

// Launch arguments (mirrored field for field by RouteParams in moe_fastmask/ops/cuda_route.py).
struct RouteParams {
  void* weights;            // [T, k] logits' dtype, contiguous
  int64_t* ids;             // [T, k] int64, contiguous
  int64_t* counts;          // [G, E] int64, contiguous, or null
  const void* logits;       // [T, E] strided
  const uint8_t* keep;      // [G, E] bool, contiguous, or null
  const void* group;        // [T] int32 / int64, contiguous, or null
  int64_t stride_t;         // in elements
  int64_t stride_e;
  int64_t num_tokens;
  int32_t num_experts;
  int32_t num_groups;       // G: rows of keep / counts (ids outside [0, G) act as -1)
  int32_t top_k;
  int32_t renormalize;
  int32_t group_is_int64;
  int32_t vector_loads;     // 1: rows contiguous, 16-byte aligned, E == E_PAD
  int32_t shared_hist;      // 1: count into shared memory first
  int32_t prefetch;         // 1: load a warp's next rows before working on the current ones
};

namespace {

constexpr int kThreads = 256;
constexpr int kMinBlocks = 4;  // at most 64 registers: 8 warps of loads in flight per scheduler
constexpr int kMaxKeepBytes = 16 * 1024;   // shared keep bitmask limit (the Python side checks it too)
constexpr int kMaxHistBytes = 32 * 1024;   // shared histogram limit; above it counts go straight to global memory

enum DType { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };


__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

template <typename T> struct Elem;
template <> struct Elem<float> {
  using Key = unsigned long long;
  static __device__ __forceinline__ float to_float(float v) { return v; }
  static __device__ __forceinline__ void store(void* base, int64_t i, float w) { static_cast<float*>(base)[i] = w; }
};
template <> struct Elem<__half> {
  using Key = unsigned int;
  static constexpr unsigned int kLowClear = 0xFFFFE000u;  // fp16 in fp32: 13 zero low bits
  static __device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
  static __device__ __forceinline__ void store(void* base, int64_t i, float w) {
    static_cast<__half*>(base)[i] = __float2half_rn(w);
  }
};
template <> struct Elem<__nv_bfloat16> {
  using Key = unsigned int;
  static constexpr unsigned int kLowClear = 0xFFFF0000u;  // bf16 in fp32: 16 zero low bits
  static __device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
  static __device__ __forceinline__ void store(void* base, int64_t i, float w) {
    static_cast<__nv_bfloat16*>(base)[i] = __float2bfloat16_rn(w);
  }
};

// float bits -> unsigned integer of the same order
__device__ __forceinline__ unsigned int ordered_bits(float z) {
  unsigned int b = __float_as_uint(__fadd_rn(z, 0.0f));  // -0.0 + 0.0 = +0.0: signed zeros tie
  return b ^ (static_cast<unsigned int>(static_cast<int>(b) >> 31) | 0x80000000u);
}

__device__ __forceinline__ float unordered_float(unsigned int f) {
  return __uint_as_float((f & 0x80000000u) ? (f ^ 0x80000000u) : ~f);
}

constexpr unsigned int kOrderedNegInf = 0x007FFFFFu;  // ordered_bits(-inf)

template <typename T, int E_PAD> struct Keys;

// 32-bit keys for 16-bit logits
template <typename T, int E_PAD> struct Keys {
  using Key = unsigned int;
  static constexpr unsigned int kIdxMask = E_PAD - 1;
  static constexpr unsigned int kHigh = ~kIdxMask;
  static constexpr unsigned int kLowestAllowed = kOrderedNegInf & kHigh;
  static __device__ __forceinline__ Key allowed(float z, unsigned int code) { return (ordered_bits(z) & kHigh) | code; }
  static __device__ __forceinline__ Key masked(unsigned int code) { return static_cast<Key>(E_PAD) | code; }
  static __device__ __forceinline__ bool is_allowed(Key k) { return k >= kLowestAllowed; }
  static __device__ __forceinline__ int expert(Key k) { return static_cast<int>(kIdxMask - (k & kIdxMask)); }
  static __device__ __forceinline__ float logit(Key k) {
    unsigned int f = k & kHigh;
    return __uint_as_float((f & 0x80000000u) ? (f ^ 0x80000000u) : (~f & Elem<T>::kLowClear));
  }
};

// 64-bit keys for float32 logits: the ordered logit (negative NaN clamped to -inf) above, the index code below
template <int E_PAD> struct Keys<float, E_PAD> {
  using Key = unsigned long long;
  static constexpr unsigned int kIdxMask = E_PAD - 1;
  static constexpr Key kLowestAllowed = static_cast<Key>(kOrderedNegInf) << 32;
  static __device__ __forceinline__ Key allowed(float z, unsigned int code) {
    unsigned int f = max(ordered_bits(z), kOrderedNegInf);
    return (static_cast<Key>(f) << 32) | code;
  }
  static __device__ __forceinline__ Key masked(unsigned int code) { return (1ull << 32) | code; }
  static __device__ __forceinline__ bool is_allowed(Key k) { return k >= kLowestAllowed; }
  static __device__ __forceinline__ int expert(Key k) {
    return static_cast<int>(kIdxMask - (static_cast<unsigned int>(k) & kIdxMask));
  }
  static __device__ __forceinline__ float logit(Key k) { return unordered_float(static_cast<unsigned int>(k >> 32)); }
};

template <typename Key> __device__ __forceinline__ Key key_max(Key a, Key b) { return a > b ? a : b; }
template <typename Key> __device__ __forceinline__ Key key_min(Key a, Key b) { return a < b ? a : b; }

// Bitonic sort, descending, of a[OFF .. OFF + N)
template <int N, int OFF, typename Key, int SIZE>
__device__ __forceinline__ void sort_desc(Key (&a)[SIZE]) {
#pragma unroll
  for (int size = 2; size <= N; size <<= 1) {
#pragma unroll
    for (int stride = size / 2; stride > 0; stride >>= 1) {
#pragma unroll
      for (int i = 0; i < N; ++i) {
        const int j = i ^ stride;
        if (j > i) {
          const Key x = a[OFF + i], y = a[OFF + j];
          const Key hi = key_max(x, y), lo = key_min(x, y);
          const bool desc = (i & size) == 0;
          a[OFF + i] = desc ? hi : lo;
          a[OFF + j] = desc ? lo : hi;
        }
      }
    }
  }
}

// Bitonic merge, descending, of the bitonic sequence a[0 .. N)
template <int N, typename Key, int SIZE>
__device__ __forceinline__ void merge_desc(Key (&a)[SIZE]) {
#pragma unroll
  for (int stride = N / 2; stride > 0; stride >>= 1) {
#pragma unroll
    for (int i = 0; i < N; ++i) {
      const int j = i ^ stride;
      if (j > i) {
        const Key x = a[i], y = a[j];
        a[i] = key_max(x, y);
        a[j] = key_min(x, y);
      }
    }
  }
}

// a[0 .. M) = the M largest of a[0 .. V), descending (M, V powers of two, M <= V)
template <int V, int M, typename Key>
__device__ __forceinline__ void top_m(Key (&a)[V]) {
  if constexpr (M == V) {
    sort_desc<V, 0>(a);
  } else {
#pragma unroll
    for (int c = 0; c < V / M; ++c) {
      // sort chunk c (compile-time offset through a switch-free recursion on the unrolled loop)
      Key chunk[M];
#pragma unroll
      for (int i = 0; i < M; ++i) chunk[i] = a[c * M + i];
      sort_desc<M, 0>(chunk);
      if (c == 0) {
#pragma unroll
        for (int i = 0; i < M; ++i) a[i] = chunk[i];
      } else {
        // the larger half of two descending runs: a[i] vs chunk[M-1-i] gives a bitonic sequence holding the top M
#pragma unroll
        for (int i = 0; i < M; ++i) a[i] = key_max(a[i], chunk[M - 1 - i]);
        merge_desc<M>(a);
      }
    }
  }
}

template <typename Key>
__device__ __forceinline__ Key shfl_xor(Key v, int offset, int width) {
  return __shfl_xor_sync(0xffffffffu, v, offset, width);
}

template <typename T, int E_PAD, int KMAX, bool PREFETCH>
__global__ void __launch_bounds__(kThreads, kMinBlocks) route_fwd_kernel(const RouteParams p) {
  constexpr int V = (sizeof(T) == 4 ? 8 : 16) < E_PAD ? (sizeof(T) == 4 ? 8 : 16) : E_PAD;  // logits per lane
  constexpr int LANES = E_PAD / V;                                                          // lanes per row
  constexpr int ROWS_PER_WARP = 32 / LANES;
  constexpr int M = KMAX < V ? KMAX : V;               // sorted keys kept per lane
  constexpr int P = (KMAX + LANES - 1) / LANES;        // output slots per lane
  constexpr int WORDS_PER_GROUP = E_PAD >= 32 ? E_PAD / 32 : 1;
  constexpr float kLog2e = 1.4426950408889634f;
  using K = Keys<T, E_PAD>;
  using Key = typename K::Key;
  static_assert(V <= 32 && 32 % V == 0 || V == E_PAD, "a lane's keep bits must sit in one 32-bit word");
  static_assert(LANES <= 32, "a row must fit in one warp");

  extern __shared__ unsigned int smem[];
  const int E = p.num_experts;
  const int G = p.num_groups;
  const int top_k = p.top_k;
  const bool has_keep = p.keep != nullptr;
  const bool has_counts = p.counts != nullptr;
  unsigned int* keep_bits = smem;                                          // [G * WORDS_PER_GROUP] when has_keep
  unsigned int* hist = smem + (has_keep ? G * WORDS_PER_GROUP : 0);        // [G * E] when shared_hist

  // keep as bits in shared memory (one word per warp step: a coalesced byte per lane and a ballot); zeroed histogram
  if (has_keep) {
    const int warp_in_block = threadIdx.x >> 5, lane_id = threadIdx.x & 31;
    for (int w = warp_in_block; w < G * WORDS_PER_GROUP; w += kThreads / 32) {
      const int g = w / WORDS_PER_GROUP, e = (w % WORDS_PER_GROUP) * 32 + lane_id;
      const bool kept = e < E && p.keep[static_cast<int64_t>(g) * E + e] != 0;
      const unsigned int word = __ballot_sync(0xffffffffu, kept);
      if (lane_id == 0) keep_bits[w] = word;
    }
  }
  if (has_counts && p.shared_hist) {
    for (int i = threadIdx.x; i < G * E; i += blockDim.x) hist[i] = 0;
  }
  __syncthreads();

  const int lane = threadIdx.x & 31;
  const int sub = lane % LANES;                       // lane within the row
  const int row_in_warp = lane / LANES;
  const int e0 = sub * V;                             // first expert of this lane
  const unsigned int lane_code = static_cast<unsigned int>(E_PAD - 1 - e0);  // code of expert e0 + i: lane_code - i
  unsigned int valid_bits = 0;                        // experts e0 + i < E
#pragma unroll
  for (int i = 0; i < V; ++i) valid_bits |= static_cast<unsigned int>(e0 + i < E) << i;

  const int64_t warp_id = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  const int64_t num_warps = (static_cast<int64_t>(gridDim.x) * blockDim.x) >> 5;
  const T* logits = static_cast<const T*>(p.logits);

  // the lane's logits, kept packed (16-byte vectors) and widened to fp32 where used; with PREFETCH the next rows'
  // are loaded before the current ones are worked on, so that two row groups per warp are in flight
  constexpr int kVecs = (V * static_cast<int>(sizeof(T)) + 15) / 16;
  auto load_row = [&](int64_t r, uint4 (&dst)[kVecs]) {
    if (p.vector_loads && r < p.num_tokens) {
      const uint4* src = reinterpret_cast<const uint4*>(logits + r * p.stride_t + e0);
#pragma unroll
      for (int q = 0; q < kVecs; ++q) dst[q] = __ldg(src + q);
    } else {
#pragma unroll
      for (int q = 0; q < kVecs; ++q) dst[q] = make_uint4(0u, 0u, 0u, 0u);
      T* out = reinterpret_cast<T*>(dst);
#pragma unroll
      for (int i = 0; i < V; ++i) {
        if (r < p.num_tokens && e0 + i < E) out[i] = logits[r * p.stride_t + (int64_t)(e0 + i) * p.stride_e];
      }
    }
  };
  const int64_t step = num_warps * ROWS_PER_WARP;
  uint4 next[kVecs];
  if constexpr (PREFETCH) load_row(warp_id * ROWS_PER_WARP + row_in_warp, next);

  for (int64_t base = warp_id * ROWS_PER_WARP; base < p.num_tokens; base += step) {
    const int64_t row = base + row_in_warp;
    const bool row_valid = row < p.num_tokens;

    // the row's group: ids outside [0, G) act as -1 (no mask, not counted); no group tensor means group 0
    int64_t g = 0;
    if (p.group != nullptr && row_valid) {
      g = p.group_is_int64 ? static_cast<const int64_t*>(p.group)[row]
                           : static_cast<int64_t>(static_cast<const int32_t*>(p.group)[row]);
    }
    const bool in_group = row_valid && g >= 0 && g < G;

    uint4 raw[kVecs];
    if constexpr (PREFETCH) {
#pragma unroll
      for (int q = 0; q < kVecs; ++q) raw[q] = next[q];
      if (base + step < p.num_tokens) load_row(row + step, next);
    } else {
      load_row(row, raw);
    }
    const T* vals = reinterpret_cast<const T*>(raw);

    unsigned int allowed = row_valid ? valid_bits : 0u;
    if (has_keep && in_group) {
      const unsigned int word = keep_bits[g * WORDS_PER_GROUP + e0 / 32];
      allowed &= (V == 32 ? word : (word >> (e0 % 32)));
    }

    Key keys[V];
#pragma unroll
    for (int i = 0; i < V; ++i) {
      const unsigned int code = lane_code - i;
      keys[i] = ((allowed >> i) & 1u) ? K::allowed(Elem<T>::to_float(vals[i]), code) : K::masked(code);
    }
    top_m<V, M>(keys);

    // KMAX rounds (top_k of them run): butterfly max over the row's lanes; the lane holding the winner pops it
    Key picks[P];
#pragma unroll
    for (int s = 0; s < P; ++s) picks[s] = 0;
    Key first = 0;
#pragma unroll
    for (int j = 0; j < KMAX; ++j) {
      if (j >= top_k) break;
      Key best = keys[0];
#pragma unroll
      for (int off = LANES / 2; off > 0; off >>= 1) best = key_max(best, shfl_xor(best, off, LANES));
      const bool pop = keys[0] == best;
      constexpr int kLive = M;  // (entries past top_k - j are never read again)
#pragma unroll
      for (int i = 0; i + 1 < kLive; ++i) keys[i] = pop ? keys[i + 1] : keys[i];
      keys[kLive - 1] = pop ? Key(0) : keys[kLive - 1];
      if (sub == j / P) picks[j % P] = best;
      if (j == 0) first = best;
    }

    // softmax denominator over the allowed experts (NaN / +inf / all -inf rows give NaN weights)
    const float row_max = K::is_allowed(first) ? K::logit(first) : -INFINITY;
    float denom = 0.0f;
#pragma unroll
    for (int i = 0; i < V; ++i) {
      denom += ((allowed >> i) & 1u) ? fast_exp2((Elem<T>::to_float(vals[i]) - row_max) * kLog2e) : 0.0f;
    }
#pragma unroll
    for (int off = LANES / 2; off > 0; off >>= 1) denom += __shfl_xor_sync(0xffffffffu, denom, off, LANES);
    const float inv = 1.0f / denom;

    float w[P];
    float picked_sum = 0.0f;
#pragma unroll
    for (int s = 0; s < P; ++s) {
      const int j = sub * P + s;
      const Key key = picks[s];
      w[s] = K::is_allowed(key) ? fast_exp2((K::logit(key) - row_max) * kLog2e) * inv : 0.0f * inv;
      if (j < top_k) picked_sum += w[s];
    }
    if (p.renormalize) {
#pragma unroll
      for (int off = LANES / 2; off > 0; off >>= 1) picked_sum += __shfl_xor_sync(0xffffffffu, picked_sum, off, LANES);
      const float rinv = 1.0f / picked_sum;
#pragma unroll
      for (int s = 0; s < P; ++s) w[s] *= rinv;
    }

    if (row_valid) {
#pragma unroll
      for (int s = 0; s < P; ++s) {
        const int j = sub * P + s;
        if (j < top_k) {
          const int expert = min(K::expert(picks[s]), E - 1);
          const int64_t out = row * top_k + j;
          Elem<T>::store(p.weights, out, w[s]);
          p.ids[out] = expert;
          if (has_counts && in_group) {
            if (p.shared_hist) {
              atomicAdd(hist + g * E + expert, 1u);
            } else {
              atomicAdd(reinterpret_cast<unsigned long long*>(p.counts + g * E + expert), 1ull);
            }
          }
        }
      }
    }
  }

  if (has_counts && p.shared_hist) {
    __syncthreads();
    for (int i = threadIdx.x; i < G * E; i += blockDim.x) {
      const unsigned int c = hist[i];
      if (c != 0) atomicAdd(reinterpret_cast<unsigned long long*>(p.counts + i), static_cast<unsigned long long>(c));
    }
  }
}

template <typename T, int E_PAD, int KMAX, bool PREFETCH>
cudaError_t launch(const RouteParams& p, int device, cudaStream_t stream) {
  constexpr int V = (sizeof(T) == 4 ? 8 : 16) < E_PAD ? (sizeof(T) == 4 ? 8 : 16) : E_PAD;
  constexpr int ROWS_PER_BLOCK = (kThreads / 32) * (32 / (E_PAD / V));
  constexpr int WORDS_PER_GROUP = E_PAD >= 32 ? E_PAD / 32 : 1;
  auto kernel = route_fwd_kernel<T, E_PAD, KMAX, PREFETCH>;
  const size_t keep_words = p.keep ? static_cast<size_t>(p.num_groups) * WORDS_PER_GROUP : 0;
  const size_t hist_words = p.counts && p.shared_hist ? static_cast<size_t>(p.num_groups) * p.num_experts : 0;
  const size_t smem = sizeof(unsigned int) * (keep_words + hist_words);
  // one resident wave of blocks, each walking rows grid-stride (fewer when T is small)
  static int sms[64] = {0};
  static int resident[64] = {0};
  static size_t resident_smem[64] = {0};
  if (device < 0 || device >= 64) return cudaErrorInvalidDevice;
  if (sms[device] == 0) {
    cudaError_t err = cudaDeviceGetAttribute(&sms[device], cudaDevAttrMultiProcessorCount, device);
    if (err != cudaSuccess) return err;
  }
  if (resident[device] == 0 || resident_smem[device] != smem) {
    int blocks = 0;
    cudaError_t err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, kernel, kThreads, smem);
    if (err != cudaSuccess) return err;
    resident[device] = blocks > 0 ? blocks : 1;
    resident_smem[device] = smem;
  }
  const int64_t needed = (p.num_tokens + ROWS_PER_BLOCK - 1) / ROWS_PER_BLOCK;
  const int64_t wave = static_cast<int64_t>(sms[device]) * resident[device];
  const int grid = static_cast<int>(needed < wave ? needed : wave);
  if (grid <= 0) return cudaSuccess;
  kernel<<<grid, kThreads, smem, stream>>>(p);
  return cudaGetLastError();
}

template <typename T, int E_PAD, bool PREFETCH>
cudaError_t launch_k(const RouteParams& p, int device, cudaStream_t stream) {
  if (p.top_k <= 8) return launch<T, E_PAD, 8, PREFETCH>(p, device, stream);
  if constexpr (E_PAD >= 16) {
    return launch<T, E_PAD, 16, PREFETCH>(p, device, stream);
  }
  return cudaErrorInvalidValue;
}

template <typename T, int E_PAD>
cudaError_t launch_p(const RouteParams& p, int device, cudaStream_t stream) {
  return p.prefetch ? launch_k<T, E_PAD, true>(p, device, stream) : launch_k<T, E_PAD, false>(p, device, stream);
}

template <typename T>
cudaError_t launch_e(const RouteParams& p, int device, cudaStream_t stream) {
  const int e = p.num_experts;
  if (e <= 8) return launch_p<T, 8>(p, device, stream);
  if (e <= 16) return launch_p<T, 16>(p, device, stream);
  if (e <= 32) return launch_p<T, 32>(p, device, stream);
  if (e <= 64) return launch_p<T, 64>(p, device, stream);
  if (e <= 128) return launch_p<T, 128>(p, device, stream);
  if (e <= 256) return launch_p<T, 256>(p, device, stream);
  return cudaErrorInvalidValue;
}

template <typename T, int E_PAD>
cudaError_t preload_e() {
  cudaFuncAttributes attr;
  cudaError_t err = cudaFuncGetAttributes(&attr, route_fwd_kernel<T, E_PAD, 8, true>);
  if (err == cudaSuccess) err = cudaFuncGetAttributes(&attr, route_fwd_kernel<T, E_PAD, 8, false>);
  if constexpr (E_PAD >= 16) {
    if (err == cudaSuccess) err = cudaFuncGetAttributes(&attr, route_fwd_kernel<T, E_PAD, 16, true>);
    if (err == cudaSuccess) err = cudaFuncGetAttributes(&attr, route_fwd_kernel<T, E_PAD, 16, false>);
  }
  return err;
}

template <typename T>
cudaError_t preload_t() {
  cudaError_t err = preload_e<T, 8>();
  if (err == cudaSuccess) err = preload_e<T, 16>();
  if (err == cudaSuccess) err = preload_e<T, 32>();
  if (err == cudaSuccess) err = preload_e<T, 64>();
  if (err == cudaSuccess) err = preload_e<T, 128>();
  if (err == cudaSuccess) err = preload_e<T, 256>();
  return err;
}

}  // namespace

extern "C" {

// Load every kernel instance onto `device` now (lazy module loading would otherwise load each at its first launch,
// which may fall inside a CUDA graph capture). Returns 0 or a cudaError_t code.
int moe_fastmask_route_cuda_preload(int device) {
  int current = -1;
  cudaError_t err = cudaGetDevice(&current);
  if (err == cudaSuccess && current != device) err = cudaSetDevice(device);
  if (err == cudaSuccess) err = preload_t<float>();
  if (err == cudaSuccess) err = preload_t<__half>();
  if (err == cudaSuccess) err = preload_t<__nv_bfloat16>();
  return static_cast<int>(err);
}


// Largest E and top_k the kernel takes, and its shared-memory limits (bytes); the Python side sends other shapes to
// Triton.
int moe_fastmask_route_cuda_max_experts() { return 256; }
int moe_fastmask_route_cuda_max_top_k() { return 16; }
int moe_fastmask_route_cuda_max_keep_bytes() { return kMaxKeepBytes; }
int moe_fastmask_route_cuda_max_hist_bytes() { return kMaxHistBytes; }
int moe_fastmask_route_cuda_params_size() { return static_cast<int>(sizeof(RouteParams)); }

// Launch the forward on `stream` (a cudaStream_t) of `device`; dtype 0 float32, 1 float16, 2 bfloat16.
// Returns 0 or a cudaError_t code (cudaErrorInvalidValue for a shape the kernel does not take).
int moe_fastmask_route_cuda_forward(const RouteParams* params, int dtype, int device, void* stream) {
  RouteParams p = *params;
  if (p.num_tokens <= 0) return 0;
  if (p.num_experts < 1 || p.num_experts > 256 || p.top_k < 1 || p.top_k > 16 || p.top_k > p.num_experts) {
    return cudaErrorInvalidValue;
  }
  int e_pad = 8;
  while (e_pad < p.num_experts) e_pad *= 2;
  const int words = e_pad >= 32 ? e_pad / 32 : 1;  // the kernel's WORDS_PER_GROUP
  if (p.keep && static_cast<int64_t>(p.num_groups) * words * 4 > kMaxKeepBytes) return cudaErrorInvalidValue;
  if (p.counts) {
    p.shared_hist = static_cast<int64_t>(p.num_groups) * p.num_experts * 4 <= kMaxHistBytes ? 1 : 0;
  }
  int current = -1;
  cudaError_t err = cudaGetDevice(&current);
  if (err != cudaSuccess) return err;
  if (current != device) {
    err = cudaSetDevice(device);
    if (err != cudaSuccess) return err;
  }
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case kFloat32: err = launch_e<float>(p, device, s); break;
    case kFloat16: err = launch_e<__half>(p, device, s); break;
    case kBFloat16: err = launch_e<__nv_bfloat16>(p, device, s); break;
    default: err = cudaErrorInvalidValue;
  }
  return static_cast<int>(err);
}

const char* moe_fastmask_route_cuda_error_string(int code) {
  return cudaGetErrorString(static_cast<cudaError_t>(code));
}

}  // extern "C"
