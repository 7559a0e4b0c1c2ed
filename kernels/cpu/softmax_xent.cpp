// Softmax cross-entropy rows on the CPU: loss, gradient-norm score, optional gradient.
//
// Hard targets (class indices): one read of each row from memory. With m the running max
// over the other columns j != y, s = sum_{j != y} exp(z_j - m) and
// q = sum_{j != y} exp(2 (z_j - m)), both rescaled when m grows, d = z_y - m and
// log S = logaddexp(log s, d):
//   1 - p_y = exp(log s - log S) (summed, never a difference),
//   score = exp(log(s^2 + q) / 2 - log S),  loss = log S - d.
// s is in [1, C], so nothing overflows or underflows on the way. A second read of the row
// (while it is still in cache) writes the gradient p - e_y, or, with label smoothing, sums
// the squares of p - t for the score.
// Soft targets: the same online max for log-sum-exp with sum t and <t, z>; the second read
// forms T p - t for the score (and the gradient).
//
// Small C (up to kNarrowC, e.g. the common 10 classes) with hard targets and no smoothing is
// the narrow path: 16 rows at a time, one per vector lane, so that the per-row logarithms
// and exponentials are vectorised too. Every other case runs row by row, in blocks of
// kBlock columns, vectorised along the row.
#include <math.h>

#include <limits>

#include "fastis.h"
#include "numeric.hpp"
#include "parallel.hpp"
#include "validate.hpp"

namespace fastis {
namespace {

constexpr int64_t kBlock = 128;      // columns per block of the row-wise path
constexpr int64_t kNarrowC = 32;     // C up to this takes the narrow path (hard targets)
constexpr int kLanes = 16;           // rows per group of the narrow path, and partial sums

template <class F>
constexpr F inf() {
  return std::numeric_limits<F>::infinity();
}
template <class F>
constexpr F nan() {
  return std::numeric_limits<F>::quiet_NaN();
}

// Read-only / writable strided [B, T, C] views; row r is (r / T, r % T).
template <class S>
struct Rows {
  S* p;
  int64_t T, sb, st, sc;
  S* row(int64_t r) const { return p + (r / T) * sb + (r % T) * st; }
};

struct Options {
  int64_t C, ignore_index;
  double eps;
};

// buf[k] = z[(c0 + k) * sc] in the compute type for k < n, then `pad` up to kBlock: every
// loop over a block then has the fixed trip count kBlock, which vectorises with no scalar
// remainder (a partial block costs at most kBlock - 1 idle lanes per row).
template <class S, class F>
inline void load_block(const S* z, int64_t sc, int64_t c0, int64_t n, F* buf, F pad) {
  if (sc == 1) {
    const S* zc = z + c0;
    for (int64_t k = 0; k < n; ++k) buf[k] = load_as<S, F>(zc[k]);
  } else {
    for (int64_t k = 0; k < n; ++k) buf[k] = load_as<S, F>(z[(c0 + k) * sc]);
  }
  for (int64_t k = n; k < kBlock; ++k) buf[k] = pad;
}

// Online (max, sum exp, sum exp^2) over a row, block by block: the running max m is one
// number, the sums are kept per vector lane (lane l adds columns l, l + kLanes, ... of
// every block), so every loop is a plain vertical vector loop and the lanes are added up
// once, at the row's end (finish).
template <class F, bool Q>
struct Online {
  F m = -inf<F>();
  F s[kLanes] = {}, q[kLanes] = {};

