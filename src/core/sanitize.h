// Where am I, and is it finite? (docs/reliability.md). Internal.
//
// A per-thread "where" context — step, micro-batch, pass, layer, module — that the model and the MoE
// layer set with RAII scopes as they run (a few thread-local stores per module call, always on), so
// an error raised deep inside an op can say where in the model it happened: the allocator's
// out-of-memory error and the finite checks below append it.
//
// MOE_SANITIZE=1 (read once) turns on the checks: every Tensor-level op wrapper (src/device/ops*.cpp)
// checks its float outputs and throws moe::Error(non_finite) at the first NaN or Inf, naming the op,
// the output, the count and first index of the bad elements, which inputs were already non-finite
// (a NaN born in this op, or carried in from a parameter or the caller), the where context and the
// rank. The dispatchers check count conservation under the same switch.
#pragma once
#include <cstdint>
#include <initializer_list>
#include <string>

#include "moecore/tensor.h"

namespace moe::sanitize {

// MOE_SANITIZE is set to something other than "" or "0" (read once per process); set_enabled
// overrides it (tests, the trainer).
bool enabled();
void set_enabled(bool on);

// The current context of this thread; -1 / nullptr: not set.
struct Where {
  int64_t step = -1;
  int64_t micro_batch = -1;
  const char* pass = nullptr;  // "forward", "backward", "recompute"
  int64_t layer = -1;          // global layer number (decoder.layers.<layer>)
  const char* module = nullptr;  // e.g. "self_attention", "mlp.experts" (a string literal)
};
const Where& where();
// "step 3, micro-batch 1, backward, layer 2 (decoder.layers.2), module mlp.experts, rank 1"; the
// parts not set are left out ("(outside the model's forward and backward)" when none is).
std::string where_str();

// Each scope changes some fields and restores the whole context when it ends.
class Scope {
 public:
  Scope() : saved_(where()) {}
  ~Scope();
  Scope(const Scope&) = delete;
  Scope& operator=(const Scope&) = delete;

 protected:
  Where saved_;
};
// A pass over one micro-batch of one step (the model's forward / backward of a micro-batch).
struct PassScope : Scope {
  PassScope(const char* pass, int64_t step, int64_t micro_batch);
};
// A transformer layer (sets the layer, clears the module).
struct LayerScope : Scope {
  explicit LayerScope(int64_t layer);
};
// A module inside the layer; `module` must outlive the scope (a string literal).
struct ModuleScope : Scope {
  explicit ModuleScope(const char* module);
};

// Sets the module of the innermost scope (restored when that scope ends): for a sequence of modules
// inside one LayerScope or ModuleScope without a block per module.
void set_module(const char* module);

// A tensor an op reads or writes, by the op's name for it.
struct Named {
  const char* name;
  const Tensor* tensor;  // may be null or undefined: skipped
};

// When enabled(): throws Error(non_finite) if an output of `op` holds a NaN or Inf (float dtypes;
// integer tensors and undefined ones are skipped). Tensors on a device are copied to the host.
void check_op(const char* op, std::initializer_list<Named> outputs, std::initializer_list<Named> inputs = {});

// Number of non-finite elements of t (float dtypes; 0 for integers); *first gets the flat index of
// the first one, *first_value its value.
int64_t count_non_finite(const Tensor& t, int64_t* first = nullptr, double* first_value = nullptr);

}  // namespace moe::sanitize
