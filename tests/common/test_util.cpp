#include "common/test_util.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <random>
#include <sstream>

#include "device/ops.h"

namespace moe::test {

namespace {
Tensor from_doubles(const std::vector<double>& v, const Shape& shape, DType dtype, Device device) {
  Tensor f = Tensor::from_vector(v, shape, Device::cpu());
  Tensor out = dtype == DType::f64 ? f : ops::cast(f, dtype);
  return device.is_cpu() ? out : out.to(device);
}
}  // namespace

Tensor randn(const Shape& shape, DType dtype, uint64_t seed, double scale, Device device) {
  std::mt19937_64 gen(seed);
  std::normal_distribution<double> d(0.0, scale);
  std::vector<double> v(static_cast<size_t>(shape_numel(shape)));
  for (auto& x : v) x = d(gen);
  return from_doubles(v, shape, dtype, device);
}

Tensor uniform(const Shape& shape, DType dtype, uint64_t seed, double lo, double hi, Device device) {
  std::mt19937_64 gen(seed);
  std::uniform_real_distribution<double> d(lo, hi);
  std::vector<double> v(static_cast<size_t>(shape_numel(shape)));
  for (auto& x : v) x = d(gen);
  return from_doubles(v, shape, dtype, device);
}

std::vector<double> to_f64(const Tensor& t) {
  Tensor h = t.device().is_cpu() ? t : t.to(Device::cpu());
  if (h.dtype() == DType::f64) return h.to_vector<double>();
  if (h.dtype() == DType::i64) {
    auto v = h.to_vector<int64_t>();
    return std::vector<double>(v.begin(), v.end());
  }
  if (h.dtype() == DType::i32) {
    auto v = h.to_vector<int32_t>();
    return std::vector<double>(v.begin(), v.end());
  }
  if (h.dtype() == DType::u8) {
    auto v = h.to_vector<uint8_t>();
    return std::vector<double>(v.begin(), v.end());
  }
  return ops::cast(h, DType::f64).to_vector<double>();
}

Tensor from_f64(const std::vector<double>& v, const Shape& shape, DType dtype, Device device) {
  return from_doubles(v, shape, dtype, device);
}

::testing::AssertionResult all_close(const std::vector<double>& got, const std::vector<double>& exp, double atol,
                                     double rtol) {
  if (got.size() != exp.size())
    return ::testing::AssertionFailure() << "size mismatch: got " << got.size() << " expected " << exp.size();
  size_t worst = 0, bad = 0;
  double worst_excess = -1;
  for (size_t i = 0; i < got.size(); ++i) {
    double lim = atol + rtol * std::abs(exp[i]);
    double err = std::abs(got[i] - exp[i]);
    bool nan_mismatch = std::isnan(got[i]) != std::isnan(exp[i]);
    if (err > lim || nan_mismatch) {
      ++bad;
      double excess = nan_mismatch ? INFINITY : err - lim;
      if (excess > worst_excess) {
        worst_excess = excess;
        worst = i;
      }
    }
  }
  if (bad == 0) return ::testing::AssertionSuccess();
  std::ostringstream os;
  os.precision(10);
  os << bad << " of " << got.size() << " elements differ beyond atol " << atol << " + rtol " << rtol
     << "; worst at flat index " << worst << ": got " << got[worst] << ", expected " << exp[worst]
     << " (|diff| " << std::abs(got[worst] - exp[worst]) << ")";
  return ::testing::AssertionFailure() << os.str();
}

::testing::AssertionResult all_close(const Tensor& got, const Tensor& exp, double atol, double rtol) {
  if (got.shape() != exp.shape())
    return ::testing::AssertionFailure() << "shape mismatch: got " << got.desc() << ", expected " << exp.desc();
  return all_close(to_f64(got), to_f64(exp), atol, rtol);
}

::testing::AssertionResult bit_equal(const Tensor& a, const Tensor& b) {
  if (a.dtype() != b.dtype() || a.numel() != b.numel())
    return ::testing::AssertionFailure() << "not comparable: " << a.desc() << " vs " << b.desc();
  std::vector<uint8_t> x(a.nbytes()), y(b.nbytes());
  a.copy_to_host(x.data(), x.size());
  b.copy_to_host(y.data(), y.size());
  size_t es = dtype_size(a.dtype());
  for (size_t i = 0; i < x.size(); ++i)
    if (x[i] != y[i])
      return ::testing::AssertionFailure() << "first differing element at flat index " << i / es << " of "
                                           << a.desc();
  return ::testing::AssertionSuccess();
}

::testing::AssertionResult check_grad(const std::function<double()>& loss, Tensor& param, const Tensor& analytic,
                                      double eps, double tol, int64_t max_elems) {
  if (param.dtype() != DType::f64 || !param.device().is_cpu())
    return ::testing::AssertionFailure() << "check_grad needs an f64 CPU parameter, got " << param.desc();
  if (analytic.numel() != param.numel())
    return ::testing::AssertionFailure() << "analytic gradient " << analytic.desc() << " does not match parameter "
                                         << param.desc();
  std::vector<double> an = to_f64(analytic);
  double* p = param.data_as<double>();
  int64_t n = param.numel();
  int64_t stride = (max_elems > 0 && n > max_elems) ? (n + max_elems - 1) / max_elems : 1;
  for (int64_t i = 0; i < n; i += stride) {
    double orig = p[i];
    p[i] = orig + eps;
    double lp = loss();
    p[i] = orig - eps;
    double lm = loss();
    p[i] = orig;
    double fd = (lp - lm) / (2 * eps);
    double scale = std::max({1.0, std::abs(fd), std::abs(an[i])});
    if (std::abs(fd - an[i]) > tol * scale) {
      std::ostringstream os;
      os.precision(12);
      os << "gradient mismatch at flat index " << i << " of " << param.desc() << ": finite difference " << fd
         << ", analytic " << an[i] << " (|diff| " << std::abs(fd - an[i]) << ", tol " << tol * scale << ")";
      return ::testing::AssertionFailure() << os.str();
    }
  }
  return ::testing::AssertionSuccess();
}

std::string error_of(const std::function<void()>& f, ErrorCode code) {
  try {
    f();
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), code) << e.what();
    return e.what();
  } catch (const std::exception& e) {
    ADD_FAILURE() << "threw a non-moe exception: " << e.what();
    return "";
  }
  ADD_FAILURE() << "expected a moe::Error, nothing was thrown";
  return "";
}

::testing::AssertionResult contains_all(const std::string& msg, const std::vector<std::string>& parts) {
  for (const std::string& p : parts)
    if (msg.find(p) == std::string::npos) return ::testing::AssertionFailure() << "message lacks '" << p << "': " << msg;
  return ::testing::AssertionSuccess();
}

void expect_error(const std::function<void()>& f, const std::string& needle) {
  try {
    f();
    ADD_FAILURE() << "no error; expected one mentioning '" << needle << "'";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
  }
}

}  // namespace moe::test
