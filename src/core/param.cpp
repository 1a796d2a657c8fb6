#include "moecore/param.h"

#include <algorithm>
#include <cmath>
#include <type_traits>

#include "device/ops.h"
#include "kernels/common/rng.h"

namespace moe {

namespace {
uint64_t fnv1a(const std::string& s) {
  uint64_t h = 1469598103934665603ULL;
  for (unsigned char c : s) {
    h ^= c;
    h *= 1099511628211ULL;
  }
  return h;
}

void check_shard(const Shape& canonical, const std::vector<DimShard>& shard) {
  for (const DimShard& d : shard) {
    MOE_CHECK(d.dim >= 0 && d.dim < static_cast<int64_t>(canonical.size()), "shard: dim ", d.dim,
              " out of range for canonical shape ", shape_str(canonical));
    int64_t n = canonical[static_cast<size_t>(d.dim)];
    if (d.glu_halves) {
      MOE_CHECK(n % 2 == 0 && d.length % 2 == 0 && d.start >= 0 && d.start + d.length / 2 <= n / 2,
                "shard: GLU halves [", d.start, ", +", d.length, ") do not fit dim ", d.dim, " of ", shape_str(canonical));
    } else {
      MOE_CHECK(d.start >= 0 && d.length >= 0 && d.start + d.length <= n, "shard: range [", d.start, ", ",
                d.start + d.length, ") does not fit dim ", d.dim, " of ", shape_str(canonical));
    }
  }
}

// Canonical index along a sharded dim of local index i.
int64_t canonical_coord(const DimShard& d, int64_t n, int64_t i) {
  if (!d.glu_halves) return d.start + i;
  int64_t half = d.length / 2;
  return i < half ? d.start + i : n / 2 + d.start + (i - half);
}
}  // namespace

Shape shard_shape(const Shape& canonical, const std::vector<DimShard>& shard) {
  check_shard(canonical, shard);
  Shape s = canonical;
  for (const DimShard& d : shard) s[static_cast<size_t>(d.dim)] = d.length;
  return s;
}

std::vector<int64_t> shard_canonical_indices(const Shape& canonical, const std::vector<DimShard>& shard) {
  Shape local = shard_shape(canonical, shard);
  int64_t nd = static_cast<int64_t>(canonical.size());
  std::vector<const DimShard*> by_dim(static_cast<size_t>(nd), nullptr);
  for (const DimShard& d : shard) by_dim[static_cast<size_t>(d.dim)] = &d;
  int64_t n = shape_numel(local);
  std::vector<int64_t> out(static_cast<size_t>(n));
  std::vector<int64_t> idx(static_cast<size_t>(nd), 0);
  for (int64_t flat = 0; flat < n; ++flat) {
    int64_t c = 0;
    for (int64_t k = 0; k < nd; ++k) {
      int64_t i = idx[static_cast<size_t>(k)];
      int64_t ck = by_dim[static_cast<size_t>(k)] ? canonical_coord(*by_dim[static_cast<size_t>(k)],
                                                                    canonical[static_cast<size_t>(k)], i)
                                                  : i;
      c = c * canonical[static_cast<size_t>(k)] + ck;
    }
    out[static_cast<size_t>(flat)] = c;
    for (int64_t k = nd - 1; k >= 0; --k) {  // increment the local multi-index
      if (++idx[static_cast<size_t>(k)] < local[static_cast<size_t>(k)]) break;
      idx[static_cast<size_t>(k)] = 0;
    }
  }
  return out;
}

namespace {
// Calls fn(local_flat, canonical_flat) for local flat indices [begin, end) of a shard, walking the
// local multi-index incrementally (no table of indices is built: parameters can hold billions).
template <class Fn>
void for_each_canonical(const Shape& canonical, const std::vector<DimShard>& shard, const Shape& local,
                        int64_t begin, int64_t end, Fn&& fn) {
  if (begin >= end) return;
  const size_t nd = canonical.size();
  if (shard.empty()) {
    for (int64_t i = begin; i < end; ++i) fn(i, i);
    return;
  }
  std::vector<const DimShard*> by_dim(nd, nullptr);
  for (const DimShard& d : shard) by_dim[static_cast<size_t>(d.dim)] = &d;
  std::vector<int64_t> idx(nd, 0);
  for (int64_t k = static_cast<int64_t>(nd) - 1, rem = begin; k >= 0; --k) {
    idx[static_cast<size_t>(k)] = rem % local[static_cast<size_t>(k)];
    rem /= local[static_cast<size_t>(k)];
  }
  for (int64_t flat = begin; flat < end; ++flat) {
    int64_t c = 0;
    for (size_t k = 0; k < nd; ++k) {
      int64_t i = idx[k];
      c = c * canonical[k] + (by_dim[k] ? canonical_coord(*by_dim[k], canonical[k], i) : i);
    }
    fn(flat, c);
    for (int64_t k = static_cast<int64_t>(nd) - 1; k >= 0; --k) {
      if (++idx[static_cast<size_t>(k)] < local[static_cast<size_t>(k)]) break;
      idx[static_cast<size_t>(k)] = 0;
    }
  }
}

// N(0, std²) of canonical element c of the parameter keyed `key` (Box–Muller on two hashed uniforms).
inline double init_value(uint64_t key, int64_t c, double init_std) {
  const uint64_t u = static_cast<uint64_t>(c);
  double u1 = rng::uniform01(key, 2 * u), u2 = rng::uniform01(key, 2 * u + 1);
  u1 = u1 < 1e-12 ? 1e-12 : u1;
  return init_std * std::sqrt(-2.0 * std::log(u1)) * std::cos(6.283185307179586 * u2);
}

template <class T>
T from_double(double v) {
  if constexpr (std::is_same_v<T, bf16>) return float_to_bf16(static_cast<float>(v));
  else if constexpr (std::is_same_v<T, f16>) return float_to_f16(static_cast<float>(v));
  else return static_cast<T>(v);
}
}  // namespace

Parameter make_parameter(const std::string& name, const Shape& canonical_shape, std::vector<DimShard> shard,
                         DType dtype, Device device, uint64_t seed, double init_std, GradGroup group,
                         bool trainable) {
  Parameter p;
  p.name = name;
  p.canonical_shape = canonical_shape;
  p.shard = std::move(shard);
  p.grad_group = group;
  p.trainable = trainable;
  const Shape local = shard_shape(canonical_shape, p.shard);
  const int64_t n = shape_numel(local);
  const uint64_t key = rng::mix64(seed ^ fnv1a(name));
  // Drawn straight into a host tensor of the final dtype, in parallel chunks (each element depends
  // only on its canonical index, so the result does not depend on the thread count).
  Tensor host = Tensor::empty(local, dtype);
  auto fill = [&](auto tag) {
    using T = decltype(tag);
    T* out = host.data_as<T>();
    const int64_t chunk = 1 << 16, chunks = (n + chunk - 1) / chunk;
#pragma omp parallel for schedule(static)
    for (int64_t b = 0; b < chunks; ++b)
      for_each_canonical(canonical_shape, p.shard, local, b * chunk, std::min(n, (b + 1) * chunk),
                         [&](int64_t i, int64_t c) {
                           out[i] = from_double<T>(init_std == 0.0 ? 0.0 : init_value(key, c, init_std));
                         });
  };
  switch (dtype) {
    case DType::f32: fill(float{}); break;
    case DType::f64: fill(double{}); break;
    case DType::bf16: fill(bf16{}); break;
    case DType::f16: fill(f16{}); break;
    default: MOE_THROW(ErrorCode::invalid_argument, "make_parameter: '", name, "' must be a float dtype, got ", dtype_name(dtype));
  }
  p.value = device.is_cpu() ? host : host.to(device);
  if (trainable) p.grad = Tensor::zeros(local, dtype, device);
  return p;
}

void load_shard(Parameter& p, const Tensor& canonical) {
  canonical.check_shape(p.canonical_shape, ("load_shard: " + p.name).c_str());
  Tensor host = canonical.device().is_cpu() ? canonical : canonical.to(Device::cpu());
  std::vector<double> all = ops::cast(host, DType::f64).to_vector<double>();
  std::vector<int64_t> idx = shard_canonical_indices(p.canonical_shape, p.shard);
  std::vector<double> v(idx.size());
  for (size_t i = 0; i < idx.size(); ++i) v[i] = all[static_cast<size_t>(idx[i])];
  Tensor local = Tensor::from_vector(v, p.value.shape());
  Tensor typed = p.value.dtype() == DType::f64 ? local : ops::cast(local, p.value.dtype());
  p.value.copy_from(typed);
}

}  // namespace moe
