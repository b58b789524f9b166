// CUDA forward of moe_fastmask.route (softmax over the allowed experts, top-k by masked logit, optional
// renormalisation, per-group expert counts; and the router variants: a scale, and the sigmoid router with a selection
// bias and DeepSeek-V3's group limit, see RouteParams). Torch-free: the library exports a plain C launcher that
// moe_fastmask/ops/cuda_route.py calls through ctypes with raw pointers and the caller's CUDA stream.
//
// Layout (after vLLM's topk_softmax): a row of E_PAD (power of two >= E; up to 512 for 16-bit logits, 256 for
// float32) experts is spread over LANES lanes of one warp, each lane holding V = E_PAD / LANES logits in registers
// (16-byte vector loads when the rows allow it); a warp holds 32 / LANES rows and walks the rows grid-stride.
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
// Two more kernels below: "lane" (a row per lane, 16-bit logits with E of 32, 64 or 128) and "chunk" (the sigmoid
// router, a row over 4 lanes in columns of 32 experts), each with its own layout comment.
//
// Group ids outside [0, G) act as -1 (no mask, not counted): nothing outside keep and counts is ever read or
// written. Counts go to a per-block shared-memory histogram flushed with one 64-bit atomic per touched counter, or
// (large G * E) straight to global memory. For E_PAD <= 16 (a row in one or two lanes) the top-k bound KMAX also
// takes 2 and 4; where a row sits in one lane, from KMAX 4 up, a warp's ids leave through shared memory in contiguous
// stores.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <stdint.h>

#include <type_traits>
#include <utility>

#include "route_lane16.cuh"

// Launch arguments (mirrored field for field by RouteParams in moe_fastmask/ops/cuda_route.py).
struct RouteParams {
  void* weights;            // [T, k] logits' dtype, contiguous
  int64_t* ids;             // [T, k] int64, contiguous
  int64_t* counts;          // [G, E] int64, contiguous, or null
  const void* logits;       // [T, E] strided
  const uint8_t* keep;      // [G, E] bool, contiguous, or null
  const void* group;        // [T] int32 / int64, contiguous, or null
  uint8_t* ids8;            // [T, 8] uint8, 8-byte aligned, or null: the ids once more, a byte each (for the
                            // backward; the lane kernel's full instance with top_k == 8 only)
  int64_t stride_t;         // in elements
  int64_t stride_e;
  int64_t num_tokens;
  int32_t num_experts;
  int32_t num_groups;       // G: rows of keep / counts (ids outside [0, G) act as -1)
  int32_t top_k;
  int32_t renormalize;
  int32_t group_is_int64;
  int32_t vector_loads;     // 1: rows contiguous, 16-byte aligned, E == E_PAD; 2: 16-bit rows, 8-byte aligned, E a
                            // multiple of 4 below E_PAD = 32, 64 or 128 (the lane kernel's padded rows)
  int32_t shared_hist;      // 1: count into shared memory first
  int32_t prefetch;         // 1: load a warp's next rows before working on the current ones
  int32_t variant;          // 0: a row over several lanes ("split"); 1: a row per lane ("lane", where it applies);
                            // 2: a row over 4 lanes in columns of 32 experts ("chunk", chunk_takes: the sigmoid
                            // router, and the softmax routers of 16-bit logits)
  int32_t ablation;         // benchmarking only (0 in normal use): a "lane" instance with parts of the work removed
  int32_t grid_policy;      // lane kernel: 0 a full wave of blocks, 1 balanced, 2 balanced, >= 2 tiles a warp (the op's)
  int32_t lane_options;     // benchmarking only (0 in normal use): 1 | option bits (kLaneOptions) of the lane instance
  int32_t dependent_launch; // 1: a programmatic dependent launch where the GPU has it (route_lane16.cuh's bits)
  // router variants (cuda_route.supports): the softmax's weights (renormalised or not; softmax over the chosen
  // experts comes as renormalize) times scale; or kScoringSigmoid (the split kernel, E <= 256): experts ordered by
  // sigmoid(z) + bias (bias null: none), limited to the topk_group best of n_group groups when n_group > 1
  // (DeepSeek-V3), weighing sigmoid(z), renormalised as s / (sum + 1e-20), times scale
  float scale;
  int32_t scoring;          // kScoringSoftmax or kScoringSigmoid
  int32_t n_group;          // groups of E / n_group consecutive experts (1: no group limit)
  int32_t topk_group;       // groups kept per token
  const float* bias;        // [E] float32, contiguous, or null
  float* chosen_logits;     // [T, k] float32, contiguous, or null: the chosen experts' logits (-inf where the pick is
                            // masked), for the backward (the chunk kernel's sigmoid router only)
};

