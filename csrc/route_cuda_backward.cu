// CUDA backward of moe_fastmask.route for the default router (softmax over the allowed experts, scale 1): the
// gradient of the chosen weights with respect to the logits. Torch-free, like route_cuda.cu (built into the same
// library): a plain C launcher that moe_fastmask/ops/cuda_route.py calls through ctypes with raw pointers and the
// caller's CUDA stream.
//
// Math (fp32), with p the softmax over the row's allowed experts (masked ones p = 0) and G the incoming gradient
// scattered to the chosen experts:
//   without renormalisation  dz = p * (G - sum_e G_e p_e)
//   with renormalisation     dz = w * (G - sum_e G_e w_e) on the chosen experts, 0 elsewhere, w = p / sum_chosen p
// A row whose allowed logits hold NaN or +inf, or are all -inf (also: every expert masked), has p = NaN everywhere,
// as in the reference: masked experts get exp(-inf - max) * (1 / sum) = 0 * NaN there. fmaxf skips NaN in the row
// max, but the NaN logit's own exp term then makes the sum NaN. Group ids outside [0, G) act as "no mask"; ids
// outside [0, E) scatter nothing. Nothing outside the tensors' ranges is read or written.
//
// Layout (memory-bound; no shared-memory staging of the logits): a row of E_PAD (power of two >= max(E, 8)) experts
// is spread over L = E_PAD / 8 lanes of one warp, 8 experts per lane, so a warp step holds R = 32 / L rows, times U
// row groups whose loads are all issued before any is used. A lane's experts are 16-byte chunks: one chunk of 8 for
// 16-bit logits, two chunks of 4 for float32 (chunk q of lane s covers experts (q * L + s) * 4 ...: each load
// instruction of the warp reads contiguous bytes). The row max and the sums are butterfly shuffles over the row's
// lanes. The row's k (id, grad) pairs (entry j on lane j % L) are scattered into a per-warp shared buffer
// [U][R][E_PAD] of grads plus chosen flags: each lane zeroes its own 8 slots, __syncwarp, the scatter, __syncwarp,
// each lane reads its 8 back (the sums over the row then need no gather). Every lane of a warp runs the same number
// of steps (the step is warp-uniform), so the full-mask __syncwarp calls are safe; three phases per step need two.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <stdint.h>

// Launch arguments (mirrored field for field by RouteBackwardParams in moe_fastmask/ops/cuda_route.py).
struct RouteBackwardParams {
  void* grad_logits;          // [T, E] logits' dtype, contiguous (written)
  const void* grad_weights;   // [T, k] logits' dtype, contiguous
  const void* logits;         // [T, E] strided
  const int64_t* ids;         // [T, k] int64, contiguous
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
  int32_t reserved;           // 0 (keeps the struct free of tail padding)
};

