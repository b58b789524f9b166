// CUDA backward of moe_fastmask.route: the gradient of the chosen weights with respect to the logits, for the softmax
// routers (over the allowed experts, optionally renormalised, or over the chosen ones) and the sigmoid router, any
// scale. Torch-free, like route_cuda.cu (built into the same library): a plain C launcher that
// moe_fastmask/ops/cuda_route.py calls through ctypes with raw pointers and the caller's CUDA stream.
//
// Math (fp32), with p the softmax over the row's allowed experts (masked ones p = 0) and G the incoming gradient
// times the scale, scattered to the chosen experts:
//   without renormalisation  dz = p * (G - sum_e G_e p_e)
//   with renormalisation     dz = w * (G - sum_e G_e w_e) on the chosen experts, 0 elsewhere, w = p / sum_chosen p
//                            (also the softmax over the chosen experts alone: the same w)
//   sigmoid                  dz = G s (1 - s) on the chosen experts, s = sigmoid(z) (a masked chosen expert: s = 0),
//                            0 elsewhere; renormalised, with S = sum_chosen s + 1e-20: dz = (G - sum G s / S) / S
//                            s (1 - s). Neither the selection bias nor the group limit has a gradient.
// A row whose allowed logits hold NaN or +inf, or are all -inf (also: every expert masked), has p = NaN everywhere,
// as in the reference: a masked expert gets exp2(-inf - max) * (1 / sum) = 0 * NaN there. (fmaxf skips NaN in the
// row max, but the NaN logit's own exp term makes the sum NaN.) Group ids outside [0, G) act as "no mask"; ids outside
// [0, E) scatter nothing. Nothing outside the tensors is read or written. (Sigmoid: a NaN logit makes its own
// expert's gradient NaN, and with renormalisation the row's chosen experts'; the other experts' gradients are 0.)
//
// Layout (memory-bound; no shared-memory staging of the logits): a row of E_PAD (power of two >= max(E, 8)) experts is
// spread over L = E_PAD / V lanes of one warp, V experts per lane (16 from E_PAD = 64 on, to spread each lane's fixed
// costs over more experts; else 8), so a warp step holds R = 32 / L rows (E_PAD = 512: one row, over the whole warp). A
// lane's experts come as 16-byte chunks (8 experts of 16-bit logits, 4 of float32), chunk q of lane s at expert (q * L
// + s) * chunk size, so that each load instruction of the warp reads contiguous bytes. All of a step's loads are issued
// before any is used. The row max and sums are butterfly shuffles over the row's lanes. The row's k (id, grad) pairs
// (entry j on lane j % L) are scattered into a per-warp shared buffer [R][E_PAD] of grads (plus chosen flags when
// renormalising): each lane zeroes its own V slots, __syncwarp, the scatter, __syncwarp, each lane reads its V slots
// back (so the sums over the row need no gather). Every lane of a warp runs the same steps (the loop bounds are
// warp-uniform), so the full-mask __syncwarp calls are safe, and two per step order the three phases across steps too.
// The sigmoid router's gradient is 0 off the chosen experts and needs no sums over the row. Its calls run vector
// instances of this kernel of their own (SIGMOID) where those take them with two or more rows a warp step
// (sigmoid_on_row_kernel), and their own kernel (route_bwd_sigmoid_kernel, below) otherwise, or always where the
// forward saved the chosen experts' logits (chosen_logits: the chunk kernel's calls). Here its rows skip the
// loads of the logits and of the keep row; each (id, grad) entry's lane gathers its expert's logit and keep flag and
// computes the entry's gradient (the sums over the row's entries, for renormalisation, by shuffles), and the scatter
// places those in place of the incoming grads.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <stdint.h>

#include <cmath>
#include <type_traits>

#include "route_lane16.cuh"

// Launch arguments (mirrored field for field by RouteBackwardParams in moe_fastmask/ops/cuda_route.py).
struct RouteBackwardParams {
  void* grad_logits;          // [T, E] logits' dtype, contiguous (written)
  const void* grad_weights;   // [T, k] logits' dtype, contiguous
  const void* logits;         // [T, E] strided
  const int64_t* ids;         // [T, k] int64, contiguous
  const uint8_t* ids8;        // [T, k] uint8, contiguous, or null: the same ids a byte each (the forward's, for the
                              // lane kernel, which then reads these instead)
  const uint8_t* keep;        // [G, E] bool, contiguous, or null
  const void* group;          // [T] int32 / int64, contiguous, or null (every token in group 0)
  int64_t stride_t;           // logits strides, in elements
  int64_t stride_e;
  int64_t num_tokens;
  int32_t num_experts;
  int32_t num_groups;         // G: rows of keep (ids outside [0, G) act as -1: no mask)
  int32_t top_k;
  int32_t renormalize;
  int32_t group_is_int64;
  int32_t variant;            // 0: the lane kernel where it applies (see below), 1: always the row-over-lanes one,
                              // 2: (benchmarking) the lane kernel's loads and stores alone (grad_logits = logits)
  int32_t dependent_launch;   // 1: a programmatic dependent launch where the GPU has it (route_lane16.cuh's bits)
  int32_t scoring;            // 0: softmax over the allowed experts (the softmax over the chosen ones comes as
                              // renormalize), 1: sigmoid (see sigmoid_on_row_kernel; whatever the variant)
  float scale;                // the weights' factor (the lane kernel: 1 only)
  const float* chosen_logits; // [T, k] float32, contiguous, or null: the sigmoid router's chosen experts' logits as
                              // its forward saved them (-inf where the pick is masked), read in place of gathering
                              // the logits and keep flags (scoring 1 only; route_bwd_sigmoid_kernel then runs)
};

namespace {

using namespace moe_fastmask_lane16;

constexpr int kBwdThreads = 256;
constexpr int kBwdWarps = kBwdThreads / 32;
constexpr int kBwdMaxExperts = 512;
constexpr int kBwdMaxTopK = 16;

enum BwdDType { kBwdFloat32 = 0, kBwdFloat16 = 1, kBwdBFloat16 = 2 };
// launch flags, chosen by the launcher from the pointers and strides
enum BwdFlags { kVectorLoads = 1, kVectorStores = 2, kKeepWords = 4, kHalfLoads = 8, kHalfStores = 16 };

__device__ __forceinline__ float bwd_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// two floats as a bfloat16 pair (lo in the low half), each rounded to nearest even
__device__ __forceinline__ unsigned int bf16x2_pack(float lo, float hi) {
  unsigned int d;
  asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(d) : "f"(hi), "f"(lo));
  return d;
}