namespace {

using namespace moe_fastmask_lane16;

constexpr int kThreads = 256;
constexpr int kMinBlocks = 4;  // at most 64 registers: 8 warps of loads in flight per scheduler
constexpr int kMaxKeepBytes = 16 * 1024;   // shared keep bitmask limit (the Python side checks it too)
constexpr int kMaxHistBytes = 32 * 1024;   // shared histogram limit; above it counts go straight to global memory

enum DType { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };
enum Scoring { kScoringSoftmax = 0, kScoringSigmoid = 1 };
constexpr float kSigmoidRenormEps = 1e-20f;  // DeepSeek-V3's guard: s / (sum + 1e-20)

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

__device__ __forceinline__ float fast_rcp(float x) {  // 1 ulp; subnormal inputs and results flush to zero
  float y;
  asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// sigmoid(z) = 1 / (1 + 2^(-z log2e)) in fp32: 0 at -inf, 1 at +inf. The approximate reciprocal (1 ulp) instead of
// the rounded one (a ~10-instruction subroutine) takes 11-16% off the sigmoid routers' kernel time; its argument is
// at least 1, so the flush to zero only sends a sigmoid below 2^-126 to 0, far under the weights' tolerance.
__device__ __forceinline__ float sigmoid_of(float z) {
  return fast_rcp(1.0f + fast_exp2(z * -1.4426950408889634f));
}

// the order of a float as torch.sort and topk have it: ordered_bits, with every NaN above +inf
__device__ __forceinline__ unsigned int nan_first_order(float v) { return v != v ? 0xFFFFFFFFu : ordered_bits(v); }

// The group limit's pieces: a group's score from its two largest values (as nan_first_order keys), their sum (-0.0
// as +0.0); whether group h of score order u ranks above group g of score order mine (equal scores: the lower group
// first)
__device__ __forceinline__ float group_score(unsigned int first, unsigned int second) {
  return (unordered_float(first) + unordered_float(second)) + 0.0f;
}
__device__ __forceinline__ bool ranks_above(unsigned int u, int h, unsigned int mine, int g) {
  return u > mine || (u == mine && h < g);
}

// DeepSeek-V3's group limit (reference.kept_groups) on a row's selection values sel, spread over the LANES lanes of
// its row, lane sub holding the V consecutive experts from e0 (allowed: their keep bits): the values of the experts
// outside the row's topk_group best groups become -inf. A group (E / n_group consecutive experts) scores the sum of
// its two largest values among the allowed experts (masked ones count as -inf; NaN is the largest; an exact tie for
// the largest counts twice); equal scores go to the lower group, -0.0 equal to +0.0. row_sel, row_score: E_PAD
// floats of shared scratch each, the row's own (its general form). Every lane of the warp calls it.
template <int V, int LANES>
__device__ __forceinline__ void group_limit(float (&sel)[V], unsigned int allowed, int e0, int sub, int E, int n_group,
                                            int topk_group, float* row_sel, float* row_score) {
  const int size = E / n_group;
  const int lanes_per_group = size / V;
  if (size % V == 0 && (lanes_per_group & (lanes_per_group - 1)) == 0) {
    // groups of whole lanes (DeepSeek-V3's 32 experts: 4 lanes): each lane's top 2, merged over its group's lanes
    // by shuffles, then each lane ranks its group against the others' scores (at their first lanes)
    unsigned int first = kOrderedNegInf, second = kOrderedNegInf;
#pragma unroll
    for (int i = 0; i < V; ++i) {
      const unsigned int u = ((allowed >> i) & 1u) ? nan_first_order(sel[i]) : kOrderedNegInf;
      second = max(second, min(first, u));
      first = max(first, u);
    }
    for (int off = 1; off < lanes_per_group; off <<= 1) {
      const unsigned int f = __shfl_xor_sync(0xffffffffu, first, off, LANES);
      const unsigned int s = __shfl_xor_sync(0xffffffffu, second, off, LANES);
      second = max(min(first, f), max(second, s));
      first = max(first, f);
    }
    const unsigned int mine = nan_first_order(group_score(first, second));
    const int g = e0 / size;  // (lanes past E: a group past the last, their experts masked)
    int better = 0;
    for (int h = 0; h < n_group; ++h) {
      better += ranks_above(__shfl_sync(0xffffffffu, mine, h * lanes_per_group, LANES), h, mine, g) ? 1 : 0;
    }
    if (better >= topk_group) {
#pragma unroll
      for (int i = 0; i < V; ++i) sel[i] = -INFINITY;
    }
    return;
  }
#pragma unroll
  for (int i = 0; i < V; ++i) {
    if (e0 + i < E) row_sel[e0 + i] = ((allowed >> i) & 1u) ? sel[i] : -INFINITY;
  }
  __syncwarp();
  for (int g = sub; g < n_group; g += LANES) {
    unsigned int first = kOrderedNegInf, second = kOrderedNegInf;
    int k = g % size;  // (groups start their walks at different banks)
    for (int n = 0; n < size; ++n) {
      const unsigned int u = nan_first_order(row_sel[g * size + k]);
      if (u > first) {
        second = first;
        first = u;
      } else if (u > second) {
        second = u;
      }
      k = k + 1 == size ? 0 : k + 1;
    }
    row_score[g] = group_score(first, second);
  }
  __syncwarp();
  int last = -1;
  bool kept = true;
#pragma unroll
  for (int i = 0; i < V; ++i) {
    const int e = e0 + i;
    if (e < E) {
      const int g = e / size;
      if (g != last) {  // (a lane's experts fall in one group or a few: rank each once)
        const unsigned int mine = nan_first_order(row_score[g]);
        int better = 0;
        for (int h = 0; h < n_group; ++h) better += ranks_above(nan_first_order(row_score[h]), h, mine, g) ? 1 : 0;
        kept = better < topk_group;
        last = g;
      }
      if (!kept) sel[i] = -INFINITY;
    }
  }
  __syncwarp();  // (the next step writes the scratch again)
}

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

// The split kernel's id stage starts after the keep words and the histogram, at an 8-byte boundary
__host__ __device__ __forceinline__ size_t split_stage_offset_words(size_t keep_words, size_t hist_words) {
  return (keep_words + hist_words + 1) & ~static_cast<size_t>(1);
}

// The split kernel's dynamic shared memory, in 32-bit words from its start: the keep bits (kept experts of each group
// row) and the histogram first, then the staged ids (kStageIds) and the sigmoid router's scratch (per warp: each
// row's sigmoid values; with n_group > 1 also its selection values and group scores)
struct SplitSmem {
  size_t stage, scratch, words;
};

// The split kernel's layout, for the kernel and its launcher. SIGMOID: the sigmoid router's instances, whose 64-bit
// keys (the fp32 selection value above the expert's code) take 8 experts a lane whatever the dtype
template <typename T, int E_PAD, int KMAX, bool SIGMOID = false> struct SplitShape {
  static constexpr int kPerLane = sizeof(T) == 4 || SIGMOID ? 8 : 16;
  static constexpr int V = kPerLane < E_PAD ? kPerLane : E_PAD;  // logits per lane
  static constexpr int LANES = E_PAD / V;                                                          // lanes per row
  static constexpr int ROWS_PER_WARP = 32 / LANES;
  static constexpr int WORDS_PER_GROUP = E_PAD >= 32 ? E_PAD / 32 : 1;
  // A row per lane and top-4 or more: a warp's ids go out through shared memory, so that each store instruction
  // writes 256 contiguous bytes (a lane's own top_k ids at a stride of top_k * 8 bytes made E = 16's top-4 take
  // 1.8x its top-2's time)
  static constexpr bool kStageIds = LANES == 1 && KMAX >= 4;
  static constexpr int kWarps = kThreads / 32;
  // (sigmoid) a warp's scratch, in blocks of 32 * V floats (a row's E_PAD each): the rows' sigmoid values for their
  // picks' weights, and for the group limit's general form the rows' selection values and group scores
  static __host__ __device__ int scratch_blocks(bool group_limit) { return group_limit ? 3 : 1; }
  static __host__ __device__ SplitSmem smem(size_t keep_words, size_t hist_words, bool group_limit) {
    SplitSmem s;
    s.stage = split_stage_offset_words(keep_words, hist_words);
    size_t end = kStageIds ? s.stage + 2 * static_cast<size_t>(kWarps) * 32 * KMAX : keep_words + hist_words;
    s.scratch = end;
    if (SIGMOID) end += static_cast<size_t>(kWarps) * scratch_blocks(group_limit) * 32 * V;
    s.words = end;
    return s;
  }
};

// Lets `kernel` have `smem` bytes of dynamic shared memory where that is more than it gets without asking
template <typename Kernel>
cudaError_t allow_dynamic_smem(Kernel kernel, size_t smem) {
  if (smem <= 48 * 1024) return cudaSuccess;
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
}

template <typename Key>
__device__ __forceinline__ Key shfl_xor(Key v, int offset, int width) {
  return __shfl_xor_sync(0xffffffffu, v, offset, width);
}

// The sum of a float over a row's LANES lanes, in each of them
template <int LANES>
__device__ __forceinline__ float row_sum(float v) {
#pragma unroll
  for (int off = LANES / 2; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off, LANES);
  return v;
}

// The largest 32-bit word among the lanes of the warp that offer one (the others offer 0, the least key)
__device__ __forceinline__ unsigned int warp_max(unsigned int word) { return __reduce_max_sync(0xffffffffu, word); }

// The largest key of a row spread over LANES lanes, in each of them. A row over the whole warp takes redux.sync
// (sm_80 on: one instruction a 32-bit word; for a 64-bit key the high words' maximum, then the low words' among the
// lanes holding it) instead of five steps of shuffles and maxima; two rows a warp take one such reduction each, with
// the other row's lanes offering 0 (keys are never below 0), instead of four steps
template <int LANES, typename Key>
__device__ __forceinline__ Key row_max_key(Key key) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  if constexpr (LANES == 32 || LANES == 16) {
    const bool second_row = LANES == 16 && (threadIdx.x & 16) != 0;
    // the row's maximum of a word: one reduction for the whole warp's row, one per row for two rows
    auto row_max = [&](unsigned int word) -> unsigned int {
      if constexpr (LANES == 32) {
        return warp_max(word);
      } else {
        const unsigned int first = warp_max(second_row ? 0u : word);
        const unsigned int second = warp_max(second_row ? word : 0u);
        return second_row ? second : first;
      }
    };
    if constexpr (sizeof(Key) == 8) {
      const unsigned int hi = static_cast<unsigned int>(key >> 32);
      const unsigned int top = row_max(hi);
      const unsigned int lo = row_max(hi == top ? static_cast<unsigned int>(key) : 0u);
      return (static_cast<Key>(top) << 32) | lo;
    } else {
      return row_max(key);
    }
  }
#endif
  Key best = key;
#pragma unroll
  for (int off = LANES / 2; off > 0; off >>= 1) best = key_max(best, shfl_xor(best, off, LANES));
  return best;
}

template <typename T, int E_PAD, int KMAX, bool PREFETCH, bool SIGMOID = false>
__global__ void __launch_bounds__(kThreads, kMinBlocks) route_fwd_kernel(const RouteParams p) {
  using S = SplitShape<T, E_PAD, KMAX, SIGMOID>;
  constexpr int V = S::V, LANES = S::LANES, ROWS_PER_WARP = S::ROWS_PER_WARP, WORDS_PER_GROUP = S::WORDS_PER_GROUP;
  constexpr bool kStageIds = S::kStageIds;
  constexpr int M = KMAX < V ? KMAX : V;               // sorted keys kept per lane
  constexpr int P = (KMAX + LANES - 1) / LANES;        // output slots per lane
  constexpr float kLog2e = 1.4426950408889634f;
  using K = Keys<typename std::conditional<SIGMOID, float, T>::type, E_PAD>;  // (sigmoid: fp32 selection values)
  using Key = typename K::Key;
  static_assert(V <= 32 && 32 % V == 0 || V == E_PAD, "a lane's keep bits must sit in one 32-bit word");
  static_assert(LANES <= 32, "a row must fit in one warp");

  extern __shared__ __align__(16) unsigned int smem[];
  const int E = p.num_experts;
  const int G = p.num_groups;
  const int top_k = p.top_k;
  const bool has_keep = p.keep != nullptr;
  const bool has_counts = p.counts != nullptr;
  unsigned int* keep_bits = smem;                                          // [G * WORDS_PER_GROUP] when has_keep
  unsigned int* hist = smem + (has_keep ? G * WORDS_PER_GROUP : 0);        // [G * E] when shared_hist
  const bool has_bias = SIGMOID && p.bias != nullptr;
  const bool group_limited = SIGMOID && p.n_group > 1;
  const SplitSmem layout = S::smem(has_keep ? G * WORDS_PER_GROUP : 0, has_counts && p.shared_hist ? G * E : 0,
                                   group_limited);
  int64_t* id_stage = nullptr;  // this warp's [32 * KMAX] of [warps][32 * KMAX]
  if constexpr (kStageIds) id_stage = reinterpret_cast<int64_t*>(smem + layout.stage) + (threadIdx.x >> 5) * 32 * KMAX;
  float* scratch = reinterpret_cast<float*>(smem + layout.scratch) +  // (SIGMOID) this warp's
                   (threadIdx.x >> 5) * S::scratch_blocks(group_limited) * 32 * V;
  dependent_launch_start(p.dependent_launch);  // (before any global memory access)

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
  static_assert(V < 32, "valid_bits below shifts a 32-bit word by up to V");
  // experts e0 + i < E (in closed form: the compiler recomputes it in the loop rather than hold it in a register)
  const unsigned int valid_bits = (1u << min(max(E - e0, 0), V)) - 1u;
  float lane_bias[SIGMOID ? V : 1];  // (has_bias) the selection bias of the lane's experts, the same for every row
  if constexpr (SIGMOID) {
#pragma unroll
    for (int i = 0; i < V; ++i) lane_bias[i] = has_bias && e0 + i < E ? p.bias[e0 + i] : 0.0f;
  }

  const int64_t warp_id = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  const int64_t num_warps = (static_cast<int64_t>(gridDim.x) * blockDim.x) >> 5;
  const T* logits = static_cast<const T*>(p.logits);

  // the lane's logits, kept packed (16-byte vectors) and widened to fp32 where used; with PREFETCH the next rows'
  // are loaded before the current ones are worked on, so that two row groups per warp are in flight
  constexpr int kVecs = (V * static_cast<int>(sizeof(T)) + 15) / 16;
  auto load_row = [&](int64_t r, uint4 (&dst)[kVecs]) {
    if (p.vector_loads == 1 && r < p.num_tokens) {
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
  // the row's group: ids outside [0, G) act as -1 (no mask, not counted); no group tensor means group 0. With
  // PREFETCH it is loaded with the next rows' logits (without, the wait on it at the top of each step is E = 8's
  // largest stall)
  auto load_group = [&](int64_t r) -> int64_t {
    if (p.group == nullptr || r >= p.num_tokens) return 0;
    return p.group_is_int64 ? static_cast<const int64_t*>(p.group)[r]
                            : static_cast<int64_t>(static_cast<const int32_t*>(p.group)[r]);
  };
  const int64_t step = num_warps * ROWS_PER_WARP;
  uint4 next[kVecs];
  int64_t next_g = 0;
  if constexpr (PREFETCH) {
    load_row(warp_id * ROWS_PER_WARP + row_in_warp, next);
    next_g = load_group(warp_id * ROWS_PER_WARP + row_in_warp);
  }

  for (int64_t base = warp_id * ROWS_PER_WARP; base < p.num_tokens; base += step) {
    const int64_t row = base + row_in_warp;
    const bool row_valid = row < p.num_tokens;

    uint4 raw[kVecs];
    int64_t g;
    if constexpr (PREFETCH) {
#pragma unroll
      for (int q = 0; q < kVecs; ++q) raw[q] = next[q];
      g = next_g;
      if (base + step < p.num_tokens) {
        load_row(row + step, next);
        next_g = load_group(row + step);
      }
    } else {
      load_row(row, raw);
      g = load_group(row);
    }
    const bool in_group = row_valid && g >= 0 && g < G;
    const T* vals = reinterpret_cast<const T*>(raw);

    unsigned int allowed = row_valid ? valid_bits : 0u;
    if (has_keep && in_group) {
      const unsigned int word = keep_bits[g * WORDS_PER_GROUP + e0 / 32];
      allowed &= (V == 32 ? word : (word >> (e0 % 32)));
    }

    Key keys[V];
    if constexpr (SIGMOID) {
      // the selection values sigmoid(z) + bias, NaN as the positive NaN (ranked first on every device)
      float sel[V];
      float* row_s = scratch + row_in_warp * E_PAD;  // the row's sigmoid values, for its picks' weights
#pragma unroll
      for (int i = 0; i < V; ++i) {
        const float s = sigmoid_of(Elem<T>::to_float(vals[i]));
        row_s[e0 + i] = s;
        const float v = has_bias ? s + lane_bias[i] : s;
        sel[i] = v != v ? __uint_as_float(0x7FFFFFFFu) : v;
      }
      if (group_limited) {
        float* row_sel = row_s + 32 * V;
        group_limit<V, LANES>(sel, allowed, e0, sub, E, p.n_group, p.topk_group, row_sel, row_sel + 32 * V);
      }
#pragma unroll
      for (int i = 0; i < V; ++i) {
        const unsigned int code = lane_code - i;
        keys[i] = ((allowed >> i) & 1u) ? K::allowed(sel[i], code) : K::masked(code);
      }
    } else {
#pragma unroll
      for (int i = 0; i < V; ++i) {
        const unsigned int code = lane_code - i;
        keys[i] = ((allowed >> i) & 1u) ? K::allowed(Elem<T>::to_float(vals[i]), code) : K::masked(code);
      }
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
      const Key best = row_max_key<LANES>(keys[0]);
      const bool pop = keys[0] == best;
      constexpr int kLive = M;  // (entries past top_k - j are never read again)
#pragma unroll
      for (int i = 0; i + 1 < kLive; ++i) keys[i] = pop ? keys[i + 1] : keys[i];
      keys[kLive - 1] = pop ? Key(0) : keys[kLive - 1];
      if (sub == j / P) picks[j % P] = best;
      if (j == 0) first = best;
    }

    float w[P];
    float picked_sum = 0.0f;
    if constexpr (SIGMOID) {
      // sigmoid(z) of each pick, from the row's values in shared memory (the key holds the selection value); 0 for a
      // masked pick
      __syncwarp();
      const float* row_s = scratch + row_in_warp * E_PAD;
#pragma unroll
      for (int s = 0; s < P; ++s) {
        const int j = sub * P + s;
        const Key key = picks[s];
        w[s] = row_valid && j < top_k && K::is_allowed(key) ? row_s[K::expert(key)] : 0.0f;
        picked_sum += w[s];
      }
      __syncwarp();  // (the next step writes the values again)
      if (p.renormalize) {
        const float denom = row_sum<LANES>(picked_sum) + kSigmoidRenormEps;
#pragma unroll
        for (int s = 0; s < P; ++s) w[s] = w[s] / denom;
      }
    } else {
      // softmax denominator over the allowed experts (NaN / +inf / all -inf rows give NaN weights)
      const float row_max = K::is_allowed(first) ? K::logit(first) : -INFINITY;
      float denom = 0.0f;
#pragma unroll
      for (int i = 0; i < V; ++i) {
        denom += ((allowed >> i) & 1u) ? fast_exp2((Elem<T>::to_float(vals[i]) - row_max) * kLog2e) : 0.0f;
      }
      const float inv = 1.0f / row_sum<LANES>(denom);

#pragma unroll
      for (int s = 0; s < P; ++s) {
        const int j = sub * P + s;
        const Key key = picks[s];
        w[s] = K::is_allowed(key) ? fast_exp2((K::logit(key) - row_max) * kLog2e) * inv : 0.0f * inv;
        if (j < top_k) picked_sum += w[s];
      }
      if (p.renormalize) {
        const float rinv = 1.0f / row_sum<LANES>(picked_sum);
#pragma unroll
        for (int s = 0; s < P; ++s) w[s] *= rinv;
      }
    }
#pragma unroll
    for (int s = 0; s < P; ++s) w[s] *= p.scale;  // (exact where scale is 1)

    if (row_valid) {
#pragma unroll
      for (int s = 0; s < P; ++s) {
        const int j = sub * P + s;
        if (j < top_k) {
          const int expert = min(K::expert(picks[s]), E - 1);
          const int64_t out = row * top_k + j;
          Elem<T>::store(p.weights, out, w[s]);
          if constexpr (kStageIds) {
            id_stage[row_in_warp * top_k + j] = expert;
          } else {
            p.ids[out] = expert;
          }
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
    if constexpr (kStageIds) {  // the warp's rows' ids, base * top_k onwards, 32 lanes a store
      __syncwarp();
      const int64_t left = p.num_tokens - base;
      const int n = static_cast<int>(left < 32 ? left : 32) * top_k;
      int64_t* dst = p.ids + base * top_k;
#pragma unroll
      for (int m = 0; m < KMAX; ++m) {
        const int i = m * 32 + lane;
        if (i < n) dst[i] = id_stage[i];
      }
      __syncwarp();  // (before the next step writes the stage again)
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

template <typename T, int E_PAD, int KMAX, bool PREFETCH, bool SIGMOID = false>
cudaError_t launch(const RouteParams& p, int device, cudaStream_t stream) {
  using S = SplitShape<T, E_PAD, KMAX, SIGMOID>;
  constexpr int ROWS_PER_BLOCK = (kThreads / 32) * S::ROWS_PER_WARP;
  constexpr auto kernel = route_fwd_kernel<T, E_PAD, KMAX, PREFETCH, SIGMOID>;
  const size_t keep_words = p.keep ? static_cast<size_t>(p.num_groups) * S::WORDS_PER_GROUP : 0;
  const size_t hist_words = p.counts && p.shared_hist ? static_cast<size_t>(p.num_groups) * p.num_experts : 0;
  const size_t smem = sizeof(unsigned int) *
                      S::smem(keep_words, hist_words, p.n_group > 1).words;
  // one resident wave of blocks, each walking rows grid-stride (fewer when T is small)
  int sms = 0, resident = 0;
  cudaError_t err = allow_dynamic_smem(kernel, smem);
  if (err == cudaSuccess) err = wave_shape<kernel>(device, kThreads, smem, sms, resident);
  if (err != cudaSuccess) return err;
  const int64_t needed = (p.num_tokens + ROWS_PER_BLOCK - 1) / ROWS_PER_BLOCK;
  const int grid = one_wave_grid(needed, sms, resident);
  if (grid <= 0) return cudaSuccess;
  return launch_kernel(kernel, grid, kThreads, smem, stream, device, sms, resident, p);
}

// (E_PAD <= 16 has instances for top-2 and top-4 too: with a row in one or two lanes, KMAX = 8 sorts the whole row
// and computes 8 weights for Mixtral's top-2 of 8)
template <typename T, int E_PAD, bool PREFETCH>
cudaError_t launch_k(const RouteParams& p, int device, cudaStream_t stream) {
  if constexpr (E_PAD <= 16) {
    if (p.top_k <= 2) return launch<T, E_PAD, 2, PREFETCH>(p, device, stream);
    if (p.top_k <= 4) return launch<T, E_PAD, 4, PREFETCH>(p, device, stream);
  }
  if (p.top_k <= 8) return launch<T, E_PAD, 8, PREFETCH>(p, device, stream);
  if constexpr (E_PAD >= 16) {
    return launch<T, E_PAD, 16, PREFETCH>(p, device, stream);
  }
  return cudaErrorInvalidValue;
}

// the sigmoid router's instances (cuda_route.supports: E <= 256): top-8 and top-16, without prefetch
template <typename T, int E_PAD>
cudaError_t launch_sigmoid_k(const RouteParams& p, int device, cudaStream_t stream) {
  if (p.top_k <= 8) return launch<T, E_PAD, 8, false, true>(p, device, stream);
  if constexpr (E_PAD >= 16) {
    return launch<T, E_PAD, 16, false, true>(p, device, stream);
  }
  return cudaErrorInvalidValue;
}

template <typename T, int E_PAD, bool SIGMOID>
cudaError_t launch_p(const RouteParams& p, int device, cudaStream_t stream) {
  if constexpr (SIGMOID) {
    return launch_sigmoid_k<T, E_PAD>(p, device, stream);
  } else {
    return p.prefetch ? launch_k<T, E_PAD, true>(p, device, stream) : launch_k<T, E_PAD, false>(p, device, stream);
  }
}

template <typename T, bool SIGMOID = false>
cudaError_t launch_e(const RouteParams& p, int device, cudaStream_t stream) {
  const int e = p.num_experts;
  if (e <= 8) return launch_p<T, 8, SIGMOID>(p, device, stream);
  if (e <= 16) return launch_p<T, 16, SIGMOID>(p, device, stream);
  if (e <= 32) return launch_p<T, 32, SIGMOID>(p, device, stream);
  if (e <= 64) return launch_p<T, 64, SIGMOID>(p, device, stream);
  if (e <= 128) return launch_p<T, 128, SIGMOID>(p, device, stream);
  if (e <= 256) return launch_p<T, 256, SIGMOID>(p, device, stream);
  // (a row of 512 float32 logits would need two warps; the sigmoid router's 64-bit keys take 8 experts a lane)
  if constexpr (sizeof(T) == 2 && !SIGMOID) {
    if (e <= 512) return launch_p<T, 512, false>(p, device, stream);
  }
  return cudaErrorInvalidValue;
}

template <typename T, int E_PAD>
cudaError_t preload_e() {
  cudaFuncAttributes attr;
  cudaError_t err = cudaFuncGetAttributes(&attr, route_fwd_kernel<T, E_PAD, 8, true>);
  if (err == cudaSuccess) err = cudaFuncGetAttributes(&attr, route_fwd_kernel<T, E_PAD, 8, false>);
  if constexpr (E_PAD <= 16) {
    if (err == cudaSuccess) err = cudaFuncGetAttributes(&attr, route_fwd_kernel<T, E_PAD, 2, true>);
    if (err == cudaSuccess) err = cudaFuncGetAttributes(&attr, route_fwd_kernel<T, E_PAD, 2, false>);
    if (err == cudaSuccess) err = cudaFuncGetAttributes(&attr, route_fwd_kernel<T, E_PAD, 4, true>);
    if (err == cudaSuccess) err = cudaFuncGetAttributes(&attr, route_fwd_kernel<T, E_PAD, 4, false>);
  }
  if constexpr (E_PAD >= 16) {
    if (err == cudaSuccess) err = cudaFuncGetAttributes(&attr, route_fwd_kernel<T, E_PAD, 16, true>);
    if (err == cudaSuccess) err = cudaFuncGetAttributes(&attr, route_fwd_kernel<T, E_PAD, 16, false>);
  }
  if constexpr (E_PAD <= 256) {
    if (err == cudaSuccess) err = cudaFuncGetAttributes(&attr, route_fwd_kernel<T, E_PAD, 8, false, true>);
    if constexpr (E_PAD >= 16) {
      if (err == cudaSuccess) err = cudaFuncGetAttributes(&attr, route_fwd_kernel<T, E_PAD, 16, false, true>);
    }
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
  if constexpr (sizeof(T) == 2) {
    if (err == cudaSuccess) err = preload_e<T, 512>();
  }
  return err;
}

// ---------------------------------------------------------------------------------------------------------------
// "lane" variant: one row per lane, for 16-bit logits with E = 32, 64 or 128 (contiguous rows), or E a multiple of 4
// below one of them (8-byte aligned rows, padded in shared memory: kPadRows), top_k <= 8.
//
// The split variant spends most of its instructions on integer compares, selects and shuffles, most of them on the
// half-rate ALU pipe (about 440 per 8 rows for E=64 top-8). Here each lane keeps the running top 8 of its own row
// sorted in registers and folds in one 8-expert chunk at a time: an optimal 19-comparator sort of the chunk, then
// the top 8 of the two sorted runs (8 max, then a 12-comparator bitonic merge): no shuffles, no pops, and the
// per-element key costs about 1.5 ALU operations (16-bit order transform done on packed pairs, the mask applied by
// the AND / multiply that moves the value into place).
// A warp copies its 32 rows into shared memory with cp.async (each instruction 512 contiguous bytes; the next tile is
// issued once the current one has landed, and copies while it is worked on), chunks swizzled so that the lanes' row
// reads are free of bank conflicts. The softmax denominator is summed in the same pass over the row (against the
// largest logit of its first chunk; a second pass is the fallback), so the row is read from shared memory once.
// Where the time goes (benchmarks/RESULTS.md): issue and the integer pipe. About 1,400 instructions per 32-row tile
// (Nsight Compute), 530 of them the sorting networks and about 290 the softmax's 64 exponentials; the loads and
// stores alone reach 90% of the copy bandwidth when the ids go out through shared memory (kStageIds), but the full
// kernel stays near 55%, whatever the grid or buffering.
// Keys: the 16-bit order of the logit (sign flipped for positives, all bits for negatives, after x*1+0 turns -0.0
// into +0.0 and NaN into the canonical positive NaN) above, E_PAD - 1 - e below; a masked expert has a value of 0,
// below every canonical value (the lowest, -inf, is bf16 0x007F, fp16 0x03FF; only 0xFFFF, a non-canonical NaN,
// would map to 0).
// ---------------------------------------------------------------------------------------------------------------

constexpr int kLaneTopK = 8;
constexpr unsigned int kPackedMaxMisses = 2;  // per block, see packed_misses
constexpr int kLaneStageBytes = 32 * 1024;  // shared bytes of the tiles (one or two per warp) per block
constexpr int kLaneMaxExtraBytes = 16 * 1024;  // mask table + histogram above the tiles
// FLAGS bits (every bit set in normal use; the benchmark times instances with some cleared)
constexpr int kDoTopK = 1, kDoSoftmax = 2, kDoCounts = 4, kDoMask = 8, kLaneFull = 15;
// option bits: kTopK8, the call's top_k is 8 (no run-time top_k tests); kOneStage, one tile buffer per warp (the
// next tile is copied while the warp writes its outputs) instead of two (copied while it computes), which leaves
// shared memory for twice the warps per multiprocessor
// kStageIds, a warp's int64 ids go through its (consumed) tile buffer and out as whole 512-byte lines
// kPacked16, the top-k of bf16 rows with E = 64 on two 16-bit keys per register (below); other instances ignore it
// kTwoPassSoftmax, the softmax denominator in a second pass over the row once the top-k has its maximum (the
// default sums it in the top-k's pass, see route_lane_kernel; the second pass stays as that sum's fallback)
constexpr int kTopK8 = 16, kOneStage = 32, kStageIds = 64, kPacked16 = 128, kTwoPassSoftmax = 256;
// kSmBlock (E = 64, two stages; not with kOneStage): one block of 24 warps per SM (192 KB of tiles) instead of six of
// 4, whose warps issue their second copies only once every warp's first tile has landed (at the block's barrier
// after the mask table): the warps started last on an SM otherwise wait for their first tile behind the other warps'
// later copies (benchmarks/RESULTS.md, seventh round, the timeline). Measured 15% slower (eighth round): the first
// tiles then land together, and every warp of the SM computes at once
// kTimeline: see kTimelineSlots below
// kTournament (two stages): the 32-bit keys' top 8 by a tournament instead of the sorting network: each
// chunk of 8 experts gives its largest key, and each pick (the largest key still offered) has its chunk offer its
// largest key below the pick, rebuilt from the key values that the first pass leaves in the row's place in shared
// memory (see tournament_top8). The op takes it for top-8 calls at E = 128, and at E = 64 with enough tiles
// (tournament_pays)
constexpr int kTimeline = 1 << 12, kSmBlock = 1 << 13, kTournament = 1 << 14;
// kPadRows: rows of E < E_PAD experts (E a multiple of 4, rows 8-byte aligned: p.vector_loads == 2), copied 8 bytes
// at a time with the padding zero-filled; the mask table masks the padding (every group row, and row G), so the
// instance always has the mask on. A padded expert is never picked: masked experts rank below the allowed ones and,
// among themselves, by index, so the padding (the highest indices) ranks below every real expert, and top_k <= E
constexpr int kPadRows = 1 << 15;
constexpr int kSmBlockStageBytes = 6 * kLaneStageBytes;  // (kSmBlock) the one block's tiles: six blocks' worth
constexpr int kLaneOptions =
    kTopK8 | kOneStage | kStageIds | kPacked16 | kTwoPassSoftmax | kTimeline | kSmBlock | kTournament;
// the op's choice (measured: benchmarks/RESULTS.md): two stages, ids staged. Staging the ids lifts the
// loads-and-stores-only instance from 65% to 90% of the copy bandwidth; the full kernel, bound by its instructions,
// gains 3-4% at T = 262,144 (with the one-pass softmax; it lost 2-3% before) and loses about 1% at T = 65,536. One
// stage (more warps) is slower at T = 65,536 and no faster at T = 262,144
// (kPacked16 is not the default: on logits whose rows fit its windows it is 9-11% slower than the 32-bit keys, with 4%
// fewer instructions and a fifth less integer-pipe time, and where they do not (a row's top 8 spanning zero) its
// attempts cost 28-46% more time; benchmarks/RESULTS.md, seventh round)
constexpr int kLaneDefaultOptions = kStageIds;  // (kTopK8 is added where top_k == 8)
// option bit kTimeline (benchmarking only; with kTopK8 and kStageIds alone: the op's instance otherwise): lane 0 of
// each warp writes into the buffer that moe_fastmask_route_cuda_set_timeline gave ([warps, kTimelineSlots]) its SM,
// the global timer (ns) and the SM's cycle counter where the warp starts and ends, and the cycle counter where each
// of its first kTimelineTiles tiles has landed in shared memory, has its weights, and is written out. Slots per
// warp: 0 SM, 1 / 2 start (ns / cycles), 3 / 4 end of the tile loop (ns / cycles), 5 tiles done, 6 cycles at the
// end of the kernel (after the histogram's flush), 8 + 3 i + (0, 1, 2) tile i's three points (cycles)
constexpr int kTimelineSlots = 32, kTimelineTiles = 8;
__device__ uint64_t* timeline_buffer = nullptr;
__device__ int64_t timeline_warps = 0;

__device__ __forceinline__ unsigned int sign_halves(unsigned int w) {  // 0xFFFF in each half whose sign bit is set
  unsigned int d;
  asm("prmt.b32 %0, %1, 0, 0xBB99;" : "=r"(d) : "r"(w));
  return d;
}

// a 16-bit order (sign_halves' transform: x ^ 0x8000 for positives, ~x for negatives) back to its value
template <typename L>
__device__ __forceinline__ float unordered16(unsigned int v) {
  return L::from_bits(v ^ ((v & 0x8000u) ? 0x8000u : 0xFFFFu));
}

// the value of a 32-bit key (its 16-bit order above, the expert's code below): unordered16(key >> 16); for bf16 the
// order is undone in place, in the float's high half (the XOR mask from the key's top bit, the code's bits cleared)
template <typename L>
__device__ __forceinline__ float key_value(unsigned int key) {
  if constexpr (std::is_same<L, Lane16<__nv_bfloat16>>::value) {
    const unsigned int flip = ~static_cast<unsigned int>(static_cast<int>(key) >> 31) | 0x80000000u;
    return __uint_as_float((key ^ flip) & 0xFFFF0000u);
  } else {
    return unordered16<L>(key >> 16);
  }
}

// Keys of a network: one 32-bit key per register (Key32), or two 16-bit keys per register ordered independently
// (Key16x2, the packed top-k below)
struct Key32 {
  static __device__ __forceinline__ unsigned int hi(unsigned int a, unsigned int b) { return max(a, b); }
  static __device__ __forceinline__ unsigned int lo(unsigned int a, unsigned int b) { return min(a, b); }
};
struct Key16x2 {
  static __device__ __forceinline__ unsigned int hi(unsigned int a, unsigned int b) { return __vmaxu2(a, b); }
  static __device__ __forceinline__ unsigned int lo(unsigned int a, unsigned int b) { return __vminu2(a, b); }
};

template <typename K>
__device__ __forceinline__ void cas(unsigned int& a, unsigned int& b) {  // a = max, b = min
  const unsigned int x = a, y = b;
  a = K::hi(x, y);
  b = K::lo(x, y);
}

// The compare-exchange of a network (a = max, b = min): both by K's min / max (MinMaxExchange), or, for 32-bit keys,
// the min as (a + b) - max (exact modulo 2^32) by two IMADs (ImadMinExchange): the networks keep the integer (ALU)
// pipe, which takes min / max, the busiest, while the IMAD pipe has room (benchmarks/RESULTS.md, eleventh round: the
// merges' clean-ups this way, about 1% faster). one and neg_one are 1 and -1 known only at run time, so that the
// compiler keeps the multiply-adds rather than turning them back into integer adds on the ALU pipe.
template <typename K> struct MinMaxExchange {
  __device__ __forceinline__ void operator()(unsigned int& a, unsigned int& b) const { cas<K>(a, b); }
};
struct ImadMinExchange {
  unsigned int one, neg_one;
  __device__ __forceinline__ void operator()(unsigned int& a, unsigned int& b) const {
    const unsigned int x = a, y = b;
    const unsigned int sum = x * one + y;
    a = max(x, y);
    b = a * neg_one + sum;
  }
};

// Batcher's odd-even merge sort of 8, descending (19 comparators); x: its compare-exchange (W: the keys' word, 32 bits
// but for the chunk kernel's 64-bit keys)
template <typename K, typename X = MinMaxExchange<K>, typename W = unsigned int>
__device__ __forceinline__ void sort8_desc(W (&k)[8], const X& x = X{}) {
  x(k[0], k[1]); x(k[2], k[3]); x(k[4], k[5]); x(k[6], k[7]);
  x(k[0], k[2]); x(k[1], k[3]); x(k[4], k[6]); x(k[5], k[7]);
  x(k[1], k[2]); x(k[5], k[6]);
  x(k[0], k[4]); x(k[1], k[5]); x(k[2], k[6]); x(k[3], k[7]);
  x(k[2], k[4]); x(k[3], k[5]);
  x(k[1], k[2]); x(k[3], k[4]); x(k[5], k[6]);
}

// a bitonic sequence, sorted; x: its compare-exchange
template <typename K, typename X = MinMaxExchange<K>, typename W = unsigned int>
__device__ __forceinline__ void bitonic_clean8_desc(W (&t)[8], const X& x = X{}) {
  x(t[0], t[4]); x(t[1], t[5]); x(t[2], t[6]); x(t[3], t[7]);
  x(t[0], t[2]); x(t[1], t[3]); x(t[4], t[6]); x(t[5], t[7]);
  x(t[0], t[1]); x(t[2], t[3]); x(t[4], t[5]); x(t[6], t[7]);
}

// top = the 8 largest of top and c (both sorted descending), sorted descending; x: the clean-up's compare-exchange
template <typename K, typename X = MinMaxExchange<K>>
__device__ __forceinline__ void merge8_desc(unsigned int (&top)[8], const unsigned int (&c)[8], const X& x = X{}) {
#pragma unroll
  for (int i = 0; i < 8; ++i) top[i] = K::hi(top[i], c[7 - i]);  // a bitonic sequence holding the top 8
  bitonic_clean8_desc<K>(top, x);
}

__device__ __forceinline__ unsigned int max8(const unsigned int (&k)[8]) {
  return max(max(max(k[0], k[1]), max(k[2], k[3])), max(max(k[4], k[5]), max(k[6], k[7])));
}

// The smallest of v[LO .. LO + N), as a tree of three-input minima (VIMNMX3), so that its depth is log3 N rather than N
template <int LO, int N, int SIZE>
__device__ __forceinline__ unsigned int min_tree(const unsigned int (&v)[SIZE]) {
  static_assert(N >= 1 && LO + N <= SIZE, "a range inside the array");
  if constexpr (N == 1) {
    return v[LO];
  } else if constexpr (N == 2) {
    return min(v[LO], v[LO + 1]);
  } else {
    constexpr int A = (N + 2) / 3, B = (N - A + 1) / 2;
    return min(min(min_tree<LO, A>(v), min_tree<LO + A, B>(v)), min_tree<LO + A + B, N - A - B>(v));
  }
}

// The top 8 of a row's 32-bit keys (distinct: each holds its expert's code E_PAD - 1 - e) by a tournament, in place
// of the sorting network and its merges. chunk_max[c] is the largest key of chunk c (experts 8c .. 8c + 7), and the
// row's 16-byte slot swizzle(lane, c) = c ^ slot_of_last ^ (NC - 1) holds that chunk's key values as pairs (expert
// 8c + 2j in the low half of word j, 8c + 2j + 1 in the high half: the keys' upper halves, 0 where masked). Each chunk
// offers its largest key not yet picked; a pick is the largest offer, and the picked chunk then offers its largest key
// below that pick (its keys are picked in order, so every key above that one is a pick). So each pick is the next key
// in order: the network's top[] exactly.
// The other chunks' offers, two ways (tournament_top8 below):
// - sorted runners-up (NC = 8): only as many of them as there are picks left, sorted: first the chunk maxima by a
//   sorting network (the largest is pick 0), then after each pick w the chunk's new offer x goes in: the next pick is
//   max(runner_up[0], x), and the runners-up after it are max(runner_up[i + 1], min(runner_up[i], x)), each one
//   independent of the others (1-2% faster than keeping every offer at E = 64, on an H200, bf16 and fp16);
// - every offer kept (NC = 16, where sorting the 16 maxima made it 1-3% slower at E = 128):
//   the chunk maxima and each pick's chunk offer, the next pick the largest of them below w (the older offers above
//   it are picks themselves), their minimum gap below w (see below) a tree taken while the chunk's 16 bytes load.
// The chunk's largest key below w is taken without a compare: w - 1 - k, modulo 2^32, is at most w - 1 where k < w and
// above it where k >= w, so w - 1 - min(w - 1, w - 1 - k, ...) is the largest key below w (0, below every pick, where
// none is; a pick is never key 0, the smallest of at least 32). The subtractions are multiply-adds by neg_one (-1
// known at run time only), on the multiply-add pipe; the minima stay on the integer pipe. A chunk's keys are rebuilt
// with the codes 7 - k, its own code bits (code & ~7 = w & (E_PAD - 8)) taken off w instead.
// The picks run one after another, so each pick's path is kept short: the load's address is three instructions off w
// (the slot's byte offset is ((2 w) & (2 x code bits)) ^ (16 slot_of_last): the chunk's code bits are 8 x ((NC - 1) -
// c)), each high key is one PRMT (the word's high half above a code byte held in a register), and the chunk's minimum
// is a tree of three-input minima.
//
// chunk_gap<NC>: (w - 1) - (the largest key below w of the chunk that holds w), 0 .. w - 1
template <int NC>
__device__ __forceinline__ unsigned int chunk_gap(unsigned int w, const unsigned char* row_bytes,
                                                  unsigned int slot_offset, unsigned int hi_codes,
                                                  unsigned int neg_one) {
  constexpr unsigned int kChunkCode = (NC - 1) * 8;  // the code bits that name the chunk
  const unsigned int below = w - 1, chunk_code = w & kChunkCode;
  const uint4 v = *reinterpret_cast<const uint4*>(row_bytes + ((chunk_code * 2) ^ slot_offset));
  const unsigned int words[4] = {v.x, v.y, v.z, v.w};
  const unsigned int below_local = below - chunk_code;
  unsigned int gaps[9];
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const unsigned int key_lo = words[j] * 0x10000u + (7u - 2 * j);           // (the low half shifted up)
    const unsigned int key_hi = __byte_perm(words[j], hi_codes, 0x3274 + j);  // (the high half above code byte j)
    gaps[2 * j] = key_lo * neg_one + below_local;
    gaps[2 * j + 1] = key_hi * neg_one + below_local;
  }
  gaps[8] = below;  // (key 0)
  return min_tree<0, 9>(gaps);
}

// Pick I (1 .. 7) of tournament_top8 with sorted runners-up: w, the pick before it, becomes pick I; runner_up[0 ..
// 8 - I) are the other chunks' largest offers, descending, and become the 7 - I largest offers other than pick I
template <int NC, int I>
__device__ __forceinline__ void tournament_pick(unsigned int (&runner_up)[7], unsigned int& w, unsigned int (&top)[8],
                                                const unsigned char* row_bytes, unsigned int slot_offset,
                                                unsigned int hi_codes, unsigned int neg_one) {
  const unsigned int below = w - 1;
  const unsigned int offer = chunk_gap<NC>(w, row_bytes, slot_offset, hi_codes, neg_one) * neg_one + below;
  w = max(runner_up[0], offer);
  top[I] = w;
#pragma unroll
  for (int i = 0; i < 7 - I; ++i) runner_up[i] = max(runner_up[i + 1], min(runner_up[i], offer));
}

// Pick I (1 .. 7) of tournament_top8 with every offer kept: offers[0 .. NC + I - 1) are the offers so far, and the
// picked chunk's offer is appended
template <int NC, int I>
__device__ __forceinline__ void tournament_pick(unsigned int (&offers)[NC + 7], unsigned int& w, unsigned int (&top)[8],
                                                const unsigned char* row_bytes, unsigned int slot_offset,
                                                unsigned int hi_codes, unsigned int neg_one) {
  constexpr int kOffers = NC + I - 1;
  const unsigned int below = w - 1;
  // the older offers' gaps below w, and their minimum (independent of the chunk's load)
  unsigned int old_gaps[kOffers];
#pragma unroll
  for (int o = 0; o < kOffers; ++o) old_gaps[o] = offers[o] * neg_one + below;
  const unsigned int old_gap = min_tree<0, kOffers>(old_gaps);
  const unsigned int gap = chunk_gap<NC>(w, row_bytes, slot_offset, hi_codes, neg_one);
  offers[kOffers] = gap * neg_one + below;
  w = min(gap, old_gap) * neg_one + below;  // the largest offer below w
  top[I] = w;
}

template <int NC, int... I, typename Offers>
__device__ __forceinline__ void tournament_picks(std::integer_sequence<int, I...>, Offers& offers, unsigned int& w,
                                                 unsigned int (&top)[8], const unsigned char* row_bytes,
                                                 unsigned int slot_offset, unsigned int hi_codes,
                                                 unsigned int neg_one) {
  (tournament_pick<NC, I + 1>(offers, w, top, row_bytes, slot_offset, hi_codes, neg_one), ...);
}

template <int NC>
__device__ __forceinline__ void tournament_top8(const unsigned int (&chunk_max)[NC], unsigned int (&top)[8],
                                                const uint4* row, int slot_of_last, unsigned int neg_one) {
  static_assert(NC == 8 || NC == 16, "the tournament takes rows of 64 or 128 experts");
  // the high keys' codes 6 - 2j in byte j (and a 0 in byte 3): a run-time value, so that each key stays one PRMT
  const unsigned int hi_codes = 0x00020406u * (0u - neg_one);
  const unsigned char* row_bytes = reinterpret_cast<const unsigned char*>(row);
  const unsigned int slot_offset = static_cast<unsigned int>(slot_of_last) * 16;
  unsigned int w;
  if constexpr (NC == 8) {
    unsigned int best[8];  // the chunk maxima, descending
#pragma unroll
    for (int c = 0; c < 8; ++c) best[c] = chunk_max[c];
    sort8_desc<Key32>(best);
    w = best[0];
    top[0] = w;
    unsigned int runner_up[7];
#pragma unroll
    for (int i = 0; i < 7; ++i) runner_up[i] = best[i + 1];
    tournament_picks<NC>(std::make_integer_sequence<int, 7>{}, runner_up, w, top, row_bytes, slot_offset, hi_codes,
                         neg_one);
  } else {
    unsigned int offers[NC + 7];  // the chunks' maxima, then each pick's chunk's offer
#pragma unroll
    for (int c = 0; c < NC; ++c) offers[c] = chunk_max[c];
    w = offers[0];
#pragma unroll
    for (int c = 1; c < NC; ++c) w = max(w, offers[c]);
    top[0] = w;
    tournament_picks<NC>(std::make_integer_sequence<int, 7>{}, offers, w, top, row_bytes, slot_offset, hi_codes,
                         neg_one);
  }
}

// Packed top-k: two 16-bit keys per register, one comparison instruction ordering both (the min / max of 16-bit
// pairs run on the integer pipe at the rate of 32-bit ones, so a network costs half as many instructions per key).
// A 16-bit key cannot hold a bf16 value and the expert index, so it holds the value's offset in a window of
// kWindow = 2^(16 - log2 E) - 1 order steps below the row's largest value (1023 steps, 8 binades, at E = 64) above
// the index code: key = (max(u, base) - base) << log2 E | (E - 1 - e), u the value's order (a row with a positive
// largest value: x ^ 0x8000, so that its negatives and masked experts fall to u < 0x8000 <= base; one with a
// negative largest value: ~x). Keys of one register's two halves (experts 2i and 2i + 1) go through the same
// network, giving the top 8 of the even and of the odd experts; a last merge joins them. Exact wherever the 8th pick
// lies inside the window (offset > 0): then every pick is an allowed expert ranked by its exact value, and
// everything below the window (offset 0) ranks below the picks. A warp whose rows are not all exact (the row's 8th
// largest value 8 binades or more below its largest, a top 8 spanning zero, fewer than 8 allowed experts, NaN)
// redoes its top-k with the 32-bit keys.
__device__ __forceinline__ unsigned int bf16x2_max_nan(unsigned int a, unsigned int b) {  // NaN if either is NaN
  unsigned int d;
  asm("max.NaN.bf16x2 %0, %1, %2;" : "=r"(d) : "r"(a), "r"(b));
  return d;
}

// The packed top-k (see above) of a lane's bf16 row of 64 experts (NC = 8 chunks) in shared memory, my_keep its
// group's keep words: true, with top[] holding the picks as the 32-bit keys of route_lane_kernel, where every row of
// the warp fits its window (a lane with row_valid false counts as fitting); false, top[] untouched, otherwise. Every
// lane of the warp calls it. With kSum it also sums the one-pass softmax denominator of route_lane_kernel in the
// same pass (sum_exp, neg_ref; written only on success), against the row's largest logit, which it has at hand.
// A row whose largest logit is negative takes its window among the negative values (order ~x instead of x ^ 0x8000,
// chosen per row by one XOR mask), so that only a top 8 that spans zero (or one wider than the window, or NaN, or
// fewer than 8 allowed) sends the warp to the 32-bit keys.
template <int NC, bool kMask, bool kSum>
__device__ __forceinline__ bool packed_top8(const uint4* my_row, const uint4* my_keep, int lane, bool row_valid,
                                            unsigned int (&top)[8], float (&sum_exp)[2], float& neg_ref) {
  constexpr int E_PAD = NC * 8;
  static_assert(E_PAD == 64, "the packed top-k's window and codes are sized for 64 experts");
  constexpr int kCodeBits = 6;
  constexpr unsigned int kWindow = (1u << (16 - kCodeBits)) - 1;
  constexpr float kLog2e = 1.4426950408889634f;
  // the window's top: the row's largest logit (masked experts too: a top above the allowed ones only narrows the
  // window), NaN-propagating so that a row holding a NaN is sent to the 32-bit keys
  unsigned int x_max = 0xFF80FF80u;
#pragma unroll 2
  for (int c = 0; c < NC; ++c) {  // (two chunks at a time, so that the loads do not take all the registers)
    const uint4 raw = lds128(my_row + swizzle<NC>(lane, c));
    x_max = bf16x2_max_nan(bf16x2_max_nan(raw.x, raw.y), bf16x2_max_nan(x_max, bf16x2_max_nan(raw.z, raw.w)));
  }
  const unsigned int top_x = bf16x2_max_nan(x_max, __byte_perm(x_max, 0, 0x1032)) & 0xFFFFu;
  const bool nan_row = (top_x & 0x7FFFu) > 0x7F80u;
  // u: each value's order, 0 for a masked expert. A row with a positive (or zero) top: x ^ 0x8000, so that the
  // negatives and -0.0 land below 0x8000 <= base; a row with a negative top (no zero or positive value in it): ~x
  const bool negative_top = (top_x & 0x8000u) != 0 && (top_x & 0x7FFFu) != 0;
  const unsigned int flip = negative_top ? 0xFFFFFFFFu : 0x80008000u;
  const unsigned int top_u = (top_x ^ flip) & 0xFFFFu;
  const unsigned int base = max(top_u, (negative_top ? 0u : 0x8000u) + kWindow) - kWindow;
  const unsigned int base2 = base * 0x10001u;
  const float row_neg_ref = -(__uint_as_float(top_x << 16) * kLog2e);
  // keys of experts 16q .. 16q + 15 (8 registers), sorted per half. Per half, the key is
  // (max(u, base) - base) * 2^kCodeBits + code; in 32-bit arithmetic modulo 2^32 the packed pair's is
  // max(u, base) * 2^kCodeBits + (codes - base * 2^kCodeBits): one multiply-add (the halves' offsets are exact, so
  // the product's carries between halves cancel)
  const unsigned int key_bias = 0u - base2 * (1u << kCodeBits);
  float s0 = 0.0f, s1 = 0.0f;
  auto sorted_keys = [&](int q, unsigned int (&keys)[8]) {
    const uint4 raw0 = lds128(my_row + swizzle<NC>(lane, 2 * q)), raw1 = lds128(my_row + swizzle<NC>(lane, 2 * q + 1));
    uint4 kept0 = make_uint4(0xFFFFFFFFu, 0xFFFFFFFFu, 0xFFFFFFFFu, 0xFFFFFFFFu), kept1 = kept0;
    if constexpr (kMask) {
      kept0 = lds128(my_keep + 2 * q);
      kept1 = lds128(my_keep + 2 * q + 1);
    }
    const unsigned int w[8] = {raw0.x, raw0.y, raw0.z, raw0.w, raw1.x, raw1.y, raw1.z, raw1.w};
    const unsigned int k[8] = {kept0.x, kept0.y, kept0.z, kept0.w, kept1.x, kept1.y, kept1.z, kept1.w};
    const unsigned int q_bias = key_bias - static_cast<unsigned int>(q) * (16u * 0x10001u);  // codes of step q
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      const unsigned int code2 = (E_PAD - 1 - 2 * j) | ((E_PAD - 2 - 2 * j) << 16);  // experts 2j, 2j + 1
      keys[j] = Key16x2::hi((w[j] ^ flip) & k[j], base2) * (1u << kCodeBits) + (q_bias + code2);
      if constexpr (kSum) {  // the pair with a masked half as -inf (one LOP3)
        const unsigned int m = kMask ? (w[j] & k[j]) | (~k[j] & 0xFF80FF80u) : w[j];
        s0 += fast_exp2(fmaf(__uint_as_float(m << 16), kLog2e, row_neg_ref));
        s1 += fast_exp2(fmaf(__uint_as_float(m & 0xFFFF0000u), kLog2e, row_neg_ref));
      }
    }
    sort8_desc<Key16x2>(keys);
  };
  unsigned int run[8];
  sorted_keys(0, run);
#pragma unroll
  for (int q = 1; q < NC / 2; ++q) {
    unsigned int keys[8];
    sorted_keys(q, keys);
    merge8_desc<Key16x2>(run, keys);
  }
  // the even experts' top 8 (low halves) against the odd experts' (high halves, reversed): a bitonic sequence in the
  // low halves holding the row's top 8
  unsigned int fin[8];
#pragma unroll
  for (int i = 0; i < 8; ++i) fin[i] = Key16x2::hi(run[i], __byte_perm(run[7 - i], 0, 0x1032));
  bitonic_clean8_desc<Key16x2>(fin);
  const bool fits = !row_valid || ((fin[7] & 0xFFFFu) >= (1u << kCodeBits) && !nan_row);
  if (!__all_sync(0xffffffffu, fits)) return false;
#pragma unroll
  for (int i = 0; i < 8; ++i) {  // back to the 32-bit key: order above, code below
    const unsigned int k16 = fin[i] & 0xFFFFu;
    top[i] = (((k16 >> kCodeBits) + base) << 16) | (k16 & (E_PAD - 1));
  }
  if constexpr (kSum) {
    sum_exp[0] = s0;
    sum_exp[1] = s1;
    neg_ref = row_neg_ref;
  }
  return true;
}

__device__ __forceinline__ uint64_t global_ns() {
  uint64_t t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}
__device__ __forceinline__ uint32_t sm_id() {
  uint32_t id;
  asm volatile("mov.u32 %0, %%smid;" : "=r"(id));
  return id;
}

template <int E_PAD, int FLAGS> struct LaneShape {
  static constexpr int NC = E_PAD / 8;                           // 16-byte chunks per row
  static constexpr int kStages = (FLAGS & kOneStage) ? 1 : 2;    // tile buffers per warp
  static constexpr int kTileBytes = 32 * E_PAD * 2;              // one tile: 32 rows
  static constexpr bool kOneBlockPerSm = (FLAGS & kSmBlock) != 0 && E_PAD == 64 && kStages == 2;
  static constexpr int kStageBytes = kOneBlockPerSm ? kSmBlockStageBytes : kLaneStageBytes;  // (the tiles)
  static constexpr int kWarps = kStageBytes / (kStages * kTileBytes);  // warps per block
  static constexpr int kMaskStride = NC * 2 + 1;  // 16-byte units per group row of the mask table (2 pairs each)
  static constexpr int kKeepStride = NC + 1;      // 16-byte units per group row of the packed top-k's keep words
  // resident blocks per SM where shared memory allows it (the register cap follows): two stages 20-24 warps (at most
  // 102 / 85 registers), one stage 32 warps at E = 32 / 64 (at most 64 registers), 16 at E = 128 (at most 128)
  static constexpr int kMinBlocks =
      kOneBlockPerSm ? 1 : kStages == 2 ? (E_PAD >= 128 ? 4 : E_PAD == 64 ? ((FLAGS & kTournament) ? 6 : 5) : 3)
                                        : (E_PAD == 32 ? 2 : 4);
  static_assert(kWarps * 32 <= 1024, "a block of at most 1024 threads");
};

template <typename T, int E_PAD, int FLAGS>
__global__ void __launch_bounds__(LaneShape<E_PAD, FLAGS>::kWarps * 32, LaneShape<E_PAD, FLAGS>::kMinBlocks)
route_lane_kernel(const RouteParams p) {
  using S = LaneShape<E_PAD, FLAGS>;
  using L = Lane16<T>;
  constexpr int NC = S::NC;
  constexpr bool kTopK = (FLAGS & kDoTopK) != 0, kSoftmax = (FLAGS & kDoSoftmax) != 0;
  constexpr bool kCounts = (FLAGS & kDoCounts) != 0, kMask = (FLAGS & kDoMask) != 0;
  constexpr bool kK8 = (FLAGS & kTopK8) != 0, kTwoStages = S::kStages == 2, kStaged = (FLAGS & kStageIds) != 0;
  constexpr bool kPacked = kTopK && (FLAGS & kPacked16) != 0 && std::is_same<T, __nv_bfloat16>::value && E_PAD == 64;
  constexpr bool kOnePassSoftmax = kTopK && kSoftmax && (FLAGS & kTwoPassSoftmax) == 0;
  constexpr bool kTourn = kTopK && (FLAGS & kTournament) != 0 && !kPacked;
  constexpr float kLog2e = 1.4426950408889634f;
  extern __shared__ __align__(16) unsigned char lane_smem[];

  constexpr bool kPad = (FLAGS & kPadRows) != 0;
  static_assert(!kPad || (kMask && !kPacked && !kTourn), "padded rows: the mask on, the 32-bit keys' network");
  const int E = p.num_experts;  // == E_PAD, or (kPad) less
  const unsigned int run_time_one = static_cast<unsigned int>(E + E_PAD - 1) / E_PAD;  // 1, known at run time only
  const ImadMinExchange imad_min{run_time_one, 0u - run_time_one};          // (the 32-bit keys' merges)
  const int G = p.num_groups;
  const int top_k = kK8 ? 8 : p.top_k;
  const int64_t T_rows = p.num_tokens;
  const bool has_counts = kCounts && p.counts != nullptr;
  const bool shared_hist = has_counts && p.shared_hist;
  const bool vector_out = top_k == kLaneTopK &&
                          ((reinterpret_cast<uintptr_t>(p.ids) | reinterpret_cast<uintptr_t>(p.weights)) & 15) == 0;
  // shared: tiles [kWarps][2][kTileBytes], mask table [(G + 1) * kMaskStride] uint4 (row G: nothing masked; an
  // entry per expert pair, see below; 16 padding bytes per row spread the rows over the banks), for the packed
  // top-k its keep words [(G + 1) * kKeepStride] uint4 (0xFFFF per kept half of an expert pair), histogram [G * E]
  unsigned char* tiles = lane_smem;
  uint4* mask_table = reinterpret_cast<uint4*>(lane_smem + S::kStageBytes);
  // (kPad without a keep mask: the table's one row masks the padding, whatever the row's group)
  const int mask_groups = kPad && p.keep == nullptr ? 0 : G;
  const size_t mask_bytes = kMask ? static_cast<size_t>(mask_groups + 1) * S::kMaskStride * 16 : 0;
  const size_t keep_word_bytes = kMask && kPacked ? static_cast<size_t>(G + 1) * S::kKeepStride * 16 : 0;
  uint4* keep_words = reinterpret_cast<uint4*>(lane_smem + S::kStageBytes + mask_bytes);
  unsigned int* hist = reinterpret_cast<unsigned int*>(lane_smem + S::kStageBytes + mask_bytes + keep_word_bytes);
  // misses of the packed top-k in this block (a warp whose rows do not all fit their windows); after
  // kPackedMaxMisses the block's warps go straight to the 32-bit keys, so that logits that never fit cost little
  __shared__ unsigned int packed_misses;
  if (kPacked && threadIdx.x == 0) packed_misses = 0;

  const int lane = threadIdx.x & 31;
  const int warp_in_block = threadIdx.x >> 5;
  const int64_t num_tiles = (T_rows + 31) / 32;
  const int64_t num_warps = static_cast<int64_t>(gridDim.x) * S::kWarps;
  int64_t tile = static_cast<int64_t>(blockIdx.x) * S::kWarps + warp_in_block;
  unsigned char* my_tiles = tiles + warp_in_block * S::kStages * S::kTileBytes;
  const unsigned int my_tiles_s = static_cast<unsigned int>(__cvta_generic_to_shared(my_tiles));
  const T* logits = static_cast<const T*>(p.logits);
  if (shared_hist) {
    for (int i = threadIdx.x; i < G * E; i += blockDim.x) hist[i] = 0;
  }
  dependent_launch_start(p.dependent_launch);  // (before any global memory access: the kernel before may write them)
  // (the timeline instance) this warp's stamps, written by lane 0
  constexpr bool kStamps = (FLAGS & kTimeline) != 0;
  uint64_t* stamps = nullptr;
  if constexpr (kStamps) {
    if (timeline_buffer != nullptr && tile < timeline_warps && lane == 0) {
      stamps = timeline_buffer + tile * kTimelineSlots;
    }
  }
  // (the reads are volatile: read() is called only in the timeline instance)
  auto stamp = [&](int slot, auto read) {
    if constexpr (kStamps) {
      if (stamps != nullptr) stamps[slot] = read();
    }
  };
  const auto cycles = [] { return static_cast<uint64_t>(clock64()); };
  int tiles_done = 0;
  stamp(0, [] { return static_cast<uint64_t>(sm_id()); });
  stamp(1, global_ns);
  stamp(2, cycles);

  // a lane's copies q = 0, 1, ... move chunk lane % NC of rows lane / NC + q * kRowsPerCopy; their shared offsets
  // repeat with period kPeriod in q (beside the whole rows skipped), so a full tile's copy needs no index arithmetic
  constexpr int kRowsPerCopy = 32 / NC, kCopies = S::kTileBytes / 512;
  constexpr int kPeriod = NC >= 8 ? 8 / kRowsPerCopy : 1;
  const int copy_row = lane / NC, copy_chunk = lane % NC;
  unsigned int copy_dst[kPeriod];
#pragma unroll
  for (int q = 0; q < kPeriod; ++q) {
    const int r = copy_row + q * kRowsPerCopy;
    copy_dst[q] = my_tiles_s + (r * NC + swizzle<NC>(r, copy_chunk)) * 16;
  }
  // bytes between a lane's consecutive copies (fits 32 bits: the host sends larger strides to the split kernel)
  const unsigned int copy_step = static_cast<unsigned int>(p.stride_t) * (kRowsPerCopy * 2);
  // copy tile t into buffer b and commit it: instruction q moves 512 contiguous bytes of the tile (row r, chunk c
  // per lane)
  auto issue = [&](int64_t t, int b) {
    const unsigned char* src = reinterpret_cast<const unsigned char*>(logits + (t * 32 + copy_row) * p.stride_t) +
                               copy_chunk * 16;
    if constexpr (kPad) {
      // 8 bytes (4 experts) a copy: unit h of row r, the units from E / 4 on (the padding) zero-filled
      constexpr int kUnits = E_PAD / 4;
#pragma unroll
      for (int q = 0; q < kUnits; ++q) {
        const int u = q * 32 + lane, r = u / kUnits, h = u % kUnits;
        const int64_t row = t * 32 + r;
        const bool ok = row < T_rows && h * 4 < E;
        const T* src_q = logits + (ok ? row * p.stride_t + h * 4 : 0);
        cp_async8(my_tiles_s + b * S::kTileBytes + (r * NC + swizzle<NC>(r, h / 2)) * 16 + (h % 2) * 8, src_q,
                  ok ? 8 : 0);
      }
    } else if ((t + 1) * 32 <= T_rows) {  // (warp-uniform) every row exists
#pragma unroll
      for (int q = 0; q < kCopies; ++q) {
        cp_async16(copy_dst[q % kPeriod] + b * S::kTileBytes + (q / kPeriod) * kPeriod * kRowsPerCopy * NC * 16,
                   src + static_cast<uint64_t>(q) * copy_step, 16);
      }
    } else {
#pragma unroll
      for (int q = 0; q < kCopies; ++q) {
        const int u = q * 32 + lane, r = u / NC, c = u % NC;
        const int64_t row = t * 32 + r;
        const bool ok = row < T_rows;
        const T* src_q = logits + (ok ? row : 0) * p.stride_t + c * 8;
        cp_async16(my_tiles_s + b * S::kTileBytes + (r * NC + swizzle<NC>(r, c)) * 16, src_q, ok ? 16 : 0);
      }
    }
    cp_async_commit();
  };
  // the group id of the lane's row in tile t (group_id_words: loaded a tile ahead, checked where used)
  auto load_group = [&](int64_t t, unsigned int& lo, unsigned int& hi) {
    group_id_words(p.group, p.group_is_int64, t * 32 + lane, T_rows, lo, hi);
  };

  // the first tile's group ids and copy go out before the mask table is built (its loads from keep, and the block's
  // barrier, would otherwise delay every warp's first copy by a global-memory latency)
  unsigned int g_lo = 0xFFFFFFFFu, g_hi = 0;
  if (tile < num_tiles) load_group(tile, g_lo, g_hi);
  if (tile < num_tiles) issue(tile, 0);

  if constexpr (kMask) {
    // an entry per expert pair (mask_entry: a masked key's value becomes 0, a masked logit -inf)
    fill_mask_table(reinterpret_cast<uint2*>(mask_table), S::kMaskStride * 2, p.keep, E, mask_groups);
    if constexpr (kPacked) {
      for (int i = threadIdx.x; i < (G + 1) * S::kKeepStride * 4; i += blockDim.x) {
        bool lo_kept, hi_kept;
        pair_kept(p.keep, E, G, i / (S::kKeepStride * 4), i % (S::kKeepStride * 4), lo_kept, hi_kept);
        reinterpret_cast<unsigned int*>(keep_words)[i] = (lo_kept ? 0xFFFFu : 0u) | (hi_kept ? 0xFFFF0000u : 0u);
      }
      __syncthreads();
      // each row's padding word: whether the group keeps at least 8 experts (its rows can fit their windows)
      for (int g = threadIdx.x; g <= G; g += blockDim.x) {
        const unsigned int* words = reinterpret_cast<const unsigned int*>(keep_words + g * S::kKeepStride);
        int kept_bits = 0;
        for (int i = 0; i < NC * 4; ++i) kept_bits += __popc(words[i]);
        reinterpret_cast<unsigned int*>(keep_words + g * S::kKeepStride + NC)[0] = kept_bits >= 8 * 16 ? 1u : 0u;
      }
    }
  }
  if constexpr (S::kOneBlockPerSm) cp_async_wait_all();  // (past the barrier, every warp's first tile has landed)
  __syncthreads();

  // (kStaged) staged ids: 16-byte slot q (row q / 4) of the warp's 2 KB of ids sits at q ^ ((q >> 3) & 3) of the tile
  // buffer, so that 8 lanes writing their rows' slots i, and 8 lanes reading consecutive slots, hit 8 bank groups. A
  // lane writes q = 4 lane + i, at 4 lane + (i ^ ((lane >> 1) & 3)), and reads q = 32 j + lane, at 32 j + (lane ^
  // ((lane >> 3) & 3)): offsets fixed per lane
  const int stage_write_swizzle = (lane >> 1) & 3, stage_read_slot = lane ^ ((lane >> 3) & 3);

  int buf = 0;
  for (; tile < num_tiles; tile += num_warps, buf ^= (kTwoStages ? 1 : 0)) {
    const int64_t next = tile + num_warps;
    // this tile first, then the next one's copy (issued only once this one has landed, so that at the start, when
    // every warp waits, the first tiles are not queued behind the second ones)
    cp_async_wait_all();
    __syncwarp();
    if (tiles_done < kTimelineTiles) stamp(8 + 3 * tiles_done, cycles);
    if (kTwoStages && next < num_tiles) issue(next, buf ^ 1);
    // the group row (G: no mask, not counted), an int32 or int64 id in [0, G)
    const int gi = g_hi == 0 && g_lo < static_cast<unsigned int>(G) ? static_cast<int>(g_lo) : G;
    if (next < num_tiles) load_group(next, g_lo, g_hi);

    const int64_t row = tile * 32 + lane;
    const bool row_valid = row < T_rows;
    uint4* my_row = reinterpret_cast<uint4*>(my_tiles + buf * S::kTileBytes) + lane * NC;
    const uint4* my_mask = mask_table + (kPad && mask_groups == 0 ? 0 : gi) * S::kMaskStride;

    unsigned int top[8];
    bool top_done = false;
    // one-pass softmax denominator (kOnePassSoftmax): sum_exp = sum of 2^(z log2e - ref) over the allowed experts,
    // summed while the top-k reads the row, with ref = fl(R log2e), R the largest logit (masked or not) of the row's
    // first chunk (the packed top-k: of the whole row): every term and every weight take the same ref, so it cancels
    // from the weights, and each exponent is one FMA rounded once. It holds where no term overflowed and the largest
    // did not underflow (checked below; a warp with a row outside falls back to the second pass)
    float sum_exp0 = 0.0f, sum_exp1 = 0.0f, neg_ref = 0.0f;
    bool one_pass = false;
    if constexpr (kPacked) {
      // (a vote makes the decision warp-uniform: another warp may add a miss while this one reads). A group row
      // that keeps fewer than 8 experts never fits: its warps go straight to the 32-bit keys
      const uint4* my_keep = keep_words + gi * S::kKeepStride;
      const bool enough_kept = !kMask || reinterpret_cast<const unsigned int*>(my_keep + NC)[0] != 0;
      if (__all_sync(0xffffffffu, enough_kept &&
                                      *static_cast<volatile unsigned int*>(&packed_misses) < kPackedMaxMisses)) {
        float sums[2];
        top_done = packed_top8<NC, kMask, kOnePassSoftmax>(my_row, my_keep, lane, row_valid, top, sums, neg_ref);
        if (top_done) {
          sum_exp0 = sums[0];
          sum_exp1 = sums[1];
          one_pass = kOnePassSoftmax;
        } else if (lane == 0) {
          atomicAdd(&packed_misses, 1u);
        }
      }
    }
    if (kTopK && !top_done) {
      unsigned int chunk_max[kTourn ? NC : 1];  // (kTourn) the largest key of each chunk of 8 experts
#pragma unroll
      for (int c = 0; c < NC; ++c) {
        const uint4 raw = my_row[swizzle<NC>(lane, c)];
        const unsigned int w[4] = {raw.x, raw.y, raw.z, raw.w};
        uint2 m[4];  // the chunk's mask-table entries (kMask)
#pragma unroll
        for (int j = 0; j < 4; ++j) m[j] = kMask ? reinterpret_cast<const uint2*>(my_mask + c * 2)[j] : uint2{};
        unsigned int keys[8];
        unsigned int o_max = 0;
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const unsigned int x = L::canon(w[j]);
          const unsigned int o = x ^ (sign_halves(x) | 0x80008000u);  // unsigned order per half
          const unsigned int e_lo = c * 8 + 2 * j;
          const unsigned int code_lo = E_PAD - 1 - e_lo, code_hi = E_PAD - 2 - e_lo;
          if constexpr (kMask) {  // a masked expert's value is 0
            keys[2 * j] = o * m[j].y + code_lo;
            keys[2 * j + 1] = (o & m[j].x) | code_hi;
          } else {
            keys[2 * j] = (o << 16) | code_lo;
            keys[2 * j + 1] = (o & 0xFFFF0000u) | code_hi;
          }
          if constexpr (kOnePassSoftmax) {
            if (c == 0) o_max = j == 0 ? o : __vmaxu2(o_max, o);
            if (c == 0 && j == 3) {
              neg_ref = -(unordered16<L>(max(o_max >> 16, o_max & 0xFFFFu)) * kLog2e);
            }
          }
        }
        if constexpr (kOnePassSoftmax) {
#pragma unroll
          for (int j = 0; j < 4; ++j) {  // (after the key loop: chunk 0's keys give the reference)
            const float2 f = pair_floats<L, kMask>(w[j], m[j]);
            sum_exp0 += fast_exp2(fmaf(f.x, kLog2e, neg_ref));
            sum_exp1 += fast_exp2(fmaf(f.y, kLog2e, neg_ref));
          }
        }
        if constexpr (kTourn) {
          chunk_max[c] = max8(keys);
          // the chunk's keys' values (masked: 0) back in its place of the row, a pair per word, for its later offers
          my_row[swizzle<NC>(lane, c)] =
              make_uint4(__byte_perm(keys[0], keys[1], 0x7632), __byte_perm(keys[2], keys[3], 0x7632),
                         __byte_perm(keys[4], keys[5], 0x7632), __byte_perm(keys[6], keys[7], 0x7632));
        } else {
          sort8_desc<Key32>(keys);
          if (c == 0) {
#pragma unroll
            for (int i = 0; i < 8; ++i) top[i] = keys[i];
          } else {
            merge8_desc<Key32>(top, keys, imad_min);
          }
        }
      }
      if constexpr (kTourn) {
        tournament_top8<NC>(chunk_max, top, my_row, swizzle<NC>(lane, NC - 1), imad_min.neg_one);
      }
      one_pass = kOnePassSoftmax;
    } else if (!kTopK) {  // (benchmark instances) the first 8 experts, unsorted, as picks
      const uint4 raw = my_row[swizzle<NC>(lane, 0)];
      const unsigned int w[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const unsigned int o = w[j] ^ (sign_halves(w[j]) | 0x80008000u);
        top[2 * j] = (o << 16) | static_cast<unsigned int>(E_PAD - 1 - 2 * j);
        top[2 * j + 1] = (o & 0xFFFF0000u) | static_cast<unsigned int>(E_PAD - 2 - 2 * j);
      }
    }

    // the picks' logits (a key's value back to the 16-bit pattern); allowed: above the masked keys (value 0)
    constexpr unsigned int kLowestAllowed = 0x00010000u;
    float z[8];
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      z[i] = key_value<L>(top[i]);
    }
    const float row_max = top[0] >= kLowestAllowed ? z[0] : -INFINITY;

    float inv = 1.0f;
    if (one_pass) {
      // (2^-60, 2^100]: the largest term did not underflow, none overflowed (inf) or was NaN (an allowed NaN, or a
      // masked inf or NaN: both sums' NaN or inf fail it too), and the reciprocal stays a normal number
      const float sum = sum_exp0 + sum_exp1;
      one_pass = __all_sync(0xffffffffu, !row_valid || (sum > 0x1p-60f && sum <= 0x1p100f));
      inv = fast_rcp(sum);
    }
    if (kSoftmax && !one_pass) {
      // sum of exp(z - max) over the allowed experts: a masked one reads as -inf. The exponent is one FMA,
      // z * log2e - max * log2e, which is off by the rounding of max * log2e (at most 2^-24 |max| log2e: 2.2e-5 at
      // |max| = 256, a relative 1.5e-5 on every weight), unless some row of the warp has a finite |max| > 256: then
      // (z - max) * log2e, as in the split kernel (exact up to the exponential's own rounding; the same NaN and -inf
      // cases)
      float d0 = 0.0f, d1 = 0.0f;
      const bool wide = __any_sync(0xffffffffu, fabsf(row_max) > 256.0f && fabsf(row_max) != INFINITY);
      auto sum_exp = [&](auto one_fma) {
        constexpr bool kOneFma = decltype(one_fma)::value;
        const float neg_max_log2e = -row_max * kLog2e;
#pragma unroll 2
        for (int c = 0; c < NC; ++c) {  // (two chunks at a time: the loads of all of them would not fit the registers)
          const uint4 raw = lds128(my_row + swizzle<NC>(lane, c));
          unsigned int w[4] = {raw.x, raw.y, raw.z, raw.w};
          // (kTourn) the row holds its keys' values: back to the logits' bits, canonical; a masked expert's 0 gives
          // NaN bits, which its mask-table entry makes -inf
          if constexpr (kTourn) {
#pragma unroll
            for (int j = 0; j < 4; ++j) w[j] ^= sign_halves(~w[j]) | 0x80008000u;
          }
          uint4 m[2] = {};  // (kMask: the chunk's mask-table entries)
          if constexpr (kMask) {
            m[0] = lds128(my_mask + c * 2);
            m[1] = lds128(my_mask + c * 2 + 1);
          }
#pragma unroll
          for (int j = 0; j < 4; ++j) {
            const uint2 entry = j % 2 ? make_uint2(m[j / 2].z, m[j / 2].w) : make_uint2(m[j / 2].x, m[j / 2].y);
            const float2 f = pair_floats<L, kMask>(w[j], entry);
            if constexpr (kOneFma) {
              d0 += fast_exp2(fmaf(f.x, kLog2e, neg_max_log2e));
              d1 += fast_exp2(fmaf(f.y, kLog2e, neg_max_log2e));
            } else {
              d0 += fast_exp2((f.x - row_max) * kLog2e);
              d1 += fast_exp2((f.y - row_max) * kLog2e);
            }
          }
        }
      };
      if (wide) {
        sum_exp(std::false_type{});
      } else {
        sum_exp(std::true_type{});
      }
      inv = fast_rcp(d0 + d1);
    }
    if (tiles_done < kTimelineTiles) stamp(9 + 3 * tiles_done, cycles);
    __syncwarp();  // every lane is done with this buffer before it is refilled
    if (!kTwoStages && !kStaged && next < num_tiles) issue(next, 0);  // (copied while the outputs are written)

    float wts[8];
    // one exponential per pick either way: 2^(z log2e - ref) (the one-pass form), or 2^((z - max) log2e) (the second
    // pass's exact form, as fma(z - max, log2e, 0): the product rounded once, as a multiply would)
    const float weight_ref = one_pass ? neg_ref : 0.0f;
    if (!p.renormalize) inv *= p.scale;  // (the weights' factor: exact where it is 1)
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      if constexpr (kSoftmax) {
        const float e = fast_exp2(fmaf(one_pass ? z[i] : z[i] - row_max, kLog2e, weight_ref));
        wts[i] = top[i] >= kLowestAllowed ? e * inv : 0.0f * inv;
      } else {
        wts[i] = z[i];
      }
    }
    if (kSoftmax && p.renormalize) {  // (the sum only here: most calls do not renormalise)
      float picked_sum = 0.0f;
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        if (i < top_k) picked_sum += wts[i];
      }
      const float rinv = fast_rcp(picked_sum) * p.scale;
#pragma unroll
      for (int i = 0; i < 8; ++i) wts[i] *= rinv;
    }

    uint4* stage = reinterpret_cast<uint4*>(my_tiles + buf * S::kTileBytes);  // (kStaged: the ids, see above)
    if (row_valid) {
      int64_t* ids_out = p.ids + row * top_k;
      unsigned short* w_out = static_cast<unsigned short*>(p.weights) + row * top_k;
      int expert[8];
#pragma unroll
      for (int i = 0; i < 8; ++i) expert[i] = E_PAD - 1 - static_cast<int>(top[i] & (E_PAD - 1));
      if (vector_out) {  // 64 + 16 bytes, 16-byte aligned
        if constexpr (kStaged) {
#pragma unroll
          for (int i = 0; i < 4; ++i) {
            stage[lane * 4 + (i ^ stage_write_swizzle)] = make_uint4(static_cast<unsigned int>(expert[2 * i]), 0u,
                                                                     static_cast<unsigned int>(expert[2 * i + 1]), 0u);
          }
        } else {
          longlong2* ids2 = reinterpret_cast<longlong2*>(ids_out);
#pragma unroll
          for (int i = 0; i < 4; ++i) ids2[i] = make_longlong2(expert[2 * i], expert[2 * i + 1]);
        }
        unsigned int pk[4];
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          pk[i] = L::pack(wts[2 * i], wts[2 * i + 1]);
        }
        *reinterpret_cast<uint4*>(w_out) = make_uint4(pk[0], pk[1], pk[2], pk[3]);
      } else {
#pragma unroll
        for (int i = 0; i < 8; ++i) {
          if (i < top_k) {
            ids_out[i] = expert[i];
            w_out[i] = L::to_bits(wts[i]);
          }
        }
      }
      if (p.ids8 != nullptr) {  // (top_k == 8, checked by the launcher)
        unsigned int lo = 0, hi = 0;
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          lo |= static_cast<unsigned int>(expert[i]) << (8 * i);
          hi |= static_cast<unsigned int>(expert[4 + i]) << (8 * i);
        }
        *reinterpret_cast<uint2*>(p.ids8 + row * 8) = make_uint2(lo, hi);
      }
      if (has_counts && gi < G) {  // (the branch outside the picks' loop, so that the compiler keeps it there)
        if (shared_hist) {
          unsigned int* const hist_row = hist + gi * E;
#pragma unroll
          for (int i = 0; i < 8; ++i) {
            if (i < top_k) atomicAdd(hist_row + expert[i], 1u);
          }
        } else {
          unsigned long long* const counts_row =
              reinterpret_cast<unsigned long long*>(p.counts + static_cast<int64_t>(gi) * E);
#pragma unroll
          for (int i = 0; i < 8; ++i) {
            if (i < top_k) atomicAdd(counts_row + expert[i], 1ull);
          }
        }
      }
    }
    if constexpr (kStaged) {
      if (vector_out) {
        __syncwarp();
        uint4* ids_out = reinterpret_cast<uint4*>(p.ids + tile * 32 * 8) + lane;  // slot q = 32 j + lane of the tile's
        const uint4* staged = stage + stage_read_slot;
        if ((tile + 1) * 32 <= T_rows) {  // (warp-uniform) every row exists
#pragma unroll
          for (int j = 0; j < 4; ++j) ids_out[j * 32] = staged[j * 32];
        } else {
          const int64_t rows_left = T_rows - tile * 32;
#pragma unroll
          for (int j = 0; j < 4; ++j) {
            if (j * 8 + lane / 4 < rows_left) ids_out[j * 32] = staged[j * 32];
          }
        }
      }
      __syncwarp();  // the buffer is free again
      if (!kTwoStages && next < num_tiles) issue(next, 0);
    }
    if (tiles_done < kTimelineTiles) stamp(10 + 3 * tiles_done, cycles);
    ++tiles_done;
  }
  stamp(3, global_ns);
  stamp(4, cycles);
  stamp(5, [&] { return static_cast<uint64_t>(tiles_done); });

  if (shared_hist) {
    __syncthreads();
    for (int i = threadIdx.x; i < G * E; i += blockDim.x) {
      const unsigned int c = hist[i];
      if (c != 0) atomicAdd(reinterpret_cast<unsigned long long*>(p.counts + i), static_cast<unsigned long long>(c));
    }
  }
  stamp(6, cycles);
}

// Blocks of the lane kernel for `tiles` warp tiles (32 rows each). Policy 0: one full wave of resident blocks (fewer
// when T is small), the tiles dealt round-robin, so some warps may take one tile more than the rest. Policy 1: every
// warp takes n tiles (the last ones one fewer at most), with n chosen to make the busiest multiprocessor's share
// smallest; policy 2 (the op's, cuda_route.DEFAULT_GRID_POLICY): the same with n >= 2 where there are tiles enough,
// so that every warp copies its next tile while it works on one, and no n above the least whose grid leaves its
// busiest multiprocessor fewer than kLaneMinBusiestWarps warps (a smaller busiest share is not worth too few warps to
// hide each tile's latency: on an H200, grids leaving 2-6 warps on the busiest SM, one block of 4 warps at E = 64 or
// one to three of 2 warps at E = 128, were 6-52% slower than the least n's; one block of 8 warps at E = 32, 3 tiles
// each, is 7-10% faster than two tiles a warp on more blocks, so it is taken; benchmarks/RESULTS.md, sixteenth round).
// (Measured with programmatic dependent launches: policy 2 5-7% faster than policy 0 at T = 65,536 and 131,072, the
// same at 32,768 and 262,144.)
constexpr int kLaneMinBusiestWarps = 8;
int lane_grid(const RouteParams& p, int64_t tiles, int warps_per_block, int sms, int resident) {
  const int64_t wave = static_cast<int64_t>(sms) * resident;
  if (p.grid_policy == 0 || tiles <= 0) {
    return one_wave_grid((tiles + warps_per_block - 1) / warps_per_block, sms, resident);
  }
  const int64_t max_warps = wave * warps_per_block;
  int64_t n_lo = (tiles + max_warps - 1) / max_warps;
  if (p.grid_policy == 2 && n_lo < 2 && tiles >= 2 * sms * warps_per_block) n_lo = 2;
  int64_t best_blocks = 0, best_load = 0;
  for (int64_t n = n_lo; n < n_lo + 4; ++n) {
    const int64_t warps = (tiles + n - 1) / n;
    const int64_t blocks = (warps + warps_per_block - 1) / warps_per_block;
    const int64_t load = (blocks + sms - 1) / sms * warps_per_block * n;  // tiles of the busiest multiprocessor
    if (p.grid_policy == 2 && n > n_lo && (blocks + sms - 1) / sms * warps_per_block < kLaneMinBusiestWarps) continue;
    if (best_blocks == 0 || load < best_load) {
      best_blocks = blocks;
      best_load = load;
    }
  }
  return static_cast<int>(best_blocks);
}

template <typename T, int E_PAD, int FLAGS>
cudaError_t launch_lane(const RouteParams& p, size_t smem, int device, cudaStream_t stream) {
  using S = LaneShape<E_PAD, FLAGS>;
  constexpr auto kernel = route_lane_kernel<T, E_PAD, FLAGS>;
  int sms = 0, resident = 0;
  cudaError_t err = allow_dynamic_smem(kernel, smem);  // (kSmBlock asks for more than the default)
  if (err == cudaSuccess) err = wave_shape<kernel>(device, S::kWarps * 32, smem, sms, resident);
  if (err != cudaSuccess) return err;
  const int grid = lane_grid(p, (p.num_tokens + 31) / 32, S::kWarps, sms, resident);
  if (grid <= 0) return cudaSuccess;
  return launch_kernel(kernel, grid, S::kWarps * 32, smem, stream, device, sms, resident, p);
}

// E_PAD of a row of E experts: the least power of two >= E, at least 8
int padded_experts(int e) {
  int e_pad = 8;
  while (e_pad < e) e_pad *= 2;
  return e_pad;
}

// Whether the call counts into a shared-memory histogram first (its G x E counters fit), or straight into counts
void choose_shared_hist(RouteParams& p) {
  if (p.counts) p.shared_hist = static_cast<int64_t>(p.num_groups) * p.num_experts * 4 <= kMaxHistBytes ? 1 : 0;
}

// Shared bytes the lane kernel needs for this call, or 0 when the call is not one it takes.
// A histogram that does not fit goes to global atomics (p.shared_hist cleared).
size_t lane_smem_bytes(RouteParams& p, int dtype) {
  if (dtype == kFloat32 || p.vector_loads == 0 || p.top_k > kLaneTopK || p.scoring != kScoringSoftmax) return 0;
  if (p.stride_t > (int64_t{1} << 26)) return 0;  // (a lane's copy step is a 32-bit byte count)
  const int e = p.num_experts;
  const bool padded = p.vector_loads == 2;  // (kPadRows: the mask table always, and no benchmark options)
  const int e_pad = padded ? padded_experts(e) : e;
  if (e_pad != 32 && e_pad != 64 && e_pad != 128) return 0;
  if (padded && (e % 4 != 0 || e == e_pad || p.lane_options != 0 || p.ablation != 0)) return 0;
  // the mask table, and for the packed top-k (an option, bf16 at E = 64) its keep words
  const bool packed = (p.lane_options & kPacked16) != 0 && dtype == kBFloat16 && e == 64;
  const int64_t mask_rows = p.keep ? int64_t{p.num_groups} + 1 : padded ? 1 : 0;  // (the kernel's mask_groups + 1)
  const size_t mask = static_cast<size_t>(mask_rows) * ((e_pad / 4 + 1) + (packed ? e / 8 + 1 : 0)) * 16;
  if (mask > kLaneMaxExtraBytes) return 0;
  size_t hist = p.counts && p.shared_hist ? static_cast<size_t>(p.num_groups) * e * 4 : 0;
  if (mask + hist > kLaneMaxExtraBytes) {
    p.shared_hist = 0;
    hist = 0;
  }
  return static_cast<size_t>((p.lane_options & kSmBlock) ? kSmBlockStageBytes : kLaneStageBytes) + mask + hist;
}

// FLAGS of a benchmarking ablation (0: none)
int lane_ablation_flags(int ablation) {
  switch (ablation) {
    case 1: return 0;                                // copy the tiles, store the first k experts
    case 2: return kDoTopK;                          // + top-k (no mask)
    case 3: return kDoTopK | kDoMask;                // + mask
    case 4: return kDoTopK | kDoMask | kDoSoftmax;   // + softmax (no counts)
    // the same steps with the op's top-k at large T (tournament, top_k == 8), so that their times add up to its
    case 5: return kDoTopK | kTopK8 | kTournament;
    case 6: return kDoTopK | kDoMask | kTopK8 | kTournament;
    case 7: return kDoTopK | kDoMask | kDoSoftmax | kTopK8 | kTournament;
    default: return -1;
  }
}

// Whether the op's top-8 call takes the tournament top-k (kTournament): at E = 128 always, at E = 64 where there are
// more tiles than two thirds of a full wave's warps (both 16-bit dtypes; from 67,585 rows on an H200): below a full
// wave the grid deals every warp two tiles (lane_grid), so from there on the busiest SMs hold three blocks. Where the
// SMs are that full they are bound by their instruction issue and integer pipe, and the tournament's fewer min / max
// instructions pay: 3-6% at T = 131,072 to 262,144 (bf16 E = 64), 6% (fp16 E = 64), 9-15% at E = 128 (at 8 warps per SM
// against the network's 12), and at E = 128 also 12-14% from T = 4,096 to 32,768, where its 16 chunks make the
// network's merge chain long (benchmarks/RESULTS.md, thirteenth and fourteenth rounds). With the picks' shorter paths
// (fifteenth round) it is 2-3% faster than before at 131,072 and 262,144, 5-8% at E = 128, and at E = 64 7% faster than
// the network from 73,728 rows on; its sorted runners-up at E = 64 (sixteenth round) take 1-2% more off. Where the
// busiest SMs hold two blocks (8 warps; T = 57,344 and 65,536) a warp's picks, one after the other with a shared-memory
// load in each, lengthen the path of a tile, which the sorting network's independent chunks do not: there it is 1-5%
// slower. At E = 32 (4 chunks: 3 merges for the network) it was 3-12% slower at 131,072 and 262,144, so those calls
// keep the network
template <int E_PAD> constexpr bool kTournamentShape = E_PAD == 64 || E_PAD == 128;
template <int E_PAD> constexpr int kTournamentMinWaveThirds = E_PAD == 128 ? 0 : 2;  // (tiles above, in wave thirds)
constexpr int kLaneTournamentFlags = kLaneFull | kLaneDefaultOptions | kTopK8 | kTournament;  // (and without kDoMask)
template <typename T, int E_PAD>
bool tournament_pays(const RouteParams& p, size_t smem, int device) {
  if constexpr (kTournamentMinWaveThirds<E_PAD> == 0) {
    return true;
  } else {
    using S = LaneShape<E_PAD, kLaneTournamentFlags>;
    int sms = 0, resident = 0;
    constexpr auto kernel = route_lane_kernel<T, E_PAD, kLaneTournamentFlags>;
    if (wave_shape<kernel>(device, S::kWarps * 32, smem, sms, resident) != cudaSuccess) return false;
    const int64_t tiles = (p.num_tokens + 31) / 32;
    return tiles * 3 > int64_t{kTournamentMinWaveThirds<E_PAD>} * sms * resident * S::kWarps;
  }
}

// the instance FLAGS where the call has a keep mask, else the same without kDoMask
template <typename T, int E_PAD, int FLAGS>
cudaError_t launch_lane_keep(const RouteParams& p, size_t smem, int device, cudaStream_t stream) {
  return p.keep ? launch_lane<T, E_PAD, FLAGS>(p, smem, device, stream)
                : launch_lane<T, E_PAD, FLAGS & ~kDoMask>(p, smem, device, stream);
}

template <typename T, int E_PAD>
cudaError_t launch_lane_e(const RouteParams& p, size_t smem, int device, cudaStream_t stream) {
  constexpr int kOpt = kLaneDefaultOptions;
  if constexpr (kTournamentShape<E_PAD>) {
    if (p.top_k == 8 && tournament_pays<T, E_PAD>(p, smem, device)) {
      return launch_lane_keep<T, E_PAD, kLaneTournamentFlags>(p, smem, device, stream);
    }
  }
  if (p.top_k == 8) return launch_lane_keep<T, E_PAD, kLaneFull | kOpt | kTopK8>(p, smem, device, stream);
  return launch_lane_keep<T, E_PAD, kLaneFull | kOpt>(p, smem, device, stream);
}

template <typename T>
cudaError_t launch_lane_t(const RouteParams& p, size_t smem, int device, cudaStream_t stream) {
  if (p.vector_loads == 2) {  // padded rows (lane_smem_bytes took them): the general instance, mask on
    constexpr int F = kLaneFull | kLaneDefaultOptions | kPadRows;
    const int e_pad = padded_experts(p.num_experts);
    if (e_pad == 32) return launch_lane<T, 32, F>(p, smem, device, stream);
    if (e_pad == 64) return launch_lane<T, 64, F>(p, smem, device, stream);
    return launch_lane<T, 128, F>(p, smem, device, stream);
  }
  if (p.num_experts == 32) return launch_lane_e<T, 32>(p, smem, device, stream);
  if (p.num_experts == 64) return launch_lane_e<T, 64>(p, smem, device, stream);
  return launch_lane_e<T, 128>(p, smem, device, stream);
}

// (benchmarking) bf16, E = 64, a keep mask: the full kernel with the option bits of p.lane_options (kTopK8 only with
// top_k == 8), or an ablation instance (the default options; the loads-and-stores-only one with p.lane_options')
template <int F>
cudaError_t launch_lane_memory_options(const RouteParams& p, size_t smem, int device, cudaStream_t stream) {
  using B = __nv_bfloat16;
  switch (p.lane_options & (kOneStage | kStageIds | kSmBlock)) {
    case 0: return launch_lane<B, 64, F>(p, smem, device, stream);
    case kOneStage: return launch_lane<B, 64, F | kOneStage>(p, smem, device, stream);
    case kStageIds: return launch_lane<B, 64, F | kStageIds>(p, smem, device, stream);
    case kOneStage | kStageIds: return launch_lane<B, 64, F | kOneStage | kStageIds>(p, smem, device, stream);
    case kSmBlock: return launch_lane<B, 64, F | kSmBlock>(p, smem, device, stream);
    case kSmBlock | kStageIds: return launch_lane<B, 64, F | kSmBlock | kStageIds>(p, smem, device, stream);
    default: return cudaErrorInvalidValue;  // (kSmBlock with kOneStage, refused by the launcher)
  }
}

template <int F>
cudaError_t launch_lane_options(const RouteParams& p, size_t smem, int device, cudaStream_t stream) {
  if constexpr ((F & kTopK8) != 0) {
    if (p.lane_options & kTimeline) {  // (with kStageIds, and kSmBlock or not: checked by the launcher)
      return (p.lane_options & kSmBlock)
                 ? launch_lane<__nv_bfloat16, 64, F | kStageIds | kTimeline | kSmBlock>(p, smem, device, stream)
                 : launch_lane<__nv_bfloat16, 64, F | kStageIds | kTimeline>(p, smem, device, stream);
    }
  }
  if constexpr ((F & kDoTopK) != 0) {
    if (p.lane_options & kTournament) {  // (two stages, ids staged or not: checked by the launcher)
      return (p.lane_options & kStageIds)
                 ? launch_lane<__nv_bfloat16, 64, F | kTournament | kStageIds>(p, smem, device, stream)
                 : launch_lane<__nv_bfloat16, 64, F | kTournament>(p, smem, device, stream);
    }
    if (p.lane_options & kPacked16) return launch_lane_memory_options<F | kPacked16>(p, smem, device, stream);
    if (p.lane_options & kTwoPassSoftmax) {
      return launch_lane_memory_options<F | kTwoPassSoftmax>(p, smem, device, stream);
    }
  }
  return launch_lane_memory_options<F>(p, smem, device, stream);
}

// The ablations past the loads-and-stores-only one (lane_ablation_flags 2 .. 7), each an instance of its FLAGS with the
// default options: launched and preloaded from this one list
template <int... F>
struct LaneAblationInstances {
  static cudaError_t launch(int flags, const RouteParams& p, size_t smem, int device, cudaStream_t stream) {
    cudaError_t err = cudaErrorInvalidValue;
    (void)((flags == F &&
            (err = launch_lane<__nv_bfloat16, 64, F | kLaneDefaultOptions>(p, smem, device, stream), true)) ||
           ...);
    return err;
  }
  static cudaError_t preload() {
    cudaFuncAttributes attr;
    cudaError_t err = cudaSuccess;
    (void)((err = cudaFuncGetAttributes(&attr, route_lane_kernel<__nv_bfloat16, 64, F | kLaneDefaultOptions>),
            err == cudaSuccess) &&
           ...);
    return err;
  }
};
using LaneAblations = LaneAblationInstances<kDoTopK, kDoTopK | kDoMask, kDoTopK | kDoMask | kDoSoftmax,
                                            kDoTopK | kTopK8 | kTournament, kDoTopK | kDoMask | kTopK8 | kTournament,
                                            kDoTopK | kDoMask | kDoSoftmax | kTopK8 | kTournament>;

cudaError_t launch_lane_ablation(const RouteParams& p, size_t smem, int device, cudaStream_t stream) {
  if (p.ablation == 0) {
    return (p.lane_options & kTopK8) ? launch_lane_options<kLaneFull | kTopK8>(p, smem, device, stream)
                                     : launch_lane_options<kLaneFull>(p, smem, device, stream);
  }
  const int flags = lane_ablation_flags(p.ablation);
  if (flags == 0) {
    if (p.lane_options != 0) return launch_lane_options<0>(p, smem, device, stream);
    constexpr int kMemoryOptions = kLaneDefaultOptions & (kOneStage | kStageIds);
    return launch_lane<__nv_bfloat16, 64, kMemoryOptions>(p, smem, device, stream);
  }
  return LaneAblations::launch(flags, p, smem, device, stream);
}

// launch_lane_keep's two instances of FLAGS
template <typename T, int E_PAD, int FLAGS>
cudaError_t preload_lane_keep() {
  cudaFuncAttributes attr;
  cudaError_t err = cudaFuncGetAttributes(&attr, route_lane_kernel<T, E_PAD, FLAGS>);
  if (err == cudaSuccess) err = cudaFuncGetAttributes(&attr, route_lane_kernel<T, E_PAD, FLAGS & ~kDoMask>);
  return err;
}

template <typename T, int E_PAD>
cudaError_t preload_lane_e() {
  constexpr int kOpt = kLaneDefaultOptions;
  cudaError_t err = preload_lane_keep<T, E_PAD, kLaneFull | kOpt>();
  if (err == cudaSuccess) err = preload_lane_keep<T, E_PAD, kLaneFull | kOpt | kTopK8>();
  if constexpr (kTournamentShape<E_PAD>) {  // (large T: tournament_pays)
    if (err == cudaSuccess) err = preload_lane_keep<T, E_PAD, kLaneTournamentFlags>();
  }
  return err;
}

template <typename T>
cudaError_t preload_lane_t() {
  cudaError_t err = preload_lane_e<T, 32>();
  if (err == cudaSuccess) err = preload_lane_e<T, 64>();
  if (err == cudaSuccess) err = preload_lane_e<T, 128>();
  return err;
}

template <int F>
cudaError_t preload_lane_memory_options() {
  using B = __nv_bfloat16;
  cudaFuncAttributes attr;
  cudaError_t err = cudaFuncGetAttributes(&attr, route_lane_kernel<B, 64, F>);
  if (err == cudaSuccess) err = cudaFuncGetAttributes(&attr, route_lane_kernel<B, 64, F | kOneStage>);
  if (err == cudaSuccess) err = cudaFuncGetAttributes(&attr, route_lane_kernel<B, 64, F | kStageIds>);
  if (err == cudaSuccess) err = cudaFuncGetAttributes(&attr, route_lane_kernel<B, 64, F | kOneStage | kStageIds>);
  if (err == cudaSuccess) err = cudaFuncGetAttributes(&attr, route_lane_kernel<B, 64, F | kSmBlock>);
  if (err == cudaSuccess) err = cudaFuncGetAttributes(&attr, route_lane_kernel<B, 64, F | kSmBlock | kStageIds>);
  return err;
}

template <int F>
cudaError_t preload_lane_options() {
  cudaError_t err = preload_lane_memory_options<F>();
  if constexpr ((F & kDoTopK) != 0) {
    if (err == cudaSuccess) err = preload_lane_memory_options<F | kPacked16>();
    if (err == cudaSuccess) err = preload_lane_memory_options<F | kTwoPassSoftmax>();
    cudaFuncAttributes attr;
    if (err == cudaSuccess) err = cudaFuncGetAttributes(&attr, route_lane_kernel<__nv_bfloat16, 64, F | kTournament>);
    if (err == cudaSuccess) {
      err = cudaFuncGetAttributes(&attr, route_lane_kernel<__nv_bfloat16, 64, F | kTournament | kStageIds>);
    }
  }
  return err;
}

cudaError_t preload_lane_ablations() {
  cudaError_t err = preload_lane_options<0>();
  if (err == cudaSuccess) err = preload_lane_options<kLaneFull>();
  if (err == cudaSuccess) err = preload_lane_options<kLaneFull | kTopK8>();
  if (err == cudaSuccess) err = LaneAblations::preload();
  return err;
}

// ---------------------------------------------------------------------------------------------------------------
// "chunk" variant: the sigmoid router (kScoringSigmoid) for E a multiple of 32 up to 512 in every dtype, top_k <= 8,
// and no group limit or groups of whole 32-expert columns (chunk_takes: DeepSeek-V3's 8 groups of 32, GLM-4.5's 160
// and Kimi-K2's 384 experts).
//
// A row spreads over 4 lanes of a warp (8 rows a warp, walked grid-stride). Its experts come in columns of 32 (column
// c: experts 32c .. 32c + 31), lane sub of the row taking experts 32c + 8 sub .. 32c + 8 sub + 7 of each, so that a
// row's column is one contiguous 128 bytes of float32 logits (64 of 16-bit ones) over its 4 lanes. Each lane keeps
// the top 8 of the keys it has seen, sorted, in registers: a column's 8 keys are sorted by Batcher's 19-comparator
// network and merged in (8 maxima and a 12-comparator clean-up). The lanes' top 8s then merge over the row's 4 lanes
// in two shuffle steps of the same merge, which leaves the row's top 8 in each of them. The split kernel's sigmoid
// instances spread a row over a whole warp instead (8 experts a lane), so that every one of its 8 pick rounds, and
// the group limit's ranking, takes the warp for one row.
// Keys are those instances' 64-bit ones: the order of the selection value sigmoid(z) + bias (NaN first) above, the
// code kChunkCodeBase - e below; a masked expert has the value word 1, below every allowed one (-inf included).
// With a group limit, a first pass over the columns scores each group (the sum of its two largest allowed selection
// values, the split kernel's rule) and ranks the groups; the top-k pass then visits the kept groups' columns only
// (DeepSeek-V3: 4 of 8), and the other groups' experts (their values -inf) only in a row whose kept groups' top 8
// holds fewer than top_k allowed experts of a value above -inf.
// ---------------------------------------------------------------------------------------------------------------

constexpr int kChunkRowLanes = 4;                           // lanes a row
constexpr int kChunkRowsPerWarp = 32 / kChunkRowLanes;
constexpr int kChunkMinBlocks = 3;                          // at most 80 registers
constexpr int kChunkMaxExperts = 512;
constexpr int kChunkMaxGroups = kChunkMaxExperts / 32;      // (groups of whole columns)
constexpr unsigned int kChunkCodeBase = kChunkMaxExperts - 1;  // a key's code: kChunkCodeBase - e

using Key64 = unsigned long long;
constexpr Key64 kKey64Masked = 1ull << 32;                                               // | code: a masked expert
constexpr Key64 kKey64NegInfTop = (static_cast<Key64>(kOrderedNegInf) << 32) | 0xFFFFFFFFu;  // above every -inf key

// The compare-exchange of 64-bit keys (a = max, b = min) for the networks of the lane kernel's section
struct Key64Exchange {
  __device__ __forceinline__ void operator()(Key64& a, Key64& b) const {
    const Key64 x = a, y = b;
    const bool greater = x > y;
    a = greater ? x : y;
    b = greater ? y : x;
  }
};

// top = the 8 largest of top and c (both sorted descending), sorted descending
__device__ __forceinline__ void merge8_key64(Key64 (&top)[8], const Key64 (&c)[8]) {
#pragma unroll
  for (int i = 0; i < 8; ++i) top[i] = top[i] > c[7 - i] ? top[i] : c[7 - i];  // a bitonic sequence of the top 8
  bitonic_clean8_desc<Key32>(top, Key64Exchange{});
}

// top = the 8 largest of the row's 4 lanes' top 8s (each sorted descending, disjoint), in each of the 4 lanes
__device__ __forceinline__ void merge8_row_lanes(Key64 (&top)[8]) {
#pragma unroll
  for (int off = 1; off < kChunkRowLanes; off <<= 1) {
    Key64 other[8];
#pragma unroll
    for (int i = 0; i < 8; ++i) other[i] = __shfl_xor_sync(0xffffffffu, top[i], off, kChunkRowLanes);
    merge8_key64(top, other);
  }
}

// The chunk kernel's dynamic shared memory, in 32-bit words: the selection bias [E] (16-byte aligned, for vector
// reads), the keep bits [G][E / 32], the histogram [G][E] (shared_hist), each warp's rows' group ranks
// [warps][rows][kChunkMaxGroups] (a group limit)
struct ChunkSmem {
  size_t keep, hist, ranks, words;
};
__host__ __device__ __forceinline__ ChunkSmem chunk_smem(const RouteParams& p) {
  ChunkSmem s;
  s.keep = p.bias != nullptr ? static_cast<size_t>(p.num_experts) : 0;
  s.hist = s.keep + (p.keep != nullptr ? static_cast<size_t>(p.num_groups) * (p.num_experts / 32) : 0);
  s.ranks = s.hist + (p.counts != nullptr && p.shared_hist ? static_cast<size_t>(p.num_groups) * p.num_experts : 0);
  s.words = s.ranks + (p.n_group > 1 ? static_cast<size_t>(kThreads / 32) * kChunkRowsPerWarp * kChunkMaxGroups : 0);
  return s;
}

// Whether the chunk kernel takes this call (RouteParams already checked by the launcher's common checks)
inline bool chunk_takes(const RouteParams& p, int dtype) {
  const int e = p.num_experts;
  if (e % 32 != 0 || e < 32 || e > kChunkMaxExperts) return false;
  if (p.scoring == kScoringSigmoid) return p.top_k <= 8 && (p.n_group == 1 || (e / p.n_group) % 32 == 0);
  // the softmax routers: 16-bit logits (32-bit keys), no group limit or bias
  return dtype != kFloat32 && p.top_k <= 16 && p.n_group == 1 && p.bias == nullptr;
}

// The chunk kernels' dynamic shared memory (its layout: chunk_smem)
__device__ __forceinline__ unsigned int* chunk_shared_memory() {
  extern __shared__ __align__(16) unsigned int chunk_shared[];
  return chunk_shared;
}

// The chunk kernels' block setup: the keep bits of every group (a word per warp step: a coalesced byte per lane and a
// ballot) and the shared histogram cleared (the caller synchronises the block)
__device__ __forceinline__ void chunk_block_setup(const RouteParams& p, int columns, unsigned int* keep_bits,
                                                  unsigned int* hist) {
  const int E = p.num_experts, G = p.num_groups;
  const int warp_in_block = threadIdx.x >> 5, lane = threadIdx.x & 31;
  if (p.keep != nullptr) {
    for (int w = warp_in_block; w < G * columns; w += kThreads / 32) {
      const int g = w / columns, e = (w % columns) * 32 + lane;
      const unsigned int word = __ballot_sync(0xffffffffu, p.keep[static_cast<int64_t>(g) * E + e] != 0);
      if (lane == 0) keep_bits[w] = word;
    }
  }
  if (p.counts != nullptr && p.shared_hist) {
    for (int i = threadIdx.x; i < G * E; i += blockDim.x) hist[i] = 0;
  }
}

// A lane's 8 logits of a row's column from e0 on: 16-byte vectors where the rows allow (vector_rows), else element
// by element (zeros past the last row)
template <typename T, int kVecs>
__device__ __forceinline__ void chunk_load_column(const T* row_logits, int e0, bool vector_rows, bool row_valid,
                                                  int64_t stride_e, uint4 (&raw)[kVecs]) {
  if (vector_rows) {
    const uint4* src = reinterpret_cast<const uint4*>(row_logits + e0);
#pragma unroll
    for (int q = 0; q < kVecs; ++q) raw[q] = row_valid ? __ldg(src + q) : make_uint4(0u, 0u, 0u, 0u);
  } else {
#pragma unroll
    for (int q = 0; q < kVecs; ++q) raw[q] = make_uint4(0u, 0u, 0u, 0u);
    T* out = reinterpret_cast<T*>(raw);
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      if (row_valid) out[i] = row_logits[static_cast<int64_t>(e0 + i) * stride_e];
    }
  }
}

// A pick's weight, id and count (into the shared histogram, or straight to global memory)
template <typename T>
__device__ __forceinline__ void chunk_store_pick(const RouteParams& p, int64_t out, int expert, float weight,
                                                 bool counted, int64_t g, unsigned int* hist) {
  Elem<T>::store(p.weights, out, weight);
  p.ids[out] = expert;
  if (counted) {
    if (p.shared_hist) {
      atomicAdd(hist + g * p.num_experts + expert, 1u);
    } else {
      atomicAdd(reinterpret_cast<unsigned long long*>(p.counts + g * p.num_experts + expert), 1ull);
    }
  }
}

// The shared histogram added to the counts (after every row of the block)
__device__ __forceinline__ void chunk_flush_hist(const RouteParams& p, const unsigned int* hist) {
  if (p.counts != nullptr && p.shared_hist) {
    __syncthreads();
    for (int i = threadIdx.x; i < p.num_groups * p.num_experts; i += blockDim.x) {
      const unsigned int c = hist[i];
      if (c != 0) atomicAdd(reinterpret_cast<unsigned long long*>(p.counts + i), static_cast<unsigned long long>(c));
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads, kChunkMinBlocks) route_chunk_kernel(const RouteParams p) {
  unsigned int* const chunk_shared = chunk_shared_memory();
  const int E = p.num_experts, G = p.num_groups, top_k = p.top_k;
  const int columns = E / 32;
  const bool has_keep = p.keep != nullptr, has_counts = p.counts != nullptr, has_bias = p.bias != nullptr;
  const bool group_limited = p.n_group > 1;
  const ChunkSmem layout = chunk_smem(p);
  float* bias = reinterpret_cast<float*>(chunk_shared);
  unsigned int* keep_bits = chunk_shared + layout.keep;
  unsigned int* hist = chunk_shared + layout.hist;
  const int warp_in_block = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int sub = lane % kChunkRowLanes, row_in_warp = lane / kChunkRowLanes;
  unsigned int* ranks =  // this row's group scores
      chunk_shared + layout.ranks + (warp_in_block * kChunkRowsPerWarp + row_in_warp) * kChunkMaxGroups;
  dependent_launch_start(p.dependent_launch);  // (before any global memory access)

  if (has_bias) {
    for (int e = threadIdx.x; e < E; e += blockDim.x) bias[e] = p.bias[e];
  }
  chunk_block_setup(p, columns, keep_bits, hist);
  __syncthreads();

  const T* logits = static_cast<const T*>(p.logits);
  // a lane's 8 logits of a column as 16-byte vectors: rows contiguous and 16-byte aligned (E % 32 == 0 aligns the
  // lanes' offsets)
  const bool vector_rows = p.stride_e == 1 && (p.stride_t * static_cast<int64_t>(sizeof(T))) % 16 == 0 &&
                           reinterpret_cast<uintptr_t>(logits) % 16 == 0;
  constexpr int kVecs = 8 * static_cast<int>(sizeof(T)) / 16;  // 16-byte vectors of a lane's 8 logits
  const int cols_per_group = columns / p.n_group;
  const int64_t warp_id = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  const int64_t num_warps = (static_cast<int64_t>(gridDim.x) * blockDim.x) >> 5;
  const int64_t step = num_warps * kChunkRowsPerWarp;

  for (int64_t base = warp_id * kChunkRowsPerWarp; base < p.num_tokens; base += step) {
    const int64_t row = base + row_in_warp;
    const bool row_valid = row < p.num_tokens;
    int64_t g = 0;  // ids outside [0, G) act as -1 (no mask, not counted); no group tensor means group 0
    if (p.group != nullptr && row_valid) {
      g = p.group_is_int64 ? static_cast<const int64_t*>(p.group)[row]
                           : static_cast<int64_t>(static_cast<const int32_t*>(p.group)[row]);
    }
    const bool in_group = row_valid && g >= 0 && g < G;
    const unsigned int* row_keep = has_keep && in_group ? keep_bits + g * columns : nullptr;
    const T* row_logits = logits + (row_valid ? row : 0) * p.stride_t;

    // this lane's 8 experts of column c: which are allowed (bits), their logits (loaded a column ahead of their
    // use, so that a load is in flight while the column before is worked on) and their selection values
    auto allowed_of = [&](int c) -> unsigned int {
      unsigned int bits = row_valid ? 0xFFu : 0u;
      if (row_keep != nullptr) bits &= row_keep[c] >> (8 * sub);
      return bits;
    };
    auto load_column = [&](int c, uint4 (&raw)[kVecs]) {
      chunk_load_column<T, kVecs>(row_logits, 32 * c + 8 * sub, vector_rows, row_valid, p.stride_e, raw);
    };
    auto selection = [&](int c, const uint4 (&raw)[kVecs], float (&sel)[8]) {
      const int e0 = 32 * c + 8 * sub;
      const T* z = reinterpret_cast<const T*>(raw);
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        const float s = sigmoid_of(Elem<T>::to_float(z[i]));
        sel[i] = has_bias ? s + bias[e0 + i] : s;
      }
    };

    // the group limit: the groups' scores (group h's in ranks[h]) and the kept ones as bits (without a group limit
    // the one group of every column)
    unsigned int kept_groups = 1u;
    if (group_limited) {
      unsigned int first = kOrderedNegInf, second = kOrderedNegInf;
      int left = cols_per_group;
      uint4 next[kVecs];
      load_column(0, next);
      for (int c = 0; c < columns; ++c) {
        uint4 raw[kVecs];
#pragma unroll
        for (int q = 0; q < kVecs; ++q) raw[q] = next[q];
        if (c + 1 < columns) load_column(c + 1, next);
        float sel[8];
        selection(c, raw, sel);
        const unsigned int allowed = allowed_of(c);
#pragma unroll
        for (int i = 0; i < 8; ++i) {
          const unsigned int u = ((allowed >> i) & 1u) ? nan_first_order(sel[i]) : kOrderedNegInf;
          second = max(second, min(first, u));
          first = max(first, u);
        }
        if (--left == 0) {  // the group's last column: its top 2 over the row's lanes, its score
#pragma unroll
          for (int off = 1; off < kChunkRowLanes; off <<= 1) {
            const unsigned int f = __shfl_xor_sync(0xffffffffu, first, off, kChunkRowLanes);
            const unsigned int s = __shfl_xor_sync(0xffffffffu, second, off, kChunkRowLanes);
            second = max(min(first, f), max(second, s));
            first = max(first, f);
          }
          if (sub == 0) ranks[c / cols_per_group] = nan_first_order(group_score(first, second));
          first = second = kOrderedNegInf;
          left = cols_per_group;
        }
      }
      __syncwarp();
      unsigned int kept = 0;
      for (int h = sub; h < p.n_group; h += kChunkRowLanes) {  // the row's lanes rank a quarter of the groups each
        const unsigned int mine = ranks[h];
        int better = 0;
        for (int o = 0; o < p.n_group; ++o) better += ranks_above(ranks[o], o, mine, h) ? 1 : 0;
        if (better < p.topk_group) kept |= 1u << h;
      }
      kept |= __shfl_xor_sync(0xffffffffu, kept, 1, kChunkRowLanes);
      kept |= __shfl_xor_sync(0xffffffffu, kept, 2, kChunkRowLanes);
      kept_groups = kept;
      __syncwarp();  // (the next row's scores go where these were)
    }

    // the top 8 of the kept groups' columns (every column without a group limit), the groups in the order of their
    // index: each row of the warp visits as many columns (topk_group groups' worth), whichever they are
    Key64 top[8];
#pragma unroll
    for (int i = 0; i < 8; ++i) top[i] = 0;
    const unsigned int lane_code = kChunkCodeBase - 8 * sub;  // code of expert 32c + 8 sub + i: lane_code - 32c - i
    {
      const int visits = __popc(kept_groups) * cols_per_group;
      unsigned int rest = kept_groups;  // the groups left, the current one included
      int column_in_group = 0;          // the next column's place in its group
      int next_c = (__ffs(rest) - 1) * cols_per_group;
      uint4 next[kVecs];
      load_column(next_c, next);
      for (int v = 0; v < visits; ++v) {
        const int c = next_c;
        uint4 raw[kVecs];
#pragma unroll
        for (int q = 0; q < kVecs; ++q) raw[q] = next[q];
        if (++column_in_group == cols_per_group) {  // the group's last column: on to the next kept group
          column_in_group = 0;
          rest &= rest - 1;
        }
        if (v + 1 < visits) {
          next_c = (__ffs(rest) - 1) * cols_per_group + column_in_group;
          load_column(next_c, next);
        }
        float sel[8];
        selection(c, raw, sel);
        const unsigned int allowed = allowed_of(c);
        Key64 keys[8];
#pragma unroll
        for (int i = 0; i < 8; ++i) {
          const unsigned int code = lane_code - 32 * c - i;
          keys[i] = ((allowed >> i) & 1u) ? (static_cast<Key64>(nan_first_order(sel[i])) << 32) | code
                                          : kKey64Masked | code;
        }
        sort8_desc<Key32>(keys, Key64Exchange{});
        if (v == 0) {  // (the first column's keys are the top 8 so far)
#pragma unroll
          for (int i = 0; i < 8; ++i) top[i] = keys[i];
        } else {
          merge8_key64(top, keys);
        }
      }
    }
    merge8_row_lanes(top);

    if (group_limited) {
      // a row whose top 8 holds fewer than top_k allowed experts above -inf takes the other groups' experts too, at
      // -inf: the row's first lane keeps the top 8, the others start again (each expert in one lane's list once)
      int above = 0;
#pragma unroll
      for (int i = 0; i < 8; ++i) above += top[i] > kKey64NegInfTop ? 1 : 0;
      const bool more = row_valid && above < top_k;
      if (__any_sync(0xffffffffu, more)) {
        if (sub != 0) {
#pragma unroll
          for (int i = 0; i < 8; ++i) top[i] = 0;
        }
        if (more) {
          for (int c = 0; c < columns; ++c) {
            if ((kept_groups >> (c / cols_per_group)) & 1u) continue;  // (a kept group's: in the list already)
            const unsigned int allowed = allowed_of(c);
            Key64 keys[8];
#pragma unroll
            for (int i = 0; i < 8; ++i) {
              const unsigned int code = lane_code - 32 * c - i;
              keys[i] = ((allowed >> i) & 1u) ? (static_cast<Key64>(kOrderedNegInf) << 32) | code : kKey64Masked | code;
            }
            sort8_desc<Key32>(keys, Key64Exchange{});
            merge8_key64(top, keys);
          }
        }
        merge8_row_lanes(top);
      }
    }

    // lane sub writes picks 2 sub and 2 sub + 1: their sigmoid(z) (0 for a masked pick), renormalised over the
    // row's top_k as s / (sum + 1e-20), times the scale; and where asked, z itself (-inf for a masked pick)
    Key64 pick[2];
#pragma unroll
    for (int s = 0; s < 2; ++s) {
      pick[s] = sub == 0 ? top[s] : sub == 1 ? top[2 + s] : sub == 2 ? top[4 + s] : top[6 + s];
    }
    float w[2], z[2];
    int expert[2];
    float picked_sum = 0.0f;
#pragma unroll
    for (int s = 0; s < 2; ++s) {
      const int j = 2 * sub + s;
      const unsigned int code = static_cast<unsigned int>(pick[s]) & kChunkCodeBase;
      expert[s] = min(static_cast<int>(kChunkCodeBase - code), E - 1);
      const bool weighed = row_valid && j < top_k && pick[s] >= (static_cast<Key64>(kOrderedNegInf) << 32);
      z[s] = weighed ? Elem<T>::to_float(row_logits[static_cast<int64_t>(expert[s]) * p.stride_e]) : -INFINITY;
      w[s] = weighed ? sigmoid_of(z[s]) : 0.0f;
      picked_sum += w[s];
    }
    if (p.renormalize) {
      const float denom = row_sum<kChunkRowLanes>(picked_sum) + kSigmoidRenormEps;
#pragma unroll
      for (int s = 0; s < 2; ++s) w[s] = w[s] / denom;
    }
    if (row_valid) {
#pragma unroll
      for (int s = 0; s < 2; ++s) {
        const int j = 2 * sub + s;
        if (j < top_k) {  // (the scale: exact where it is 1)
          chunk_store_pick<T>(p, row * top_k + j, expert[s], w[s] * p.scale, has_counts && in_group, g, hist);
          if (p.chosen_logits != nullptr) __stcs(p.chosen_logits + row * top_k + j, z[s]);
        }
      }
    }
  }
  chunk_flush_hist(p, hist);
}

// ---------------------------------------------------------------------------------------------------------------
// The chunk kernel's softmax routers: 16-bit logits, E a multiple of 32 up to 512, top_k <= 16, softmax weights
// (renormalised or not) times scale (chunk_takes: Qwen3-Next's 512 experts, top-10). The same rows over 4 lanes and
// columns of 32 experts as the sigmoid router's, with the split kernel's 32-bit keys (Keys<T, 512>: the 16-bit
// logit's order above, the code kChunkCodeBase - e below; a masked expert below every allowed one), so that every
// compare-exchange is one max and one min. Each lane keeps the top NK (8 for top_k <= 8, else 16) of the keys it has
// seen, sorted, merging each column's sorted 8 in, then the row's 4 lanes merge theirs in two shuffle steps. The
// softmax's denominator is summed in the same pass: each lane's sum of exp(z - m) over its allowed experts with m its
// running maximum (rescaled when a column raises it), the lanes' sums then brought to the row's largest logit.
// ---------------------------------------------------------------------------------------------------------------

// a bitonic sequence of 16 32-bit keys, sorted descending
__device__ __forceinline__ void bitonic_clean16_desc(unsigned int (&t)[16]) {
  const MinMaxExchange<Key32> x{};
#pragma unroll
  for (int d = 8; d >= 1; d >>= 1) {
#pragma unroll
    for (int i = 0; i < 16; ++i) {
      if ((i & d) == 0) x(t[i], t[i + d]);
    }
  }
}

// top = the NK largest of top (NK sorted descending) and c (sorted descending, NC of them, NC <= NK: c as if padded
// with keys below every other), sorted descending
template <int NK, int NC>
__device__ __forceinline__ void merge_desc(unsigned int (&top)[NK], const unsigned int (&c)[NC]) {
  if constexpr (NK == 8) {
    merge8_desc<Key32>(top, c);
  } else {
#pragma unroll
    for (int i = 0; i < NC; ++i) top[NK - NC + i] = max(top[NK - NC + i], c[NC - 1 - i]);  // a bitonic sequence
    bitonic_clean16_desc(top);
  }
}

template <typename T, int NK>
__global__ void __launch_bounds__(kThreads, kChunkMinBlocks) route_chunk_softmax_kernel(const RouteParams p) {
  static_assert(sizeof(T) == 2 && (NK == 8 || NK == 16), "16-bit logits, lists of 8 or 16");
  using K = Keys<T, kChunkMaxExperts>;
  constexpr float kLog2e = 1.4426950408889634f;
  constexpr int kVecs = 1;  // a lane's 8 16-bit logits of a column: one 16-byte vector
  constexpr int kPicksPerLane = NK / kChunkRowLanes;
  unsigned int* const chunk_shared = chunk_shared_memory();
  const int E = p.num_experts, top_k = p.top_k;
  const int columns = E / 32;
  const bool has_counts = p.counts != nullptr;
  const ChunkSmem layout = chunk_smem(p);
  unsigned int* keep_bits = chunk_shared + layout.keep;
  unsigned int* hist = chunk_shared + layout.hist;
  const int lane = threadIdx.x & 31;
  const int sub = lane % kChunkRowLanes, row_in_warp = lane / kChunkRowLanes;
  dependent_launch_start(p.dependent_launch);  // (before any global memory access)
  chunk_block_setup(p, columns, keep_bits, hist);
  __syncthreads();

  const T* logits = static_cast<const T*>(p.logits);
  const bool vector_rows = p.stride_e == 1 && (p.stride_t * static_cast<int64_t>(sizeof(T))) % 16 == 0 &&
                           reinterpret_cast<uintptr_t>(logits) % 16 == 0;
  const int64_t warp_id = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  const int64_t num_warps = (static_cast<int64_t>(gridDim.x) * blockDim.x) >> 5;
  const int64_t step = num_warps * kChunkRowsPerWarp;
  const unsigned int lane_code = kChunkCodeBase - 8 * sub;  // code of expert 32c + 8 sub + i: lane_code - 32c - i

  for (int64_t base = warp_id * kChunkRowsPerWarp; base < p.num_tokens; base += step) {
    const int64_t row = base + row_in_warp;
    const bool row_valid = row < p.num_tokens;
    int64_t g = 0;  // ids outside [0, G) act as -1 (no mask, not counted); no group tensor means group 0
    if (p.group != nullptr && row_valid) {
      g = p.group_is_int64 ? static_cast<const int64_t*>(p.group)[row]
                           : static_cast<int64_t>(static_cast<const int32_t*>(p.group)[row]);
    }
    const bool in_group = row_valid && g >= 0 && g < p.num_groups;
    const unsigned int* row_keep = p.keep != nullptr && in_group ? keep_bits + g * columns : nullptr;
    const T* row_logits = logits + (row_valid ? row : 0) * p.stride_t;

    unsigned int top[NK];
#pragma unroll
    for (int i = 0; i < NK; ++i) top[i] = 0;  // (below every expert's key, a masked one's included)
    float lane_max = -INFINITY, lane_sum = 0.0f;  // the lane's running maximum and sum of exp(z - lane_max)
    uint4 next[kVecs];
    chunk_load_column<T, kVecs>(row_logits, 8 * sub, vector_rows, row_valid, p.stride_e, next);
    for (int c = 0; c < columns; ++c) {
      uint4 raw[kVecs];
      raw[0] = next[0];
      if (c + 1 < columns) {  // (the next column's load in flight while this one is worked on)
        chunk_load_column<T, kVecs>(row_logits, 32 * (c + 1) + 8 * sub, vector_rows, row_valid, p.stride_e, next);
      }
      const T* v = reinterpret_cast<const T*>(raw);
      unsigned int allowed = row_valid ? 0xFFu : 0u;
      if (row_keep != nullptr) allowed &= row_keep[c] >> (8 * sub);
      float z[8];
      unsigned int keys[8];
      float column_max = -INFINITY;  // (NaN aside: a NaN makes the sum NaN below)
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        z[i] = Elem<T>::to_float(v[i]);
        const bool ok = (allowed >> i) & 1u;
        const unsigned int code = lane_code - 32 * c - i;
        keys[i] = ok ? K::allowed(z[i], code) : K::masked(code);
        if (ok) column_max = fmaxf(column_max, z[i]);
      }
      if (column_max > lane_max) {  // (from -inf, or to +inf: the old sum times 0)
        lane_sum *= fast_exp2((lane_max - column_max) * kLog2e);
        lane_max = column_max;
      }
#pragma unroll
      for (int i = 0; i < 8; ++i) {  // an allowed -inf adds nothing; +inf and NaN make the sum NaN
        const bool term = ((allowed >> i) & 1u) && z[i] != -INFINITY;
        lane_sum += term ? fast_exp2((z[i] - lane_max) * kLog2e) : 0.0f;
      }
      sort8_desc<Key32>(keys);
      merge_desc<NK, 8>(top, keys);
    }
#pragma unroll
    for (int off = 1; off < kChunkRowLanes; off <<= 1) {  // the row's top NK in each of its lanes
      unsigned int other[NK];
#pragma unroll
      for (int i = 0; i < NK; ++i) other[i] = __shfl_xor_sync(0xffffffffu, top[i], off, kChunkRowLanes);
      merge_desc<NK, NK>(top, other);
    }

    // the softmax denominator at the row's largest allowed logit (the split kernel's: NaN where that is NaN, -inf
    // where none is allowed or all are -inf, and then NaN weights)
    const float row_max = K::is_allowed(top[0]) ? K::logit(top[0]) : -INFINITY;
    const float at_row_max = lane_sum == 0.0f ? 0.0f : lane_sum * fast_exp2((lane_max - row_max) * kLog2e);
    float inv = fast_rcp(row_sum<kChunkRowLanes>(at_row_max));
    if (!p.renormalize) inv *= p.scale;  // (the weights' factor: exact where it is 1)

    // lane sub weighs picks kPicksPerLane sub .. kPicksPerLane (sub + 1) - 1
    float w[kPicksPerLane];
    int expert[kPicksPerLane];
    float picked_sum = 0.0f;
#pragma unroll
    for (int s = 0; s < kPicksPerLane; ++s) {
      const unsigned int key = sub == 0 ? top[s] : sub == 1 ? top[kPicksPerLane + s]
                             : sub == 2 ? top[2 * kPicksPerLane + s] : top[3 * kPicksPerLane + s];
      expert[s] = min(K::expert(key), E - 1);
      w[s] = K::is_allowed(key) ? fast_exp2((K::logit(key) - row_max) * kLog2e) * inv : 0.0f * inv;
      if (kPicksPerLane * sub + s < top_k) picked_sum += w[s];
    }
    if (p.renormalize) {
      const float rinv = fast_rcp(row_sum<kChunkRowLanes>(picked_sum)) * p.scale;
#pragma unroll
      for (int s = 0; s < kPicksPerLane; ++s) w[s] *= rinv;
    }
    if (row_valid) {
#pragma unroll
      for (int s = 0; s < kPicksPerLane; ++s) {
        const int j = kPicksPerLane * sub + s;
        if (j < top_k) chunk_store_pick<T>(p, row * top_k + j, expert[s], w[s], has_counts && in_group, g, hist);
      }
    }
  }
  chunk_flush_hist(p, hist);
}

template <auto kernel>
cudaError_t launch_chunk_kernel(const RouteParams& p, int device, cudaStream_t stream) {
  const size_t smem = sizeof(unsigned int) * chunk_smem(p).words;
  // one resident wave of blocks, each walking rows grid-stride (fewer when T is small)
  int sms = 0, resident = 0;
  cudaError_t err = allow_dynamic_smem(kernel, smem);
  if (err == cudaSuccess) err = wave_shape<kernel>(device, kThreads, smem, sms, resident);
  if (err != cudaSuccess) return err;
  constexpr int kRowsPerBlock = (kThreads / 32) * kChunkRowsPerWarp;
  const int64_t needed = (p.num_tokens + kRowsPerBlock - 1) / kRowsPerBlock;
  const int grid = one_wave_grid(needed, sms, resident);
  if (grid <= 0) return cudaSuccess;
  return launch_kernel(kernel, grid, kThreads, smem, stream, device, sms, resident, p);
}

// the sigmoid router's kernel, or the softmax routers' with lists of 8 or 16 (16-bit logits: chunk_takes)
template <typename T>
cudaError_t launch_chunk(const RouteParams& p, int device, cudaStream_t stream) {
  if (p.scoring == kScoringSigmoid) return launch_chunk_kernel<route_chunk_kernel<T>>(p, device, stream);
  if constexpr (sizeof(T) == 2) {
    if (p.top_k <= 8) return launch_chunk_kernel<route_chunk_softmax_kernel<T, 8>>(p, device, stream);
    return launch_chunk_kernel<route_chunk_softmax_kernel<T, 16>>(p, device, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t preload_chunk() {
  cudaFuncAttributes attr;
  cudaError_t err = cudaFuncGetAttributes(&attr, route_chunk_kernel<float>);
  if (err == cudaSuccess) err = cudaFuncGetAttributes(&attr, route_chunk_kernel<__half>);
  if (err == cudaSuccess) err = cudaFuncGetAttributes(&attr, route_chunk_kernel<__nv_bfloat16>);
  if (err == cudaSuccess) err = cudaFuncGetAttributes(&attr, route_chunk_softmax_kernel<__half, 8>);
  if (err == cudaSuccess) err = cudaFuncGetAttributes(&attr, route_chunk_softmax_kernel<__half, 16>);
  if (err == cudaSuccess) err = cudaFuncGetAttributes(&attr, route_chunk_softmax_kernel<__nv_bfloat16, 8>);
  if (err == cudaSuccess) err = cudaFuncGetAttributes(&attr, route_chunk_softmax_kernel<__nv_bfloat16, 16>);
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
  if (err == cudaSuccess) err = preload_lane_t<__half>();
  if (err == cudaSuccess) err = preload_lane_t<__nv_bfloat16>();
  if (err == cudaSuccess) err = preload_lane_ablations();
  if (err == cudaSuccess) err = preload_chunk();
  return static_cast<int>(err);
}

// Largest E and top_k the kernel takes, and its shared-memory limits (bytes); the Python side sends other shapes to
// Triton.
int moe_fastmask_route_cuda_max_experts() { return 512; }  // (256 for float32 logits but the chunk kernel's)
int moe_fastmask_route_cuda_max_top_k() { return 16; }
int moe_fastmask_route_cuda_max_keep_bytes() { return kMaxKeepBytes; }
int moe_fastmask_route_cuda_max_hist_bytes() { return kMaxHistBytes; }
int moe_fastmask_route_cuda_params_size() { return static_cast<int>(sizeof(RouteParams)); }

// The lane kernel's blocks for `tiles` 32-row tiles under grid policy `policy` (0, 1, 2: cuda_route.GRID_POLICIES) on
// `sms` multiprocessors holding `resident` blocks of `warps_per_block` warps each: lane_grid, for tests and benchmarks
int moe_fastmask_route_cuda_lane_grid(int policy, int64_t tiles, int warps_per_block, int sms, int resident) {
  RouteParams p{};
  p.grid_policy = policy;
  return lane_grid(p, tiles, warps_per_block, sms, resident);
}

// The lane kernel's shared bytes for this call (the launcher's choice, for the tests to check the Python side's
// lane_takes against), 0 where the split kernel runs it instead.
int64_t moe_fastmask_route_cuda_lane_smem(const RouteParams* params, int dtype) {
  RouteParams p = *params;
  choose_shared_hist(p);
  return static_cast<int64_t>(lane_smem_bytes(p, dtype));
}

// Launch the forward on `stream` (a cudaStream_t) of `device`; dtype 0 float32, 1 float16, 2 bfloat16.
// Returns 0 or a cudaError_t code (cudaErrorInvalidValue for a shape the kernel does not take).
int moe_fastmask_route_cuda_forward(const RouteParams* params, int dtype, int device, void* stream) {
  RouteParams p = *params;
  if (p.num_tokens <= 0) return 0;
  const bool chunk = p.variant == 2;  // the chunk kernel (chunk_takes)
  const int max_experts = dtype == kFloat32 && !chunk ? 256 : 512;
  if (p.num_experts < 1 || p.num_experts > max_experts || p.top_k < 1 || p.top_k > 16 || p.top_k > p.num_experts) {
    return cudaErrorInvalidValue;
  }
  const int e_pad = padded_experts(p.num_experts);
  const int words = e_pad >= 32 ? e_pad / 32 : 1;  // the kernel's WORDS_PER_GROUP
  if (p.keep && static_cast<int64_t>(p.num_groups) * words * 4 > kMaxKeepBytes) return cudaErrorInvalidValue;
  const bool sigmoid = p.scoring == kScoringSigmoid;
  if ((p.scoring != kScoringSoftmax && !sigmoid) || (sigmoid && !chunk && p.num_experts > 256) ||
      !(p.scale - p.scale == 0.0f) || (!sigmoid && (p.bias != nullptr || p.n_group != 1)) ||
      (p.n_group > 1 && (p.num_experts % p.n_group != 0 || p.num_experts / p.n_group < 2 || p.topk_group < 1 ||
                         p.topk_group > p.n_group))) {
    return cudaErrorInvalidValue;
  }
  if (chunk && !chunk_takes(p, dtype)) return cudaErrorInvalidValue;
  if (p.chosen_logits != nullptr && !(chunk && sigmoid)) return cudaErrorInvalidValue;  // (the chunk kernel's only)
  const bool default_router = !sigmoid && p.scale == 1.0f;
  if ((p.ablation != 0 || p.lane_options != 0) && !default_router) return cudaErrorInvalidValue;  // (benchmarking)
  choose_shared_hist(p);
  if (p.ids8 != nullptr && (p.variant != 1 || !default_router || p.ablation != 0 || p.lane_options != 0 ||
                            p.top_k != 8 || p.vector_loads != 1 ||
                            dtype == kFloat32 || (reinterpret_cast<uintptr_t>(p.ids8) & 7) != 0 ||
                            lane_smem_bytes(p, dtype) == 0)) {
    return cudaErrorInvalidValue;  // (the one-byte ids come from the lane kernel's full instance only)
  }
  int current = -1;
  cudaError_t err = cudaGetDevice(&current);
  if (err != cudaSuccess) return err;
  if (current != device) {
    err = cudaSetDevice(device);
    if (err != cudaSuccess) return err;
  }
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  if (chunk) {
    switch (dtype) {
      case kFloat32: return static_cast<int>(launch_chunk<float>(p, device, s));
      case kFloat16: return static_cast<int>(launch_chunk<__half>(p, device, s));
      case kBFloat16: return static_cast<int>(launch_chunk<__nv_bfloat16>(p, device, s));
      default: return cudaErrorInvalidValue;
    }
  }
  if (!sigmoid && (p.variant == 1 || p.ablation != 0 || p.lane_options != 0)) {
    const size_t smem = lane_smem_bytes(p, dtype);
    if (p.ablation != 0 || p.lane_options != 0) {
      const int flags = p.ablation != 0 ? lane_ablation_flags(p.ablation) : kLaneFull;
      const bool bad_options = (p.lane_options & ~(kLaneOptions | 1)) != 0 ||
                               ((p.lane_options & kTopK8) && (p.top_k != 8 || p.ablation != 0)) ||
                               ((p.lane_options & (kPacked16 | kTwoPassSoftmax)) && p.ablation != 0) ||
                               (p.lane_options & (kPacked16 | kTwoPassSoftmax)) == (kPacked16 | kTwoPassSoftmax) ||
                               (p.lane_options != 0 && p.ablation > 1) ||
                               (flags >= 0 && (flags & kTopK8) && p.top_k != 8) ||
                               ((p.lane_options & kTimeline) &&
                                (p.lane_options & kLaneOptions & ~kSmBlock) != (kTimeline | kTopK8 | kStageIds)) ||
                               (p.lane_options & (kSmBlock | kOneStage)) == (kSmBlock | kOneStage) ||
                               ((p.lane_options & kTournament) &&
                                (p.ablation != 0 || (p.lane_options & (kPacked16 | kTwoPassSoftmax | kOneStage |
                                                                       kSmBlock | kTimeline)) != 0));
      if (smem == 0 || dtype != kBFloat16 || p.num_experts != 64 || flags < 0 || ((flags & kDoMask) && !p.keep) ||
          bad_options) {
        return cudaErrorInvalidValue;
      }
      return static_cast<int>(launch_lane_ablation(p, smem, device, s));
    }
    if (smem != 0) {
      return static_cast<int>(dtype == kFloat16 ? launch_lane_t<__half>(p, smem, device, s)
                                                : launch_lane_t<__nv_bfloat16>(p, smem, device, s));
    }
  }
  switch (dtype) {  // the split kernel
    case kFloat32: err = sigmoid ? launch_e<float, true>(p, device, s) : launch_e<float>(p, device, s); break;
    case kFloat16: err = sigmoid ? launch_e<__half, true>(p, device, s) : launch_e<__half>(p, device, s); break;
    case kBFloat16:
      err = sigmoid ? launch_e<__nv_bfloat16, true>(p, device, s) : launch_e<__nv_bfloat16>(p, device, s);
      break;
    default: err = cudaErrorInvalidValue;
  }
  return static_cast<int>(err);
}

// (benchmarking) The buffer [warps, kTimelineSlots] of uint64 on the current device that the lane kernel's timeline
// instance (option bit kTimeline) writes its stamps into; null: none. Returns 0 or a cudaError_t code.
int moe_fastmask_route_cuda_set_timeline(void* buffer, int64_t warps) {
  uint64_t* ptr = static_cast<uint64_t*>(buffer);
  cudaError_t err = cudaMemcpyToSymbol(timeline_buffer, &ptr, sizeof(ptr));
  if (err == cudaSuccess) err = cudaMemcpyToSymbol(timeline_warps, &warps, sizeof(warps));
  return static_cast<int>(err);
}
int moe_fastmask_route_cuda_timeline_slots() { return kTimelineSlots; }

const char* moe_fastmask_route_cuda_error_string(int code) {
  return cudaGetErrorString(static_cast<cudaError_t>(code));
}

}  // extern "C"
