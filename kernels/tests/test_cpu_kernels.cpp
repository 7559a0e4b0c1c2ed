// Known values of the CPU kernels against double-precision formulas written out here:
// ordinary, ignored, out-of-range, NaN / inf rows, smoothing, soft targets, the in-place
// gradient, float16 / bfloat16 storage, the building blocks (exp, log, conversions, Philox)
// and the alias table's implied distribution.
#include <math.h>
#include <stdio.h>
#include <string.h>

#include <cstdint>
#include <vector>

#include "fastis.h"
#include "numeric.hpp"
#include "philox.hpp"
#include "vec.hpp"

static int failures = 0;

#define EXPECT(cond)                                                      \
  do {                                                                    \
    if (!(cond)) {                                                        \
      fprintf(stderr, "%s:%d: expected %s\n", __FILE__, __LINE__, #cond); \
      ++failures;                                                         \
    }                                                                     \
  } while (0)

static bool close(double got, double want, double tol = 1e-5) {
  if (isnan(want)) return isnan(got);
  return fabs(got - want) <= tol * (1.0 + fabs(want));
}

// Reference row: loss, score and gradient of one row for target distribution t.
struct RefRow {
  double loss, score;
  std::vector<double> grad;
};
static RefRow reference(const std::vector<double>& z, const std::vector<double>& t) {
  double m = -INFINITY, tsum = 0, tz = 0;
  for (double v : z) m = v > m ? v : m;
  double s = 0;
  for (double v : z) s += exp(v - m);
  const double lse = m + log(s);
  for (size_t j = 0; j < z.size(); ++j) tsum += t[j], tz += t[j] * z[j];
  RefRow r{tsum * lse - tz, 0, {}};
  for (size_t j = 0; j < z.size(); ++j) {
    r.grad.push_back(tsum * exp(z[j] - lse) - t[j]);
    r.score += r.grad.back() * r.grad.back();
  }
  r.score = sqrt(r.score);
  return r;
}

static fastis_xent_args args_for(int64_t rows, int64_t C, const void* z, int32_t zt,
                                 const void* y, int32_t yt, void* loss, void* score) {
  fastis_xent_args a{};
  a.B = rows, a.T = 1, a.C = C;
  a.logits = z, a.logits_dtype = zt;
  a.logits_stride[0] = C, a.logits_stride[2] = 1;
  a.target = y, a.target_dtype = yt;
  a.target_stride[0] = yt == FASTIS_INT64 || yt == FASTIS_INT32 ? 1 : C;
  a.target_stride[2] = 1;
  a.ignore_index = -100;
  a.loss = loss, a.score = score;
  a.grad_stride[0] = C, a.grad_stride[2] = 1;
  return a;
}

static std::vector<double> onehot(int64_t C, int64_t y, double eps = 0) {
  std::vector<double> t(C, eps / C);
  t[y] += 1 - eps;
  return t;
}

// Hard targets at C = 7 (narrow path) and C = 300 (row path, two blocks), with gradient.
static void test_hard(int64_t C, double eps) {
  const int64_t rows = 6;
  std::vector<float> z(rows * C), g(rows * C, -7.0f), loss(rows), score(rows);
  for (int64_t i = 0; i < rows * C; ++i) z[i] = static_cast<float>(sin(0.37 * i) * 4.0);
  z[2 * C + 1] = 40.0f;  // row 2: p_y -> 1 (1 - p_y must not cancel)
  std::vector<int64_t> y = {0, 3, 1, -100, C + 4, C - 1};
  z[5 * C] = NAN;  // row 5: a NaN non-target logit
  fastis_xent_args a = args_for(rows, C, z.data(), FASTIS_FLOAT32, y.data(), FASTIS_INT64,
                                loss.data(), score.data());
  a.label_smoothing = eps;
  a.grad = g.data();
  std::vector<float> scale = {1.0f, 2.0f, 0.5f, 3.0f, 1.0f, 1.0f};
  a.grad_scale = scale.data(), a.grad_scale_stride = 1;
  EXPECT(fastis_softmax_xent_cpu(&a, 2) == FASTIS_OK);
  for (int64_t r = 0; r < rows; ++r) {
    if (y[r] == -100) {
      EXPECT(loss[r] == 0.0f && score[r] == 0.0f);
      for (int64_t c = 0; c < C; ++c) EXPECT(g[r * C + c] == 0.0f);
      continue;
    }
    if (y[r] < 0 || y[r] >= C || r == 5) {
      EXPECT(isnan(loss[r]) && isnan(score[r]));
      for (int64_t c = 0; c < C; ++c) EXPECT(isnan(g[r * C + c]));
      continue;
    }
    std::vector<double> zr(z.begin() + r * C, z.begin() + (r + 1) * C);
    const RefRow want = reference(zr, onehot(C, y[r], eps));
    EXPECT(close(loss[r], want.loss));
    EXPECT(close(score[r], want.score, 2e-5));
    for (int64_t c = 0; c < C; ++c) EXPECT(close(g[r * C + c], scale[r] * want.grad[c], 2e-5));
  }
  // row 2: 1 - p_y ~ 4e-17 relative accuracy, not zero
  if (eps == 0) {
    std::vector<double> z2(z.begin() + 2 * C, z.begin() + 3 * C);
    const RefRow want = reference(z2, onehot(C, 1));
    EXPECT(score[2] > 0 && close(score[2], want.score, 1e-5));
    EXPECT(g[2 * C + 1] < 0 && close(g[2 * C + 1], 0.5 * want.grad[1], 1e-5));
  }
}

// +inf / NaN at the target, +inf elsewhere, -inf at the target, C = 1.
static void test_special_rows() {
  const int64_t C = 3;
  const float inf = INFINITY;
  std::vector<float> z = {inf, 0, 1, NAN, 0, 1, 0, inf, 1, -inf, 0, 1};
  std::vector<int32_t> y = {0, 0, 0, 0};
  std::vector<float> loss(4), score(4);
  fastis_xent_args a = args_for(4, C, z.data(), FASTIS_FLOAT32, y.data(), FASTIS_INT32,
                                loss.data(), score.data());
  EXPECT(fastis_softmax_xent_cpu(&a, 1) == FASTIS_OK);
  for (int r = 0; r < 3; ++r) EXPECT(isnan(loss[r]) && isnan(score[r]));
  EXPECT(loss[3] == inf && close(score[3], sqrt(1.0 + (exp(0) * exp(0) + exp(2.0)) /
                                                         ((1 + exp(1.0)) * (1 + exp(1.0))))));
  float one = 2.5f, l1, s1;
  int64_t y1 = 0;
  fastis_xent_args b = args_for(1, 1, &one, FASTIS_FLOAT32, &y1, FASTIS_INT64, &l1, &s1);
  EXPECT(fastis_softmax_xent_cpu(&b, 1) == FASTIS_OK);
  EXPECT(l1 == 0.0f && s1 == 0.0f);
}

// Soft targets with smoothing, in float64 (tight) through the row path.
static void test_soft() {
  const int64_t rows = 3, C = 270;
  std::vector<double> z(rows * C), t(rows * C), g(rows * C), loss(rows), score(rows);
  for (int64_t i = 0; i < rows * C; ++i) z[i] = cos(0.11 * i) * 3, t[i] = (i % 7) / 700.0;
  fastis_xent_args a = args_for(rows, C, z.data(), FASTIS_FLOAT64, t.data(), FASTIS_FLOAT64,
                                loss.data(), score.data());
  a.label_smoothing = 0.2;
  a.grad = g.data();
  EXPECT(fastis_softmax_xent_cpu(&a, 0) == FASTIS_OK);
  for (int64_t r = 0; r < rows; ++r) {
    std::vector<double> zr(z.begin() + r * C, z.begin() + (r + 1) * C), tr(C);
    for (int64_t c = 0; c < C; ++c) tr[c] = 0.8 * t[r * C + c] + 0.2 / C;
    const RefRow want = reference(zr, tr);
    EXPECT(close(loss[r], want.loss, 1e-12) && close(score[r], want.score, 1e-12));
    for (int64_t c = 0; c < C; ++c) EXPECT(close(g[r * C + c], want.grad[c], 1e-12));
  }
}

// The gradient written over the logits (bfloat16 storage) equals the out-of-place one.
static void test_inplace_bf16() {
  const int64_t rows = 5, C = 40;
  std::vector<fastis::bf16_t> z(rows * C), g(rows * C);
  for (int64_t i = 0; i < rows * C; ++i) z[i] = fastis::to_bf16(static_cast<float>(sin(i)));
  std::vector<int64_t> y = {0, 39, 7, 8, 20};
  std::vector<float> l1(rows), s1(rows), l2(rows), s2(rows);
  fastis_xent_args a = args_for(rows, C, z.data(), FASTIS_BFLOAT16, y.data(), FASTIS_INT64,
                                l1.data(), s1.data());
  a.grad = g.data();
  EXPECT(fastis_softmax_xent_cpu(&a, 1) == FASTIS_OK);
  a.loss = l2.data(), a.score = s2.data(), a.grad = z.data();
  EXPECT(fastis_softmax_xent_cpu(&a, 1) == FASTIS_OK);
  for (int64_t i = 0; i < rows * C; ++i) EXPECT(z[i].bits == g[i].bits);
  for (int64_t r = 0; r < rows; ++r) EXPECT(l1[r] == l2[r] && s1[r] == s2[r]);
}

static void test_building_blocks() {
  for (double x = -87; x < 88; x += 0.173) {  // flushed below, inf above
    const float f = static_cast<float>(x);
    EXPECT(close(fastis::vexp(f), exp(static_cast<double>(f)), 3e-7));
  }
  EXPECT(fastis::vexp(-INFINITY) == 0.0f && isnan(fastis::vexp(NAN)));
  EXPECT(fastis::vexp(0.0f) == 1.0f && fastis::vexp(1000.0f) == INFINITY);
  EXPECT(fastis::vexp(-87.5f) == 0.0f && fastis::vexp(88.5f) == INFINITY);
  for (double x = 1.2e-38; x < 1e38; x *= 1.37) {
    const float f = static_cast<float>(x);
    EXPECT(fabs(fastis::vlog(f) - log(static_cast<double>(f))) <= 2e-7 * (1 + fabs(log(x))));
  }
  EXPECT(fastis::vlog(0.0f) == -INFINITY && fastis::vlog(INFINITY) == INFINITY);
  EXPECT(isnan(fastis::vlog(NAN)) && isnan(fastis::vlog(-1.0f)));
  // every float16 round-trips through float32; rounding of a float32 halfway value
  for (uint32_t h = 0; h < 65536; ++h) {
    const float f = fastis::to_float(fastis::half_t{static_cast<uint16_t>(h)});
    const uint16_t back = fastis::to_half(f).bits;
    EXPECT(isnan(f) ? (back & 0x7c00) == 0x7c00 && (back & 0x3ff) : back == h);
  }
  EXPECT(fastis::to_half(1.0f + 0x1.0p-11f).bits == 0x3c00);  // tie to even
  EXPECT(fastis::to_half(1e6f).bits == 0x7c00);               // overflow to inf
  EXPECT(fastis::to_bf16(1.0f + 0x1.0p-8f).bits == 0x3f80);   // tie to even
  EXPECT(isnan(fastis::to_float(fastis::to_bf16(NAN))));
  // Philox4x32-10 known answer (Random123's kat_vectors: key 0, counter 0)
  const fastis::Philox4 w = fastis::philox4x32_10(0, 0);
  EXPECT(w.r[0] == 0x6627e8d5u && w.r[1] == 0xe169c58du && w.r[2] == 0xbc57ac4cu &&
         w.r[3] == 0x9b00dbd8u);
}

// The 8-lane exp / log against float64 (lanes of one vector at once, specials included) and
// against the scalar functions they mirror.
static void test_vector_blocks() {
  using fastis::V8;
  for (double x0 = -87; x0 + 7 * 0.173 < 88; x0 += 8 * 0.173) {
    V8 v;
    for (int l = 0; l < 8; ++l) v[l] = static_cast<float>(x0 + 0.173 * l);
    const V8 e = fastis::vexp(v);
    for (int l = 0; l < 8; ++l) {
      EXPECT(close(e[l], exp(static_cast<double>(v[l])), 3e-7));
      EXPECT(fabs(e[l] - fastis::vexp(v[l])) <= 2.5e-7f * e[l]);
    }
  }
  const V8 sp = {-INFINITY, NAN, 0.0f, 1000.0f, -87.5f, 88.5f, -1e30f, 1e-30f};
  const V8 e = fastis::vexp(sp);
  EXPECT(e[0] == 0.0f && isnan(e[1]) && e[2] == 1.0f && e[3] == INFINITY);
  EXPECT(e[4] == 0.0f && e[5] == INFINITY && e[6] == 0.0f && e[7] == 1.0f);
  for (double x0 = 1.2e-38; x0 < 1e38; x0 *= 1.37 * 1.37 * 1.37 * 1.37) {
    V8 v;
    for (int l = 0; l < 8; ++l) v[l] = static_cast<float>(x0 * pow(1.37, l));
    const V8 lg = fastis::vlog(v);
    for (int l = 0; l < 8; ++l) {
      const double want = log(static_cast<double>(v[l]));
      EXPECT(fabs(lg[l] - want) <= 2e-7 * (1 + fabs(want)));
    }
  }
  const V8 lsp = {0.0f, INFINITY, NAN, -1.0f, 1.0f, 2.0f, 1e-7f, 0.5f};
  const V8 lg = fastis::vlog(lsp), l1p = fastis::vlog1p(lsp);
  EXPECT(lg[0] == -INFINITY && lg[1] == INFINITY && isnan(lg[2]) && isnan(lg[3]));
  EXPECT(lg[4] == 0.0f && close(lg[5], log(2.0), 2e-7));
  EXPECT(l1p[0] == 0.0f && close(l1p[6], log1p(1e-7), 2e-7) && close(l1p[7], log1p(0.5), 2e-7));
  // 16 lanes: lane for lane the 8-lane results (the same operations)
  fastis::V16 w;
  for (int l = 0; l < 16; ++l) w[l] = l < 8 ? sp[l] : lsp[l - 8];
  const fastis::V16 ew = fastis::vexp(w), lw = fastis::vlog(w), l1w = fastis::vlog1p(w);
  for (int l = 0; l < 8; ++l) {
    EXPECT(memcmp(&ew[l], &e[l], 4) == 0);
    EXPECT(memcmp(&lw[l + 8], &lg[l], 4) == 0 && memcmp(&l1w[l + 8], &l1p[l], 4) == 0);
  }
}

// fastis_softmax_xent_cpu_count: rows whose class index is outside [0, C) and not
// ignore_index, on the narrow (C = 5) and the row-wise (C = 100) paths, on several threads.
static void test_out_of_range_count() {
  for (int64_t C : {5, 100}) {
    const int64_t rows = 40;
    std::vector<float> z(rows * C), loss(rows), score(rows);
    for (int64_t i = 0; i < rows * C; ++i) z[i] = static_cast<float>(cos(0.7 * i));
    std::vector<int32_t> y(rows);
    for (int64_t r = 0; r < rows; ++r) y[r] = static_cast<int32_t>(r % C);
    y[3] = -1, y[17] = static_cast<int32_t>(C), y[39] = -100, y[20] = 1 << 30;  // 3 bad
    fastis_xent_args a = args_for(rows, C, z.data(), FASTIS_FLOAT32, y.data(), FASTIS_INT32,
                                  loss.data(), score.data());
    int64_t bad = -1;
    EXPECT(fastis_softmax_xent_cpu_count(&a, 3, &bad) == FASTIS_OK && bad == 3);
    EXPECT(isnan(loss[3]) && isnan(loss[17]) && isnan(loss[20]) && loss[39] == 0.0f);
    a.ignore_index = -1;  // now row 3 is ignored, row 39 (-100) out of range
    EXPECT(fastis_softmax_xent_cpu_count(&a, 1, &bad) == FASTIS_OK && bad == 3);
    EXPECT(fastis_softmax_xent_cpu_count(&a, 1, nullptr) == FASTIS_OK);
    EXPECT(fastis_softmax_xent_cpu_count(nullptr, 1, &bad) == FASTIS_ERR_NULL_POINTER);
  }
}

// Draws (in batches inside the library) equal the one-draw formula of philox.hpp, across a
// partial last batch, an offset and several threads.
static void test_alias_draws_are_the_formula() {
  const int64_t N = 37, count = 200;
  std::vector<double> w(N), prob(N), probs(N);
  for (int64_t i = 0; i < N; ++i) w[i] = 1.0 + (i % 5);
  std::vector<int32_t> alias(N);
  EXPECT(fastis_alias_build_cpu(N, w.data(), FASTIS_FLOAT64, 1, prob.data(), alias.data(),
                                FASTIS_INT32, probs.data()) == FASTIS_OK);
  std::vector<int64_t> out(count);
  const uint64_t seed = 0x123456789abcdefull, offset = (1ull << 32) - 70;  // counter carries
  EXPECT(fastis_alias_draw_cpu(N, prob.data(), alias.data(), FASTIS_INT32, count, seed, offset,
                               out.data(), 3) == FASTIS_OK);
  for (int64_t k = 0; k < count; ++k) {
    const fastis::Philox4 r = fastis::philox4x32_10(seed, offset + static_cast<uint64_t>(k));
    const int64_t b = fastis::alias_bucket(r, N);
    EXPECT(out[k] == (fastis::alias_coin(r) < prob[b] ? b : alias[b]));
  }
}

// Implied distribution of a table: prob[i] / N + sum over buckets aliasing i of (1 - prob) / N.
static void test_alias_exact() {
  for (int64_t n : {1, 2, 7, 1000, 4097}) {
    std::vector<double> w(n), prob(n), probs(n), implied(n, 0.0);
    std::vector<int64_t> alias(n);
    double total = 0;
    for (int64_t i = 0; i < n; ++i) {
      w[i] = (i % 5 == 3) ? 0.0 : pow(fabs(sin(1.3 * i)) + 1e-3, 4) * (i % 11 == 0 ? 1e6 : 1);
      total += w[i];
    }
    if (total == 0) w[0] = 1, total = 1;
    EXPECT(fastis_alias_build_cpu(n, w.data(), FASTIS_FLOAT64, 1, prob.data(), alias.data(),
                                  FASTIS_INT64, probs.data()) == FASTIS_OK);
    for (int64_t i = 0; i < n; ++i) {
      EXPECT(prob[i] >= 0 && prob[i] <= 1 && alias[i] >= 0 && alias[i] < n);
      implied[i] += prob[i] / n;
      implied[alias[i]] += (1 - prob[i]) / n;
    }
    for (int64_t i = 0; i < n; ++i) {
      EXPECT(close(probs[i], w[i] / total, 1e-15));
      EXPECT(fabs(implied[i] - w[i] / total) <= 1e-12 * (w[i] / total) + 1e-15);
      if (w[i] == 0) EXPECT(implied[i] == 0);
    }
  }
}

// Half the items at the mean of the others (N p = 1, or an ulp above, for many of them):
// every item's implied mass within 1e-14 + 32 N 2^-53 of w / W, relative. The build's total
// is compensated, so the rounding of the sum does not all land on the last heavy item.
static void test_alias_mean_filled() {
  for (int64_t n : {30, 3001}) {
    std::vector<double> w(n), prob(n), probs(n), implied(n, 0.0);
    std::vector<int64_t> alias(n);
    double seen = 0, count = 0;
    for (int64_t i = 0; i < n; ++i) {
      w[i] = exp(4.6 * fabs(sin(1.7 * i + 0.3)));
      if (i % 2 == 0) seen += w[i], count += 1;
    }
    for (int64_t i = 1; i < n; i += 2) w[i] = seen / count;
    EXPECT(fastis_alias_build_cpu(n, w.data(), FASTIS_FLOAT64, 1, prob.data(), alias.data(),
                                  FASTIS_INT64, probs.data()) == FASTIS_OK);
    for (int64_t i = 0; i < n; ++i) {
      implied[i] += prob[i] / n;
      implied[alias[i]] += (1 - prob[i]) / n;
    }
    const double rtol = 1e-14 + 32.0 * n * ldexp(1.0, -53);
    for (int64_t i = 0; i < n; ++i) EXPECT(fabs(implied[i] - probs[i]) <= rtol * probs[i]);
  }
}

int main() {
  test_hard(7, 0.0);
  test_hard(7, 0.1);
  test_hard(300, 0.0);
  test_hard(300, 0.25);
  test_hard(33, 0.0);  // the float32 row path: a partial last vector, the target in it
  test_hard(1001, 0.0);
  test_special_rows();
  test_soft();
  test_inplace_bf16();
  test_building_blocks();
  test_vector_blocks();
  test_out_of_range_count();
  test_alias_exact();
  test_alias_draws_are_the_formula();
  test_alias_mean_filled();
  if (failures) fprintf(stderr, "%d failure(s)\n", failures);
  else printf("test_cpu_kernels: all passed\n");
  return failures ? 1 : 0;
}
