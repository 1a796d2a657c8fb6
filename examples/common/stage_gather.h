// Canonical tensors of a model whose parameters live on some ranks only (pipeline stages): every
// rank's parameter names and shapes, and one parameter's value or gradient gathered from the ranks
// that hold its shards. Shared by moe_gpt_io and train_moe_gpt. Collective over the world.
#pragma once
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "moecore/comm.h"
#include "moecore/error.h"
#include "moecore/param.h"
#include "moecore/tensor.h"

namespace moe::examples {

// Every rank's parameters (a pipeline stage holds only its own), as canonical name → shape, in the
// order of the ranks (stage 0's first) and of each rank's parameters(). Collective over the world.
inline std::vector<std::pair<std::string, Shape>> model_parameters_everywhere(const std::vector<const Parameter*>& mine,
                                                                       Communicator& world) {
  std::string text;
  for (const Parameter* p : mine) {
    text += p->name + "|";
    for (int64_t d : p->canonical_shape) text += std::to_string(d) + ",";
    text += "\n";
  }
  const int n = world.size();
  Tensor len = Tensor::from_vector(std::vector<int64_t>{static_cast<int64_t>(text.size())}, {1});
  Tensor lens = Tensor::empty({n}, DType::i64);
  world.all_gather(len, lens);
  std::vector<int64_t> rows = lens.to_vector<int64_t>();
  int64_t total = 0;
  for (int64_t r : rows) total += r;
  std::vector<uint8_t> bytes(text.begin(), text.end());
  Tensor all = Tensor::empty({total}, DType::u8);
  world.all_gather_v(Tensor::from_vector(bytes, {static_cast<int64_t>(bytes.size())}), all, rows);
  const std::vector<uint8_t> got = all.to_vector<uint8_t>();
  std::vector<std::pair<std::string, Shape>> out;
  std::set<std::string> seen;
  std::string line;
  for (uint8_t ch : got) {
    if (ch != '\n') {
      line.push_back(static_cast<char>(ch));
      continue;
    }
    const size_t bar = line.find('|');
    std::string name = line.substr(0, bar);
    Shape shape;
    for (size_t pos = bar + 1; pos < line.size();) {
      size_t comma = line.find(',', pos);
      shape.push_back(std::stoll(line.substr(pos, comma - pos)));
      pos = comma + 1;
    }
    if (seen.insert(name).second) out.emplace_back(name, shape);
    line.clear();
  }
  return out;
}

// The canonical (unsharded) f32 tensor of a parameter's value or gradient from the ranks that hold a
// shard (`p` null on the others: another pipeline stage). Replicas hold equal values; the lowest
// world rank's wins (the first stage's copy of a tied word embedding). Collective over the world.
inline Tensor gather_canonical(const std::string& name, const Shape& shape, const Parameter* p, bool use_grad,
                               Communicator& world) {
  std::vector<double> vals;
  std::vector<int64_t> idx;
  if (p) {
    const Tensor& local = use_grad ? p->grad : p->value;
    Tensor g = local.device().is_cpu() ? local : local.to(Device::cpu());
    vals = (g.dtype() == DType::f64 ? g : g.to_dtype(DType::f64)).to_vector<double>();
    idx = shard_canonical_indices(p->canonical_shape, p->shard);
  }
  const int n = world.size();
  Tensor count = Tensor::from_vector(std::vector<int64_t>{static_cast<int64_t>(vals.size())}, {1});
  Tensor counts = Tensor::empty({n}, DType::i64);
  world.all_gather(count, counts);
  std::vector<int64_t> rows = counts.to_vector<int64_t>();
  int64_t total = 0;
  for (int64_t r : rows) total += r;
  Tensor all_vals = Tensor::empty({total}, DType::f64), all_idx = Tensor::empty({total}, DType::i64);
  world.all_gather_v(Tensor::from_vector(vals, {static_cast<int64_t>(vals.size())}), all_vals, rows);
  world.all_gather_v(Tensor::from_vector(idx, {static_cast<int64_t>(idx.size())}), all_idx, rows);
  const std::vector<double> v = all_vals.to_vector<double>();
  const std::vector<int64_t> ix = all_idx.to_vector<int64_t>();
  const int64_t numel = shape_numel(shape);
  std::vector<float> out(static_cast<size_t>(numel), 0.0f);
  std::vector<char> have(static_cast<size_t>(numel), 0);
  for (int64_t i = 0; i < total; ++i) {
    const size_t c = static_cast<size_t>(ix[static_cast<size_t>(i)]);
    if (!have[c]) {
      out[c] = static_cast<float>(v[static_cast<size_t>(i)]);
      have[c] = 1;
    }
  }
  for (char h : have)
    MOE_CHECK_CODE(h, ErrorCode::internal, "gather_canonical: the ranks' shards of '", name, "' do not cover ",
                   shape_str(shape));
  return Tensor::from_vector(out, shape);
}

}  // namespace moe::examples
