// train_moe_gpt — Megatron-style pretraining of the MoE GPT model on an indexed dataset: Megatron's
// command line, Megatron's data files, Megatron's log lines, plus a metrics file, plots and samples.
//
//   train_moe_gpt --num-layers 4 --hidden-size 128 --num-attention-heads 4 --seq-length 128
//       --num-experts 8 --moe-router-topk 2 --swiglu --normalization RMSNorm
//       --position-embedding-type rope --disable-bias-linear --attention-dropout 0 --hidden-dropout 0
//       --micro-batch-size 8 --global-batch-size 16 --train-iters 300 --lr 3e-3 --min-lr 3e-4
//       --lr-decay-style cosine --lr-warmup-iters 30 --data-path data/fortunes_text_document
//       --split 98,2,0 --eval-interval 100 --eval-iters 4 --log-interval 20
//       --metrics-file out/metrics.jsonl --sample-prompts "The meaning of life"
//   mpirun -np 4 train_moe_gpt ... --expert-model-parallel-size 4        (experts folded over 4 ranks)
//
// scripts/run_main.sh runs this command on the fortunes corpus (scripts/prepare_corpus.sh makes
// it) and draws the plots. The flags are Megatron's (include/moecore/training.h says which are
// accepted, which are refused and why); --help lists them.
//
// One iteration: the global batch (global_batch_size sequences of seq_length + 1 tokens) is split
// as Megatron's sampler splits it: M = global / (micro · DP) micro-batches per replica, micro-batch m
// of replica r taking samples [consumed + m·micro·DP + r·micro, +micro). Each micro-batch runs
// forward and backward with loss scale 1/M; the optimizer reduces the gradients over the replicas,
// takes the global norm, clips and updates; the router's expert biases update once per step.
// Validation runs eval_iters global batches of the validation split, forward only.
// Rank 0 prints; every rank computes.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include "common/run_main.h"
#include "common/stage_gather.h"
#include "moecore/checkpoint.h"
#include "moecore/data.h"
#include "moecore/distributed.h"
#include "moecore/moecore.h"
#include "moecore/parallel.h"
#include "moecore/training.h"

using namespace moe;

