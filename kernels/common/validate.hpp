// Argument checks shared by the CPU and CUDA entry points: every size, stride, pointer and
// dtype is checked here, before any kernel reads or writes memory.
#pragma once

#include <stdint.h>

#include "fastis.h"

namespace fastis {

// Byte range [lo, hi) a strided view spans (empty: lo == hi).
struct Span {
  uintptr_t lo = 0, hi = 0;
};

bool is_float(int32_t dtype);
bool is_index(int32_t dtype);

// A [B, T, C] view (C = 1 and stride[2] unused for per-row data): non-null, aligned,
// non-negative strides, no offset overflow. Fills span.
fastis_status check_view(const void* p, int32_t dtype, int64_t B, int64_t T, int64_t C,
                         const int64_t stride[3], Span* span);
// For outputs: no two elements of the view share an address.
bool no_internal_overlap(int64_t B, int64_t T, int64_t C, const int64_t stride[3]);
inline bool overlaps(const Span& a, const Span& b) { return a.lo < b.hi && b.lo < a.hi; }
// Two views of one [B, T, C] shape address the same elements in the same order (strides of
// dimensions of size 1 ignored).
bool same_layout(int64_t B, int64_t T, int64_t C, const int64_t s[3], const int64_t t[3]);

// Checked product of non-negative sizes; false on overflow or a negative factor.
bool checked_rows(int64_t B, int64_t T, int64_t C, int64_t* rows);

fastis_status validate_xent(const fastis_xent_args* a);
fastis_status validate_xent_loss(const fastis_xent_loss_args* a);
fastis_status validate_scale_rows(int64_t B, int64_t T, int64_t C, const void* grad,
                                  int32_t grad_dtype, const int64_t grad_stride[3],
                                  const void* scale, int32_t scale_dtype, int64_t scale_stride);
fastis_status validate_alias_draw(int64_t N, const double* prob, const void* alias,
                                  int32_t alias_dtype, int64_t count, const int64_t* out);

}  // namespace fastis
