// The CUDA entry points of a library built without CUDA: they exist, so that a caller links
// against one ABI, and say FASTIS_ERR_NOT_COMPILED (fastis_has_cuda() returns 0).
#include "fastis.h"

extern "C" {

fastis_status fastis_softmax_xent_cuda(const fastis_xent_args*, fastis_stream_t) {
  return FASTIS_ERR_NOT_COMPILED;
}

fastis_status fastis_scale_rows_cuda(int64_t, int64_t, int64_t, void*, int32_t, const int64_t*,
                                     const void*, int32_t, int64_t, fastis_stream_t) {
  return FASTIS_ERR_NOT_COMPILED;
}

fastis_status fastis_alias_draw_cuda(int64_t, const double*, const void*, int32_t, int64_t,
                                     uint64_t, uint64_t, int64_t*, fastis_stream_t) {
  return FASTIS_ERR_NOT_COMPILED;
}

}  // extern "C"
