// Device-side helpers of the CUDA kernels: storage <-> compute conversions, warp reductions
// and the launch-status mapping.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "fastis.h"

namespace fastis {
namespace cuda {

template <class S>
struct Compute {
  using type = float;
};
template <>
struct Compute<double> {
  using type = double;
};

__device__ __forceinline__ float load(const float* p) { return *p; }
__device__ __forceinline__ double load(const double* p) { return *p; }
__device__ __forceinline__ float load(const __half* p) { return __half2float(*p); }
__device__ __forceinline__ float load(const __nv_bfloat16* p) { return __bfloat162float(*p); }

__device__ __forceinline__ void store(float* p, float v) { *p = v; }
__device__ __forceinline__ void store(double* p, double v) { *p = v; }
__device__ __forceinline__ void store(__half* p, float v) { *p = __float2half_rn(v); }
__device__ __forceinline__ void store(__nv_bfloat16* p, float v) { *p = __float2bfloat16_rn(v); }

__device__ __forceinline__ float exp_(float x) { return expf(x); }
__device__ __forceinline__ double exp_(double x) { return exp(x); }
__device__ __forceinline__ float log_(float x) { return logf(x); }
__device__ __forceinline__ double log_(double x) { return log(x); }
__device__ __forceinline__ float log1p_(float x) { return log1pf(x); }
__device__ __forceinline__ double log1p_(double x) { return log1p(x); }
__device__ __forceinline__ float sqrt_(float x) { return sqrtf(x); }
__device__ __forceinline__ double sqrt_(double x) { return sqrt(x); }

template <class F>
__device__ __forceinline__ F warp_sum(F v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Merges the lanes' online (m, s, q) (m is never NaN: a NaN logit is carried by s), relative
// to the warp's max; a lane at m = -inf holds nothing (factor 0, never exp(-inf - -inf)).
template <class F>
__device__ __forceinline__ void warp_merge(F& m, F& s, F& q) {
  for (int o = 16; o > 0; o >>= 1) {
    const F m2 = __shfl_xor_sync(0xffffffffu, m, o);
    const F s2 = __shfl_xor_sync(0xffffffffu, s, o);
    const F q2 = __shfl_xor_sync(0xffffffffu, q, o);
    const F M = m > m2 ? m : m2;
    const F a = m == -INFINITY ? F(0) : exp_(m - M);
    const F b = m2 == -INFINITY ? F(0) : exp_(m2 - M);
    s = s * a + s2 * b;
    q = q * a * a + q2 * b * b;
    m = M;
  }
}

inline fastis_status launch_status() {
  return cudaGetLastError() == cudaSuccess ? FASTIS_OK : FASTIS_ERR_CUDA;
}

}  // namespace cuda
}  // namespace fastis
