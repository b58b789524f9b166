"""Host emulation of the CUDA device API that the kernels in ``csrc/`` use, so that their sources run on machines
without a GPU: the source is compiled with ``g++`` against ``EMU_HEADER`` (with its few device-only statements
replaced by host stand-ins), every thread of a block is a fiber on the launching thread (blocks run one after
another; a thread runs until it waits on a barrier, the threads in a fresh pseudo-random order each round), and
``__syncwarp`` / ``__syncthreads``, the shuffles and the votes are barriers of the warp or block. Under
AddressSanitizer (where g++ has one that runs here) every load and store must stay within its tensor or the block's
shared memory, which starts poisoned.
"""

from __future__ import annotations

import atexit
import os
import re
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import Future
from pathlib import Path

import background_builds

EMU_HEADER = r"""
#pragma once
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <vector>

#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static
#define __align__(n) __attribute__((aligned(n)))

struct dim3 {
  unsigned int x, y, z;
  dim3(unsigned int x_ = 1, unsigned int y_ = 1, unsigned int z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct uint2 { unsigned int x, y; };
struct uint4 { unsigned int x, y, z, w; };
struct float2 { float x, y; };
struct float4 { float x, y, z, w; };
struct __attribute__((aligned(16))) longlong2 { long long x, y; };
inline uint2 make_uint2(unsigned int x, unsigned int y) { return {x, y}; }
inline uint4 make_uint4(unsigned int x, unsigned int y, unsigned int z, unsigned int w) { return {x, y, z, w}; }
inline float2 make_float2(float x, float y) { return {x, y}; }
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }
inline longlong2 make_longlong2(long long x, long long y) { return {x, y}; }

inline thread_local dim3 threadIdx, blockIdx;
inline dim3 gridDim, blockDim;

// Every thread of the running block is a fiber (its own stack, switched to by swapcontext) on the launching thread: a
// thread runs until it waits on a barrier, then the scheduler (emu_launch) runs the next one that can go on. The
// scheduler visits the threads in a fresh pseudo-random order each round, so a missing barrier between a write and
// another thread's read shows in either order of the two. Threads that disagree on the number of barrier calls (a
// divergent warp or block) leave none that can go on: the emulation then ends the process.
struct EmuBarrier;
struct EmuWarp;
struct EmuFiber {
  ucontext_t context;
  unsigned char* stack = nullptr;  // (above a guard page)
  unsigned int thread = 0;
  EmuWarp* warp = nullptr;
  const EmuBarrier* waiting_on = nullptr;  // the barrier it waits on, at generation waiting_generation
  long waiting_generation = 0;
  bool done = false;
  void* fake_stack = nullptr;  // (AddressSanitizer's fiber-switch bookkeeping)
};
constexpr size_t kEmuFiberStack = 256 * 1024;
inline ucontext_t emu_scheduler_context;
inline EmuFiber* emu_fiber = nullptr;  // the running thread
inline const void* emu_scheduler_stack = nullptr;  // (AddressSanitizer: the scheduler's stack, seen from a fiber)
inline size_t emu_scheduler_stack_size = 0;

#if defined(__SANITIZE_ADDRESS__)
extern "C" void __sanitizer_start_switch_fiber(void** fake_stack_save, const void* bottom, size_t size);
extern "C" void __sanitizer_finish_switch_fiber(void* fake_stack_save, const void** bottom_old, size_t* size_old);
#else
inline void __sanitizer_start_switch_fiber(void**, const void*, size_t) {}
inline void __sanitizer_finish_switch_fiber(void*, const void**, size_t*) {}
#endif

// from the running thread back to the scheduler (finished: for good)
inline void emu_switch_to_scheduler(bool finished) {
  EmuFiber* self = emu_fiber;
  __sanitizer_start_switch_fiber(finished ? nullptr : &self->fake_stack, emu_scheduler_stack,
                                 emu_scheduler_stack_size);
  swapcontext(&self->context, &emu_scheduler_context);
  __sanitizer_finish_switch_fiber(self->fake_stack, &emu_scheduler_stack, &emu_scheduler_stack_size);
}

struct EmuBarrier {
  int count = 32;
  int arrived = 0;
  long generation = 0;
  void wait() {
    if (++arrived == count) {  // the last to arrive releases the others and goes on
      arrived = 0;
      ++generation;
      return;
    }
    emu_fiber->waiting_on = this;
    emu_fiber->waiting_generation = generation;
    emu_switch_to_scheduler(false);  // (resumed once generation has moved on)
  }
};
struct EmuWarp {
  EmuBarrier barrier;
  unsigned char slots[32][8];
};
inline thread_local EmuWarp* emu_warp = nullptr;
inline thread_local EmuBarrier* emu_block = nullptr;
inline unsigned char* emu_smem_base = nullptr;  // the running block's dynamic shared memory

inline void __syncwarp(unsigned int = 0xffffffffu) { emu_warp->barrier.wait(); }
inline void __syncthreads() { emu_block->wait(); }

// every lane's value of v, through the warp's slots (two barriers: written, then read)
template <typename X>
void emu_exchange(const X& v, X (&all)[32]) {
  static_assert(sizeof(X) <= 8, "exchanges of at most 8 bytes");
  const int lane = static_cast<int>(threadIdx.x & 31);
  std::memcpy(emu_warp->slots[lane], &v, sizeof(X));
  emu_warp->barrier.wait();
  for (int l = 0; l < 32; ++l) std::memcpy(&all[l], emu_warp->slots[l], sizeof(X));
  emu_warp->barrier.wait();
}
template <typename X>
X __shfl_xor_sync(unsigned int, X v, int offset, int width = 32) {
  if (offset >= width) std::_Exit(4);
  X all[32];
  emu_exchange(v, all);
  return all[static_cast<int>(threadIdx.x & 31) ^ offset];
}
template <typename X>
X __shfl_sync(unsigned int, X v, int src, int width = 32) {
  X all[32];
  emu_exchange(v, all);
  return all[(static_cast<int>(threadIdx.x & 31) & ~(width - 1)) + (src & (width - 1))];
}
inline unsigned int __reduce_max_sync(unsigned int mask, unsigned int v) {
  unsigned int all[32];
  emu_exchange(v, all);
  unsigned int best = 0;
  for (int l = 0; l < 32; ++l) best = ((mask >> l) & 1u) && all[l] > best ? all[l] : best;
  return best;
}
inline unsigned int __ballot_sync(unsigned int, bool pred) {
  int all[32];
  emu_exchange(static_cast<int>(pred), all);
  unsigned int bits = 0;
  for (int l = 0; l < 32; ++l) bits |= (all[l] ? 1u : 0u) << l;
  return bits;
}
inline bool __any_sync(unsigned int mask, bool pred) { return __ballot_sync(mask, pred) != 0; }
inline bool __all_sync(unsigned int mask, bool pred) { return __ballot_sync(mask, pred) == 0xffffffffu; }

template <typename X> inline X __ldcs(const X* p) { return *p; }
template <typename X> inline X __ldg(const X* p) { return *p; }
template <typename X> inline void __stcs(X* p, X v) { *p = v; }
inline unsigned int atomicAdd(unsigned int* p, unsigned int v) { return __atomic_fetch_add(p, v, __ATOMIC_RELAXED); }
inline unsigned long long atomicAdd(unsigned long long* p, unsigned long long v) {
  return __atomic_fetch_add(p, v, __ATOMIC_RELAXED);
}

inline unsigned int max(unsigned int a, unsigned int b) { return a > b ? a : b; }
inline unsigned int min(unsigned int a, unsigned int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline int min(int a, int b) { return a < b ? a : b; }

inline float __uint_as_float(unsigned int u) { float f; std::memcpy(&f, &u, 4); return f; }
inline unsigned int __float_as_uint(float f) { unsigned int u; std::memcpy(&u, &f, 4); return u; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __frcp_rn(float x) { return 1.0f / x; }
inline int __popc(unsigned int x) { return __builtin_popcount(x); }
inline int __ffs(unsigned int x) { return __builtin_ffs(static_cast<int>(x)); }
inline unsigned int __umulhi(unsigned int a, unsigned int b) {
  return static_cast<unsigned int>((static_cast<unsigned long long>(a) * b) >> 32);
}
inline unsigned int __vmaxu2(unsigned int a, unsigned int b) {
  return max(a & 0xFFFF0000u, b & 0xFFFF0000u) | max(a & 0xFFFFu, b & 0xFFFFu);
}
inline unsigned int __vminu2(unsigned int a, unsigned int b) {
  return min(a & 0xFFFF0000u, b & 0xFFFF0000u) | min(a & 0xFFFFu, b & 0xFFFFu);
}
// byte n of the result: byte (s >> 4n) & 7 of the 8 bytes b:a (CUDA's __byte_perm)
inline unsigned int __byte_perm(unsigned int a, unsigned int b, unsigned int s) {
  const unsigned long long bytes = (static_cast<unsigned long long>(b) << 32) | a;
  unsigned int out = 0;
  for (int n = 0; n < 4; ++n) out |= static_cast<unsigned int>((bytes >> (8 * ((s >> (4 * n)) & 7))) & 0xFF) << 8 * n;
  return out;
}
// PTX prmt.b32 (default mode): like __byte_perm, and a selector nibble with bit 3 set replicates the chosen byte's
// sign bit
inline unsigned int emu_prmt(unsigned int a, unsigned int b, unsigned int s) {
  const unsigned long long bytes = (static_cast<unsigned long long>(b) << 32) | a;
  unsigned int out = 0;
  for (int n = 0; n < 4; ++n) {
    const unsigned int nibble = (s >> (4 * n)) & 15, byte = (bytes >> (8 * (nibble & 7))) & 0xFF;
    out |= ((nibble & 8) ? ((byte & 0x80) ? 0xFFu : 0u) : byte) << 8 * n;
  }
  return out;
}

struct __half { unsigned short bits; };
inline __half __ushort_as_half(unsigned short u) { return {u}; }
inline unsigned short __half_as_ushort(__half h) { return h.bits; }
inline float __half2float(__half h) { _Float16 v; std::memcpy(&v, &h.bits, 2); return static_cast<float>(v); }
inline __half __float2half_rn(float f) {
  const _Float16 v = static_cast<_Float16>(f);
  __half h;
  std::memcpy(&h.bits, &v, 2);
  return h;
}

struct __nv_bfloat16 { unsigned short bits; };
inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 b) { return b.bits; }
inline float __bfloat162float(__nv_bfloat16 b) { return __uint_as_float(static_cast<unsigned int>(b.bits) << 16); }
inline __nv_bfloat16 __float2bfloat16_rn(float f) {
  unsigned int u = __float_as_uint(f);
  if (std::isnan(f)) return {static_cast<unsigned short>((u >> 16) | 0x40u)};
  u += 0x7FFFu + ((u >> 16) & 1u);
  return {static_cast<unsigned short>(u >> 16)};
}

// x * 1 + 0 per 16-bit half (fma.rn.bf16x2 / fma.rn.f16x2): -0.0 becomes +0.0, a NaN the canonical 0x7FFF, the rest
// (subnormals too) stays
inline unsigned int emu_canon_x2(unsigned int w, unsigned int inf_bits) {
  unsigned int out = 0;
  for (int n = 0; n < 2; ++n) {
    unsigned int h = (w >> (16 * n)) & 0xFFFFu;
    if ((h & 0x7FFFu) > inf_bits) h = 0x7FFFu;
    if (h == 0x8000u) h = 0;
    out |= h << (16 * n);
  }
  return out;
}
inline unsigned int emu_bf16x2_canon(unsigned int w) { return emu_canon_x2(w, 0x7F80u); }
inline unsigned int emu_f16x2_canon(unsigned int w) { return emu_canon_x2(w, 0x7C00u); }
// max.NaN.bf16x2: per half the larger value, the canonical NaN where either is NaN
inline unsigned int emu_bf16x2_max_nan(unsigned int a, unsigned int b) {
  unsigned int out = 0;
  for (int n = 0; n < 2; ++n) {
    const unsigned int x = (a >> (16 * n)) & 0xFFFFu, y = (b >> (16 * n)) & 0xFFFFu;
    const float fx = __uint_as_float(x << 16), fy = __uint_as_float(y << 16);
    const unsigned int m = (std::isnan(fx) || std::isnan(fy)) ? 0x7FFFu : (fx >= fy ? x : y);
    out |= m << (16 * n);
  }
  return out;
}

// x rounded to the nearest bfloat16 (ties to even; subnormals kept, overflow to inf, NaN the canonical 0x7FFF)
inline unsigned int emu_bf16_round(double x) {
  const unsigned int sign = std::signbit(x) ? 0x8000u : 0u;
  if (std::isnan(x)) return 0x7FFFu;
  if (std::isinf(x)) return sign | 0x7F80u;
  if (x == 0.0) return sign;
  const double a = std::fabs(x);
  const double ulp = std::ldexp(1.0, std::max(std::ilogb(a), -126) - 7);
  const double r = std::nearbyint(a / ulp) * ulp;  // (the default rounding mode: to nearest, ties to even)
  if (r >= 0x1p128) return sign | 0x7F80u;
  return sign | (__float_as_uint(static_cast<float>(r)) >> 16);  // (r has at most 8 significant bits)
}
inline double emu_bf16_half(unsigned int w, int n) {
  return static_cast<double>(__uint_as_float(((w >> (16 * n)) & 0xFFFFu) << 16));
}
// cvt.rn.bf16x2.f32, mul.rn.bf16x2, fma.rn.bf16x2: per half, rounded once (the products of two bfloat16s are exact in
// double)
inline unsigned int emu_bf16x2_pack(float lo, float hi) { return emu_bf16_round(lo) | (emu_bf16_round(hi) << 16); }
inline unsigned int emu_bf16x2_mul(unsigned int a, unsigned int b) {
  return emu_bf16_round(emu_bf16_half(a, 0) * emu_bf16_half(b, 0)) |
         (emu_bf16_round(emu_bf16_half(a, 1) * emu_bf16_half(b, 1)) << 16);
}
inline unsigned int emu_bf16x2_fma(unsigned int a, unsigned int b, unsigned int c) {
  return emu_bf16_round(emu_bf16_half(a, 0) * emu_bf16_half(b, 0) + emu_bf16_half(c, 0)) |
         (emu_bf16_round(emu_bf16_half(a, 1) * emu_bf16_half(b, 1) + emu_bf16_half(c, 1)) << 16);
}

// ex2.approx.ftz / rcp.approx.ftz: subnormal inputs and results are zero
inline float emu_ftz(float x) { return std::fpclassify(x) == FP_SUBNORMAL ? std::copysign(0.0f, x) : x; }
inline float emu_ex2(float x) { return emu_ftz(std::exp2(emu_ftz(x))); }
inline float emu_rcp(float x) { return emu_ftz(1.0f / emu_ftz(x)); }

// shared-memory addresses are offsets from the running block's shared memory; cp.async copies at once
inline size_t __cvta_generic_to_shared(const void* p) {
  return static_cast<size_t>(static_cast<const unsigned char*>(p) - emu_smem_base);
}
inline void emu_cp_async(unsigned int dst, const void* src, int size, int bytes) {
  std::memcpy(emu_smem_base + dst, src, bytes);
  std::memset(emu_smem_base + dst + bytes, 0, size - bytes);
}
inline void emu_cp_async16(unsigned int dst, const void* src, int bytes) { emu_cp_async(dst, src, 16, bytes); }
inline void emu_cp_async8(unsigned int dst, const void* src, int bytes) {
  if (dst % 8 != 0 || reinterpret_cast<uintptr_t>(src) % 8 != 0) std::abort();  // (the device requires both)
  emu_cp_async(dst, src, 8, bytes);
}

// runtime API
typedef int cudaError_t;
typedef void* cudaStream_t;
enum { cudaSuccess = 0, cudaErrorInvalidValue = 1, cudaErrorInvalidDevice = 101 };
enum cudaDeviceAttr { cudaDevAttrMultiProcessorCount = 16, cudaDevAttrComputeCapabilityMajor = 75 };
struct cudaFuncAttributes { int numRegs; };
inline int emu_sms = 2;  // small, so that the grid-stride loops take several steps
inline cudaError_t cudaGetDevice(int* d) { *d = 0; return cudaSuccess; }
inline cudaError_t cudaSetDevice(int) { return cudaSuccess; }
inline cudaError_t cudaDeviceGetAttribute(int* v, cudaDeviceAttr attr, int) {
  *v = attr == cudaDevAttrComputeCapabilityMajor ? 9 : emu_sms;  // (a GPU with programmatic dependent launch)
  return cudaSuccess;
}
template <typename F> cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* v, F, int, size_t) {
  *v = 1;
  return cudaSuccess;
}
template <typename F> cudaError_t cudaFuncGetAttributes(cudaFuncAttributes* a, F) {
  a->numRegs = 0;
  return cudaSuccess;
}
inline cudaError_t cudaGetLastError() { return cudaSuccess; }
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };
template <typename F> cudaError_t cudaFuncSetAttribute(F, cudaFuncAttribute, int) { return cudaSuccess; }
template <typename T> cudaError_t cudaMemcpyToSymbol(T& symbol, const void* src, size_t bytes) {
  std::memcpy(&symbol, src, bytes);
  return cudaSuccess;
}
inline long long clock64() { return std::chrono::steady_clock::now().time_since_epoch().count(); }
inline const char* cudaGetErrorString(cudaError_t) { return "emulated"; }

// the fibers' stacks, kept for the next launch (each above a guard page, so that an overflow faults)
struct EmuStacks {
  std::vector<unsigned char*> stacks;
  size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  unsigned char* get(size_t i) {
    while (stacks.size() <= i) {
      void* mem = mmap(nullptr, kEmuFiberStack + page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
      if (mem == MAP_FAILED || mprotect(mem, page, PROT_NONE) != 0) {
        std::fprintf(stderr, "emulation: no memory for the threads' stacks\n");
        std::_Exit(5);
      }
      stacks.push_back(static_cast<unsigned char*>(mem) + page);
    }
    return stacks[i];
  }
};
inline EmuStacks emu_stacks;
// the state of the threads' order (xorshift, never 0): from MOE_FASTMASK_TEST_SEED where set, so that a run replays
inline unsigned long long emu_order_state = [] {
  const char* seed = std::getenv("MOE_FASTMASK_TEST_SEED");
  return (0x9E3779B97F4A7C15ull ^ (seed != nullptr ? std::strtoull(seed, nullptr, 10) : 0ull)) | 1ull;
}();
inline const std::function<void()>* emu_body = nullptr;

inline void emu_fiber_main() {
  __sanitizer_finish_switch_fiber(nullptr, &emu_scheduler_stack, &emu_scheduler_stack_size);
  (*emu_body)();
  emu_fiber->done = true;
  emu_switch_to_scheduler(true);
}

// a launch: the blocks one after another, each with its threads as fibers over poisoned shared memory
inline void emu_launch(int grid, int threads, size_t smem_bytes, const std::function<void()>& body) {
  gridDim = {static_cast<unsigned int>(grid), 1, 1};
  blockDim = {static_cast<unsigned int>(threads), 1, 1};
  emu_body = &body;
  unsigned long long& random = emu_order_state;
  std::vector<int> order(threads);
  for (int b = 0; b < grid; ++b) {
    std::vector<unsigned char> smem(smem_bytes + 16, 0xA5);
    emu_smem_base = smem.data() + (16 - reinterpret_cast<uintptr_t>(smem.data()) % 16) % 16;
    EmuBarrier block;
    block.count = threads;
    std::vector<EmuWarp> warps((threads + 31) / 32);
    std::vector<EmuFiber> fibers(threads);
    blockIdx = {static_cast<unsigned int>(b), 0, 0};
    emu_block = &block;
    for (int t = 0; t < threads; ++t) {
      EmuFiber& f = fibers[t];
      f.thread = static_cast<unsigned int>(t);
      f.warp = &warps[t / 32];
      f.stack = emu_stacks.get(static_cast<size_t>(t));
      getcontext(&f.context);
      f.context.uc_stack.ss_sp = f.stack;
      f.context.uc_stack.ss_size = kEmuFiberStack;
      f.context.uc_link = nullptr;
      makecontext(&f.context, emu_fiber_main, 0);
      // (with the stack set up: a zero size keeps AddressSanitizer's swapcontext from clearing the whole stack's
      // shadow on every switch)
      f.context.uc_stack.ss_sp = nullptr;
      f.context.uc_stack.ss_size = 0;
      order[t] = t;
    }
    for (int left = threads; left > 0;) {
      for (int i = threads - 1; i > 0; --i) {  // (a fresh order: Fisher-Yates on an xorshift stream)
        random ^= random << 13;
        random ^= random >> 7;
        random ^= random << 17;
        std::swap(order[i], order[random % static_cast<unsigned long long>(i + 1)]);
      }
      bool ran = false;
      for (int t : order) {
        EmuFiber& f = fibers[t];
        if (f.done || (f.waiting_on != nullptr && f.waiting_on->generation == f.waiting_generation)) continue;
        f.waiting_on = nullptr;
        threadIdx = {f.thread, 0, 0};
        emu_warp = f.warp;
        emu_fiber = &f;
        void* fake_stack = nullptr;
        __sanitizer_start_switch_fiber(&fake_stack, f.stack, kEmuFiberStack);
        swapcontext(&emu_scheduler_context, &f.context);
        __sanitizer_finish_switch_fiber(fake_stack, nullptr, nullptr);
        emu_fiber = nullptr;
        ran = true;
        left -= f.done ? 1 : 0;
      }
      if (!ran) {
        std::fprintf(stderr, "emulation: a thread never reached a barrier (divergent warp or block)\n");
        std::_Exit(3);
      }
    }
  }
  emu_smem_base = nullptr;
  emu_body = nullptr;
}

// launches with attributes: the blocks run in turn, so a programmatic dependent launch has nothing to overlap
enum cudaLaunchAttributeID { cudaLaunchAttributeProgrammaticStreamSerialization = 3 };
union cudaLaunchAttributeValue { unsigned int programmaticStreamSerializationAllowed; };
struct cudaLaunchAttribute { cudaLaunchAttributeID id; cudaLaunchAttributeValue val; };
struct cudaLaunchConfig_t {
  dim3 gridDim, blockDim;
  size_t dynamicSmemBytes;
  cudaStream_t stream;
  cudaLaunchAttribute* attrs;
  unsigned int numAttrs;
};
template <typename... Params, typename... Args>
cudaError_t cudaLaunchKernelEx(const cudaLaunchConfig_t* config, void (*kernel)(Params...), Args&&... args) {
  emu_launch(static_cast<int>(config->gridDim.x), static_cast<int>(config->blockDim.x), config->dynamicSmemBytes,
             [&] { kernel(args...); });
  return cudaSuccess;
}
"""


