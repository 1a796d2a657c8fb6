// moe_gpt_io — the MoE GPT model as a command-line tool: one training step's forward and backward
// from files, for numerical parity checks against PyTorch or Megatron Core (docs/parity.md).
//
//   moe_gpt_io --config CFG.json --in IN.safetensors --out OUT.safetensors
//   mpirun -np 8 moe_gpt_io --config CFG.json --in IN.safetensors --out OUT.safetensors
//
// CFG: Megatron-named model and MoE keys (docs/model.md), the parallel sizes
// (tensor_model_parallel_size, context_parallel_size, pipeline_model_parallel_size with optional
// decoder_first/last_pipeline_num_layers, expert_model_parallel_size, expert_tensor_parallel_size,
// moe_token_dispatcher_type; DP = world / (TP·CP·PP)) and num_microbatches M (M >= PP). Any key may
// be overridden by a flag (--num-microbatches 2).
// IN: tokens (B, S) i64, labels (B, S) i64, optional loss_mask (B, S) f32, and every parameter under
// its full canonical name (router.expert_bias optional). Replica r takes sequences
// [r·B/DP, (r+1)·B/DP), split into M contiguous micro-batches, run by the pipeline schedule
// (1F1B with PP > 1).
// OUT (rank 0 writes it, unsharded): loss (1) f64 = the mean over replicas and micro-batches of the
// micro-batch lm loss; logits (B, S, V) f32 (from the last pipeline stage); grad.<name> f32 for
// every trainable parameter = the gradient of J = 1/(DP·M) Σ [lm + Σ_MoE layers (aux + z)] (the same
// in every layout; a tied word embedding's is the first stage's copy after the embedding-group
// sum); tokens_per_expert.<i> (E) i64 for each MoE layer i, summed over the batch.
// Any bad input exits non-zero with a message; nothing is written on failure.
#include <cstdio>
#include <map>
#include <set>
#include <string>
#include <vector>

#include "common/args.h"
#include "common/io_params.h"
#include "common/stage_gather.h"
#include "common/run_main.h"
#include "moecore/distributed.h"
#include "moecore/moecore.h"
#include "moecore/parallel.h"

using namespace moe;

