// Device helpers shared by the "lane" kernels of the forward (route_cuda.cu) and the backward
// (route_cuda_backward.cu): one row of 16-bit logits per lane, a warp's 32 rows copied into shared memory with
// cp.async as swizzled 16-byte chunks, and the per-group mask table whose entries turn a masked expert's logit into
// -inf with integer arithmetic alone.
// Also the launchers' host helpers: wave_shape, and launch_kernel with programmatic dependent launch.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <stdint.h>

namespace moe_fastmask_lane16 {

// 16-bit logits as packed pairs (expert 2i in the low half, 2i + 1 in the high half of a 32-bit word)
template <typename T> struct Lane16;
template <> struct Lane16<__nv_bfloat16> {
  static constexpr unsigned int kOnes = 0x3F803F80u;
  static __device__ __forceinline__ unsigned int canon(unsigned int w) {  // w * 1 + 0 per half
    unsigned int d;
    asm("fma.rn.bf16x2 %0, %1, %2, %3;" : "=r"(d) : "r"(w), "r"(kOnes), "r"(0u));
    return d;
  }
  static __device__ __forceinline__ float lo(unsigned int w) { return __uint_as_float(w << 16); }
  static __device__ __forceinline__ float hi(unsigned int w) { return __uint_as_float(w & 0xFFFF0000u); }
  // the pair as floats, a masked one as -inf, from its mask-table entry (and_hi, mul_lo): two IMADs and one LOP3
  static __device__ __forceinline__ float2 masked_floats(unsigned int w, unsigned int and_hi, unsigned int mul_lo) {
    const unsigned int add_lo = mul_lo * 0xFFFF0080u + 0xFF800000u;  // 0 where kept, -inf where masked
    return make_float2(__uint_as_float(w * mul_lo + add_lo), __uint_as_float((w & and_hi) | (~and_hi & 0xFF800000u)));
  }
  static __device__ __forceinline__ float from_bits(unsigned int b) { return __uint_as_float(b << 16); }
  static __device__ __forceinline__ unsigned short to_bits(float w) {
    return __bfloat16_as_ushort(__float2bfloat16_rn(w));
  }
  // a pair of floats rounded to a packed pair (lo in the low half)
  static __device__ __forceinline__ unsigned int pack(float lo, float hi) {
    return static_cast<unsigned int>(to_bits(lo)) | (static_cast<unsigned int>(to_bits(hi)) << 16);
  }
};
template <> struct Lane16<__half> {
  static constexpr unsigned int kOnes = 0x3C003C00u, kNegInf = 0xFC00FC00u;
  static __device__ __forceinline__ unsigned int canon(unsigned int w) {
    unsigned int d;
    asm("fma.rn.f16x2 %0, %1, %2, %3;" : "=r"(d) : "r"(w), "r"(kOnes), "r"(0u));
    return d;
  }
  static __device__ __forceinline__ float lo(unsigned int w) {
    return __half2float(__ushort_as_half(static_cast<unsigned short>(w & 0xFFFFu)));
  }
  static __device__ __forceinline__ float hi(unsigned int w) {
    return __half2float(__ushort_as_half(static_cast<unsigned short>(w >> 16)));
  }
  static __device__ __forceinline__ float from_bits(unsigned int b) {
    return __half2float(__ushort_as_half(static_cast<unsigned short>(b)));
  }
  static __device__ __forceinline__ float2 masked_floats(unsigned int w, unsigned int and_hi, unsigned int mul_lo) {
    const unsigned int kept = and_hi | __umulhi(mul_lo, 0xFFFF0000u);  // 0xFFFF per kept half
    const unsigned int x = (w & kept) | (~kept & kNegInf);
    return make_float2(lo(x), hi(x));
  }
  static __device__ __forceinline__ unsigned short to_bits(float w) { return __half_as_ushort(__float2half_rn(w)); }
  static __device__ __forceinline__ unsigned int pack(float lo, float hi) {
    return static_cast<unsigned int>(to_bits(lo)) | (static_cast<unsigned int>(to_bits(hi)) << 16);
  }
};

// mask-table entry of experts (2i, 2i + 1): and_hi = 0xFFFF0000 where 2i + 1 is kept (an AND that zeroes a masked
// expert's bits), mul_lo = 0x10000 where 2i is kept (a multiplier that shifts the bits up or zeroes them)
__device__ __forceinline__ uint2 mask_entry(bool lo_kept, bool hi_kept) {
  return make_uint2(hi_kept ? 0xFFFF0000u : 0u, lo_kept ? 0x10000u : 0u);
}

// whether experts 2 pair and 2 pair + 1 are kept in row g of keep [G, E] (row G, or no keep: every expert); experts
// from E on (a padded row's padding, the table's spare entries) are not
__device__ __forceinline__ void pair_kept(const uint8_t* keep, int num_experts, int G, int g, int pair, bool& lo_kept,
                                          bool& hi_kept) {
  lo_kept = 2 * pair < num_experts;
  hi_kept = 2 * pair + 1 < num_experts;
  if (keep != nullptr && g < G) {
    const uint8_t* row = keep + static_cast<int64_t>(g) * num_experts;
    lo_kept = lo_kept && row[2 * pair] != 0;
    hi_kept = hi_kept && row[2 * pair + 1] != 0;
  }
}

// the block's mask table: per_row entries (mask_entry) per group row 0 .. G, row G keeping everything
__device__ __forceinline__ void fill_mask_table(uint2* entries, int per_row, const uint8_t* keep, int num_experts,
                                                int G) {
  for (int i = threadIdx.x; i < (G + 1) * per_row; i += blockDim.x) {
    bool lo_kept, hi_kept;
    pair_kept(keep, num_experts, G, i / per_row, i % per_row, lo_kept, hi_kept);
    entries[i] = mask_entry(lo_kept, hi_kept);
  }
}

// the group id of a lane's row as loaded, as its two 32-bit words (0 without group ids; lo = 2^32 - 1 past the last
// row; hi = 0 for int32 ids, so that neither a sign extension nor a check waits on the load): the lane kernels load
// it a tile ahead and range-check it only where it is used, since an instruction on it next to the load would stall
// the warp there
__device__ __forceinline__ void group_id_words(const void* group, int group_is_int64, int64_t row, int64_t num_rows,
                                               unsigned int& lo, unsigned int& hi) {
  lo = 0;
  hi = 0;
  if (group == nullptr) return;
  if (row >= num_rows) {
    lo = 0xFFFFFFFFu;
  } else if (group_is_int64) {
    const uint2 g = static_cast<const uint2*>(group)[row];
    lo = g.x;
    hi = g.y;
  } else {
    lo = static_cast<const unsigned int*>(group)[row];
  }
}

// an expert pair's two logits as floats, a masked one (kMask, mask-table entry m = (and_hi, mul_lo)) as -inf
template <typename L, bool kMask>
__device__ __forceinline__ float2 pair_floats(unsigned int w, uint2 m) {
  return kMask ? L::masked_floats(w, m.x, m.y) : make_float2(L::lo(w), L::hi(w));
}

// 16-byte slot of chunk c of tile row r: rows of one quarter-warp (8 lanes) land on 8 different bank groups, both
// when a lane reads its own row and when 8 lanes copy consecutive chunks
template <int NC> __device__ __forceinline__ int swizzle(int r, int c) {
  if constexpr (NC >= 8) {
    return c ^ (r & 7);
  } else {
    return c ^ ((r >> 1) & 3);
  }
}

__device__ __forceinline__ void cp_async16(unsigned int dst, const void* src, int bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(dst), "l"(src), "r"(bytes) : "memory");
}
// (8-byte copies go through L1: .cg takes 16 bytes only)
__device__ __forceinline__ void cp_async8(unsigned int dst, const void* src, int bytes) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 8, %2;" ::"r"(dst), "l"(src), "r"(bytes) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_group 0;" ::: "memory"); }

