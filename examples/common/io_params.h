// The io tools' parameter loading: every trainable parameter must be in the file (non-trainable
// buffers such as router.expert_bias are optional), and the file holds nothing but the tool's
// `inputs` and the parameters.
#pragma once
#include <set>
#include <string>
#include <vector>

#include "moecore/error.h"
#include "moecore/param.h"
#include "moecore/safetensors.h"

namespace moe::examples {

inline void load_parameters(const SafetensorsFile& in, const std::string& in_path, const std::vector<Parameter*>& params,
                            std::set<std::string> known, const std::string& inputs_desc) {
  for (Parameter* p : params) {
    known.insert(p->name);
    if (!in.contains(p->name)) {
      MOE_CHECK(!p->trainable, in_path, ": missing parameter '", p->name, "' of shape ", shape_str(p->canonical_shape));
      continue;
    }
    load_shard(*p, in.at(p->name));
  }
  for (const std::string& n : in.names)
    MOE_CHECK(known.count(n), in_path, ": unexpected tensor '", n, "' (this config takes ", inputs_desc,
              " and its parameters)");
}

}  // namespace moe::examples
