// The MoE GPT model (docs/model.md): embedding → layers → final norm → output layer → cross entropy,
// and the backward read backwards.
//
//   forward                                                   backward
//   ids (S_cp·b) = tokens at this CP rank's positions          embedding_bwd(ids, all_gather_TP(dh))
//   h = reduce_scatter_TP(word_emb[ids])  (s_loc·b, H)        (+ pos_emb grads from dh)
//     (+ pos_emb[local positions])
//   for each layer:                                           for each layer, last first:
//     h1 = h + attention(norm₁(h))                              dh1 = dh2 + norm₂ᵀ(mlpᵀ(dh2))
//     h2 = h1 + mlp(norm₂(h1))   (MoE or dense)                dh  = dh1 + norm₁ᵀ(attentionᵀ(dh1))
//   hf = final_norm(h)                                         dh = final_normᵀ(reduce_scatter_TP(dhg))
//   hg = all_gather_TP(hf)  (S_cp·b, H)                        dW_out += dlogitsᵀ·hg, dhg = dlogits·W_out
//   logits = hg·W_outᵀ  (S_cp·b, V/TP)                         dlogits = g·(softmax − onehot),
//   ce = vocab-parallel cross entropy (max, sum over TP)        g = loss_scale·CP·mask / Σ mask
//   lm = Σ mask·ce / Σ mask  (Σ over CP)
//
// Rows of every (…·b, …) tensor are s-major: row s·b + bi is sequence bi at this rank's s-th position.
#include "moecore/model.h"

#include <algorithm>
#include <cmath>
#include <map>

#include "core/sanitize.h"
#include "device/ops.h"
#include "model/modules.h"
#include "moe/module_util.h"
#include "moecore/error.h"
#include "moecore/experts.h"
#include "moecore/parallel.h"

namespace moe {

SequenceLayout SequenceLayout::make(int64_t S, int64_t cp, int64_t tp, int64_t cp_rank, int64_t tp_rank) {
  MOE_CHECK(S >= 1 && cp >= 1 && tp >= 1 && S % (cp * tp) == 0 && (cp == 1 || S % (2 * cp) == 0),
            "SequenceLayout: seq_length ", S, " must be divisible by TP·CP = ", tp * cp,
            cp > 1 ? " and by 2·CP" : "", " (TP ", tp, ", CP ", cp, ")");
  MOE_CHECK(cp_rank >= 0 && cp_rank < cp && tp_rank >= 0 && tp_rank < tp, "SequenceLayout: ranks (cp ", cp_rank,
            ", tp ", tp_rank, ") out of range for CP ", cp, ", TP ", tp);
  SequenceLayout l;
  l.S = S;
  l.cp = cp;
  l.tp = tp;
  l.cp_rank = cp_rank;
  l.tp_rank = tp_rank;
  auto positions_of = [&](int64_t r) {
    std::vector<int64_t> pos;
    if (cp == 1) {
      for (int64_t s = 0; s < S; ++s) pos.push_back(s);
      return pos;
    }
    const int64_t chunk = S / (2 * cp);  // chunks r and 2·CP−1−r (Megatron's load balancing)
    for (int64_t c : {r, 2 * cp - 1 - r})
      for (int64_t s = 0; s < chunk; ++s) pos.push_back(c * chunk + s);
    return pos;
  };
  l.cp_positions = positions_of(cp_rank);
  const int64_t s_loc = S / (cp * tp);
  l.local_positions.assign(l.cp_positions.begin() + tp_rank * s_loc, l.cp_positions.begin() + (tp_rank + 1) * s_loc);
  for (int64_t r = 0; r < cp; ++r) {
    std::vector<int64_t> p = positions_of(r);
    l.key_positions.insert(l.key_positions.end(), p.begin(), p.end());
  }
  return l;
}

StageLayers pipeline_stage_layers(const MoEConfig& c, int64_t pp_rank) {
  const int64_t PP = c.pipeline_model_parallel_size, L = c.num_layers;
  MOE_CHECK(PP >= 1 && pp_rank >= 0 && pp_rank < PP, "pipeline_stage_layers: stage ", pp_rank,
            " out of range for pipeline_model_parallel_size ", PP);
  const auto& f = c.decoder_first_pipeline_num_layers;
  const auto& l = c.decoder_last_pipeline_num_layers;
  StageLayers s;
  if (!f && !l) {
    MOE_CHECK(L % PP == 0, "pipeline_stage_layers: num_layers ", L, " is not divisible by pipeline_model_parallel_size ",
              PP);
    s.count = L / PP;
    s.first = pp_rank * s.count;
    return s;
  }
  // Megatron's get_num_layers_to_build / get_transformer_layer_offset for an uneven split.
  const int64_t f_n = f.value_or(0), l_n = l.value_or(0);
  const int64_t middle_stages = PP - (f ? 1 : 0) - (l ? 1 : 0), middle_layers = L - f_n - l_n;
  const int64_t per_middle = middle_stages > 0 ? middle_layers / middle_stages : 0;
  if (pp_rank == 0 && f) {
    s.count = f_n;
  } else if (pp_rank == PP - 1 && l) {
    s.count = l_n;
  } else {
    s.count = per_middle;
  }
  s.first = pp_rank == 0 ? 0 : f_n + (pp_rank - (f ? 1 : 0)) * per_middle;
  MOE_CHECK(s.first >= 0 && s.count >= 0 && s.first + s.count <= L, "pipeline_stage_layers: stage ", pp_rank,
            " gets layers [", s.first, ", ", s.first + s.count, ") outside the model's ", L,
            " (validate_model refuses this split)");
  return s;
}

// One transformer layer of this stage: its norms, attention and MLP (dense or MoE).
struct TransformerLayer {
  int64_t index = 0;  // over the whole model
  std::unique_ptr<Norm> input_norm, pre_mlp_norm;
  std::unique_ptr<SelfAttention> attention;
  std::unique_ptr<MoELayer> moe;          // MoE layers
  std::unique_ptr<SharedExperts> dense;   // dense layers (the MLP of Megatron's local spec)
};

// What a pending forward of one micro-batch keeps for its backward. Created in place in the map
// and never moved: the dense MLPs' regenerate functions hold references to the stores.
struct MicroState {
  explicit MicroState(size_t num_layers) : layer_stores(num_layers) {}
  SeqBatch seq;
  ForwardContext ctx;
  Tensor ids, pos_ids, labels;     // (S_cp·b), (s_loc·b), (S_cp·b) i64 on the device (first / last stage)
  std::vector<double> mask;        // (S_cp·b) host (last stage)
  double mask_sum = 0;             // Σ mask over the micro-batch (all CP ranks)
  Tensor logits, row_max, sums;    // (S_cp·b, V/TP), (S_cp·b), (2, S_cp·b): sum_exp, target (last stage)
  ActivationStore head_store;      // embedding and output layer slots
  std::vector<ActivationStore> layer_stores;  // one per local layer: norm, attention, dense-MLP slots
  bool pending = false;
};

struct MoEGPTModel::Impl {
  std::shared_ptr<Communicator> tp, cp;
  int64_t V = 0, V_local = 0, vocab_start = 0;
  // word: the embedding on the first stage; on the last stage of a pipeline with tied embeddings,
  // its copy (the output layer). output: defined only when untied (last stage).
  Parameter word, position, output;
  std::vector<TransformerLayer> layers;  // this stage's
  std::unique_ptr<Norm> final_norm;      // last stage
  std::map<int64_t, MicroState> micro;   // pending forwards by micro-batch
  std::vector<int64_t> order;            // pending micro-batches in forward order
  // Full recompute (docs/memory.md): local layer k belongs to the recomputed chunk of local layers
  // [chunk_first[k], chunk_last[k]], or to none (-1).
  std::vector<int64_t> chunk_first, chunk_last;
  std::shared_ptr<OffloadManager> offload = std::make_shared<OffloadManager>();  // every micro-batch's stores

