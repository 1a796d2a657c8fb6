// The parameters of a model whose parameters live on some ranks only (pipeline stages): every
// rank's parameter names and shapes, for moe::gather_parameter(name, shape, p or null, ...). Shared
// by moe_gpt_io and train_moe_gpt. Collective over the world.
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

}  // namespace moe::examples