  // buf: one block, padded with -inf. NaN is left to the sums (never taken as a max).
  void update(const F* __restrict buf) {
    F bm[kLanes];
    for (int l = 0; l < kLanes; ++l) bm[l] = buf[l];
    for (int64_t k0 = kLanes; k0 < kBlock; k0 += kLanes)
      for (int l = 0; l < kLanes; ++l) bm[l] = buf[k0 + l] > bm[l] ? buf[k0 + l] : bm[l];
    F mx = -inf<F>();
    for (int l = 0; l < kLanes; ++l) mx = bm[l] > mx ? bm[l] : mx;
    if (mx > m) {
      const F f = m == -inf<F>() ? F(0) : vexp(m - mx);
      for (int l = 0; l < kLanes; ++l) {
        s[l] *= f;
        if constexpr (Q) q[l] *= f * f;
      }
      m = mx;
    }
    const F shift = m == -inf<F>() ? F(0) : m;  // all -inf so far: exp(-inf) = 0
    for (int64_t k0 = 0; k0 < kBlock; k0 += kLanes)
      for (int l = 0; l < kLanes; ++l) {
        const F e = vexp(buf[k0 + l] - shift);
        s[l] += e;
        if constexpr (Q) q[l] += e * e;
      }
  }

  // The row's (m, s, q), relative to its max m (-inf when every value was -inf).
  void finish(F& m_out, F& s_out, F& q_out) const {
    F S = 0, Qs = 0;
    for (int l = 0; l < kLanes; ++l) S += s[l], Qs += q[l];
    m_out = m, s_out = S, q_out = Qs;
  }
};

template <class S, class F>
inline void fill_row(S* g, int64_t sc, int64_t C, F value) {
  const S v = store_as<S, F>(value);
  for (int64_t c = 0; c < C; ++c) g[c * sc] = v;
}

// A hard-target row from its pass over the other classes: m = max_{j != y} z_j (-inf when
// there is none: then m = z_y), s = sum_{j != y} exp(z_j - m) >= 1 (or 0), q likewise of
// the squares, d = z_y - m. With log S = logaddexp(log s, d):
//   loss = log S - d,  1 - p_y = exp(log s - log S),  score = exp(log(s^2 + q) / 2 - log S),
// evaluated so that neither S nor s^2 overflows or underflows, and log1p keeps the loss
// exact as p_y -> 1.
template <class F>
struct HardRow {
  F m, log_S, loss, score, one_minus_py;
};

template <class F>
inline HardRow<F> finish_hard(F m, F s, F q, F zy) {
  m = pick(m == -inf<F>(), zy, m);
  const F d = zy - m, ls = vlog(s);
  const F hi = pick(ls > d, ls, d), lo = pick(ls > d, d, ls);
  const F l1p = vlog1p(vexp(lo - hi));
  const F log_S = hi + l1p;
  return HardRow<F>{m, log_S, (hi - d) + l1p, vexp(F(0.5) * vlog(s * s + q) - log_S),
                    vexp(ls - log_S)};
}

// One row, hard target, any C. Returns (loss, score) through the pointers.
template <class S, class I, class F>
void hard_row(const S* z, int64_t sc, I y_raw, const Options& o, F scale, S* g, int64_t gsc,
              F* loss, F* score) {
  const int64_t C = o.C;
  const int64_t y = static_cast<int64_t>(y_raw);
  if (y == o.ignore_index) {
    *loss = 0, *score = 0;
    if (g) fill_row<S, F>(g, gsc, C, F(0));
    return;
  }
  const F zy = (y >= 0 && y < C) ? load_as<S, F>(z[y * sc]) : nan<F>();
  if (!(zy < inf<F>())) {  // target out of range, NaN or +inf at the target
    *loss = nan<F>(), *score = nan<F>();
    if (g) fill_row<S, F>(g, gsc, C, nan<F>());
    return;
  }
  const F eps = static_cast<F>(o.eps), eps_c = static_cast<F>(o.eps / C);
  const bool smooth = o.eps > 0;
  F buf[kBlock];
  Online<F, true> on;
  F zsum = 0;
  for (int64_t c0 = 0; c0 < C; c0 += kBlock) {
    const int64_t n = C - c0 < kBlock ? C - c0 : kBlock;
    load_block(z, sc, c0, n, buf, -inf<F>());
    if (smooth) {
      F bz = 0;
#pragma omp simd reduction(+ : bz)
      for (int64_t k = 0; k < kBlock; ++k) bz += k < n ? buf[k] : F(0);
      zsum += bz;
    }
    if (y >= c0 && y < c0 + n) buf[y - c0] = -inf<F>();
    on.update(buf);
  }
  F m, s, q;
  on.finish(m, s, q);
  const HardRow<F> h = finish_hard(m, s, q, zy);
  F grad_y = -h.one_minus_py;
  if (smooth) {  // (in this order, a -inf target logit gives +inf, as the reference)
    *loss = h.m + h.log_S - (F(1) - eps) * zy - eps_c * zsum;
    grad_y += eps - eps_c;
  } else {
    *loss = h.loss;
    *score = h.score;
  }
  if (!g && !smooth) return;
  // Second read: p_j = exp(z_j - m - log S); the gradient, and / or the smoothed squares.
  const F shift = h.m + h.log_S;
  F squares = 0;
  for (int64_t c0 = 0; c0 < C; c0 += kBlock) {
    const int64_t n = C - c0 < kBlock ? C - c0 : kBlock;
    load_block(z, sc, c0, n, buf, -inf<F>());
    // int lanes and bit-mask selects: 64-bit indices compared inside the loop keep it
    // from vectorising (measured 5x slower at C = 1000)
    const int nk = static_cast<int>(n);
    const int yk = y >= c0 && y < c0 + n ? static_cast<int>(y - c0) : -1;
#pragma omp simd
    for (int k = 0; k < static_cast<int>(kBlock); ++k) {
      const F e = vexp(buf[k] - shift) - eps_c;
      buf[k] = pick((k == yk) | (k >= nk), F(0), e);
    }
    if (smooth) {
      F bsq = 0;
#pragma omp simd reduction(+ : bsq)
      for (int64_t k = 0; k < kBlock; ++k) bsq += buf[k] * buf[k];
      squares += bsq;
    }
    if (yk >= 0) buf[yk] = grad_y;
    if (g) {
      S* gc = g + c0 * gsc;
      for (int64_t k = 0; k < n; ++k) gc[k * gsc] = store_as<S, F>(buf[k] * scale);
    }
  }
  if (smooth) *score = sqrt(squares + grad_y * grad_y);
}

// One row, soft target t (a distribution over the C classes, in the logits' dtype).
template <class S, class F>
void soft_row(const S* z, int64_t sc, const S* tg, int64_t tsc, const Options& o, F scale,
              S* g, int64_t gsc, F* loss, F* score) {
  const int64_t C = o.C;
  const F eps = static_cast<F>(o.eps), eps_c = static_cast<F>(o.eps / C);
  F buf[kBlock], tb[kBlock];
  Online<F, false> on;
  F tsum = 0, tz = 0, zsum = 0;
  for (int64_t c0 = 0; c0 < C; c0 += kBlock) {
    const int64_t n = C - c0 < kBlock ? C - c0 : kBlock;
    load_block(z, sc, c0, n, buf, -inf<F>());
    load_block(tg, tsc, c0, n, tb, F(0));
    F bt = 0, btz = 0, bz = 0;
#pragma omp simd reduction(+ : bt, btz, bz)
    for (int64_t k = 0; k < kBlock; ++k) {
      const F tzk = tb[k] * buf[k];  // 0 * -inf is NaN, as in torch's (t * z).sum()
      bt += tb[k];
      btz += k < n ? tzk : F(0);
      bz += k < n ? buf[k] : F(0);
    }
    tsum += bt, tz += btz, zsum += bz;
    on.update(buf);
  }
  F m, s, unused;
  on.finish(m, s, unused);
  const F lse = m + vlog(s);
  // (without smoothing the sum of z is left out: it may be -inf, and 0 * -inf is NaN)
  const bool smooth = o.eps > 0;
  const F total = smooth ? (F(1) - eps) * tsum + eps : tsum;
  *loss = total * lse - (smooth ? (F(1) - eps) * tz + eps_c * zsum : tz);
  F squares = 0;
  for (int64_t c0 = 0; c0 < C; c0 += kBlock) {
    const int64_t n = C - c0 < kBlock ? C - c0 : kBlock;
    load_block(z, sc, c0, n, buf, -inf<F>());
    load_block(tg, tsc, c0, n, tb, F(0));
    const int nk = static_cast<int>(n);
    F bsq = 0;
#pragma omp simd reduction(+ : bsq)
    for (int k = 0; k < static_cast<int>(kBlock); ++k) {
      const F dk = vexp(buf[k] - lse) * total - ((F(1) - eps) * tb[k] + eps_c);
      const F d = pick(k < nk, dk, F(0));
      buf[k] = d;
      bsq += d * d;
    }
    squares += bsq;
    if (g) {
      S* gc = g + c0 * gsc;
      for (int64_t k = 0; k < n; ++k) gc[k * gsc] = store_as<S, F>(buf[k] * scale);
    }
  }
  *score = sqrt(squares);
}

// kLanes rows [r0, r0 + n) at once, hard targets, no smoothing, C <= kNarrowC: lane l is
// row r0 + l, and every loop runs over the lanes (vectorised), the per-row math included.
template <class S, class I>
void narrow_rows(const Rows<const S>& z, const Rows<const I>& tgt, const Options& o,
                 const float* gs, int64_t gss, const Rows<S>* g, int64_t r0, int n, float* loss,
                 float* score) {
  const int64_t C = o.C;
  float zb[kNarrowC][kLanes];
  int32_t yy[kLanes];
  float zy[kLanes], scale[kLanes];
  int32_t ignored[kLanes], bad[kLanes];  // 0 / 1 (int lanes vectorise, bools do not)
  for (int l = 0; l < kLanes; ++l) {
    const bool live = l < n;
    const int64_t y = live ? static_cast<int64_t>(*tgt.row(r0 + l)) : 0;
    ignored[l] = live && y == o.ignore_index;
    const bool in_range = y >= 0 && y < C;
    yy[l] = in_range ? static_cast<int32_t>(y) : 0;
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
    }
  }
  float shift[kLanes], omp[kLanes];
#pragma omp simd
  for (int l = 0; l < kLanes; ++l) {
    const HardRow<float> h = finish_hard(m[l], s[l], q[l], zy[l]);
    shift[l] = h.m + h.log_S;
    omp[l] = h.one_minus_py;
    const float fill = pick(ignored[l] != 0, 0.0f, nan<float>());
    const bool special = (ignored[l] | bad[l]) != 0;
    s[l] = pick(special, fill, h.loss);
    q[l] = pick(special, fill, h.score);
  }
  for (int l = 0; l < n; ++l) loss[l] = s[l], score[l] = q[l];
  if (!g) return;
  for (int64_t c = 0; c < C; ++c) {
#pragma omp simd
    for (int l = 0; l < kLanes; ++l) {
      const float p = pick(c == yy[l], -omp[l], vexp(zb[c][l] - shift[l]));
      const float v = pick(bad[l] != 0, nan<float>(), p * scale[l]);
      zb[c][l] = pick(ignored[l] != 0, 0.0f, v);
    }
  }
  for (int l = 0; l < n; ++l) {
    S* row = g->row(r0 + l);
    for (int64_t c = 0; c < C; ++c) row[c * g->sc] = store_as<S, float>(zb[c][l]);
  }
}

template <class S, class I, class F>
FASTIS_HOT void hard_range(const fastis_xent_args* a, int64_t r0, int64_t r1) {
  const Rows<const S> z{static_cast<const S*>(a->logits), a->T, a->logits_stride[0],
                        a->logits_stride[1], a->logits_stride[2]};
  const Rows<const I> tgt{static_cast<const I*>(a->target), a->T, a->target_stride[0],
                          a->target_stride[1], 0};
  const Rows<S> g{static_cast<S*>(a->grad), a->T, a->grad_stride[0], a->grad_stride[1],
                  a->grad_stride[2]};
  const Options o{a->C, a->ignore_index, a->label_smoothing};
  const F* gs = static_cast<const F*>(a->grad_scale);
  F* loss = static_cast<F*>(a->loss);
  F* score = static_cast<F*>(a->score);
  if constexpr (sizeof(F) == 4) {
    if (o.C <= kNarrowC && o.eps == 0) {
      for (int64_t r = r0; r < r1; r += kLanes) {
        const int n = r1 - r < kLanes ? static_cast<int>(r1 - r) : kLanes;
        narrow_rows<S, I>(z, tgt, o, gs, a->grad_scale_stride, a->grad ? &g : nullptr, r, n,
                          loss + r, score + r);
      }
      return;
    }
  }
  for (int64_t r = r0; r < r1; ++r) {
    const F scale = gs ? gs[r * a->grad_scale_stride] : F(1);
    hard_row<S, I, F>(z.row(r), z.sc, *tgt.row(r), o, scale, a->grad ? g.row(r) : nullptr,
                      g.sc, loss + r, score + r);
  }
}

template <class S, class F>
FASTIS_HOT void soft_range(const fastis_xent_args* a, int64_t r0, int64_t r1) {
  const Rows<const S> z{static_cast<const S*>(a->logits), a->T, a->logits_stride[0],
                        a->logits_stride[1], a->logits_stride[2]};
  const Rows<const S> tgt{static_cast<const S*>(a->target), a->T, a->target_stride[0],
                          a->target_stride[1], a->target_stride[2]};
  const Rows<S> g{static_cast<S*>(a->grad), a->T, a->grad_stride[0], a->grad_stride[1],
                  a->grad_stride[2]};
  const Options o{a->C, a->ignore_index, a->label_smoothing};
  const F* gs = static_cast<const F*>(a->grad_scale);
  for (int64_t r = r0; r < r1; ++r) {
    const F scale = gs ? gs[r * a->grad_scale_stride] : F(1);
    soft_row<S, F>(z.row(r), z.sc, tgt.row(r), tgt.sc, o, scale, a->grad ? g.row(r) : nullptr,
                   g.sc, static_cast<F*>(a->loss) + r, static_cast<F*>(a->score) + r);
  }
}

template <class S, class F>
void run_dtype(const fastis_xent_args* a, int64_t rows, int32_t num_threads) {
  const int64_t work = a->C * (a->grad ? 2 : 1);
  if (a->target_dtype == FASTIS_INT64) {
    parallel_for(rows, work, num_threads,
                 [a](int64_t r0, int64_t r1) { hard_range<S, int64_t, F>(a, r0, r1); });
  } else if (a->target_dtype == FASTIS_INT32) {
    parallel_for(rows, work, num_threads,
                 [a](int64_t r0, int64_t r1) { hard_range<S, int32_t, F>(a, r0, r1); });
  } else {
    parallel_for(rows, 2 * work, num_threads,
                 [a](int64_t r0, int64_t r1) { soft_range<S, F>(a, r0, r1); });
  }
}

}  // namespace
}  // namespace fastis

extern "C" fastis_status fastis_softmax_xent_cpu(const fastis_xent_args* args,
                                                 int32_t num_threads) {
  using namespace fastis;
  const fastis_status st = validate_xent(args);
  if (st != FASTIS_OK) return st;
  const int64_t rows = args->B * args->T;
  if (rows == 0) return FASTIS_OK;
  switch (args->logits_dtype) {
    case FASTIS_FLOAT32: run_dtype<float, float>(args, rows, num_threads); break;
    case FASTIS_FLOAT64: run_dtype<double, double>(args, rows, num_threads); break;
    case FASTIS_FLOAT16: run_dtype<half_t, float>(args, rows, num_threads); break;
    case FASTIS_BFLOAT16: run_dtype<bf16_t, float>(args, rows, num_threads); break;
    default: return FASTIS_ERR_UNSUPPORTED_DTYPE;
  }
  return FASTIS_OK;
}
