// 16-lane f32 vectors for the CPU kernels' row loops (activations, attention, norms, cross
// entropy), written with GCC/Clang vector extensions so the vectorisation does not depend on what
// the auto-vectoriser manages to prove; the compiler splits the lanes for narrower ISAs. Row
// functions built on these are compiled per ISA with MOE_SIMD_CLONES (x86-64-v4 / v3 / baseline,
// the best picked at load time), so one binary runs AVX-512 code where the CPU has it.
//
// Storage: f32 lanes load and store as they are; bf16 lanes load by a shift into the high half of
// an f32 and store rounded to nearest-even with NaN kept NaN (quiet), as float_to_bf16 does, so a
// vector store is bit-identical to the scalar from_acc<bf16> of the same f32.
#pragma once

#include <cstdint>
#include <cstring>

#include "kernels/cpu/dispatch.h"  // to_acc / from_acc

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define MOE_SIMD_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define MOE_SIMD_CLONES
#endif
#define MOE_SIMD_INLINE inline __attribute__((always_inline))
// The helpers pass vectors by value but are always inlined, so no call ABI is involved.
#pragma GCC diagnostic ignored "-Wpsabi"

namespace moe::cpu::simd {

constexpr int64_t kLanes = 16;
typedef float vf __attribute__((vector_size(kLanes * 4)));
typedef int32_t vi __attribute__((vector_size(kLanes * 4)));
typedef uint32_t vu __attribute__((vector_size(kLanes * 4)));
typedef uint16_t vh __attribute__((vector_size(kLanes * 2)));

MOE_SIMD_INLINE vf splat(float v) { return vf{} + v; }
MOE_SIMD_INLINE vf load(const float* p) {
  vf v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
MOE_SIMD_INLINE void store(float* p, vf v) { std::memcpy(p, &v, sizeof v); }
// bf16: the 16 bits are the high half of the f32.
MOE_SIMD_INLINE vf load(const bf16* p) {
  vh h;
  std::memcpy(&h, p, sizeof h);
  return (vf)(__builtin_convertvector(h, vu) << 16);
}
// Round to nearest even, NaN kept NaN (quiet): float_to_bf16 on every lane.
MOE_SIMD_INLINE void store(bf16* p, vf v) {
  const vu u = (vu)v;
  const vu rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  const vu nan = (u >> 16) | 0x40u;
  const vu r = (u & 0x7fffffffu) > 0x7f800000u ? nan : rounded;
  const vh h = __builtin_convertvector(r, vh);
  std::memcpy(static_cast<void*>(p), &h, sizeof h);
}
// The first n lanes from p, `fill` after (n < kLanes).
template <class T>
MOE_SIMD_INLINE vf load_part(const T* p, int64_t n, float fill) {
  float t[kLanes];
  for (int64_t i = 0; i < kLanes; ++i) t[i] = i < n ? to_acc(p[i]) : fill;
  return load(t);
}
template <class T>
MOE_SIMD_INLINE void store_part(T* p, vf v, int64_t n) {
  float t[kLanes];
  store(t, v);
  for (int64_t i = 0; i < n; ++i) p[i] = from_acc<T>(t[i]);
}

// Σ of the lanes in a fixed order (pairwise), so a row's sum never depends on the thread count.
MOE_SIMD_INLINE float hsum(vf v) {
  float s8[8];
  for (int i = 0; i < 8; ++i) s8[i] = v[i] + v[i + 8];
  return ((s8[0] + s8[4]) + (s8[1] + s8[5])) + ((s8[2] + s8[6]) + (s8[3] + s8[7]));
}
// max of the lanes (a NaN lane is skipped, as std::max(m, NaN) keeps m).
MOE_SIMD_INLINE float hmax(vf v) {
  float r = v[0];
  for (int64_t i = 1; i < kLanes; ++i) r = v[i] > r ? v[i] : r;
  return r;
}

// exp(x) per lane without a libm call: x = n·ln2 + r, |r| ≤ ln2/2, exp(r) by Cephes' degree-6
// polynomial (within 2 ulp of expf over the clamped range), times 2^n built in the exponent bits.
// x is clamped to [−87.3, 88.3] (2^n stays a normal float; exp saturates at 2.2e38 / 1.2e−38
// there); NaN passes through.
MOE_SIMD_INLINE vf exp_f32(vf x) {
  x = x > 88.3f ? splat(88.3f) : x;
  x = x < -87.3f ? splat(-87.3f) : x;
  const float kShift = 12582912.0f;  // 1.5·2^23: adding it rounds to an integer in the low bits
  const vf t = x * 1.44269504088896341f + kShift;
  const vf n = t - kShift;
  const vf scale = (vf)(((vi)t - (0x4B400000 - 127)) << 23);  // 2^n
  const vf r = (x - n * 0.693359375f) - n * -2.12194440e-4f;  // ln2 split in a hi and a lo part
  vf p = splat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  return p * scale;
}
// The same, but exactly 0 below −87.3 (e^x < 1.2e−38 there, nothing next to a softmax row's
// maximum e^0 = 1), so a masked score of −inf gives 0: for softmax numerators.
MOE_SIMD_INLINE vf exp_f32_flush(vf x) { return x < -87.3f ? splat(0.0f) : exp_f32(x); }
MOE_SIMD_INLINE vf sigmoid_f32(vf x) { return 1.0f / (1.0f + exp_f32(-x)); }

}  // namespace moe::cpu::simd