namespace {

// Rows [begin, begin + count) of a (B, S) host tensor, as a fresh (count, S) tensor.
Tensor rows_of(const Tensor& t, int64_t begin, int64_t count) { return t.narrow(begin, count).clone(); }

int run(int argc, char** argv) {
  examples::Args args(argc, argv);
  if (argc == 1 || args.has("help")) {
    std::printf("usage: moe_gpt_io --config CFG.json --in IN.safetensors --out OUT.safetensors\n");
    return argc == 1 ? 2 : 0;
  }
  const std::string cfg_path = args.require("config"), in_path = args.require("in"), out_path = args.require("out");
  MoEConfig cfg = load_config(cfg_path);
  args.apply_config_flags(cfg);
  validate_model(cfg, world_size());  // before any communication
  SafetensorsFile in = load_safetensors(in_path);
  const int64_t S = cfg.seq_length, V = cfg.vocab_size, M = cfg.num_microbatches;

  const Tensor& tokens = in.at("tokens");
  MOE_CHECK(tokens.ndim() == 2 && tokens.size(1) == S && tokens.dtype() == DType::i64, in_path,
            ": tokens must be (B, seq_length=", S, ") i64, got ", tokens.desc());
  const int64_t B = tokens.size(0);
  const Tensor& labels = in.at("labels");
  labels.check_shape({B, S}, (in_path + ": labels").c_str());
  labels.check_dtype(DType::i64, (in_path + ": labels").c_str());
  Tensor mask;
  if (in.contains("loss_mask")) {
    mask = in.at("loss_mask");
    mask.check_shape({B, S}, (in_path + ": loss_mask").c_str());
    mask.check_dtype(DType::f32, (in_path + ": loss_mask").c_str());
  }

  const int64_t PP = cfg.pipeline_model_parallel_size;
  MOE_CHECK(M >= PP, cfg_path, ": num_microbatches = ", M, " is less than pipeline_model_parallel_size = ", PP,
            " (the pipeline schedule needs at least one micro-batch per stage; use num_microbatches >= ", PP, ")");
  std::shared_ptr<ProcessGroups> groups = ProcessGroups::for_launch(cfg);
  std::shared_ptr<Communicator> world = groups->world_ptr();
  const int64_t DP = groups->dp_size();
  MOE_CHECK(B % (DP * M) == 0, in_path, ": the batch of ", B, " sequences is not divisible by data-parallel size ",
            DP, " · num_microbatches ", M);
  MoEGPTModel model(cfg, default_device(), groups);

  // Parameters: every trainable one of this rank's stage must be in the file; the expert biases are
  // optional; the file may hold the other stages' parameters and nothing else.
  const std::vector<Parameter*> params = model.parameters();
  const std::vector<std::pair<std::string, Shape>> everywhere =
      examples::model_parameters_everywhere(std::vector<const Parameter*>(params.begin(), params.end()), *world);
  std::set<std::string> known = {"tokens", "labels", "loss_mask"};
  for (const auto& [name, shape] : everywhere) known.insert(name);
  examples::load_parameters(in, in_path, model.parameters(), known, "tokens, labels, loss_mask");

  // This replica's micro-batches, through the pipeline schedule.
  const int64_t b = B / (DP * M), first = groups->dp().rank() * (B / DP);
  const SequenceLayout& lay = model.layout();
  const int64_t V_local = V / lay.tp, S_cp = lay.s_cp();
  std::vector<MicroBatch> batches;
  for (int64_t mb = 0; mb < M; ++mb) {
    const int64_t seq0 = first + mb * b;
    batches.push_back(MicroBatch{rows_of(tokens, seq0, b), rows_of(labels, seq0, b),
                                 mask.defined() ? rows_of(mask, seq0, b) : Tensor()});
  }
  std::vector<float> logit_vals;
  std::vector<int64_t> logit_idx;
  std::vector<std::vector<int64_t>> counts(static_cast<size_t>(cfg.num_layers));
  ScheduleOptions opt;
  opt.keep_logits = true;
  opt.after_forward = [&](int64_t mb) {
    const int64_t seq0 = first + mb * b;
    if (model.is_last_stage()) {
      // logits (S_cp, b, V/TP) → their global flat indices in (B, S, V)
      const std::vector<float> l = model.last_logits().to_vector<float>();
      for (int64_t s = 0; s < S_cp; ++s)
        for (int64_t bi = 0; bi < b; ++bi)
          for (int64_t v = 0; v < V_local; ++v) {
            logit_vals.push_back(l[static_cast<size_t>((s * b + bi) * V_local + v)]);
            logit_idx.push_back(((seq0 + bi) * S + lay.cp_positions[s]) * V + lay.tp_rank * V_local + v);
          }
    }
    for (int64_t i = 0; i < cfg.num_layers; ++i) {
      MoELayer* layer = model.moe_layer(i);
      if (!layer) continue;
      const std::vector<int64_t>& c = layer->last_routing().tokens_per_expert;
      auto& acc = counts[static_cast<size_t>(i)];
      if (acc.empty()) acc.assign(c.size(), 0);
      for (size_t e = 0; e < c.size(); ++e) acc[e] += c[e];
    }
  };
  const ScheduleResult sched = run_schedule(model, batches, ForwardContext{}, opt);
  model.finish_grads_pipeline();  // tied embeddings: the first and last stage's copies summed
  finalize_grads(model.parameters(), *groups);

  // Gather everything to canonical tensors (collective: every rank takes part).
  std::vector<std::pair<std::string, Tensor>> tensors;
  Tensor loss = Tensor::from_vector(std::vector<double>{sched.loss}, {1});
  groups->dp().all_reduce(loss);
  const double mean_loss = loss.to_vector<double>()[0] / static_cast<double>(DP);
  tensors.emplace_back("loss", Tensor::from_vector(std::vector<double>{mean_loss}, {1}));
  {
    const int n = world->size();
    Tensor count = Tensor::from_vector(std::vector<int64_t>{static_cast<int64_t>(logit_vals.size())}, {1});
    Tensor all_counts = Tensor::empty({n}, DType::i64);
    world->all_gather(count, all_counts);
    std::vector<int64_t> rows = all_counts.to_vector<int64_t>();
    int64_t total = 0;
    for (int64_t r : rows) total += r;
    MOE_CHECK(total == B * S * V, "moe_gpt_io: the ranks hold ", total, " logits, expected B·S·V = ", B * S * V);
    Tensor vals = Tensor::empty({total}, DType::f32), idx = Tensor::empty({total}, DType::i64);
    world->all_gather_v(Tensor::from_vector(logit_vals, {static_cast<int64_t>(logit_vals.size())}), vals, rows);
    world->all_gather_v(Tensor::from_vector(logit_idx, {static_cast<int64_t>(logit_idx.size())}), idx, rows);
    std::vector<float> full(static_cast<size_t>(B * S * V), 0.0f);
    const std::vector<float> vv = vals.to_vector<float>();
    const std::vector<int64_t> ii = idx.to_vector<int64_t>();
    for (int64_t i = 0; i < total; ++i) full[static_cast<size_t>(ii[i])] = vv[i];
    tensors.emplace_back("logits", Tensor::from_vector(full, {B, S, V}));
  }
  std::map<std::string, const Parameter*> local;
  for (Parameter* p : model.parameters())
    if (p->trainable && p != model.shared_embedding_copy()) local[p->name] = p;
  std::set<std::string> trainable;
  {
    // Which names are trainable anywhere: the stages agree through one more gather of names.
    std::vector<const Parameter*> mine;
    for (const auto& [name, p] : local) mine.push_back(p);
    for (const auto& [name, shape] : examples::model_parameters_everywhere(mine, *world)) trainable.insert(name);
  }
  for (const auto& [name, shape] : everywhere) {
    if (!trainable.count(name)) continue;
    auto it = local.find(name);
    tensors.emplace_back("grad." + name, gather_parameter(name, shape, it == local.end() ? nullptr : it->second, /*use_grad=*/true, *world));
  }
  for (int64_t i = 0; i < cfg.num_layers; ++i) {
    if (!model.is_moe_layer(i)) continue;
    auto c = counts[static_cast<size_t>(i)];
    if (c.empty()) c.assign(static_cast<size_t>(cfg.num_moe_experts), 0);  // a layer of another stage
    Tensor t = Tensor::from_vector(c, {static_cast<int64_t>(c.size())});
    // Each layer's counts come from its stage; the other stages add zeros.
    world->all_reduce(t);
    tensors.emplace_back("tokens_per_expert." + std::to_string(i), t);
  }
  if (world->rank() != 0) return 0;
  save_safetensors(out_path, tensors, {{"producer", "libmoecore moe_gpt_io"},
                                       {"world_size", std::to_string(world->size())}});
  std::printf("moe_gpt_io: wrote %zu tensors to %s (B=%lld, S=%lld, M=%lld, DP=%lld, PP=%lld, loss=%.8g)\n",
              tensors.size(), out_path.c_str(), static_cast<long long>(B), static_cast<long long>(S),
              static_cast<long long>(M), static_cast<long long>(DP), static_cast<long long>(PP), mean_loss);
  return 0;
}

}  // namespace

int main(int argc, char** argv) { return moe::examples::run_main("moe_gpt_io", run, argc, argv); }
