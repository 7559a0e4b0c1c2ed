// float32 vectors of 8 and 16 lanes (GCC / Clang vector extensions) and their exp / log:
// the lanes of the narrow path (rows) and of the wide path (columns), with no reliance on
// the auto-vectoriser. A vector no wider than the target's registers compiles to plain
// vector code (V8: one AVX2 register, two SSE; V16: one AVX-512 register); a wider one is
// still correct, but GCC lowers its comparisons and selects lane by lane in scalar code
// (AVX2: 86 instructions for one 16-lane select), so the kernels pick the width by the CPU
// (wide_vectors()). Each sum runs over the lanes in a fixed order: the result depends on
// the width only, never on the number of threads.
#pragma once

#include <stdint.h>
#include <string.h>

#include <limits>

// (vectors passed by value between inlined helpers: no ABI crosses a library boundary)
#pragma GCC diagnostic ignored "-Wpsabi"

namespace fastis {

typedef float V8 __attribute__((vector_size(32)));
typedef int32_t I8 __attribute__((vector_size(32)));  // lane masks: -1 (true) / 0
typedef uint32_t U8 __attribute__((vector_size(32)));
typedef float V16 __attribute__((vector_size(64)));
typedef int32_t I16 __attribute__((vector_size(64)));
typedef uint32_t U16 __attribute__((vector_size(64)));

template <class V>
struct Lanes;
template <>
struct Lanes<V8> {
  using I = I8;
  using U = U8;
  static constexpr int n = 8;
};
template <>
struct Lanes<V16> {
  using I = I16;
  using U = U16;
  static constexpr int n = 16;
};
template <class V>
using MaskOf = typename Lanes<V>::I;

// True where 16-lane vectors are native (AVX-512: the x86-64-v4 clones run there).
inline bool wide_vectors() {
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__CUDACC__)
  static const bool wide = __builtin_cpu_supports("avx512f") &&
                           __builtin_cpu_supports("avx512bw") &&
                           __builtin_cpu_supports("avx512vl") &&
                           __builtin_cpu_supports("avx512dq");
  return wide;
#else
  return false;
#endif
}

template <class V>
inline V splat(float x) {
  return V{} + x;
}
template <class V>
inline V vload(const float* p) {
  V v;
  memcpy(&v, p, sizeof v);
  return v;
}
template <class V>
inline void vstore(float* p, V v) {
  memcpy(p, &v, sizeof v);
}
template <class V>
inline MaskOf<V> iload(const int32_t* p) {
  MaskOf<V> v;
  memcpy(&v, p, sizeof v);
  return v;
}
template <class V>
inline V sel(MaskOf<V> m, V a, V b) {
  return m ? a : b;
}
template <class V>
inline V vmax(V a, V b) {  // a NaN in b is never taken
  return sel<V>(b > a, b, a);
}
template <class V>
inline float hsum(V v) {  // lane 0 first, then 1, ...
  float s = 0;
  for (int l = 0; l < Lanes<V>::n; ++l) s += v[l];
  return s;
}
template <class V>
inline float hmax(V v) {
  float m = v[0];
  for (int l = 1; l < Lanes<V>::n; ++l) m = v[l] > m ? v[l] : m;
  return m;
}

// exp, the scalar vexp's reduction and polynomial (about 1 ulp): exp(x) = 2^n exp(r),
// n = round(x / ln 2) by the 1.5 * 2^23 shifter, whose low mantissa bits, offset by the
// exponent bias, are then 2^n's exponent field (no float -> int conversion, so NaN lanes
// need no care: they stay NaN through the arithmetic). Below -87 (under FLT_MIN): 0, -inf
// included; above 88: inf.
template <class V>
inline V vexp_v(V x) {
  using U = typename Lanes<V>::U;
  const V lo = splat<V>(-87.0f), hi = splat<V>(88.0f);
  V xc = sel<V>(x < lo, lo, x);  // NaN compares false: stays NaN
  xc = sel<V>(xc > hi, hi, xc);
  const V shifter = splat<V>(12582912.0f + 127.0f);
  const V t = xc * 1.44269504088896341f + shifter;
  const V n = t - shifter;
  V r = n * -0.693359375f + xc;
  r = n * 2.12194440e-4f + r;
  V p = splat<V>(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = (p * r) * r + r + 1.0f;
  const V scale = (V)((U)t << 23);
  V y = p * scale;
  y = sel<V>(x < lo, V{}, y);
  return sel<V>(x > hi, splat<V>(std::numeric_limits<float>::infinity()), y);
}

// log for x = 0, x >= FLT_MIN, inf or NaN (the scalar vlog's polynomial): log(0) = -inf,
// log(inf) = inf, negative or NaN: NaN.
template <class V>
inline V vlog_v(V x) {
  using I = MaskOf<V>;
  using U = typename Lanes<V>::U;
  const U u = (U)x;
  I e = (I)((u >> 23) & 0xffu) - 126;
  V m = (V)((u & 0x007fffffu) | 0x3f000000u);  // [0.5, 1)
  const I small = m < 0.707106781186547524f;
  e = small ? e - 1 : e;
  m = sel<V>(small, m + m - 1.0f, m - 1.0f);
  const V z = m * m;
  V p = splat<V>(7.0376836292e-2f);
  p = p * m + -1.1514610310e-1f;
  p = p * m + 1.1676998740e-1f;
  p = p * m + -1.2420140846e-1f;
  p = p * m + 1.4249322787e-1f;
  p = p * m + -1.6668057665e-1f;
  p = p * m + 2.0000714765e-1f;
  p = p * m + -2.4999993993e-1f;
  p = p * m + 3.3333331174e-1f;
  const V ef = __builtin_convertvector(e, V);
  V y = p * m * z;
  y = ef * -2.12194440e-4f + y;
  y = z * -0.5f + y;
  const V r = ef * 0.693359375f + (m + y);
  const float inf = std::numeric_limits<float>::infinity();
  const V nan = splat<V>(std::numeric_limits<float>::quiet_NaN());
  const V special = sel<V>(x == 0.0f, splat<V>(-inf), sel<V>(x == inf, x, nan));
  return sel<V>((x > 0.0f) & (x < inf), r, special);
}

// log(1 + x) for x >= 0, accurate for tiny x (the scalar vlog1p's correction).
template <class V>
inline V vlog1p_v(V x) {
  const V u = 1.0f + x;
  const V d = u - 1.0f;
  const V r = vlog_v(u) * (x / d);
  return sel<V>(d == 0.0f, x, r);
}

inline V8 vexp(V8 x) { return vexp_v(x); }
inline V16 vexp(V16 x) { return vexp_v(x); }
inline V8 vlog(V8 x) { return vlog_v(x); }
inline V16 vlog(V16 x) { return vlog_v(x); }
inline V8 vlog1p(V8 x) { return vlog1p_v(x); }
inline V16 vlog1p(V16 x) { return vlog1p_v(x); }

}  // namespace fastis
