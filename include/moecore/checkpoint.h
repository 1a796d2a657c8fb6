// libmoecore — checkpoints that resume exactly and reshard (docs/checkpoints.md).
//
// Megatron's layout:
//   DIR/latest_checkpointed_iteration.txt        the iteration number of the newest complete checkpoint
//   DIR/iter_0000100/index.json                  every canonical tensor → its slices → files; training state
//   DIR/iter_0000100/shard_r00003.safetensors    the slices world rank 3 wrote (one file per writing rank)
//
// Every canonical tensor — parameters (under their canonical names, expert bias included), f32 master
// weights ("optimizer.state.fp32_param.<name>", bf16 parameters only: an f32 parameter is its own
// master), AdamW moments ("optimizer.state.exp_avg.<name>", "optimizer.state.exp_avg_sq.<name>") or
// SGD momentum ("optimizer.state.momentum_buffer.<name>") — is cut into slices: boxes (offsets and
// lengths per dimension of the canonical shape). Each element is written exactly once: the boxes the
// ranks hold are put in one deterministic order and each rank writes the part of its boxes that no
// earlier box covers. Replicas of the very same box (DP / CP / EDP copies, TP-replicated norms and
// routers) take turns by a hash of tensor and box, so their writes spread over the holders; the
// distributed optimizer's shards are written by their owners. Nobody gathers a model.
// The index records each file's size and each slice's CRC-32; loading checks both.
//
// Loading: any parallel layout (TP, CP, EP, ETP, DP, PP, distributed optimizer or not) loads any
// checkpoint of the same model: each rank intersects the boxes it holds with the index's slices and
// opens only the files holding those. The code sees nothing but Parameters (canonical name, shape,
// Parameter::shard) and the optimizer's state slices, so a pipeline stage that lacks a parameter
// simply neither writes nor reads it.
//
// Saving is atomic: files go to DIR/iter_0000100.tmp-<nonce>/, are fsync'ed, the directory is renamed
// into place, then the tracker is replaced (temp file + rename). A crash at any point leaves the
// previous checkpoint complete and the tracker pointing at it.
#pragma once
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "moecore/config.h"
#include "moecore/param.h"
#include "moecore/tensor.h"

