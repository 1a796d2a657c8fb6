// The CUDA backend itself: device and name, the caching allocator's counters, pinned host memory,
// copies in every direction, streams and events ordering work, and the error paths (absurd
// allocations, CUDA runtime failures, invalid arguments). Runs only with a GPU: main() exits 77
// otherwise (tests/common/gpu_test_main.cpp).
#include <gtest/gtest.h>

#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "common/test_util.h"
#include "device/ops.h"
#include "kernels/common/rng.h"
#include "moecore/backend.h"
#if MOE_HAVE_CUDA
#include "device/cuda/cuda_backend.h"
#endif

using namespace moe;

namespace {

Device gpu() { return Device::cuda(0); }
Backend& gb() { return get_backend(gpu()); }

bool contains(const std::string& s, const std::string& what) { return s.find(what) != std::string::npos; }

std::vector<float> iota_f32(size_t n, float scale = 1.0f) {
  std::vector<float> v(n);
  for (size_t i = 0; i < n; ++i) v[i] = scale * static_cast<float>(i) - 3.0f;
  return v;
}

}  // namespace

TEST(CudaBackend, DeviceAndName) {
  ASSERT_TRUE(backend_available(DeviceType::cuda));
  Backend& b = gb();
  EXPECT_EQ(b.type(), DeviceType::cuda);
  EXPECT_EQ(b.device(), gpu());
  EXPECT_EQ(b.name().rfind("cuda:0 ", 0), 0u) << b.name();
  bool listed = false;
  for (const Device& d : available_devices()) listed = listed || d == gpu();
  EXPECT_TRUE(listed);
  EXPECT_TRUE(contains(build_info(), "cuda")) << build_info();
#if MOE_HAVE_CUDA
  EXPECT_GE(cuda_device_count(), 1);
  EXPECT_THROW(make_cuda_backend(cuda_device_count()), Error);
  EXPECT_THROW(make_cuda_backend(-1), Error);
#endif
}

TEST(CudaBackend, AllocatorCountsCurrentPeakAndCached) {
  Backend& b = gb();
  b.synchronize();
  b.reset_peak_memory();
  const MemoryStats s0 = b.memory_stats();
  const size_t bytes = 3 * 1000 * 1000 + 7;  // not a multiple of any bucket step
  void* p = b.allocate(bytes, MemoryKind::device);
  ASSERT_NE(p, nullptr);
  const MemoryStats s1 = b.memory_stats();
  EXPECT_EQ(s1.current_bytes, s0.current_bytes + static_cast<int64_t>(bytes));
  EXPECT_EQ(s1.peak_bytes, s1.current_bytes);
  EXPECT_EQ(s1.num_allocs, s0.num_allocs + 1);
  EXPECT_EQ(s1.pinned_current_bytes, s0.pinned_current_bytes);
  b.deallocate(p, bytes, MemoryKind::device);
  const MemoryStats s2 = b.memory_stats();
  EXPECT_EQ(s2.current_bytes, s0.current_bytes);
  EXPECT_EQ(s2.peak_bytes, s1.current_bytes);  // the peak remembers
  EXPECT_GE(s2.cached_bytes, s1.cached_bytes + static_cast<int64_t>(bytes));  // the block went to the cache
  // The same size on the same stream reuses the cached block (the most recently freed one).
  void* q = b.allocate(bytes, MemoryKind::device);
  EXPECT_EQ(q, p);
  EXPECT_EQ(b.memory_stats().cached_bytes, s1.cached_bytes);
  b.deallocate(q, bytes, MemoryKind::device);
  // Tensors count their bytes while alive.
  {
    Tensor t = Tensor::empty({1024}, DType::f32, gpu());
    EXPECT_EQ(b.memory_stats().current_bytes, s0.current_bytes + 4096);
    Tensor u = Tensor::empty({256}, DType::f64, gpu());
    EXPECT_EQ(b.memory_stats().current_bytes, s0.current_bytes + 4096 + 2048);
  }
  EXPECT_EQ(b.memory_stats().current_bytes, s0.current_bytes);
  b.reset_peak_memory();
  EXPECT_EQ(b.memory_stats().peak_bytes, s0.current_bytes);
  // Zero-byte tensors allocate nothing.
  Tensor z = Tensor::empty({0, 5}, DType::f32, gpu());
  EXPECT_EQ(b.memory_stats().current_bytes, s0.current_bytes);
}

