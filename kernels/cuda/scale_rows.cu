// grad[r, :] *= scale[r] in place on the GPU (rows whose factor is exactly 1 untouched): one
// thread per element, grid-stride.
#include "device.cuh"
#include "validate.hpp"

namespace fastis {
namespace cuda {
namespace {

template <class S, class Scale>
__global__ void scale_kernel(int64_t T, int64_t C, int64_t numel, S* grad, int64_t sb,
                             int64_t st, int64_t sc, const Scale* scale, int64_t ss) {
  using F = typename Compute<S>::type;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < numel;
       i += step) {
    const int64_t r = i / C, c = i % C;
    const F f = static_cast<F>(scale[r * ss]);
    if (f == F(1)) continue;
    S* p = grad + (r / T) * sb + (r % T) * st + c * sc;
    store(p, load(p) * f);
  }
}

template <class S, class Scale>
fastis_status launch(int64_t B, int64_t T, int64_t C, void* grad, const int64_t* st,
                     const void* scale, int64_t ss, cudaStream_t stream) {
  const int64_t numel = B * T * C;
  const int64_t blocks = (numel + 255) / 256 < 65536 ? (numel + 255) / 256 : 65536;
  scale_kernel<S, Scale><<<static_cast<unsigned>(blocks), 256, 0, stream>>>(
      T, C, numel, static_cast<S*>(grad), st[0], st[1], st[2], static_cast<const Scale*>(scale),
      ss);
  return launch_status();
}

template <class Scale>
fastis_status dispatch(int64_t B, int64_t T, int64_t C, void* grad, int32_t dtype,
                       const int64_t* st, const void* scale, int64_t ss, cudaStream_t s) {
  switch (dtype) {
    case FASTIS_FLOAT32: return launch<float, Scale>(B, T, C, grad, st, scale, ss, s);
    case FASTIS_FLOAT64: return launch<double, Scale>(B, T, C, grad, st, scale, ss, s);
    case FASTIS_FLOAT16: return launch<__half, Scale>(B, T, C, grad, st, scale, ss, s);
    default: return launch<__nv_bfloat16, Scale>(B, T, C, grad, st, scale, ss, s);
  }
}

}  // namespace
}  // namespace cuda
}  // namespace fastis

extern "C" fastis_status fastis_scale_rows_cuda(int64_t B, int64_t T, int64_t C, void* grad,
                                                int32_t grad_dtype,
                                                const int64_t grad_stride[3],
                                                const void* scale, int32_t scale_dtype,
                                                int64_t scale_stride, fastis_stream_t stream) {
  using namespace fastis;
  const fastis_status st = validate_scale_rows(B, T, C, grad, grad_dtype, grad_stride, scale,
                                               scale_dtype, scale_stride);
  if (st != FASTIS_OK) return st;
  if (B * T * C == 0) return FASTIS_OK;
  cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
  if (scale_dtype == FASTIS_FLOAT32)
    return cuda::dispatch<float>(B, T, C, grad, grad_dtype, grad_stride, scale, scale_stride, s);
  return cuda::dispatch<double>(B, T, C, grad, grad_dtype, grad_stride, scale, scale_stride, s);
}
