// Device helpers shared by the "lane" kernels of the forward (route_cuda.cu) and the backward
// (route_cuda_backward.cu): one row of 16-bit logits per lane, a warp's 32 rows copied into shared memory with
// cp.async as swizzled 16-byte chunks, and the per-group mask table whose entries turn a masked expert's logit into
// -inf with integer arithmetic alone.
// Also the launchers' one host helper, wave_shape.
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

// whether experts 2 pair and 2 pair + 1 are kept in row g of keep [G, E] (row G, and the pairs from E / 2 on: kept)
__device__ __forceinline__ void pair_kept(const uint8_t* keep, int num_experts, int G, int g, int pair, bool& lo_kept,
                                          bool& hi_kept) {
  lo_kept = hi_kept = true;
  if (g < G && 2 * pair < num_experts) {
    lo_kept = keep[static_cast<int64_t>(g) * num_experts + 2 * pair] != 0;
    hi_kept = keep[static_cast<int64_t>(g) * num_experts + 2 * pair + 1] != 0;
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

}  // namespace moe_fastmask_lane16
