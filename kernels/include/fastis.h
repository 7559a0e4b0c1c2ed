/*
 * fastis: fused softmax cross-entropy with the gradient-norm score, and alias-method
 * sampling, as a plain C library (CPU kernels, and CUDA kernels when built with CUDA).
 *
 * Conventions
 * - Every function returns a fastis_status; nothing else crosses the boundary (no C++
 *   exceptions, no STL types). fastis_status_string() names a status.
 * - Sizes and strides are int64_t; strides count elements (not bytes) and must be >= 0.
 *   Pointers must be aligned to their element size. Invalid arguments are reported before
 *   any memory is touched.
 * - Rows: the logits are a [B, T, C] view (an [N, C] matrix is B = N, T = 1); row r is
 *   (r / T, r % T). Per-row outputs are contiguous [B * T].
 * - CPU functions take num_threads (0: the library's default; results never depend on it).
 *   CUDA functions take device pointers and a stream (a cudaStream_t; NULL is the legacy
 *   default stream); they enqueue work and return without synchronising.
 *
 * Math (per row, p = softmax(z), t the target distribution, T_sum = sum_j t_j):
 *   loss  = T_sum * logsumexp(z) - <t, z>
 *   grad  = grad_scale[r] * (T_sum * p - t)      (dloss / dz, scaled)
 *   score = || T_sum * p - t ||_2                 (unscaled)
 * Integer targets are one-hot; label smoothing e gives t = (1 - e) t + e / C. Rows whose
 * target is ignore_index get loss = score = 0 and a zero gradient; a class index outside
 * [0, C), a NaN or +inf logit make the row NaN (loss, score and gradient).
 */
#ifndef FASTIS_H
#define FASTIS_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#if defined(_WIN32) && defined(FASTIS_BUILDING)
#define FASTIS_API __declspec(dllexport)
#elif defined(_WIN32)
#define FASTIS_API __declspec(dllimport)
#else
#define FASTIS_API __attribute__((visibility("default")))
#endif

#define FASTIS_VERSION_MAJOR 0
#define FASTIS_VERSION_MINOR 3
#define FASTIS_VERSION_PATCH 0
/* major * 10000 + minor * 100 + patch */
#define FASTIS_VERSION \
  (FASTIS_VERSION_MAJOR * 10000 + FASTIS_VERSION_MINOR * 100 + FASTIS_VERSION_PATCH)

typedef enum fastis_status {
  FASTIS_OK = 0,
  FASTIS_ERR_NULL_POINTER = 1,      /* a required pointer is NULL */
  FASTIS_ERR_INVALID_SIZE = 2,      /* negative size, or a size/offset overflows int64 */
  FASTIS_ERR_INVALID_STRIDE = 3,    /* negative stride, or an output whose elements overlap */
  FASTIS_ERR_UNSUPPORTED_DTYPE = 4, /* a dtype this argument does not take */
  FASTIS_ERR_MISALIGNED = 5,        /* a pointer not aligned to its element size */
  FASTIS_ERR_INVALID_VALUE = 6,     /* e.g. label_smoothing outside [0, 1], bad weights */
  FASTIS_ERR_OVERLAP = 7,           /* an output overlaps an input it may not alias */
  FASTIS_ERR_OUT_OF_MEMORY = 8,
  FASTIS_ERR_NOT_COMPILED = 9,      /* e.g. a CUDA function in a library built without CUDA */
  FASTIS_ERR_NOT_IMPLEMENTED = 10,
  FASTIS_ERR_CUDA = 11,             /* a CUDA runtime error (launch, invalid device pointer) */
  FASTIS_ERR_INTERNAL = 12
} fastis_status;

typedef enum fastis_dtype {
  FASTIS_FLOAT32 = 0,
  FASTIS_FLOAT64 = 1,
  FASTIS_FLOAT16 = 2,
  FASTIS_BFLOAT16 = 3,
  FASTIS_INT32 = 4,
  FASTIS_INT64 = 5
} fastis_dtype;

/* The same type as CUDA's cudaStream_t, without including the CUDA headers. */
typedef struct CUstream_st* fastis_stream_t;