namespace {

struct Batches {
  std::shared_ptr<GPTDataset> data;
  int64_t consumed = 0;  // samples of this split used so far
};

// This replica's micro-batch m of the global batch that starts at `consumed`.
MicroBatch micro_batch(const GPTDataset& data, int64_t consumed, int64_t m, int64_t micro, int64_t dp, int64_t dp_rank) {
  const int64_t S = data.seq_length();
  std::vector<int64_t> tokens(static_cast<size_t>(micro * S)), labels(tokens.size());
  std::vector<int64_t> sample(static_cast<size_t>(S + 1));
  for (int64_t j = 0; j < micro; ++j) {
    const int64_t idx = (consumed + m * micro * dp + dp_rank * micro + j) % data.size();
    data.sample(idx, sample.data());
    for (int64_t s = 0; s < S; ++s) {
      tokens[static_cast<size_t>(j * S + s)] = sample[static_cast<size_t>(s)];
      labels[static_cast<size_t>(j * S + s)] = sample[static_cast<size_t>(s + 1)];
    }
  }
  return MicroBatch{Tensor::from_vector(tokens, {micro, S}), Tensor::from_vector(labels, {micro, S}), Tensor()};
}

// MoE statistics of this rank over the logging window, summed over the micro-batches on the
// layers' device (MoELayer::accumulate_routing) and read once per log line, so a step makes no
// host read for them (docs/gpu.md). Undefined for layers on other pipeline stages.
struct MoEStats {
  std::vector<Tensor> tokens;  // per MoE layer (E) i64
  std::vector<Tensor> losses;  // per MoE layer (2) f64: aux, z (coefficient included) / M, Σ over micro-batches
  std::vector<int64_t> slots;  // per MoE layer: routed slots without capacity (T·k per micro-batch)
  void reset(size_t layers) {
    tokens.assign(layers, Tensor());
    losses.assign(layers, Tensor());
    slots.assign(layers, 0);
  }
  // Host copies at a log line: tokens (E) and (aux, z), zeros for a layer this rank does not hold.
  std::vector<int64_t> tokens_of(size_t l, int64_t E) const {
    return tokens[l].defined() ? tokens[l].to_vector<int64_t>() : std::vector<int64_t>(static_cast<size_t>(E), 0);
  }
  std::vector<double> losses_of(size_t l) const {
    return losses[l].defined() ? losses[l].to_vector<double>() : std::vector<double>{0.0, 0.0};
  }
};

double mean_over(Communicator& group, double v) {
  Tensor t = Tensor::from_vector(std::vector<double>{v}, {1});
  group.all_reduce(t);
  return t.to_vector<double>()[0] / static_cast<double>(group.size());
}

// Forward-only lm loss over eval_iters global batches of the validation split (mean over replicas).
double evaluate(MoEGPTModel& model, Batches& valid, int64_t eval_iters, int64_t M, int64_t micro, ProcessGroups& g) {
  double sum = 0.0;
  const int64_t DP = g.dp_size(), gbs = M * micro * DP;
  ScheduleOptions so;
  so.forward_only = true;
  for (int64_t e = 0; e < eval_iters; ++e) {
    std::vector<MicroBatch> batches;
    for (int64_t m = 0; m < M; ++m) batches.push_back(micro_batch(*valid.data, valid.consumed, m, micro, DP, g.dp().rank()));
    ForwardContext ctx;
    ctx.training = false;
    sum += run_schedule(model, batches, ctx, so).loss;  // the mean over the M micro-batches, on every stage
    valid.consumed += gbs;
  }
  return mean_over(g.dp(), sum / static_cast<double>(eval_iters));
}

// Text from the trained model: the parameters gathered to rank 0 into a one-process copy, then
// greedy (temperature 0) or temperature / top-k sampling, one token per full forward (the model's
// fixed seq_length; positions after the text are filled with the end-of-document token, which the
// causal mask keeps from influencing earlier positions).
void print_samples(MoEGPTModel& model, const MoEConfig& cfg, const TrainingArgs& a, Communicator& world) {
  // Every parameter, whichever pipeline stage holds it (the first stage's copy of a tied embedding).
  std::vector<Parameter*> mine_p = model.parameters();
  std::vector<std::pair<std::string, Tensor>> canonical;
  for (const auto& [name, shape] :
       examples::model_parameters_everywhere(std::vector<const Parameter*>(mine_p.begin(), mine_p.end()), world)) {
    const Parameter* p = nullptr;
    for (const Parameter* q : mine_p)
      if (q->name == name) p = q;
    canonical.emplace_back(name, gather_parameter(name, shape, p, /*use_grad=*/false, world));
  }
  if (world.rank() != 0) return;
  MoEConfig one = cfg;
  one.tensor_model_parallel_size = one.context_parallel_size = one.expert_model_parallel_size = 1;
  one.expert_tensor_parallel_size = 1;
  one.pipeline_model_parallel_size = 1;
  one.decoder_first_pipeline_num_layers.reset();
  one.decoder_last_pipeline_num_layers.reset();
  MoEGPTModel m(one, model.device());
  for (auto& [name, t] : canonical) load_shard(*m.find_parameter(name), t);
  const ByteTokenizer tok;
  const int64_t S = cfg.seq_length, V = cfg.vocab_size;
  std::mt19937_64 rng(cfg.seed * 7919 + 17);
  char how[96];
  if (a.temperature <= 0) std::snprintf(how, sizeof how, "greedy");
  else std::snprintf(how, sizeof how, "temperature %g, top-k %lld", a.temperature, static_cast<long long>(a.top_k));
  std::printf("samples (%s, at most %lld new tokens; <eod> marks the model ending the text):\n", how,
              static_cast<long long>(a.max_new_tokens));
  for (const std::string& prompt : a.sample_prompts) {
    std::vector<int64_t> ids = tok.encode(prompt);
    if (static_cast<int64_t>(ids.size()) > S - 1) ids.erase(ids.begin(), ids.end() - (S - 1));
    const size_t prompt_len = ids.size();
    bool ended = false;  // the model ended the document
    while (static_cast<int64_t>(ids.size()) < S && static_cast<int64_t>(ids.size() - prompt_len) < a.max_new_tokens) {
      std::vector<int64_t> window = ids;
      window.resize(static_cast<size_t>(S), ByteTokenizer::eod);
      ForwardContext ctx;
      ctx.training = false;
      Tensor w = Tensor::from_vector(window, {1, S});
      m.forward(MicroBatch{w, w, Tensor()}, ctx, /*keep_logits=*/true);
      const std::vector<float> all = m.last_logits().to_vector<float>();  // (S, 1, V)
      std::vector<double> logit(all.begin() + static_cast<int64_t>((ids.size() - 1) * V),
                                all.begin() + static_cast<int64_t>(ids.size() * V));
      logit.resize(static_cast<size_t>(ByteTokenizer::vocab_size));  // padded ids are never drawn
      int64_t next = 0;
      if (a.temperature <= 0) {
        next = std::max_element(logit.begin(), logit.end()) - logit.begin();
      } else {
        std::vector<double> sorted = logit;
        std::sort(sorted.begin(), sorted.end(), std::greater<>());
        const double cut = a.top_k > 0 && a.top_k < static_cast<int64_t>(sorted.size()) ? sorted[static_cast<size_t>(a.top_k - 1)] : -1e300;
        std::vector<double> w(logit.size());
        for (size_t v = 0; v < logit.size(); ++v)
          w[v] = logit[v] >= cut ? std::exp((logit[v] - sorted[0]) / a.temperature) : 0.0;
        next = std::discrete_distribution<int64_t>(w.begin(), w.end())(rng);
      }
      if (next == ByteTokenizer::eod) {
        ended = true;
        break;
      }
      ids.push_back(next);
    }
    const std::string text = tok.decode(ids);
    std::printf("  [%s]%s%s\n", prompt.c_str(), text.substr(std::min(text.size(), prompt.size())).c_str(),
                ended ? "<eod>" : "");
  }
}

int run(int argc, char** argv) {
  std::vector<std::string> argv_list(argv + 1, argv + argc);
  if (argc == 1 || (argc == 2 && (argv_list[0] == "--help" || argv_list[0] == "-h"))) {
    std::printf("usage: train_moe_gpt <Megatron pretrain_gpt.py flags>  (see the header of examples/train_moe_gpt.cpp)\n"
                "flags (accepted; refused ones say why when given):\n");
    for (const MegatronFlagInfo& f : megatron_flags())
      if (f.kind != MegatronFlagInfo::Kind::refused) std::printf("  --%s\n", f.name.c_str());
    return argc == 1 ? 2 : 0;
  }
  MoEConfig cfg = megatron_model_defaults();
  TrainingArgs a = parse_megatron_args(argv_list, cfg);
  validate_model(cfg, world_size());  // before any communication
  if (a.threads > 0) set_num_threads(static_cast<int>(a.threads));
  std::shared_ptr<ProcessGroups> groups = ProcessGroups::for_launch(cfg);
  Communicator& world = groups->world();
  const bool root = world.rank() == 0;
  const int64_t DP = groups->dp_size();
  const int64_t M = resolve_batch_sizes(a, cfg, DP), micro = *a.micro_batch_size, gbs = *a.global_batch_size;
  const int64_t S = cfg.seq_length, iters = *a.train_iters;
  if (a.estimate_memory) {  // Megatron-style per-rank footprints of every stage, then exit (docs/training.md)
    MemoryLayout ml = MemoryLayout::from_config(cfg, world.size());
    ml.micro_batch_size = micro;
    ml.num_microbatches = M;
    ml.use_distributed_optimizer = a.use_distributed_optimizer;
    ml.optimizer = a.optimizer;
    ml.sgd_momentum = a.sgd_momentum;
    for (const MemoryEstimate& e : estimate_memory_per_stage(cfg, ml)) {
      std::vector<int> ranks;
      for (int r = 0; r < world.size(); ++r)
        if (groups->layout().rank_in_group(GroupKind::pp, r) == e.pp_rank) ranks.push_back(r);
      if (root) std::printf("%s\n", format_memory_estimate(e, ranks).c_str());
    }
    return 0;
  }

  // Data: one indexed dataset, Megatron's document split, GPT samples of S + 1 tokens.
  DataBlend blend = data_blend(a.data_path);
  MOE_CHECK(blend.prefixes.size() == 1, "--data-path: blending ", blend.prefixes.size(),
            " datasets is not implemented; give one prefix (e.g. data/fortunes_text_document)");
  auto indexed = std::make_shared<IndexedDataset>(blend.prefixes[0]);
  std::string split = a.split.value_or("969, 30, 1");
  split.erase(std::remove(split.begin(), split.end(), ' '), split.end());
  const auto ranges = split_document_ranges(split, indexed->num_documents());
  Batches train{std::make_shared<GPTDataset>(indexed, ranges[0].first, ranges[0].second, S, iters * gbs, cfg.seed)};
  Batches valid;
  const bool do_eval = a.eval_iters > 0 && ranges[1].second > ranges[1].first;
  if (do_eval) {
    const int64_t rounds = (a.eval_interval ? iters / *a.eval_interval : 0) + 1;
    valid.data = std::make_shared<GPTDataset>(indexed, ranges[1].first, ranges[1].second, S,
                                              rounds * a.eval_iters * gbs, cfg.seed + 1);
  }

  Device dev = default_device();
  MoEGPTModel model(cfg, dev, groups);
  OptimizerConfig oc;
  oc.optimizer = a.optimizer;
  oc.weight_decay = a.weight_decay;
  oc.adam_beta1 = a.adam_beta1;
  oc.adam_beta2 = a.adam_beta2;
  oc.adam_eps = a.adam_eps;
  oc.sgd_momentum = a.sgd_momentum;
  oc.clip_grad = a.clip_grad;
  oc.use_distributed_optimizer = a.use_distributed_optimizer;
  oc.not_in_norm = model.shared_embedding_copy();  // PP > 1, tied: the first stage counts it
  Optimizer opt(model.parameters(), oc, groups);
  const LRScheduler sched(a, gbs);

  // Resume (--load): parameters, optimizer state, the iteration and the data position; any layout
  // loads any checkpoint (docs/checkpoints.md).
  int64_t first_iter = 1;
  std::vector<std::string> load_notes;
  if (!a.load.empty()) {
    if (!read_latest_iteration(a.load)) {
      load_notes.push_back("could not find " + a.load + "/latest_checkpointed_iteration.txt; starting from scratch");
    } else {
      LoadOptions lo;
      lo.finetune = a.finetune;
      lo.no_load_optim = a.no_load_optim;
      lo.no_load_rng = a.no_load_rng;
      const LoadResult lr = load_checkpoint(a.load, model, &opt, groups, lo);
      first_iter = lr.state.iteration + 1;
      train.consumed = lr.state.consumed_train_samples;
      valid.consumed = lr.state.consumed_valid_samples;
      load_notes.push_back("successfully loaded checkpoint from " + a.load + " at iteration " +
                           std::to_string(lr.iteration));
      for (const std::string& n : lr.notes) load_notes.push_back(n);
    }
  }

  if (root) {
    std::printf("train_moe_gpt: %s | %s\n", get_backend(dev).name().c_str(), build_info().c_str());
    std::printf("------------------------ arguments ------------------------\n%s\n", config_to_json(cfg).c_str());
    std::printf("  micro batch %lld, global batch %lld, %lld micro-batches per replica, DP %lld, %lld iterations\n",
                (long long)micro, (long long)gbs, (long long)M, (long long)DP, (long long)iters);
    for (const std::string& n : a.notes) std::printf("  note: %s\n", n.c_str());
    for (const std::string& n : load_notes) std::printf("  checkpoint: %s\n", n.c_str());
    std::printf("-------------------- end of arguments ---------------------\n");
    for (int r = 0; r < world.size(); ++r) std::printf("%s\n", format_rank_line(groups->layout(), r).c_str());
    std::printf("data: %s: %lld documents, %lld tokens; split %s: train docs [%lld, %lld) -> %lld samples, "
                "valid docs [%lld, %lld)\n",
                blend.prefixes[0].c_str(), (long long)indexed->num_documents(), (long long)indexed->num_tokens(),
                split.c_str(), (long long)ranges[0].first, (long long)ranges[0].second, (long long)train.data->size(),
                (long long)ranges[1].first, (long long)ranges[1].second);
    std::printf("%s\n", opt.memory_report().c_str());
    std::fflush(stdout);
  }
  std::unique_ptr<MetricsWriter> metrics;
  if (root && !a.metrics_file.empty()) {
    std::filesystem::path p(a.metrics_file);
    if (p.has_parent_path()) std::filesystem::create_directories(p.parent_path());
    metrics = std::make_unique<MetricsWriter>(a.metrics_file, /*truncate=*/first_iter == 1);
    metrics->write_run_info("{\"world_size\": " + std::to_string(world.size()) + ", \"config\": " + config_to_json(cfg) + "}");
  }

  // MoE layers, their names in the log, and the window accumulators.
  std::vector<int64_t> moe_layers;
  for (int64_t i = 0; i < model.num_layers(); ++i)
    if (model.is_moe_layer(i)) moe_layers.push_back(i);
  const std::vector<std::string> loss_names = moe_loss_names(cfg);
  const double aux_coeff = cfg.moe_aux_loss_coeff.empty() ? 0.0 : cfg.moe_aux_loss_coeff[0];
  const bool one_aux = cfg.moe_router_load_balancing_type.size() == 1 && aux_coeff > 0;
  MoEStats win;
  win.reset(moe_layers.size());
  double win_lm = 0.0, win_norm = 0.0, win_bubble = 0.0, last_val = std::nan("");
  int64_t win_iters = 0, nan_iters = 0;
  // A progress bar only for one process on a terminal (mpirun hands its ranks a pseudo-terminal).
  ProgressIndicator progress(iters, root && world.size() == 1 && stdout_is_tty());
  auto t_window = std::chrono::steady_clock::now();
  get_backend(dev).reset_peak_memory();

  auto run_eval = [&](int64_t it, const std::string& prefix) {
    if (!do_eval) return;
    last_val = evaluate(model, valid, a.eval_iters, M, micro, *groups);
    if (root) {
      progress.clear();
      std::printf("%s\n", format_validation_line(prefix, last_val).c_str());
      std::fflush(stdout);
      if (metrics) metrics->write_validation(it, {{"lm loss", last_val}});
    }
  };

  auto save = [&](int64_t it) {
    TrainingState st;
    st.iteration = it;
    st.consumed_train_samples = train.consumed;
    st.consumed_valid_samples = valid.consumed;
    st.global_batch_size = gbs;
    st.train_data_position = train.consumed;
    st.valid_data_position = valid.consumed;
    st.data_seed = cfg.seed;
    st.seed = cfg.seed;
    st.scheduler = SchedulerState{static_cast<double>(it * gbs), sched.max_lr(), sched.min_lr(), sched.warmup_steps(),
                                  sched.decay_steps(), a.lr_decay_style};
    SaveOptions so;
    so.save_optim = !a.no_save_optim;
    so.save_rng = !a.no_save_rng;
    const SaveResult r = save_checkpoint(a.save, it, model, &opt, st, groups, so);
    if (root) {
      progress.clear();
      std::printf("  successfully saved checkpoint from iteration %7lld to %s (%.2f s)\n", static_cast<long long>(it),
                  a.save.c_str(), r.seconds);
      std::fflush(stdout);
    }
  };

  // --check-for-nan-in-loss-and-grad (Megatron's wording; the optimizer has skipped a step whose
  // grad norm is not finite, so the parameters stay as they were).
  auto check_for_nan = [&](const char* what, double v, int64_t it) {
    MOE_CHECK_CODE(std::isfinite(v), ErrorCode::non_finite, "Rank ", world.rank(), ": found ",
                   std::isnan(v) ? "NaN" : "Inf", " in ", what, " at iteration ", it,
                   " (--check-for-nan-in-loss-and-grad; MOE_SANITIZE=1 names the step, micro-batch, layer, module",
                   " and op where it first appeared)");
  };
  for (int64_t it = first_iter; it <= iters; ++it) {
    const double lr = sched.lr(it - 1);
    opt.zero_grad();
    std::vector<MicroBatch> batches;
    for (int64_t m = 0; m < M; ++m)
      batches.push_back(micro_batch(*train.data, train.consumed, m, micro, DP, groups->dp().rank()));
    ForwardContext ctx;
    ctx.step = it;  // the schedule runs micro-batch m with loss scale 1/M
    ScheduleOptions so;
    so.after_backward = [&](int64_t) { opt.accumulate_grads(); };
    so.after_forward = [&](int64_t) {
      for (size_t l = 0; l < moe_layers.size(); ++l) {
        MoELayer* layer = model.moe_layer(moe_layers[l]);
        if (!layer) continue;  // on another pipeline stage
        layer->accumulate_routing(win.tokens[l], win.losses[l], static_cast<double>(M));  // on the device
        win.slots[l] += layer->last_routing_on_device().routing_map.size(0) * cfg.moe_router_topk;
      }
    };
    const ScheduleResult sr = run_schedule(model, batches, ctx, so);
    if (a.check_for_nan_in_loss_and_grad) check_for_nan("local forward loss calculation", sr.loss, it);
    model.finish_grads_pipeline([&](Parameter& p) { return opt.main_grad(&p); });  // tied embedding over PP
    const OptimizerStepResult res = opt.step(lr);
    if (a.check_for_nan_in_loss_and_grad) check_for_nan("grad norm", res.grad_norm, it);
    model.finish_step();
    train.consumed += gbs;
    win_bubble += sr.bubble_s;
    const double lm = mean_over(groups->dp(), sr.loss);
    if (!std::isfinite(lm) || !std::isfinite(res.grad_norm)) ++nan_iters;
    win_lm += lm;
    win_norm += res.grad_norm;
    ++win_iters;
    if (root) progress.update(it, "lm loss " + std::to_string(lm));

    if (it % a.log_interval == 0 || it == iters) {
      const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t_window).count();
      // Router losses: this rank's values are over its replica's tokens (TP×CP); mean over replicas,
      // iterations and MoE layers, divided by the coefficient as Megatron's tracker reports them.
      std::vector<double> per_layer;  // aux, z per layer, then tokens, dropped
      for (size_t l = 0; l < moe_layers.size(); ++l) {
        const std::vector<double> az = win.losses_of(l);
        per_layer.push_back(az[0] / static_cast<double>(win_iters));
        per_layer.push_back(az[1] / static_cast<double>(win_iters));
      }
      Tensor lt = Tensor::from_vector(per_layer.empty() ? std::vector<double>{0.0} : per_layer,
                                      {std::max<int64_t>(1, static_cast<int64_t>(per_layer.size()))});
      // Each rank of a layer's stage holds its replica's value (TP×CP ranks alike); other stages 0.
      world.all_reduce(lt);
      std::vector<double> losses_l = lt.to_vector<double>();
      const double holders = static_cast<double>(DP * groups->tp().size() * groups->cp().size());
      for (double& v : losses_l) v /= holders;
      StepMetrics sm;
      sm.iteration = it;
      sm.consumed_samples = train.consumed;
      sm.lr = sched.lr(it);
      double aux_mean = 0.0, z_mean = 0.0;
      for (size_t l = 0; l < moe_layers.size(); ++l) {
        const std::vector<int64_t> tokens = win.tokens_of(l, cfg.num_moe_experts);
        int64_t routed = 0;
        for (int64_t n : tokens) routed += n;
        Tensor counts = Tensor::from_vector(tokens, {cfg.num_moe_experts});
        world.all_reduce(counts);
        const int64_t dropped_here = cfg.moe_pad_expert_input_to_capacity ? 0 : win.slots[l] - routed;
        Tensor dropped = Tensor::from_vector(std::vector<int64_t>{dropped_here}, {1});
        world.all_reduce(dropped);
        MoELayerMetrics ml;
        ml.layer = moe_layers[l];
        ml.tokens_per_expert = counts.to_vector<int64_t>();
        ml.aux_loss = one_aux ? losses_l[2 * l] / aux_coeff : losses_l[2 * l];
        ml.z_loss = cfg.moe_z_loss_coeff && *cfg.moe_z_loss_coeff > 0 ? losses_l[2 * l + 1] / *cfg.moe_z_loss_coeff : 0.0;
        ml.dropped_tokens = dropped.to_vector<int64_t>()[0];
        aux_mean += ml.aux_loss / static_cast<double>(moe_layers.size());
        z_mean += ml.z_loss / static_cast<double>(moe_layers.size());
        sm.moe_layers.push_back(ml);
      }
      sm.losses.emplace_back("lm loss", win_lm / static_cast<double>(win_iters));
      for (const std::string& n : loss_names) {
        if (n == "z_loss") sm.losses.emplace_back(n, z_mean);
        else if (one_aux) sm.losses.emplace_back(n, aux_mean);
      }
      if (!one_aux && !moe_layers.empty() && aux_coeff > 0) sm.losses.emplace_back("moe aux loss (weighted sum)", aux_mean);
      sm.grad_norm = win_norm / static_cast<double>(win_iters);
      sm.elapsed_ms_per_iteration = 1e3 * secs / static_cast<double>(win_iters);
      sm.tokens_per_second = static_cast<double>(win_iters * gbs * S) / std::max(secs, 1e-9);
      sm.peak_bytes = get_backend(dev).memory_stats().peak_bytes;
      // Each pipeline stage's time in point-to-point transfers per iteration (the bubble), gathered
      // over this rank's pipeline group (collective).
      std::vector<double> stage_bubble_ms;
      if (cfg.pipeline_model_parallel_size > 1) {
        Tensor mine = Tensor::from_vector(std::vector<double>{1e3 * win_bubble / static_cast<double>(win_iters)}, {1});
        Tensor all = Tensor::empty({groups->pp().size()}, DType::f64);
        groups->pp().all_gather(mine, all);
        stage_bubble_ms = all.to_vector<double>();
      }
      if (root) {
        TrainLogFields f;
        f.timestamp = megatron_timestamp();
        f.iteration = it;
        f.train_iters = iters;
        f.consumed_samples = train.consumed;
        f.elapsed_ms_per_iteration = sm.elapsed_ms_per_iteration;
        f.learning_rate = sm.lr;
        f.global_batch_size = gbs;
        f.losses = sm.losses;
        f.grad_norm = sm.grad_norm;
        f.skipped_iterations = opt.skipped_iterations();
        f.nan_iterations = nan_iters;
        f.tokens_per_second_per_gpu = sm.tokens_per_second / static_cast<double>(world.size());
        f.peak_memory_mb = static_cast<double>(sm.peak_bytes) / (1024.0 * 1024.0);
        progress.clear();
        std::printf("%s\n", format_train_log_line(f).c_str());
        if (!stage_bubble_ms.empty()) {
          std::printf("  pipeline bubble (ms per iteration in point-to-point transfers), by stage:");
          for (size_t s = 0; s < stage_bubble_ms.size(); ++s) std::printf(" %zu: %.1f", s, stage_bubble_ms[s]);
          std::printf("\n");
        }
        std::fflush(stdout);
        if (metrics) metrics->write_step(sm);
      }
      win.reset(moe_layers.size());
      win_lm = win_norm = win_bubble = 0.0;
      win_iters = 0;
      t_window = std::chrono::steady_clock::now();
    }
    if (a.eval_interval && it % *a.eval_interval == 0 && it != iters) run_eval(it, "iteration " + std::to_string(it));
    if (!a.save.empty() && a.save_interval && it % *a.save_interval == 0) save(it);
  }
  if (!a.save.empty() && first_iter <= iters && !(a.save_interval && iters % *a.save_interval == 0)) save(iters);
  progress.finish();
  run_eval(iters, "iteration " + std::to_string(iters) + " on validation set");
  if (!a.sample_prompts.empty()) print_samples(model, cfg, a, world);
  if (root && !a.plots_dir.empty() && metrics) {
    const std::string cmd = "/usr/bin/python3 \"" + std::string(MOE_SOURCE_DIR) + "/scripts/plot_metrics.py\" \"" +
                            a.metrics_file + "\" --out-dir \"" + a.plots_dir + "\"";
    const int rc = std::system(cmd.c_str());
    std::printf("plots: %s (%s)\n", a.plots_dir.c_str(), rc == 0 ? "written" : "scripts/plot_metrics.py failed");
  }
  if (a.expect_val_loss_below) {
    const bool ok = std::isfinite(last_val) && last_val < *a.expect_val_loss_below;
    if (root)
      std::printf("validation loss %.4f %s the expected bound %.4f\n", last_val, ok ? "is below" : "is NOT below",
                  *a.expect_val_loss_below);
    if (!ok) return 3;
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) { return moe::examples::run_main("train_moe_gpt", run, argc, argv); }
