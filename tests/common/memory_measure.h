// The allocator's measured peak of one training step, beside estimate_memory's prediction
// (tests/unit/test_memory_estimator.cpp, tests/dist/test_memory_estimator_dist.cpp).
//
// A step is what train_moe_gpt runs: opt.zero_grad(), run_schedule over M micro-batches (forward,
// backward, accumulate_grads after each backward), finish_grads_pipeline, opt.step, finish_step. The
// model, optimizer and batches are built first; one step runs untimed (so the MoE layers hold a
// last routing as they do in training), then the allocator's peak is reset and the second step's
// peak read: device bytes held by every live tensor at the step's high-water mark, minus what was
// live before the model existed.
#pragma once
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <memory>
#include <string>
#include <vector>

#include "moecore/moecore.h"

namespace moe::test {

struct MeasuredStep {
  int64_t peak = 0;         // the allocator's peak during the step, above the pre-model baseline
  int64_t weights = 0;      // Σ parameter value bytes
  int64_t grads = 0;        // Σ parameter grad bytes + the optimizer's f32 main grads
  int64_t optimizer = 0;    // the optimizer's masters + moments
  int64_t after_forward = 0;  // the most bytes live right after a forward (static + saved activations)
  int64_t first_forward = 0;  // bytes the step's first forward added (micro-batch 0: what it keeps)
};

// The tests' model: 2 layers, H = 32, 4 heads in 2 query groups (GQA), dense FFN 64, 8 experts of
// F = 32, top-2, swiglu, RMSNorm, RoPE, tied, V = 256, S = 64, every layer MoE (the tests edit it).
inline MoEConfig memory_test_model() {
  MoEConfig c;
  c.num_layers = 2;
  c.hidden_size = 32;
  c.num_attention_heads = 4;
  c.num_query_groups = 2;
  c.ffn_hidden_size = 64;
  c.vocab_size = 256;
  c.seq_length = 64;
  c.normalization = "RMSNorm";
  c.position_embedding_type = "rope";
  c.num_moe_experts = 8;
  c.moe_ffn_hidden_size = 32;
  c.moe_router_topk = 2;
  c.moe_layer_freq = {1};
  c.gated_linear_unit = true;
  c.activation_func = "silu";
  c.moe_aux_loss_coeff = {1e-2};
  return c;
}

inline MicroBatch memory_test_batch(const MoEConfig& c, int64_t b, uint64_t salt) {
  const int64_t S = c.seq_length;
  std::vector<int64_t> tok(static_cast<size_t>(b * S)), lab(tok.size());
  uint64_t x = 0x9e3779b97f4a7c15ull * (salt + 1);
  for (size_t i = 0; i < tok.size(); ++i) {
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    tok[i] = static_cast<int64_t>(x % static_cast<uint64_t>(c.vocab_size));
    lab[i] = static_cast<int64_t>((x >> 20) % static_cast<uint64_t>(c.vocab_size));
  }
  return MicroBatch{Tensor::from_vector(tok, {b, S}), Tensor::from_vector(lab, {b, S}), Tensor()};
}

// groups: null for one process. layout: the batch and optimizer the step runs with.
inline MeasuredStep measure_step(const MoEConfig& cfg, const MemoryLayout& layout,
                                 std::shared_ptr<ProcessGroups> groups = nullptr, int64_t dp_rank = 0) {
  Backend& be = get_backend(Device::cpu());
  const int64_t base = be.memory_stats().current_bytes;
  MeasuredStep r;
  {
    MoEGPTModel model(cfg, Device::cpu(), groups);
    OptimizerConfig oc;
    oc.optimizer = layout.optimizer;
    oc.sgd_momentum = layout.sgd_momentum;
    oc.use_distributed_optimizer = layout.use_distributed_optimizer;
    oc.not_in_norm = model.shared_embedding_copy();
    Optimizer opt(model.parameters(), oc, groups);
    for (Parameter* p : model.parameters()) {
      r.weights += static_cast<int64_t>(p->value.nbytes());
      if (p->grad.defined()) r.grads += static_cast<int64_t>(p->grad.nbytes());
    }
    const OptimizerMemory om = opt.memory();
    r.grads += om.main_grad_bytes;
    r.optimizer = om.master_bytes + om.moment_bytes;
    for (int step = 1; step <= 2; ++step) {
      std::vector<MicroBatch> batches;
      for (int64_t m = 0; m < layout.num_microbatches; ++m)
        batches.push_back(memory_test_batch(cfg, layout.micro_batch_size,
                                            static_cast<uint64_t>(step * 1000 + dp_rank * 100 + m)));
      if (step == 2) be.reset_peak_memory();
      const int64_t start = be.memory_stats().current_bytes;
      opt.zero_grad();
      ForwardContext ctx;
      ctx.step = step;
      ScheduleOptions so;
      so.after_backward = [&](int64_t) { opt.accumulate_grads(); };
      so.after_forward = [&](int64_t mb) {
        if (step != 2) return;
        const int64_t now = be.memory_stats().current_bytes;
        r.after_forward = std::max(r.after_forward, now - base);
        if (mb == 0) r.first_forward = now - start;
      };
      run_schedule(model, batches, ctx, so);
      model.finish_grads_pipeline([&](Parameter& p) { return opt.main_grad(&p); });
      opt.step(1e-4);
      model.finish_step();
      if (step == 2) r.peak = be.memory_stats().peak_bytes - base;
    }
  }
  return r;
}

// Relative error of an estimate against a measurement.
inline double rel_error(int64_t estimate, int64_t measured) {
  return std::abs(static_cast<double>(estimate - measured)) / static_cast<double>(std::max<int64_t>(1, measured));
}

// One row of the docs table: name | measured | estimated | error | components.
inline std::string memory_row(const std::string& name, const MemoryEstimate& e, const MeasuredStep& m) {
  char buf[512];
  std::snprintf(buf, sizeof buf,
                "| %s | %.1f | %.1f | %+.1f%% | %.1f | %.1f | %.1f | %.1f | %.1f | %s |", name.c_str(),
                static_cast<double>(m.peak) / 1024.0, static_cast<double>(e.total_bytes) / 1024.0,
                100.0 * (static_cast<double>(e.total_bytes) - static_cast<double>(m.peak)) / static_cast<double>(m.peak),
                static_cast<double>(e.weight_bytes) / 1024.0, static_cast<double>(e.gradient_bytes) / 1024.0,
                static_cast<double>(e.optimizer_bytes) / 1024.0, static_cast<double>(e.activation_bytes) / 1024.0,
                static_cast<double>(e.transient_bytes) / 1024.0, e.peak_phase.c_str());
  return buf;
}

}  // namespace moe::test