/* FASTIS_VERSION of the library actually loaded (compare with the header's). */
FASTIS_API int32_t fastis_version(void);
/* "0.3.0" */
FASTIS_API const char* fastis_version_string(void);
/* 1 when the library was built with its CUDA kernels, else 0. */
FASTIS_API int32_t fastis_has_cuda(void);
/* A static string naming the status ("FASTIS_OK", ...; "unknown status" otherwise). */
FASTIS_API const char* fastis_status_string(int32_t status);
/* Bytes per element of a dtype, 0 for a value that is not a fastis_dtype. */
FASTIS_API int64_t fastis_dtype_size(int32_t dtype);

/*
 * Softmax cross-entropy rows: loss, score and optionally the gradient.
 *
 * logits      [B, T, C], dtype float32 / float64 / float16 / bfloat16, strides logits_stride.
 * target      integer (int32 / int64): class indices [B, T] (target_stride[2] unused);
 *             floating (the logits' dtype): target probabilities [B, T, C] (soft targets;
 *             ignore_index does not apply).
 * loss, score [B * T] contiguous, float64 when the logits are float64, else float32.
 *             Computed in float64 for float64 logits, else float32.
 * grad        NULL, or [B, T, C] in the logits' dtype with grad_stride (no two elements at
 *             one address). It may be the logits themselves (same pointer and strides: each
 *             element is read before it is written) and must not overlap them otherwise, nor
 *             overlap the target.
 * grad_scale  NULL (factor 1), or the per-row factors of grad, in the loss dtype, element r
 *             at grad_scale[r * grad_scale_stride] (stride 0: one factor for all rows).
 * label_smoothing in [0, 1].
 */
typedef struct fastis_xent_args {
  int64_t B, T, C;
  const void* logits;
  int32_t logits_dtype;
  int64_t logits_stride[3];
  const void* target;
  int32_t target_dtype;
  int64_t target_stride[3];
  int64_t ignore_index;
  double label_smoothing;
  void* loss;
  void* score;
  void* grad;
  int64_t grad_stride[3];
  const void* grad_scale;
  int64_t grad_scale_stride;
} fastis_xent_args;

FASTIS_API fastis_status fastis_softmax_xent_cpu(const fastis_xent_args* args,
                                                 int32_t num_threads);
FASTIS_API fastis_status fastis_softmax_xent_cuda(const fastis_xent_args* args,
                                                  fastis_stream_t stream);
/*
 * fastis_softmax_xent_cpu, which also writes to *out_of_range (when not NULL) the number of
 * rows whose class index is outside [0, C) and not ignore_index (0 for soft targets): a
 * caller's range check on the read the kernel makes anyway. (Since 0.2.)
 */
FASTIS_API fastis_status fastis_softmax_xent_cpu_count(const fastis_xent_args* args,
                                                       int32_t num_threads,
                                                       int64_t* out_of_range);

/*
 * The whole weighted loss of hard-target rows in one call (since 0.3): fastis_softmax_xent_cpu
 * with each row's gradient scaled by its factor in the reduction, and the reduced loss.
 *
 * rows        as for fastis_softmax_xent_cpu, with class indices (int32 / int64) and
 *             rows.grad_scale NULL (the factors come from weight and reduction below).
 *             rows.loss receives the unweighted row losses L_r.
 * weight      NULL (1 for every row), or per-row weights in the loss dtype: row (b, t) at
 *             weight[b * weight_stride[0] + t * weight_stride[1]] (weight_stride[1] = 0: one
 *             weight per sequence). Every weight must be finite and >= 0, else
 *             FASTIS_ERR_INVALID_VALUE, info->bad_weight names the first such row, and no
 *             output is written. It may not overlap an output.
 * reduction   FASTIS_REDUCTION_NONE, _SUM or _MEAN. With n the rows whose class index is not
 *             ignore_index, a row's factor f_r is w_r (none, sum) or w_r / n (mean); rows.grad
 *             (when not NULL) receives f_r * dL_r / dz_r, and *total (one value, loss dtype;
 *             unused for none and may be NULL there) sum_r f_r L_r, summed in float64. A mean
 *             over no row is NaN (and every gradient row 0).
 * info        counted = n; out_of_range = rows whose class index is outside [0, C) and not
 *             ignore_index (their loss, score and gradient are NaN: the caller decides);
 *             bad_weight = -1 unless a weight was refused.
 */