// a shared-memory load the compiler may not merge with an earlier one (so the row is not held in registers)
__device__ __forceinline__ uint4 lds128(const uint4* a) {
  uint4 v;
  asm volatile("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "r"(static_cast<unsigned int>(__cvta_generic_to_shared(a))));
  return v;
}

// The multiprocessors of `device` and the blocks of KERNEL resident on one at `threads` and `smem`, queried once
// per (kernel, device, shared-memory size) and kept.
template <auto KERNEL>
cudaError_t wave_shape(int device, int threads, size_t smem, int& sms, int& resident) {
  static int cached_sms[64] = {0};
  static int cached_resident[64] = {0};
  static size_t cached_smem[64] = {0};
  if (device < 0 || device >= 64) return cudaErrorInvalidDevice;
  if (cached_sms[device] == 0) {
    cudaError_t err = cudaDeviceGetAttribute(&cached_sms[device], cudaDevAttrMultiProcessorCount, device);
    if (err != cudaSuccess) return err;
  }
  if (cached_resident[device] == 0 || cached_smem[device] != smem) {
    int blocks = 0;
    cudaError_t err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, KERNEL, threads, smem);
    if (err != cudaSuccess) return err;
    cached_resident[device] = blocks > 0 ? blocks : 1;
    cached_smem[device] = smem;
  }
  sms = cached_sms[device];
  resident = cached_resident[device];
  return cudaSuccess;
}

// The grid of a kernel whose blocks walk their rows grid-stride: one resident wave (`sms` x `resident` blocks), or the
// `needed` blocks that cover the call where fewer.
inline int one_wave_grid(int64_t needed, int sms, int resident) {
  const int64_t wave = static_cast<int64_t>(sms) * resident;
  return static_cast<int>(needed < wave ? needed : wave);
}

