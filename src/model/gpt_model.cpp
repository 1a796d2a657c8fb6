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

// One transformer layer: its norms, attention, MLP (dense or MoE) and its slots.
struct TransformerLayer {
  std::unique_ptr<Norm> input_norm, pre_mlp_norm;
  std::unique_ptr<SelfAttention> attention;
  std::unique_ptr<MoELayer> moe;          // MoE layers
  std::unique_ptr<SharedExperts> dense;   // dense layers (the MLP of Megatron's local spec)
  ActivationStore store;
  int64_t s_loc = 0, b = 0;
};

struct MoEGPTModel::Impl {
  std::shared_ptr<Communicator> tp, cp;
  int64_t V = 0, V_local = 0, vocab_start = 0;
  Parameter word, position, output;  // output defined only when untied
  std::vector<TransformerLayer> layers;
  std::unique_ptr<Norm> final_norm;
  ActivationStore head_store;  // embedding and output layer slots
  // The pending forward.
  SeqBatch seq;
  ForwardContext ctx;
  Tensor ids, pos_ids, labels;     // (S_cp·b), (s_loc·b), (S_cp·b) i64 on the device
  std::vector<double> mask;        // (S_cp·b) host
  double mask_sum = 0;             // Σ mask over the micro-batch (all CP ranks)
  Tensor logits, row_max, sums;    // (S_cp·b, V/TP), (S_cp·b), (2, S_cp·b): sum_exp, target
  bool pending = false;

  Parameter& out_weight() { return output.value.defined() ? output : word; }
};

namespace {

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
  }
  const int64_t tp = m.tp ? m.tp->size() : 1, tp_rank = m.tp ? m.tp->rank() : 0;
  const int64_t cp = m.cp ? m.cp->size() : 1, cp_rank = m.cp ? m.cp->rank() : 0;
  layout_ = SequenceLayout::make(config_.seq_length, cp, tp, cp_rank, tp_rank);

  const MoEConfig& c = config_;
  const int64_t H = c.hidden_size, L = c.num_layers;
  const DType dt = dtype_from_name(c.params_dtype);
  m.V = c.vocab_size;
  m.V_local = m.V / tp;
  m.vocab_start = tp_rank * m.V_local;
  const std::vector<DimShard> vocab_shard = {DimShard{0, m.vocab_start, m.V_local, false}};
  m.word = make_parameter("embedding.word_embeddings.weight", {m.V, H}, vocab_shard, dt, device, c.seed,
                          c.init_method_std, GradGroup::dense);
  if (c.position_embedding_type == "learned_absolute")
    m.position = make_parameter("embedding.position_embeddings.weight", {c.seq_length, H}, {}, dt, device, c.seed,
                                c.init_method_std, GradGroup::sequence_parallel);
  for (int64_t i = 0; i < L; ++i) {
    const std::string pre = "decoder.layers." + std::to_string(i) + ".";
    TransformerLayer layer;
    layer.input_norm = std::make_unique<Norm>(c, device, pre + "input_layernorm", H);
    layer.attention = std::make_unique<SelfAttention>(c, device, pre + "self_attention.", m.tp, m.cp);
    layer.pre_mlp_norm = std::make_unique<Norm>(c, device, pre + "pre_mlp_layernorm", H);
    if (c.is_moe_layer(i))
      layer.moe = std::make_unique<MoELayer>(c, device, groups_ && W > 1 ? groups_ : nullptr, i, pre + "mlp.");
    else
      layer.dense = std::make_unique<SharedExperts>(c, device, m.tp, "mlp.", MlpSpec{pre + "mlp.", c.dense_ffn(), false});
    m.layers.push_back(std::move(layer));
  }
  m.final_norm = std::make_unique<Norm>(c, device, "decoder.final_layernorm", H);
  if (c.untie_embeddings_and_output_weights)
    m.output = make_parameter("output_layer.weight", {m.V, H}, vocab_shard, dt, device, c.seed, c.init_method_std,
                              GradGroup::dense);
}

MoEGPTModel::~MoEGPTModel() = default;