namespace {

constexpr int kBwdThreads = 256;
constexpr int kBwdWarps = kBwdThreads / 32;
constexpr int kBwdMaxExperts = 256;
constexpr int kBwdMaxTopK = 16;
constexpr int kRowSlots = 256;     // R * E_PAD = 8 * 32: scatter-buffer slots of one row group of a warp (any E_PAD)

enum BwdDType { kBwdFloat32 = 0, kBwdFloat16 = 1, kBwdBFloat16 = 2 };
// launch flags, chosen by the launcher from the pointers and strides
enum BwdFlags { kVectorLoads = 1, kVectorStores = 2, kKeepWords = 4 };

__device__ __forceinline__ float bwd_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
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
  static constexpr int CH = 16 / static_cast<int>(sizeof(T));  // elements per 16-byte chunk
  static constexpr int NCH = 8 / CH;                            // chunks per lane (8 experts per lane)
  static constexpr int L = E_PAD / 8;                           // lanes per row
  static constexpr int R = 32 / L;                              // rows per row group
  static constexpr int KMAX = kBwdMaxTopK < E_PAD ? kBwdMaxTopK : E_PAD;
  static constexpr int J = (KMAX + L - 1) / L;                  // (id, grad) entries per lane
  static constexpr int U = J <= 2 ? 2 : 1;                      // row groups per warp step (registers allowing)
  // resident blocks: at most 64 registers (32 warps per SM, each with U row groups of loads in flight); 80 where a
  // lane holds 8 (id, grad) entries (E_PAD <= 16)
  static constexpr int kMinBlocks = J > 4 ? 3 : 4;
  static_assert(E_PAD >= 8 && E_PAD <= kBwdMaxExperts && (E_PAD & (E_PAD - 1)) == 0, "E_PAD: power of two, 8..256");
  static_assert(L * 8 == E_PAD && R * L == 32 && R * E_PAD == kRowSlots, "lane layout");
  static_assert(NCH * CH == 8 && CH >= 4, "a lane's experts come in runs of at least 4");
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
// keep mask (16-byte loads and stores, 4-byte keep words, no bounds checks on experts); otherwise every access is
// checked against E and the logits are read element by element through their strides, except for the whole 16-byte
// chunks of rows that allow vector loads (flags & kVectorLoads) and the output chunks of rows that allow vector stores.
template <typename T, int E_PAD, bool VEC>
__global__ void __launch_bounds__(kBwdThreads, BwdShape<T, E_PAD>::kMinBlocks)
route_bwd_kernel(const RouteBackwardParams p, const int flags) {
  using S = BwdShape<T, E_PAD>;
  using Elem = BwdElem<T>;
  using Bits = typename Elem::Bits;
  constexpr int CH = S::CH, NCH = S::NCH, L = S::L, R = S::R, J = S::J, U = S::U;
  constexpr float kLog2e = 1.4426950408889634f;
  __shared__ __align__(16) float s_grad[kBwdWarps][U][kRowSlots];          // G per (row group, row, expert)
  __shared__ __align__(16) unsigned char s_pick[kBwdWarps][U][kRowSlots];  // 1: a chosen expert (renormalize)

  const int E = VEC ? E_PAD : p.num_experts;
  const int top_k = p.top_k;
  const int64_t num_tokens = p.num_tokens;
  const bool renormalize = p.renormalize != 0;
  const bool vector_loads = VEC || (flags & kVectorLoads) != 0;
  const bool vector_stores = VEC || (flags & kVectorStores) != 0;
  const bool keep_words = VEC || (flags & kKeepWords) != 0;
  const bool has_keep = p.keep != nullptr;
  const Bits* logits = static_cast<const Bits*>(p.logits);
  const Bits* grad_weights = static_cast<const Bits*>(p.grad_weights);
  Bits* grad_logits = static_cast<Bits*>(p.grad_logits);

  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int sub = lane % L;  // lane within its row
  const int r = lane / L;    // row within the row group
  // the lane's element i is expert chunk_e[i / CH] + i % CH; elements 4h .. 4h + 3 are the consecutive experts
  // quad_e[h] .. quad_e[h] + 3
  int chunk_e[NCH];
#pragma unroll
  for (int q = 0; q < NCH; ++q) chunk_e[q] = (q * L + sub) * CH;
  int quad_e[2];
#pragma unroll
  for (int h = 0; h < 2; ++h) quad_e[h] = chunk_e[(4 * h) / CH] + (4 * h) % CH;
  // bit i: element i is a real expert (< E)
  unsigned int in_range = 0u;
#pragma unroll
  for (int i = 0; i < 8; ++i) in_range |= static_cast<unsigned int>(chunk_e[i / CH] + i % CH < E) << i;

  float* const my_grad = &s_grad[warp][0][r * E_PAD];  // row group u at my_grad[u * kRowSlots]
  unsigned char* const my_pick = &s_pick[warp][0][r * E_PAD];

  const int64_t num_warps = static_cast<int64_t>(gridDim.x) * kBwdWarps;
  const int64_t warp_id = static_cast<int64_t>(blockIdx.x) * kBwdWarps + warp;
  constexpr int kRowsPerStep = U * R;

  for (int64_t base = warp_id * kRowsPerStep; base < num_tokens; base += num_warps * kRowsPerStep) {
    // ---- loads of the U row groups, all issued before any is used
    uint4 raw[U][NCH];
    long long ids[U][J];
    float grads[U][J];
    int64_t keep_row[U];  // -1: no mask
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t row = base + u * R + r;
      const bool valid = row < num_tokens;
      keep_row[u] = -1;
      if (has_keep && valid) {
        int64_t g = 0;
        if (p.group != nullptr) {
          g = p.group_is_int64 ? __ldcs(static_cast<const long long*>(p.group) + row)
                               : static_cast<int64_t>(__ldcs(static_cast<const int*>(p.group) + row));
        }
        keep_row[u] = (g >= 0 && g < p.num_groups) ? g : -1;
      }
      const Bits* src = logits + row * p.stride_t;
#pragma unroll
      for (int q = 0; q < NCH; ++q) {
        const int e = chunk_e[q];
        if (vector_loads && valid && (VEC || e + CH <= E)) {
          raw[u][q] = __ldcs(reinterpret_cast<const uint4*>(src + e));
        } else {
          unsigned int w[4] = {0u, 0u, 0u, 0u};
          if constexpr (!VEC) {
#pragma unroll
            for (int c = 0; c < CH; ++c) {
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
          raw[u][q] = make_uint4(w[0], w[1], w[2], w[3]);
        }
      }
#pragma unroll
      for (int jj = 0; jj < J; ++jj) {
        const int j = sub + jj * L;
        ids[u][jj] = -1;
        grads[u][jj] = 0.0f;
        if (valid && j < top_k) {
          const int64_t at = row * top_k + j;
          ids[u][jj] = __ldcs(reinterpret_cast<const long long*>(p.ids) + at);
          grads[u][jj] = Elem::to_float(__ldcs(grad_weights + at));
        }
      }
    }
    // the allowed experts among the lane's 8 (bit i: element i), from the keep row (after the group loads)
    unsigned int allowed[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      allowed[u] = in_range;
      if (keep_row[u] >= 0) {
        const uint8_t* keep = p.keep + keep_row[u] * E;
        unsigned int kept = 0u;
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int e = quad_e[h];
          if (keep_words && (VEC || e + 4 <= E)) {
            const unsigned int word = __ldg(reinterpret_cast<const unsigned int*>(keep + e));
#pragma unroll
            for (int c = 0; c < 4; ++c) kept |= static_cast<unsigned int>(((word >> (8 * c)) & 0xFFu) != 0) << (4 * h + c);
          } else if constexpr (!VEC) {
#pragma unroll
            for (int c = 0; c < 4; ++c) {
              if (e + c < E) kept |= static_cast<unsigned int>(__ldg(keep + e + c) != 0) << (4 * h + c);
            }
          }
        }
        allowed[u] &= kept;
      }
    }

    // ---- scatter the chosen experts' grads: zero own slots, sync, scatter, sync, read own slots back
#pragma unroll
    for (int u = 0; u < U; ++u) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        *reinterpret_cast<float4*>(my_grad + u * kRowSlots + quad_e[h]) = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
        if (renormalize) *reinterpret_cast<unsigned int*>(my_pick + u * kRowSlots + quad_e[h]) = 0u;
      }
    }
    __syncwarp();
#pragma unroll
    for (int u = 0; u < U; ++u) {
#pragma unroll
      for (int jj = 0; jj < J; ++jj) {
        const long long e = ids[u][jj];
        if (static_cast<unsigned long long>(e) < static_cast<unsigned long long>(E)) {  // (-1: no entry)
          my_grad[u * kRowSlots + static_cast<int>(e)] = grads[u][jj];
          if (renormalize) my_pick[u * kRowSlots + static_cast<int>(e)] = 1;
        }
      }
    }
    __syncwarp();

#pragma unroll
    for (int u = 0; u < U; ++u) {
      float G[8];
      unsigned int chosen = 0u;  // bit i: element i is a chosen expert (renormalize)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const float4 v = *reinterpret_cast<const float4*>(my_grad + u * kRowSlots + quad_e[h]);
        G[4 * h] = v.x;
        G[4 * h + 1] = v.y;
        G[4 * h + 2] = v.z;
        G[4 * h + 3] = v.w;
        if (renormalize) {
          const unsigned int word = *reinterpret_cast<const unsigned int*>(my_pick + u * kRowSlots + quad_e[h]);
#pragma unroll
          for (int c = 0; c < 4; ++c) {
            chosen |= static_cast<unsigned int>(((word >> (8 * c)) & 0xFFu) != 0) << (4 * h + c);
          }
        }
      }

