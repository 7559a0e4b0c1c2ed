// The backward of a sum of per-row losses whose gradients were written with factor 1:
// grad[r, :] *= scale[r], in place. Rows whose factor is exactly 1 (a plain
// loss.backward()) are not touched.
#include "fastis.h"
#include "numeric.hpp"
#include "parallel.hpp"
#include "validate.hpp"

namespace fastis {
namespace {

template <class S, class F, class Scale>
FASTIS_HOT void scale_range(int64_t T, int64_t C, S* grad, const int64_t* st,
                            const Scale* scale, int64_t ss, int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {
    const F f = static_cast<F>(scale[r * ss]);
    if (f == F(1)) continue;
    S* row = grad + (r / T) * st[0] + (r % T) * st[1];
    if (st[2] == 1) {
      for (int64_t c = 0; c < C; ++c) row[c] = store_as<S, F>(load_as<S, F>(row[c]) * f);
    } else {
      for (int64_t c = 0; c < C; ++c)
        row[c * st[2]] = store_as<S, F>(load_as<S, F>(row[c * st[2]]) * f);
    }
  }
}

template <class S, class F, class Scale>
void run(int64_t B, int64_t T, int64_t C, void* grad, const int64_t* st, const void* scale,
         int64_t ss, int32_t num_threads) {
  parallel_for(B * T, C, num_threads, [=](int64_t r0, int64_t r1) {
    scale_range<S, F, Scale>(T, C, static_cast<S*>(grad), st, static_cast<const Scale*>(scale),
                             ss, r0, r1);
  });
}

template <class Scale>
void dispatch(int64_t B, int64_t T, int64_t C, void* grad, int32_t dtype, const int64_t* st,
              const void* scale, int64_t ss, int32_t nt) {
  switch (dtype) {
    case FASTIS_FLOAT32: run<float, float, Scale>(B, T, C, grad, st, scale, ss, nt); break;
    case FASTIS_FLOAT64: run<double, double, Scale>(B, T, C, grad, st, scale, ss, nt); break;
    case FASTIS_FLOAT16: run<half_t, float, Scale>(B, T, C, grad, st, scale, ss, nt); break;
    default: run<bf16_t, float, Scale>(B, T, C, grad, st, scale, ss, nt); break;
  }
}

}  // namespace
}  // namespace fastis

extern "C" fastis_status fastis_scale_rows_cpu(int64_t B, int64_t T, int64_t C, void* grad,
                                               int32_t grad_dtype, const int64_t grad_stride[3],
                                               const void* scale, int32_t scale_dtype,
                                               int64_t scale_stride, int32_t num_threads) {
  using namespace fastis;
  const fastis_status st = validate_scale_rows(B, T, C, grad, grad_dtype, grad_stride, scale,
                                               scale_dtype, scale_stride);
  if (st != FASTIS_OK) return st;
  if (B * T == 0 || C == 0) return FASTIS_OK;
  if (scale_dtype == FASTIS_FLOAT32)
    dispatch<float>(B, T, C, grad, grad_dtype, grad_stride, scale, scale_stride, num_threads);
  else
    dispatch<double>(B, T, C, grad, grad_dtype, grad_stride, scale, scale_stride, num_threads);
  return FASTIS_OK;
}
