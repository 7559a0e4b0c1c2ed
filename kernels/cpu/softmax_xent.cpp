// Softmax cross-entropy rows on the CPU: loss, gradient-norm score, optional gradient.
//
// Hard targets (class indices): with m the max over the other columns j != y,
// s = sum_{j != y} exp(z_j - m) and q = sum_{j != y} exp(2 (z_j - m)), d = z_y - m and
// log S = logaddexp(log s, d):
//   1 - p_y = exp(log s - log S) (summed, never a difference),
//   score = exp(log(s^2 + q) / 2 - log S),  loss = log S - d.
// s is in [1, C], so nothing overflows or underflows on the way. The gradient is p - e_y;
// with label smoothing a second read of the row sums the squares of p - t for the score.
// Soft targets: the same online max for log-sum-exp with sum t and <t, z>; the second read
// forms T p - t for the score (and the gradient).
//
// Paths:
// - narrow (C up to kNarrowC, e.g. the common 10 classes; hard targets, no smoothing): one
//   row per vector lane, so that the per-row logarithms and exponentials are vectorised too;
// - float32 rows, contiguous, hard targets, no smoothing (hard_row_f32): explicit vectors
//   along the row, one pass for the max, one for s and q that also stores exp(z_j - m) in
//   the gradient row, and a last pass over that row alone that scales it by exp(-log S):
//   one exponential per element with the gradient, not two;
// - every other case row by row, in blocks of kBlock columns (online max), vectorised
//   along the row by the compiler, with a second read for the gradient.
#include <math.h>

#include <atomic>
#include <limits>
#include <type_traits>

#include "fastis.h"
#include "numeric.hpp"
#include "parallel.hpp"
#include "validate.hpp"
#include "vec.hpp"
#include "xent_fast.hpp"
#include "xent_rows.hpp"

namespace fastis {
namespace {


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

// Rows [r0, r1) with class indices; returns how many are outside [0, C) and not ignored.
template <class S, class I, class F>
FASTIS_HOT int64_t hard_range(const fastis_xent_args* a, int64_t r0, int64_t r1) {
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
  int64_t out_of_range = 0;
  // 16-lane vectors where they are native (AVX-512), else 8 (wider ones would be lowered
  // lane by lane: see vec.hpp); the narrow path's auto-vectorised loops with AVX-512
  const bool wide = wide_vectors();
  if constexpr (sizeof(F) == 4) {
    if (o.C <= kNarrowC && o.eps == 0) {
      const Rows<S>* gp = a->grad ? &g : nullptr;
      const int64_t gss = a->grad_scale_stride;
      const int step = wide ? kLanes : 8;
      for (int64_t r = r0; r < r1; r += step) {
        const int n = r1 - r < step ? static_cast<int>(r1 - r) : step;
        out_of_range +=
            wide ? narrow_rows_auto<S, I>(z, tgt, o, gs, gss, gp, r, n, loss + r, score + r)
                 : narrow_rows<V8, S, I>(z, tgt, o, gs, gss, gp, r, n, loss + r, score + r);
      }
      return out_of_range;
    }
  }
  if constexpr (std::is_same<S, float>::value) {
    if (o.eps == 0 && z.sc == 1 && (!a->grad || g.sc == 1)) {
      for (int64_t r = r0; r < r1; ++r) {
        const float scale = gs ? gs[r * a->grad_scale_stride] : 1.0f;
        const int64_t y = static_cast<int64_t>(*tgt.row(r));
        out_of_range += (y < 0 || y >= o.C) && y != o.ignore_index;
        float* gr = a->grad ? g.row(r) : nullptr;
        if (wide) {
          hard_row_f32<V16>(z.row(r), y, o, scale, gr, loss + r, score + r);
        } else {
          hard_row_f32<V8>(z.row(r), y, o, scale, gr, loss + r, score + r);
        }
      }
      return out_of_range;
    }
  }
  for (int64_t r = r0; r < r1; ++r) {
    const F scale = gs ? gs[r * a->grad_scale_stride] : F(1);
    const int64_t y = static_cast<int64_t>(*tgt.row(r));
    out_of_range += (y < 0 || y >= o.C) && y != o.ignore_index;
    hard_row<S, I, F>(z.row(r), z.sc, *tgt.row(r), o, scale, a->grad ? g.row(r) : nullptr,
                      g.sc, loss + r, score + r);
  }
  return out_of_range;
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
void run_dtype(const fastis_xent_args* a, int64_t rows, int32_t num_threads,
               std::atomic<int64_t>* out_of_range) {
  const int64_t work = a->C * (a->grad ? 2 : 1);
  if (a->target_dtype == FASTIS_INT64) {
    parallel_for(rows, work, num_threads, [a, out_of_range](int64_t r0, int64_t r1) {
      *out_of_range += hard_range<S, int64_t, F>(a, r0, r1);
    });
  } else if (a->target_dtype == FASTIS_INT32) {
    parallel_for(rows, work, num_threads, [a, out_of_range](int64_t r0, int64_t r1) {
      *out_of_range += hard_range<S, int32_t, F>(a, r0, r1);
    });
  } else {
    parallel_for(rows, 2 * work, num_threads,
                 [a](int64_t r0, int64_t r1) { soft_range<S, F>(a, r0, r1); });
  }
}

}  // namespace
}  // namespace fastis

extern "C" fastis_status fastis_softmax_xent_cpu_count(const fastis_xent_args* args,
                                                       int32_t num_threads,
                                                       int64_t* out_of_range) {
  using namespace fastis;
  const fastis_status st = validate_xent(args);
  if (st != FASTIS_OK) return st;
  std::atomic<int64_t> count{0};
  const int64_t rows = args->B * args->T;
  if (rows > 0) {
    switch (args->logits_dtype) {
      case FASTIS_FLOAT32: run_dtype<float, float>(args, rows, num_threads, &count); break;
      case FASTIS_FLOAT64: run_dtype<double, double>(args, rows, num_threads, &count); break;
      case FASTIS_FLOAT16: run_dtype<half_t, float>(args, rows, num_threads, &count); break;
      case FASTIS_BFLOAT16: run_dtype<bf16_t, float>(args, rows, num_threads, &count); break;
      default: return FASTIS_ERR_UNSUPPORTED_DTYPE;
    }
  }
  if (out_of_range) *out_of_range = count.load();
  return FASTIS_OK;
}

extern "C" fastis_status fastis_softmax_xent_cpu(const fastis_xent_args* args,
                                                 int32_t num_threads) {
  return fastis_softmax_xent_cpu_count(args, num_threads, nullptr);
}