TEST(CudaBackend, PinnedHostMemory) {
  Backend& b = gb();
  const MemoryStats s0 = b.memory_stats();
  Tensor h = Tensor::empty({256}, DType::f32, gpu(), MemoryKind::pinned_host);
  EXPECT_EQ(b.memory_stats().pinned_current_bytes, s0.pinned_current_bytes + 1024);
  EXPECT_EQ(b.memory_stats().current_bytes, s0.current_bytes);
  EXPECT_EQ(h.memory_kind(), MemoryKind::pinned_host);
  // Pinned memory is host-addressable.
  std::vector<float> v = iota_f32(256, 0.5f);
  std::memcpy(h.data(), v.data(), 1024);
  Tensor d = h.to(gpu());                            // pinned -> device
  Tensor back = d.to(gpu(), MemoryKind::pinned_host);  // device -> pinned (synchronised)
  EXPECT_EQ(std::memcmp(back.data(), v.data(), 1024), 0);
  EXPECT_EQ(back.to_vector<float>(), v);              // pinned -> pageable host
  Tensor h2 = h.clone();                              // pinned -> pinned
  EXPECT_EQ(std::memcmp(h2.data(), v.data(), 1024), 0);
  h2.zero_();
  EXPECT_EQ(h2.to_vector<float>(), std::vector<float>(256, 0.0f));
  EXPECT_GE(b.memory_stats().pinned_peak_bytes, s0.pinned_current_bytes + 3 * 1024);  // h, back, h2 alive together
}

TEST(CudaBackend, CopiesEveryDirection) {
  for (size_t n : {size_t{1}, size_t{3}, size_t{1000}, size_t{1} << 20}) {
    SCOPED_TRACE("n = " + std::to_string(n));
    std::vector<float> v = iota_f32(n, 0.25f);
    Tensor d = Tensor::from_vector(v, {static_cast<int64_t>(n)}, gpu());  // H2D
    Tensor d2 = d.clone();                                               // D2D
    d.zero_();                                                           // memset on the stream
    EXPECT_EQ(d2.to_vector<float>(), v);                                 // D2H
    EXPECT_EQ(d.to_vector<float>(), std::vector<float>(n, 0.0f));
    Tensor c = Tensor::empty({static_cast<int64_t>(n)}, DType::f32);
    c.copy_from(d2);  // device -> CPU tensor
    EXPECT_EQ(c.to_vector<float>(), v);
    d.copy_from(c);  // CPU tensor -> device
    EXPECT_EQ(d.to_vector<float>(), v);
  }
  // Views: rows of a device tensor copy at their byte offset.
  std::vector<float> m = iota_f32(70);
  Tensor t = Tensor::from_vector(m, {10, 7}, gpu());
  Tensor rows = t.narrow(3, 4).clone();
  EXPECT_EQ(rows.to_vector<float>(), std::vector<float>(m.begin() + 21, m.begin() + 49));
  Tensor dst = Tensor::zeros({10, 7}, DType::f32, gpu());
  Tensor dst_rows = dst.narrow(6, 4);
  dst_rows.copy_from(rows);
  std::vector<float> expect(70, 0.0f);
  std::copy(m.begin() + 21, m.begin() + 49, expect.begin() + 42);
  EXPECT_EQ(dst.to_vector<float>(), expect);
  // Odd byte counts (u8).
  std::vector<uint8_t> bytes = {1, 2, 3, 4, 5};
  EXPECT_EQ(Tensor::from_vector(bytes, {5}, gpu()).to_vector<uint8_t>(), bytes);
}

TEST(CudaBackend, StreamsAndEventsOrderWork) {
  Backend& b = gb();
  auto s1 = b.create_stream();
  auto s2 = b.create_stream();
  EXPECT_NE(s1->native_handle(), nullptr);
  EXPECT_NE(s1->native_handle(), s2->native_handle());
  EXPECT_EQ(b.current_stream().native_handle(), nullptr);  // the default stream
  const int64_t n = int64_t{1} << 24;  // 64 MiB of f32: long enough that an unordered read would race
  const uint64_t key = rng::make_key(7, 1, 2, 3);
  Tensor x = Tensor::empty({n}, DType::f32, gpu());
  Tensor z = Tensor::empty({n}, DType::f32, gpu());
  {
    StreamGuard g(b, *s1);
    EXPECT_EQ(b.current_stream().native_handle(), s1->native_handle());
    ops::jitter(key, 0.5, x);
    for (int i = 0; i < 8; ++i) ops::axpby(1.0, x, 0.0, x);  // x = x, eight more passes of work on s1
  }
  EXPECT_EQ(b.current_stream().native_handle(), nullptr);  // the guard restored the default stream
  auto ev = b.create_event();
  ev->record(*s1);
  ev->wait(*s2);  // s2 runs after everything enqueued on s1 so far
  std::vector<float> got;
  {
    StreamGuard g(b, *s2);
    ops::mul(x, x, z);
    got = z.to_vector<float>();  // D2H on s2, synchronises s2
  }
  ev->synchronize();
  EXPECT_TRUE(ev->query());
  s1->synchronize();
  // The same on the CPU: jitter gives the same bits on every backend.
  Tensor xc = Tensor::empty({n}, DType::f32);
  ops::jitter(key, 0.5, xc);
  Tensor zc = Tensor::empty({n}, DType::f32);
  ops::mul(xc, xc, zc);
  EXPECT_TRUE(test::bit_equal(Tensor::from_vector(got, {n}), zc));
  // Streams and events of another backend are refused with a message.
  auto cpu_stream = get_backend(Device::cpu()).create_stream();
  EXPECT_THROW(b.set_current_stream(cpu_stream.get()), Error);
  EXPECT_THROW(ev->record(*cpu_stream), Error);
  b.set_current_stream(nullptr);
  b.synchronize();
}

