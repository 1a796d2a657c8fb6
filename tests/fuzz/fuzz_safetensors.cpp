// Fuzz target: the safetensors reader (load_safetensors). The input is a whole file. A file that
// loads is saved again and must load back to the same tensors (the writer and the reader agree).
#include <cstring>

#include "fuzz/fuzz.h"
#include "moecore/error.h"
#include "moecore/safetensors.h"

namespace {

void one(const uint8_t* data, size_t size) {
  const std::string path = moe::fuzz::scratch_dir() + "/in.safetensors";
  moe::fuzz::write_file(path, data, size);
  moe::SafetensorsFile f;
  try {
    f = moe::load_safetensors(path);
  } catch (const moe::Error&) {
    return;
  }
  std::vector<std::pair<std::string, moe::Tensor>> list;
  for (const std::string& n : f.names) list.emplace_back(n, f.at(n));
  const std::string again = moe::fuzz::scratch_dir() + "/again.safetensors";
  moe::save_safetensors(again, list, f.metadata);
  const moe::SafetensorsFile g = moe::load_safetensors(again);
  if (g.names != f.names || g.metadata != f.metadata) moe::fuzz::finding("save(load(file)) lists other tensors");
  for (const std::string& n : f.names) {
    const moe::Tensor &a = f.at(n), &b = g.at(n);
    if (a.shape() != b.shape() || a.dtype() != b.dtype() || a.nbytes() != b.nbytes() ||
        (a.nbytes() && std::memcmp(a.data(), b.data(), a.nbytes()) != 0))
      moe::fuzz::finding("save(load(file)) changed tensor '" + n + "'");
  }
}

void write_seeds(const std::string& dir) {
  using moe::DType;
  using moe::Tensor;
  moe::save_safetensors(dir + "/empty.safetensors", {});
  moe::save_safetensors(dir + "/metadata.safetensors", {}, {{"format", "pt"}, {"producer", "libmoecore"}});
  moe::save_safetensors(dir + "/dtypes.safetensors",
                        {{"f32", Tensor::from_vector<float>({1.5f, -2.0f, 3.25f}, {3})},
                         {"f64", Tensor::from_vector<double>({1e-300, 2.0}, {2, 1})},
                         {"i64", Tensor::from_vector<int64_t>({-1, 1ll << 40}, {2})},
                         {"i32", Tensor::from_vector<int32_t>({7}, {})},
                         {"u8", Tensor::from_vector<uint8_t>({1, 0, 1, 1}, {2, 2})},
                         {"bf16", Tensor::zeros({2, 3}, DType::bf16)},
                         {"f16", Tensor::zeros({1, 2}, DType::f16)},
                         {"empty", Tensor::zeros({0, 4}, DType::f32)}},
                        {{"step", "100"}});
  moe::save_safetensors(dir + "/layer.safetensors",
                        {{"decoder.layers.0.mlp.router.weight", Tensor::zeros({4, 8}, DType::f32)},
                         {"decoder.layers.0.mlp.experts.weight1", Tensor::zeros({4, 8, 6}, DType::bf16)},
                         {"decoder.layers.0.mlp.experts.weight2", Tensor::zeros({4, 3, 8}, DType::bf16)}});
}

}  // namespace

moe::fuzz::Target moe::fuzz::fuzz_target() {
  return {"safetensors", one,
          {"{", "}", "[", "]", ",", ":", "\"", "\"dtype\"", "\"shape\"", "\"data_offsets\"", "\"__metadata__\"",
           "\"F32\"", "\"F64\"", "\"BF16\"", "\"F16\"", "\"I32\"", "\"I64\"", "\"U8\"", "\"BOOL\"", "\"I16\"",
           "null", "true", "[0,0]", "[]", "\\u0000", "\\ud800", std::string("\0\0\0\0\0\0\0\0", 8)},
          write_seeds};
}
