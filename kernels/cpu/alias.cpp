// Walker alias tables on the CPU: the O(N) build (a two-cursor sweep, no scratch memory) and
// the draw (Philox counter-based, so a draw depends on its index only).
//
// Build. With q_i = N w_i / W (mean 1), item i is light when q_i <= 1 and heavy otherwise.
// One cursor walks the lights in index order, the other the heavies. The current heavy j,
// with remaining mass r (starting at q_j), tops up light buckets (alias[i] = j,
// prob[i] = q_i, r -= 1 - q_i) while r > 1; once r <= 1, bucket j itself keeps prob r and
// is topped up by the next heavy, which starts from q_j' - (1 - r). Each bucket's mass
// prob + (1 - prob) = 1 goes to at most two items and each item's total is q_i, so a draw
// (uniform bucket, then a coin against prob) returns i with probability w_i / W. What
// rounding leaves over at the end (rounding-sized) makes buckets of their own.
#include <math.h>

#include "fastis.h"
#include "parallel.hpp"
#include "philox.hpp"
#include "validate.hpp"

namespace fastis {
namespace {

// The total is a compensated (Neumaier) sum. The q_i sum to N (1 + the total's relative
// error), and the sweep leaves all of that discrepancy to the last heavy item: a plain
// running sum errs by up to N ulp, which at N = 3000 moved that item's mass by 3e-11 in
// bucket units; compensated, the discrepancy is the rounding of the q_i alone.
template <class W>
fastis_status sum_weights(int64_t n, const W* w, int64_t ws, double* total, int64_t* anchor) {
  double sum = 0.0, comp = 0.0, best = -1.0;
  int64_t arg = 0;
  for (int64_t i = 0; i < n; ++i) {
    const double v = static_cast<double>(w[i * ws]);
    if (!(v >= 0.0) || v == INFINITY) return FASTIS_ERR_INVALID_VALUE;  // NaN, < 0, inf
    const double t = sum + v;
    comp += fabs(sum) >= fabs(v) ? (sum - t) + v : (v - t) + sum;
    sum = t;
    if (v > best) best = v, arg = i;
  }
  sum += comp;
  if (!(sum > 0.0) || sum == INFINITY) return FASTIS_ERR_INVALID_VALUE;
  *total = sum, *anchor = arg;
  return FASTIS_OK;
}

template <class A>
void sweep(int64_t n, const double* probs, double* prob, A* alias, int64_t anchor) {
  // prob holds q = probs * n on entry. Light or heavy is decided from probs, which the sweep
  // does not change (prob does: a heavy that became a bucket holds its remainder <= 1).
  const double dn = static_cast<double>(n);
  auto next_light = [&](int64_t k) {
    while (k < n && probs[k] * dn > 1.0) ++k;
    return k;
  };
  auto next_heavy = [&](int64_t k) {
    while (k < n && !(probs[k] * dn > 1.0)) ++k;
    return k;
  };
  int64_t i = next_light(0), j = next_heavy(0);
  if (j < n) {
    double r = prob[j];
    for (;;) {
      if (r > 1.0) {  // heavy j still has excess: it tops up light bucket i
        if (i >= n) break;
        alias[i] = static_cast<A>(j);
        r -= 1.0 - prob[i];
        i = next_light(i + 1);
      } else {  // j becomes a bucket of its own, topped up by the next heavy
        const int64_t jn = next_heavy(j + 1);
        if (jn >= n) break;
        prob[j] = r;
        alias[j] = static_cast<A>(jn);
        r = prob[jn] - (1.0 - r);
        j = jn;
      }
    }
    // rounding leftovers: the current heavy, any heavy after it, any light not yet filled
    for (int64_t k = j; k < n; k = next_heavy(k + 1)) prob[k] = 1.0, alias[k] = static_cast<A>(k);
    anchor = j;
  }
  for (; i < n; i = next_light(i + 1)) {  // (q_i is 1 up to rounding, or 0: never drawn)
    const bool positive = prob[i] > 0.0;
    prob[i] = positive ? 1.0 : 0.0;
    alias[i] = static_cast<A>(positive ? i : anchor);
  }
}

template <class W, class A>
fastis_status build(int64_t n, const W* w, int64_t ws, double* prob, A* alias, double* probs) {
  double total = 0.0;
  int64_t anchor = 0;
  const fastis_status st = sum_weights(n, w, ws, &total, &anchor);
  if (st != FASTIS_OK) return st;
  const double dn = static_cast<double>(n);
  for (int64_t i = 0; i < n; ++i) {
    probs[i] = static_cast<double>(w[i * ws]) / total;
    prob[i] = probs[i] * dn;
  }
  sweep(n, probs, prob, alias, anchor);
  return FASTIS_OK;
}

// Draws [k0, k1) in batches of kDrawBatch: Philox for the whole batch first, one round at
// a time over all its counters (loops the compiler vectorises: 32 x 32 -> 64-bit products
// lane by lane), then the buckets and coins, then the table reads in a loop of their own,
// so that many cache misses into a large table are in flight at once (one draw at a time,
// the Philox rounds between two reads kept about two in flight: 3x slower at 2^20 items).
// The same words, buckets and coins as philox4x32_10 / alias_bucket / alias_coin.
constexpr int kDrawBatch = 64;

template <class A>
FASTIS_HOT void draw_range(int64_t n, const double* prob, const A* alias, uint64_t seed,
                           uint64_t offset, int64_t* out, int64_t k0, int64_t k1) {
  uint32_t c0[kDrawBatch], c1[kDrawBatch], c2[kDrawBatch], c3[kDrawBatch];
  int64_t bucket[kDrawBatch];
  double coin[kDrawBatch];
  for (int64_t k = k0; k < k1; k += kDrawBatch) {
    const int m = k1 - k < kDrawBatch ? static_cast<int>(k1 - k) : kDrawBatch;
    for (int j = 0; j < kDrawBatch; ++j) {  // (the whole batch: fixed trip counts)
      const uint64_t counter = offset + static_cast<uint64_t>(k) + static_cast<uint64_t>(j);
      c0[j] = static_cast<uint32_t>(counter), c1[j] = static_cast<uint32_t>(counter >> 32);
      c2[j] = 0, c3[j] = 0;
    }
    uint32_t key0 = static_cast<uint32_t>(seed), key1 = static_cast<uint32_t>(seed >> 32);
    for (int round = 0; round < 10; ++round) {
      for (int j = 0; j < kDrawBatch; ++j) {
        const uint64_t p0 = static_cast<uint64_t>(0xCD9E8D57u) * c2[j];
        const uint64_t p1 = static_cast<uint64_t>(0xD2511F53u) * c0[j];
        c0[j] = static_cast<uint32_t>(p0 >> 32) ^ c1[j] ^ key0;
        c2[j] = static_cast<uint32_t>(p1 >> 32) ^ c3[j] ^ key1;
        c1[j] = static_cast<uint32_t>(p0);
        c3[j] = static_cast<uint32_t>(p1);
      }
      key0 += 0x9E3779B9u;
      key1 += 0xBB67AE85u;
    }
    for (int j = 0; j < m; ++j)
      bucket[j] = alias_bucket(Philox4{{c0[j], c1[j], c2[j], c3[j]}}, n);
    for (int j = 0; j < kDrawBatch; ++j)
      coin[j] = alias_coin(Philox4{{c0[j], c1[j], c2[j], c3[j]}});
    for (int j = 0; j < m; ++j) {
      const int64_t b = bucket[j];
      out[k + j] = coin[j] < prob[b] ? b : static_cast<int64_t>(alias[b]);
    }
  }
}

}  // namespace
}  // namespace fastis

