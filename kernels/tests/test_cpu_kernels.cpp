// Known values of the CPU kernels against double-precision formulas written out here:
// ordinary, ignored, out-of-range, NaN / inf rows, smoothing, soft targets, the in-place
// gradient, float16 / bfloat16 storage, the building blocks (exp, log, conversions, Philox)
// and the alias table's implied distribution.
#include <math.h>
#include <stdio.h>

#include <cstdint>
#include <vector>

#include "fastis.h"
#include "numeric.hpp"
#include "philox.hpp"

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
  test_special_rows();
  test_soft();
  test_inplace_bf16();
  test_building_blocks();
  test_alias_exact();
  test_alias_mean_filled();
  if (failures) fprintf(stderr, "%d failure(s)\n", failures);
  else printf("test_cpu_kernels: all passed\n");
  return failures ? 1 : 0;
}
