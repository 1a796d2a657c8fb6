// Hugging Face export / import (Qwen3-MoE names; Qwen2-MoE's for the shared expert; docs/checkpoints.md).
//
// Every mapping is a list of row blocks: the canonical tensor viewed as (rows, columns) — 1-D
// tensors as one row, experts' (E, F1, H) as (E·F1, H) — and each HF tensor a set of its row blocks.
// Export copies canonical rows into HF tensors, import copies them back, so the two are inverses by
// construction; both refuse a tensor that is missing, left over or of another shape.
#include <sys/stat.h>

#include <algorithm>
#include <filesystem>
#include <set>

#include "core/json_strict.h"
#include "moecore/model.h"
#include "moecore/safetensors.h"
#include "train/checkpoint_internal.h"

namespace moe {

using namespace ckpt;

namespace {

struct Block {
  std::string hf;       // HF tensor name
  int64_t hf_row = 0;   // first row in the HF tensor (viewed as rows × columns)
  int64_t can_row = 0;  // first row in the canonical tensor
  int64_t rows = 0;
};
struct Mapping {
  std::string name;  // canonical
  Shape shape;       // canonical
  int64_t cols = 0;  // columns of the 2-D view (both sides)
  std::vector<Block> blocks;
};

int64_t rows_of(const Shape& s, int64_t cols) { return cols == 0 ? 0 : shape_numel(s) / cols; }

// The mapping of every canonical parameter of a model with config c, and the HF shapes.
std::vector<Mapping> hf_mapping(const MoEConfig& c0, std::map<std::string, Shape>& hf_shapes) {
  const MoEConfig c = resolve_model_config(c0);
  const int64_t H = c.hidden_size, V = c.vocab_size, nh = c.num_attention_heads, ng = c.query_groups();
  const int64_t hd = c.head_dim(), qpg = nh / ng, E = c.num_moe_experts, F = c.moe_ffn_hidden_size;
  const bool glu = c.gated_linear_unit, ln = c.normalization == "LayerNorm";
  std::vector<Mapping> out;
  auto whole = [&](const std::string& name, const Shape& shape, const std::string& hf) {
    const int64_t cols = shape.size() >= 2 ? shape.back() : shape_numel(shape);
    out.push_back(Mapping{name, shape, cols, {Block{hf, 0, 0, rows_of(shape, cols)}}});
    hf_shapes[hf] = shape;
  };
  auto norm = [&](const std::string& name, int64_t n, const std::string& hf) {
    whole(name + ".weight", {n}, hf + ".weight");
    if (ln) whole(name + ".bias", {n}, hf + ".bias");
  };
  // An MLP: fc1 (F1, H) rows [gate | up] with a GLU, fc2 (H, Fm).
  auto mlp = [&](const std::string& pre, int64_t Fm, const std::string& hf) {
    Mapping fc1{pre + "linear_fc1.weight", {glu ? 2 * Fm : Fm, H}, H, {}};
    if (glu) {
      fc1.blocks = {Block{hf + "gate_proj.weight", 0, 0, Fm}, Block{hf + "up_proj.weight", 0, Fm, Fm}};
      hf_shapes[hf + "gate_proj.weight"] = {Fm, H};
    } else {
      fc1.blocks = {Block{hf + "up_proj.weight", 0, 0, Fm}};
    }
    hf_shapes[hf + "up_proj.weight"] = {Fm, H};
    out.push_back(fc1);
    whole(pre + "linear_fc2.weight", {H, Fm}, hf + "down_proj.weight");
  };

  whole("embedding.word_embeddings.weight", {V, H}, "model.embed_tokens.weight");
  if (c.position_embedding_type == "learned_absolute")
    whole("embedding.position_embeddings.weight", {c.seq_length, H}, "model.embed_positions.weight");
  for (int64_t i = 0; i < c.num_layers; ++i) {
    const std::string pre = "decoder.layers." + std::to_string(i) + ".", hp = "model.layers." + std::to_string(i) + ".";
    norm(pre + "input_layernorm", H, hp + "input_layernorm");
    // Fused QKV, per query group g: [qpg query heads | key | value], hd rows each.
    Mapping qkv{pre + "self_attention.linear_qkv.weight", {(nh + 2 * ng) * hd, H}, H, {}};
    for (int64_t g = 0; g < ng; ++g) {
      const int64_t base = g * (qpg + 2) * hd;
      qkv.blocks.push_back(Block{hp + "self_attn.q_proj.weight", g * qpg * hd, base, qpg * hd});
      qkv.blocks.push_back(Block{hp + "self_attn.k_proj.weight", g * hd, base + qpg * hd, hd});
      qkv.blocks.push_back(Block{hp + "self_attn.v_proj.weight", g * hd, base + (qpg + 1) * hd, hd});
    }
    hf_shapes[hp + "self_attn.q_proj.weight"] = {nh * hd, H};
    hf_shapes[hp + "self_attn.k_proj.weight"] = {ng * hd, H};
    hf_shapes[hp + "self_attn.v_proj.weight"] = {ng * hd, H};
    out.push_back(qkv);
    if (c.qk_layernorm) {
      norm(pre + "self_attention.q_layernorm", hd, hp + "self_attn.q_norm");
      norm(pre + "self_attention.k_layernorm", hd, hp + "self_attn.k_norm");
    }
    whole(pre + "self_attention.linear_proj.weight", {H, nh * hd}, hp + "self_attn.o_proj.weight");
    norm(pre + "pre_mlp_layernorm", H, hp + "post_attention_layernorm");
    if (c.is_moe_layer(i)) {
      const std::string mp = pre + "mlp.", hm = hp + "mlp.";
      whole(mp + "router.weight", {E, H}, hm + "gate.weight");
      if (c.moe_router_enable_expert_bias) whole(mp + "router.expert_bias", {E}, hm + "gate.e_score_correction_bias");
      const int64_t F1 = glu ? 2 * F : F;
      Mapping fc1{mp + "experts.linear_fc1.weight", {E, F1, H}, H, {}};
      Mapping fc2{mp + "experts.linear_fc2.weight", {E, H, F}, F, {}};
      for (int64_t e = 0; e < E; ++e) {
        const std::string he = hm + "experts." + std::to_string(e) + ".";
        if (glu) {
          fc1.blocks.push_back(Block{he + "gate_proj.weight", 0, e * F1, F});
          fc1.blocks.push_back(Block{he + "up_proj.weight", 0, e * F1 + F, F});
          hf_shapes[he + "gate_proj.weight"] = {F, H};
        } else {
          fc1.blocks.push_back(Block{he + "up_proj.weight", 0, e * F1, F});
        }
        hf_shapes[he + "up_proj.weight"] = {F, H};
        fc2.blocks.push_back(Block{he + "down_proj.weight", 0, e * H, H});
        hf_shapes[he + "down_proj.weight"] = {H, F};
      }
      out.push_back(fc1);
      out.push_back(fc2);
      if (c.has_shared_expert()) {
        mlp(mp + "shared_experts.", *c.moe_shared_expert_intermediate_size, hm + "shared_expert.");
        if (c.moe_shared_expert_gate) whole(mp + "shared_experts.gate_weight", {1, H}, hm + "shared_expert_gate.weight");
      }
    } else {
      mlp(pre + "mlp.", c.dense_ffn(), hp + "mlp.");
    }
  }
  norm("decoder.final_layernorm", H, "model.norm");
  if (c.untie_embeddings_and_output_weights) whole("output_layer.weight", {V, H}, "lm_head.weight");
  return out;
}

// Copies rows [src_row, +rows) of src (viewed as (·, cols)) into rows [dst_row, +rows) of dst.
void copy_rows(const Tensor& src, int64_t src_row, Tensor& dst, int64_t dst_row, int64_t rows, int64_t cols) {
  Tensor s = src.view({src.numel() / cols, cols}).narrow(src_row, rows);
  Tensor d = dst.view({dst.numel() / cols, cols}).narrow(dst_row, rows);
  if (s.dtype() == d.dtype()) d.copy_from(s);
  else d.copy_from(s.to_dtype(d.dtype()));
}

// The zero q/k/v biases of a Qwen2-MoE export (a model with a shared expert).
std::map<std::string, Shape> qwen2_biases(const MoEConfig& c0) {
  const MoEConfig c = resolve_model_config(c0);
  std::map<std::string, Shape> out;
  if (!c.has_shared_expert()) return out;
  for (int64_t i = 0; i < c.num_layers; ++i) {
    const std::string hp = "model.layers." + std::to_string(i) + ".self_attn.";
    out[hp + "q_proj.bias"] = {c.num_attention_heads * c.head_dim()};
    out[hp + "k_proj.bias"] = {c.query_groups() * c.head_dim()};
    out[hp + "v_proj.bias"] = {c.query_groups() * c.head_dim()};
  }
  return out;
}

// Any float tensor's values as doubles.
std::vector<double> ops_free_values(const Tensor& t) {
  const Tensor f = t.dtype() == DType::f64 ? t : t.to_dtype(DType::f64);
  return f.to_vector<double>();
}

const char* torch_dtype(DType dt) {
  switch (dt) {
    case DType::bf16: return "bfloat16";
    case DType::f16: return "float16";
    case DType::f64: return "float64";
    default: return "float32";
  }
}

std::string hidden_act(const MoEConfig& c) {
  if (c.activation_func == "relu2" || c.activation_func == "squared_relu") return "relu2";
  return c.activation_func;  // silu, gelu
}

}  // namespace

std::string hf_config_json(const MoEConfig& c0) {
  const MoEConfig c = resolve_model_config(c0);
  ordered_json j = ordered_json::object();
  const bool shared = c.has_shared_expert();
  j["architectures"] = {shared ? "Qwen2MoeForCausalLM" : "Qwen3MoeForCausalLM"};
  j["model_type"] = shared ? "qwen2_moe" : "qwen3_moe";
  j["hidden_size"] = c.hidden_size;
  j["num_hidden_layers"] = c.num_layers;
  j["num_attention_heads"] = c.num_attention_heads;
  j["num_key_value_heads"] = c.query_groups();
  j["head_dim"] = c.head_dim();
  j["intermediate_size"] = c.dense_ffn();
  j["moe_intermediate_size"] = c.moe_ffn_hidden_size;
  j["num_experts"] = c.num_moe_experts;
  j["num_local_experts"] = c.num_moe_experts;
  j["num_experts_per_tok"] = c.moe_router_topk;
  j["norm_topk_prob"] = c.moe_router_score_function != "softmax" || !c.moe_router_pre_softmax;
  if (shared) j["shared_expert_intermediate_size"] = *c.moe_shared_expert_intermediate_size;
  std::vector<int64_t> dense;
  for (int64_t i = 0; i < c.num_layers; ++i)
    if (!c.is_moe_layer(i)) dense.push_back(i);
  j["decoder_sparse_step"] = 1;
  j["mlp_only_layers"] = dense;
  j["vocab_size"] = c.vocab_size;
  j["max_position_embeddings"] = c.seq_length;
  j["rms_norm_eps"] = c.layernorm_epsilon;
  j["rope_theta"] = c.rotary_base;
  if (c.rotary_percent != 1.0) j["partial_rotary_factor"] = c.rotary_percent;
  j["hidden_act"] = hidden_act(c);
  j["tie_word_embeddings"] = !c.untie_embeddings_and_output_weights;
  j["attention_bias"] = false;
  j["attention_dropout"] = 0.0;
  j["router_aux_loss_coef"] = c.moe_aux_loss_coeff.empty() ? 0.0 : c.moe_aux_loss_coeff[0];
  j["initializer_range"] = c.init_method_std;
  j["torch_dtype"] = torch_dtype(dtype_from_name(c.params_dtype));
  j["moecore_config"] = ordered_json::parse(config_to_json(c0));
  return j.dump(2);
}

MoEConfig config_from_hf_json(const std::string& text, const std::string& source) {
  std::string dup;
  const json j = parse_json_strict(text, source, &dup);
  MOE_CHECK(j.is_object() && dup.empty(), source, ": expected a JSON object without repeated keys");
  if (j.contains("moecore_config")) return config_from_json(j.at("moecore_config").dump(), source + " moecore_config");
  auto need = [&](const char* k) -> const json& {
    MOE_CHECK(j.contains(k) && !j.at(k).is_null(), source, ": missing '", k, "' (a Qwen3-MoE / Qwen2-MoE config.json)");
    return j.at(k);
  };
  const std::string type = j.value("model_type", std::string());
  MOE_CHECK(type == "qwen3_moe" || type == "qwen2_moe", source, ": model_type '", type,
            "' is not supported (qwen3_moe, qwen2_moe, or a config.json with moecore_config)");
  MoEConfig c;
  c.hidden_size = need("hidden_size").get<int64_t>();
  c.num_layers = need("num_hidden_layers").get<int64_t>();
  c.num_attention_heads = need("num_attention_heads").get<int64_t>();
  c.num_query_groups = j.value("num_key_value_heads", c.num_attention_heads);
  c.kv_channels = j.value("head_dim", c.hidden_size / c.num_attention_heads);
  c.ffn_hidden_size = need("intermediate_size").get<int64_t>();
  c.moe_ffn_hidden_size = need("moe_intermediate_size").get<int64_t>();
  c.num_moe_experts = j.contains("num_experts") ? j.at("num_experts").get<int64_t>() : need("num_local_experts").get<int64_t>();
  c.moe_router_topk = need("num_experts_per_tok").get<int64_t>();
  c.moe_router_pre_softmax = !j.value("norm_topk_prob", true);
  c.vocab_size = need("vocab_size").get<int64_t>();
  c.seq_length = need("max_position_embeddings").get<int64_t>();
  c.normalization = "RMSNorm";
  c.layernorm_epsilon = j.value("rms_norm_eps", 1e-6);
  c.position_embedding_type = "rope";
  c.rotary_base = j.value("rope_theta", 10000.0);
  c.rotary_percent = j.value("partial_rotary_factor", 1.0);
  c.qk_layernorm = type == "qwen3_moe";
  c.untie_embeddings_and_output_weights = !j.value("tie_word_embeddings", false);
  c.gated_linear_unit = true;
  c.activation_func = j.value("hidden_act", std::string("silu"));
  MOE_CHECK(!j.value("attention_bias", false), source, ": attention_bias true is not supported (no linear biases)");
  if (j.contains("shared_expert_intermediate_size") && j.at("shared_expert_intermediate_size").get<int64_t>() > 0) {
    c.moe_shared_expert_intermediate_size = j.at("shared_expert_intermediate_size").get<int64_t>();
    c.moe_shared_expert_gate = true;
  }
  std::set<int64_t> dense;
  if (j.contains("mlp_only_layers"))
    for (const json& v : j.at("mlp_only_layers")) dense.insert(v.get<int64_t>());
  const int64_t step = j.value("decoder_sparse_step", int64_t{1});
  c.moe_layer_freq.clear();
  for (int64_t i = 0; i < c.num_layers; ++i)
    c.moe_layer_freq.push_back(!dense.count(i) && step > 0 && (i + 1) % step == 0 ? 1 : 0);
  const std::string td = j.value("torch_dtype", std::string("float32"));
  c.params_dtype = td == "bfloat16" ? "bf16" : "fp32";
  c.init_method_std = j.value("initializer_range", 0.02);
  return c;
}

int64_t export_hf(const std::string& checkpoint_dir, std::optional<int64_t> iteration, const std::string& out_dir) {
  const Index ix = read_index(checkpoint_dir, iteration);
  const MoEConfig cfg = config_from_json(ix.config.dump(), ix.dir + " config");
  std::map<std::string, Shape> hf_shapes;
  const std::vector<Mapping> maps = hf_mapping(cfg, hf_shapes);
  std::set<std::string> params;
  for (const auto& [n, t] : ix.tensors)
    if (t.kind == "param") params.insert(n);
  std::map<std::string, Tensor> hf;
  for (const Mapping& m : maps) {
    auto it = ix.tensors.find(m.name);
    MOE_CHECK(it != ix.tensors.end() && it->second.kind == "param", "export_hf: checkpoint '", ix.dir,
              "' has no parameter '", m.name, "' that its config implies");
    MOE_CHECK(it->second.shape == m.shape, "export_hf: '", m.name, "' is ", shape_str(it->second.shape),
              " in the checkpoint, the config implies ", shape_str(m.shape));
    params.erase(m.name);
    const Tensor canon = read_whole_tensor(ix, it->second);
    for (const Block& b : m.blocks) {
      auto [pos, fresh] = hf.try_emplace(b.hf);
      if (fresh) pos->second = Tensor::empty(hf_shapes.at(b.hf), canon.dtype());
      copy_rows(canon, b.can_row, pos->second, b.hf_row, b.rows, m.cols);
    }
  }
  MOE_CHECK(params.empty(), "export_hf: checkpoint '", ix.dir, "' has parameters the mapping does not know: ",
            *params.begin(), params.size() > 1 ? " and more" : "");
  // Qwen2-MoE's attention always has q/k/v biases: zeros say "none" to its class.
  const DType dt = hf.begin()->second.dtype();
  for (const auto& [n, shape] : qwen2_biases(cfg)) hf[n] = Tensor::zeros(shape, dt);
  std::error_code ec;
  std::filesystem::create_directories(out_dir, ec);
  MOE_CHECK_CODE(!ec, ErrorCode::io, "export_hf: cannot create '", out_dir, "': ", ec.message());
  std::vector<std::pair<std::string, Tensor>> list(hf.begin(), hf.end());
  save_safetensors(path_join(out_dir, "model.safetensors"), list, {{"format", "pt"}});
  write_file_synced(path_join(out_dir, "config.json"), hf_config_json(cfg) + "\n");
  return static_cast<int64_t>(list.size());
}

int64_t import_hf(const std::string& hf_dir, const std::string& checkpoint_dir, int64_t iteration,
                  const SaveOptions& options) {
  MoEConfig cfg = config_from_hf_json(read_text_file(path_join(hf_dir, "config.json"), "HF config"),
                                      path_join(hf_dir, "config.json"));
  cfg.tensor_model_parallel_size = cfg.context_parallel_size = cfg.pipeline_model_parallel_size = 1;
  cfg.expert_model_parallel_size = 1;
  cfg.expert_tensor_parallel_size.reset();
  // The weights: model.safetensors, or the files model.safetensors.index.json lists.
  std::map<std::string, Tensor> hf;
  std::vector<std::string> files;
  const std::string single = path_join(hf_dir, "model.safetensors");
  struct stat st {};
  if (::stat(single.c_str(), &st) == 0) {
    files.push_back(single);
  } else {
    const std::string ixp = path_join(hf_dir, "model.safetensors.index.json");
    std::string dup;
    const json ij = parse_json_strict(read_text_file(ixp, "HF weight index"), ixp, &dup);
    MOE_CHECK(ij.contains("weight_map") && ij.at("weight_map").is_object(), ixp, ": missing 'weight_map'");
    std::set<std::string> fs;
    for (const auto& [k, v] : ij.at("weight_map").items()) fs.insert(v.get<std::string>());
    for (const std::string& f : fs) files.push_back(path_join(hf_dir, f));
  }
  for (const std::string& f : files) {
    SafetensorsFile sf = load_safetensors(f);
    for (auto& [n, t] : sf.tensors) {
      MOE_CHECK(!hf.count(n), "import_hf: tensor '", n, "' appears in two files");
      hf.emplace(n, t);
    }
  }
  std::map<std::string, Shape> hf_shapes;
  const std::vector<Mapping> maps = hf_mapping(cfg, hf_shapes);
  for (const auto& [n, shape] : hf_shapes) {
    auto it = hf.find(n);
    MOE_CHECK(it != hf.end(), "import_hf: '", hf_dir, "' has no tensor '", n, "' ", shape_str(shape),
              " that its config.json implies");
    MOE_CHECK(it->second.shape() == shape, "import_hf: tensor '", n, "' is ", shape_str(it->second.shape()),
              ", config.json implies ", shape_str(shape));
  }
  // Qwen2-MoE's q/k/v biases: accepted when they are zero (we have no linear biases).
  for (const auto& [n, shape] : qwen2_biases(cfg)) {
    auto it = hf.find(n);
    if (it == hf.end()) continue;
    for (double v : ops_free_values(it->second))
      MOE_CHECK(v == 0.0, "import_hf: '", n, "' is not zero: linear biases are not supported (add_bias_linear)");
    hf.erase(it);
  }
  for (const auto& [n, t] : hf)
    MOE_CHECK(hf_shapes.count(n), "import_hf: tensor '", n, "' of '", hf_dir,
              "' has no place in the model its config.json describes");
  MoEGPTModel model(cfg, Device::cpu());
  std::set<std::string> mapped;
  for (const Mapping& m : maps) mapped.insert(m.name);
  for (Parameter* p : model.parameters())
    MOE_CHECK_CODE(mapped.count(p->name), ErrorCode::internal, "import_hf: no HF mapping for parameter '", p->name, "'");
  for (const Mapping& m : maps) {
    Parameter* p = model.find_parameter(m.name);
    MOE_CHECK(p != nullptr, "import_hf: the model has no parameter '", m.name, "'");
    MOE_CHECK_CODE(p->canonical_shape == m.shape && p->value.shape() == m.shape, ErrorCode::internal, "import_hf: '", m.name,
                   "' is ", shape_str(p->canonical_shape), ", the mapping says ", shape_str(m.shape));
    for (const Block& b : m.blocks) copy_rows(hf.at(b.hf), b.hf_row, p->value, b.can_row, b.rows, m.cols);
  }
  TrainingState state;
  state.iteration = iteration;
  state.seed = cfg.seed;
  state.data_seed = cfg.seed;
  save_checkpoint(checkpoint_dir, iteration, cfg, model.parameters(), nullptr, state, nullptr, options);
  return static_cast<int64_t>(hf.size());
}

}  // namespace moe
