#include "moe/layer_factory.h"

namespace moe {

LayerParts make_layer_parts(const MoEConfig& config, Device device, const std::shared_ptr<ProcessGroups>& groups,
                            int64_t layer_number) {
  MOE_CHECK_CODE(groups == nullptr, ErrorCode::not_supported,
                 "MoELayer: distributed process groups are not supported yet");
  LayerParts p;
  p.router = std::make_unique<Router>(config, device, RouterGroups{}, layer_number);
  p.experts = std::make_unique<GroupedExperts>(config, device, ExpertsSharding{});
  if (config.has_shared_expert()) p.shared = std::make_unique<SharedExperts>(config, device);
  p.dispatcher = std::make_unique<LocalDispatcher>();
  return p;
}

}  // namespace moe