  Parameter& out_weight() { return output.value.defined() ? output : word; }
};

namespace {

bool selective(const MoEConfig& c, const char* module) {
  if (c.recompute_granularity != "selective") return false;
  if (c.recompute_modules.empty()) return std::string(module) == "core_attn";  // Megatron's default
  return std::find(c.recompute_modules.begin(), c.recompute_modules.end(), module) != c.recompute_modules.end();
}

bool offloads(const MoEConfig& c, const char* module) {
  return c.fine_grained_activation_offloading &&
         std::find(c.offload_modules.begin(), c.offload_modules.end(), module) != c.offload_modules.end();
}

// recompute_modules / offload_modules (Megatron's names) → the slot policies of a layer's store
// (norms, attention, dense MLP; the MoE layer applies its own). docs/memory.md lists them.
void apply_layer_policies(const MoEConfig& c, ActivationStore& store, const std::shared_ptr<OffloadManager>& offload) {
  store.set_offload_manager(offload);
  store.set_min_offload_numel(c.min_offloaded_tensor_size);
  if (selective(c, "core_attn")) store.set_policy("attention.lse", SavePolicy::recompute);
  if (selective(c, "mlp")) store.set_policy("mlp.", SavePolicy::recompute);
  if (selective(c, "layernorm")) {
    store.set_policy("attention.input", SavePolicy::recompute);
    store.set_policy("mlp.fc1_input", SavePolicy::recompute);
  }
  if (offloads(c, "attn_norm")) store.set_policy("input_layernorm.input", SavePolicy::offload);
  if (offloads(c, "mlp_norm")) store.set_policy("pre_mlp_layernorm.input", SavePolicy::offload);
  if (offloads(c, "attn_proj")) store.set_policy("attention.o", SavePolicy::offload);
  if (offloads(c, "core_attn"))
    for (const char* s : {"attention.q", "attention.k", "attention.v"}) store.set_policy(s, SavePolicy::offload);
}

// The MoE layers' context: (s_loc, b) tokens, router losses scaled like the lm loss.
ForwardContext moe_context(const ForwardContext& ctx, int64_t s_loc, int64_t b, int64_t cp) {
  ForwardContext m = ctx;
  m.seq_length = s_loc;
  m.batch_size = b;
  m.loss_scale = ctx.loss_scale * static_cast<double>(cp);
  return m;
}

// One transformer layer's forward: h (s_loc·b, H) → h + attn(norm₁(h)) + mlp(norm₂(·)).
// rerun: the full-recompute re-run of a pending micro-batch (the MoE layer counts nothing twice).
Tensor layer_forward(const MoEConfig& c, TransformerLayer& L, ActivationStore& store, const Tensor& h,
                     const SeqBatch& seq, const ForwardContext& mctx, bool rerun) {
  const int64_t H = c.hidden_size, s_loc = seq.s_loc, b = seq.b;
  const bool ln_recompute = selective(c, "layernorm");
  sanitize::set_module("input_layernorm");
  Tensor a = L.input_norm->forward(h, store, "input_layernorm");  // (s_loc·b, H)
  sanitize::set_module("self_attention");
  Tensor h1 = L.attention->forward(a, seq, store);  // (s_loc·b, H)
  Norm* n1 = L.input_norm.get();
  if (ln_recompute)  // layernorm recompute: norm₁'s output is rebuilt from its kept input
    store.save("attention.input", a, [n1, &store] { return n1->apply(store.get("input_layernorm.input")); });
  a = Tensor();
  ops::add_(h1, h);
  sanitize::set_module("pre_mlp_layernorm");
  Tensor a2 = L.pre_mlp_norm->forward(h1, store, "pre_mlp_layernorm");  // (s_loc·b, H)
  Norm* n2 = L.pre_mlp_norm.get();
  ActivationStore::Regenerate norm2 = [n2, &store] { return n2->apply(store.get("pre_mlp_layernorm.input")); };
  sanitize::set_module("mlp");
  Tensor h2;  // (s_loc·b, H)
  if (L.moe) {
    const int64_t mb = mctx.microbatch;
    Tensor x3 = a2.view({s_loc, b, H});  // (s_loc, b, H)
    h2 = (rerun ? L.moe->recompute_forward(x3, mb) : L.moe->forward(x3, mctx)).view({s_loc * b, H});
    if (ln_recompute) {  // the MoE layer's slots that hold norm₂'s output itself
      ActivationStore& ms = L.moe->store(mb);
      for (const char* s : {"router.input", "shared_experts.fc1_input", "moe.input"})
        if (ms.has(s) && ms.saved_policy(s) == SavePolicy::keep && ms.get(s).shares_storage_with(a2)) {
          ms.set_policy(s, SavePolicy::recompute);
          ms.save(s, a2, [norm2] { return norm2(); });
        }
    }
  } else {
    h2 = L.dense->forward(a2, store);
    if (ln_recompute) store.save("mlp.fc1_input", a2, norm2);
  }
  ops::add_(h2, h1);
  return h2;
}

Tensor i64_tensor(const std::vector<int64_t>& v, Device device) {
  return Tensor::from_vector(v, {static_cast<int64_t>(v.size())}).to(device);
}

std::vector<double> host_f64(const Tensor& t) {
  Tensor h = t.device().is_cpu() ? t : t.to(Device::cpu());
  if (h.dtype() == DType::f64) return h.to_vector<double>();
  return h.to_dtype(DType::f64).to_vector<double>();
}

}  // namespace

MoEGPTModel::MoEGPTModel(const MoEConfig& config, Device device, std::shared_ptr<ProcessGroups> groups)
    : config_(resolve_model_config(config)), device_(device), groups_(std::move(groups)), impl_(std::make_unique<Impl>()) {
  const int64_t W = groups_ ? groups_->world().size() : 1;
  validate_model(config_, W);
  Impl& m = *impl_;
  if (groups_ && W > 1) {
    m.tp = groups_->group_ptr(GroupKind::tp);
    m.cp = groups_->group_ptr(GroupKind::cp);
    pp_size_ = groups_->pp().size();
    pp_rank_ = groups_->pp().rank();
  }
  MOE_CHECK(pp_size_ == config_.pipeline_model_parallel_size, "MoEGPTModel: the process groups have ", pp_size_,
            " pipeline stages but the config asks for pipeline_model_parallel_size = ",
            config_.pipeline_model_parallel_size);
  stage_ = pipeline_stage_layers(config_, pp_rank_);
  // Full recompute (Megatron's checkpointed_forward): uniform = chunks of N local layers, each
  // keeping its input; block = the first N local layers, each its own chunk; the rest not.
  m.chunk_first.assign(static_cast<size_t>(stage_.count), -1);
  m.chunk_last.assign(static_cast<size_t>(stage_.count), -1);
  if (config_.recompute_granularity == "full") {
    const int64_t N = config_.recompute_num_layers.value_or(0);
    MOE_CHECK(N >= 1 && N <= std::max<int64_t>(stage_.count, 1), "MoEGPTModel: recompute_num_layers = ", N,
              " must be between 1 and the layers of pipeline stage ", pp_rank_, " (", stage_.count, ")");
    const bool uniform = config_.recompute_method.value_or("") == "uniform";
    for (int64_t k = 0; k < stage_.count; ++k) {
      if (uniform) {
        m.chunk_first[static_cast<size_t>(k)] = k / N * N;
        m.chunk_last[static_cast<size_t>(k)] = std::min(k / N * N + N, stage_.count) - 1;
      } else if (k < N) {
        m.chunk_first[static_cast<size_t>(k)] = m.chunk_last[static_cast<size_t>(k)] = k;
      }
    }
  }
  const int64_t tp = m.tp ? m.tp->size() : 1, tp_rank = m.tp ? m.tp->rank() : 0;
  const int64_t cp = m.cp ? m.cp->size() : 1, cp_rank = m.cp ? m.cp->rank() : 0;
  layout_ = SequenceLayout::make(config_.seq_length, cp, tp, cp_rank, tp_rank);

  const MoEConfig& c = config_;
  const int64_t H = c.hidden_size;
  const DType dt = dtype_from_name(c.params_dtype);
  const bool first = is_first_stage(), last = is_last_stage(), tied = !c.untie_embeddings_and_output_weights;
  m.V = c.vocab_size;
  m.V_local = m.V / tp;
  m.vocab_start = tp_rank * m.V_local;
  const std::vector<DimShard> vocab_shard = {DimShard{0, m.vocab_start, m.V_local, false}};
  // Both ends of a pipeline draw the word embedding from its canonical name: the copies start equal
  // (Megatron zeroes the last stage's copy and all-reduces it over the embedding group instead).
  if (first || (last && tied))
    m.word = make_parameter("embedding.word_embeddings.weight", {m.V, H}, vocab_shard, dt, device, c.seed,
                            c.init_method_std, GradGroup::dense);
  if (first && c.position_embedding_type == "learned_absolute")
    m.position = make_parameter("embedding.position_embeddings.weight", {c.seq_length, H}, {}, dt, device, c.seed,
                                c.init_method_std, GradGroup::sequence_parallel);
  for (int64_t i = stage_.first; i < stage_.first + stage_.count; ++i) {
    const std::string pre = "decoder.layers." + std::to_string(i) + ".";
    TransformerLayer layer;
    layer.index = i;
    layer.input_norm = std::make_unique<Norm>(c, device, pre + "input_layernorm", H);
    layer.attention = std::make_unique<SelfAttention>(c, device, pre + "self_attention.", m.tp, m.cp);
    layer.pre_mlp_norm = std::make_unique<Norm>(c, device, pre + "pre_mlp_layernorm", H);
    if (c.is_moe_layer(i))
      layer.moe = std::make_unique<MoELayer>(c, device, groups_ && W > 1 ? groups_ : nullptr, i, pre + "mlp.",
                                             /*pipeline_stage=*/true);
    else
      layer.dense = std::make_unique<SharedExperts>(c, device, m.tp, "mlp.", MlpSpec{pre + "mlp.", c.dense_ffn(), false});
    m.layers.push_back(std::move(layer));
  }
  if (last) {
    m.final_norm = std::make_unique<Norm>(c, device, "decoder.final_layernorm", H);
    if (!tied)
      m.output = make_parameter("output_layer.weight", {m.V, H}, vocab_shard, dt, device, c.seed, c.init_method_std,
                                GradGroup::dense);
  }
  // Megatron's embedding group: the first and last stage of each pipeline (split off the world by
  // every rank; the others land in groups of their own).
  if (pp_size_ > 1 && tied) {
    const RankLayout& lay = groups_->layout();
    const int me = groups_->rank();
    const int color = (first || last) ? lay.group_index(GroupKind::pp, me)
                                      : static_cast<int>(lay.of(GroupKind::pp).size()) + me;
    std::shared_ptr<Communicator> g = groups_->world().split(color, static_cast<int>(pp_rank_), "embedding");
    if (first || last) embedding_group_ = std::move(g);
  }
}

MoEGPTModel::~MoEGPTModel() = default;

int64_t MoEGPTModel::num_layers() const { return config_.num_layers; }

MoELayer* MoEGPTModel::moe_layer(int64_t layer) {
  MOE_CHECK(layer >= 0 && layer < num_layers(), "MoEGPTModel::moe_layer: layer ", layer, " out of range [0, ",
            num_layers(), ")");
  if (!has_layer(layer)) return nullptr;
  return impl_->layers[static_cast<size_t>(layer - stage_.first)].moe.get();
}

Parameter* MoEGPTModel::shared_embedding_copy() {
  return pp_size_ > 1 && is_last_stage() && impl_->word.value.defined() ? &impl_->word : nullptr;
}

double MoEGPTModel::forward(const MicroBatch& batch, const ForwardContext& ctx, bool keep_logits) {
  MOE_CHECK_CODE(pp_size_ == 1, ErrorCode::invalid_argument, "MoEGPTModel::forward: with pipeline_model_parallel_size = ",
                 pp_size_, " a forward spans the stages: use run_schedule (or forward_stage on each stage)");
  double loss = 0.0;
  forward_stage(batch, ctx, Tensor(), &loss, keep_logits);
  return loss;
}

void MoEGPTModel::backward() {
  MOE_CHECK(!impl_->order.empty(), "MoEGPTModel::backward called without a forward");
  MOE_CHECK_CODE(pp_size_ == 1, ErrorCode::invalid_argument,
                 "MoEGPTModel::backward: with pipeline_model_parallel_size > 1 use run_schedule (or backward_stage)");
  backward_stage(impl_->order.back(), Tensor());
}

void MoEGPTModel::release(int64_t mb) {
  Impl& m = *impl_;
  for (TransformerLayer& L : m.layers)
    if (L.moe) L.moe->release(mb);
  m.micro.erase(mb);
  m.order.erase(std::remove(m.order.begin(), m.order.end(), mb), m.order.end());
}

void MoEGPTModel::release_all() {
  std::vector<int64_t> ids = impl_->order;  // and states a failed forward left half made
  for (const auto& [mb, st] : impl_->micro) ids.push_back(mb);
  for (int64_t mb : ids) release(mb);
}

int64_t MoEGPTModel::pending_microbatches() const { return static_cast<int64_t>(impl_->order.size()); }

int64_t MoEGPTModel::saved_activation_bytes() const {
  const Impl& m = *impl_;
  int64_t b = 0;
  for (const auto& [mb, st] : m.micro) {
    b += st.head_store.device_bytes();
    for (const ActivationStore& s : st.layer_stores) b += s.device_bytes();
    for (const Tensor* t : {&st.ids, &st.pos_ids, &st.labels, &st.logits, &st.row_max, &st.sums})
      if (t->defined()) b += static_cast<int64_t>(t->nbytes());
  }
  for (const TransformerLayer& L : m.layers)
    if (L.moe) b += L.moe->saved_device_bytes();
  return b;
}

Tensor MoEGPTModel::forward_stage(const MicroBatch& batch, const ForwardContext& ctx, const Tensor& input,
                                  double* lm_loss, bool keep_logits) {
  Impl& m = *impl_;
  const MoEConfig& c = config_;
  const int64_t S = c.seq_length, H = c.hidden_size, V = m.V;
  const bool first = is_first_stage(), last = is_last_stage();
  const DType dt = dtype_from_name(c.params_dtype);
  const char* who = "MoEGPTModel::forward";
  MOE_CHECK(batch.tokens.defined() && batch.tokens.ndim() == 2 && batch.tokens.size(1) == S &&
                batch.tokens.dtype() == DType::i64,
            who, ": tokens must be (b, seq_length=", S, ") i64, got ",
            batch.tokens.defined() ? batch.tokens.desc() : std::string("undefined"));
  const int64_t b = batch.tokens.size(0);
  MOE_CHECK(b >= 1, who, ": the micro-batch has no sequences");
  std::vector<int64_t> tokens, labels;
  std::vector<float> mask_full;
  if (first) {
    tokens = batch.tokens.to(Device::cpu()).to_vector<int64_t>();
    for (int64_t i = 0; i < b * S; ++i)
      MOE_CHECK(tokens[i] >= 0 && tokens[i] < V, who, ": token id ", tokens[i], " at (", i / S, ", ", i % S,
                ") is outside the vocabulary [0, vocab_size=", V, ")");
  }
  if (last) {
    MOE_CHECK(batch.labels.defined() && batch.labels.dtype() == DType::i64, who, ": labels must be (", b, ", ", S,
              ") i64, got ", batch.labels.defined() ? batch.labels.desc() : std::string("undefined"));
    batch.labels.check_shape({b, S}, "MoEGPTModel::forward: labels");
    if (batch.loss_mask.defined()) {
      batch.loss_mask.check_shape({b, S}, "MoEGPTModel::forward: loss_mask");
      batch.loss_mask.check_dtype(DType::f32, "MoEGPTModel::forward: loss_mask");
    }
    labels = batch.labels.to(Device::cpu()).to_vector<int64_t>();
    mask_full.assign(static_cast<size_t>(b * S), 1.0f);
    if (batch.loss_mask.defined()) mask_full = batch.loss_mask.to(Device::cpu()).to_vector<float>();
    for (int64_t i = 0; i < b * S; ++i)
      MOE_CHECK(labels[i] >= 0 && labels[i] < V, who, ": label id ", labels[i], " at (", i / S, ", ", i % S,
                ") is outside the vocabulary [0, vocab_size=", V, ")");
  }
  const SequenceLayout& lay = layout_;
  const int64_t S_cp = lay.s_cp(), s_loc = lay.s_local(), n = S_cp * b;
  if (first) {
    MOE_CHECK(!input.defined(), who, ": the first pipeline stage embeds the tokens; its input must be undefined, got ",
              input.desc());
  } else {
    MOE_CHECK(input.defined(), who, ": pipeline stage ", pp_rank_, " needs the previous stage's output (",
              s_loc * b, ", ", H, ")");
    input.check_shape({s_loc * b, H}, "MoEGPTModel::forward_stage: input");
    input.check_dtype(dt, "MoEGPTModel::forward_stage: input");
    MOE_CHECK(input.device() == device_, who, ": input must be on ", device_.str(), ", got ", input.desc());
  }

  // A pending forward of this micro-batch is replaced.
  const int64_t mb = ctx.microbatch;
  sanitize::PassScope where_pass("forward", ctx.step, mb);  // names step, micro-batch, layer, module in errors
  release(mb);
  MicroState& st = m.micro.try_emplace(mb, m.layers.size()).first->second;
  st.seq.b = b;
  st.seq.s_cp = S_cp;
  st.seq.s_loc = s_loc;
  st.seq.q_pos = i64_tensor(lay.cp_positions, device_);
  st.seq.k_pos = i64_tensor(lay.key_positions, device_);
  st.ctx = ctx;

  // This rank's rows, s-major: (S_cp·b) at the CP positions, (s_loc·b) at its own positions.
  Tensor h;  // (s_loc·b, H)
  if (first) {
    std::vector<int64_t> ids(static_cast<size_t>(n)), pos(static_cast<size_t>(s_loc * b));
    for (int64_t s = 0; s < S_cp; ++s)
      for (int64_t bi = 0; bi < b; ++bi) ids[s * b + bi] = tokens[bi * S + lay.cp_positions[s]];
    for (int64_t s = 0; s < s_loc; ++s)
      for (int64_t bi = 0; bi < b; ++bi) pos[s * b + bi] = lay.local_positions[s];
    st.ids = i64_tensor(ids, device_);
    st.pos_ids = i64_tensor(pos, device_);
    // Embedding: vocab-parallel rows summed over TP and scattered to this rank's rows.
    Tensor emb = Tensor::empty({n, H}, dt, device_);  // (S_cp·b, H) partial over TP
    sanitize::set_module("embedding");
    ops::embedding_fwd(st.ids, m.word.value, m.vocab_start, emb, false);
    h = sp_reduce_scatter(m.tp, emb);  // (s_loc·b, H)
    emb = Tensor();
    if (m.position.value.defined()) ops::embedding_fwd(st.pos_ids, m.position.value, 0, h, true);
  } else {
    h = input;  // read only: every layer adds into fresh tensors
  }

  // Layers. The MoE layers see (s_loc, b, H) with the router losses scaled like the lm loss. Under
  // full recompute a chunk's layers keep nothing but the chunk's input once the chunk has run.
  const ForwardContext mctx = moe_context(ctx, s_loc, b, lay.cp);
  for (ActivationStore& store : st.layer_stores) apply_layer_policies(c, store, m.offload);
  Tensor chunk_input;  // (s_loc·b, H)
  for (size_t k = 0; k < m.layers.size(); ++k) {
    sanitize::LayerScope where_layer(stage_.first + static_cast<int64_t>(k));
    const int64_t first = m.chunk_first[k];
    if (first == static_cast<int64_t>(k)) chunk_input = h;
    h = layer_forward(c, m.layers[k], st.layer_stores[k], h, st.seq, mctx, /*rerun=*/false);  // (s_loc·b, H)
    if (first >= 0 && m.chunk_last[k] == static_cast<int64_t>(k)) {
      for (int64_t j = first; j <= static_cast<int64_t>(k); ++j) {
        if (m.layers[static_cast<size_t>(j)].moe) m.layers[static_cast<size_t>(j)].moe->discard_saved(mb);
        st.layer_stores[static_cast<size_t>(j)].clear();
      }
      st.layer_stores[static_cast<size_t>(first)].save("layer.input", chunk_input);
      chunk_input = Tensor();
    }
  }

  if (!last) {
    logits_ = Tensor();
    if (lm_loss) *lm_loss = 0.0;
    st.pending = true;
    m.order.push_back(mb);
    return h;  // (s_loc·b, H) for the next stage
  }

  // Final norm, output layer and the vocab-parallel cross entropy.
  std::vector<int64_t> lab(static_cast<size_t>(n));
  st.mask.assign(static_cast<size_t>(n), 0.0);
  for (int64_t s = 0; s < S_cp; ++s)
    for (int64_t bi = 0; bi < b; ++bi) {
      const int64_t src = bi * S + lay.cp_positions[s], dst = s * b + bi;
      lab[dst] = labels[src];
      st.mask[dst] = mask_full[src];
    }
  st.labels = i64_tensor(lab, device_);
  sanitize::set_module("final_layernorm");
  Tensor hf = m.final_norm->forward(h, st.head_store, "final_layernorm");  // (s_loc·b, H)
  sanitize::set_module("output_layer");
  st.head_store.save("output_layer.input", hf);
  Tensor hg = sp_all_gather(m.tp, hf);                                   // (S_cp·b, H)
  st.logits = ops::matmul(hg, false, m.out_weight().value, true);        // (S_cp·b, V/TP)
  hg = Tensor();
  const DType stt = ops::stat_dtype_for(dt);
  sanitize::set_module("cross_entropy");
  st.row_max = Tensor::empty({n}, stt, device_);  // (S_cp·b)
  ops::xent_max(st.logits, st.row_max);
  if (sp_active(m.tp)) m.tp->all_reduce(st.row_max, ReduceOp::max);
  st.sums = Tensor::empty({2, n}, stt, device_);  // (2, S_cp·b): sum_exp, target logit
  Tensor sum_exp = st.sums.narrow(0, 1).view({n}), target = st.sums.narrow(1, 1).view({n});
  ops::xent_sum(st.logits, st.labels, m.vocab_start, st.row_max, sum_exp, target);
  if (sp_active(m.tp)) m.tp->all_reduce(st.sums);
  const std::vector<double> mx = host_f64(st.row_max), sums = host_f64(st.sums);
  double num_den[2] = {0.0, 0.0};
  for (int64_t i = 0; i < n; ++i) {
    const double ce = std::log(sums[i]) + mx[i] - sums[n + i];
    num_den[0] += st.mask[i] * ce;
    num_den[1] += st.mask[i];
  }
  if (sp_active(m.cp)) {
    Tensor t = Tensor::from_vector(std::vector<double>{num_den[0], num_den[1]}, {2});
    m.cp->all_reduce(t);
    std::vector<double> v = t.to_vector<double>();
    num_den[0] = v[0];
    num_den[1] = v[1];
  }
  st.mask_sum = num_den[1];
  if (keep_logits) {
    Tensor l = st.logits.device().is_cpu() ? st.logits : st.logits.to(Device::cpu());
    logits_ = (l.dtype() == DType::f32 ? l.clone() : l.to_dtype(DType::f32)).view({S_cp, b, m.V_local});
  } else {
    logits_ = Tensor();
  }
  st.pending = true;
  m.order.push_back(mb);
  // A micro-batch whose mask is all zeros has no loss and no gradient (Megatron would divide by 0).
  if (lm_loss) *lm_loss = st.mask_sum > 0 ? num_den[0] / st.mask_sum : 0.0;
  return Tensor();
}

Tensor MoEGPTModel::backward_stage(int64_t mb, const Tensor& output_grad) {
  Impl& m = *impl_;
  auto it = m.micro.find(mb);
  MOE_CHECK(it != m.micro.end() && it->second.pending, "MoEGPTModel::backward: micro-batch ", mb,
            " has no pending forward (backward called twice, or without a forward)");
  MicroState& st = it->second;
  sanitize::PassScope where_pass("backward", st.ctx.step, mb);
  const int64_t H = config_.hidden_size, n = st.seq.s_cp * st.seq.b, s_loc = st.seq.s_loc, b = st.seq.b;
  const bool first = is_first_stage(), last = is_last_stage();

  Tensor dh;  // (s_loc·b, H): the gradient of this stage's output
  if (last) {
    MOE_CHECK(!output_grad.defined(), "MoEGPTModel::backward: the last pipeline stage starts from its loss; ",
              "output_grad must be undefined, got ", output_grad.desc());
    // Cross entropy and the output layer: dlogits overwrites the logits.
    const DType stt = st.row_max.dtype();
    std::vector<double> g(static_cast<size_t>(n), 0.0);
    const double scale = st.ctx.loss_scale * static_cast<double>(layout_.cp);
    for (int64_t i = 0; i < n; ++i) g[i] = st.mask_sum > 0 ? scale * st.mask[i] / st.mask_sum : 0.0;
    Tensor grad = Tensor::from_vector(g, {n}).to_dtype(stt).to(device_);  // (S_cp·b) stat
    sanitize::set_module("cross_entropy");
    Tensor sum_exp = st.sums.narrow(0, 1).view({n});
    ops::xent_bwd(st.logits, st.labels, m.vocab_start, st.row_max, sum_exp, grad, st.logits);
    Tensor dlogits = st.logits;  // (S_cp·b, V/TP)
    st.logits = st.row_max = st.sums = Tensor();
    Parameter& W = m.out_weight();
    sanitize::set_module("output_layer");
    Tensor hg = sp_all_gather(m.tp, st.head_store.get("output_layer.input"));  // (S_cp·b, H)
    st.head_store.drop("output_layer.input");
    ops::gemm(dlogits, true, hg, false, W.grad, 1.0, 1.0);
    hg = Tensor();
    Tensor dhg = ops::matmul(dlogits, false, W.value, false);  // (S_cp·b, H) partial over TP (vocab)
    dlogits = Tensor();
    sanitize::set_module("final_layernorm");
    dh = m.final_norm->backward(sp_reduce_scatter(m.tp, dhg), st.head_store, "final_layernorm");  // (s_loc·b, H)
  } else {
    MOE_CHECK(output_grad.defined(), "MoEGPTModel::backward: pipeline stage ", pp_rank_,
              " needs the gradient of its output (", s_loc * b, ", ", H, ") from the next stage");
    output_grad.check_shape({s_loc * b, H}, "MoEGPTModel::backward_stage: output_grad");
    output_grad.check_dtype(dtype_from_name(config_.params_dtype), "MoEGPTModel::backward_stage: output_grad");
    dh = output_grad;  // read only
  }

  // Layers, last first. A fully recomputed chunk re-runs its forwards from its input first.
  const ForwardContext mctx = moe_context(st.ctx, s_loc, b, layout_.cp);
  for (size_t k = m.layers.size(); k-- > 0;) {
    TransformerLayer& L = m.layers[k];
    ActivationStore& store = st.layer_stores[k];
    sanitize::LayerScope where_layer(stage_.first + static_cast<int64_t>(k));
    if (m.chunk_first[k] >= 0 && m.chunk_last[k] == static_cast<int64_t>(k)) {
      const size_t first = static_cast<size_t>(m.chunk_first[k]);
      Tensor hx = st.layer_stores[first].get("layer.input");  // (s_loc·b, H)
      st.layer_stores[first].drop("layer.input");
      for (size_t j = first; j <= k; ++j)
        hx = layer_forward(config_, m.layers[j], st.layer_stores[j], hx, st.seq, mctx, /*rerun=*/true);
    }
    sanitize::set_module("mlp");
    Tensor da2;  // (s_loc·b, H)
    if (L.moe) {
      da2 = L.moe->backward(dh.view({s_loc, b, H}), mb).view({s_loc * b, H});
    } else {
      L.dense->backward(dh, da2, store);
    }
    sanitize::set_module("pre_mlp_layernorm");
    Tensor dh1 = L.pre_mlp_norm->backward(da2, store, "pre_mlp_layernorm");  // (s_loc·b, H)
    ops::add_(dh1, dh);
    sanitize::set_module("self_attention");
    Tensor da = L.attention->backward(dh1, st.seq, store);                // (s_loc·b, H)
    sanitize::set_module("input_layernorm");
    Tensor dh0 = L.input_norm->backward(da, store, "input_layernorm");  // (s_loc·b, H)
    ops::add_(dh0, dh1);
    dh = dh0;
    store.clear();
  }

  Tensor input_grad;
  if (first) {
    // Embedding: positions from this rank's rows, words from the TP-gathered rows.
    sanitize::set_module("embedding");
    if (m.position.value.defined()) ops::embedding_bwd(st.pos_ids, dh, 0, m.position.grad);
    Tensor dhg_emb = sp_all_gather(m.tp, dh);  // (S_cp·b, H)
    ops::embedding_bwd(st.ids, dhg_emb, m.vocab_start, m.word.grad);
  } else {
    input_grad = dh;  // (s_loc·b, H) for the previous stage
  }
  m.micro.erase(it);
  m.order.erase(std::remove(m.order.begin(), m.order.end(), mb), m.order.end());
  return input_grad;
}

void MoEGPTModel::finish_step() {
  for (TransformerLayer& L : impl_->layers)
    if (L.moe) L.moe->finish_step();
}

void MoEGPTModel::finish_grads_pipeline(const std::function<Tensor(Parameter&)>& grad_of) {
  if (!embedding_group_ || embedding_group_->size() == 1) return;
  Parameter& w = impl_->word;
  MOE_CHECK_CODE(w.value.defined(), ErrorCode::internal, "MoEGPTModel::finish_grads_pipeline: stage ", pp_rank_,
                 " is in the embedding group but holds no word embedding");
  Tensor g = grad_of ? grad_of(w) : w.grad;
  MOE_CHECK(g.defined() && g.numel() == w.value.numel(), "MoEGPTModel::finish_grads_pipeline: the gradient of '",
            w.name, "' must have its ", w.value.numel(), " local elements, got ",
            g.defined() ? g.desc() : std::string("undefined"));
  embedding_group_->all_reduce(g);
}

std::vector<Parameter*> MoEGPTModel::parameters() {
  Impl& m = *impl_;
  std::vector<Parameter*> out;
  if (is_first_stage()) {
    out.push_back(&m.word);
    if (m.position.value.defined()) out.push_back(&m.position);
  }
  for (TransformerLayer& L : m.layers) {
    L.input_norm->parameters(out);
    L.attention->parameters(out);
    L.pre_mlp_norm->parameters(out);
    if (L.moe) {
      for (Parameter* p : L.moe->parameters()) out.push_back(p);
    } else {
      out.push_back(&L.dense->fc1());
      out.push_back(&L.dense->fc2());
    }
  }
  if (is_last_stage()) {
    m.final_norm->parameters(out);
    if (m.output.value.defined()) out.push_back(&m.output);
    else if (!is_first_stage()) out.push_back(&m.word);  // the tied copy of a pipeline's last stage
  }
  return out;
}

Parameter* MoEGPTModel::find_parameter(const std::string& name) {
  for (Parameter* p : parameters())
    if (p->name == name) return p;
  return nullptr;
}

void MoEGPTModel::zero_grad() {
  for (Parameter* p : parameters()) p->zero_grad();
}

}  // namespace moe