# the device-only statements of csrc/route_lane16.cuh (the lane kernels' shared header, which kernel_source inlines
# into both kernel sources), and their host stand-ins
LANE16_SUBSTITUTIONS = {
    'asm("fma.rn.bf16x2 %0, %1, %2, %3;" : "=r"(d) : "r"(w), "r"(kOnes), "r"(0u));': "d = emu_bf16x2_canon(w);",
    'asm("fma.rn.f16x2 %0, %1, %2, %3;" : "=r"(d) : "r"(w), "r"(kOnes), "r"(0u));': "d = emu_f16x2_canon(w);",
    'asm volatile("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4];"\n'
    '               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)\n'
    '               : "r"(static_cast<unsigned int>(__cvta_generic_to_shared(a))));': "v = *a;",
    'asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(dst), "l"(src), "r"(bytes) : "memory");':
        "emu_cp_async16(dst, src, bytes);",
    'asm volatile("cp.async.ca.shared.global [%0], [%1], 8, %2;" ::"r"(dst), "l"(src), "r"(bytes) : "memory");':
        "emu_cp_async8(dst, src, bytes);",
    'asm volatile("cp.async.commit_group;" ::: "memory");': "",
    'asm volatile("cp.async.wait_group 0;" ::: "memory");': "",
}