// a * b and a * b + c per bfloat16 half, each rounded once
__device__ __forceinline__ unsigned int bf16x2_mul(unsigned int a, unsigned int b) {
  unsigned int d;
  asm("mul.rn.bf16x2 %0, %1, %2;" : "=r"(d) : "r"(a), "r"(b));
  return d;
}
__device__ __forceinline__ unsigned int bf16x2_fma(unsigned int a, unsigned int b, unsigned int c) {
  unsigned int d;
  asm("fma.rn.bf16x2 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
  return d;
}

// 1 / x within 1 ulp (NaN stays NaN); the callers' x are far from the subnormal range
__device__ __forceinline__ float bwd_rcp(float x) {
  float y;
  asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// An element's bits, its float value, and a float rounded back to the element's bits.
template <typename T> struct BwdElem;
template <> struct BwdElem<float> {
  using Bits = unsigned int;
  static __device__ __forceinline__ float to_float(unsigned int b) { return __uint_as_float(b); }
  static __device__ __forceinline__ unsigned int from_float(float v) { return __float_as_uint(v); }
};
template <> struct BwdElem<__half> {
  using Bits = unsigned short;
  static __device__ __forceinline__ float to_float(unsigned int b) {
    return __half2float(__ushort_as_half(static_cast<unsigned short>(b)));
  }
  static __device__ __forceinline__ unsigned int from_float(float v) { return __half_as_ushort(__float2half_rn(v)); }
};
template <> struct BwdElem<__nv_bfloat16> {
  using Bits = unsigned short;
  static __device__ __forceinline__ float to_float(unsigned int b) { return __uint_as_float(b << 16); }
  static __device__ __forceinline__ unsigned int from_float(float v) {
    return __bfloat16_as_ushort(__float2bfloat16_rn(v));
  }
};

template <typename T, int E_PAD> struct BwdShape {
  static constexpr int V = E_PAD >= 64 ? 16 : 8;                // experts per lane
  static constexpr int CH = 16 / static_cast<int>(sizeof(T));  // elements per 16-byte chunk
  static constexpr int NCH = V / CH;                            // chunks per lane
  static constexpr int NQ = V / 4;                              // runs of 4 consecutive experts per lane
  static constexpr int L = E_PAD / V;                           // lanes per row
  static constexpr int R = 32 / L;                              // rows per warp step
  static constexpr int SLOTS = R * E_PAD;                       // scatter-buffer slots per warp (32 V)
  static constexpr int KMAX = kBwdMaxTopK < E_PAD ? kBwdMaxTopK : E_PAD;
  static constexpr int J = (KMAX + L - 1) / L;                  // (id, grad) entries per lane
  // resident blocks: at most 64 registers (32 warps per SM, each with a step of loads in flight); 80 where a lane
  // holds 8 (id, grad) entries (E_PAD <= 16) and in the checked instances (their bounds checks need more), 128 in
  // the checked float32 ones (no spills)
  static constexpr int kMinBlocksVec = J > 4 ? 3 : 4;
  static constexpr int kMinBlocksChecked = sizeof(T) == 4 ? 2 : 3;
  static_assert(E_PAD >= 8 && E_PAD <= kBwdMaxExperts && (E_PAD & (E_PAD - 1)) == 0, "E_PAD: power of two, 8..512");
  static_assert(L * V == E_PAD && R * L == 32 && SLOTS == 32 * V, "lane layout");
  static_assert(NCH * CH == V && CH % 4 == 0, "a lane's experts come in runs of 4 inside its chunks");
  static_assert(J * L >= KMAX, "every (id, grad) entry has a lane");
};

// element c (0 <= c < CH) of a 16-byte chunk, as bits
template <typename T>
__device__ __forceinline__ unsigned int chunk_bits(const uint4& v, int c) {
  const unsigned int w[4] = {v.x, v.y, v.z, v.w};
  if constexpr (sizeof(T) == 4) {
    return w[c];
  } else {
    return (w[c >> 1] >> (16 * (c & 1))) & 0xFFFFu;
  }
}

// VEC: the fast instance, for E == E_PAD, contiguous 16-byte aligned logits rows and output, and a 4-byte aligned
// keep mask (16-byte loads and stores, 4-byte keep words, no bounds checks on experts). Otherwise every access is
// checked against E: the logits are read in whole 16-byte chunks where the rows allow it (flags & kVectorLoads), else
// in whole 8-byte halves of chunks (flags & kHalfLoads: e.g. 60 contiguous 16-bit experts), else element by element
// through their strides; likewise the output (kVectorStores, kHalfStores). SIGMOID: the sigmoid router's instance
// (vector only, E_PAD <= 256: see sigmoid_on_row_kernel), so that the softmax routers' instances carry none of its code
// (they measured 7-8% slower with it: benchmarks/RESULTS.md, twenty-sixth round).
template <typename T, int E_PAD, bool VEC, bool SIGMOID = false>
__global__ void __launch_bounds__(kBwdThreads,
                                  VEC ? BwdShape<T, E_PAD>::kMinBlocksVec : BwdShape<T, E_PAD>::kMinBlocksChecked)
route_bwd_kernel(const RouteBackwardParams p, const int flags) {
  using S = BwdShape<T, E_PAD>;
  using Elem = BwdElem<T>;
  using Bits = typename Elem::Bits;
  constexpr int V = S::V, CH = S::CH, NCH = S::NCH, NQ = S::NQ, L = S::L, R = S::R, J = S::J;
  constexpr float kLog2e = 1.4426950408889634f;
  __shared__ __align__(16) float s_grad[kBwdWarps][S::SLOTS];          // G per (row, expert)
  __shared__ __align__(16) unsigned char s_pick[kBwdWarps][S::SLOTS];  // 1: a chosen expert (renormalize)

  const int E = VEC ? E_PAD : p.num_experts;
  const int top_k = p.top_k;
  const int64_t num_tokens = p.num_tokens;
  const bool renormalize = p.renormalize != 0;
  static_assert(!SIGMOID || (VEC && E_PAD <= 256), "the sigmoid router's instances: see sigmoid_on_row_kernel");
  constexpr bool sigmoid = SIGMOID;
  const bool need_pick = renormalize && !sigmoid;  // (the chosen experts' flags, for the softmax renormalised)
  const float scale = p.scale;
  const bool vector_loads = VEC || (flags & kVectorLoads) != 0;
  const bool vector_stores = VEC || (flags & kVectorStores) != 0;
  const bool half_loads = (flags & kHalfLoads) != 0;
  const bool half_stores = (flags & kHalfStores) != 0;
  const bool keep_words = VEC || (flags & kKeepWords) != 0;
  const bool has_keep = p.keep != nullptr;
  const Bits* logits = static_cast<const Bits*>(p.logits);
  const Bits* grad_weights = static_cast<const Bits*>(p.grad_weights);
  Bits* grad_logits = static_cast<Bits*>(p.grad_logits);

  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int sub = lane % L;  // lane within its row
  const int r = lane / L;    // row within the warp step
  // the lane's element i is expert chunk_e[i / CH] + i % CH; elements 4h .. 4h + 3 are the consecutive experts
  // quad_e[h] .. quad_e[h] + 3
  int chunk_e[NCH];
#pragma unroll
  for (int q = 0; q < NCH; ++q) chunk_e[q] = (q * L + sub) * CH;
  int quad_e[NQ];
#pragma unroll
  for (int h = 0; h < NQ; ++h) quad_e[h] = chunk_e[(4 * h) / CH] + (4 * h) % CH;
  unsigned int in_range = 0u;  // bit i: element i is a real expert (< E)
#pragma unroll
  for (int i = 0; i < V; ++i) in_range |= static_cast<unsigned int>(chunk_e[i / CH] + i % CH < E) << i;

  float* const my_grad = &s_grad[warp][r * E_PAD];  // the row's slots (R * E_PAD per warp)
  unsigned char* const my_pick = &s_pick[warp][r * E_PAD];

  const int64_t num_warps = static_cast<int64_t>(gridDim.x) * kBwdWarps;
  const int64_t warp_id = static_cast<int64_t>(blockIdx.x) * kBwdWarps + warp;
  dependent_launch_start(p.dependent_launch);  // (before any global memory access: the kernel before may write them)

  for (int64_t base = warp_id * R; base < num_tokens; base += num_warps * R) {
    const int64_t row = base + r;
    const bool valid = row < num_tokens;

    // ---- loads, all issued before any is used: group id, logits, (id, grad) entries
    int64_t keep_row = -1;  // -1: no mask
    if (has_keep && valid) {
      int64_t g = 0;
      if (p.group != nullptr) {
        g = p.group_is_int64 ? __ldcs(static_cast<const long long*>(p.group) + row)
                             : static_cast<int64_t>(__ldcs(static_cast<const int*>(p.group) + row));
      }
      keep_row = static_cast<uint64_t>(g) < static_cast<uint64_t>(p.num_groups) ? g : -1;
    }
    uint4 raw[NCH];
    const Bits* src = logits + row * p.stride_t;
#pragma unroll
    for (int q = 0; q < NCH; ++q) {
      const int e = chunk_e[q];
      if (sigmoid) {
        raw[q] = make_uint4(0u, 0u, 0u, 0u);  // (the sigmoid router reads its chosen experts' logits alone, below)
      } else if (vector_loads && valid && (VEC || e + CH <= E)) {
        raw[q] = __ldcs(reinterpret_cast<const uint4*>(src + e));
      } else {
        unsigned int w[4] = {0u, 0u, 0u, 0u};
        if constexpr (!VEC) {
#pragma unroll
          for (int hh = 0; hh < 2; ++hh) {  // the chunk's 8-byte halves: elements hh * CH / 2 ...
            const int eh = e + hh * (CH / 2);
            if (half_loads && valid && eh + CH / 2 <= E) {
              const uint2 v = __ldcs(reinterpret_cast<const uint2*>(src + eh));
              w[2 * hh] = v.x;
              w[2 * hh + 1] = v.y;
            } else {
#pragma unroll
              for (int c = hh * (CH / 2); c < (hh + 1) * (CH / 2); ++c) {
                if (valid && e + c < E) {
                  const unsigned int b = src[static_cast<int64_t>(e + c) * p.stride_e];
                  if constexpr (sizeof(T) == 4) {
                    w[c] = b;
                  } else {
                    w[c >> 1] |= b << (16 * (c & 1));
                  }
                }
              }
            }
          }
        }
        raw[q] = make_uint4(w[0], w[1], w[2], w[3]);
      }
    }
    long long ids[J];
    float grads[J];
#pragma unroll
    for (int jj = 0; jj < J; ++jj) {
      const int j = sub + jj * L;
      ids[jj] = -1;
      grads[jj] = 0.0f;
      if (valid && j < top_k) {
        const int64_t at = row * top_k + j;
        ids[jj] = __ldcs(reinterpret_cast<const long long*>(p.ids) + at);
        grads[jj] = Elem::to_float(__ldcs(grad_weights + at)) * scale;
      }
    }
    // the allowed experts among the lane's V (bit i: element i), from the keep row (after the group id)
    unsigned int allowed = in_range;
    if (keep_row >= 0 && !sigmoid) {
      const uint8_t* keep = p.keep + keep_row * E;
      unsigned int kept = 0u;
#pragma unroll
      for (int h = 0; h < NQ; ++h) {
        const int e = quad_e[h];
        if (keep_words && (VEC || e + 4 <= E)) {
          const unsigned int word = __ldg(reinterpret_cast<const unsigned int*>(keep + e));
#pragma unroll
          for (int c = 0; c < 4; ++c) {
            kept |= static_cast<unsigned int>(((word >> (8 * c)) & 0xFFu) != 0) << (4 * h + c);
          }
        } else if constexpr (!VEC) {
#pragma unroll
          for (int c = 0; c < 4; ++c) {
            if (e + c < E) kept |= static_cast<unsigned int>(__ldg(keep + e + c) != 0) << (4 * h + c);
          }
        }
      }
      allowed &= kept;
    }

    if (sigmoid) {
      // ---- the sigmoid router's gradient per (id, grad) entry, from its expert's logit and keep flag alone
      // (gathered): s and s (1 - s) from t = 2^(-|z| log2e), which never overflows: s = 1 / (1 + t) for z >= 0,
      // t / (1 + t) below, and s (1 - s) = t / (1 + t)^2 either way (no cancellation where s is near 1); a masked
      // expert s = 0. The entries' gradients then go through the scatter below in place of the incoming ones.
      float sv[J], ds[J];
      float picked = 0.0f, dot = 0.0f;  // sums of s and of G s over the row's entries
#pragma unroll
      for (int jj = 0; jj < J; ++jj) {
        sv[jj] = 0.0f;
        ds[jj] = 0.0f;
        const long long e = ids[jj];
        if (static_cast<unsigned long long>(e) < static_cast<unsigned long long>(E) &&  // (-1: no entry)
            (keep_row < 0 || __ldg(p.keep + keep_row * E + e) != 0)) {
          const float z = Elem::to_float(src[static_cast<int64_t>(e) * p.stride_e]);
          const float t = bwd_exp2(-fabsf(z) * kLog2e);
          const float r = bwd_rcp(1.0f + t);
          sv[jj] = z >= 0.0f ? r : t * r;  // (NaN: t * r, NaN)
          ds[jj] = t * r * r;
        }
        picked += sv[jj];
        dot += grads[jj] * sv[jj];
      }
      if (renormalize) {
#pragma unroll
        for (int off = L / 2; off > 0; off >>= 1) {
          picked += __shfl_xor_sync(0xffffffffu, picked, off, L);
          dot += __shfl_xor_sync(0xffffffffu, dot, off, L);
        }
        const float rinv = bwd_rcp(picked + 1e-20f);  // (>= 1e-20: a normal float, as is its reciprocal)
        const float shift = dot * rinv;
#pragma unroll
        for (int jj = 0; jj < J; ++jj) grads[jj] = (grads[jj] - shift) * rinv * ds[jj];
      } else {
#pragma unroll
        for (int jj = 0; jj < J; ++jj) grads[jj] *= ds[jj];
      }
    }

    // ---- scatter the chosen experts' grads (sigmoid: their gradients): zero own slots, sync, scatter, sync, read own
    // slots back
#pragma unroll
    for (int h = 0; h < NQ; ++h) {
      *reinterpret_cast<float4*>(my_grad + quad_e[h]) = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
      if (need_pick) *reinterpret_cast<unsigned int*>(my_pick + quad_e[h]) = 0u;
    }
    __syncwarp();
#pragma unroll
    for (int jj = 0; jj < J; ++jj) {
      const long long e = ids[jj];
      if (static_cast<unsigned long long>(e) < static_cast<unsigned long long>(E)) {  // (-1: no entry)
        my_grad[e] = grads[jj];
        if (need_pick) my_pick[e] = 1;
      }
    }
    __syncwarp();
    float G[V];
    unsigned int chosen = 0u;  // bit i: element i is a chosen expert (need_pick)
#pragma unroll
    for (int h = 0; h < NQ; ++h) {
      const float4 v = *reinterpret_cast<const float4*>(my_grad + quad_e[h]);
      G[4 * h] = v.x;
      G[4 * h + 1] = v.y;
      G[4 * h + 2] = v.z;
      G[4 * h + 3] = v.w;
      if (need_pick) {
        const unsigned int word = *reinterpret_cast<const unsigned int*>(my_pick + quad_e[h]);
#pragma unroll
        for (int c = 0; c < 4; ++c) {
          chosen |= static_cast<unsigned int>(((word >> (8 * c)) & 0xFFu) != 0) << (4 * h + c);
        }
      }
    }

    float dz[V];
    if (sigmoid) {
#pragma unroll
      for (int i = 0; i < V; ++i) dz[i] = G[i];  // (0 off the chosen experts)
    } else {
      // ---- masked softmax (padding and masked experts read as -inf), then the gradient
      float prob[V];
#pragma unroll
      for (int i = 0; i < V; ++i) {
        prob[i] = ((allowed >> i) & 1u) ? Elem::to_float(chunk_bits<T>(raw[i / CH], i % CH)) : -INFINITY;
      }
      float row_max = -INFINITY;
#pragma unroll
      for (int i = 0; i < V; ++i) row_max = fmaxf(row_max, prob[i]);
#pragma unroll
      for (int off = L / 2; off > 0; off >>= 1) {
        row_max = fmaxf(row_max, __shfl_xor_sync(0xffffffffu, row_max, off, L));
      }
      float sum = 0.0f;
#pragma unroll
      for (int i = 0; i < V; ++i) {
        prob[i] = bwd_exp2((prob[i] - row_max) * kLog2e);
        sum += prob[i];
      }
#pragma unroll
      for (int off = L / 2; off > 0; off >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, off, L);
      const float inv = bwd_rcp(sum);  // sum in [1, E], or NaN
#pragma unroll
      for (int i = 0; i < V; ++i) prob[i] *= inv;

      if (!renormalize) {
        float dot = 0.0f;  // sum_e G_e p_e (G is 0 off the chosen experts)
#pragma unroll
        for (int i = 0; i < V; ++i) dot += G[i] * prob[i];
#pragma unroll
        for (int off = L / 2; off > 0; off >>= 1) dot += __shfl_xor_sync(0xffffffffu, dot, off, L);
#pragma unroll
        for (int i = 0; i < V; ++i) dz[i] = fmaf(prob[i], G[i], -(prob[i] * dot));  // (G - dot may overflow)
      } else {
        float picked = 0.0f, dot = 0.0f;  // sums of p and of G p over the chosen experts
#pragma unroll
        for (int i = 0; i < V; ++i) {
          if ((chosen >> i) & 1u) {
            picked += prob[i];
            dot += G[i] * prob[i];
          }
        }
#pragma unroll
        for (int off = L / 2; off > 0; off >>= 1) {
          picked += __shfl_xor_sync(0xffffffffu, picked, off, L);
          dot += __shfl_xor_sync(0xffffffffu, dot, off, L);
        }
        const float rinv = bwd_rcp(picked);  // picked >= the top chosen p >= 1 / E, or NaN
        dot *= rinv;                          // sum_l g_l w_l
#pragma unroll
        for (int i = 0; i < V; ++i) {
          const float w = prob[i] * rinv;
          dz[i] = ((chosen >> i) & 1u) ? fmaf(w, G[i], -(w * dot)) : 0.0f;  // (w G - w dot: G - dot may overflow)
        }
      }
    }

    if (valid) {
      Bits* out = grad_logits + row * E;
#pragma unroll
      for (int q = 0; q < NCH; ++q) {
        const int e = chunk_e[q];
        unsigned int w[4];  // the chunk as bits
        if constexpr (sizeof(T) == 4) {
#pragma unroll
          for (int c = 0; c < 4; ++c) w[c] = Elem::from_float(dz[q * CH + c]);
        } else {
#pragma unroll
          for (int c = 0; c < 4; ++c) {
            w[c] = Elem::from_float(dz[q * CH + 2 * c]) | (Elem::from_float(dz[q * CH + 2 * c + 1]) << 16);
          }
        }
        // (vector stores: E is a multiple of CH, so a chunk that starts below E is whole; half stores: likewise for
        // the 8-byte halves)
        if (vector_stores && (VEC || e < E)) {
          __stcs(reinterpret_cast<uint4*>(out + e), make_uint4(w[0], w[1], w[2], w[3]));
        } else if constexpr (!VEC) {
#pragma unroll
          for (int hh = 0; hh < 2; ++hh) {
            const int eh = e + hh * (CH / 2);
            if (half_stores && eh < E) {
              __stcs(reinterpret_cast<uint2*>(out + eh), make_uint2(w[2 * hh], w[2 * hh + 1]));
            } else {
#pragma unroll
              for (int c = hh * (CH / 2); c < (hh + 1) * (CH / 2); ++c) {
                if (e + c < E) out[e + c] = static_cast<Bits>(Elem::from_float(dz[q * CH + c]));
              }
            }
          }
        }
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------------------------
// The sigmoid router's backward. Its gradient is 0 off the chosen experts, and each chosen expert's needs only that
// expert's logit and keep flag (renormalised: also the sums of s and G s over the row's k entries), so a row is
// zeros but for k values, and the logits are never read whole: the forward's saved chosen logits (chosen_logits,
// -inf for a masked pick) are read in their place, or each entry's logit and keep flag are gathered. A warp takes
// RP = 32 / KP rows a step (KP: top_k rounded up to a power of two; lane r * KP + j holds entry j of row r): it issues
// the step's loads (ids, grads, and the saved logits or the group ids), writes zeros over the step's rows of
// grad_logits (contiguous: whole 16-byte stores where aligned) while those land, gathers what it was not given,
// computes the entries' gradients (the row sums by shuffles over KP lanes) and, after a __syncwarp (which orders
// every lane's zeros before them), stores them in place. Many rows a warp step and many warps an SM keep the gathers' chains of dependent loads overlapped, where the
// row-over-lanes kernel above takes one 512-expert row a warp step, or runs its checked instance (E not a power of
// two), and waits out each row's chain with few rows in flight. Same math, NaN rules and handling of ids outside
// [0, E) as that kernel (see the top of this file).
// ---------------------------------------------------------------------------------------------------------------

constexpr int kSigmoidBwdMinBlocks = 4;  // (of kBwdThreads: 32 warps an SM at up to 64 registers, no spills)

// Zeros over the n elements from dst (which is element-aligned), by the 32 lanes of a warp: 16-byte stores over the
// 16-byte aligned middle, element stores at the ends (fewer than 16 bytes each).
template <typename Bits>
__device__ __forceinline__ void warp_zero_fill(Bits* dst, int64_t n, int lane) {
  constexpr int kPerChunk = 16 / static_cast<int>(sizeof(Bits));
  const int misaligned = static_cast<int>(reinterpret_cast<uintptr_t>(dst) & 15u);
  const int64_t to_boundary = ((16 - misaligned) & 15) / static_cast<int>(sizeof(Bits));
  const int64_t head = to_boundary < n ? to_boundary : n;
  const int64_t chunks = (n - head) / kPerChunk;
  const int64_t tail = head + chunks * kPerChunk;
  if (lane < head) dst[lane] = 0;
  uint4* const middle = reinterpret_cast<uint4*>(dst + head);
  for (int64_t c = lane; c < chunks; c += 32) middle[c] = make_uint4(0u, 0u, 0u, 0u);
  if (tail + lane < n) dst[tail + lane] = 0;
}

template <typename T>
__global__ void __launch_bounds__(kBwdThreads, kSigmoidBwdMinBlocks)
route_bwd_sigmoid_kernel(const RouteBackwardParams p, const int kp_log2) {
  using Elem = BwdElem<T>;
  using Bits = typename Elem::Bits;
  constexpr float kLog2e = 1.4426950408889634f;
  const int E = p.num_experts;
  const int top_k = p.top_k;
  const int64_t num_tokens = p.num_tokens;
  const int KP = 1 << kp_log2;
  const int rows_per_step = 32 >> kp_log2;
  const Bits* logits = static_cast<const Bits*>(p.logits);
  const Bits* grad_weights = static_cast<const Bits*>(p.grad_weights);
  Bits* grad_logits = static_cast<Bits*>(p.grad_logits);

  const int lane = threadIdx.x & 31;
  const int j = lane & (KP - 1);  // the lane's entry of its row
  const int r = lane >> kp_log2;  // its row within the step
  const int64_t num_warps = static_cast<int64_t>(gridDim.x) * kBwdWarps;
  const int64_t warp_id = static_cast<int64_t>(blockIdx.x) * kBwdWarps + (threadIdx.x >> 5);
  dependent_launch_start(p.dependent_launch);  // (before any global memory access: the kernel before may write them)

  for (int64_t base = warp_id * rows_per_step; base < num_tokens; base += num_warps * rows_per_step) {
    const int64_t row = base + r;
    // ---- the step's loads: (id, grad) entries and group ids
    long long id = -1;
    float g = 0.0f, saved = 0.0f;
    int64_t keep_row = -1;  // -1: no mask
    if (row < num_tokens && j < top_k) {
      const int64_t at = row * top_k + j;
      id = __ldcs(reinterpret_cast<const long long*>(p.ids) + at);
      g = Elem::to_float(__ldcs(grad_weights + at)) * p.scale;
      if (p.chosen_logits != nullptr) {
        saved = __ldcs(p.chosen_logits + at);
      } else if (p.keep != nullptr) {
        int64_t group = 0;
        if (p.group != nullptr) {
          group = p.group_is_int64 ? __ldg(static_cast<const long long*>(p.group) + row)
                                   : static_cast<int64_t>(__ldg(static_cast<const int*>(p.group) + row));
        }
        keep_row = static_cast<uint64_t>(group) < static_cast<uint64_t>(p.num_groups) ? group : -1;
      }
    }
    // ---- zeros over the step's rows while those land
    const int64_t end = base + rows_per_step < num_tokens ? base + rows_per_step : num_tokens;
    warp_zero_fill(grad_logits + base * E, (end - base) * E, lane);

    // ---- the entry's gradient, from its expert's logit (saved, or gathered with its keep flag, the two loads side
    // by side): s and s (1 - s) from t = 2^(-|z| log2e), which never overflows: s = 1 / (1 + t) for z >= 0,
    // t / (1 + t) below, and s (1 - s) = t / (1 + t)^2 either way (no cancellation where s is near 1); a masked
    // expert counts as z = -inf: t = 0, s = s (1 - s) = 0
    const bool in_range = static_cast<unsigned long long>(id) < static_cast<unsigned long long>(E);  // (-1: none)
    float s = 0.0f, ds = 0.0f;
    if (in_range) {
      float z = saved;
      if (p.chosen_logits == nullptr) {
        z = Elem::to_float(logits[row * p.stride_t + static_cast<int64_t>(id) * p.stride_e]);
        if (keep_row >= 0 && __ldg(p.keep + keep_row * E + id) == 0) z = -INFINITY;
      }
      const float t = bwd_exp2(-fabsf(z) * kLog2e);
      const float rc = bwd_rcp(1.0f + t);
      s = z >= 0.0f ? rc : t * rc;  // (NaN: t * rc, NaN)
      ds = t * rc * rc;
    }
    if (p.renormalize) {
      float picked = s, dot = g * s;  // sums of s and of G s over the row's entries
      for (int off = KP / 2; off > 0; off >>= 1) {
        picked += __shfl_xor_sync(0xffffffffu, picked, off, KP);
        dot += __shfl_xor_sync(0xffffffffu, dot, off, KP);
      }
      const float rinv = bwd_rcp(picked + 1e-20f);  // (>= 1e-20: a normal float, as is its reciprocal)
      g = (g - dot * rinv) * rinv * ds;
    } else {
      g *= ds;
    }
    __syncwarp();  // (every lane's zeros before the values over them)
    if (in_range) grad_logits[row * E + id] = static_cast<Bits>(Elem::from_float(g));
  }
}

// ---------------------------------------------------------------------------------------------------------------
// "lane" backward: one row per lane, for the default router (softmax, scale 1) on 16-bit logits with E = 32 or 64
// (rows contiguous and 16-byte aligned), top_k == 8, int64 ids (or the forward's one-byte copy of them, ids8: 56
// fewer bytes read per row) and the output 16-byte aligned; the variant the launcher takes where it applies.
//
// The kernel above spreads a row over 4 lanes and spends its instructions on shuffles and on scattering the chosen
// grads through shared memory. Here a warp copies 32 rows (logits, ids, incoming grads) into shared memory with
// cp.async, as the forward's lane kernel does, two tiles in flight per warp, and each lane works on its own row:
//   0. the chosen experts' logits gathered from the row;
//   1. the softmax denominator in one pass over the row, against the largest logit R of its first 8 experts (masked
//      or not): every term is t = 2^(z log2e - ref), ref = fl(R log2e), one FMA rounded once; bfloat16 rows write
//      each t back over its logit, as a bfloat16 (a masked expert's: 0). Where some row of the warp has a sum
//      outside (2^-60, 2^100] (an overflow, an underflow against a masked R, NaN, +-inf, all -inf) the warp takes
//      the exact form, 2^((z - max) log2e), with the row max from a first pass (each lane first copying its row's
//      logits in again where the pass overwrote them);
//   2. the chosen experts' probabilities, and dot = sum_j g_j p_j;
//   3. a second pass writes dz = -p dot (renormalised: 0) over the row in place, then the chosen experts' dz over
//      it, and the warp stores the tile as whole 512-byte lines. On bfloat16 rows that pass multiplies the kept
//      terms by -dot / sum two at a time (bfloat16x2 FMAs: no second exponential, no mask); dz is then rounded twice
//      (the term, then the product: within 2^-7 of it, where float16 rows and the other kernel round once).
// Same math, NaN rules and handling of ids outside [0, E) (they contribute nothing) as the kernel above.
// ---------------------------------------------------------------------------------------------------------------

constexpr int kLaneBwdTopK = 8;
constexpr int kLaneBwdWarps = 2;  // per block (two stages of 6.5 KB per warp at E = 64: 16 warps per SM)

template <int E_PAD, bool IDS8> struct LaneBwdShape {
  static constexpr int NC = E_PAD / 8;                       // 16-byte chunks per row
  static constexpr int kTileBytes = 32 * E_PAD * 2;          // a tile's logits (then its gradient)
  static constexpr int kIdsBytes = 32 * kLaneBwdTopK * (IDS8 ? 1 : 8);  // its ids
  static constexpr int kGradBytes = 32 * kLaneBwdTopK * 2;   // its incoming grads
  static constexpr int kStageBytes = kTileBytes + kIdsBytes + kGradBytes;
  static constexpr int kStages = 2;
  static constexpr int kMaskEntries = E_PAD / 2 + 2;         // mask-table entries per group row (2 of padding)
  static constexpr int kMinBlocks = 8;
};

// LOAD_STORE (benchmarking only; variant 2): the same copies, tiles and stores without the math, each tile's logits
// written back out as its gradient: the kernel's memory floor
template <typename T, int E_PAD, bool MASK, bool IDS8, bool LOAD_STORE = false>
__global__ void __launch_bounds__(kLaneBwdWarps * 32, LaneBwdShape<E_PAD, IDS8>::kMinBlocks)
route_bwd_lane_kernel(const RouteBackwardParams p) {
  using S = LaneBwdShape<E_PAD, IDS8>;
  using L = Lane16<T>;
  constexpr int NC = S::NC;
  constexpr float kLog2e = 1.4426950408889634f;
  // bfloat16 rows keep their first pass's softmax terms (see above); float16 ones recompute them
  constexpr bool kKeepTerms = std::is_same<T, __nv_bfloat16>::value;
  extern __shared__ __align__(16) unsigned char bwd_lane_smem[];

  const int G = MASK ? p.num_groups : 0;  // mask-table rows 0 .. G - 1 from keep; row G keeps everything
  const bool renormalize = p.renormalize != 0;
  const int64_t T_rows = p.num_tokens;
  const int lane = threadIdx.x & 31;
  const int warp_in_block = threadIdx.x >> 5;
  const int64_t num_tiles = (T_rows + 31) / 32;
  const int64_t num_warps = static_cast<int64_t>(gridDim.x) * kLaneBwdWarps;
  int64_t tile = static_cast<int64_t>(blockIdx.x) * kLaneBwdWarps + warp_in_block;
  unsigned char* const my_stages = bwd_lane_smem + warp_in_block * S::kStages * S::kStageBytes;
  const unsigned int my_stages_s = static_cast<unsigned int>(__cvta_generic_to_shared(my_stages));
  uint2* const mask_table = reinterpret_cast<uint2*>(bwd_lane_smem + kLaneBwdWarps * S::kStages * S::kStageBytes);
  const T* const logits = static_cast<const T*>(p.logits);
  const int64_t* const ids = p.ids;
  const T* const grad_weights = static_cast<const T*>(p.grad_weights);
  T* const grad_logits = static_cast<T*>(p.grad_logits);

  // copy tile t into stage b: logits chunk c of row r at 16-byte slot r * NC + swizzle(r, c); the ids' 16-byte
  // piece c (ids 2c, 2c + 1) of row r at slot 4 r + (c ^ ((r >> 1) & 3)) (8 lanes reading their rows' piece c hit 8
  // bank groups); the grads of row r at slot r. Rows past the end are zero-filled.
  // (a lane's logits copies q = 0, 1, ... move chunk lane % NC of rows lane / NC + q * 32 / NC: one 32-bit byte step
  // apart in global memory)
  constexpr int kRowsPerCopy = 32 / NC;
  const int copy_row = lane / NC, copy_chunk = lane % NC;
  const unsigned int copy_step = static_cast<unsigned int>(p.stride_t) * (kRowsPerCopy * 2);
  auto issue = [&](int64_t t, int b) {
    const unsigned int dst = my_stages_s + b * S::kStageBytes;
    const int64_t rows_left = T_rows - t * 32;
    const unsigned char* src = reinterpret_cast<const unsigned char*>(logits + (t * 32 + copy_row) * p.stride_t) +
                               copy_chunk * 16;
#pragma unroll
    for (int q = 0; q < NC; ++q) {
      const int r = copy_row + q * kRowsPerCopy;
      const bool ok = r < rows_left;
      cp_async16(dst + (r * NC + swizzle<NC>(r, copy_chunk)) * 16, ok ? src + q * copy_step : src, ok ? 16 : 0);
    }
    if constexpr (IDS8) {  // 256 bytes: piece u (lanes 0 .. 15) holds rows 2u and 2u + 1, at slot u
      if (lane < 16) {
        const int bytes = rows_left >= 2 * lane + 2 ? 16 : rows_left == 2 * lane + 1 ? 8 : 0;
        cp_async16(dst + S::kTileBytes + lane * 16, p.ids8 + (t * 32 + (bytes != 0 ? 2 * lane : 0)) * 8, bytes);
      }
    } else {
      const int64_t* ids_src = ids + (t * 32 + lane / 4) * 8 + 2 * (lane % 4);
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        const int r = q * 8 + lane / 4, c = lane % 4;
        const bool ok = r < rows_left;
        cp_async16(dst + S::kTileBytes + (r * 4 + (c ^ ((r >> 1) & 3))) * 16, ok ? ids_src + q * 64 : ids_src,
                   ok ? 16 : 0);
      }
    }
    const bool ok = lane < rows_left;
    cp_async16(dst + S::kTileBytes + S::kIdsBytes + lane * 16, grad_weights + (t * 32 + (ok ? lane : 0)) * 8,
               ok ? 16 : 0);
    cp_async_commit();
  };
  // the group id of the lane's row in tile t (group_id_words: loaded a tile ahead, checked where used; without a
  // mask, or without group ids, 0)
  auto load_group = [&](int64_t t, unsigned int& lo, unsigned int& hi) {
    group_id_words(MASK ? p.group : nullptr, p.group_is_int64, t * 32 + lane, T_rows, lo, hi);
  };

  dependent_launch_start(p.dependent_launch);  // (before any global memory access: the kernel before may write them)
  unsigned int g_lo = 0xFFFFFFFFu, g_hi = 0;
  if (tile < num_tiles) {  // (the first copy goes out before the mask table is built)
    load_group(tile, g_lo, g_hi);
    issue(tile, 0);
  }
  if constexpr (MASK) {
    fill_mask_table(mask_table, S::kMaskEntries, p.keep, E_PAD, G);
    __syncthreads();
  }

  int buf = 0;
  for (; tile < num_tiles; tile += num_warps, buf ^= 1) {
    const int64_t next = tile + num_warps;
    cp_async_wait_all();
    __syncwarp();
    if (next < num_tiles) issue(next, buf ^ 1);
    const int gi = MASK && g_hi == 0 && g_lo < static_cast<unsigned int>(G) ? static_cast<int>(g_lo) : G;
    if (next < num_tiles) load_group(next, g_lo, g_hi);

    const int64_t rows_left = T_rows - tile * 32;
    unsigned char* const stage = my_stages + buf * S::kStageBytes;
    if constexpr (LOAD_STORE) {
      (void)gi;  // (benchmarking: the tile's logits go back out as its gradient, unchanged)
    } else {
      uint4* const my_row = reinterpret_cast<uint4*>(stage) + lane * NC;  // chunk c at my_row[swizzle<NC>(lane, c)]
      const uint2* const my_mask = mask_table + gi * S::kMaskEntries;     // (MASK) entry of expert pair i

      // the row's ids (valid: in [0, E)) and incoming grads
      int chosen[kLaneBwdTopK];
      bool valid[kLaneBwdTopK];
      if constexpr (IDS8) {
        const uint2 v = reinterpret_cast<const uint2*>(stage + S::kTileBytes)[lane];
#pragma unroll
        for (int s = 0; s < kLaneBwdTopK; ++s) {
          const unsigned int id = ((s < 4 ? v.x : v.y) >> (8 * (s % 4))) & 0xFFu;
          chosen[s] = static_cast<int>(id & (E_PAD - 1));
          valid[s] = id < static_cast<unsigned int>(E_PAD);
        }
      } else {
#pragma unroll
        for (int c = 0; c < 4; ++c) {
          const uint4 v = reinterpret_cast<const uint4*>(stage + S::kTileBytes)[lane * 4 + (c ^ ((lane >> 1) & 3))];
          chosen[2 * c] = static_cast<int>(v.x & (E_PAD - 1));
          valid[2 * c] = v.y == 0 && v.x < static_cast<unsigned int>(E_PAD);
          chosen[2 * c + 1] = static_cast<int>(v.z & (E_PAD - 1));
          valid[2 * c + 1] = v.w == 0 && v.z < static_cast<unsigned int>(E_PAD);
        }
      }
      float g[kLaneBwdTopK];
      {
        const uint4 v = reinterpret_cast<const uint4*>(stage + S::kTileBytes + S::kIdsBytes)[lane];
        const unsigned int w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          g[2 * j] = L::lo(w[j]);
          g[2 * j + 1] = L::hi(w[j]);
        }
      }
      auto chunk_words = [&](int c, unsigned int (&w)[4], uint2 (&m)[4]) {
        const uint4 raw = lds128(my_row + swizzle<NC>(lane, c));
        w[0] = raw.x;
        w[1] = raw.y;
        w[2] = raw.z;
        w[3] = raw.w;
        if constexpr (MASK) {  // (16-byte rows of the table: entries 4c .. 4c + 3)
          const uint4 m01 = lds128(reinterpret_cast<const uint4*>(my_mask + c * 4));
          const uint4 m23 = lds128(reinterpret_cast<const uint4*>(my_mask + c * 4) + 1);
          m[0] = make_uint2(m01.x, m01.y);
          m[1] = make_uint2(m01.z, m01.w);
          m[2] = make_uint2(m23.x, m23.y);
          m[3] = make_uint2(m23.z, m23.w);
        }
      };

      // the chosen experts' logits, gathered before the first pass overwrites the row (a masked one reads as -inf)
      float chosen_z[kLaneBwdTopK];
#pragma unroll
      for (int s = 0; s < kLaneBwdTopK; ++s) {
        const int e = chosen[s];
        const unsigned short bits = reinterpret_cast<const unsigned short*>(my_row + swizzle<NC>(lane, e >> 3))[e & 7];
        bool kept = true;
        if constexpr (MASK) {
          const uint2 entry = my_mask[e >> 1];
          kept = ((e & 1) ? entry.x : entry.y) != 0u;
        }
        chosen_z[s] = kept ? L::from_bits(bits) : -INFINITY;
      }

      float s0 = 0.0f, s1 = 0.0f, neg_ref = 0.0f;
      // 1. the denominator against ref = fl(R log2e) (see above); with kKeepTerms each term also goes back into the
      // row, in place of its logit, as a bfloat16
#pragma unroll 2
      for (int c = 0; c < NC; ++c) {
        unsigned int w[4];
        uint2 m[4];
        chunk_words(c, w, m);
        if (c == 0) {
          float r = L::lo(w[0]);
#pragma unroll
          for (int j = 0; j < 4; ++j) r = fmaxf(fmaxf(r, L::lo(w[j])), L::hi(w[j]));
          neg_ref = -(r * kLog2e);
        }
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const float2 f = pair_floats<L, MASK>(w[j], m[j]);
          const float t0 = bwd_exp2(fmaf(f.x, kLog2e, neg_ref)), t1 = bwd_exp2(fmaf(f.y, kLog2e, neg_ref));
          s0 += t0;
          s1 += t1;
          if constexpr (kKeepTerms) w[j] = bf16x2_pack(t0, t1);
        }
        if constexpr (kKeepTerms) my_row[swizzle<NC>(lane, c)] = make_uint4(w[0], w[1], w[2], w[3]);
      }
      float sum = s0 + s1;
      const bool one_fma = __all_sync(0xffffffffu, lane >= rows_left || (sum > 0x1p-60f && sum <= 0x1p100f));
      float row_max = 0.0f;
      // the exact form: the row max over the allowed experts (a NaN skipped: its term makes the sum NaN)
      if (!one_fma) {
        if constexpr (kKeepTerms) {  // the first pass overwrote the row: the lane copies its logits in again
          if (lane < rows_left) {
            const uint4* src = reinterpret_cast<const uint4*>(logits + (tile * 32 + lane) * p.stride_t);
#pragma unroll 1
            for (int c = 0; c < NC; ++c) my_row[swizzle<NC>(lane, c)] = src[c];
          }
        }
        // f(pair's floats) over the row, a chunk at a time (a rare path: not unrolled, to spare registers)
        auto each_pair = [&](auto&& f) {
#pragma unroll 1
          for (int c = 0; c < NC; ++c) {
            unsigned int w[4];
            uint2 m[4];
            chunk_words(c, w, m);
#pragma unroll
            for (int j = 0; j < 4; ++j) f(pair_floats<L, MASK>(w[j], m[j]));
          }
        };
        row_max = -INFINITY;
        each_pair([&](float2 f) { row_max = fmaxf(row_max, fmaxf(f.x, f.y)); });
        s0 = s1 = 0.0f;
        each_pair([&](float2 f) {
          s0 += bwd_exp2((f.x - row_max) * kLog2e);
          s1 += bwd_exp2((f.y - row_max) * kLog2e);
        });
        sum = s0 + s1;
      }
      const float inv = bwd_rcp(sum);

      auto finish = [&](auto one_fma_tag) {
        constexpr bool kOneFma = decltype(one_fma_tag)::value;
        auto term = [&](float z) {  // 2^(z log2e - ref), or 2^((z - max) log2e)
          return kOneFma ? bwd_exp2(fmaf(z, kLog2e, neg_ref)) : bwd_exp2((z - row_max) * kLog2e);
        };
        // 2. the chosen experts' probabilities (a masked one: p = 0 * (1 / sum)) and the dot
        float prob[kLaneBwdTopK];
        float dot = 0.0f, picked = 0.0f;
#pragma unroll
        for (int s = 0; s < kLaneBwdTopK; ++s) {
          prob[s] = term(chosen_z[s]) * inv;
          if (valid[s]) {
            dot += g[s] * prob[s];
            picked += prob[s];
          }
        }
        float rinv = 1.0f;
        if (renormalize) {
          rinv = bwd_rcp(picked);  // picked >= the top chosen p >= 1 / E, or NaN
          dot *= rinv;             // sum_l g_l w_l
        }
        // 3. dz = -p dot over the row (renormalised: 0), in place, then the chosen experts' dz
        if (renormalize) {
#pragma unroll
          for (int c = 0; c < NC; ++c) my_row[swizzle<NC>(lane, c)] = make_uint4(0u, 0u, 0u, 0u);
        } else {
          const float scale = -dot * inv;
          if (kKeepTerms && kOneFma && fabsf(scale) <= 0x1p126f) {
            // the kept terms times scale, two per instruction: scale = hi + lo as two bfloat16s, t * hi + (t * lo)
            // rounded once, so each dz is t * scale rounded once (up to a rounding of t * lo, 2^-16 of an ulp)
            const unsigned int hi2 = bf16x2_pack(scale, scale);
            const float lo = scale - __uint_as_float(hi2 << 16);
            const unsigned int lo2 = bf16x2_pack(lo, lo);
#pragma unroll 4
            for (int c = 0; c < NC; ++c) {
              const uint4 t = lds128(my_row + swizzle<NC>(lane, c));
              my_row[swizzle<NC>(lane, c)] =
                  make_uint4(bf16x2_fma(t.x, hi2, bf16x2_mul(t.x, lo2)), bf16x2_fma(t.y, hi2, bf16x2_mul(t.y, lo2)),
                             bf16x2_fma(t.z, hi2, bf16x2_mul(t.z, lo2)), bf16x2_fma(t.w, hi2, bf16x2_mul(t.w, lo2)));
            }
          } else if (kKeepTerms && kOneFma) {  // scale beyond bfloat16's range (or inf, NaN): the products in fp32
#pragma unroll 1
            for (int c = 0; c < NC; ++c) {
              const uint4 t = lds128(my_row + swizzle<NC>(lane, c));
              const unsigned int w[4] = {t.x, t.y, t.z, t.w};
              unsigned int d[4];
#pragma unroll
              for (int j = 0; j < 4; ++j) {
                d[j] = L::pack(__uint_as_float(w[j] << 16) * scale, __uint_as_float(w[j] & 0xFFFF0000u) * scale);
              }
              my_row[swizzle<NC>(lane, c)] = make_uint4(d[0], d[1], d[2], d[3]);
            }
          } else {
#pragma unroll 2
            for (int c = 0; c < NC; ++c) {
              unsigned int w[4];
              uint2 m[4];
              chunk_words(c, w, m);
#pragma unroll
              for (int j = 0; j < 4; ++j) {
                const float2 f = pair_floats<L, MASK>(w[j], m[j]);
                w[j] = L::pack(term(f.x) * scale, term(f.y) * scale);
              }
              my_row[swizzle<NC>(lane, c)] = make_uint4(w[0], w[1], w[2], w[3]);
            }
          }
        }
#pragma unroll
        for (int s = 0; s < kLaneBwdTopK; ++s) {
          if (valid[s]) {
            const int e = chosen[s];
            const float w = prob[s] * rinv;  // (w g - w dot: g - dot overflows where g and -dot are both near the max)
            reinterpret_cast<unsigned short*>(my_row + swizzle<NC>(lane, e >> 3))[e & 7] =
                L::to_bits(fmaf(w, g[s], -(w * dot)));
          }
        }
      };
      if (one_fma) {
        finish(std::true_type{});
      } else {
        finish(std::false_type{});
      }
    }
    __syncwarp();
    // the tile's gradient out as whole 512-byte lines
#pragma unroll
    for (int q = 0; q < NC; ++q) {
      const int u = q * 32 + lane, r = u / NC, c = u % NC;
      if (r < rows_left) {
        __stcs(reinterpret_cast<uint4*>(grad_logits + (tile * 32 + r) * E_PAD + c * 8),
               reinterpret_cast<const uint4*>(stage)[r * NC + swizzle<NC>(r, c)]);
      }
    }
    __syncwarp();  // the stage is free again
  }
}

template <typename T, int E_PAD, bool VEC, bool SIGMOID = false>
cudaError_t launch_bwd(const RouteBackwardParams& p, int flags, int device, cudaStream_t stream) {
  using S = BwdShape<T, E_PAD>;
  constexpr auto kernel = route_bwd_kernel<T, E_PAD, VEC, SIGMOID>;
  // one resident wave of blocks, each walking its rows grid-stride (fewer blocks when T is small)
  int sms = 0, resident = 0;
  const cudaError_t err = wave_shape<kernel>(device, kBwdThreads, 0, sms, resident);
  if (err != cudaSuccess) return err;
  constexpr int64_t kRowsPerBlock = static_cast<int64_t>(kBwdWarps) * S::R;
  const int64_t needed = (p.num_tokens + kRowsPerBlock - 1) / kRowsPerBlock;
  const int grid = one_wave_grid(needed, sms, resident);
  if (grid <= 0) return cudaSuccess;
  return launch_kernel(kernel, grid, kBwdThreads, 0, stream, device, sms, resident, p, flags);
}

// Whether the call's accesses allow the VEC instances (with E == E_PAD): 16-byte logits and output rows, 4-byte keep
// rows
bool vector_access(const RouteBackwardParams& p, int flags) {
  const int vec = kVectorLoads | kVectorStores | (p.keep != nullptr ? kKeepWords : 0);
  return (flags & vec) == vec;
}

// the VEC instance where E == E_PAD and every access allows it (the sigmoid router's own below 512 experts), else the
// checked one (never the sigmoid router's: sigmoid_on_row_kernel sends those calls elsewhere)
template <typename T, int E_PAD>
cudaError_t launch_bwd_v(const RouteBackwardParams& p, int flags, int device, cudaStream_t stream) {
  if (p.num_experts == E_PAD && vector_access(p, flags)) {
    if constexpr (E_PAD <= 256) {
      if (p.scoring == 1) return launch_bwd<T, E_PAD, true, true>(p, flags, device, stream);
    }
    return launch_bwd<T, E_PAD, true>(p, flags, device, stream);
  }
  return launch_bwd<T, E_PAD, false>(p, flags, device, stream);
}

template <typename T>
cudaError_t launch_bwd_e(const RouteBackwardParams& p, int flags, int device, cudaStream_t stream) {
  const int e = p.num_experts;
  if (e <= 8) return launch_bwd_v<T, 8>(p, flags, device, stream);
  if (e <= 16) return launch_bwd_v<T, 16>(p, flags, device, stream);
  if (e <= 32) return launch_bwd_v<T, 32>(p, flags, device, stream);
  if (e <= 64) return launch_bwd_v<T, 64>(p, flags, device, stream);
  if (e <= 128) return launch_bwd_v<T, 128>(p, flags, device, stream);
  if (e <= 256) return launch_bwd_v<T, 256>(p, flags, device, stream);
  if (e <= 512) return launch_bwd_v<T, 512>(p, flags, device, stream);
  return cudaErrorInvalidValue;
}

template <typename T>
cudaError_t launch_bwd_sigmoid(const RouteBackwardParams& p, int device, cudaStream_t stream) {
  constexpr auto kernel = route_bwd_sigmoid_kernel<T>;
  // one resident wave of blocks, each walking its rows grid-stride (fewer blocks when T is small)
  int sms = 0, resident = 0;
  const cudaError_t err = wave_shape<kernel>(device, kBwdThreads, 0, sms, resident);
  if (err != cudaSuccess) return err;
  int kp_log2 = 0;  // top_k rounded up to a power of two: lanes per row
  while ((1 << kp_log2) < p.top_k) ++kp_log2;
  const int64_t rows_per_block = static_cast<int64_t>(kBwdWarps) * (32 >> kp_log2);
  const int64_t needed = (p.num_tokens + rows_per_block - 1) / rows_per_block;
  const int grid = one_wave_grid(needed, sms, resident);
  if (grid <= 0) return cudaSuccess;
  return launch_kernel(kernel, grid, kBwdThreads, 0, stream, device, sms, resident, p, kp_log2);
}

// Whether the sigmoid router's call runs on the row-over-lanes kernel's vector instance (E a power of two up to 256,
// whole 16-byte rows and keep rows: two or more rows a warp step) rather than route_bwd_sigmoid_kernel. H200, T =
// 262,144, the backward alone: DeepSeek-V3's E = 256 (float32) 109 us there against 118 on the sigmoid kernel, while
// the sigmoid kernel took GLM-4.5's E = 160 from 129 to 81 us and Kimi-K2's E = 384 from 245 to 199
// (benchmarks/RESULTS.md, twenty-sixth round). Calls given the forward's saved logits take the sigmoid kernel
// whatever this says: DeepSeek-V3's backward 92-94 us there against 107-109 (twenty-seventh round).
bool sigmoid_on_row_kernel(const RouteBackwardParams& p, int flags) {
  const int e = p.num_experts;
  return e >= 8 && e <= 256 && (e & (e - 1)) == 0 && vector_access(p, flags);  // (launch_bwd_v's vector instance)
}

// Shared bytes of the lane backward for this call, or 0 when it does not take the call (see route_bwd_lane_kernel;
// at most the 48 KB a block gets without opting in: G <= 82 at E = 64). Not at E = 128: its 10.5 KB tiles leave 10
// warps per SM, and it measured slower there than the kernel above (17.6 against 16.0 us at T = 65,536, H200)
size_t lane_bwd_smem_bytes(const RouteBackwardParams& p, int dtype, int flags) {
  const int e = p.num_experts;
  if (p.variant == 1 || dtype == kBwdFloat32 || p.top_k != kLaneBwdTopK || (e != 32 && e != 64)) return 0;
  if (p.scoring != 0 || p.scale != 1.0f) return 0;  // (the default router only)
  if (p.stride_t > (int64_t{1} << 26)) return 0;  // (a lane's copy step is a 32-bit byte count)
  if ((flags & (kVectorLoads | kVectorStores)) != (kVectorLoads | kVectorStores) || p.stride_e != 1) return 0;
  const uintptr_t ids = reinterpret_cast<uintptr_t>(p.ids8 != nullptr ? static_cast<const void*>(p.ids8) : p.ids);
  if (((ids | reinterpret_cast<uintptr_t>(p.grad_weights)) & 15) != 0) return 0;
  const size_t ids_bytes = kLaneBwdTopK * (p.ids8 != nullptr ? 1 : 8);
  const size_t stage = 32 * (e * 2 + ids_bytes + kLaneBwdTopK * 2);  // logits, ids and grads of a tile
  const size_t mask = p.keep != nullptr ? static_cast<size_t>(p.num_groups + 1) * (e / 2 + 2) * 8 : 0;
  const size_t smem = kLaneBwdWarps * 2 * stage + mask;
  return smem <= 48 * 1024 ? smem : 0;
}

template <typename T, int E_PAD, bool MASK, bool IDS8, bool LOAD_STORE = false>
cudaError_t launch_bwd_lane(const RouteBackwardParams& p, size_t smem, int device, cudaStream_t stream) {
  constexpr auto kernel = route_bwd_lane_kernel<T, E_PAD, MASK, IDS8, LOAD_STORE>;
  // one resident wave of blocks (fewer when T is small), the warps taking the 32-row tiles round-robin
  int sms = 0, resident = 0;
  const cudaError_t err = wave_shape<kernel>(device, kLaneBwdWarps * 32, smem, sms, resident);
  if (err != cudaSuccess) return err;
  const int64_t tiles = (p.num_tokens + 31) / 32;
  const int64_t needed = (tiles + kLaneBwdWarps - 1) / kLaneBwdWarps;
  const int grid = one_wave_grid(needed, sms, resident);
  if (grid <= 0) return cudaSuccess;
  return launch_kernel(kernel, grid, kLaneBwdWarps * 32, smem, stream, device, sms, resident, p);
}

template <typename T, int E_PAD, bool IDS8>
cudaError_t launch_bwd_lane_m(const RouteBackwardParams& p, size_t smem, int device, cudaStream_t stream) {
  return p.keep != nullptr ? launch_bwd_lane<T, E_PAD, true, IDS8>(p, smem, device, stream)
                           : launch_bwd_lane<T, E_PAD, false, IDS8>(p, smem, device, stream);
}

template <typename T>
cudaError_t launch_bwd_lane_t(const RouteBackwardParams& p, size_t smem, int device, cudaStream_t stream) {
  const bool ids8 = p.ids8 != nullptr;
  if (p.num_experts == 32) {
    return ids8 ? launch_bwd_lane_m<T, 32, true>(p, smem, device, stream)
                : launch_bwd_lane_m<T, 32, false>(p, smem, device, stream);
  }
  return ids8 ? launch_bwd_lane_m<T, 64, true>(p, smem, device, stream)
              : launch_bwd_lane_m<T, 64, false>(p, smem, device, stream);
}

template <typename T, int E_PAD>
cudaError_t preload_bwd_e() {
  cudaFuncAttributes attr;
  cudaError_t err = cudaFuncGetAttributes(&attr, route_bwd_kernel<T, E_PAD, true>);
  if constexpr (E_PAD == 8) {  // (once per dtype)
    if (err == cudaSuccess) err = cudaFuncGetAttributes(&attr, route_bwd_sigmoid_kernel<T>);
  }
  if constexpr (E_PAD <= 256) {
    if (err == cudaSuccess) err = cudaFuncGetAttributes(&attr, route_bwd_kernel<T, E_PAD, true, true>);
  }
  if (err == cudaSuccess) err = cudaFuncGetAttributes(&attr, route_bwd_kernel<T, E_PAD, false>);
  if constexpr (!std::is_same<T, float>::value && (E_PAD == 32 || E_PAD == 64)) {
    if (err == cudaSuccess) err = cudaFuncGetAttributes(&attr, route_bwd_lane_kernel<T, E_PAD, true, false>);
    if (err == cudaSuccess) err = cudaFuncGetAttributes(&attr, route_bwd_lane_kernel<T, E_PAD, false, false>);
    if (err == cudaSuccess) err = cudaFuncGetAttributes(&attr, route_bwd_lane_kernel<T, E_PAD, true, true>);
    if (err == cudaSuccess) err = cudaFuncGetAttributes(&attr, route_bwd_lane_kernel<T, E_PAD, false, true>);
  }
  if constexpr (std::is_same<T, __nv_bfloat16>::value && E_PAD == 64) {  // (the loads-and-stores-only instance)
    if (err == cudaSuccess) err = cudaFuncGetAttributes(&attr, route_bwd_lane_kernel<T, 64, true, true, true>);
  }
  return err;
}

template <typename T>
cudaError_t preload_bwd_t() {
  cudaError_t err = preload_bwd_e<T, 8>();
  if (err == cudaSuccess) err = preload_bwd_e<T, 16>();
  if (err == cudaSuccess) err = preload_bwd_e<T, 32>();
  if (err == cudaSuccess) err = preload_bwd_e<T, 64>();
  if (err == cudaSuccess) err = preload_bwd_e<T, 128>();
  if (err == cudaSuccess) err = preload_bwd_e<T, 256>();
  if (err == cudaSuccess) err = preload_bwd_e<T, 512>();
  return err;
}

bool aligned(const void* ptr, uintptr_t bytes) { return (reinterpret_cast<uintptr_t>(ptr) & (bytes - 1)) == 0; }

}  // namespace

extern "C" {

// Load every backward kernel instance onto `device` now (lazy module loading would otherwise load each at its first
// launch, which may fall inside a CUDA graph capture). Returns 0 or a cudaError_t code.
int moe_fastmask_route_cuda_backward_preload(int device) {
  int current = -1;
  cudaError_t err = cudaGetDevice(&current);
  if (err == cudaSuccess && current != device) err = cudaSetDevice(device);
  if (err == cudaSuccess) err = preload_bwd_t<float>();
  if (err == cudaSuccess) err = preload_bwd_t<__half>();
  if (err == cudaSuccess) err = preload_bwd_t<__nv_bfloat16>();
  return static_cast<int>(err);
}

int moe_fastmask_route_cuda_backward_params_size() { return static_cast<int>(sizeof(RouteBackwardParams)); }

// Launch the backward on `stream` (a cudaStream_t) of `device`; dtype 0 float32, 1 float16, 2 bfloat16 (logits,
// grad_weights and grad_logits alike). Returns 0 or a cudaError_t code: cudaErrorInvalidValue, before touching a
// device, for a call the kernel does not take (E outside [1, 512], top_k outside [1, min(16, E)], another dtype,
// negative strides, a missing tensor, a keep mask without groups, another scoring code, a scale that is not finite,
// saved chosen logits for a router other than the sigmoid one).
int moe_fastmask_route_cuda_backward(const RouteBackwardParams* params, int dtype, int device, void* stream) {
  if (params == nullptr) return cudaErrorInvalidValue;
  const RouteBackwardParams p = *params;
  if (p.num_tokens < 0) return cudaErrorInvalidValue;
  if (p.num_tokens == 0) return 0;
  if (p.num_experts < 1 || p.num_experts > kBwdMaxExperts || p.top_k < 1 || p.top_k > kBwdMaxTopK ||
      p.top_k > p.num_experts) {
    return cudaErrorInvalidValue;
  }
  if (dtype != kBwdFloat32 && dtype != kBwdFloat16 && dtype != kBwdBFloat16) return cudaErrorInvalidValue;
  if (p.grad_logits == nullptr || p.grad_weights == nullptr || p.logits == nullptr || p.ids == nullptr) {
    return cudaErrorInvalidValue;
  }
  if (p.stride_t < 0 || p.stride_e < 0 || (p.keep != nullptr && p.num_groups < 1)) return cudaErrorInvalidValue;
  if (p.group_is_int64 != 0 && p.group_is_int64 != 1) return cudaErrorInvalidValue;
  if (p.variant < 0 || p.variant > 2) return cudaErrorInvalidValue;
  if ((p.scoring != 0 && p.scoring != 1) || !std::isfinite(p.scale)) return cudaErrorInvalidValue;
  if (p.chosen_logits != nullptr && p.scoring != 1) return cudaErrorInvalidValue;  // (the sigmoid router's only)

  const int64_t size = dtype == kBwdFloat32 ? 4 : 2;
  int flags = 0;
  if (p.stride_e == 1 && (p.stride_t * size) % 16 == 0 && aligned(p.logits, 16)) flags |= kVectorLoads;
  if (p.stride_e == 1 && (p.stride_t * size) % 8 == 0 && aligned(p.logits, 8)) flags |= kHalfLoads;
  if ((p.num_experts * size) % 16 == 0 && aligned(p.grad_logits, 16)) flags |= kVectorStores;
  if ((p.num_experts * size) % 8 == 0 && aligned(p.grad_logits, 8)) flags |= kHalfStores;
  if (p.keep != nullptr && p.num_experts % 4 == 0 && (reinterpret_cast<uintptr_t>(p.keep) & 3u) == 0) {
    flags |= kKeepWords;  // (then every keep row is 4-byte aligned)
  }

  const size_t lane_smem = lane_bwd_smem_bytes(p, dtype, flags);
  // (benchmarking) variant 2, the lane kernel's loads and stores alone: bf16, E = 64, a mask, one-byte ids
  if (p.variant == 2 &&
      (lane_smem == 0 || dtype != kBwdBFloat16 || p.num_experts != 64 || p.keep == nullptr || p.ids8 == nullptr)) {
    return cudaErrorInvalidValue;
  }

  int current = -1;
  cudaError_t err = cudaGetDevice(&current);
  if (err != cudaSuccess) return err;
  if (current != device) {
    err = cudaSetDevice(device);
    if (err != cudaSuccess) return err;
  }
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  if (p.scoring == 1 && (p.chosen_logits != nullptr || !sigmoid_on_row_kernel(p, flags))) {
    switch (dtype) {
      case kBwdFloat32: err = launch_bwd_sigmoid<float>(p, device, s); break;
      case kBwdFloat16: err = launch_bwd_sigmoid<__half>(p, device, s); break;
      default: err = launch_bwd_sigmoid<__nv_bfloat16>(p, device, s); break;
    }
    return static_cast<int>(err);
  }
  if (p.variant == 2) {
    return static_cast<int>(launch_bwd_lane<__nv_bfloat16, 64, true, true, true>(p, lane_smem, device, s));
  }
  if (lane_smem != 0) {
    err = dtype == kBwdFloat16 ? launch_bwd_lane_t<__half>(p, lane_smem, device, s)
                               : launch_bwd_lane_t<__nv_bfloat16>(p, lane_smem, device, s);
    return static_cast<int>(err);
  }
  switch (dtype) {
    case kBwdFloat32: err = launch_bwd_e<float>(p, flags, device, s); break;
    case kBwdFloat16: err = launch_bwd_e<__half>(p, flags, device, s); break;
    default: err = launch_bwd_e<__nv_bfloat16>(p, flags, device, s); break;
  }
  return static_cast<int>(err);
}

}  // extern "C"
