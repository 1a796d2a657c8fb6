// libmoecore — counter-based random numbers shared by every backend.
// A pure function of (key, index): the same bits on the CPU and the GPU, so recomputation and a
// change of backend reproduce jitter exactly. SplitMix64 finaliser over key ^ index·golden.
#pragma once
#include <cstdint>

#if defined(__CUDACC__)
#define MOE_HD __host__ __device__ __forceinline__
#else
#define MOE_HD inline
#endif

namespace moe::rng {

MOE_HD uint64_t mix64(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}

// The key of one (seed, step, layer, micro-batch, stream) draw.
MOE_HD uint64_t make_key(uint64_t seed, uint64_t step, uint64_t layer, uint64_t microbatch,
                         uint64_t stream = 0) {
  uint64_t k = mix64(seed + 0x9e3779b97f4a7c15ULL);
  k = mix64(k ^ (step + 0x632be59bd9b4e019ULL));
  k = mix64(k ^ (layer + 0x85157af5ULL));
  k = mix64(k ^ (microbatch + 0x2545f4914f6cdd1dULL));
  return mix64(k ^ stream);
}

// Uniform in [0, 1) with 24 random bits (exact in float and double).
MOE_HD double uniform01(uint64_t key, uint64_t index) {
  uint64_t r = mix64(key ^ (index * 0x9e3779b97f4a7c15ULL + 0xd1b54a32d192ed03ULL));
  return static_cast<double>(r >> 40) * (1.0 / 16777216.0);
}

}  // namespace moe::rng
