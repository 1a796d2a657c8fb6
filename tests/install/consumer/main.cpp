// A program outside the libmoecore tree, built against an installed libmoecore through
// find_package(moecore). The same code is the README's usage example.
#include <moecore/moecore.h>

#include <cstdio>

int main() {
  moe::MoEConfig cfg;                       // Megatron's names and defaults
  cfg.hidden_size = 64;
  cfg.num_moe_experts = 8;
  cfg.moe_ffn_hidden_size = 128;
  cfg.moe_router_topk = 2;
  cfg.gated_linear_unit = true;             // swiglu
  cfg.activation_func = "silu";
  cfg.moe_aux_loss_coeff = {1e-2};
  moe::validate(cfg);

  moe::MoELayer layer(cfg, moe::Device::cpu());
  moe::Adam adam(layer.parameters(), moe::AdamConfig{1e-3});
  moe::Tensor x = moe::Tensor::zeros({16, 4, 64}, moe::DType::f32);     // (S, B, H)
  moe::Tensor y = layer.forward(x, moe::ForwardContext{});              // (S, B, H)
  moe::Tensor dx = layer.backward(moe::Tensor::zeros(y.shape(), moe::DType::f32));
  adam.step();
  std::printf("out %s, aux loss %.4f, tokens on expert 0: %lld\n", y.desc().c_str(),
              layer.last_routing().aux_loss, (long long)layer.last_routing().tokens_per_expert[0]);
  return dx.shape() == x.shape() ? 0 : 1;
}