int64_t MoEGPTModel::num_layers() const { return static_cast<int64_t>(impl_->layers.size()); }

MoELayer* MoEGPTModel::moe_layer(int64_t layer) {
  MOE_CHECK(layer >= 0 && layer < num_layers(), "MoEGPTModel::moe_layer: layer ", layer, " out of range [0, ",
            num_layers(), ")");
  return impl_->layers[static_cast<size_t>(layer)].moe.get();
}

double MoEGPTModel::forward(const MicroBatch& batch, const ForwardContext& ctx, bool keep_logits) {
  Impl& m = *impl_;
  const MoEConfig& c = config_;
  const int64_t S = c.seq_length, H = c.hidden_size, V = m.V;
  const char* who = "MoEGPTModel::forward";
  MOE_CHECK(batch.tokens.defined() && batch.tokens.ndim() == 2 && batch.tokens.size(1) == S &&
                batch.tokens.dtype() == DType::i64,
            who, ": tokens must be (b, seq_length=", S, ") i64, got ",
            batch.tokens.defined() ? batch.tokens.desc() : std::string("undefined"));
  const int64_t b = batch.tokens.size(0);
  MOE_CHECK(b >= 1, who, ": the micro-batch has no sequences");
  MOE_CHECK(batch.labels.defined() && batch.labels.dtype() == DType::i64, who, ": labels must be (", b, ", ", S,
            ") i64, got ", batch.labels.defined() ? batch.labels.desc() : std::string("undefined"));
  batch.labels.check_shape({b, S}, "MoEGPTModel::forward: labels");
  if (batch.loss_mask.defined()) {
    batch.loss_mask.check_shape({b, S}, "MoEGPTModel::forward: loss_mask");
    batch.loss_mask.check_dtype(DType::f32, "MoEGPTModel::forward: loss_mask");
  }
  const std::vector<int64_t> tokens = batch.tokens.to(Device::cpu()).to_vector<int64_t>();
  const std::vector<int64_t> labels = batch.labels.to(Device::cpu()).to_vector<int64_t>();
  std::vector<float> mask_full(static_cast<size_t>(b * S), 1.0f);
  if (batch.loss_mask.defined()) mask_full = batch.loss_mask.to(Device::cpu()).to_vector<float>();
  for (int64_t i = 0; i < b * S; ++i) {
    MOE_CHECK(tokens[i] >= 0 && tokens[i] < V, who, ": token id ", tokens[i], " at (", i / S, ", ", i % S,
              ") is outside the vocabulary [0, vocab_size=", V, ")");
    MOE_CHECK(labels[i] >= 0 && labels[i] < V, who, ": label id ", labels[i], " at (", i / S, ", ", i % S,
              ") is outside the vocabulary [0, vocab_size=", V, ")");
  }

  // This rank's rows, s-major: (S_cp·b) at the CP positions, (s_loc·b) at its own positions.
  const SequenceLayout& lay = layout_;
  const int64_t S_cp = lay.s_cp(), s_loc = lay.s_local(), n = S_cp * b;
  std::vector<int64_t> ids(static_cast<size_t>(n)), lab(static_cast<size_t>(n)), pos(static_cast<size_t>(s_loc * b));
  m.mask.assign(static_cast<size_t>(n), 0.0);
  for (int64_t s = 0; s < S_cp; ++s)
    for (int64_t bi = 0; bi < b; ++bi) {
      const int64_t src = bi * S + lay.cp_positions[s], dst = s * b + bi;
      ids[dst] = tokens[src];
      lab[dst] = labels[src];
      m.mask[dst] = mask_full[src];
    }
  for (int64_t s = 0; s < s_loc; ++s)
    for (int64_t bi = 0; bi < b; ++bi) pos[s * b + bi] = lay.local_positions[s];
  m.seq.b = b;
  m.seq.s_cp = S_cp;
  m.seq.s_loc = s_loc;
  m.seq.q_pos = i64_tensor(lay.cp_positions, device_);
  m.seq.k_pos = i64_tensor(lay.key_positions, device_);
  m.ids = i64_tensor(ids, device_);
  m.labels = i64_tensor(lab, device_);
  m.pos_ids = i64_tensor(pos, device_);
  m.ctx = ctx;
  m.head_store.clear();

  // Embedding: vocab-parallel rows summed over TP and scattered to this rank's rows.
  const DType dt = m.word.value.dtype();
  Tensor emb = Tensor::empty({n, H}, dt, device_);  // (S_cp·b, H) partial over TP
  ops::embedding_fwd(m.ids, m.word.value, m.vocab_start, emb, false);
  Tensor h = sp_reduce_scatter(m.tp, emb);  // (s_loc·b, H)
  emb = Tensor();
  if (m.position.value.defined()) ops::embedding_fwd(m.pos_ids, m.position.value, 0, h, true);

  // Layers. The MoE layers see (s_loc, b, H) with the router losses scaled like the lm loss.
  ForwardContext mctx = ctx;
  mctx.seq_length = s_loc;
  mctx.batch_size = b;
  mctx.loss_scale = ctx.loss_scale * static_cast<double>(lay.cp);
  for (TransformerLayer& L : m.layers) {
    L.store.clear();
    L.s_loc = s_loc;
    L.b = b;
    Tensor a = L.input_norm->forward(h, L.store, "input_layernorm");     // (s_loc·b, H)
    Tensor h1 = L.attention->forward(a, m.seq, L.store);                 // (s_loc·b, H)
    ops::add_(h1, h);
    Tensor a2 = L.pre_mlp_norm->forward(h1, L.store, "pre_mlp_layernorm");  // (s_loc·b, H)
    Tensor h2 = L.moe ? L.moe->forward(a2.view({s_loc, b, H}), mctx).view({s_loc * b, H})
                      : L.dense->forward(a2, L.store);                     // (s_loc·b, H)
    ops::add_(h2, h1);
    h = h2;
  }

  // Final norm, output layer and the vocab-parallel cross entropy.
  Tensor hf = m.final_norm->forward(h, m.head_store, "final_layernorm");  // (s_loc·b, H)
  m.head_store.save("output_layer.input", hf);
  Tensor hg = sp_all_gather(m.tp, hf);                                  // (S_cp·b, H)
  m.logits = ops::matmul(hg, false, m.out_weight().value, true);        // (S_cp·b, V/TP)
  hg = Tensor();
  const DType st = ops::stat_dtype_for(dt);
  m.row_max = Tensor::empty({n}, st, device_);  // (S_cp·b)
  ops::xent_max(m.logits, m.row_max);
  if (sp_active(m.tp)) m.tp->all_reduce(m.row_max, ReduceOp::max);
  m.sums = Tensor::empty({2, n}, st, device_);  // (2, S_cp·b): sum_exp, target logit
  Tensor sum_exp = m.sums.narrow(0, 1).view({n}), target = m.sums.narrow(1, 1).view({n});
  ops::xent_sum(m.logits, m.labels, m.vocab_start, m.row_max, sum_exp, target);
  if (sp_active(m.tp)) m.tp->all_reduce(m.sums);
  const std::vector<double> mx = host_f64(m.row_max), sums = host_f64(m.sums);
  double num_den[2] = {0.0, 0.0};
  for (int64_t i = 0; i < n; ++i) {
    const double ce = std::log(sums[i]) + mx[i] - sums[n + i];
    num_den[0] += m.mask[i] * ce;
    num_den[1] += m.mask[i];
  }
  if (sp_active(m.cp)) {
    Tensor t = Tensor::from_vector(std::vector<double>{num_den[0], num_den[1]}, {2});
    m.cp->all_reduce(t);
    std::vector<double> v = t.to_vector<double>();
    num_den[0] = v[0];
    num_den[1] = v[1];
  }
  m.mask_sum = num_den[1];
  if (keep_logits) {
    Tensor l = m.logits.device().is_cpu() ? m.logits : m.logits.to(Device::cpu());
    logits_ = (l.dtype() == DType::f32 ? l.clone() : l.to_dtype(DType::f32)).view({S_cp, b, m.V_local});
  } else {
    logits_ = Tensor();
  }
  m.pending = true;
  // A micro-batch whose mask is all zeros has no loss and no gradient (Megatron would divide by 0).
  return m.mask_sum > 0 ? num_den[0] / m.mask_sum : 0.0;
}

