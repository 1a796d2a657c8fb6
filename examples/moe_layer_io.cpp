// moe_layer_io — the MoE layer as a command-line tool, for numerical parity checks against PyTorch
// or Megatron Core (docs/parity.md shows how to produce its inputs from Python).
//
//   moe_layer_io --config CFG.json --in IN.safetensors --out OUT.safetensors
//
// CFG: Megatron-named keys (unknown keys are errors). IN: hidden_states (S, B, H) f32,
// grad_output (S, B, H) f32 and the parameters under their canonical names (router.weight,
// experts.linear_fc1.weight, experts.linear_fc2.weight, optional router.expert_bias,
// shared_experts.*). Tokens are flattened s·B + b. OUT: output, grad_hidden_states, grad.<name>
// for every parameter (the gradient of Σ output·grad_output plus the router's aux and z losses,
// loss scale 1), probs (T, E) f32, routing_map (T, E) u8, tokens_per_expert (E) i64, aux_loss
// and z_loss (1) f32, and router.expert_bias.updated (E) when the expert bias is enabled.
// Any bad input exits non-zero with a message; nothing is written on failure.
//
// Under mpirun the parallel sizes come from the config (tensor_model_parallel_size,
// context_parallel_size, expert_model_parallel_size, expert_tensor_parallel_size,
// moe_token_dispatcher_type); the world size gives DP:
//   mpirun -np 4 moe_layer_io --config cfg.json --in in.safetensors --out out.safetensors
// Every rank reads the full inputs and takes its shard (S in TP·CP contiguous chunks, B over DP,
// experts in contiguous blocks over EP, fc1 rows / fc2 columns over ETP); rank 0 writes the
// gathered, unsharded outputs. Parameter gradients are Megatron's: the mean over the DP·CP
// replicas of each replica's gradient (a DP·CP = 1 run writes what one process writes).
// aux_loss and z_loss are rank 0's values (summed over its TP×CP group); tokens_per_expert is
// summed over all ranks.
#include <cstdio>
#include <set>
#include <string>
#include <vector>

#include "common/args.h"
#include "common/io_params.h"
#include "common/run_main.h"
#include "moecore/distributed.h"
#include "moecore/moecore.h"
#include "moecore/parallel.h"

using namespace moe;

namespace {

Tensor to_f32_host(const Tensor& t) {
  Tensor h = t.device().is_cpu() ? t : t.to(Device::cpu());
  if (h.dtype() == DType::f32) return h;
  return h.to_dtype(DType::f32);
}

int run(int argc, char** argv) {
  examples::Args args(argc, argv);
  if (argc == 1 || args.has("help")) {
    std::printf("usage: moe_layer_io --config CFG.json --in IN.safetensors --out OUT.safetensors\n");
    return argc == 1 ? 2 : 0;
  }
  const std::string cfg_path = args.require("config"), in_path = args.require("in"), out_path = args.require("out");
  MoEConfig cfg = load_config(cfg_path);
  args.apply_config_flags(cfg);  // any config key may be overridden by a flag; others are errors
  validate(cfg);
  SafetensorsFile in = load_safetensors(in_path);
  const int64_t H = cfg.hidden_size, E = cfg.num_moe_experts;

  const Tensor& hs = in.at("hidden_states");
  MOE_CHECK(hs.ndim() == 3 && hs.size(2) == H, in_path, ": hidden_states must be (S, B, hidden_size=", H, "), got ",
            hs.desc());
  const Tensor& go = in.at("grad_output");
  go.check_shape(hs.shape(), (in_path + ": grad_output").c_str());
  const int64_t S = hs.size(0), B = hs.size(1), T = S * B;

  // Ranks and groups: one process, or the world of mpirun split by the config's parallel sizes.
  std::shared_ptr<ProcessGroups> groups = ProcessGroups::for_launch(cfg);
  std::shared_ptr<Communicator> world = groups->world_ptr();
  const TokenShard shard = token_shard(*groups, S, B);

  Device dev = default_device();
  MoELayer layer(cfg, dev, groups);
  DType pd = dtype_from_name(cfg.params_dtype);

  // Parameters: every trainable one must be in the file; the expert bias is optional.
  examples::load_parameters(in, in_path, layer.parameters(), {"hidden_states", "grad_output"},
                            "hidden_states, grad_output");

  Tensor x = take_tokens(hs, shard).to_dtype(pd).to(dev);   // (s_len, b_len, H)
  Tensor dy = take_tokens(go, shard).to_dtype(pd).to(dev);  // (s_len, b_len, H)
  ForwardContext ctx;
  ctx.seq_length = shard.s_len;
  ctx.batch_size = shard.b_len;
  ctx.training = true;
  ctx.loss_scale = 1.0;
  Tensor out = layer.forward(x, ctx);
  RoutingSummary routing = layer.last_routing();
  Tensor dx = layer.backward(dy);
  finalize_grads(layer.parameters(), *groups);

  // Gather everything back to canonical, unsharded tensors (collective: every rank takes part).
  auto tokens = [&](const Tensor& local, int64_t width) {
    Tensor t = to_f32_host(local).view({shard.s_len, shard.b_len, width});
    return gather_tokens(t, shard, S, B, *world);
  };
  std::vector<std::pair<std::string, Tensor>> tensors;
  tensors.emplace_back("output", tokens(out, H));
  tensors.emplace_back("grad_hidden_states", tokens(dx, H));
  for (Parameter* p : layer.parameters())
    if (p->trainable) tensors.emplace_back("grad." + p->name, to_f32_host(gather_parameter(*p, true, *world)));
  tensors.emplace_back("probs", tokens(routing.probs, E).view({T, E}));
  Tensor map_local = routing.routing_map.to(Device::cpu()).view({shard.s_len, shard.b_len, E});
  tensors.emplace_back("routing_map", gather_tokens(map_local, shard, S, B, *world).view({T, E}));
  Tensor counts = Tensor::from_vector(routing.tokens_per_expert, {E});
  world->all_reduce(counts);
  tensors.emplace_back("tokens_per_expert", counts);
  tensors.emplace_back("aux_loss", Tensor::from_vector(std::vector<float>{static_cast<float>(routing.aux_loss)}, {1}));
  tensors.emplace_back("z_loss", Tensor::from_vector(std::vector<float>{static_cast<float>(routing.z_loss)}, {1}));
  if (cfg.moe_router_enable_expert_bias) {
    layer.finish_step();
    tensors.emplace_back("router.expert_bias.updated", to_f32_host(layer.router().expert_bias().value));
  }
  if (world->rank() != 0) return 0;
  save_safetensors(out_path, tensors, {{"producer", "libmoecore moe_layer_io"},
                                       {"world_size", std::to_string(world->size())}});
  std::printf("moe_layer_io: wrote %zu tensors to %s (T=%lld, E=%lld, aux_loss=%.6g, z_loss=%.6g)\n", tensors.size(),
              out_path.c_str(), static_cast<long long>(T), static_cast<long long>(E), routing.aux_loss, routing.z_loss);
  return 0;
}

}  // namespace

int main(int argc, char** argv) { return moe::examples::run_main("moe_layer_io", run, argc, argv); }
