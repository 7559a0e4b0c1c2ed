#include "validate.hpp"

#include <math.h>

namespace fastis {

namespace {

bool mul_ok(int64_t a, int64_t b, int64_t* out) { return !__builtin_mul_overflow(a, b, out); }
bool add_ok(int64_t a, int64_t b, int64_t* out) { return !__builtin_add_overflow(a, b, out); }

}  // namespace

bool is_float(int32_t dtype) {
  return dtype == FASTIS_FLOAT32 || dtype == FASTIS_FLOAT64 || dtype == FASTIS_FLOAT16 ||
         dtype == FASTIS_BFLOAT16;
}

bool is_index(int32_t dtype) { return dtype == FASTIS_INT32 || dtype == FASTIS_INT64; }

bool checked_rows(int64_t B, int64_t T, int64_t C, int64_t* rows) {
  int64_t n = 0, numel = 0;
  if (B < 0 || T < 0 || C < 0 || !mul_ok(B, T, &n) || !mul_ok(n, C, &numel)) return false;
  *rows = n;
  return true;
}

fastis_status check_view(const void* p, int32_t dtype, int64_t B, int64_t T, int64_t C,
                         const int64_t stride[3], Span* span) {
  const int64_t esize = fastis_dtype_size(dtype);
  if (esize == 0) return FASTIS_ERR_UNSUPPORTED_DTYPE;
  if (p == nullptr || stride == nullptr) return FASTIS_ERR_NULL_POINTER;
  if (reinterpret_cast<uintptr_t>(p) % static_cast<uintptr_t>(esize) != 0)
    return FASTIS_ERR_MISALIGNED;
  const int64_t size[3] = {B, T, C};
  int64_t last = 0;  // offset of the last element, in elements
  bool empty = false;
  for (int d = 0; d < 3; ++d) {
    if (size[d] < 0) return FASTIS_ERR_INVALID_SIZE;
    if (size[d] == 0) empty = true;
    if (size[d] > 1 && stride[d] < 0) return FASTIS_ERR_INVALID_STRIDE;
    int64_t step = 0;
    if (size[d] > 1 && (!mul_ok(size[d] - 1, stride[d], &step) || !add_ok(last, step, &last)))
      return FASTIS_ERR_INVALID_SIZE;
  }
  int64_t bytes = 0;
  if (!add_ok(last, 1, &bytes) || !mul_ok(bytes, esize, &bytes)) return FASTIS_ERR_INVALID_SIZE;
  const uintptr_t lo = reinterpret_cast<uintptr_t>(p);
  if (lo + static_cast<uintptr_t>(bytes) < lo) return FASTIS_ERR_INVALID_SIZE;  // wraps
  if (span != nullptr) *span = empty ? Span{lo, lo} : Span{lo, lo + static_cast<uintptr_t>(bytes)};
  return FASTIS_OK;
}

bool no_internal_overlap(int64_t B, int64_t T, int64_t C, const int64_t stride[3]) {
  // Dimensions of size > 1, sorted by stride: each must step past the previous one's extent.
  int64_t size[3], st[3];
  int n = 0;
  const int64_t all[3] = {B, T, C};
  for (int d = 0; d < 3; ++d)
    if (all[d] > 1) size[n] = all[d], st[n] = stride[d], ++n;
  for (int i = 1; i < n; ++i)  // insertion sort by stride
    for (int j = i; j > 0 && st[j] < st[j - 1]; --j) {
      int64_t s = st[j]; st[j] = st[j - 1]; st[j - 1] = s;
      s = size[j]; size[j] = size[j - 1]; size[j - 1] = s;
    }
  int64_t extent = 1;  // 1 + the largest offset within the inner dimensions
  for (int i = 0; i < n; ++i) {
    int64_t span = 0;
    if (st[i] < extent) return false;
    if (__builtin_mul_overflow(st[i], size[i] - 1, &span) ||
        __builtin_add_overflow(extent, span, &extent))
      return false;
  }
  return true;
}

bool same_layout(int64_t B, int64_t T, int64_t C, const int64_t s[3], const int64_t t[3]) {
  // the stride of a dimension of size 1 never moves to another element: it is not read
  const int64_t size[3] = {B, T, C};
  for (int d = 0; d < 3; ++d)
    if (size[d] > 1 && s[d] != t[d]) return false;
  return true;
}

fastis_status validate_xent(const fastis_xent_args* a) {
  if (a == nullptr) return FASTIS_ERR_NULL_POINTER;
  int64_t rows = 0;
  if (!checked_rows(a->B, a->T, a->C, &rows)) return FASTIS_ERR_INVALID_SIZE;
  if (rows > 0 && a->C == 0) return FASTIS_ERR_INVALID_SIZE;  // no class to predict
  const int32_t ld = a->logits_dtype;
  if (!is_float(ld)) return FASTIS_ERR_UNSUPPORTED_DTYPE;
  const bool soft = is_float(a->target_dtype);
  if (!soft && !is_index(a->target_dtype)) return FASTIS_ERR_UNSUPPORTED_DTYPE;
  if (soft && a->target_dtype != ld) return FASTIS_ERR_UNSUPPORTED_DTYPE;
  if (!(a->label_smoothing >= 0.0 && a->label_smoothing <= 1.0)) return FASTIS_ERR_INVALID_VALUE;
  Span logits, target, grad;
  fastis_status st = check_view(a->logits, ld, a->B, a->T, a->C, a->logits_stride, &logits);
  if (st != FASTIS_OK) return st;
  st = check_view(a->target, a->target_dtype, a->B, a->T, soft ? a->C : 1, a->target_stride,
                  &target);
  if (st != FASTIS_OK) return st;
  const int32_t out = ld == FASTIS_FLOAT64 ? FASTIS_FLOAT64 : FASTIS_FLOAT32;
  const int64_t flat[3] = {1, 0, 0};
  Span loss, score;
  if ((st = check_view(a->loss, out, rows, 1, 1, flat, &loss)) != FASTIS_OK) return st;
  if ((st = check_view(a->score, out, rows, 1, 1, flat, &score)) != FASTIS_OK) return st;
  if (overlaps(loss, score) || overlaps(loss, logits) || overlaps(score, logits) ||
      overlaps(loss, target) || overlaps(score, target))
    return FASTIS_ERR_OVERLAP;
  if (a->grad != nullptr) {
    if ((st = check_view(a->grad, ld, a->B, a->T, a->C, a->grad_stride, &grad)) != FASTIS_OK)
      return st;
    if (!no_internal_overlap(a->B, a->T, a->C, a->grad_stride)) return FASTIS_ERR_INVALID_STRIDE;
    const bool same =
        a->grad == a->logits && same_layout(a->B, a->T, a->C, a->grad_stride, a->logits_stride);
    if ((!same && overlaps(grad, logits)) || overlaps(grad, target) || overlaps(grad, loss) ||
        overlaps(grad, score))
      return FASTIS_ERR_OVERLAP;
  }
  if (a->grad_scale != nullptr) {
    if (a->grad_scale_stride < 0) return FASTIS_ERR_INVALID_STRIDE;
    const int64_t s[3] = {a->grad_scale_stride, 0, 0};
    Span gs;
    if ((st = check_view(a->grad_scale, out, rows, 1, 1, s, &gs)) != FASTIS_OK) return st;
    if (a->grad != nullptr && overlaps(gs, grad)) return FASTIS_ERR_OVERLAP;
  }
  return FASTIS_OK;
}

fastis_status validate_xent_loss(const fastis_xent_loss_args* a) {
  if (a == nullptr) return FASTIS_ERR_NULL_POINTER;
  const fastis_xent_args& r = a->rows;
  fastis_status st = validate_xent(&r);
  if (st != FASTIS_OK) return st;
  if (!is_index(r.target_dtype)) return FASTIS_ERR_UNSUPPORTED_DTYPE;  // class indices only
  if (r.grad_scale != nullptr) return FASTIS_ERR_INVALID_VALUE;
  if (a->reduction < FASTIS_REDUCTION_NONE || a->reduction > FASTIS_REDUCTION_MEAN)
    return FASTIS_ERR_INVALID_VALUE;
  const int32_t out = r.logits_dtype == FASTIS_FLOAT64 ? FASTIS_FLOAT64 : FASTIS_FLOAT32;
  const int64_t rows = r.B * r.T, flat[3] = {1, 0, 0};
  Span loss, score, grad, total, weight;
  check_view(r.loss, out, rows, 1, 1, flat, &loss);  // checked by validate_xent
  check_view(r.score, out, rows, 1, 1, flat, &score);
  if (r.grad != nullptr) check_view(r.grad, r.logits_dtype, r.B, r.T, r.C, r.grad_stride, &grad);
  if (a->total != nullptr || a->reduction != FASTIS_REDUCTION_NONE) {
    if ((st = check_view(a->total, out, 1, 1, 1, flat, &total)) != FASTIS_OK) return st;
    if (overlaps(total, loss) || overlaps(total, score) || overlaps(total, grad))
      return FASTIS_ERR_OVERLAP;
  }
  if (a->weight != nullptr) {
    const int64_t ws[3] = {a->weight_stride[0], a->weight_stride[1], 0};
    if ((st = check_view(a->weight, out, r.B, r.T, 1, ws, &weight)) != FASTIS_OK) return st;
    if (overlaps(weight, loss) || overlaps(weight, score) || overlaps(weight, grad) ||
        overlaps(weight, total))
      return FASTIS_ERR_OVERLAP;
  }
  return FASTIS_OK;
}

fastis_status validate_scale_rows(int64_t B, int64_t T, int64_t C, const void* grad,
                                  int32_t grad_dtype, const int64_t grad_stride[3],
                                  const void* scale, int32_t scale_dtype, int64_t scale_stride) {
  int64_t rows = 0;
  if (!checked_rows(B, T, C, &rows)) return FASTIS_ERR_INVALID_SIZE;
  if (!is_float(grad_dtype)) return FASTIS_ERR_UNSUPPORTED_DTYPE;
  if (scale_dtype != FASTIS_FLOAT32 && scale_dtype != FASTIS_FLOAT64)
    return FASTIS_ERR_UNSUPPORTED_DTYPE;
  Span g, s;
  fastis_status st = check_view(grad, grad_dtype, B, T, C, grad_stride, &g);
  if (st != FASTIS_OK) return st;
  if (!no_internal_overlap(B, T, C, grad_stride)) return FASTIS_ERR_INVALID_STRIDE;
  if (scale_stride < 0) return FASTIS_ERR_INVALID_STRIDE;
  const int64_t ss[3] = {scale_stride, 0, 0};
  if ((st = check_view(scale, scale_dtype, rows, 1, 1, ss, &s)) != FASTIS_OK) return st;
  return overlaps(g, s) ? FASTIS_ERR_OVERLAP : FASTIS_OK;
}

fastis_status validate_alias_draw(int64_t N, const double* prob, const void* alias,
                                  int32_t alias_dtype, int64_t count, const int64_t* out) {
  if (N < 1 || count < 0) return FASTIS_ERR_INVALID_SIZE;
  if (!is_index(alias_dtype)) return FASTIS_ERR_UNSUPPORTED_DTYPE;
  if (alias_dtype == FASTIS_INT32 && N > INT32_MAX) return FASTIS_ERR_UNSUPPORTED_DTYPE;
  const int64_t flat[3] = {1, 0, 0};
  Span p, a, o;
  fastis_status st = check_view(prob, FASTIS_FLOAT64, N, 1, 1, flat, &p);
  if (st != FASTIS_OK) return st;
  if ((st = check_view(alias, alias_dtype, N, 1, 1, flat, &a)) != FASTIS_OK) return st;
  if ((st = check_view(out, FASTIS_INT64, count, 1, 1, flat, &o)) != FASTIS_OK) return st;
  return overlaps(o, p) || overlaps(o, a) ? FASTIS_ERR_OVERLAP : FASTIS_OK;
}

}  // namespace fastis