void MoEGPTModel::backward() {
  Impl& m = *impl_;
  MOE_CHECK(m.pending, "MoEGPTModel::backward called without a forward");
  m.pending = false;
  const int64_t H = config_.hidden_size, n = m.seq.s_cp * m.seq.b;
  const DType st = m.row_max.dtype();

  // Cross entropy and the output layer: dlogits overwrites the logits.
  std::vector<double> g(static_cast<size_t>(n), 0.0);
  const double scale = m.ctx.loss_scale * static_cast<double>(layout_.cp);
  for (int64_t i = 0; i < n; ++i) g[i] = m.mask_sum > 0 ? scale * m.mask[i] / m.mask_sum : 0.0;
  Tensor grad = Tensor::from_vector(g, {n}).to_dtype(st).to(device_);  // (S_cp·b) stat
  Tensor sum_exp = m.sums.narrow(0, 1).view({n});
  ops::xent_bwd(m.logits, m.labels, m.vocab_start, m.row_max, sum_exp, grad, m.logits);
  Tensor dlogits = m.logits;  // (S_cp·b, V/TP)
  m.logits = m.row_max = m.sums = Tensor();
  Parameter& W = m.out_weight();
  Tensor hg = sp_all_gather(m.tp, m.head_store.get("output_layer.input"));  // (S_cp·b, H)
  m.head_store.drop("output_layer.input");
  ops::gemm(dlogits, true, hg, false, W.grad, 1.0, 1.0);
  hg = Tensor();
  Tensor dhg = ops::matmul(dlogits, false, W.value, false);  // (S_cp·b, H) partial over TP (vocab)
  dlogits = Tensor();
  Tensor dh = m.final_norm->backward(sp_reduce_scatter(m.tp, dhg), m.head_store, "final_layernorm");  // (s_loc·b, H)
  dhg = Tensor();

  // Layers, last first.
  for (auto it = m.layers.rbegin(); it != m.layers.rend(); ++it) {
    TransformerLayer& L = *it;
    Tensor da2;  // (s_loc·b, H)
    if (L.moe) {
      da2 = L.moe->backward(dh.view({L.s_loc, L.b, H})).view({L.s_loc * L.b, H});
    } else {
      L.dense->backward(dh, da2, L.store);
    }
    Tensor dh1 = L.pre_mlp_norm->backward(da2, L.store, "pre_mlp_layernorm");  // (s_loc·b, H)
    ops::add_(dh1, dh);
    Tensor da = L.attention->backward(dh1, m.seq, L.store);               // (s_loc·b, H)
    Tensor dh0 = L.input_norm->backward(da, L.store, "input_layernorm");  // (s_loc·b, H)
    ops::add_(dh0, dh1);
    dh = dh0;
    L.store.clear();
  }

  // Embedding: positions from this rank's rows, words from the TP-gathered rows.
  if (m.position.value.defined()) ops::embedding_bwd(m.pos_ids, dh, 0, m.position.grad);
  Tensor dhg_emb = sp_all_gather(m.tp, dh);  // (S_cp·b, H)
  ops::embedding_bwd(m.ids, dhg_emb, m.vocab_start, m.word.grad);
  m.head_store.clear();
}

void MoEGPTModel::finish_step() {
  for (TransformerLayer& L : impl_->layers)
    if (L.moe) L.moe->finish_step();
}

std::vector<Parameter*> MoEGPTModel::parameters() {
  Impl& m = *impl_;
  std::vector<Parameter*> out{&m.word};
  if (m.position.value.defined()) out.push_back(&m.position);
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
  m.final_norm->parameters(out);
  if (m.output.value.defined()) out.push_back(&m.output);
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
