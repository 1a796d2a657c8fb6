// convert_checkpoint — libmoecore checkpoints to and from Hugging Face directories (docs/checkpoints.md).
//
//   convert_checkpoint --load DIR [--iteration N] --export-hf OUTDIR
//       OUTDIR/config.json (Qwen3-MoE / Qwen2-MoE keys + "moecore_config") and OUTDIR/model.safetensors
//       (per-expert tensors, separate q/k/v projections) from DIR/iter_N (default: the tracker's).
//   convert_checkpoint --import-hf INDIR --save DIR [--iteration N]
//       INDIR's config.json + model.safetensors (or model.safetensors.index.json and its files) into a
//       parameters-only checkpoint DIR/iter_N (default 0); load it with --finetune or --no-load-optim.
//   convert_checkpoint --load DIR [--iteration N] --info
//       the checkpoint's tensors (shape, dtype, slices), training state and layout.
//
// One process reads the whole model: that is this tool's job (a training run never gathers one).
// The environment variable MOE_CKPT_FAIL_AT=<phase> stops an --import-hf save after that phase (as a
// crash would; tests use it).
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <optional>
#include <string>
#include <vector>

#include "moecore/checkpoint.h"
#include "moecore/error.h"

namespace {

int usage() {
  std::fprintf(stderr,
               "usage: convert_checkpoint --load DIR [--iteration N] --export-hf OUTDIR\n"
               "       convert_checkpoint --import-hf INDIR --save DIR [--iteration N]\n"
               "       convert_checkpoint --load DIR [--iteration N] --info\n");
  return 2;
}

int run(int argc, char** argv) {
  std::string load, save, export_dir, import_dir;
  std::optional<int64_t> iteration;
  bool info = false;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto value = [&]() -> std::string {
      MOE_CHECK(i + 1 < argc, "convert_checkpoint: ", a, " needs a value");
      return argv[++i];
    };
    if (a == "--load") load = value();
    else if (a == "--save") save = value();
    else if (a == "--export-hf") export_dir = value();
    else if (a == "--import-hf") import_dir = value();
    else if (a == "--iteration") iteration = std::stoll(value());
    else if (a == "--info") info = true;
    else if (a == "--help" || a == "-h") {
      usage();
      return 0;
    }
    else MOE_THROW(moe::ErrorCode::invalid_argument, "convert_checkpoint: unknown argument '", a, "'");
  }
  if (!export_dir.empty()) {
    MOE_CHECK(!load.empty() && import_dir.empty() && save.empty(), "convert_checkpoint: --export-hf needs --load DIR");
    const int64_t n = moe::export_hf(load, iteration, export_dir);
    std::printf("exported %lld tensors to %s (config.json, model.safetensors)\n", static_cast<long long>(n),
                export_dir.c_str());
    return 0;
  }
  if (!import_dir.empty()) {
    MOE_CHECK(!save.empty() && load.empty(), "convert_checkpoint: --import-hf needs --save DIR");
    const int64_t it = iteration.value_or(0);
    const int64_t n = moe::import_hf(import_dir, save, it);
    std::printf("imported %lld tensors into %s\n", static_cast<long long>(n),
                moe::checkpoint_iteration_dir(save, it).c_str());
    return 0;
  }
  if (info) {
    MOE_CHECK(!load.empty(), "convert_checkpoint: --info needs --load DIR");
    moe::CheckpointReader r(load, iteration);
    std::printf("%s (iteration %lld)\nlayout: %s\n", r.path().c_str(), static_cast<long long>(r.iteration()),
                r.layout_json().c_str());
    const moe::TrainingState s = r.training_state();
    std::printf("consumed samples: train %lld, valid %lld\n", static_cast<long long>(s.consumed_train_samples),
                static_cast<long long>(s.consumed_valid_samples));
    for (const std::string& n : r.tensor_names())
      std::printf("  %-70s %-16s %-5s %lld slices\n", n.c_str(), moe::shape_str(r.shape(n)).c_str(),
                  moe::dtype_name(r.dtype(n)), static_cast<long long>(r.num_slices(n)));
    return 0;
  }
  return usage();
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run(argc, argv);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "convert_checkpoint: %s\n", e.what());
    return 1;
  }
}