      // masked softmax: padding and masked experts read as -inf
      float z[8];
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        z[i] = ((allowed[u] >> i) & 1u) ? Elem::to_float(chunk_bits<T>(raw[u][i / CH], i % CH)) : -INFINITY;
      }
      float row_max = -INFINITY;
#pragma unroll
      for (int i = 0; i < 8; ++i) row_max = fmaxf(row_max, z[i]);
#pragma unroll
      for (int off = L / 2; off > 0; off >>= 1) row_max = fmaxf(row_max, __shfl_xor_sync(0xffffffffu, row_max, off, L));
      float prob[8];
      float sum = 0.0f;
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        prob[i] = bwd_exp2((z[i] - row_max) * kLog2e);
        sum += prob[i];
      }
#pragma unroll
      for (int off = L / 2; off > 0; off >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, off, L);
      const float inv = bwd_rcp(sum);  // sum in [1, 256], or NaN
#pragma unroll
      for (int i = 0; i < 8; ++i) prob[i] *= inv;

      float dz[8];
      if (!renormalize) {
        float dot = 0.0f;  // sum_e G_e p_e (G is 0 off the chosen experts)
#pragma unroll
        for (int i = 0; i < 8; ++i) dot += G[i] * prob[i];
#pragma unroll
        for (int off = L / 2; off > 0; off >>= 1) dot += __shfl_xor_sync(0xffffffffu, dot, off, L);
#pragma unroll
        for (int i = 0; i < 8; ++i) dz[i] = prob[i] * (G[i] - dot);
      } else {
        float picked = 0.0f, dot = 0.0f;  // sums of p and of G p over the chosen experts
#pragma unroll
        for (int i = 0; i < 8; ++i) {
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
        for (int i = 0; i < 8; ++i) dz[i] = ((chosen >> i) & 1u) ? prob[i] * rinv * (G[i] - dot) : 0.0f;
      }

      const int64_t row = base + u * R + r;
      if (row < num_tokens) {
        Bits* out = grad_logits + row * E;
#pragma unroll
        for (int q = 0; q < NCH; ++q) {
          const int e = chunk_e[q];
          if (vector_stores && (VEC || e < E)) {  // (vector stores: E is a multiple of CH, so the chunk is whole)
            unsigned int w[4];
            if constexpr (sizeof(T) == 4) {
#pragma unroll
              for (int c = 0; c < 4; ++c) w[c] = Elem::from_float(dz[q * CH + c]);
            } else {
#pragma unroll
              for (int c = 0; c < 4; ++c) {
                w[c] = Elem::from_float(dz[q * CH + 2 * c]) | (Elem::from_float(dz[q * CH + 2 * c + 1]) << 16);
              }
            }
            __stcs(reinterpret_cast<uint4*>(out + e), make_uint4(w[0], w[1], w[2], w[3]));
          } else if constexpr (!VEC) {
#pragma unroll
            for (int c = 0; c < CH; ++c) {
              if (e + c < E) out[e + c] = static_cast<Bits>(Elem::from_float(dz[q * CH + c]));
            }
          }
        }
      }
    }
  }
}

