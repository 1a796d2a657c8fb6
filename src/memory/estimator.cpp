// The memory estimator (moecore/memory.h, docs/memory.md "Estimating memory"): per rank, the bytes
// of weights, gradients, optimizer state, saved activations and the largest transient, counted from
// what the modules of src/model and src/moe allocate and save.
//
// Notation (one micro-batch on one rank): b sequences of S tokens; n = S/CP·b rows after the TP
// gather (what attention and the output layer see), T = S/(CP·TP)·b rows of the residual stream;
// H hidden, V vocabulary (V/TP local), nh/ng query heads / groups (local: /TP), hd head dim; E
// experts, G = E/EP local, k top-k, F expert width (F/ETP local, F1 = 2F with a GLU); N the rows the
// dispatcher allocates for this rank's experts (routed_rows; T_g = T·ETP·EP tokens gathered by the
// allgather dispatcher). d: bytes of the params dtype; st: statistics (f32, f64 for fp64); pb:
// routing probabilities (likewise); rb: the router dtype.
#include "moecore/memory.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <map>
#include <sstream>

#include "moecore/dtype.h"
#include "moecore/error.h"
#include "moecore/model.h"

namespace moe {

MemoryLayout MemoryLayout::from_config(const MoEConfig& config, int64_t world, int64_t pp_rank) {
  MemoryLayout l;
  l.sizes = parallel_sizes_from_config(config, world);
  l.pp_rank = pp_rank;
  l.num_microbatches = config.num_microbatches;
  return l;
}

namespace {

// A saved slot: its bytes, whether a regenerate function exists (recompute needs one), and the slot
// whose storage it shares (counted once).
struct Slot {
  std::string name;
  int64_t bytes = 0;
  bool regen = false;
  std::string alias;  // non-empty: same storage as that slot
  int64_t elem = 1;   // bytes per element (offload's minimum size is in elements)
};

// ActivationStore's rule matching: the longest rule that is the slot's name or a prefix of it
// ending in '.'; the default is keep. A slot without a regenerate function is kept under recompute.
struct Rules {
  std::map<std::string, SavePolicy> rules;
  int64_t min_offload_numel = 0;
  void set(const std::string& r, SavePolicy p) { rules[r] = p; }
  SavePolicy of(const Slot& s) const {
    SavePolicy p = SavePolicy::keep;
    size_t best = 0;
    for (const auto& [r, pol] : rules) {
      const bool match = r == s.name || (!r.empty() && r.back() == '.' && s.name.compare(0, r.size(), r) == 0);
      if (match && r.size() >= best) {
        best = r.size();
        p = pol;
      }
    }
    if (p == SavePolicy::recompute && !s.regen) p = SavePolicy::keep;
    if (p == SavePolicy::offload && s.bytes / s.elem < min_offload_numel) p = SavePolicy::keep;
    return p;
  }
};

// --recompute-granularity selective with module `module` (an empty list is Megatron's core_attn).
bool selective(const MoEConfig& c, const char* module) {
  if (c.recompute_granularity != "selective") return false;
  if (c.recompute_modules.empty()) return std::string(module) == "core_attn";
  return std::find(c.recompute_modules.begin(), c.recompute_modules.end(), module) != c.recompute_modules.end();
}

bool offloads(const MoEConfig& c, const char* module) {
  return c.fine_grained_activation_offloading &&
         std::find(c.offload_modules.begin(), c.offload_modules.end(), module) != c.offload_modules.end();
}

// A layer's own store (norms, attention, dense MLP): src/model/gpt_model.cpp, apply_layer_policies.
Rules layer_rules(const MoEConfig& c) {
  Rules r;
  if (selective(c, "core_attn")) r.set("attention.lse", SavePolicy::recompute);
  if (selective(c, "mlp")) r.set("mlp.", SavePolicy::recompute);
  if (selective(c, "layernorm")) {
    r.set("attention.input", SavePolicy::recompute);
    r.set("mlp.fc1_input", SavePolicy::recompute);
  }
  if (offloads(c, "attn_norm")) r.set("input_layernorm.input", SavePolicy::offload);
  if (offloads(c, "mlp_norm")) r.set("pre_mlp_layernorm.input", SavePolicy::offload);
  if (offloads(c, "attn_proj")) r.set("attention.o", SavePolicy::offload);
  if (offloads(c, "core_attn"))
    for (const char* x : {"attention.q", "attention.k", "attention.v"}) r.set(x, SavePolicy::offload);
  r.min_offload_numel = c.min_offloaded_tensor_size;
  return r;
}

// The MoE layer's store rules (src/moe/moe_layer.cpp): selective moe_act / shared_experts recompute,
// and the offload modules (a slot is offloaded only from min_offloaded_tensor_size elements).
// `moe` recompute is not a slot rule: the layer keeps only its input (layer_model).
Rules moe_rules(const MoEConfig& c) {
  Rules r;
  if (selective(c, "moe_act")) r.set("experts.act_output", SavePolicy::recompute);
  if (selective(c, "shared_experts")) r.set("shared_experts.", SavePolicy::recompute);
  if (selective(c, "layernorm"))  // the slots that hold norm₂'s output itself
    for (const char* x : {"router.input", "shared_experts.fc1_input"}) r.set(x, SavePolicy::recompute);
  if (c.fine_grained_activation_offloading)
    for (const std::string& m : c.offload_modules) {
      if (m == "expert_fc1") r.set("experts.fc1_input", SavePolicy::offload);
      if (m == "moe_act") r.set("experts.fc1_output", SavePolicy::offload);
      if (m == "shared_experts") r.set("shared_experts.", SavePolicy::offload);
    }
  r.min_offload_numel = c.min_offloaded_tensor_size;
  return r;
}

// What a list of slots keeps on the device under `rules`, what it drops (rebuilt or reloaded in the
// backward, transiently), and what goes to pinned host memory.
struct Kept {
  int64_t device = 0, restored = 0, host = 0;
};
Kept keep_of(const std::vector<Slot>& slots, const Rules& rules) {
  Kept k;
  std::map<std::string, SavePolicy> pol;
  for (const Slot& s : slots) pol[s.name] = rules.of(s);
  for (const Slot& s : slots) {
    const SavePolicy p = pol[s.name];
    if (!s.alias.empty() && pol.count(s.alias) && pol[s.alias] == SavePolicy::keep) continue;  // counted there
    if (p == SavePolicy::keep) k.device += s.bytes;
    else k.restored += s.bytes;
    if (p == SavePolicy::offload) k.host += s.bytes;
  }
  return k;
}

// Sizes of one rank's micro-batch.
struct Dims {
  int64_t b, S, S_cp, n, T, H, V_l, nh, ng, hd, E, G, k, F_l, F1_l, N, T_g;
  int64_t TP, CP, EP, ETP;
  int64_t d, st, pb, rb;
  bool layer_norm;
};

int64_t routed_rows(const MoEConfig& c, const Dims& m) {
  // The local and allgather dispatchers allocate rows for a bound, not the routed count (the
  // host-sync-free path, src/moe/dispatcher_local.cpp): tokens · min(k, local experts), or tokens ·
  // local experts with capacity padding. The all-to-all dispatcher allocates the routed rows:
  // balanced routing sends T·k rows (at most the capacity) and every ETP rank holds all of them.
  const bool pad = c.moe_pad_expert_input_to_capacity;
  if (m.EP * m.ETP == 1) return m.T * (pad ? m.E : std::min(m.k, m.E));
  if (c.moe_token_dispatcher_type == "allgather") return m.T_g * (pad ? m.G : std::min(m.k, m.G));
  int64_t per_source = m.T * m.k;
  if (c.moe_expert_capacity_factor) {
    const double cap_d = std::ceil(static_cast<double>(m.T * m.k) / static_cast<double>(m.E) * *c.moe_expert_capacity_factor);
    const int64_t cap = std::min<int64_t>(static_cast<int64_t>(cap_d), m.T);
    per_source = pad ? cap * m.E : std::min(per_source, cap * m.E);
  }
  return per_source * m.ETP;
}

// The slots of one layer's store (norms, attention, dense MLP) — src/model/{norm,attention}.cpp,
// src/moe/shared_experts.cpp with the "mlp." prefix.
void norm_slots(const std::string& slot, int64_t rows, int64_t D, const Dims& m, std::vector<Slot>& out,
                const std::string& input_alias = "") {
  out.push_back({slot + ".input", rows * D * m.d, false, input_alias});
  out.push_back({slot + ".rstd", rows * m.st, false, ""});
  if (m.layer_norm) out.push_back({slot + ".mean", rows * m.st, false, ""});
}

std::vector<Slot> attention_slots(const MoEConfig& c, const Dims& m) {
  std::vector<Slot> s;
  norm_slots("input_layernorm", m.T, m.H, m, s);
  s.push_back({"attention.input", m.T * m.H * m.d, /*regen: norm₁ of its input*/ true, ""});
  if (c.qk_layernorm) {
    norm_slots("attention.q_layernorm", m.n * m.nh, m.hd, m, s);
    norm_slots("attention.k_layernorm", m.n * m.ng, m.hd, m, s);
  }
  s.push_back({"attention.q", m.n * m.nh * m.hd * m.d, false, ""});
  s.push_back({"attention.k", m.n * m.ng * m.hd * m.d, false, ""});
  s.push_back({"attention.v", m.n * m.ng * m.hd * m.d, false, ""});
  s.push_back({"attention.o", m.n * m.nh * m.hd * m.d, false, ""});
  s.push_back({"attention.lse", m.b * m.nh * m.S_cp * m.st, /*regen: core attention*/ true, ""});
  norm_slots("pre_mlp_layernorm", m.T, m.H, m, s);
  for (Slot& x : s) x.elem = x.name.ends_with(".rstd") || x.name.ends_with(".mean") || x.name == "attention.lse" ? m.st : m.d;
  return s;
}

// A dense MLP or the shared expert (SharedExperts): width Fs over TP.
void mlp_slots(const std::string& pre, int64_t Fs, bool gate, bool glu, const Dims& m, std::vector<Slot>& s,
               const std::string& input_alias) {
  const int64_t F_l = Fs / m.TP, F1_l = glu ? 2 * F_l : F_l, rows = m.T * m.TP;
  s.push_back({pre + "fc1_input", m.T * m.H * m.d, false, input_alias});
  s.push_back({pre + "fc1_output", rows * F1_l * m.d, true, ""});
  s.push_back({pre + "act_output", rows * F_l * m.d, true, ""});
  if (gate) {
    s.push_back({pre + "gate", m.T * m.pb, true, ""});
    s.push_back({pre + "fc2_output", m.T * m.H * m.d, true, ""});
  }
}

std::vector<Slot> moe_slots(const MoEConfig& c, const Dims& m) {
  std::vector<Slot> s;
  const bool jitter = c.moe_input_jitter_eps && *c.moe_input_jitter_eps > 0;
  s.push_back({"router.input", m.T * m.H * m.d, /*regen under layernorm recompute: norm₂*/ !jitter, ""});
  s.push_back({"router.logits", m.T * m.E * m.rb, true, ""});
  s.push_back({"experts.fc1_input", m.N * m.H * m.d, false, ""});
  s.push_back({"experts.probs", m.N * m.pb, false, ""});
  s.push_back({"experts.fc1_output", m.N * m.F1_l * m.d, true, ""});
  s.push_back({"experts.act_output", m.N * m.F_l * m.d, true, ""});
  if (c.has_shared_expert())
    mlp_slots("shared_experts.", *c.moe_shared_expert_intermediate_size, c.moe_shared_expert_gate,
              c.gated_linear_unit, m, s, jitter ? "" : "router.input");
  for (Slot& x : s)
    if (x.name == "shared_experts.fc1_input") x.regen = !jitter;
  for (Slot& x : s)
    x.elem = x.name == "router.logits" ? m.rb : (x.name == "experts.probs" || x.name == "shared_experts.gate") ? m.pb : m.d;
  return s;
}

// The dispatcher's row map of a pending micro-batch: (T_g, G) i32 (allgather) or (T, E) i32.
int64_t row_map_bytes(const MoEConfig& c, const Dims& m) {
  const bool allgather = m.EP * m.ETP > 1 && c.moe_token_dispatcher_type == "allgather";
  return allgather ? m.T_g * m.G * 4 : m.T * m.E * 4;
}

// Per micro-batch state of a MoE layer outside the store: the router's pending top-k indices,
// routing map, jitter noise and aux-loss weights; the dispatcher's row map.
int64_t moe_pending_bytes(const MoEConfig& c, const Dims& m) {
  int64_t b = m.T * m.k * 4 + m.T * m.E;  // topk_idx i32, routing_map u8
  if (c.moe_input_jitter_eps && *c.moe_input_jitter_eps > 0) b += 2 * m.T * m.H * m.d;  // noise, jittered input
  for (size_t i = 0; i < c.moe_router_load_balancing_type.size(); ++i) {
    const double coeff = c.moe_aux_loss_coeff.size() == 1 ? c.moe_aux_loss_coeff[0] : c.moe_aux_loss_coeff[i];
    const std::string& t = c.moe_router_load_balancing_type[i];
    if (t == "none" || coeff == 0.0) continue;
    b += (t == "seq_aux_loss" ? m.b : 1) * m.E * 8;
  }
  return b + row_map_bytes(c, m);
}

struct Layer {
  int64_t index = 0;
  bool moe = false;
  int64_t saved = 0;     // kept on the device per micro-batch
  int64_t restored = 0;  // rebuilt / reloaded in its backward
  int64_t host = 0;      // offloaded
  int64_t fwd_peak = 0;  // on top of the layers before it (this micro-batch) while its forward runs
  int64_t bwd_peak = 0;  // on top of the layers before it and the incoming gradient while its backward runs
  int64_t attention = 0, mlp = 0;  // saved, for the report
};

Layer layer_model(const MoEConfig& c, const Dims& m, int64_t index) {
  Layer L;
  L.index = index;
  L.moe = c.is_moe_layer(index);
  const bool ln = selective(c, "layernorm");
  const Rules lr = layer_rules(c);
  const std::vector<Slot> a = attention_slots(c, m);
  const Kept ka = keep_of(a, lr);
  std::vector<Slot> mlp;
  Kept km;
  if (L.moe && selective(c, "moe")) {
    // `moe` recompute: only the layer's input (T, H; itself rebuilt from norm₂ under layernorm
    // recompute) and the router's loss weights stay; the backward re-runs router, dispatch and
    // experts (every slot and the pending state come back, transiently).
    mlp = moe_slots(c, m);
    const Kept all = keep_of(mlp, Rules{});
    const int64_t routing_state = m.T * m.k * 4 + m.T * m.E + row_map_bytes(c, m);
    km.device = (ln ? 0 : m.T * m.H * m.d) + moe_pending_bytes(c, m) - routing_state;
    km.restored = all.device + routing_state + (ln ? m.T * m.H * m.d : 0);
  } else if (L.moe) {
    mlp = moe_slots(c, m);
    km = keep_of(mlp, moe_rules(c));
    km.device += moe_pending_bytes(c, m);
  } else {
    mlp_slots("mlp.", c.dense_ffn(), false, c.gated_linear_unit, m, mlp, "");
    for (Slot& x : mlp) {
      x.elem = m.d;
      if (x.name == "mlp.fc1_input") x.regen = ln;  // rebuilt from norm₂'s input under layernorm recompute
    }
    km = keep_of(mlp, lr);
  }
  L.attention = ka.device;
  L.mlp = km.device;
  L.saved = ka.device + km.device;
  L.restored = ka.restored + km.restored;
  L.host = ka.host + km.host;

  const int64_t TH = m.T * m.H * m.d, nH = m.n * m.H * m.d;
  const int64_t gathered_kv = m.CP > 1 ? 2 * m.S * m.b * m.ng * m.hd * m.d : 0;  // k_all, v_all (S·b, ng, hd)
  const int64_t xg = m.TP > 1 ? nH : 0;                                           // sequence-parallel gather

  // A reduce-scatter of bf16 rows (in → out bytes) stages both through f32 on the host (the MPI
  // communicator reduces in f32).
  auto widened = [&](int64_t in, int64_t out) { return m.d == 2 ? 2 * (in + out) : 0; };

  // Forward transients. Attention: the gathered input, the fused qkv before its split, the
  // CP-gathered keys and values, the projection's partial sum and its reduce-scatter.
  const int64_t qkv = m.n * (m.nh + 2 * m.ng) * m.hd * m.d;
  const int64_t sp_rs = m.TP > 1 ? TH + widened(nH, TH) : 0;  // sequence-parallel reduce-scatter of (n, H)
  const int64_t attn_fwd = xg + std::max(qkv, gathered_kv + nH + sp_rs);
  int64_t mlp_fwd = 0;
  const int64_t Hd = m.H * m.d;
  if (L.moe) {
    const bool allgather = m.EP * m.ETP > 1 && c.moe_token_dispatcher_type == "allgather";
    const bool alltoall = m.EP * m.ETP > 1 && !allgather;
    const bool etp = m.ETP > 1;
    const int64_t routing = m.T * m.E * m.rb;  // probs (the routing map is pending state)
    const int64_t Nl = m.T * m.k;              // rows this rank sends (balanced); N_recv = Nl
    // Dispatch (beyond the rows and probs it returns, which the experts keep) and combine buffers.
    int64_t dispatch = 0, combine = 0;
    if (allgather) {
      dispatch = m.T_g * (Hd + m.E * m.pb + m.E + m.G + m.G * m.pb);
      combine = m.T_g * Hd + widened(m.T_g * Hd, TH);
    } else if (alltoall) {
      dispatch = Nl * (Hd + m.pb) + (etp ? Nl * (Hd + m.pb) + m.N * (Hd + m.pb) : 0);
      combine = (etp ? m.N * Hd + Nl * Hd + widened(m.N * Hd, Nl * Hd) : 0) + Nl * Hd;
    }
    const int64_t shared = c.has_shared_expert() ? m.T * m.TP * Hd + TH + (m.TP > 1 ? widened(m.T * m.TP * Hd, TH) : 0) : 0;
    mlp_fwd = routing + std::max(dispatch, m.N * Hd + combine + TH + shared);
    // Backward, on top of this layer's attention slots and dh: (A) the combine backward with every
    // slot of the layer (restored ones included) — its gathered or exchanged gradient and dy;
    // (B) the dispatch backward once the experts dropped their slots — dy, dx, dprobs and the
    // scatter buffers; (C) the router's backward.
    std::vector<Slot> ex;
    for (const Slot& x : mlp)
      if (x.name.starts_with("experts.")) ex.push_back(x);
    const int64_t experts_all = keep_of(ex, Rules{}).device;  // kept or restored, dropped by the experts' backward
    const int64_t dy = m.N * Hd + m.N * m.pb;
    const int64_t dx = TH + m.T * m.E * m.pb;  // dx, dprobs
    int64_t comb_bwd = 0, disp_bwd = 0;
    if (allgather) {
      comb_bwd = m.T_g * Hd;
      disp_bwd = m.T_g * (Hd + m.G * m.pb + m.E * m.pb) + TH + m.T * m.E * m.pb + widened(m.T_g * Hd, TH);
    } else if (alltoall) {
      comb_bwd = Nl * Hd + (etp ? Nl * Hd + m.N * Hd : 0);
      disp_bwd = Nl * (Hd + m.pb) + (etp ? m.N * (Hd + m.pb) + Nl * (Hd + m.pb) + widened(m.N * Hd, Nl * Hd) : 0);
    }
    const int64_t router_bwd = m.T * m.E * m.rb + (m.d != m.rb ? 2 * m.T * m.H * m.rb + TH : TH);
    L.bwd_peak = ka.device + std::max({km.restored + km.device + comb_bwd + dy,
                                       km.device + km.restored - experts_all + dy + dx + disp_bwd,
                                       km.device + km.restored - experts_all + dx + router_bwd});
  } else {
    const int64_t rows = m.T * m.TP;
    mlp_fwd = (m.TP > 1 ? rows * Hd : 0) + rows * Hd + (m.TP > 1 ? TH + widened(rows * Hd, TH) : 0);
    L.bwd_peak = km.restored + km.device + ka.device + 2 * rows * Hd + (m.TP > 1 ? TH + widened(rows * Hd, TH) : 0);
  }
  // Attention backward: dctx, the re-gathered keys and values, dq, dk_all, dv_all; then dqkv with
  // the re-gathered input and its partial gradient.
  const int64_t dkv_all = 2 * m.S / m.CP * m.CP * m.b * m.ng * m.hd * m.d;
  const int64_t attn_bwd = std::max(2 * m.n * m.nh * m.hd * m.d + gathered_kv + dkv_all,
                                    qkv + xg + nH + (m.TP > 1 ? TH : 0));
  L.bwd_peak = std::max(L.bwd_peak, ka.device + ka.restored + attn_bwd + TH + (m.TP > 1 ? widened(nH, TH) : 0));
  L.fwd_peak = std::max(ka.device + attn_fwd, L.saved + mlp_fwd);
  return L;
}

int64_t dtype_bytes(const std::string& name) { return static_cast<int64_t>(dtype_size(dtype_from_name(name))); }

// One parameter as the optimizer sees it.
struct Param {
  int64_t numel = 0;
  int64_t bytes_per = 4;
  bool expert = false, trainable = true;
};

}  // namespace

MemoryEstimate estimate_memory(const MoEConfig& config_in, const MemoryLayout& layout) {
  const MoEConfig c = resolve_model_config(config_in);
  const ParallelSizes& ps = layout.sizes;
  validate_model(c, ps.world);
  MOE_CHECK(c.num_layers > 0, "estimate_memory: the config is not a model config (num_layers = 0)");
  MOE_CHECK(ps.tp == c.tensor_model_parallel_size && ps.cp == c.context_parallel_size &&
                ps.pp == c.pipeline_model_parallel_size && ps.ep == c.expert_model_parallel_size && ps.etp == c.etp(),
            "estimate_memory: layout sizes (tp ", ps.tp, ", cp ", ps.cp, ", pp ", ps.pp, ", ep ", ps.ep, ", etp ", ps.etp,
            ") differ from the config's (tp ", c.tensor_model_parallel_size, ", cp ", c.context_parallel_size, ", pp ",
            c.pipeline_model_parallel_size, ", ep ", c.expert_model_parallel_size, ", etp ", c.etp(), ")");
  MOE_CHECK(layout.pp_rank >= 0 && layout.pp_rank < ps.pp, "estimate_memory: pp_rank ", layout.pp_rank,
            " out of range for pipeline_model_parallel_size ", ps.pp);
  MOE_CHECK(layout.micro_batch_size >= 1 && layout.num_microbatches >= 1,
            "estimate_memory: micro_batch_size and num_microbatches must be >= 1, got ", layout.micro_batch_size, " and ",
            layout.num_microbatches);
  MOE_CHECK(layout.optimizer == "adam" || layout.optimizer == "sgd", "estimate_memory: optimizer must be adam or sgd, got '",
            layout.optimizer, "'");
  const RankLayout rl = make_rank_layout(ps);

  Dims m{};
  m.b = layout.micro_batch_size;
  m.S = c.seq_length;
  m.TP = ps.tp;
  m.CP = ps.cp;
  m.EP = ps.ep;
  m.ETP = ps.etp;
  m.S_cp = m.S / m.CP;
  m.n = m.S_cp * m.b;
  m.T = m.S / (m.CP * m.TP) * m.b;
  m.H = c.hidden_size;
  m.V_l = c.vocab_size / m.TP;
  m.nh = c.num_attention_heads / m.TP;
  m.ng = c.query_groups() / m.TP;
  m.hd = c.head_dim();
  m.d = dtype_bytes(c.params_dtype);
  m.st = m.d == 8 ? 8 : 4;
  m.pb = m.st;
  m.rb = c.moe_router_dtype ? dtype_bytes(*c.moe_router_dtype) : m.st;
  m.layer_norm = c.normalization == "LayerNorm";
  const bool any_moe = c.num_moe_experts > 0;
  if (any_moe) {
    m.E = c.num_moe_experts;
    m.G = m.E / m.EP;
    m.k = c.moe_router_topk;
    m.F_l = c.moe_ffn_hidden_size / m.ETP;
    m.F1_l = c.gated_linear_unit ? 2 * m.F_l : m.F_l;
    m.T_g = m.T * m.ETP * m.EP;
    m.N = routed_rows(c, m);
  }

  MemoryEstimate e;
  e.pp_rank = layout.pp_rank;
  e.pp_size = ps.pp;
  const StageLayers sl = pipeline_stage_layers(c, layout.pp_rank);
  e.first_layer = sl.first;
  e.num_layers = sl.count;
  const bool first = layout.pp_rank == 0, last = layout.pp_rank == ps.pp - 1;
  const bool tied = !c.untie_embeddings_and_output_weights;
  e.has_embedding = first;
  e.has_output_layer = last;
  e.has_tied_copy = last && tied && !first;
  e.dp = rl.dp;
  e.edp = rl.edp;

  // ---- parameters (src/model/gpt_model.cpp, attention.cpp, norm.cpp; src/moe/*) ----
  const int64_t H = m.H, d = m.d;
  std::vector<Param> params;
  auto add = [&](int64_t numel, bool expert = false, int64_t bytes = -1, bool trainable = true) {
    params.push_back({numel, bytes < 0 ? d : bytes, expert, trainable});
  };
  const int64_t norm_params = m.layer_norm ? 2 * H : H;
  if (first || (last && tied)) add(m.V_l * H);  // word embedding (or its tied copy)
  if (first && c.position_embedding_type == "learned_absolute") add(c.seq_length * H);
  for (int64_t i = sl.first; i < sl.first + sl.count; ++i) {
    add(norm_params);
    add((m.nh + 2 * m.ng) * m.hd * H);  // linear_qkv
    if (c.qk_layernorm) {
      add(m.layer_norm ? 2 * m.hd : m.hd);
      add(m.layer_norm ? 2 * m.hd : m.hd);
    }
    add(H * m.nh * m.hd);  // linear_proj
    add(norm_params);
    const bool glu = c.gated_linear_unit;
    if (c.is_moe_layer(i)) {
      add(m.E * H);  // router
      if (c.moe_router_enable_expert_bias) add(m.E, false, 4, /*trainable=*/false);
      add(m.G * m.F1_l * H, true);  // experts fc1
      add(m.G * H * m.F_l, true);   // experts fc2
      if (c.has_shared_expert()) {
        const int64_t Fs = *c.moe_shared_expert_intermediate_size / m.TP;
        add((glu ? 2 * Fs : Fs) * H);
        add(H * Fs);
        if (c.moe_shared_expert_gate) add(H);
      }
    } else {
      const int64_t Fd = c.dense_ffn() / m.TP;
      add((glu ? 2 * Fd : Fd) * H);
      add(H * Fd);
    }
  }
  if (last) {
    add(norm_params);
    if (!tied) add(m.V_l * H);
  }

  // ---- weights, gradients, optimizer state (src/train/distributed_optimizer.cpp) ----
  const int64_t G_dense = rl.dp * ps.cp, G_expert = rl.edp;
  int64_t numel_bucket[2] = {0, 0}, master_bucket[2] = {0, 0}, largest = 0;
  for (const Param& p : params) {
    e.num_params += p.numel;
    e.weight_bytes += p.numel * p.bytes_per;
    if (!p.trainable) continue;
    e.gradient_bytes += p.numel * p.bytes_per;  // the parameter's own gradient
    numel_bucket[p.expert ? 1 : 0] += p.numel;
    if (p.bytes_per != 4) master_bucket[p.expert ? 1 : 0] += p.numel;
    largest = std::max(largest, p.numel);
  }
  const bool dist = layout.use_distributed_optimizer;
  const int moments = layout.optimizer == "adam" ? 2 : (layout.sgd_momentum != 0.0 ? 1 : 0);
  int64_t step_transient = 0, widest = 0;
  for (int bi = 0; bi < 2; ++bi) {
    const int64_t numel = numel_bucket[bi];
    if (numel == 0) continue;
    const int64_t Gs = bi == 0 ? G_dense : G_expert;
    const int64_t padded = (numel + Gs - 1) / Gs * Gs, shard = padded / Gs;
    e.gradient_bytes += padded * 4;  // f32 main grads: every element, padded
    // Owned elements: all of them, or this rank's shard (the padding holds no state).
    const int64_t owned = dist ? std::min(shard, numel) : numel;
    const int64_t owned_master = dist ? (master_bucket[bi] * owned + numel - 1) / numel : master_bucket[bi];
    e.optimizer_bytes += owned_master * 4 + static_cast<int64_t>(moments) * owned * 4;
    if (dist && Gs > 1) step_transient = std::max(step_transient, (shard + padded) * (master_bucket[bi] ? 2 : 4));
    widest = std::max(widest, std::min({largest, dist ? shard : numel, int64_t{1} << 20}));
  }
  step_transient += widest * 8;  // the norm's f64 chunk

  // ---- activations ----
  std::vector<Layer> layers;
  for (int64_t i = sl.first; i < sl.first + sl.count; ++i) layers.push_back(layer_model(c, m, i));
  // Full recompute (Megatron's checkpointed forward): uniform = chunks of N local layers, block = the
  // first N local layers each alone; a chunk keeps only its input (T, H) once it has run, and its
  // backward re-runs the chunk's forwards, so each layer's full slots come back then.
  const int64_t nl = static_cast<int64_t>(layers.size());
  std::vector<int64_t> chunk_first(static_cast<size_t>(nl), -1), full(static_cast<size_t>(nl), 0);
  if (c.recompute_granularity == "full") {
    const int64_t N = c.recompute_num_layers.value_or(0);
    MOE_CHECK(N >= 1 && N <= std::max<int64_t>(nl, 1), "estimate_memory: recompute_num_layers = ", N,
              " must be between 1 and the layers of pipeline stage ", layout.pp_rank, " (", nl, ")");
    const bool uniform = c.recompute_method.value_or("") == "uniform";
    for (int64_t k = 0; k < nl; ++k)
      chunk_first[static_cast<size_t>(k)] = uniform ? k / N * N : (k < N ? k : -1);
  }
  for (int64_t k = 0; k < nl; ++k) {
    Layer& L = layers[static_cast<size_t>(k)];
    full[static_cast<size_t>(k)] = L.saved;
    const int64_t cf = chunk_first[static_cast<size_t>(k)];
    if (cf < 0) continue;
    L.saved = cf == k ? m.T * H * d : 0;  // the chunk's input ("layer.input")
    L.attention = L.saved;
    L.mlp = 0;
    L.host = 0;
  }
  int64_t layers_saved = 0, restored_host = 0;
  for (const Layer& L : layers) {
    layers_saved += L.saved;
    restored_host += L.host;
    e.activation_items.push_back({"layer " + std::to_string(L.index) + " attention", L.attention});
    e.activation_items.push_back({"layer " + std::to_string(L.index) + (L.moe ? " moe" : " mlp"), L.mlp});
  }
  // Per micro-batch model state: positions (q_pos, k_pos), token ids (first), labels (last).
  int64_t mb_state = (m.S_cp + m.S) * 8;
  if (first) mb_state += m.n * 8 + m.T * 8;
  if (last) mb_state += m.n * 8;
  // Last stage: the final norm's slots, the output layer's input, logits and their statistics.
  int64_t head = 0, logits = 0;
  if (last) {
    std::vector<Slot> hs;
    norm_slots("final_layernorm", m.T, H, m, hs);
    hs.push_back({"output_layer.input", m.T * H * d, false, ""});
    head = keep_of(hs, Rules{}).device;
    logits = m.n * m.V_l * d + 3 * m.n * m.st;  // logits, row_max, (sum_exp, target)
    e.activation_items.push_back({"output layer", head + logits});
  }
  if (mb_state) e.activation_items.push_back({"ids and positions", mb_state});
  const int64_t per_mb = layers_saved + mb_state + head + logits;
  e.activation_bytes_per_microbatch = per_mb;
  e.offloaded_bytes = restored_host;

  const int64_t M = layout.num_microbatches;
  const int64_t in_flight = ps.pp > 1 ? std::min(ps.pp - layout.pp_rank, M) : 1;
  e.microbatches_in_flight = in_flight;
  // Persistent: each MoE layer's last routing (probs (T, E) in the router dtype) and the step's
  // input batches (tokens and labels i64).
  int64_t persistent = M * m.b * m.S * 16;
  for (const Layer& L : layers)
    if (L.moe) persistent += m.T * m.E * m.rb;
  const int64_t others = (in_flight - 1) * per_mb;  // other micro-batches in flight
  const int64_t TH = m.T * H * d;

  // The phases of a step, each: saved activations + transients on top (static excluded).
  struct Phase {
    std::string name;
    int64_t saved, transient;
  };
  std::vector<Phase> phases;
  // Σ of layers [0, k) as they stand while layer k runs: kept slots, but the full slots of the
  // earlier layers of k's own recompute chunk (it is running, or being re-run in the backward).
  auto held_before = [&](int64_t k) {
    int64_t b = 0;
    const int64_t cf = chunk_first[static_cast<size_t>(k)];
    for (int64_t j = 0; j < k; ++j)
      b += cf >= 0 && j >= cf ? full[static_cast<size_t>(j)] : layers[static_cast<size_t>(j)].saved;
    return b;
  };
  for (int64_t k = 0; k < nl; ++k) {
    const Layer& L = layers[static_cast<size_t>(k)];
    const int64_t own = full[static_cast<size_t>(k)];
    phases.push_back({"layer " + std::to_string(L.index) + " forward", others + mb_state + held_before(k) + own,
                      std::max<int64_t>(0, L.fwd_peak - own)});
  }
  const int64_t before = mb_state + layers_saved;
  if (last) {
    const int64_t nH = m.n * H * d;
    const int64_t hg = m.TP > 1 ? nH : 0;
    phases.push_back({"output layer forward", others + before + head + logits, hg + 3 * m.n * 8});
    // Backward: the loss gradient (n) next to the logits (overwritten by dlogits); the gathered
    // input for dW (TP > 1), then dhg (n, H) once the saved input (T, H) was dropped.
    phases.push_back({"output layer backward", others + before + head + logits,
                      m.n * (8 + m.st) + std::max(hg, nH - TH)});
  }
  for (int64_t k = nl; k-- > 0;) {
    const Layer& L = layers[static_cast<size_t>(k)];
    const int64_t own = full[static_cast<size_t>(k)];
    const int64_t grad_in = last ? TH : 2 * TH;  // dh (and the received output gradient)
    phases.push_back({"layer " + std::to_string(L.index) + " backward", others + mb_state + held_before(k),
                      std::max(L.bwd_peak, own + L.restored) + grad_in});
  }
  if (!last) phases.push_back({"stage output", others + before, 2 * TH});
  if (d != 4) phases.push_back({"gradient accumulation", others, largest * 4});
  phases.push_back({"optimizer step", 0, step_transient});

  const Phase* peak = &phases.front();
  for (const Phase& p : phases)
    if (p.saved + p.transient > peak->saved + peak->transient) peak = &p;
  // Reported as Megatron does: every in-flight micro-batch's saved activations (their most, at the
  // end of a forward) plus the persistent ones; the transient is what the peak phase adds beyond.
  e.activation_bytes = in_flight * per_mb + persistent;
  e.transient_bytes = std::max<int64_t>(0, peak->saved + peak->transient + persistent - e.activation_bytes);
  e.peak_phase = peak->name;
  e.total_bytes = e.static_bytes() + peak->saved + peak->transient + persistent;
  return e;
}

std::vector<MemoryEstimate> estimate_memory_per_stage(const MoEConfig& config, const MemoryLayout& layout) {
  std::vector<MemoryEstimate> out;
  for (int64_t s = 0; s < layout.sizes.pp; ++s) {
    MemoryLayout l = layout;
    l.pp_rank = s;
    out.push_back(estimate_memory(config, l));
  }
  return out;
}

std::string format_memory_estimate(const MemoryEstimate& e, const std::vector<int>& ranks) {
  auto mb = [](int64_t b) {
    char buf[48];
    std::snprintf(buf, sizeof buf, "%.2f MB", static_cast<double>(b) / 1048576.0);
    return std::string(buf);
  };
  std::ostringstream os;
  os << "[stage " << e.pp_rank << " of " << e.pp_size << ": ";
  if (e.num_layers > 0) os << "layers " << e.first_layer << "-" << e.first_layer + e.num_layers - 1;
  else os << "no layers";
  if (e.has_embedding) os << ", embedding";
  if (e.has_output_layer) os << ", output layer and loss";
  if (e.has_tied_copy) os << " (tied copy)";
  if (!ranks.empty()) {
    os << " | ranks ";
    for (size_t i = 0; i < ranks.size(); ++i) os << (i ? "," : "") << ranks[i];
  }
  os << "] Theoretical memory footprints: weight=" << mb(e.weight_bytes) << ", gradient=" << mb(e.gradient_bytes)
     << ", optimizer state=" << mb(e.optimizer_bytes)
     << ", weight and optimizer=" << mb(e.static_bytes()) << ", activation=" << mb(e.activation_bytes) << " ("
     << e.microbatches_in_flight << " micro-batch" << (e.microbatches_in_flight == 1 ? "" : "es") << " in flight x "
     << mb(e.activation_bytes_per_microbatch) << ")" << ", transient=" << mb(e.transient_bytes) << " ("
     << e.peak_phase << ")";
  if (e.offloaded_bytes > 0) os << ", offloaded to host=" << mb(e.offloaded_bytes * e.microbatches_in_flight);
  char gib[48];
  std::snprintf(gib, sizeof gib, "%.3f GiB", static_cast<double>(e.total_bytes) / 1073741824.0);
  os << ", total=" << mb(e.total_bytes) << " (" << gib << ")";
  return os.str();
}

}  // namespace moe
