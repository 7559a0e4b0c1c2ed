// The shared pieces of the CPU softmax cross-entropy paths (kernels/cpu/softmax_xent.cpp
// and xent_fast.hpp): strided row views, options, and the per-row finish of a hard target.
#pragma once

#include <math.h>
#include <stdint.h>

#include <limits>

#include "numeric.hpp"

namespace fastis {

constexpr int64_t kBlock = 128;      // columns per block of the row-wise path
constexpr int64_t kNarrowC = 32;     // C up to this takes the narrow path (hard targets)
constexpr int kLanes = 16;  // partial sums of the row-wise path; rows of narrow_rows_auto

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
  // (T == 1, [N, C] rows, skips the 64-bit division: tens of cycles a row at C = 10)
  S* row(int64_t r) const { return T == 1 ? p + r * sb : p + (r / T) * sb + (r % T) * st; }
};

struct Options {
  int64_t C, ignore_index;
  double eps;
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

}  // namespace fastis