namespace moe {

class Optimizer;      // moecore/optim.h
class ProcessGroups;  // moecore/parallel.h
class MoEGPTModel;    // moecore/model.h

// Megatron's OptimizerParamScheduler state (iteration-based training: steps count samples).
struct SchedulerState {
  double num_steps = 0;  // samples the schedule has advanced over (iteration · global batch)
  double max_lr = 0, min_lr = 0, warmup_steps = 0, decay_steps = 0;
  std::string decay_style;
};

// Where training stands. The trainer fills it before a save and continues from it after a load.
struct TrainingState {
  int64_t iteration = 0;               // iterations completed (the checkpoint's number)
  int64_t consumed_train_samples = 0;  // Megatron's args.consumed_train_samples: drives the data order
  int64_t consumed_valid_samples = 0;
  int64_t global_batch_size = 0;       // the batch the samples were consumed in (informational)
  // The data loader: the sample index its next train / valid batch starts at (Megatron's sampler
  // starts at consumed samples, so these usually equal the counters above) and the seed of the
  // datasets' shuffle.
  int64_t train_data_position = 0, valid_data_position = 0;
  uint64_t data_seed = 0;
  // Randomness: the model's (parameter init and router jitter are pure functions of (seed, name,
  // index) and (seed, step, layer, micro-batch)); named generators the trainer keeps, serialised
  // as text (e.g. std::mt19937_64 written with operator<<). Saved per rank.
  uint64_t seed = 0;
  std::map<std::string, std::string> rng_states;
  SchedulerState scheduler;
  std::string extra_json = "{}";  // a JSON object the trainer wants back verbatim
};

// The phases of a save, in order; the fault hook and MOE_CKPT_FAIL_AT name them.
//   start    the temp directory exists          shards   this rank's shard file is written
//   index    index.json is written (rank 0)     publish  the directory is renamed into place
//   tracker  the tracker's temp file is written done     the tracker points at the new checkpoint
const std::vector<std::string>& checkpoint_phases();

struct SaveOptions {
  bool save_optim = true;  // false: parameters only (Megatron's --no-save-optim)
  bool save_rng = true;    // false: no generator states (Megatron's --no-save-rng)
  // Called by every rank after each phase it reaches. Throwing stops the save there and leaves the
  // files as a crash would (a test hook). The environment variable MOE_CKPT_FAIL_AT=<phase> or
  // <phase>:<rank> makes the process exit at once (std::_Exit(75)) after that phase: a real crash.
  std::function<void(const std::string& phase)> fault_hook;
};

struct SaveResult {
  std::string path;              // DIR/iter_NNNNNNN
  int64_t bytes_written = 0;     // by this rank (its shard file; rank 0 also the index and tracker)
  int64_t slices_written = 0;    // by this rank
  double seconds = 0;            // wall time of the whole save on this rank
};

struct LoadOptions {
  std::optional<int64_t> iteration;  // none: the tracker's (Megatron's "latest")
  bool finetune = false;             // parameters only; iteration and consumed samples start at 0
  bool no_load_optim = false;        // parameters only (the optimizer's masters re-read from them)
  bool no_load_rng = false;          // keep this run's generators
};

struct LoadResult {
  int64_t iteration = 0;         // the checkpoint's number
  std::string path;              // DIR/iter_NNNNNNN
  TrainingState state;           // as saved (finetune: iteration and consumed samples 0; rng only if loaded)
  bool optimizer_loaded = false;
  bool rng_loaded = false;
  std::string saved_config_json;  // config_to_json of the saving run
  std::string saved_layout_json;  // {"world_size": 4, "tp": 2, ...}
  int64_t bytes_read = 0;         // by this rank (slice payloads, headers, index)
  int64_t files_opened = 0;       // shard files this rank opened
  double seconds = 0;
  std::vector<std::string> notes;  // what was not loaded exactly as saved, and why
};

// DIR/iter_0000100 (Megatron's iter_{:07d}).
std::string checkpoint_iteration_dir(const std::string& dir, int64_t iteration);
// The number in DIR/latest_checkpointed_iteration.txt; none when the file is absent. A malformed
// tracker is an error naming the file and its text.
std::optional<int64_t> read_latest_iteration(const std::string& dir);

// Collective over groups->world() (null groups: one process). `params` are this rank's parameters
// (the model's parameters(): canonical names, Parameter::shard); `optimizer` may be null (no
// optimizer state saved). config: written into the index (config_to_json) and checked on load.
SaveResult save_checkpoint(const std::string& dir, int64_t iteration, const MoEConfig& config,
                           const std::vector<Parameter*>& params, Optimizer* optimizer, const TrainingState& state,
                           std::shared_ptr<ProcessGroups> groups, const SaveOptions& options = {});
SaveResult save_checkpoint(const std::string& dir, int64_t iteration, MoEGPTModel& model, Optimizer* optimizer,
                           const TrainingState& state, std::shared_ptr<ProcessGroups> groups,
                           const SaveOptions& options = {});

// Collective over groups->world(). Refuses (Error invalid_argument, naming the file, the tensor,
// expected vs got) a checkpoint of another model (architecture keys of the config, tensor shapes,
// tensors missing or left over), a missing or truncated shard file, a slice whose bytes do not
// match its CRC or whose header entry disagrees with the index, an index that does not cover a
// tensor. On success the parameters (and, unless finetune / no_load_optim, the optimizer's masters,
// moments and step counts) hold the checkpoint's values.
LoadResult load_checkpoint(const std::string& dir, const MoEConfig& config, const std::vector<Parameter*>& params,
                           Optimizer* optimizer, std::shared_ptr<ProcessGroups> groups,
                           const LoadOptions& options = {});
LoadResult load_checkpoint(const std::string& dir, MoEGPTModel& model, Optimizer* optimizer,
                           std::shared_ptr<ProcessGroups> groups, const LoadOptions& options = {});

// One process reading a checkpoint's files (the converter, tests): whole canonical tensors
// assembled from their slices, every slice verified.
class CheckpointReader {
 public:
  explicit CheckpointReader(const std::string& dir, std::optional<int64_t> iteration = std::nullopt);
  ~CheckpointReader();
  CheckpointReader(const CheckpointReader&) = delete;
  CheckpointReader& operator=(const CheckpointReader&) = delete;

  int64_t iteration() const;
  const std::string& path() const;  // DIR/iter_NNNNNNN
  // Every tensor of the index (parameters first, then optimizer state), sorted by name.
  std::vector<std::string> tensor_names() const;
  std::vector<std::string> parameter_names() const;  // the model's parameters only
  bool contains(const std::string& name) const;
  Shape shape(const std::string& name) const;
  DType dtype(const std::string& name) const;
  int64_t num_slices(const std::string& name) const;
  Tensor read(const std::string& name) const;  // (shape) in the stored dtype, CPU
  MoEConfig config() const;                     // the saving run's config
  std::string config_json() const;
  std::string layout_json() const;
  TrainingState training_state() const;         // rank 0's generator states

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// ---- Hugging Face (Qwen3-MoE / Qwen2-MoE / Mixtral style) ------------------------------------------
// export: OUT/config.json + OUT/model.safetensors (per-expert tensors, separate q/k/v, names in
// docs/checkpoints.md) from a checkpoint, read by one process. import: such a directory (ours, or a
// Qwen3-MoE one whose config maps onto MoEConfig) into a parameters-only checkpoint DIR/iter_<N>.
// Returns the number of tensors written.
int64_t export_hf(const std::string& checkpoint_dir, std::optional<int64_t> iteration, const std::string& out_dir);
int64_t import_hf(const std::string& hf_dir, const std::string& checkpoint_dir, int64_t iteration = 0,
                  const SaveOptions& options = {});
// The config.json text export_hf writes for a config (HF keys, plus "moecore_config" with ours).
std::string hf_config_json(const MoEConfig& config);
// The MoEConfig an HF config.json describes ("moecore_config" when present, else the HF keys).
MoEConfig config_from_hf_json(const std::string& json_text, const std::string& source = "<config.json>");

}  // namespace moe
