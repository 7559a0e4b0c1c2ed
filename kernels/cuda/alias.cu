// Alias draws on the GPU: one thread per draw, the CPU's Philox words and pick
// (kernels/common/philox.hpp), so a draw is the same on either device.
#include "device.cuh"
#include "philox.hpp"
#include "validate.hpp"

namespace fastis {
namespace cuda {
namespace {

template <class A>
__global__ void draw_kernel(int64_t n, const double* prob, const A* alias, int64_t count,
                            uint64_t seed, uint64_t offset, int64_t* out) {
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t k = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; k < count;
       k += step) {
    const Philox4 w = philox4x32_10(seed, offset + static_cast<uint64_t>(k));
    const int64_t b = alias_bucket(w, n);
    out[k] = alias_coin(w) < prob[b] ? b : static_cast<int64_t>(alias[b]);
  }
}

}  // namespace
}  // namespace cuda
}  // namespace fastis

extern "C" fastis_status fastis_alias_draw_cuda(int64_t N, const double* prob,
                                                const void* alias, int32_t alias_dtype,
                                                int64_t count, uint64_t seed, uint64_t offset,
                                                int64_t* out, fastis_stream_t stream) {
  using namespace fastis;
  const fastis_status st = validate_alias_draw(N, prob, alias, alias_dtype, count, out);
  if (st != FASTIS_OK) return st;
  if (count == 0) return FASTIS_OK;
  cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
  const int64_t blocks = (count + 255) / 256 < 65536 ? (count + 255) / 256 : 65536;
  const unsigned grid = static_cast<unsigned>(blocks);
  if (alias_dtype == FASTIS_INT32)
    cuda::draw_kernel<<<grid, 256, 0, s>>>(N, prob, static_cast<const int32_t*>(alias), count,
                                           seed, offset, out);
  else
    cuda::draw_kernel<<<grid, 256, 0, s>>>(N, prob, static_cast<const int64_t*>(alias), count,
                                           seed, offset, out);
  return cuda::launch_status();
}