def kernel_source(path: Path) -> str:
    """The text of the kernel source at ``path`` with each ``#include "name"`` of a file next to it replaced by that
    file's text (recursively), so that substitutions apply to the shared headers too."""
    lines = []
    for line in path.read_text().splitlines(keepends=True):
        match = re.match(r'\s*#include "([^"]+)"', line)
        if match and (path.parent / match.group(1)).is_file():
            lines.append(kernel_source(path.parent / match.group(1)) + "\n")
        else:
            lines.append(line)
    return "".join(lines)


def substituted(source: str, substitutions: dict[str, str]) -> str:
    """``source`` with each key of ``substitutions`` (a device-only statement that must occur exactly once) replaced
    by its host stand-in."""
    for device_code, host_code in substitutions.items():
        assert source.count(device_code) == 1, f"the kernel source no longer has (exactly once): {device_code}"
        source = source.replace(device_code, host_code)
    return source


# builds started in the background (start_build), by (source after substitution, stem, sanitize)
_started: dict[tuple[str, str, bool], Future] = {}


def build_emulation(source: str, substitutions: dict[str, str], directory: Path, stem: str, sanitize: bool) -> Path:
    """Compile a kernel source for the host (g++, against ``EMU_HEADER``), each key of ``substitutions`` (a
    device-only statement that must occur exactly once) replaced by its host stand-in; returns the library's path.
    Where :func:`start_build` started the same build, waits for it instead."""
    source = substituted(source, substitutions)
    future = _started.get((source, stem, sanitize))
    if future is not None:
        return future.result()
    return _compile(source, directory, stem, sanitize)


