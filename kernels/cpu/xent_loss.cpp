// The weighted, reduced cross-entropy of hard-target rows in one call (fastis_xent_loss_cpu).
//
// Three steps, so that a caller's whole loss is one library call: a read of the weights
// (refused unless finite and non-negative) and of the class indices (the rows that count
// in a mean, and those out of range); the rows themselves (fastis_softmax_xent_cpu) with
// each gradient row scaled by its factor f_r in the reduction (w_r, or w_r / n for a mean);
// and the reduced loss sum_r f_r L_r, summed in float64 in row order.
#include <math.h>

#include <limits>
#include <new>
#include <vector>

#include "fastis.h"
#include "validate.hpp"

namespace fastis {
namespace {

template <class F>
const F& weight_at(const fastis_xent_loss_args* a, int64_t b, int64_t t) {
  return static_cast<const F*>(a->weight)[b * a->weight_stride[0] + t * a->weight_stride[1]];
}

// The first row (b * T + t) whose weight is negative, NaN or infinite, else -1.
template <class F>
int64_t first_bad_weight(const fastis_xent_loss_args* a) {
  const int64_t B = a->rows.B, T = a->rows.T;
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = 0; t < T; ++t) {
      const F w = weight_at<F>(a, b, t);
      if (!(w >= F(0) && w < std::numeric_limits<F>::infinity())) return b * T + t;
    }
  return -1;
}

// Rows whose class index is not ignore_index, and those of them outside [0, C).
template <class I>
void count_targets(const fastis_xent_args& r, int64_t* counted, int64_t* out_of_range) {
  const I* y = static_cast<const I*>(r.target);
  int64_t n = 0, bad = 0;
  for (int64_t b = 0; b < r.B; ++b)
    for (int64_t t = 0; t < r.T; ++t) {
      const int64_t v = static_cast<int64_t>(y[b * r.target_stride[0] + t * r.target_stride[1]]);
      if (v == r.ignore_index) continue;
      ++n;
      bad += v < 0 || v >= r.C;
    }
  *counted = n, *out_of_range = bad;
}

template <class F>
fastis_status run(const fastis_xent_loss_args* a, int32_t num_threads,
                  fastis_xent_loss_info* info) {
  const fastis_xent_args& r = a->rows;
  const int64_t B = r.B, T = r.T, rows = B * T;
  if (a->weight != nullptr && (info->bad_weight = first_bad_weight<F>(a)) >= 0)
    return FASTIS_ERR_INVALID_VALUE;
  if (r.target_dtype == FASTIS_INT64)
    count_targets<int64_t>(r, &info->counted, &info->out_of_range);
  else
    count_targets<int32_t>(r, &info->counted, &info->out_of_range);
  const bool mean = a->reduction == FASTIS_REDUCTION_MEAN;
  // 1 / 0 = inf for a mean over no row: every row is then ignored, with a zero gradient
  const F per_row = mean ? F(1) / static_cast<F>(info->counted) : F(1);
  fastis_xent_args scaled = r;
  std::vector<F> factor;
  if (a->weight != nullptr) {
    factor.resize(static_cast<size_t>(rows));
    for (int64_t b = 0; b < B; ++b)
      for (int64_t t = 0; t < T; ++t) factor[b * T + t] = weight_at<F>(a, b, t) * per_row;
    scaled.grad_scale = factor.data(), scaled.grad_scale_stride = 1;
  } else if (mean) {
    scaled.grad_scale = &per_row, scaled.grad_scale_stride = 0;
  }
  const fastis_status st = fastis_softmax_xent_cpu(&scaled, num_threads);
  if (st != FASTIS_OK || a->reduction == FASTIS_REDUCTION_NONE) return st;
  const F* loss = static_cast<const F*>(r.loss);
  double total = 0;
  if (a->weight != nullptr) {
    for (int64_t b = 0; b < B; ++b)
      for (int64_t t = 0; t < T; ++t)
        total += static_cast<double>(weight_at<F>(a, b, t)) * loss[b * T + t];
  } else {
    for (int64_t k = 0; k < rows; ++k) total += loss[k];
  }
  if (mean) total /= static_cast<double>(info->counted);  // 0 / 0: NaN
  *static_cast<F*>(a->total) = static_cast<F>(total);
  return FASTIS_OK;
}

}  // namespace
}  // namespace fastis

extern "C" fastis_status fastis_xent_loss_cpu(const fastis_xent_loss_args* args,
                                              int32_t num_threads, fastis_xent_loss_info* info) {
  using namespace fastis;
  if (info == nullptr) return FASTIS_ERR_NULL_POINTER;
  *info = fastis_xent_loss_info{0, 0, -1};
  const fastis_status st = validate_xent_loss(args);
  if (st != FASTIS_OK) return st;
  try {
    if (args->rows.logits_dtype == FASTIS_FLOAT64) return run<double>(args, num_threads, info);
    return run<float>(args, num_threads, info);
  } catch (const std::bad_alloc&) {
    return FASTIS_ERR_OUT_OF_MEMORY;
  } catch (...) {
    return FASTIS_ERR_INTERNAL;
  }
}
