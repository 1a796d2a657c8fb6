#include "core/sanitize.h"

#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <sstream>

#include "moecore/error.h"

namespace moe::sanitize {

namespace {

thread_local Where tl_where;

int env_enabled() {
  const char* v = std::getenv("MOE_SANITIZE");
  return v && *v && std::strcmp(v, "0") != 0 ? 1 : 0;
}

std::atomic<int>& enabled_flag() {
  static std::atomic<int> flag{env_enabled()};
  return flag;
}

template <class T, class ToDouble>
int64_t scan(const void* data, int64_t n, ToDouble to_double, int64_t* first, double* first_value) {
  const T* p = static_cast<const T*>(data);
  int64_t bad = 0;
  for (int64_t i = 0; i < n; ++i) {
    const double v = to_double(p[i]);
    if (std::isfinite(v)) continue;
    if (bad == 0) {
      if (first) *first = i;
      if (first_value) *first_value = v;
    }
    ++bad;
  }
  return bad;
}

// "[3, 5]" for flat index i of shape.
std::string index_str(const Shape& shape, int64_t i) {
  std::vector<int64_t> idx(shape.size());
  for (size_t d = shape.size(); d-- > 0;) {
    const int64_t s = shape[d] > 0 ? shape[d] : 1;
    idx[d] = i % s;
    i /= s;
  }
  std::ostringstream os;
  os << "[";
  for (size_t d = 0; d < idx.size(); ++d) os << (d ? ", " : "") << idx[d];
  os << "]";
  return os.str();
}

}  // namespace

bool enabled() { return enabled_flag().load(std::memory_order_relaxed) != 0; }
void set_enabled(bool on) { enabled_flag().store(on ? 1 : 0, std::memory_order_relaxed); }

const Where& where() { return tl_where; }

std::string where_str() {
  const Where& w = tl_where;
  std::ostringstream os;
  auto sep = [&os] {
    if (os.tellp() > 0) os << ", ";
  };
  if (w.step >= 0) os << "step " << w.step;
  if (w.micro_batch >= 0) sep(), os << "micro-batch " << w.micro_batch;
  if (w.pass) sep(), os << w.pass;
  if (w.layer >= 0) sep(), os << "layer " << w.layer << " (decoder.layers." << w.layer << ")";
  if (w.module) sep(), os << "module " << w.module;
  if (os.tellp() == 0) os << "(outside the model's forward and backward)";
  if (process_rank() >= 0) os << ", rank " << process_rank();
  return os.str();
}

Scope::~Scope() { tl_where = saved_; }

PassScope::PassScope(const char* pass, int64_t step, int64_t micro_batch) {
  tl_where.pass = pass;
  tl_where.step = step;
  tl_where.micro_batch = micro_batch;
  tl_where.layer = -1;
  tl_where.module = nullptr;
}

LayerScope::LayerScope(int64_t layer) {
  tl_where.layer = layer;
  tl_where.module = nullptr;
}

ModuleScope::ModuleScope(const char* module) { tl_where.module = module; }

void set_module(const char* module) { tl_where.module = module; }

int64_t count_non_finite(const Tensor& t, int64_t* first, double* first_value) {
  if (!t.defined() || t.numel() == 0 || !dtype_is_float(t.dtype())) return 0;
  const bool host = t.device().is_cpu() || t.memory_kind() == MemoryKind::pinned_host;
  const Tensor h = host ? t : t.to(Device::cpu());
  const int64_t n = h.numel();
  switch (h.dtype()) {
    case DType::f32: return scan<float>(h.data(), n, [](float v) { return static_cast<double>(v); }, first, first_value);
    case DType::f64: return scan<double>(h.data(), n, [](double v) { return v; }, first, first_value);
    case DType::bf16: return scan<bf16>(h.data(), n, [](bf16 v) { return static_cast<double>(bf16_to_float(v)); }, first, first_value);
    case DType::f16: return scan<f16>(h.data(), n, [](f16 v) { return static_cast<double>(f16_to_float(v)); }, first, first_value);
    default: return 0;
  }
}

void check_op(const char* op, std::initializer_list<Named> outputs, std::initializer_list<Named> inputs) {
  if (!enabled()) return;
  for (const Named& out : outputs) {
    if (!out.tensor) continue;
    int64_t first = 0;
    double value = 0.0;
    const int64_t bad = count_non_finite(*out.tensor, &first, &value);
    if (bad == 0) continue;
    std::ostringstream in;
    for (const Named& x : inputs) {
      if (!x.tensor || !x.tensor->defined()) continue;
      const int64_t b = count_non_finite(*x.tensor);
      in << (in.tellp() > 0 ? ", " : "") << x.name << " " << (b ? std::to_string(b) + " non-finite" : "finite");
    }
    std::string origin;
    if (inputs.size() > 0)
      origin = in.str().find("non-finite") == std::string::npos
                   ? "; every input finite: the NaN/Inf was born in this op"
                   : "; it came in through an input";
    MOE_THROW(ErrorCode::non_finite, "MOE_SANITIZE: the output '", out.name, "' ", out.tensor->desc(), " of op ", op,
              " holds ", bad, " non-finite value", bad == 1 ? "" : "s", " (first at ",
              index_str(out.tensor->shape(), first), " = ", value, ") at ", where_str(),
              inputs.size() > 0 ? "; inputs: " : "", in.str(), origin);
  }
}

}  // namespace moe::sanitize