typedef enum fastis_reduction {
  FASTIS_REDUCTION_NONE = 0,
  FASTIS_REDUCTION_SUM = 1,
  FASTIS_REDUCTION_MEAN = 2
} fastis_reduction;

typedef struct fastis_xent_loss_args {
  fastis_xent_args rows;
  const void* weight;
  int64_t weight_stride[2];
  int32_t reduction;
  void* total;
} fastis_xent_loss_args;

typedef struct fastis_xent_loss_info {
  int64_t counted;
  int64_t out_of_range;
  int64_t bad_weight;
} fastis_xent_loss_info;

FASTIS_API fastis_status fastis_xent_loss_cpu(const fastis_xent_loss_args* args,
                                              int32_t num_threads, fastis_xent_loss_info* info);

/*
 * The backward of a sum of scaled rows: grad[b, t, :] *= scale[r * scale_stride] in place,
 * r = b * T + t (scale_stride 0: one factor for all rows). Rows whose factor is exactly 1
 * are not touched. grad: float32 / float64 / float16 / bfloat16; scale: float32 or float64.
 */
FASTIS_API fastis_status fastis_scale_rows_cpu(int64_t B, int64_t T, int64_t C, void* grad,
                                               int32_t grad_dtype, const int64_t grad_stride[3],
                                               const void* scale, int32_t scale_dtype,
                                               int64_t scale_stride, int32_t num_threads);
FASTIS_API fastis_status fastis_scale_rows_cuda(int64_t B, int64_t T, int64_t C, void* grad,
                                                int32_t grad_dtype,
                                                const int64_t grad_stride[3],
                                                const void* scale, int32_t scale_dtype,
                                                int64_t scale_stride, fastis_stream_t stream);

/*
 * Walker alias table of N >= 1 non-negative finite weights (float32 / float64, element i at
 * weights[i * weights_stride]) whose float64 sum is positive and finite (else
 * FASTIS_ERR_INVALID_VALUE, and nothing is written).
 * Writes prob [N] float64, alias [N] (int32 for N < 2^31, or int64) and probs [N] float64
 * = w / sum(w) (float64 sum): a draw picks bucket i uniformly, keeps it when a uniform coin
 * is < prob[i], else takes alias[i]. Every item is drawn with probability probs[i] up to
 * float64 rounding; items of weight 0 never are. O(N) time, no scratch memory.
 */
FASTIS_API fastis_status fastis_alias_build_cpu(int64_t N, const void* weights,
                                                int32_t weights_dtype, int64_t weights_stride,
                                                double* prob, void* alias, int32_t alias_dtype,
                                                double* probs);

/*
 * count draws from a table: out[k] (int64) for k in [0, count). Draw k uses the Philox
 * 4x32-10 block at counter (offset + k) with key seed (the low word first, as Triton's
 * tl.randint4x(seed, offset + k)): words r0, r1 give the bucket ((r0 << 32 | r1) mod N),
 * r2, r3 the float64 coin ((r2 >> 5) * 2^26 + (r3 >> 6)) / 2^53. The result depends on
 * (seed, offset + k) only: not on threads, blocks or the device.
 */
FASTIS_API fastis_status fastis_alias_draw_cpu(int64_t N, const double* prob, const void* alias,
                                               int32_t alias_dtype, int64_t count, uint64_t seed,
                                               uint64_t offset, int64_t* out,
                                               int32_t num_threads);
FASTIS_API fastis_status fastis_alias_draw_cuda(int64_t N, const double* prob,
                                                const void* alias, int32_t alias_dtype,
                                                int64_t count, uint64_t seed, uint64_t offset,
                                                int64_t* out, fastis_stream_t stream);

#ifdef __cplusplus
}
#endif

#endif /* FASTIS_H */