TEST(CudaBackend, AbsurdAllocationIsOutOfMemoryNamingTheCall) {
  Backend& b = gb();
  const int64_t base = b.memory_stats().current_bytes;
  const int64_t huge = int64_t{1} << 50;  // 1 PiB
  try {
    Tensor t = Tensor::empty({huge}, DType::u8, gpu());
    FAIL() << "allocating 1 PiB did not throw";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::out_of_memory) << e.what();
    EXPECT_TRUE(contains(e.what(), "cudaMalloc")) << e.what();
    EXPECT_TRUE(contains(e.what(), std::to_string(huge))) << e.what();
    EXPECT_TRUE(contains(e.what(), "cuda:0")) << e.what();
  }
  EXPECT_EQ(b.memory_stats().current_bytes, base);
  try {
    Tensor t = Tensor::empty({huge}, DType::u8, gpu(), MemoryKind::pinned_host);
    FAIL() << "pinning 1 PiB did not throw";
  } catch (const Error& e) {
    EXPECT_TRUE(e.code() == ErrorCode::out_of_memory || e.code() == ErrorCode::backend) << e.what();
    EXPECT_TRUE(contains(e.what(), "cudaMallocHost")) << e.what();
  }
  // The device is still usable.
  Tensor ok = Tensor::zeros({4}, DType::f32, gpu());
  EXPECT_EQ(ok.to_vector<float>(), std::vector<float>(4, 0.0f));
}

TEST(CudaBackend, CudaFailuresBecomeBackendErrorsNamingTheCall) {
#if MOE_HAVE_CUDA
  try {
    cuda_raise_test_error();
    FAIL() << "no throw";
  } catch (const Error& e) {
    const std::string m = e.what();
    EXPECT_EQ(e.code(), ErrorCode::backend) << m;
    EXPECT_TRUE(contains(m, "cudaSetDevice(-1)")) << m;        // the call
    EXPECT_TRUE(contains(m, "cudaErrorInvalidDevice")) << m;   // the error name
    EXPECT_TRUE(contains(m, "cuda:0")) << m;                   // the device
    EXPECT_TRUE(contains(m, "cuda_backend.cpp:")) << m;        // file:line
  }
  // The error was not sticky: work continues.
  Tensor t = Tensor::from_vector(std::vector<float>{1, 2, 3}, {3}, gpu());
  EXPECT_EQ(t.to_vector<float>(), (std::vector<float>{1, 2, 3}));
#endif
}

TEST(CudaBackend, InvalidArgumentsAreReportedBeforeAnyLaunch) {
  Tensor A = Tensor::zeros({4, 3}, DType::f32, gpu());
  Tensor B = Tensor::zeros({4, 5}, DType::f32, gpu());
  Tensor C = Tensor::zeros({4, 5}, DType::f32, gpu());
  try {
    ops::gemm(A, false, B, false, C);
    FAIL() << "no throw";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::invalid_argument);
    EXPECT_TRUE(contains(e.what(), "gemm: inner dimensions differ")) << e.what();
  }
  Tensor Bc = Tensor::zeros({3, 5}, DType::f32);  // on the CPU
  try {
    ops::gemm(A, false, Bc, false, C);
    FAIL() << "no throw";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::invalid_argument);
    EXPECT_TRUE(contains(e.what(), "all tensors must be on cuda:0")) << e.what();
  }
  // A kernel limit: the router keeps a token's scores in shared memory.
  const int64_t E = 60000;
  Tensor logits = Tensor::zeros({1, E}, DType::f32, gpu());
  Tensor probs = Tensor::empty({1, E}, DType::f32, gpu());
  Tensor map = Tensor::empty({1, E}, DType::u8, gpu());
  Tensor idx = Tensor::empty({1, 1}, DType::i32, gpu());
  ops::TopkSpec spec;
  spec.k = 1;
  spec.pre_softmax = true;
  try {
    ops::router_topk(spec, logits, nullptr, probs, map, idx);
    FAIL() << "no throw";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::not_supported) << e.what();
    EXPECT_TRUE(contains(e.what(), "router_topk")) << e.what();
  }
}
