// The vectorised hard-target paths of the CPU softmax cross-entropy (no label smoothing):
// the narrow path (C <= kNarrowC, one row per vector lane) and contiguous float32 rows
// (explicit vectors along the row). Both are inlined into softmax_xent.cpp's target clones.
#pragma once

#include <stdint.h>

#include "numeric.hpp"
#include "vec.hpp"
#include "xent_rows.hpp"

namespace fastis {

// The narrow path written as loops over kLanes scalar lanes, for the auto-vectoriser: where
// AVX-512 masks make every select one instruction it beats the vector-extension version
// (measured: 22 against 35 us at 1024 x 10); without them (AVX2) it does not vectorise the
// selects, and narrow_rows runs instead (a third of the instructions). Returns the number
// of its class indices outside [0, C) that are not ignore_index.
template <class S, class I>
int64_t narrow_rows_auto(const Rows<const S>& z, const Rows<const I>& tgt, const Options& o,
                 const float* gs, int64_t gss, const Rows<S>* g, int64_t r0, int n, float* loss,
                 float* score) {
  const int64_t C = o.C;
  float zb[kNarrowC][kLanes];
  int32_t yy[kLanes];
  float zy[kLanes], scale[kLanes];
  int32_t ignored[kLanes], bad[kLanes];  // 0 / 1 (int lanes vectorise, bools do not)
  int64_t out_of_range = 0;
  for (int l = 0; l < kLanes; ++l) {
    const bool live = l < n;
    const int64_t y = live ? static_cast<int64_t>(*tgt.row(r0 + l)) : 0;
    ignored[l] = live && y == o.ignore_index;
    const bool in_range = y >= 0 && y < C;
    yy[l] = in_range ? static_cast<int32_t>(y) : 0;
    out_of_range += live && !in_range && !ignored[l];
    const S* row = live ? z.row(r0 + l) : nullptr;
    for (int64_t c = 0; c < C; ++c) zb[c][l] = row ? load_as<S, float>(row[c * z.sc]) : 0.0f;
    zy[l] = zb[yy[l]][l];
    bad[l] = !in_range || !(zy[l] < inf<float>());
    scale[l] = live && gs ? gs[(r0 + l) * gss] : 1.0f;
  }
  float m[kLanes], s[kLanes], q[kLanes];
#pragma omp simd
  for (int l = 0; l < kLanes; ++l) m[l] = -inf<float>(), s[l] = 0.0f, q[l] = 0.0f;
  for (int64_t c = 0; c < C; ++c) {
#pragma omp simd
    for (int l = 0; l < kLanes; ++l) {
      const float x = zb[c][l];
      m[l] = pick((c != yy[l]) & (x > m[l]), x, m[l]);
    }
  }
#pragma omp simd
  for (int l = 0; l < kLanes; ++l) m[l] = pick(m[l] == -inf<float>(), zy[l], m[l]);
  for (int64_t c = 0; c < C; ++c) {
#pragma omp simd
    for (int l = 0; l < kLanes; ++l) {
      const float e = pick(c == yy[l], 0.0f, vexp(zb[c][l] - m[l]));
      s[l] += e;
      q[l] += e * e;
      zb[c][l] = e;  // kept for the gradient: p = e exp(-log S), no second exp
    }
  }
  float inv_S[kLanes], omp[kLanes];
#pragma omp simd
  for (int l = 0; l < kLanes; ++l) {
    const HardRow<float> h = finish_hard(m[l], s[l], q[l], zy[l]);
    inv_S[l] = vexp(-h.log_S);
    omp[l] = h.one_minus_py;
    const float fill = pick(ignored[l] != 0, 0.0f, nan<float>());
    const bool special = (ignored[l] | bad[l]) != 0;
    s[l] = pick(special, fill, h.loss);
    q[l] = pick(special, fill, h.score);
  }
  for (int l = 0; l < n; ++l) loss[l] = s[l], score[l] = q[l];
  if (!g) return out_of_range;
  for (int64_t c = 0; c < C; ++c) {
#pragma omp simd
    for (int l = 0; l < kLanes; ++l) {
      const float p = pick(c == yy[l], -omp[l], zb[c][l] * inv_S[l]);
      const float v = pick(bad[l] != 0, nan<float>(), p * scale[l]);
      zb[c][l] = pick(ignored[l] != 0, 0.0f, v);
    }
  }
  for (int l = 0; l < n; ++l) {
    S* row = g->row(r0 + l);
    for (int64_t c = 0; c < C; ++c) row[c * g->sc] = store_as<S, float>(zb[c][l]);
  }
  return out_of_range;
}

// finish_hard on kL rows at once (lane l: one row), the same formulas.
template <class V>
struct HardRows {
  V m, log_S, loss, score, one_minus_py;
};
template <class V>
inline HardRows<V> finish_hard_v(V m, V s, V q, V zy) {
  m = sel<V>(m == -inf<float>(), zy, m);
  const V d = zy - m, ls = vlog(s);
  const MaskOf<V> gt = ls > d;
  const V hi = sel<V>(gt, ls, d), lo = sel<V>(gt, d, ls);
  const V l1p = vlog1p(vexp(lo - hi));
  const V log_S = hi + l1p;
  return HardRows<V>{m, log_S, (hi - d) + l1p, vexp(0.5f * vlog(s * s + q) - log_S),
                  vexp(ls - log_S)};
}

// kL rows [r0, r0 + n) at once, hard targets, no smoothing, C <= kNarrowC: lane l is
// row r0 + l, and all the math runs on 16-lane vectors, the per-row logarithms and
// exponentials included. Returns the number of its class indices outside [0, C) that are
// not ignore_index.
template <class V, class S, class I>
int64_t narrow_rows(const Rows<const S>& z, const Rows<const I>& tgt, const Options& o,
                    const float* gs, int64_t gss, const Rows<S>* g, int64_t r0, int n,
                    float* loss, float* score) {
  constexpr int kL = Lanes<V>::n;
  const int64_t C = o.C;
  alignas(64) float zt[kNarrowC][kL];  // transposed: zt[c][l] = row l, column c
  alignas(64) int32_t yy[kL], ignored[kL], bad[kL];
  alignas(64) float zy[kL], scale[kL];
  int64_t out_of_range = 0;
  for (int l = 0; l < kL; ++l) {
    const bool live = l < n;
    const int64_t y = live ? static_cast<int64_t>(*tgt.row(r0 + l)) : 0;
    const bool in_range = y >= 0 && y < C;
    ignored[l] = live && y == o.ignore_index ? -1 : 0;
    out_of_range += live && !in_range && !ignored[l];
    yy[l] = in_range ? static_cast<int32_t>(y) : 0;
    if (live) {
      const S* row = z.row(r0 + l);
      for (int64_t c = 0; c < C; ++c) zt[c][l] = load_as<S, float>(row[c * z.sc]);
    } else {
      for (int64_t c = 0; c < C; ++c) zt[c][l] = 0.0f;
    }
    zy[l] = zt[yy[l]][l];
    bad[l] = !in_range || !(zy[l] < inf<float>()) ? -1 : 0;
    scale[l] = live && gs ? gs[(r0 + l) * gss] : 1.0f;
  }
  const MaskOf<V> yv = iload<V>(yy), ign = iload<V>(ignored), badv = iload<V>(bad);
  const V zyv = vload<V>(zy);
  V m = splat<V>(-inf<float>());
  for (int64_t c = 0; c < C; ++c) {
    const V x = vload<V>(zt[c]);
    m = sel<V>((yv != static_cast<int32_t>(c)) & (x > m), x, m);
  }
  const V shift = sel<V>(m == -inf<float>(), V{}, m);  // all -inf: exp(-inf) = 0
  V s{}, q{};
  for (int64_t c = 0; c < C; ++c) {
    const V e = sel<V>(yv == static_cast<int32_t>(c), V{}, vexp(vload<V>(zt[c]) - shift));
    s += e;
    q += e * e;
    vstore(zt[c], e);  // kept for the gradient: p = e exp(-log S), no second exp
  }
  const HardRows<V> h = finish_hard_v(m, s, q, zyv);
  const MaskOf<V> special = ign | badv;
  const V fill = sel<V>(ign, V{}, splat<V>(nan<float>()));
  alignas(64) float lv[kL], sv[kL];
  vstore(lv, sel<V>(special, fill, h.loss));
  vstore(sv, sel<V>(special, fill, h.score));
  for (int l = 0; l < n; ++l) loss[l] = lv[l], score[l] = sv[l];
  if (!g) return out_of_range;
  // (where m = -inf every e is 0; h.log_S is then 0, or NaN with the target at -inf too)
  const V inv_S = vexp(-h.log_S), sc = vload<V>(scale), gy = -h.one_minus_py;
  for (int64_t c = 0; c < C; ++c) {
    const V p = sel<V>(yv == static_cast<int32_t>(c), gy, vload<V>(zt[c]) * inv_S);
    const V v = sel<V>(badv, splat<V>(nan<float>()), p * sc);
    vstore(zt[c], sel<V>(ign, V{}, v));
  }
  for (int l = 0; l < n; ++l) {
    S* row = g->row(r0 + l);
    for (int64_t c = 0; c < C; ++c) row[c * g->sc] = store_as<S, float>(zt[c][l]);
  }
  return out_of_range;
}

// kL columns [j, j + kL) of a contiguous float32 row, the target column y and the columns
// past C replaced by pad (a load straight from the row for all but at most two chunks).
template <class V>
inline V chunk(const float* z, int64_t j, int64_t C, int64_t y, float pad) {
  constexpr int kL = Lanes<V>::n;
  if (j + kL <= C && (y < j || y >= j + kL)) return vload<V>(z + j);
  alignas(64) float t[kL];
  for (int l = 0; l < kL; ++l) t[l] = j + l < C && j + l != y ? z[j + l] : pad;
  return vload<V>(t);
}

// One contiguous float32 row, class index y, no smoothing, the wide case (C > kNarrowC),
// gradient (contiguous too) or not; the contract of hard_row. Two reads of the row for
// (loss, score): its max over j != y, then s and q; with the gradient a third pass over
// the gradient row alone: e_j = exp(z_j - m) is stored there by the second pass and
// scaled by exp(-log S) in place (one exp per element, not two).
template <class V>
inline void hard_row_f32(const float* z, int64_t y, const Options& o, float scale, float* g,
                         float* loss, float* score) {
  constexpr int kL = Lanes<V>::n;
  const int64_t C = o.C;
  if (y == o.ignore_index) {
    *loss = 0, *score = 0;
    if (g) fill_row<float, float>(g, 1, C, 0.0f);
    return;
  }
  const float zy = (y >= 0 && y < C) ? z[y] : nan<float>();
  if (!(zy < inf<float>())) {  // target out of range, NaN or +inf at the target
    *loss = nan<float>(), *score = nan<float>();
    if (g) fill_row<float, float>(g, 1, C, nan<float>());
    return;
  }
  V mv = splat<V>(-inf<float>());
  for (int64_t j = 0; j < C; j += kL) mv = vmax<V>(mv, chunk<V>(z, j, C, y, -inf<float>()));
  const float m = hmax(mv);
  const V shift = splat<V>(m == -inf<float>() ? 0.0f : m);  // all -inf: exp(-inf) = 0
  V s{}, q{};
  for (int64_t j = 0; j < C; j += kL) {
    const V e = vexp(chunk<V>(z, j, C, y, -inf<float>()) - shift);
    s += e;
    q += e * e;
    if (g) {  // (in place, g == z: this chunk of z is read already; g[y] is set below)
      if (j + kL <= C) {
        vstore(g + j, e);
      } else {
        for (int64_t k = j; k < C; ++k) g[k] = e[k - j];
      }
    }
  }
  const HardRow<float> h = finish_hard(m, hsum(s), hsum(q), zy);
  *loss = h.loss;
  *score = h.score;
  if (!g) return;
  // p_j = e_j exp(-log S); e_j is 0 at every column when m = -inf (then h.log_S is 0)
  const float f = vexp(-h.log_S) * scale;
#pragma omp simd
  for (int64_t j = 0; j < C; ++j) g[j] *= f;
  g[y] = -h.one_minus_py * scale;
}

}  // namespace fastis
