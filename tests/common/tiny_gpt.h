// The tiny MoE GPT the model, optimizer, pipeline and checkpoint tests share: 2 layers (an MoE layer,
// then a dense one), H = 8, 4 heads in 2 query groups (GQA) of 4 channels with qk-layernorm, dense
// FFN 8, V = 16, S = 8, RMSNorm + RoPE; 4 experts of F = 4, top-2, swiglu, aux 0.01 and z 0.001
// losses, a gated shared expert of width 4; init std 0.4. Each test sets its own dtype, seed and
// layout and changes what it needs.
#pragma once
#include "moecore/config.h"

namespace moe::test {

inline MoEConfig tiny_moe_gpt() {
  MoEConfig c;
  c.num_layers = 2;
  c.moe_layer_freq = {1, 0};
  c.hidden_size = 8;
  c.num_attention_heads = 4;
  c.num_query_groups = 2;
  c.kv_channels = 4;
  c.ffn_hidden_size = 8;
  c.vocab_size = 16;
  c.seq_length = 8;
  c.normalization = "RMSNorm";
  c.position_embedding_type = "rope";
  c.qk_layernorm = true;
  c.num_moe_experts = 4;
  c.moe_ffn_hidden_size = 4;
  c.moe_router_topk = 2;
  c.gated_linear_unit = true;
  c.activation_func = "silu";
  c.moe_aux_loss_coeff = {0.01};
  c.moe_z_loss_coeff = 0.001;
  c.moe_shared_expert_intermediate_size = 4;
  c.moe_shared_expert_gate = true;
  c.init_method_std = 0.4;
  return c;
}

}  // namespace moe::test