// Programmatic dependent launch (compute capability 9.0 and later). A kernel that launch_kernel starts with
// kDependentLaunch set may have its blocks resident, and run up to grid_dependency_wait(), while the kernel before
// it in the stream is still finishing; the wait returns once that kernel has completed and its memory is visible.
// So every kernel launched this way calls grid_dependency_wait() before it first reads or writes global memory (the
// kernel before it may produce its inputs, or still read memory that it overwrites). grid_dependents_launch() lets the
// next kernel launched this way start as soon as every block of this one has called it (else: once they have all
// exited). Without the launch attribute, or on older GPUs, the wait returns at once and both are no-ops. What the
// overlap saves is the gap between kernels (launch, block dispatch, the blocks' set-up), which at a few microseconds
// a call is a large share of the op's time.
__device__ __forceinline__ void grid_dependency_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}
__device__ __forceinline__ void grid_dependents_launch() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

// The launchers' params carry the bits below: kDependentLaunch as the caller asked, kTriggerEarly added by
// launch_kernel (dependent_launch_bits) where this grid's shape allows it.
constexpr int kDependentLaunch = 1, kTriggerEarly = 2;

// The dependent-launch bits for a grid of `grid` blocks where `sms` multiprocessors hold `resident` blocks each:
// none unless `requested` has kDependentLaunch; kTriggerEarly only where the grid takes at most half of the slots, so
// that the next grid of its size (the op called again) fits in the slots it leaves free, spread evenly. Triggered
// early by a larger grid, the next grid's blocks land on the few free slots and then wherever this one's blocks end
// first, unevenly over the multiprocessors: the forward measured 16-20% slower at T = 65,536 (512 of 792 slots) and
// 7% slower at 131,072 (a full wave) than without the early trigger, which made the small grids 5-12% faster
// (benchmarks/RESULTS.md, twelfth round). The same holds for a next grid larger than this one: a small split forward
// triggering early costs a backward launched right after it 2-3 us at E = 128 (fourteenth round), which only
// back-to-back forward + backward loops see (in a model other kernels come between). Without the early trigger the
// next kernel still starts as this one's last blocks exit.
inline int dependent_launch_bits(int requested, int64_t grid, int sms, int resident) {
  if ((requested & kDependentLaunch) == 0) return 0;
  const bool fits_twice = 2 * grid <= static_cast<int64_t>(sms) * resident;
  return kDependentLaunch | (fits_twice ? kTriggerEarly : 0);
}

// A kernel's first step, before any global memory access: the wait, then the trigger where `bits` (its params'
// dependent-launch bits) allow it.
__device__ __forceinline__ void dependent_launch_start(int bits) {
  grid_dependency_wait();
  if (bits & kTriggerEarly) grid_dependents_launch();
}

// Whether `device` (an index below 64) runs programmatic dependent launches: compute capability 9.0 or later.
inline bool dependent_launch_supported(int device) {
  static int cached_major[64] = {0};
  if (device < 0 || device >= 64) return false;
  if (cached_major[device] == 0) {
    int major = 0;
    if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess) return false;
    cached_major[device] = major;
  }
  return cached_major[device] >= 9;
}

// kernel<<<grid, threads, smem, stream>>>(params, rest...), where `sms` multiprocessors hold `resident` of its
// blocks each: params (a launcher's params struct) goes out with its dependent_launch field set to
// dependent_launch_bits, and the launch is a programmatic dependent one where that has kDependentLaunch and the device
// has it (the kernel must then follow grid_dependency_wait's rule above). The launch's error, if any.
template <typename... Params, typename P, typename... Rest>
cudaError_t launch_kernel(void (*kernel)(Params...), int grid, int threads, size_t smem, cudaStream_t stream,
                          int device, int sms, int resident, P params, const Rest&... rest) {
  params.dependent_launch = dependent_launch_bits(params.dependent_launch, grid, sms, resident);
  cudaLaunchConfig_t config = {};
  config.gridDim = dim3(static_cast<unsigned int>(grid), 1, 1);
  config.blockDim = dim3(static_cast<unsigned int>(threads), 1, 1);
  config.dynamicSmemBytes = smem;
  config.stream = stream;
  cudaLaunchAttribute attribute[1];
  attribute[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attribute[0].val.programmaticStreamSerializationAllowed = 1;
  config.attrs = attribute;
  config.numAttrs = (params.dependent_launch & kDependentLaunch) != 0 && dependent_launch_supported(device) ? 1 : 0;
  const cudaError_t err = cudaLaunchKernelEx(&config, kernel, params, rest...);
  return err != cudaSuccess ? err : cudaGetLastError();
}

}  // namespace moe_fastmask_lane16
