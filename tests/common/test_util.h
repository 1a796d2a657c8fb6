// Test support: seeded inputs, comparisons that say where and by how much, finite differences.
#pragma once
#include <gtest/gtest.h>

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "moecore/error.h"
#include "moecore/tensor.h"

namespace moe::test {

// Seeded normal / uniform values in any float dtype (generated in f64, then rounded).
Tensor randn(const Shape& shape, DType dtype, uint64_t seed, double scale = 1.0, Device device = Device::cpu());
Tensor uniform(const Shape& shape, DType dtype, uint64_t seed, double lo, double hi, Device device = Device::cpu());

// Any float tensor as doubles (copied to the host).
std::vector<double> to_f64(const Tensor& t);
// A host f64 tensor from values.
Tensor from_f64(const std::vector<double>& v, const Shape& shape, DType dtype = DType::f64,
                Device device = Device::cpu());

// |got − expected| <= atol + rtol·|expected| everywhere; the message names the worst element.
::testing::AssertionResult all_close(const Tensor& got, const Tensor& expected, double atol, double rtol);
::testing::AssertionResult all_close(const std::vector<double>& got, const std::vector<double>& expected,
                                     double atol, double rtol);
// Byte-identical contents (same dtype and element count).
::testing::AssertionResult bit_equal(const Tensor& a, const Tensor& b);

// Central finite differences of a scalar loss with respect to every element of `param` (an f64
// CPU tensor perturbed in place and restored), compared with `analytic`:
// |fd − an| <= tol·max(1, |fd|, |an|). At most `max_elems` elements are probed (0: all), spread
// evenly over the tensor.
::testing::AssertionResult check_grad(const std::function<double()>& loss, Tensor& param, const Tensor& analytic,
                                      double eps = 1e-6, double tol = 1e-6, int64_t max_elems = 0);

// The message of the moe::Error that f throws; a test failure when it throws nothing, another
// exception, or an Error with another code.
std::string error_of(const std::function<void()>& f, ErrorCode code = ErrorCode::invalid_argument);
// Success when `msg` contains every part.
::testing::AssertionResult contains_all(const std::string& msg, const std::vector<std::string>& parts);
// Expects f to throw a moe::Error (any code) whose message mentions `needle`.
void expect_error(const std::function<void()>& f, const std::string& needle);

}  // namespace moe::test