extern "C" fastis_status fastis_alias_build_cpu(int64_t N, const void* weights,
                                                int32_t weights_dtype, int64_t weights_stride,
                                                double* prob, void* alias, int32_t alias_dtype,
                                                double* probs) {
  using namespace fastis;
  if (N < 1) return FASTIS_ERR_INVALID_SIZE;
  if (weights_dtype != FASTIS_FLOAT32 && weights_dtype != FASTIS_FLOAT64)
    return FASTIS_ERR_UNSUPPORTED_DTYPE;
  if (!is_index(alias_dtype) || (alias_dtype == FASTIS_INT32 && N > INT32_MAX))
    return FASTIS_ERR_UNSUPPORTED_DTYPE;
  if (weights_stride < 0) return FASTIS_ERR_INVALID_STRIDE;
  const int64_t ws[3] = {weights_stride, 0, 0}, flat[3] = {1, 0, 0};
  Span w, p, a, q;
  fastis_status st = check_view(weights, weights_dtype, N, 1, 1, ws, &w);
  if (st != FASTIS_OK) return st;
  if ((st = check_view(prob, FASTIS_FLOAT64, N, 1, 1, flat, &p)) != FASTIS_OK) return st;
  if ((st = check_view(alias, alias_dtype, N, 1, 1, flat, &a)) != FASTIS_OK) return st;
  if ((st = check_view(probs, FASTIS_FLOAT64, N, 1, 1, flat, &q)) != FASTIS_OK) return st;
  if (overlaps(p, a) || overlaps(p, q) || overlaps(a, q) || overlaps(w, p) || overlaps(w, a) ||
      overlaps(w, q))
    return FASTIS_ERR_OVERLAP;
  const bool f32 = weights_dtype == FASTIS_FLOAT32;
  if (alias_dtype == FASTIS_INT32) {
    int32_t* al = static_cast<int32_t*>(alias);
    return f32 ? build(N, static_cast<const float*>(weights), weights_stride, prob, al, probs)
               : build(N, static_cast<const double*>(weights), weights_stride, prob, al, probs);
  }
  int64_t* al = static_cast<int64_t*>(alias);
  return f32 ? build(N, static_cast<const float*>(weights), weights_stride, prob, al, probs)
             : build(N, static_cast<const double*>(weights), weights_stride, prob, al, probs);
}

extern "C" fastis_status fastis_alias_draw_cpu(int64_t N, const double* prob, const void* alias,
                                               int32_t alias_dtype, int64_t count, uint64_t seed,
                                               uint64_t offset, int64_t* out,
                                               int32_t num_threads) {
  using namespace fastis;
  const fastis_status st = validate_alias_draw(N, prob, alias, alias_dtype, count, out);
  if (st != FASTIS_OK) return st;
  if (alias_dtype == FASTIS_INT32) {
    const int32_t* al = static_cast<const int32_t*>(alias);
    parallel_for(count, 16, num_threads, [=](int64_t k0, int64_t k1) {
      draw_range(N, prob, al, seed, offset, out, k0, k1);
    });
  } else {
    const int64_t* al = static_cast<const int64_t*>(alias);
    parallel_for(count, 16, num_threads, [=](int64_t k0, int64_t k1) {
      draw_range(N, prob, al, seed, offset, out, k0, k1);
    });
  }
  return FASTIS_OK;
}