template <typename T, int E_PAD, bool VEC>
cudaError_t launch_bwd(const RouteBackwardParams& p, int flags, int device, cudaStream_t stream) {
  using S = BwdShape<T, E_PAD>;
  auto kernel = route_bwd_kernel<T, E_PAD, VEC>;
  // one resident wave of blocks, each walking its rows grid-stride (fewer blocks when T is small)
  static int sms[64] = {0};
  static int resident[64] = {0};
  if (device < 0 || device >= 64) return cudaErrorInvalidDevice;
  if (sms[device] == 0) {
    cudaError_t err = cudaDeviceGetAttribute(&sms[device], cudaDevAttrMultiProcessorCount, device);
    if (err != cudaSuccess) return err;
  }
  if (resident[device] == 0) {
    int blocks = 0;
    cudaError_t err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, kernel, kBwdThreads, 0);
    if (err != cudaSuccess) return err;
    resident[device] = blocks > 0 ? blocks : 1;
  }
  constexpr int64_t kRowsPerBlock = static_cast<int64_t>(kBwdWarps) * S::U * S::R;
  const int64_t needed = (p.num_tokens + kRowsPerBlock - 1) / kRowsPerBlock;
  const int64_t wave = static_cast<int64_t>(sms[device]) * resident[device];
  const int grid = static_cast<int>(needed < wave ? needed : wave);
  if (grid <= 0) return cudaSuccess;
  kernel<<<grid, kBwdThreads, 0, stream>>>(p, flags);
  return cudaGetLastError();
}

