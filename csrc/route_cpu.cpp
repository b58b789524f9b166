// Fused MoE routing on CPU: mask + softmax + top-k + per-group expert counts, one pass per token. One file of about
// 620 lines on purpose: the vector helpers, the per-token kernel of every router variant and the op entry point.
//
// Per token (route_rows): the row is read once (any strides, float32 / float16 / bfloat16 converted to float32) with
// the group's mask applied, then max, exp and sum run on 16-byte vectors, and the top-k is picked from a handful of
// candidates (select_topk) by the tie rule of moe_ops.h, on integer keys of the masked logits. Tokens are split over
// torch's intra-op threads (at::parallel_for); each thread counts into its own [G, E] histogram, summed into `counts`
// at the end, so there are no shared counters per token and the result does not depend on the number of threads.
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

#include "moe_ops.h"

namespace {

// C++17 stand-ins for std::bit_cast / std::countr_zero: torch builds extensions with -std=c++17 before 2.12.
template <typename To, typename From>
inline To bit_cast(const From& from) {
  static_assert(sizeof(To) == sizeof(From), "bit_cast needs equal sizes");
  To to;
  std::memcpy(&to, &from, sizeof(To));
  return to;
}

inline int countr_zero(uint64_t bits) { return __builtin_ctzll(bits); }  // bits != 0 at every call

constexpr int64_t kMaxTopK = 16;
constexpr int64_t kGrainTokens = 256;  // batches up to this many tokens run on one thread
constexpr float kInf = std::numeric_limits<float>::infinity();
// Order keys (order_keys): kMasked for a masked expert or padding, below kFlipNegInf, the key of an allowed -inf.
constexpr int32_t kMasked = std::numeric_limits<int32_t>::min();
constexpr int32_t kFlipNegInf = -2139095041;

// ---------------------------------------------------------------------------------------------------------------------
// 16-byte vectors through GCC/Clang vector extensions: the x86-64 baseline (SSE2) and the NEON width, so the build
// needs no -march flag and the cached library runs on any machine of the same architecture.
// ---------------------------------------------------------------------------------------------------------------------

constexpr int kLanes = 4;
typedef float vfloat __attribute__((vector_size(16)));
typedef int32_t vint __attribute__((vector_size(16)));
typedef uint32_t vuint __attribute__((vector_size(16)));
typedef uint16_t vu16 __attribute__((vector_size(8)));
typedef uint8_t vu8 __attribute__((vector_size(4)));

inline vfloat vload(const float* p) {
  vfloat v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
inline void vstore(float* p, vfloat v) { std::memcpy(p, &v, sizeof(v)); }
inline vint vload_int(const int32_t* p) {
  vint v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
inline void vstore(int32_t* p, vint v) { std::memcpy(p, &v, sizeof(v)); }
inline vfloat vmax(vfloat a, vfloat b) { return a > b ? a : b; }
inline vint vmax(vint a, vint b) { return a > b ? a : b; }
inline vfloat splat(float c) { return vfloat{} + c; }
inline vint splat_int(int32_t c) { return vint{} + c; }
inline float hmax(vfloat v) {
  float m = v[0];
  for (int l = 1; l < kLanes; ++l) m = v[l] > m ? v[l] : m;
  return m;
}
inline float hsum(vfloat v) {
  float s = v[0];
  for (int l = 1; l < kLanes; ++l) s += v[l];
  return s;
}
inline int32_t hsum(vint v) {
  int32_t s = v[0];
  for (int l = 1; l < kLanes; ++l) s += v[l];
  return s;
}
// Bit l of the result = lane l of a comparison result.
inline uint64_t movemask(vint mask) {
#if defined(__SSE2__)
  return static_cast<uint64_t>(_mm_movemask_ps(reinterpret_cast<__m128>(mask)));
#else
  uint64_t bits = 0;
  for (int l = 0; l < kLanes; ++l) bits |= static_cast<uint64_t>(mask[l] & 1) << l;
  return bits;
#endif
}

// exp(x) for x <= 0 or x = -inf, lane-wise (about 1 ulp, Cephes' expf polynomial); branch-free.
inline vfloat exp_nonpositive(vfloat x) {
  // Below -104 the result rounds to 0: return 0 there, computing on 0 instead, since arithmetic that underflows to
  // subnormals is very slow on many CPUs (masked experts are -inf). NaN passes through (its row is flagged).
  const vint zero = x < -104.0f;
  x = zero ? splat(0.0f) : x;
  constexpr float kRound = 12582912.0f;  // 1.5 * 2^23: t = y + kRound holds round(y) in its low mantissa bits
  const vfloat t = x * 1.44269504088896341f + kRound;
  const vfloat n = t - kRound;
  const vint ni = bit_cast<vint>(t) - bit_cast<int32_t>(kRound);
  vfloat r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  vfloat p = r * 1.9875691500e-4f + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.0f;
  // 2^n for n in [-150, 0] as two normal powers of two, so a subnormal result rounds once, at the last multiply
  const vint n1 = ni >> 1;
  const vint n2 = ni - n1;
  const vfloat result = p * bit_cast<vfloat>((n1 + 127) << 23) * bit_cast<vfloat>((n2 + 127) << 23);
  return zero ? splat(0.0f) : result;
}

// sigmoid(x) = 1 / (1 + exp(-x)), lane-wise, through exp of -|x| (exp_nonpositive's domain): 0 at -inf, 1 at +inf.
inline vfloat sigmoid(vfloat x) {
  const vfloat e = exp_nonpositive(bit_cast<vfloat>(bit_cast<vint>(x) | splat_int(std::numeric_limits<int32_t>::min())));
  return x >= 0.0f ? 1.0f / (1.0f + e) : e / (1.0f + e);
}
inline float sigmoid(float x) { return sigmoid(splat(x))[0]; }

// Integer keys with the order of the tie rule (moe_ops.h), lane-wise: the float bits mapped to an int32 of the same
// order, -0.0 made +0.0 first, a negative NaN raised to -inf's key (a positive one sorts above +inf); masked lanes
// (kept == 0) get kMasked, below every allowed key. Equal keys are equal logits: the lower index wins in select_topk.
inline vint order_keys(vfloat v, vint kept) {
  v = v == 0.0f ? splat(0.0f) : v;
  const vint bits = bit_cast<vint>(v);
  const vint key = bits ^ ((bits >> 31) & 0x7FFFFFFF);
  return kept != 0 ? vmax(key, splat_int(kFlipNegInf)) : splat_int(kMasked);
}

// order_keys of one allowed value.
inline int32_t order_key(float v) {
  if (v == 0.0f) v = 0.0f;
  const int32_t bits = bit_cast<int32_t>(v);
  return std::max(bits ^ ((bits >> 31) & 0x7FFFFFFF), kFlipNegInf);
}

// Logits [e, e + kLanes) of a row as float32; `contiguous` means a unit expert stride.
template <typename scalar_t, bool contiguous>
inline vfloat load_logits(const scalar_t* row, int64_t stride, int64_t e) {
  if constexpr (contiguous && std::is_same_v<scalar_t, float>) {
    return vload(row + e);
  } else if constexpr (contiguous && std::is_same_v<scalar_t, c10::BFloat16>) {
    vu16 bits;  // bfloat16 = the high half of a float32
    std::memcpy(&bits, row + e, sizeof(bits));
    return bit_cast<vfloat>(__builtin_convertvector(bits, vint) << 16);
  } else if constexpr (contiguous && std::is_same_v<scalar_t, c10::Half>) {
    // c10::detail::fp16_ieee_to_fp32_value, lane-wise
    vu16 half;
    std::memcpy(&half, row + e, sizeof(half));
    const vuint w = __builtin_convertvector(half, vuint) << 16;
    const vuint sign = w & 0x80000000u;
    const vuint two_w = w + w;
    const vfloat normalized = bit_cast<vfloat>((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
    const vfloat denormalized = bit_cast<vfloat>((two_w >> 17) | (126u << 23)) - 0.5f;
    const vuint magnitude = two_w < (1u << 27) ? bit_cast<vuint>(denormalized) : bit_cast<vuint>(normalized);
    return bit_cast<vfloat>(sign | magnitude);
  } else {
    vfloat v;
    for (int l = 0; l < kLanes; ++l) v[l] = static_cast<float>(row[(e + l) * (contiguous ? 1 : stride)]);
    return v;
  }
}

// ---------------------------------------------------------------------------------------------------------------------
// Routing kernel
// ---------------------------------------------------------------------------------------------------------------------

// Everything route_rows reads or writes, as raw pointers and element strides.
template <typename scalar_t>
struct RouteArgs {
  const scalar_t* logits;   // [T, E], strides (logits_stride_t, logits_stride_e)
  int64_t logits_stride_t;
  int64_t logits_stride_e;
  const uint8_t* keep;      // [G, E] bool bytes, or nullptr
  const int32_t* group32;   // [T] or nullptr
  const int64_t* group64;   // [T] or nullptr
  scalar_t* weights;        // [T, K]
  int64_t* ids;             // [T, K]
  int64_t num_experts;      // E
  int64_t num_groups;       // G: group ids outside [0, G) are treated as -1 (no mask, not counted)
  int64_t top_k;            // K
  bool renormalize;
  int64_t scoring;          // kSoftmax, kSoftmaxChosen or kSigmoid
  const float* bias;        // [E] selection bias (sigmoid), or nullptr
  int64_t n_group;          // group-limited top-k (sigmoid): contiguous groups of E / n_group experts; 1 = none
  int64_t topk_group;       // groups kept per token
  float scale;              // multiplies the weights
};

constexpr int64_t kSoftmax = 0;
constexpr int64_t kSoftmaxChosen = 1;
constexpr int64_t kSigmoid = 2;

inline int64_t round_up(int64_t n, int64_t m) { return (n + m - 1) / m * m; }

// Per-thread scratch of route_rows. Rows are padded to a multiple of 16 experts; the padding logits stay -inf and
// the padding keys kMasked.
struct Scratch {
  explicit Scratch(int64_t num_experts)
      : padded(round_up(num_experts, 16)),
        logits(padded, -kInf),
        keys(padded, kMasked),
        exps(padded, 0.0f),
        cand_keys(padded + kLanes),
        cand_ids(padded + kLanes),
        by_rank(padded + kLanes),
        tied_before(padded + kLanes) {}
  int64_t padded;
  std::vector<float> logits;         // [padded] the row in float32, masked experts at -inf
  std::vector<int32_t> keys;         // [padded] order keys of the row (order_keys)
  std::vector<float> exps;           // [padded] exp(logit - max), 0 in the padding
  std::vector<int32_t> cand_keys;    // top-k candidates in expert order, then kMasked up to a multiple of kLanes
  std::vector<int32_t> cand_ids;     // their experts
  std::vector<int32_t> by_rank;      // candidate at each rank
  std::vector<int32_t> tied_before;  // per rank: candidates met so far with that many candidates above them
};

// Top-k of the keys keys[e], e in [0, E), by descending key, ties to the lower index (the tie rule); writes the
// chosen experts to ids.
//
// 1. A threshold no higher than the k-th largest key: the 16 lane maxima of the keys (lane = e % 16) are folded to
//    W >= k lanes (lane = e % W). They are W distinct experts (or padding, whose kMasked is no higher than any key),
//    so at least k keys are >= the smallest of them.
// 2. Candidates: the experts whose key is at or above the threshold (about 2k on a softmax row), found with vector
//    compares and compacted in expert order. Masked experts join only when fewer than k allowed ones do, as a mask
//    with all the experts of a lane off drops the threshold to kMasked.
// 3. Rank of a candidate = candidates before it in (key desc, index asc) order: the number strictly above it,
//    counted with vector compares, plus the equal ones of lower index. Ranks are distinct; ranks < k are the answer.
inline void select_topk(Scratch& s, int64_t num_experts, int64_t top_k, int64_t* ids) {
  const int32_t* keys = s.keys.data();
  vint lane_max_v[16 / kLanes];
  for (auto& v : lane_max_v) v = splat_int(kMasked);
  for (int64_t e = 0; e < s.padded; e += 16) {
    for (int k = 0; k < 16 / kLanes; ++k) lane_max_v[k] = vmax(lane_max_v[k], vload_int(keys + e + k * kLanes));
  }
  int32_t lane_max[16];
  std::memcpy(lane_max, lane_max_v, sizeof(lane_max));
  int width = 16;
  while (width / 2 >= top_k) {
    width /= 2;
    for (int l = 0; l < width; ++l) lane_max[l] = std::max(lane_max[l], lane_max[l + width]);
  }
  int32_t threshold = lane_max[0];
  for (int l = 1; l < width; ++l) threshold = std::min(threshold, lane_max[l]);

  int32_t* cand_keys = s.cand_keys.data();
  int32_t* cand_ids = s.cand_ids.data();
  const vint lowest = splat_int(threshold);
  const vint masked = splat_int(kMasked);
  int32_t n = 0;
  for (const int32_t with_masked : {0, -1}) {
    n = 0;
    for (int64_t base = 0; base < num_experts; base += 64) {
      const int64_t stop = std::min<int64_t>(base + 64, s.padded);
      uint64_t bits = 0;
      for (int64_t e = base; e < stop; e += kLanes) {
        const vint key = vload_int(keys + e);
        bits |= movemask((key >= lowest) & ((key > masked) | with_masked)) << (e - base);  // with_masked: 0 or ~0
      }
      if (num_experts - base < 64) bits &= (uint64_t{1} << (num_experts - base)) - 1;  // not the padding
      while (bits != 0) {
        const int64_t e = base + countr_zero(bits);
        bits &= bits - 1;
        cand_keys[n] = keys[e];
        cand_ids[n] = static_cast<int32_t>(e);
        ++n;
      }
    }
    if (n >= top_k) break;
  }
  const int32_t n_padded = static_cast<int32_t>(round_up(n, kLanes));
  for (int32_t j = n; j < n_padded; ++j) cand_keys[j] = kMasked;  // never strictly above a key

  // Equal candidates share the count of those strictly above; met in expert order, they take consecutive ranks.
  int32_t* by_rank = s.by_rank.data();
  int32_t* tied_before = s.tied_before.data();
  std::fill(tied_before, tied_before + n, 0);
  for (int32_t i = 0; i < n; ++i) {
    const vint v = splat_int(cand_keys[i]);
    vint above = {};
    for (int32_t j = 0; j < n_padded; j += kLanes) above -= vload_int(cand_keys + j) > v;
    const int32_t rank = hsum(above);
    by_rank[rank + tied_before[rank]++] = i;
  }
  for (int64_t j = 0; j < top_k; ++j) ids[j] = cand_ids[by_rank[j]];
}

// Sigmoid variant: replaces the order keys of the allowed experts (keys[e] != kMasked) by those of their selection
// values sigmoid(x) + bias, set to -inf outside the token's kept groups (group_limit). sel: [padded] scratch.
void group_limit(float* sel, int64_t num_experts, int64_t n_group, int64_t topk_group);

template <typename scalar_t>
void sigmoid_keys(const RouteArgs<scalar_t>& a, const float* x, int32_t* keys, float* sel, int64_t padded) {
  const int64_t E = a.num_experts;
  for (int64_t e = 0; e < padded; e += kLanes) vstore(sel + e, sigmoid(vload(x + e)));
  for (int64_t e = 0; e < E; ++e) {
    if (keys[e] == kMasked) {
      sel[e] = -kInf;  // invisible to the group scores
    } else if (a.bias != nullptr) {
      sel[e] += a.bias[e];
    }
  }
  if (a.n_group > 1) group_limit(sel, E, a.n_group, a.topk_group);
  for (int64_t e = 0; e < E; ++e) {
    if (keys[e] != kMasked) keys[e] = order_key(sel[e]);
  }
}

// DeepSeek-V3's group limit: a group scores the sum of its two highest values (-inf for masked experts; an exact tie
// for the highest counts twice); the topk_group best groups are kept, equal scores to the lower group index (float
// comparison: -0.0 == +0.0); values outside the kept groups become -inf.
void group_limit(float* sel, int64_t num_experts, int64_t n_group, int64_t topk_group) {
  const int64_t size = num_experts / n_group;
  float scores[64];  // n_group <= 64 (route checks it)
  bool kept[64];
  for (int64_t g = 0; g < n_group; ++g) {
    float first = -kInf, second = -kInf;
    for (int64_t e = g * size; e < (g + 1) * size; ++e) {
      const float v = sel[e];
      if (v > first) {
        second = first;
        first = v;
      } else if (v > second) {
        second = v;
      }
    }
    scores[g] = first + second;
    kept[g] = false;
  }
  for (int64_t j = 0; j < topk_group; ++j) {
    int64_t best = -1;
    for (int64_t g = 0; g < n_group; ++g) {
      if (!kept[g] && (best < 0 || scores[g] > scores[best])) best = g;
    }
    kept[best] = true;
  }
  for (int64_t g = 0; g < n_group; ++g) {
    if (!kept[g]) std::fill(sel + g * size, sel + (g + 1) * size, -kInf);
  }
}

// Routes tokens [begin, end). hist: [G, E] counts to add to, or nullptr.
template <typename scalar_t, bool contiguous>
void route_rows(const RouteArgs<scalar_t>& a, int64_t begin, int64_t end, int64_t* hist, Scratch& scratch) {
  const int64_t E = a.num_experts;
  const int64_t K = a.top_k;
  const int64_t padded = scratch.padded;
  const int64_t full = E / kLanes * kLanes;  // experts in whole vectors
  float* x = scratch.logits.data();
  int32_t* keys = scratch.keys.data();
  float* exps = scratch.exps.data();
  for (int64_t t = begin; t < end; ++t) {
    int64_t g = a.group32 ? a.group32[t] : (a.group64 ? a.group64[t] : 0);
    if (g >= a.num_groups) g = -1;  // out of range: no mask, not counted (g < -1 acts as -1 already)
    const scalar_t* row = a.logits + t * a.logits_stride_t;
    const uint8_t* keep_row = a.keep != nullptr && g >= 0 ? a.keep + g * E : nullptr;

    // 1. the row in float32 with masked experts at -inf, its order keys, its max; a NaN or +inf, or no value above
    //    -inf, makes it bad
    vfloat row_max_v = splat(-kInf);
    vint not_nan_or_inf = ~vint{};
    for (int64_t e = 0; e < full; e += kLanes) {
      const vfloat logit = load_logits<scalar_t, contiguous>(row, a.logits_stride_e, e);
      vint kept = ~vint{};
      if (keep_row != nullptr) {
        vu8 kept_bytes;
        std::memcpy(&kept_bytes, keep_row + e, sizeof(kept_bytes));
        kept = __builtin_convertvector(kept_bytes, vint) != 0;
      }
      const vfloat v = kept != 0 ? logit : splat(-kInf);
      vstore(x + e, v);
      vstore(keys + e, order_keys(logit, kept));
      row_max_v = vmax(row_max_v, v);
      not_nan_or_inf &= v < kInf;
    }
    if (full < E) {
      vfloat logit = splat(-kInf);
      vint kept = {};  // lanes past E: padding, kMasked
      for (int64_t e = full; e < E; ++e) {
        kept[e - full] = keep_row == nullptr || keep_row[e] != 0 ? -1 : 0;
        logit[e - full] = static_cast<float>(row[e * (contiguous ? 1 : a.logits_stride_e)]);
      }
      const vfloat v = kept != 0 ? logit : splat(-kInf);
      vstore(x + full, v);
      vstore(keys + full, order_keys(logit, kept));
      row_max_v = vmax(row_max_v, v);
      not_nan_or_inf &= v < kInf;
    }
    const float row_max = hmax(row_max_v);
    bool bad = row_max == -kInf;
    for (int l = 0; l < kLanes; ++l) bad |= not_nan_or_inf[l] == 0;
    if (a.scoring == kSigmoid) sigmoid_keys(a, x, keys, exps, padded);

    // 2. top-k by the order keys (also on bad rows: their ids follow the same rule)
    scalar_t* w_out = a.weights + t * K;
    int64_t* id_out = a.ids + t * K;
    select_topk(scratch, E, K, id_out);
    float w[kMaxTopK];
    if (a.scoring == kSigmoid) {
      // sigmoid of the chosen logits (masked ones are -inf in x: weight 0); renormalised as s / (sum + 1e-20)
      float total = 0.0f;
      for (int64_t j = 0; j < K; ++j) total += (w[j] = sigmoid(x[id_out[j]]));
      if (a.renormalize) {
        const float inv = 1.0f / (total + 1e-20f);
        for (int64_t j = 0; j < K; ++j) w[j] *= inv;
      }
    } else if (a.scoring == kSoftmaxChosen) {
      // softmax over the chosen logits only: NaN when one is NaN, the largest is +inf, or all are -inf
      float peak = -kInf;
      bool chosen_bad = false;
      for (int64_t j = 0; j < K; ++j) {
        const float v = x[id_out[j]];
        chosen_bad |= v != v;
        peak = std::max(peak, v);
      }
      chosen_bad |= peak == -kInf || peak == kInf;
      float total = 0.0f;
      for (int64_t j = 0; j < K; ++j) total += (w[j] = exp_nonpositive(splat(x[id_out[j]] - peak))[0]);
      const float inv = 1.0f / total;
      for (int64_t j = 0; j < K; ++j) w[j] = chosen_bad ? std::numeric_limits<float>::quiet_NaN() : w[j] * inv;
    } else if (bad) {
      // the softmax is NaN everywhere on such a row
      for (int64_t j = 0; j < K; ++j) w[j] = std::numeric_limits<float>::quiet_NaN();
    } else {
      // 3. exp(x - max) and its sum; probabilities are exp * (1 / sum), as in torch.softmax (0 for masked experts)
      constexpr int kVectors = 16 / kLanes;
      vfloat sum_v[kVectors] = {};
      for (int64_t e = 0; e < padded; e += 16) {
        for (int k = 0; k < kVectors; ++k) {
          const vfloat ex = exp_nonpositive(vload(x + e + k * kLanes) - row_max);
          vstore(exps + e + k * kLanes, ex);
          sum_v[k] += ex;
        }
      }
      for (int k = 1; k < kVectors; ++k) sum_v[0] += sum_v[k];
      const float inv_sum = 1.0f / hsum(sum_v[0]);

      // 4. weights of the chosen experts, renormalise
      for (int64_t j = 0; j < K; ++j) w[j] = exps[id_out[j]] * inv_sum;
      if (a.renormalize) {
        float chosen = 0.0f;
        for (int64_t j = 0; j < K; ++j) chosen += w[j];
        for (int64_t j = 0; j < K; ++j) w[j] /= chosen;
      }
    }
    for (int64_t j = 0; j < K; ++j) w_out[j] = static_cast<scalar_t>(w[j] * a.scale);

    // 5. counts
    if (hist != nullptr && g >= 0) {
      int64_t* hist_row = hist + g * E;
      for (int64_t j = 0; j < K; ++j) hist_row[id_out[j]] += 1;
    }
  }
}

template <typename scalar_t>
void route_rows_any_stride(const RouteArgs<scalar_t>& a, int64_t begin, int64_t end, int64_t* hist,
                           Scratch& scratch) {
  if (a.logits_stride_e == 1) {
    route_rows<scalar_t, true>(a, begin, end, hist, scratch);
  } else {
    route_rows<scalar_t, false>(a, begin, end, hist, scratch);
  }
}

template <typename scalar_t>
void route_tokens(const RouteArgs<scalar_t>& a, int64_t num_tokens, int64_t num_groups, int64_t* counts) {
  const int64_t E = a.num_experts;
  const int64_t max_threads = at::get_num_threads();
  if (std::min(max_threads, (num_tokens + kGrainTokens - 1) / kGrainTokens) <= 1) {
    Scratch scratch(E);
    route_rows_any_stride(a, 0, num_tokens, counts, scratch);
    return;
  }
  // One [G, E] histogram per thread, summed afterwards.
  const int64_t hist_size = counts != nullptr ? num_groups * E : 0;
  std::vector<int64_t> hists(hist_size * max_threads, 0);
  at::parallel_for(0, num_tokens, kGrainTokens, [&](int64_t begin, int64_t end) {
    Scratch scratch(E);
    int64_t* hist = counts != nullptr ? hists.data() + at::get_thread_num() * hist_size : nullptr;
    route_rows_any_stride(a, begin, end, hist, scratch);
  });
  for (int64_t i = 0; i < hist_size * max_threads; ++i) counts[i % hist_size] += hists[i];
}

}  // namespace

void route_cpu(at::Tensor& topk_weights, at::Tensor& topk_ids, const std::optional<at::Tensor>& counts,
               const at::Tensor& logits, const std::optional<at::Tensor>& keep,
               const std::optional<at::Tensor>& group, bool renormalize, int64_t scoring,
               const std::optional<at::Tensor>& bias, int64_t n_group, int64_t topk_group, double scale) {
  TORCH_CHECK(logits.device().is_cpu(), "route_cpu: logits must be a CPU tensor");
  TORCH_CHECK(logits.dim() == 2, "route_cpu: logits must be [T, E], got ", logits.sizes());
  const auto dtype = logits.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16,
              "route_cpu: logits must be float32, float16 or bfloat16, got ", dtype);
  const int64_t num_tokens = logits.size(0);
  const int64_t num_experts = logits.size(-1);
  TORCH_CHECK(num_experts >= 1, "route_cpu: logits need at least one expert column");
  TORCH_CHECK(num_experts <= std::numeric_limits<int32_t>::max(), "route_cpu: too many experts: ", num_experts);

  TORCH_CHECK(topk_weights.scalar_type() == dtype, "route_cpu: topk_weights must have the logits' dtype ", dtype,
              ", got ", topk_weights.scalar_type());
  TORCH_CHECK(topk_weights.dim() == 2 && topk_weights.size(0) == num_tokens && topk_weights.is_contiguous() &&
                  topk_weights.device().is_cpu(),
              "route_cpu: topk_weights must be a contiguous CPU tensor [T, K] with T = ", num_tokens, ", got ",
              topk_weights.sizes());
  const int64_t top_k = topk_weights.size(1);
  TORCH_CHECK(top_k >= 1 && top_k <= std::min(num_experts, kMaxTopK), "route_cpu: top_k must be in [1, min(E, ",
              kMaxTopK, ")] = [1, ", std::min(num_experts, kMaxTopK), "], got ", top_k);
  TORCH_CHECK(topk_ids.scalar_type() == at::kLong, "route_cpu: topk_ids must be int64, got ", topk_ids.scalar_type());
  TORCH_CHECK(topk_ids.sizes() == topk_weights.sizes() && topk_ids.is_contiguous() && topk_ids.device().is_cpu(),
              "route_cpu: topk_ids must be a contiguous CPU tensor of shape ", topk_weights.sizes(), ", got ",
              topk_ids.sizes());

  int64_t num_groups = -1;  // unknown until keep or counts gives it
  const uint8_t* keep_ptr = nullptr;
  if (keep.has_value()) {
    TORCH_CHECK(keep->scalar_type() == at::kBool, "route_cpu: keep must be bool, got ", keep->scalar_type());
    TORCH_CHECK(keep->dim() == 2 && keep->size(0) >= 1 && keep->size(1) == num_experts && keep->is_contiguous() &&
                    keep->device().is_cpu(),
                "route_cpu: keep must be a contiguous CPU tensor [G, E] with E = ", num_experts, ", got ",
                keep->sizes());
    num_groups = keep->size(0);
    keep_ptr = reinterpret_cast<const uint8_t*>(keep->data_ptr<bool>());
  }
  int64_t* counts_ptr = nullptr;
  if (counts.has_value()) {
    TORCH_CHECK(counts->scalar_type() == at::kLong, "route_cpu: counts must be int64, got ", counts->scalar_type());
    TORCH_CHECK(counts->dim() == 2 && counts->size(0) >= 1 && counts->size(1) == num_experts &&
                    counts->is_contiguous() && counts->device().is_cpu(),
                "route_cpu: counts must be a contiguous CPU tensor [G, E] with E = ", num_experts, ", got ",
                counts->sizes());
    TORCH_CHECK(num_groups < 0 || counts->size(0) == num_groups, "route_cpu: counts has ", counts->size(0),
                " groups but keep has ", num_groups);
    num_groups = counts->size(0);
    counts_ptr = counts->data_ptr<int64_t>();
  }
  const int32_t* group32 = nullptr;
  const int64_t* group64 = nullptr;
  if (group.has_value()) {
    TORCH_CHECK(group->scalar_type() == at::kInt || group->scalar_type() == at::kLong,
                "route_cpu: group must be int32 or int64, got ", group->scalar_type());
    TORCH_CHECK(group->dim() == 1 && group->size(0) == num_tokens && group->is_contiguous() && group->device().is_cpu(),
                "route_cpu: group must be a contiguous CPU tensor [T] with T = ", num_tokens, ", got ", group->sizes());
    // ids are not range-checked here: route_rows treats an id outside [-1, G) as -1
    if (group->scalar_type() == at::kInt) {
      group32 = group->data_ptr<int32_t>();
    } else {
      group64 = group->data_ptr<int64_t>();
    }
  }
  TORCH_CHECK(scoring == kSoftmax || scoring == kSoftmaxChosen || scoring == kSigmoid,
              "route_cpu: scoring must be 0 (softmax), 1 (softmax over the chosen) or 2 (sigmoid), got ", scoring);
  const float* bias_ptr = nullptr;
  if (bias.has_value()) {
    TORCH_CHECK(scoring == kSigmoid, "route_cpu: a selection bias needs sigmoid scoring");
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->dim() == 1 && bias->size(0) == num_experts &&
                    bias->is_contiguous() && bias->device().is_cpu(),
                "route_cpu: bias must be a contiguous float32 CPU tensor [E] with E = ", num_experts, ", got ",
                bias->sizes());
    bias_ptr = bias->data_ptr<float>();
  }
  TORCH_CHECK(n_group >= 1 && n_group <= 64 && num_experts % n_group == 0 && num_experts / n_group >= 2 - (n_group == 1),
              "route_cpu: n_group must be in [1, 64] and divide E = ", num_experts,
              " into groups of at least 2, got ", n_group);
  TORCH_CHECK(n_group == 1 || scoring == kSigmoid, "route_cpu: group-limited top-k needs sigmoid scoring");
  TORCH_CHECK(topk_group >= 1 && topk_group <= n_group && (n_group == 1 || topk_group * (num_experts / n_group) >= top_k),
              "route_cpu: topk_group must be in [1, n_group] and its groups must hold top_k experts, got ", topk_group);
  if (num_tokens == 0) return;
  if (num_groups < 0) num_groups = 1;

  auto run = [&](auto tag) {
    using scalar_t = decltype(tag);
    const RouteArgs<scalar_t> args{logits.data_ptr<scalar_t>(),
                                   logits.stride(0),
                                   logits.stride(1),
                                   keep_ptr,
                                   group32,
                                   group64,
                                   topk_weights.data_ptr<scalar_t>(),
                                   topk_ids.data_ptr<int64_t>(),
                                   num_experts,
                                   num_groups,
                                   top_k,
                                   renormalize,
                                   scoring,
                                   bias_ptr,
                                   n_group,
                                   topk_group,
                                   static_cast<float>(scale)};
    route_tokens(args, num_tokens, num_groups, counts_ptr);
  };
  switch (dtype) {
    case at::kFloat:
      run(float{});
      break;
    case at::kHalf:
      run(c10::Half{});
      break;
    default:
      run(c10::BFloat16{});
      break;
  }
}
