// Builds the parts of a MoE layer for a process layout: one process (groups null) gets the local
// dispatcher and every expert; a distributed layout gets its dispatcher and its experts' shards.
#pragma once
#include <memory>

#include "moe/dispatcher.h"
#include "moecore/config.h"
#include "moecore/experts.h"
#include "moecore/router.h"

namespace moe {

class ProcessGroups;

struct LayerParts {
  std::unique_ptr<Router> router;
  std::unique_ptr<GroupedExperts> experts;
  std::unique_ptr<SharedExperts> shared;
  std::unique_ptr<TokenDispatcher> dispatcher;
};

// param_prefix goes before every parameter's canonical name ("decoder.layers.3.mlp." in a model).
// pipeline_stage: part of one pipeline stage of a model, so PP > 1 is allowed (a lone layer needs
// PP = 1).
LayerParts make_layer_parts(const MoEConfig& config, Device device, const std::shared_ptr<ProcessGroups>& groups,
                            int64_t layer_number, const std::string& param_prefix = "",
                            bool pipeline_stage = false);

}  // namespace moe
