/* The C ABI's contract on bad arguments: a status code, and no output touched. Plain C, so
 * that the header is checked to compile as C. */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include "fastis.h"

static int failures = 0;

#define EXPECT(cond)                                                  \
  do {                                                                \
    if (!(cond)) {                                                    \
      fprintf(stderr, "%s:%d: expected %s\n", __FILE__, __LINE__, #cond); \
      ++failures;                                                     \
    }                                                                 \
  } while (0)

#define EXPECT_STATUS(call, want)                                              \
  do {                                                                         \
    fastis_status got_ = (call);                                               \
    if (got_ != (want)) {                                                      \
      fprintf(stderr, "%s:%d: %s gave %s, expected %s\n", __FILE__, __LINE__, #call, \
              fastis_status_string(got_), fastis_status_string(want));         \
      ++failures;                                                              \
    }                                                                          \
  } while (0)

enum { B = 3, C = 5 };
static float logits[B * C];
static int64_t target[B];
static float loss[B], score[B], grad[B * C];

static fastis_xent_args good_args(void) {
  fastis_xent_args a;
  memset(&a, 0, sizeof a);
  a.B = B, a.T = 1, a.C = C;
  a.logits = logits, a.logits_dtype = FASTIS_FLOAT32;
  a.logits_stride[0] = C, a.logits_stride[1] = 0, a.logits_stride[2] = 1;
  a.target = target, a.target_dtype = FASTIS_INT64;
  a.target_stride[0] = 1;
  a.ignore_index = -100;
  a.loss = loss, a.score = score;
  a.grad_stride[0] = C, a.grad_stride[2] = 1;
  return a;
}

static void reset_outputs(void) {
  for (int i = 0; i < B; ++i) loss[i] = score[i] = -7.0f;
}

static int outputs_untouched(void) {
  for (int i = 0; i < B; ++i)
    if (loss[i] != -7.0f || score[i] != -7.0f) return 0;
  return 1;
}

/* The arguments go by pointer, as the library takes them: a 184-byte struct passed by value
 * is copied into the outgoing-argument area at every call, and GCC 12 at -O3 schedules some
 * of those stores after the stack pointer has been raised past them (below the red zone),
 * which memcheck reports as an invalid write and then as uninitialised arguments. */
static void expect_xent(const fastis_xent_args* a, fastis_status want, int line) {
  reset_outputs();
  fastis_status got = fastis_softmax_xent_cpu(a, 1);
  if (got != want) {
    fprintf(stderr, "%s:%d: softmax_xent gave %s, expected %s\n", __FILE__, line,
            fastis_status_string(got), fastis_status_string(want));
    ++failures;
  }
  if (want != FASTIS_OK && !outputs_untouched()) {
    fprintf(stderr, "%s:%d: outputs written despite %s\n", __FILE__, line,
            fastis_status_string(want));
    ++failures;
  }
  if (fastis_has_cuda()) {  /* the same checks run before any CUDA call */
    if (want != FASTIS_OK) {
      got = fastis_softmax_xent_cuda(a, NULL);
      if (got != want) {
        fprintf(stderr, "%s:%d: softmax_xent_cuda gave %s, expected %s\n", __FILE__, line,
                fastis_status_string(got), fastis_status_string(want));
        ++failures;
      }
    }
  } else {
    EXPECT(fastis_softmax_xent_cuda(a, NULL) == FASTIS_ERR_NOT_COMPILED);
  }
}
#define XENT(a, want) expect_xent(&(a), (want), __LINE__)

static void test_queries(void) {
  EXPECT(fastis_version() == FASTIS_VERSION);
  EXPECT(strcmp(fastis_version_string(), "0.3.0") == 0);
  EXPECT(strcmp(fastis_status_string(FASTIS_OK), "FASTIS_OK") == 0);
  for (int s = 1; s <= FASTIS_ERR_INTERNAL; ++s)
    EXPECT(strncmp(fastis_status_string(s), "FASTIS_ERR_", 11) == 0);
  EXPECT(strcmp(fastis_status_string(-1), "unknown status") == 0);
  EXPECT(strcmp(fastis_status_string(1000), "unknown status") == 0);
  EXPECT(fastis_dtype_size(FASTIS_BFLOAT16) == 2 && fastis_dtype_size(FASTIS_INT64) == 8);
  EXPECT(fastis_dtype_size(42) == 0);
}

static void test_xent_errors(void) {
  for (int i = 0; i < B * C; ++i) logits[i] = 0.1f * (float)i;
  for (int i = 0; i < B; ++i) target[i] = i;
  fastis_xent_args a = good_args();
  XENT(a, FASTIS_OK);
  EXPECT(loss[0] > 0.0f && score[0] > 0.0f);

  EXPECT_STATUS(fastis_softmax_xent_cpu(NULL, 0), FASTIS_ERR_NULL_POINTER);
  a = good_args(), a.logits = NULL, XENT(a, FASTIS_ERR_NULL_POINTER);
  a = good_args(), a.target = NULL, XENT(a, FASTIS_ERR_NULL_POINTER);
  a = good_args(), a.loss = NULL, XENT(a, FASTIS_ERR_NULL_POINTER);
  a = good_args(), a.score = NULL, XENT(a, FASTIS_ERR_NULL_POINTER);
  /* sizes */
  a = good_args(), a.B = -1, XENT(a, FASTIS_ERR_INVALID_SIZE);
  a = good_args(), a.T = -2, XENT(a, FASTIS_ERR_INVALID_SIZE);
  a = good_args(), a.C = -5, XENT(a, FASTIS_ERR_INVALID_SIZE);
  a = good_args(), a.C = 0, XENT(a, FASTIS_ERR_INVALID_SIZE);
  a = good_args(), a.B = INT64_MAX / 2, a.T = 3, XENT(a, FASTIS_ERR_INVALID_SIZE);
  a = good_args(), a.B = INT64_MAX / 4, a.C = 8, XENT(a, FASTIS_ERR_INVALID_SIZE);
  /* strides: negative, offsets past int64 */
  a = good_args(), a.logits_stride[2] = -1, XENT(a, FASTIS_ERR_INVALID_STRIDE);
  a = good_args(), a.logits_stride[0] = -5, XENT(a, FASTIS_ERR_INVALID_STRIDE);
  a = good_args(), a.target_stride[0] = -1, XENT(a, FASTIS_ERR_INVALID_STRIDE);
  a = good_args(), a.logits_stride[0] = INT64_MAX / 2, XENT(a, FASTIS_ERR_INVALID_SIZE);
  a = good_args(), a.logits_stride[2] = INT64_MAX / 16, XENT(a, FASTIS_ERR_INVALID_SIZE);
  /* dtypes */
  a = good_args(), a.logits_dtype = FASTIS_INT32, XENT(a, FASTIS_ERR_UNSUPPORTED_DTYPE);
  a = good_args(), a.logits_dtype = 77, XENT(a, FASTIS_ERR_UNSUPPORTED_DTYPE);
  a = good_args(), a.target_dtype = -3, XENT(a, FASTIS_ERR_UNSUPPORTED_DTYPE);
  a = good_args(), a.target_dtype = FASTIS_FLOAT64, XENT(a, FASTIS_ERR_UNSUPPORTED_DTYPE);
  /* misaligned pointers */
  a = good_args(), a.logits = (const char*)logits + 2, XENT(a, FASTIS_ERR_MISALIGNED);
  a = good_args(), a.target = (const char*)target + 4, XENT(a, FASTIS_ERR_MISALIGNED);
  a = good_args(), a.loss = (char*)loss + 1, XENT(a, FASTIS_ERR_MISALIGNED);
  /* values */
  a = good_args(), a.label_smoothing = -0.1, XENT(a, FASTIS_ERR_INVALID_VALUE);
  a = good_args(), a.label_smoothing = 1.5, XENT(a, FASTIS_ERR_INVALID_VALUE);
  a = good_args(), a.label_smoothing = NAN, XENT(a, FASTIS_ERR_INVALID_VALUE);
  /* outputs: gradient overlapping itself, or the logits other than exactly */
  a = good_args(), a.grad = grad, XENT(a, FASTIS_OK);
  a = good_args(), a.grad = logits, XENT(a, FASTIS_OK);
  /* in place: the stride of the size-1 dimension T is never used, so it may differ */
  a = good_args(), a.grad = logits, a.grad_stride[1] = 12345, XENT(a, FASTIS_OK);
  for (int i = 0; i < B * C; ++i) logits[i] = 0.1f * (float)i;
  a = good_args(), a.grad = grad, a.grad_stride[2] = 0, XENT(a, FASTIS_ERR_INVALID_STRIDE);
  a = good_args(), a.grad = grad, a.grad_stride[0] = 2, XENT(a, FASTIS_ERR_INVALID_STRIDE);
  a = good_args(), a.grad = logits + 1, XENT(a, FASTIS_ERR_OVERLAP);
  {  /* strided gradient rows: row r at 9 r or 8 r, columns 2 apart (the latter collide) */
    static float wide[B * 2 * C];
    a = good_args(), a.grad = wide, a.grad_stride[0] = 2 * C - 1, a.grad_stride[2] = 2;
    XENT(a, FASTIS_OK);
    a.grad_stride[0] = 2 * C - 2, XENT(a, FASTIS_ERR_INVALID_STRIDE);
  }
  a = good_args(), a.grad = logits, a.grad_stride[0] = 1, a.grad_stride[2] = B,
  XENT(a, FASTIS_ERR_OVERLAP);
  a = good_args(), a.loss = score, XENT(a, FASTIS_ERR_OVERLAP);
  a = good_args(), a.loss = logits, XENT(a, FASTIS_ERR_OVERLAP);
  a = good_args(), a.grad = grad, a.grad_scale = grad, XENT(a, FASTIS_ERR_OVERLAP);
  a = good_args(), a.grad_scale = score, a.grad_scale_stride = -1,
  XENT(a, FASTIS_ERR_INVALID_STRIDE);
  /* empty batch: checked, then nothing to do */
  a = good_args(), a.B = 0, XENT(a, FASTIS_OK);
}

static void test_scale_rows_errors(void) {
  const int64_t st[3] = {C, 0, 1}, bad[3] = {C, 0, -1}, zero[3] = {0, 0, 1};
  float s[B] = {1.0f, 2.0f, 0.5f};
  EXPECT_STATUS(fastis_scale_rows_cpu(B, 1, C, grad, FASTIS_FLOAT32, st, s, FASTIS_FLOAT32, 1, 1),
                FASTIS_OK);
  EXPECT_STATUS(fastis_scale_rows_cpu(B, 1, C, NULL, FASTIS_FLOAT32, st, s, FASTIS_FLOAT32, 1, 1),
                FASTIS_ERR_NULL_POINTER);
  EXPECT_STATUS(fastis_scale_rows_cpu(B, 1, C, grad, FASTIS_FLOAT32, NULL, s, FASTIS_FLOAT32, 1,
                                      1), FASTIS_ERR_NULL_POINTER);
  EXPECT_STATUS(fastis_scale_rows_cpu(B, 1, C, grad, FASTIS_FLOAT32, st, NULL, FASTIS_FLOAT32, 1,
                                      1), FASTIS_ERR_NULL_POINTER);
  EXPECT_STATUS(fastis_scale_rows_cpu(-B, 1, C, grad, FASTIS_FLOAT32, st, s, FASTIS_FLOAT32, 1, 1),
                FASTIS_ERR_INVALID_SIZE);
  EXPECT_STATUS(fastis_scale_rows_cpu(B, 1, C, grad, FASTIS_INT64, st, s, FASTIS_FLOAT32, 1, 1),
                FASTIS_ERR_UNSUPPORTED_DTYPE);
  EXPECT_STATUS(fastis_scale_rows_cpu(B, 1, C, grad, FASTIS_FLOAT32, st, s, FASTIS_FLOAT16, 1, 1),
                FASTIS_ERR_UNSUPPORTED_DTYPE);
  EXPECT_STATUS(fastis_scale_rows_cpu(B, 1, C, grad, FASTIS_FLOAT32, bad, s, FASTIS_FLOAT32, 1, 1),
                FASTIS_ERR_INVALID_STRIDE);
  EXPECT_STATUS(fastis_scale_rows_cpu(B, 1, C, grad, FASTIS_FLOAT32, zero, s, FASTIS_FLOAT32, 1,
                                      1), FASTIS_ERR_INVALID_STRIDE);
  EXPECT_STATUS(fastis_scale_rows_cpu(B, 1, C, grad, FASTIS_FLOAT32, st, s, FASTIS_FLOAT32, -1,
                                      1), FASTIS_ERR_INVALID_STRIDE);
  EXPECT_STATUS(fastis_scale_rows_cpu(B, 1, C, grad, FASTIS_FLOAT32, st, grad + 2, FASTIS_FLOAT32,
                                      1, 1), FASTIS_ERR_OVERLAP);
  EXPECT_STATUS(fastis_scale_rows_cpu(B, 1, C, (char*)grad + 2, FASTIS_FLOAT32, st, s,
                                      FASTIS_FLOAT32, 1, 1), FASTIS_ERR_MISALIGNED);
}

static void test_alias_errors(void) {
  double w[4] = {1.0, 0.0, 3.0, 2.0}, prob[4], probs[4];
  int32_t alias[4];
  int64_t out[8];
  EXPECT_STATUS(fastis_alias_build_cpu(4, w, FASTIS_FLOAT64, 1, prob, alias, FASTIS_INT32, probs),
                FASTIS_OK);
  EXPECT_STATUS(fastis_alias_build_cpu(0, w, FASTIS_FLOAT64, 1, prob, alias, FASTIS_INT32, probs),
                FASTIS_ERR_INVALID_SIZE);
  EXPECT_STATUS(fastis_alias_build_cpu(-4, w, FASTIS_FLOAT64, 1, prob, alias, FASTIS_INT32,
                                       probs), FASTIS_ERR_INVALID_SIZE);
  EXPECT_STATUS(fastis_alias_build_cpu(4, NULL, FASTIS_FLOAT64, 1, prob, alias, FASTIS_INT32,
                                       probs), FASTIS_ERR_NULL_POINTER);
  EXPECT_STATUS(fastis_alias_build_cpu(4, w, FASTIS_FLOAT64, 1, NULL, alias, FASTIS_INT32, probs),
                FASTIS_ERR_NULL_POINTER);
  EXPECT_STATUS(fastis_alias_build_cpu(4, w, FASTIS_FLOAT64, 1, prob, alias, FASTIS_INT32, NULL),
                FASTIS_ERR_NULL_POINTER);
  EXPECT_STATUS(fastis_alias_build_cpu(4, w, FASTIS_INT64, 1, prob, alias, FASTIS_INT32, probs),
                FASTIS_ERR_UNSUPPORTED_DTYPE);
  EXPECT_STATUS(fastis_alias_build_cpu(4, w, FASTIS_FLOAT64, 1, prob, alias, FASTIS_FLOAT32,
                                       probs), FASTIS_ERR_UNSUPPORTED_DTYPE);
  EXPECT_STATUS(fastis_alias_build_cpu((int64_t)1 << 40, w, FASTIS_FLOAT64, 0, prob, alias,
                                       FASTIS_INT32, probs), FASTIS_ERR_UNSUPPORTED_DTYPE);
  EXPECT_STATUS(fastis_alias_build_cpu(4, w, FASTIS_FLOAT64, -1, prob, alias, FASTIS_INT32,
                                       probs), FASTIS_ERR_INVALID_STRIDE);
  EXPECT_STATUS(fastis_alias_build_cpu(4, w, FASTIS_FLOAT64, INT64_MAX / 4, prob, alias,
                                       FASTIS_INT32, probs), FASTIS_ERR_INVALID_SIZE);
  EXPECT_STATUS(fastis_alias_build_cpu(4, (char*)w + 4, FASTIS_FLOAT64, 1, prob, alias,
                                       FASTIS_INT32, probs), FASTIS_ERR_MISALIGNED);
  EXPECT_STATUS(fastis_alias_build_cpu(4, w, FASTIS_FLOAT64, 1, prob, alias, FASTIS_INT32,
                                       prob + 1), FASTIS_ERR_OVERLAP);
  /* bad weights: nothing written */
  const double bad_values[4] = {-1.0, NAN, INFINITY, 0.0};
  for (int k = 0; k < 4; ++k) {
    double v[4] = {1.0, 2.0, 3.0, 4.0};
    if (k < 3) v[2] = bad_values[k];
    else v[0] = v[1] = v[2] = v[3] = 0.0;
    for (int i = 0; i < 4; ++i) prob[i] = probs[i] = -7.0, alias[i] = -7;
    EXPECT_STATUS(fastis_alias_build_cpu(4, v, FASTIS_FLOAT64, 1, prob, alias, FASTIS_INT32,
                                         probs), FASTIS_ERR_INVALID_VALUE);
    for (int i = 0; i < 4; ++i) EXPECT(prob[i] == -7.0 && probs[i] == -7.0 && alias[i] == -7);
  }
  double huge[2] = {1.7e308, 1.7e308};
  EXPECT_STATUS(fastis_alias_build_cpu(2, huge, FASTIS_FLOAT64, 1, prob, alias, FASTIS_INT32,
                                       probs), FASTIS_ERR_INVALID_VALUE);

  EXPECT_STATUS(fastis_alias_build_cpu(4, w, FASTIS_FLOAT64, 1, prob, alias, FASTIS_INT32, probs),
                FASTIS_OK);
  EXPECT_STATUS(fastis_alias_draw_cpu(4, prob, alias, FASTIS_INT32, 8, 1, 0, out, 1), FASTIS_OK);
  for (int k = 0; k < 8; ++k) EXPECT(out[k] >= 0 && out[k] < 4 && out[k] != 1);
  EXPECT_STATUS(fastis_alias_draw_cpu(0, prob, alias, FASTIS_INT32, 8, 1, 0, out, 1),
                FASTIS_ERR_INVALID_SIZE);
  EXPECT_STATUS(fastis_alias_draw_cpu(4, prob, alias, FASTIS_INT32, -8, 1, 0, out, 1),
                FASTIS_ERR_INVALID_SIZE);
  EXPECT_STATUS(fastis_alias_draw_cpu(4, NULL, alias, FASTIS_INT32, 8, 1, 0, out, 1),
                FASTIS_ERR_NULL_POINTER);
  EXPECT_STATUS(fastis_alias_draw_cpu(4, prob, NULL, FASTIS_INT32, 8, 1, 0, out, 1),
                FASTIS_ERR_NULL_POINTER);
  EXPECT_STATUS(fastis_alias_draw_cpu(4, prob, alias, FASTIS_INT32, 8, 1, 0, NULL, 1),
                FASTIS_ERR_NULL_POINTER);
  EXPECT_STATUS(fastis_alias_draw_cpu(4, prob, alias, FASTIS_FLOAT64, 8, 1, 0, out, 1),
                FASTIS_ERR_UNSUPPORTED_DTYPE);
  EXPECT_STATUS(fastis_alias_draw_cpu(4, prob, alias, FASTIS_INT32, INT64_MAX / 4, 1, 0, out, 1),
                FASTIS_ERR_INVALID_SIZE);
  EXPECT_STATUS(fastis_alias_draw_cpu(4, prob, alias, FASTIS_INT32, 2, 1, 0, (int64_t*)prob, 1),
                FASTIS_ERR_OVERLAP);
  if (fastis_has_cuda()) {
    EXPECT_STATUS(fastis_alias_draw_cuda(4, prob, alias, FASTIS_INT32, 8, 1, 0, NULL, NULL),
                  FASTIS_ERR_NULL_POINTER);
  } else {
    EXPECT_STATUS(fastis_alias_draw_cuda(4, prob, alias, FASTIS_INT32, 8, 1, 0, out, NULL),
                  FASTIS_ERR_NOT_COMPILED);
  }
}

/* fastis_xent_loss_cpu: its refusals, and its outputs against fastis_softmax_xent_cpu's rows. */
static void test_xent_loss(void) {
  for (int i = 0; i < B * C; ++i) logits[i] = (float)((i * 7) % 11) * 0.3f - 1.0f;
  target[0] = 4, target[1] = -100, target[2] = 0;
  float weight[B] = {0.5f, 2.0f, 1.5f}, total = -7.0f;
  float plain_loss[B], plain_grad[B * C];
  fastis_xent_args rows = good_args();
  rows.grad = plain_grad;
  EXPECT_STATUS(fastis_softmax_xent_cpu(&rows, 1), FASTIS_OK);
  memcpy(plain_loss, loss, sizeof loss);

  fastis_xent_loss_args a;
  memset(&a, 0, sizeof a);
  a.rows = good_args();
  a.rows.grad = grad;
  a.weight = weight, a.weight_stride[0] = 1;
  a.reduction = FASTIS_REDUCTION_MEAN, a.total = &total;
  fastis_xent_loss_info info;
  EXPECT_STATUS(fastis_xent_loss_cpu(&a, 1, &info), FASTIS_OK);
  EXPECT(info.counted == 2 && info.out_of_range == 0 && info.bad_weight == -1);
  double want = (0.5 * plain_loss[0] + 1.5 * plain_loss[2]) / 2;
  EXPECT(fabs(total - want) <= 1e-6 * fabs(want));
  for (int i = 0; i < B; ++i) EXPECT(loss[i] == plain_loss[i]);
  for (int k = 0; k < C; ++k) {
    EXPECT(fabsf(grad[k] - 0.25f * plain_grad[k]) <= 1e-7f);
    EXPECT(grad[C + k] == 0.0f);
    EXPECT(fabsf(grad[2 * C + k] - 0.75f * plain_grad[2 * C + k]) <= 1e-7f);
  }
  /* one weight per sequence: rows (b, t) of a [1, 3] batch share weight[0] */
  a.rows.B = 1, a.rows.T = B;
  a.rows.logits_stride[0] = 0, a.rows.logits_stride[1] = C;
  a.rows.target_stride[0] = 0, a.rows.target_stride[1] = 1;
  a.rows.grad_stride[0] = 0, a.rows.grad_stride[1] = C;
  a.weight_stride[0] = 1, a.weight_stride[1] = 0;
  a.reduction = FASTIS_REDUCTION_SUM;
  EXPECT_STATUS(fastis_xent_loss_cpu(&a, 1, &info), FASTIS_OK);
  want = 0.5 * (plain_loss[0] + plain_loss[2]);
  EXPECT(fabs(total - want) <= 1e-6 * fabs(want));
  a = (fastis_xent_loss_args){0};
  a.rows = good_args();
  a.reduction = FASTIS_REDUCTION_MEAN, a.total = &total;

  /* refusals: nothing written */
  float bad_values[3] = {-1.0f, NAN, INFINITY};
  for (int k = 0; k < 3; ++k) {
    float w[B] = {1.0f, 1.0f, 1.0f};
    w[2] = bad_values[k];
    a.weight = w, a.weight_stride[0] = 1;
    reset_outputs();
    total = -7.0f;
    EXPECT_STATUS(fastis_xent_loss_cpu(&a, 1, &info), FASTIS_ERR_INVALID_VALUE);
    EXPECT(info.bad_weight == 2 && outputs_untouched() && total == -7.0f);
  }
  a.weight = weight;
  EXPECT_STATUS(fastis_xent_loss_cpu(&a, 1, NULL), FASTIS_ERR_NULL_POINTER);
  EXPECT_STATUS(fastis_xent_loss_cpu(NULL, 1, &info), FASTIS_ERR_NULL_POINTER);
  a.total = NULL;
  EXPECT_STATUS(fastis_xent_loss_cpu(&a, 1, &info), FASTIS_ERR_NULL_POINTER);
  a.total = &total, a.reduction = 3;
  EXPECT_STATUS(fastis_xent_loss_cpu(&a, 1, &info), FASTIS_ERR_INVALID_VALUE);
  a.reduction = FASTIS_REDUCTION_SUM, a.rows.grad_scale = weight;
  EXPECT_STATUS(fastis_xent_loss_cpu(&a, 1, &info), FASTIS_ERR_INVALID_VALUE);
  a.rows.grad_scale = NULL, a.weight = loss;
  EXPECT_STATUS(fastis_xent_loss_cpu(&a, 1, &info), FASTIS_ERR_OVERLAP);
  a.weight = weight, a.total = &score[1];
  EXPECT_STATUS(fastis_xent_loss_cpu(&a, 1, &info), FASTIS_ERR_OVERLAP);
  a.total = &total, a.weight = (const char*)weight + 1;
  EXPECT_STATUS(fastis_xent_loss_cpu(&a, 1, &info), FASTIS_ERR_MISALIGNED);
  a.weight = weight, a.weight_stride[0] = -1;
  EXPECT_STATUS(fastis_xent_loss_cpu(&a, 1, &info), FASTIS_ERR_INVALID_STRIDE);
  a.weight_stride[0] = 1, a.rows.target = logits, a.rows.target_dtype = FASTIS_FLOAT32;
  a.rows.target_stride[2] = 1;
  EXPECT_STATUS(fastis_xent_loss_cpu(&a, 1, &info), FASTIS_ERR_UNSUPPORTED_DTYPE);
  a.rows = good_args();
  a.rows.B = -1;
  EXPECT_STATUS(fastis_xent_loss_cpu(&a, 1, &info), FASTIS_ERR_INVALID_SIZE);
  /* a class index out of range is counted, not refused */
  a.rows = good_args();
  target[1] = 9;
  EXPECT_STATUS(fastis_xent_loss_cpu(&a, 1, &info), FASTIS_OK);
  EXPECT(info.out_of_range == 1 && info.counted == 3 && isnan(loss[1]) && isnan(total));
  target[1] = 1;
}

int main(void) {
  test_queries();
  test_xent_errors();
  test_scale_rows_errors();
  test_alias_errors();
  test_xent_loss();
  if (failures) fprintf(stderr, "%d failure(s)\n", failures);
  else printf("test_abi: all passed\n");
  return failures ? 1 : 0;
}
