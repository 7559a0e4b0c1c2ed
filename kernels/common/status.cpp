// Version, build and status queries.
#include "fastis.h"

#define FASTIS_STR2(x) #x
#define FASTIS_STR(x) FASTIS_STR2(x)

extern "C" {

int32_t fastis_version(void) { return FASTIS_VERSION; }

const char* fastis_version_string(void) {
  return FASTIS_STR(FASTIS_VERSION_MAJOR) "." FASTIS_STR(FASTIS_VERSION_MINOR) "." FASTIS_STR(
      FASTIS_VERSION_PATCH);
}

int32_t fastis_has_cuda(void) {
#ifdef FASTIS_WITH_CUDA
  return 1;
#else
  return 0;
#endif
}

const char* fastis_status_string(int32_t status) {
  switch (status) {
    case FASTIS_OK: return "FASTIS_OK";
    case FASTIS_ERR_NULL_POINTER: return "FASTIS_ERR_NULL_POINTER";
    case FASTIS_ERR_INVALID_SIZE: return "FASTIS_ERR_INVALID_SIZE";
    case FASTIS_ERR_INVALID_STRIDE: return "FASTIS_ERR_INVALID_STRIDE";
    case FASTIS_ERR_UNSUPPORTED_DTYPE: return "FASTIS_ERR_UNSUPPORTED_DTYPE";
    case FASTIS_ERR_MISALIGNED: return "FASTIS_ERR_MISALIGNED";
    case FASTIS_ERR_INVALID_VALUE: return "FASTIS_ERR_INVALID_VALUE";
    case FASTIS_ERR_OVERLAP: return "FASTIS_ERR_OVERLAP";
    case FASTIS_ERR_OUT_OF_MEMORY: return "FASTIS_ERR_OUT_OF_MEMORY";
    case FASTIS_ERR_NOT_COMPILED: return "FASTIS_ERR_NOT_COMPILED";
    case FASTIS_ERR_NOT_IMPLEMENTED: return "FASTIS_ERR_NOT_IMPLEMENTED";
    case FASTIS_ERR_CUDA: return "FASTIS_ERR_CUDA";
    case FASTIS_ERR_INTERNAL: return "FASTIS_ERR_INTERNAL";
    default: return "unknown status";
  }
}

int64_t fastis_dtype_size(int32_t dtype) {
  switch (dtype) {
    case FASTIS_FLOAT32: return 4;
    case FASTIS_FLOAT64: return 8;
    case FASTIS_FLOAT16: return 2;
    case FASTIS_BFLOAT16: return 2;
    case FASTIS_INT32: return 4;
    case FASTIS_INT64: return 8;
    default: return 0;
  }
}

}  // extern "C"