def start_build(source: str, substitutions: dict[str, str], stem: str) -> None:
    """(A test's ``prebuild``) Start in the background (tests/background_builds.py) the build that
    :func:`run_emulated_checks` will ask :func:`build_emulation` for first: with AddressSanitizer where g++ has it."""
    sanitize = asan_runtime() is not None
    source = substituted(source, substitutions)
    if (source, stem, sanitize) not in _started:
        directory = Path(tempfile.mkdtemp(prefix=f"moe_fastmask_{stem}_"))
        atexit.register(shutil.rmtree, directory, True)
        _started[(source, stem, sanitize)] = background_builds.submit(
            lambda: _compile(source, directory, stem, sanitize))


def asan_runtime() -> str | None:
    """The path of g++'s AddressSanitizer runtime, or None where it has none."""
    asan = subprocess.run(["g++", "-print-file-name=libasan.so"], capture_output=True, text=True).stdout.strip()
    return asan if os.path.isabs(asan) and Path(asan).is_file() else None


def _compile(source: str, directory: Path, stem: str, sanitize: bool) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "emu_cuda.h").write_text(EMU_HEADER)
    for name in ("cuda_bf16.h", "cuda_fp16.h", "cuda_runtime.h"):
        (directory / name).write_text('#include "emu_cuda.h"\n')
    (directory / f"{stem}.cpp").write_text(source)
    library = directory / f"{stem}.so"
    # -O0: the sources' many template instances compile 4-5x faster than at -O1, and the checks run about as fast
    command = ["g++", "-std=c++20", "-O0", "-g", "-fno-strict-aliasing", "-shared", "-fPIC", f"-I{directory}", "-o",
               str(library), str(directory / f"{stem}.cpp")]
    if sanitize:
        command[1:1] = ["-fsanitize=address", "-fno-omit-frame-pointer"]
    done = background_builds.run(command, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return library


def run_emulated_checks(build, code: str, tmp_path: Path, seed: int, marker: str) -> None:
    """Run ``code`` (Python, ``{library}`` in it for the built library's path) in a fresh process (a sanitizer
    report, or threads that disagree on a barrier, end it) on the library ``build(directory, sanitize)`` makes:
    under AddressSanitizer where g++ has one, else, or where that runtime cannot start under this Python and torch,
    without it. Fails unless the process exits 0 and prints ``marker``."""
    asan = asan_runtime()
    sanitize = asan is not None
    tests_dir = str(Path(__file__).resolve().parent)
    env = dict(os.environ, MOE_FASTMASK_TEST_SEED=str(seed),
               PYTHONPATH=os.pathsep.join(filter(None, [tests_dir, os.environ.get("PYTHONPATH")])))
    out = None
    if sanitize:
        library = build(tmp_path / "asan", True)
        out = subprocess.run([sys.executable, "-c", code.format(library=str(library))], capture_output=True,
                             text=True, timeout=1800, env=dict(env, LD_PRELOAD=asan, ASAN_OPTIONS="detect_leaks=0"))
        # a sanitizer runtime that cannot run under this Python and torch (some toolchains' C++ runtimes break its
        # interceptors: "AddressSanitizer: CHECK failed") is no finding about the kernel: run without it then
        if out.returncode != 0 and "AddressSanitizer: CHECK failed" in out.stderr:
            out = None
    if out is None:
        library = build(tmp_path / "plain", False)
        out = subprocess.run([sys.executable, "-c", code.format(library=str(library))], capture_output=True,
                             text=True, timeout=1800, env=env)
    assert out.returncode == 0 and marker in out.stdout, (out.stdout[-2000:], out.stderr[-5000:])
