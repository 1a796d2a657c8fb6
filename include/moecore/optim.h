// libmoecore — optimizers.
//
// Optimizer: Megatron Core's mixed-precision optimizer (docs/training.md). Parameters are f32 or bf16;
// their per-micro-batch gradients are accumulated into f32 main grads; AdamW (decoupled weight
// decay) or SGD with momentum update f32 master weights (a copy for bf16 parameters, the parameters
// themselves for f32) with f32 moments. Each step reduces the main grads as finalize_grads does
// (router / sequence-parallel parameters over TP, dense over DP×CP, experts over EDP, all scaled by
// 1/(DP·CP)), takes the global gradient norm (every gradient element counted once over the world),
// skips the update when the norm is not finite, clips to clip_grad and updates. With
// use_distributed_optimizer the main grads are reduce-scattered instead of all-reduced and each rank
// keeps masters and moments only for its shard (1/(DP·CP) of the dense parameters, 1/EDP of the
// expert ones); the updated shards are all-gathered back into the parameters.
//
// Adam: the plain f32 optimizer of the regression trainer (no main grads, no reduction).
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "moecore/param.h"

namespace moe {

class ProcessGroups;  // moecore/parallel.h

struct OptimizerConfig {             // Megatron's argument names
  std::string optimizer = "adam";    // adam (AdamW, decoupled weight decay) | sgd (with momentum)
  double weight_decay = 0.01, adam_beta1 = 0.9, adam_beta2 = 0.999, adam_eps = 1e-8, sgd_momentum = 0.9;
  double clip_grad = 1.0;            // 0: no clipping
  bool use_distributed_optimizer = false;
  // A parameter updated like the others but left out of the gradient norm because another rank
  // counts the same gradient: the last pipeline stage's copy of a tied word embedding
  // (MoEGPTModel::shared_embedding_copy()). Null: none.
  const Parameter* not_in_norm = nullptr;
};

// One contiguous piece of one parameter's optimizer state held by this rank (checkpoints,
// docs/checkpoints.md). It covers the flat elements [begin, begin + length) of param->value (this
// rank's local shard, row-major; Parameter::shard maps them to the canonical tensor). With the
// distributed optimizer a piece may start and end anywhere inside the parameter; with the
// replicated one each parameter is one piece. The tensors are views of the optimizer's buffers:
// reading them saves the state, writing into them loads it.
struct OptimizerStateSlice {
  Parameter* param = nullptr;
  int64_t begin = 0, length = 0;
  Tensor master;      // (length) f32 master weights; undefined for f32 parameters (the value is the master)
  Tensor exp_avg;     // (length) f32, adam
  Tensor exp_avg_sq;  // (length) f32, adam
  Tensor momentum;    // (length) f32, sgd with sgd_momentum != 0 (PyTorch's momentum_buffer)
};

struct OptimizerStepResult {
  double grad_norm = 0;  // the global L2 norm of the reduced gradients, before clipping
  bool skipped = false;  // true when grad_norm is not finite: nothing was updated
};

// Bytes held on this rank, by category. Every figure is the size of tensors taken from the
// parameters' backend allocator.
struct OptimizerMemory {
  int64_t num_params = 0;       // trainable elements of this rank's parameter shards
  int64_t param_bytes = 0;      // their storage (the model's; not optimizer state)
  int64_t main_grad_bytes = 0;  // f32 main-grad buffers (every local element, padded to the group size)
  int64_t master_bytes = 0;     // f32 master weights (none for f32 parameters: they are the masters)
  int64_t moment_bytes = 0;     // exp_avg + exp_avg_sq (adam) or momentum_buffer (sgd)
  int64_t state_bytes() const { return main_grad_bytes + master_bytes + moment_bytes; }
};

class Optimizer {
 public:
  // params: every Parameter of the model (non-trainable ones are ignored); groups null = one
  // process. Parameters must be f32 or bf16 (fp16 needs dynamic loss scaling, which is not
  // implemented; fp64 models are for numerical checks) and all on one device. No communication
  // here; the ranks of a DP×CP (EDP) group must pass their parameters in the same order (the
  // model's parameters() does).
  Optimizer(std::vector<Parameter*> params, OptimizerConfig config, std::shared_ptr<ProcessGroups> groups = nullptr);
  ~Optimizer();
  Optimizer(const Optimizer&) = delete;
  Optimizer& operator=(const Optimizer&) = delete;

  void zero_grad();          // main grads and the parameters' own grads to zero (start of a step)
  void accumulate_grads();   // after each micro-batch's backward: main_grad (f32) += p->grad; p->grad = 0
  // Reduce, norm, skip or clip, update, write back (docs/training.md). Collective over the world.
  OptimizerStepResult step(double lr);

  int64_t state_bytes() const;  // bytes of f32 master weights + moments + main grads held on this rank
  OptimizerMemory memory() const;
  std::string memory_report() const;  // Megatron-style, one line per category

  // p's f32 main gradient (p's local shape, a view of the buffer). After accumulate_grads: the sum
  // over the micro-batches so far. After step(): reduced and clipped where this rank updates (every
  // element with the replicated optimizer, this rank's shard with the distributed one).
  Tensor main_grad(const Parameter* p) const;
  int64_t iteration() const;           // steps applied
  int64_t skipped_iterations() const;  // steps skipped for a non-finite gradient norm
  const OptimizerConfig& config() const;

  // Checkpoints. state_slices(): every piece of state this rank updates, in bucket order (views).
  // set_iteration(): the step counts a checkpoint restores (Adam's bias correction uses iteration).
  // reload_model_params(): the f32 masters of bf16 parameters re-read from the parameters (after
  // loading parameters without optimizer state, as Megatron's reload_model_params); no-op for f32.
  std::vector<OptimizerStateSlice> state_slices();
  void set_iteration(int64_t iteration, int64_t skipped_iterations = 0);
  void reload_model_params();

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

struct AdamConfig {
  double lr = 1e-3;
  double beta1 = 0.9;
  double beta2 = 0.999;
  double eps = 1e-8;
  double weight_decay = 0.0;
};

class Adam {
 public:
  // Only trainable parameters take part; each must be f32 (use Optimizer for bf16).
  Adam(std::vector<Parameter*> params, AdamConfig config);
  void step();  // one update from the current .grad values (grads are not zeroed)
  int64_t steps() const { return step_; }
  AdamConfig& config() { return config_; }

 private:
  struct State {
    Parameter* p;
    Tensor m, v;  // like p->value
  };
  std::vector<State> state_;
  AdamConfig config_;
  int64_t step_ = 0;
};

// Σ (y − target)² over all elements (f64); when dy is given it receives scale · 2 (y − target).
double mse_loss(const Tensor& y, const Tensor& target, Tensor* dy, double scale);

// Σ g² over the given parameters' gradients (this rank's shards), in f64.
double grad_sq_norm(const std::vector<Parameter*>& params);
// Multiplies every gradient by s.
void scale_grads(const std::vector<Parameter*>& params, double s);

}  // namespace moe
