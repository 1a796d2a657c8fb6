// Core types: dtype round trips, tensor views and copies, tensors over external memory, allocator
// counters, error messages.
#include <gtest/gtest.h>

#include <cmath>
#include <memory>
#include <vector>

#include "common/test_util.h"
#include "device/ops.h"
#include "moecore/backend.h"

using namespace moe;

TEST(DType, SizesAndNames) {
  EXPECT_EQ(dtype_size(DType::f32), 4u);
  EXPECT_EQ(dtype_size(DType::bf16), 2u);
  EXPECT_EQ(dtype_size(DType::i64), 8u);
  EXPECT_EQ(dtype_from_name("fp32"), DType::f32);
  EXPECT_EQ(dtype_from_name("bfloat16"), DType::bf16);
  EXPECT_THROW(dtype_from_name("fp8"), Error);
}

TEST(DType, Bf16RoundsToNearestEven) {
  EXPECT_EQ(bf16_to_float(float_to_bf16(1.0f)), 1.0f);
  // 1 + 2^-8 is halfway between bf16 neighbours 1 and 1+2^-7: ties go to even (1).
  EXPECT_EQ(bf16_to_float(float_to_bf16(1.0f + 1.0f / 256)), 1.0f);
  EXPECT_EQ(bf16_to_float(float_to_bf16(1.0f + 3.0f / 256)), 1.0f + 4.0f / 256);
  EXPECT_TRUE(std::isnan(bf16_to_float(float_to_bf16(NAN))));
}

TEST(DType, F16RoundTrip) {
  for (float v : {0.0f, 1.0f, -2.5f, 65504.0f, 6.103515625e-05f, 5.960464477539063e-08f})
    EXPECT_EQ(f16_to_float(float_to_f16(v)), v) << v;
  EXPECT_TRUE(std::isinf(f16_to_float(float_to_f16(1e6f))));
}

TEST(Tensor, ViewNarrowCopy) {
  std::vector<float> v(12);
  for (int i = 0; i < 12; ++i) v[i] = static_cast<float>(i);
  Tensor t = Tensor::from_vector(v, {4, 3});
  EXPECT_EQ(t.numel(), 12);
  EXPECT_EQ(t.desc(), "(4, 3) f32 cpu");
  Tensor rows = t.narrow(1, 2);
  EXPECT_EQ(rows.shape(), (Shape{2, 3}));
  EXPECT_EQ(rows.to_vector<float>()[0], 3.0f);
  EXPECT_TRUE(rows.shares_storage_with(t));
  Tensor c = rows.clone();
  EXPECT_FALSE(c.shares_storage_with(t));
  EXPECT_EQ(c.to_vector<float>(), std::vector<float>({3, 4, 5, 6, 7, 8}));
  EXPECT_THROW(t.view({5, 3}), Error);
  EXPECT_THROW(t.narrow(3, 2), Error);
  EXPECT_THROW(t.to_vector<double>(), Error);
}

// A tensor over memory the caller owns: views see and write that memory, nothing is copied, the
// allocator neither counts nor frees it, and the owner lives as long as any view.
TEST(Tensor, FromExternalKeepsItsOwnerAndFreesNothing) {
  Backend& b = get_backend(Device::cpu());
  const int64_t base = b.memory_stats().current_bytes;
  auto owner = std::make_shared<std::vector<float>>(std::vector<float>{0, 1, 2, 3, 4, 5});
  std::weak_ptr<std::vector<float>> alive = owner;
  Tensor rows;
  {
    Tensor t = Tensor::from_external(owner->data(), {3, 2}, DType::f32, Device::cpu(), owner);
    EXPECT_EQ(t.data(), owner->data());
    EXPECT_EQ(b.memory_stats().current_bytes, base);
    rows = t.narrow(1, 2);
    rows.copy_from(Tensor::from_vector(std::vector<float>{7, 8, 9, 10}, {2, 2}));
  }
  owner.reset();
  ASSERT_FALSE(alive.expired());  // the view keeps it
  EXPECT_EQ(*alive.lock(), (std::vector<float>{0, 1, 7, 8, 9, 10}));
  EXPECT_EQ(rows.to_vector<float>(), (std::vector<float>{7, 8, 9, 10}));
  rows = Tensor();
  EXPECT_TRUE(alive.expired());
  EXPECT_EQ(b.memory_stats().current_bytes, base);
  float x = 0;
  EXPECT_THROW(Tensor::from_external(&x, {1}, DType::f32, Device::cpu(), nullptr), Error);
}

TEST(Allocator, CountsCurrentAndPeak) {
  Backend& b = get_backend(Device::cpu());
  b.reset_peak_memory();
  int64_t base = b.memory_stats().current_bytes;
  {
    Tensor a = Tensor::empty({1024}, DType::f32);
    EXPECT_EQ(b.memory_stats().current_bytes, base + 4096);
    {
      Tensor c = Tensor::empty({256}, DType::f64);
      EXPECT_EQ(b.memory_stats().peak_bytes, base + 4096 + 2048);
    }
    EXPECT_EQ(b.memory_stats().current_bytes, base + 4096);
    Tensor p = Tensor::empty({10}, DType::f32, Device::cpu(), MemoryKind::pinned_host);
    EXPECT_EQ(b.memory_stats().pinned_current_bytes, 40);
  }
  EXPECT_EQ(b.memory_stats().current_bytes, base);
  EXPECT_EQ(b.memory_stats().peak_bytes, base + 4096 + 2048);
}

TEST(Error, MessageSaysWhatExpectedAndGot) {
  Tensor t = Tensor::zeros({2, 3}, DType::f32);
  try {
    t.check_shape({3, 2}, "my_op: input");
    FAIL() << "no throw";
  } catch (const Error& e) {
    std::string m = e.what();
    EXPECT_EQ(e.code(), ErrorCode::invalid_argument);
    EXPECT_NE(m.find("my_op: input"), std::string::npos) << m;
    EXPECT_NE(m.find("(3, 2)"), std::string::npos) << m;
    EXPECT_NE(m.find("(2, 3) f32 cpu"), std::string::npos) << m;
  }
}

TEST(Registry, CpuAlwaysThere) {
  EXPECT_TRUE(backend_available(DeviceType::cpu));
  EXPECT_EQ(get_backend(Device::cpu()).name(), "cpu");
  EXPECT_FALSE(build_info().empty());
#if !MOE_HAVE_CUDA
  EXPECT_THROW(get_backend(Device::cuda(0)), Error);
#endif
}
