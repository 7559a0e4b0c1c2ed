// Philox 4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC 2011),
// the counter-based generator of Triton's tl.randint4x and of the draws here: the same
// (key, counter) gives the same four words on every device and thread.
#pragma once

#include <stdint.h>

#if defined(__CUDACC__)
#define FASTIS_HD __host__ __device__ __forceinline__
#else
#define FASTIS_HD inline
#endif

namespace fastis {

struct Philox4 {
  uint32_t r[4];
};

FASTIS_HD uint32_t mulhi32(uint32_t a, uint32_t b) {
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
}

// Counter (c0, c1, 0, 0) = (lo, hi) of a 64-bit counter, key (k0, k1) = (lo, hi) of the seed.
FASTIS_HD Philox4 philox4x32_10(uint64_t seed, uint64_t counter) {
  uint32_t c0 = static_cast<uint32_t>(counter), c1 = static_cast<uint32_t>(counter >> 32);
  uint32_t c2 = 0, c3 = 0;
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int round = 0; round < 10; ++round) {
    const uint32_t a0 = c0, a2 = c2;
    c0 = mulhi32(0xCD9E8D57u, a2) ^ c1 ^ k0;
    c2 = mulhi32(0xD2511F53u, a0) ^ c3 ^ k1;
    c1 = 0xCD9E8D57u * a2;
    c3 = 0xD2511F53u * a0;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return Philox4{{c0, c1, c2, c3}};
}

// One alias draw from the four words: 64 bits pick the bucket (modulo bias <= N / 2^64),
// 53 bits make the float64 coin in [0, 1).
FASTIS_HD int64_t alias_bucket(const Philox4& w, int64_t n) {
  const uint64_t bits = (static_cast<uint64_t>(w.r[0]) << 32) | w.r[1];
  return static_cast<int64_t>(bits % static_cast<uint64_t>(n));
}

FASTIS_HD double alias_coin(const Philox4& w) {
  return (static_cast<double>(w.r[2] >> 5) * 67108864.0 + static_cast<double>(w.r[3] >> 6)) *
         (1.0 / 9007199254740992.0);
}

}  // namespace fastis
