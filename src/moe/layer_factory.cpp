#include "moe/layer_factory.h"

#include "moecore/parallel.h"

namespace moe {

LayerParts make_layer_parts(const MoEConfig& config, Device device, const std::shared_ptr<ProcessGroups>& groups,
                            int64_t layer_number, const std::string& param_prefix, bool pipeline_stage) {
  const MlpSpec shared_spec{param_prefix + "shared_experts.", config.moe_shared_expert_intermediate_size.value_or(0),
                            config.moe_shared_expert_gate};
  LayerParts p;
  if (!groups || groups->world().size() == 1) {
    validate_parallel(config, 1);  // no groups, or a world of one: every parallel size must be 1
    p.router = std::make_unique<Router>(config, device, RouterGroups{}, layer_number, param_prefix);
    p.experts = std::make_unique<GroupedExperts>(config, device, ExpertsSharding{}, "experts.", param_prefix);
    if (config.has_shared_expert())
      p.shared = std::make_unique<SharedExperts>(config, device, nullptr, "shared_experts.", shared_spec);
    p.dispatcher = std::make_unique<LocalDispatcher>();
    return p;
  }
  const ProcessGroups& g = *groups;
  const int64_t W = g.world().size();
  validate_parallel(config, W);
  const ParallelSizes want = parallel_sizes_from_config(config, W), have = g.sizes();
  MOE_CHECK(want.tp == have.tp && want.cp == have.cp && want.pp == have.pp && want.ep == have.ep &&
                want.etp == have.etp && want.order == have.order,
            "MoELayer: the process groups were built for tp ", have.tp, " cp ", have.cp, " pp ", have.pp, " ep ",
            have.ep, " etp ", have.etp, " (", have.order, ") but the config asks for tp ", want.tp, " cp ", want.cp,
            " pp ", want.pp, " ep ", want.ep, " etp ", want.etp, " (", want.order, ")");
  MOE_CHECK_CODE(have.pp == 1 || pipeline_stage, ErrorCode::not_supported,
                 "MoELayer: pipeline_model_parallel_size must be 1 for a single layer, got ", have.pp,
                 " (pipeline stages are MoEGPTModel's)");

  const int64_t E = config.num_moe_experts, EP = g.ep().size(), G = E / EP;
  p.router = std::make_unique<Router>(config, device, RouterGroups{g.group_ptr(GroupKind::tp_cp),
                                                                   g.group_ptr(GroupKind::tp_dp_cp)},
                                      layer_number, param_prefix);
  ExpertsSharding sh;
  sh.first_expert = g.ep().rank() * G;
  sh.num_local_experts = G;
  sh.etp_rank = g.etp().rank();
  sh.etp_size = g.etp().size();
  p.experts = std::make_unique<GroupedExperts>(config, device, sh, "experts.", param_prefix);
  if (config.has_shared_expert())
    p.shared = std::make_unique<SharedExperts>(config, device, g.group_ptr(GroupKind::tp), "shared_experts.",
                                               shared_spec);

  if (EP * g.etp().size() == 1) {
    p.dispatcher = std::make_unique<LocalDispatcher>();
  } else if (config.moe_token_dispatcher_type == "allgather") {
    p.dispatcher = std::make_unique<AllGatherDispatcher>(g.group_ptr(GroupKind::etp_ep), sh.first_expert, G);
  } else {
    std::vector<int> ep_rank_of, etp_rank_of;
    for (int w : g.etp_ep().world_ranks()) {
      ep_rank_of.push_back(g.layout().rank_in_group(GroupKind::ep, w));
      etp_rank_of.push_back(g.layout().rank_in_group(GroupKind::etp, w));
    }
    p.dispatcher = std::make_unique<AllToAllDispatcher>(g.group_ptr(GroupKind::ep), g.group_ptr(GroupKind::etp),
                                                        g.group_ptr(GroupKind::etp_ep), ep_rank_of, etp_rank_of, E);
  }
  return p;
}

}  // namespace moe
