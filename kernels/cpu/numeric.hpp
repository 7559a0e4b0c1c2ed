// Branch-free scalar building blocks that GCC and Clang vectorise inside loops: dtype
// conversions (float16 / bfloat16 <-> float32) and exp / log in float32.
#pragma once

#include <math.h>
#include <stdint.h>
#include <string.h>

#include <cmath>
#include <limits>

namespace fastis {

struct half_t {
  uint16_t bits;
};
struct bf16_t {
  uint16_t bits;
};

// a * b + c (contracted to an FMA where the target has one; no libm call where it has not)
inline float madd(float a, float b, float c) { return a * b + c; }

inline float as_float(uint32_t u) {
  float f;
  memcpy(&f, &u, 4);
  return f;
}
inline uint32_t as_bits(float f) {
  uint32_t u;
  memcpy(&u, &f, 4);
  return u;
}

// float16 -> float32, exact: exponent and mantissa shifted into place and rebiased by one
// multiplication (2^112), which also normalises float16 subnormals; inf / NaN selected.
inline float to_float(half_t h) {
  const uint32_t sign = static_cast<uint32_t>(h.bits & 0x8000u) << 16;
  const uint32_t em = h.bits & 0x7fffu;
  const float finite = as_float(em << 13) * 0x1.0p112f;
  const float special = as_float((em << 13) | 0x7f800000u);
  return as_float(as_bits(em >= 0x7c00u ? special : finite) | sign);
}
inline float to_float(bf16_t b) { return as_float(static_cast<uint32_t>(b.bits) << 16); }
inline float to_float(float f) { return f; }
inline double to_double(double d) { return d; }

// float32 -> float16, round to nearest even. Adding a power of two aligned with the target
// exponent makes the FPU do the rounding (subnormals included); overflow becomes inf.
inline half_t to_half(float f) {
  const uint32_t w = as_bits(f);
  const uint32_t shl1 = w + w;
  const uint32_t sign = w & 0x80000000u;
  uint32_t bias = shl1 & 0xff000000u;
  bias = bias < 0x71000000u ? 0x71000000u : bias;
  float base = (fabsf(f) * 0x1.0p112f) * 0x1.0p-110f;
  base = as_float((bias >> 1) + 0x07800000u) + base;
  const uint32_t bits = as_bits(base);
  const uint32_t nonsign = ((bits >> 13) & 0x7c00u) + (bits & 0x0fffu);
  return half_t{static_cast<uint16_t>((sign >> 16) | (shl1 > 0xff000000u ? 0x7e00u : nonsign))};
}

// float32 -> bfloat16, round to nearest even; NaN stays a (quiet) NaN.
inline bf16_t to_bf16(float f) {
  const uint32_t u = as_bits(f);
  const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  const uint32_t nan = ((u >> 16) & 0x8000u) | 0x7fc0u;
  return bf16_t{static_cast<uint16_t>(f != f ? nan : rounded)};
}

// Storage type -> compute type and back.
template <class S, class F>
inline F load_as(S v) {
  return static_cast<F>(to_float(v));
}
template <>
inline double load_as<double, double>(double v) {
  return v;
}
template <class S, class F>
inline S store_as(F v);
template <>
inline float store_as<float, float>(float v) {
  return v;
}
template <>
inline double store_as<double, double>(double v) {
  return v;
}
template <>
inline half_t store_as<half_t, float>(float v) {
  return to_half(v);
}
template <>
inline bf16_t store_as<bf16_t, float>(float v) {
  return to_bf16(v);
}

// c ? a : b by bit masks: GCC if-converts (and so vectorises) a loop body with chains of
// these where it gives up on chains of ?: selects.
inline float pick(bool c, float a, float b) {
  const uint32_t m = 0u - static_cast<uint32_t>(c);
  return as_float((as_bits(a) & m) | (as_bits(b) & ~m));
}
inline double pick(bool c, double a, double b) { return c ? a : b; }

// exp in float32 (about 1 ulp): exp(x) = 2^n exp(r), n = round(x / ln 2), r in
// [-ln2/2, ln2/2] by a two-constant (exact first step) reduction, exp(r) by a degree-7
// polynomial (Cephes' minimax coefficients). Results below FLT_MIN flush to 0; -inf gives 0,
// NaN stays NaN.
inline float vexp(float x) {
  // x clamped to [-87, 88] (NaN to -87; it is NaN again at the end), by bit masks
  const uint32_t below = 0u - static_cast<uint32_t>(!(x >= -87.0f));
  const uint32_t above = 0u - static_cast<uint32_t>(x > 88.0f);
  const float xc = as_float((as_bits(x) & ~(below | above)) | (as_bits(-87.0f) & below) |
                            (as_bits(88.0f) & above));
  // round to nearest by the 1.5 * 2^23 shifter (no libm call, vectorises everywhere)
  const float n = (xc * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  float r = madd(n, -0.693359375f, xc);
  r = madd(n, 2.12194440e-4f, r);
  float p = 1.9875691500e-4f;
  p = madd(p, r, 1.3981999507e-3f);
  p = madd(p, r, 8.3334519073e-3f);
  p = madd(p, r, 4.1665795894e-2f);
  p = madd(p, r, 1.6666665459e-1f);
  p = madd(p, r, 5.0000001201e-1f);
  p = madd(p * r, r, r) + 1.0f;
  const float scale = as_float(static_cast<uint32_t>(static_cast<int32_t>(n) + 127) << 23);
  // below -87: 0, above 88: inf, NaN: NaN; blended with bit masks (a chain of selects is
  // not if-converted, and so not vectorised, for targets without mask registers)
  const uint32_t nan = 0u - static_cast<uint32_t>(x != x);
  const uint32_t lo = below & ~nan;  // (x < -87)
  uint32_t b = as_bits(p * scale) & ~lo;
  b = (b & ~above) | (0x7f800000u & above);
  return as_float((b & ~nan) | (as_bits(x) & nan));
}
inline double vexp(double x) { return std::exp(x); }

// log in float32 for x = 0, x >= FLT_MIN, inf or NaN (log(0) = -inf; no subnormals):
// x = 2^e m with m in [sqrt(1/2), sqrt(2)), log(m) by Cephes' degree-9 polynomial in m - 1.
inline float vlog(float x) {
  const uint32_t u = as_bits(x);
  int32_t e = static_cast<int32_t>((u >> 23) & 0xffu) - 126;
  float m = as_float((u & 0x007fffffu) | 0x3f000000u);  // [0.5, 1)
  const bool small = m < 0.707106781186547524f;
  e = small ? e - 1 : e;
  m = small ? m + m - 1.0f : m - 1.0f;
  const float z = m * m;
  float p = 7.0376836292e-2f;
  p = madd(p, m, -1.1514610310e-1f);
  p = madd(p, m, 1.1676998740e-1f);
  p = madd(p, m, -1.2420140846e-1f);
  p = madd(p, m, 1.4249322787e-1f);
  p = madd(p, m, -1.6668057665e-1f);
  p = madd(p, m, 2.0000714765e-1f);
  p = madd(p, m, -2.4999993993e-1f);
  p = madd(p, m, 3.3333331174e-1f);
  const float ef = static_cast<float>(e);
  float y = p * m * z;
  y = madd(ef, -2.12194440e-4f, y);
  y = madd(-0.5f, z, y);
  const float r = madd(ef, 0.693359375f, m + y);
  // 0 -> -inf; inf -> inf + sqrt(inf) = inf; negative or NaN -> x + sqrt(x) = NaN. Blended
  // with bit masks: GCC does not vectorise this loop body with a chain of selects.
  const uint32_t zero = 0u - static_cast<uint32_t>(x == 0.0f);
  const uint32_t special = (0xff800000u & zero) | (as_bits(x + sqrtf(x)) & ~zero);
  const uint32_t ok = 0u - static_cast<uint32_t>((x > 0.0f) & (x < INFINITY));
  return as_float((as_bits(r) & ok) | (special & ~ok));
}
inline double vlog(double x) { return std::log(x); }

// log(1 + x) for x >= 0, accurate for tiny x: log(u) x / (u - 1) with u = 1 + x rounded
// corrects the rounding of u (exact where u == 1: the result is x).
inline float vlog1p(float x) {
  const float u = 1.0f + x;
  const float d = u - 1.0f;
  const float r = vlog(u) * (x / d);  // (computed either way, then blended by a bit mask)
  const uint32_t tiny = 0u - static_cast<uint32_t>(d == 0.0f);
  return as_float((as_bits(x) & tiny) | (as_bits(r) & ~tiny));
}
inline double vlog1p(double x) { return std::log1p(x); }

}  // namespace fastis
