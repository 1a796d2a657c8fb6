// Shared helpers for the distributed suites (run under mpiexec by CTest): the world communicator,
// data every rank can recompute for any other rank, and checks that say which rank failed.
#pragma once
#include <gtest/gtest.h>

#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "moecore/comm.h"
#include "moecore/tensor.h"

namespace moe::dist {

inline Communicator& world() { return *mpi_world(); }

inline uint64_t mix(uint64_t x) {  // splitmix64
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

// The i-th value of the data rank `src` makes under `salt`, as a double: a multiple of 1/64 in
// [-16, 16) (so f32/f64 hold it exactly; bf16/f16 round it deterministically).
inline double value_of(int src, uint64_t salt, int64_t i) {
  uint64_t h = mix(mix(static_cast<uint64_t>(src) * 1000003ull + salt) ^ static_cast<uint64_t>(i));
  return static_cast<double>(static_cast<int64_t>(h % 2048) - 1024) / 64.0;
}

// A tensor of `shape` and `dtype` filled from value_of (ints: the raw hash, u8: its low byte).
inline Tensor rank_data(DType dtype, const Shape& shape, int src, uint64_t salt) {
  Tensor t = Tensor::empty(shape, dtype);
  const int64_t n = t.numel();
  for (int64_t i = 0; i < n; ++i) {
    double v = value_of(src, salt, i);
    uint64_t h = mix(static_cast<uint64_t>(src) * 7919ull + salt * 104729ull + static_cast<uint64_t>(i));
    switch (dtype) {
      case DType::f32: static_cast<float*>(t.data())[i] = static_cast<float>(v); break;
      case DType::f64: static_cast<double*>(t.data())[i] = v; break;
      case DType::bf16: static_cast<bf16*>(t.data())[i] = float_to_bf16(static_cast<float>(v)); break;
      case DType::f16: static_cast<f16*>(t.data())[i] = float_to_f16(static_cast<float>(v)); break;
      case DType::i32: static_cast<int32_t*>(t.data())[i] = static_cast<int32_t>(h); break;
      case DType::i64: static_cast<int64_t*>(t.data())[i] = static_cast<int64_t>(h); break;
      case DType::u8: static_cast<uint8_t*>(t.data())[i] = static_cast<uint8_t>(h); break;
    }
  }
  return t;
}

// Rows of `parts` stacked along dim 0 (all CPU, same dtype and trailing dims).
inline Tensor concat_rows(const std::vector<Tensor>& parts, const Shape& trailing, DType dtype) {
  int64_t rows = 0;
  for (const auto& p : parts) rows += p.size(0);
  Shape shape = {rows};
  shape.insert(shape.end(), trailing.begin(), trailing.end());
  Tensor out = Tensor::empty(shape, dtype);
  size_t off = 0;
  for (const auto& p : parts) {
    if (p.nbytes()) std::memcpy(static_cast<char*>(out.data()) + off, p.data(), p.nbytes());
    off += p.nbytes();
  }
  return out;
}

// Initialises MPI, runs every test on every rank (full report on rank 0, failures elsewhere) and
// returns the worst result over the world, the same on every rank.
int run_dist_tests(int argc, char** argv);

}  // namespace moe::dist
