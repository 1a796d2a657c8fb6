// The whole MoE layer on CUDA against the CPU backend: the same config, parameters and inputs on
// both devices; outputs, input gradients, parameter gradients and routing compared. Exits 77
// (skipped) without a GPU.
#include <gtest/gtest.h>

#include "common/test_util.h"
#include "moecore/moecore.h"

using namespace moe;

namespace {

MoEConfig base() {
  MoEConfig c;
  c.hidden_size = 64;
  c.num_moe_experts = 8;
  c.moe_ffn_hidden_size = 96;
  c.moe_router_topk = 2;
  c.gated_linear_unit = true;
  c.activation_func = "silu";
  c.moe_aux_loss_coeff = {1e-2};
  c.moe_z_loss_coeff = 1e-3;
  c.init_method_std = 0.1;
  return c;
}

struct LayerRun {
  Tensor out, dx;
  std::vector<Tensor> grads;
  Tensor probs, map;
  std::vector<int64_t> counts;
};

LayerRun run_layer(const MoEConfig& c, Device d, const Tensor& x, const Tensor& g) {
  MoELayer layer(c, d);
  LayerRun r;
  r.out = layer.forward(x.to(d), ForwardContext{}).to(Device::cpu());
  r.probs = layer.last_routing().probs.to(Device::cpu());
  r.map = layer.last_routing().routing_map.to(Device::cpu());
  r.counts = layer.last_routing().tokens_per_expert;
  r.dx = layer.backward(g.to(d)).to(Device::cpu());
  for (Parameter* p : layer.parameters())
    if (p->trainable) r.grads.push_back(p->grad.to(Device::cpu()));
  return r;
}

struct Case {
  const char* name;
  void (*tweak)(MoEConfig&);
};

const Case kCases[] = {
    {"softmax_swiglu", [](MoEConfig&) {}},
    {"sigmoid_groups_bias_shared",
     [](MoEConfig& c) {
       c.moe_router_score_function = "sigmoid";
       c.moe_router_enable_expert_bias = true;
       c.moe_router_num_groups = 4;
       c.moe_router_group_topk = 2;
       c.moe_router_topk = 4;
       c.moe_shared_expert_intermediate_size = 64;
       c.moe_shared_expert_gate = true;
     }},
    {"capacity_pad_gelu",
     [](MoEConfig& c) {
       c.moe_expert_capacity_factor = 1.0;
       c.moe_pad_expert_input_to_capacity = true;
       c.gated_linear_unit = false;
       c.activation_func = "gelu";
     }},
    {"recompute_offload",
     [](MoEConfig& c) {
       c.recompute_granularity = "selective";
       c.recompute_modules = {"moe_act"};
       c.fine_grained_activation_offloading = true;
       c.offload_modules = {"expert_fc1"};
     }},
};

class LayerCuda : public ::testing::TestWithParam<Case> {};

TEST_P(LayerCuda, MatchesCpu) {
  for (const char* dtype : {"fp32", "bf16"}) {
    SCOPED_TRACE(dtype);
    MoEConfig c = base();
    GetParam().tweak(c);
    c.params_dtype = dtype;
    DType dt = dtype_from_name(dtype);
    const int64_t S = 32, B = 4;
    Tensor x = test::randn({S, B, c.hidden_size}, dt, 1);
    Tensor g = test::randn({S, B, c.hidden_size}, dt, 2);
    LayerRun gpu = run_layer(c, Device::cuda(0), x, g), cpu = run_layer(c, Device::cpu(), x, g);
    // f32: cuBLAS and OpenBLAS sum in different orders; bf16: outputs are rounded to 8 bits.
    const double atol = dt == DType::bf16 ? 2e-2 : 1e-5, rtol = dt == DType::bf16 ? 2e-2 : 1e-4;
    EXPECT_TRUE(test::bit_equal(gpu.map, cpu.map)) << "routing map";
    EXPECT_EQ(gpu.counts, cpu.counts);
    EXPECT_TRUE(test::all_close(gpu.probs, cpu.probs, 1e-6, 1e-5)) << "probs";
    EXPECT_TRUE(test::all_close(gpu.out, cpu.out, atol, rtol)) << "output";
    EXPECT_TRUE(test::all_close(gpu.dx, cpu.dx, atol, rtol)) << "input grad";
    ASSERT_EQ(gpu.grads.size(), cpu.grads.size());
    for (size_t i = 0; i < gpu.grads.size(); ++i)
      EXPECT_TRUE(test::all_close(gpu.grads[i], cpu.grads[i], atol, rtol)) << "parameter grad " << i;
  }
}

INSTANTIATE_TEST_SUITE_P(Configs, LayerCuda, ::testing::ValuesIn(kCases),
                         [](const auto& info) { return std::string(info.param.name); });

}  // namespace