// the VEC instance where E == E_PAD and every access allows it, else the checked one
template <typename T, int E_PAD>
cudaError_t launch_bwd_v(const RouteBackwardParams& p, int flags, int device, cudaStream_t stream) {
  const int vec = kVectorLoads | kVectorStores | (p.keep != nullptr ? kKeepWords : 0);
  if (p.num_experts == E_PAD && (flags & vec) == vec) return launch_bwd<T, E_PAD, true>(p, flags, device, stream);
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
  return cudaErrorInvalidValue;
}

template <typename T, int E_PAD>
cudaError_t preload_bwd_e() {
  cudaFuncAttributes attr;
  cudaError_t err = cudaFuncGetAttributes(&attr, route_bwd_kernel<T, E_PAD, true>);
  if (err == cudaSuccess) err = cudaFuncGetAttributes(&attr, route_bwd_kernel<T, E_PAD, false>);
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
  return err;
}

bool aligned16(const void* ptr) { return (reinterpret_cast<uintptr_t>(ptr) & 15u) == 0; }

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
// device, for a call the kernel does not take (E outside [1, 256], top_k outside [1, min(16, E)], another dtype,
// negative strides, a missing tensor, a keep mask without groups).
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

  const int64_t size = dtype == kBwdFloat32 ? 4 : 2;
  int flags = 0;
  if (p.stride_e == 1 && (p.stride_t * size) % 16 == 0 && aligned16(p.logits)) flags |= kVectorLoads;
  if ((p.num_experts * size) % 16 == 0 && aligned16(p.grad_logits)) flags |= kVectorStores;
  if (p.keep != nullptr && p.num_experts % 4 == 0 && (reinterpret_cast<uintptr_t>(p.keep) & 3u) == 0) {
    flags |= kKeepWords;
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
    case kBwdFloat32: err = launch_bwd_e<float>(p, flags, device, s); break;
    case kBwdFloat16: err = launch_bwd_e<__half>(p, flags, device, s); break;
    default: err = launch_bwd_e<__nv_bfloat16>(p, flags, device, s); break;
  }
  return static_cast<int>(err);
}

}  // extern "C"
