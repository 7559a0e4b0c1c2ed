// Softmax cross-entropy rows on the GPU: one warp per row, each lane an online (m, s, q)
// over its columns, merged across the warp; the math is the CPU kernel's
// (kernels/cpu/softmax_xent.cpp, finish_hard). A second read of the row, by the same lanes, writes the
// gradient (so the gradient may overwrite the logits) or sums the squares for the score.
#include "device.cuh"
#include "validate.hpp"

namespace fastis {
namespace cuda {
namespace {

constexpr int kWarps = 8;  // rows per block

template <class S, class I>
__global__ void hard_kernel(fastis_xent_args a, int64_t rows) {
  using F = typename Compute<S>::type;
  const int lane = threadIdx.x & 31;
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  if (r >= rows) return;
  const int64_t C = a.C, b = r / a.T, t = r % a.T;
  const S* z = static_cast<const S*>(a.logits) + b * a.logits_stride[0] + t * a.logits_stride[1];
  const int64_t sc = a.logits_stride[2];
  S* g = a.grad ? static_cast<S*>(a.grad) + b * a.grad_stride[0] + t * a.grad_stride[1]
                : nullptr;
  const int64_t gsc = a.grad_stride[2];
  const int64_t y = static_cast<int64_t>(
      *(static_cast<const I*>(a.target) + b * a.target_stride[0] + t * a.target_stride[1]));
  F* loss = static_cast<F*>(a.loss) + r;
  F* score = static_cast<F*>(a.score) + r;
  const F nan = F(NAN);
  const F zy = (y >= 0 && y < C) ? load(z + y * sc) : nan;
  if (y == a.ignore_index || !(zy < F(INFINITY))) {
    const F fill = y == a.ignore_index ? F(0) : nan;
    if (g)
      for (int64_t c = lane; c < C; c += 32) store(g + c * gsc, fill);
    if (lane == 0) *loss = fill, *score = fill;
    return;
  }
  const F eps = static_cast<F>(a.label_smoothing), eps_c = static_cast<F>(a.label_smoothing / C);
  F m = -INFINITY, s = 0, q = 0, zsum = 0;  // over the other classes j != y
  for (int64_t c = lane; c < C; c += 32) {
    const F x = load(z + c * sc);
    zsum += x;
    if (c == y) continue;
    if (x > m) {
      const F f = m == -INFINITY ? F(0) : exp_(m - x);
      s *= f, q *= f * f, m = x;
    }
    const F e = exp_(x - m);
    s += e, q += e * e;
  }
  warp_merge(m, s, q);
  m = m == -INFINITY ? zy : m;
  const F d = zy - m, ls = log_(s);
  const F hi = ls > d ? ls : d, lo = ls > d ? d : ls;
  const F l1p = log1p_(exp_(lo - hi));
  const F log_S = hi + l1p, shift = m + log_S;
  F l = (hi - d) + l1p;
  F grad_y = -exp_(ls - log_S);
  F sc_out = exp_(F(0.5) * log_(s * s + q) - log_S);
  const bool smooth = a.label_smoothing > 0;
  if (smooth) {
    l = m + log_S - (F(1) - eps) * zy - eps_c * warp_sum(zsum);
    grad_y += eps - eps_c;
  }
  if (g || smooth) {
    const F scale = a.grad_scale ? static_cast<const F*>(a.grad_scale)[r * a.grad_scale_stride]
                                 : F(1);
    F squares = 0;
    for (int64_t c = lane; c < C; c += 32) {
      const F p = c == y ? F(0) : exp_(load(z + c * sc) - shift) - eps_c;
      squares += p * p;
      if (g) store(g + c * gsc, (c == y ? grad_y : p) * scale);
    }
    if (smooth) sc_out = sqrt_(warp_sum(squares) + grad_y * grad_y);
  }
  if (lane == 0) *loss = l, *score = sc_out;
}

template <class S>
__global__ void soft_kernel(fastis_xent_args a, int64_t rows) {
  using F = typename Compute<S>::type;
  const int lane = threadIdx.x & 31;
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  if (r >= rows) return;
  const int64_t C = a.C, b = r / a.T, t = r % a.T;
  const S* z = static_cast<const S*>(a.logits) + b * a.logits_stride[0] + t * a.logits_stride[1];
  const S* tg = static_cast<const S*>(a.target) + b * a.target_stride[0] + t * a.target_stride[1];
  const int64_t sc = a.logits_stride[2], tsc = a.target_stride[2], gsc = a.grad_stride[2];
  S* g = a.grad ? static_cast<S*>(a.grad) + b * a.grad_stride[0] + t * a.grad_stride[1]
                : nullptr;
  const F eps = static_cast<F>(a.label_smoothing), eps_c = static_cast<F>(a.label_smoothing / C);
  F m = -INFINITY, s = 0, q = 0, tsum = 0, tz = 0, zsum = 0;
  for (int64_t c = lane; c < C; c += 32) {
    const F x = load(z + c * sc), tc = load(tg + c * tsc);
    tsum += tc, tz += tc * x, zsum += x;
    if (x > m) {
      s *= m == -INFINITY ? F(0) : exp_(m - x);
      m = x;
    }
    s += exp_(x - (m == -INFINITY ? F(0) : m));
  }
  warp_merge(m, s, q);
  tsum = warp_sum(tsum), tz = warp_sum(tz), zsum = warp_sum(zsum);
  const F lse = m + log_(s);
  const bool smooth = a.label_smoothing > 0;  // (0 * a -inf sum of z would be NaN)
  const F total = smooth ? (F(1) - eps) * tsum + eps : tsum;
  const F l = total * lse - (smooth ? (F(1) - eps) * tz + eps_c * zsum : tz);
  const F scale = a.grad_scale ? static_cast<const F*>(a.grad_scale)[r * a.grad_scale_stride]
                               : F(1);
  F squares = 0;
  for (int64_t c = lane; c < C; c += 32) {
    const F d = exp_(load(z + c * sc) - lse) * total - ((F(1) - eps) * load(tg + c * tsc) + eps_c);
    squares += d * d;
    if (g) store(g + c * gsc, d * scale);
  }
  squares = warp_sum(squares);
  if (lane == 0) {
    static_cast<F*>(a.loss)[r] = l;
    static_cast<F*>(a.score)[r] = sqrt_(squares);
  }
}

template <class S>
fastis_status launch(const fastis_xent_args& a, int64_t rows, cudaStream_t stream) {
  const int64_t blocks = (rows + kWarps - 1) / kWarps;
  if (blocks > 0x7fffffff) return FASTIS_ERR_INVALID_SIZE;
  const dim3 grid(static_cast<unsigned>(blocks)), block(32 * kWarps);
  if (a.target_dtype == FASTIS_INT64)
    hard_kernel<S, int64_t><<<grid, block, 0, stream>>>(a, rows);
  else if (a.target_dtype == FASTIS_INT32)
    hard_kernel<S, int32_t><<<grid, block, 0, stream>>>(a, rows);
  else
    soft_kernel<S><<<grid, block, 0, stream>>>(a, rows);
  return launch_status();
}

}  // namespace
}  // namespace cuda
}  // namespace fastis

extern "C" fastis_status fastis_softmax_xent_cuda(const fastis_xent_args* args,
                                                  fastis_stream_t stream) {
  using namespace fastis;
  const fastis_status st = validate_xent(args);
  if (st != FASTIS_OK) return st;
  const int64_t rows = args->B * args->T;
  if (rows == 0) return FASTIS_OK;
  cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
  switch (args->logits_dtype) {
    case FASTIS_FLOAT32: return cuda::launch<float>(*args, rows, s);
    case FASTIS_FLOAT64: return cuda::launch<double>(*args, rows, s);
    case FASTIS_FLOAT16: return cuda::launch<__half>(*args, rows, s);
    case FASTIS_BFLOAT16: return cuda::launch<__nv_bfloat16>(*args, rows, s);
    default: return FASTIS_ERR_UNSUPPORTED_DTYPE;
  }
}
