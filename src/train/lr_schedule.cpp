// Megatron Core's OptimizerParamScheduler.get_lr (megatron/core/optimizer_param_scheduler.py) as
// megatron/training/training.py get_optimizer_param_scheduler builds it for iteration-based
// training. The arithmetic follows the Python line by line (same operations, same order), so the
// values agree to the last bit where libm agrees.
#include <algorithm>
#include <cmath>
#include <numbers>
#include <string>

#include "moecore/error.h"
#include "moecore/training.h"

namespace moe {

LRScheduler::LRScheduler(const TrainingArgs& a, int64_t global_batch_size)
    : global_batch_size_(global_batch_size), style_(a.lr_decay_style), wsd_style_(a.lr_wsd_decay_style) {
  MOE_CHECK(global_batch_size >= 1, "LRScheduler: global batch size must be >= 1, got ", global_batch_size);
  MOE_CHECK(a.lr.has_value(), "LRScheduler: --lr is required");
  MOE_CHECK(a.train_iters.has_value() && *a.train_iters >= 1, "LRScheduler: --train-iters must be given and >= 1");
  const double gbs = static_cast<double>(global_batch_size);
  init_lr_ = a.lr_warmup_init;
  max_lr_ = *a.lr;
  min_lr_ = a.min_lr;
  const int64_t decay_iters = a.lr_decay_iters.value_or(*a.train_iters);
  decay_steps_ = static_cast<double>(decay_iters) * gbs;
  warmup_steps_ = a.lr_warmup_fraction ? *a.lr_warmup_fraction * decay_steps_
                                       : static_cast<double>(a.lr_warmup_iters) * gbs;
  wsd_steps_ = a.lr_wsd_decay_iters ? static_cast<double>(*a.lr_wsd_decay_iters) * gbs : 0.0;

  // Megatron's constructor asserts, worded with the flags.
  MOE_CHECK(std::isfinite(max_lr_) && std::isfinite(min_lr_) && std::isfinite(init_lr_),
            "learning rates must be finite, got --lr ", max_lr_, " --min-lr ", min_lr_, " --lr-warmup-init ", init_lr_);
  MOE_CHECK(min_lr_ >= 0.0, "--min-lr must be >= 0, got ", min_lr_);
  MOE_CHECK(max_lr_ >= min_lr_, "--lr (", max_lr_, ") must be >= --min-lr (", min_lr_, ")");
  MOE_CHECK(init_lr_ <= max_lr_, "--lr-warmup-init (", init_lr_, ") must be <= --lr (", max_lr_, ")");
  MOE_CHECK(decay_iters > 0, "--lr-decay-iters must be > 0, got ", decay_iters);
  MOE_CHECK(warmup_steps_ < decay_steps_, "the warm-up must end before the decay does: ",
            a.lr_warmup_fraction ? "--lr-warmup-fraction " + std::to_string(*a.lr_warmup_fraction) + " must be < 1"
                                 : "--lr-warmup-iters " + std::to_string(a.lr_warmup_iters) +
                                       " must be < --lr-decay-iters (or --train-iters) " + std::to_string(decay_iters));
  const bool known = style_ == "constant" || style_ == "linear" || style_ == "cosine" ||
                     style_ == "inverse-square-root" || style_ == "WSD";
  MOE_CHECK(known, "--lr-decay-style must be one of constant, linear, cosine, inverse-square-root, WSD, got '",
            style_, "'");
  if (style_ == "WSD") {
    MOE_CHECK(a.lr_wsd_decay_iters.has_value(), "--lr-decay-style WSD requires --lr-wsd-decay-iters");
    MOE_CHECK(*a.lr_wsd_decay_iters >= 1 && *a.lr_wsd_decay_iters <= decay_iters,
              "--lr-wsd-decay-iters must be in [1, --lr-decay-iters (or --train-iters) = ", decay_iters, "], got ",
              *a.lr_wsd_decay_iters);
    const bool wsd_known = wsd_style_ == "exponential" || wsd_style_ == "linear" || wsd_style_ == "cosine" ||
                           wsd_style_ == "minus_sqrt";
    MOE_CHECK(wsd_known, "--lr-wsd-decay-style must be one of exponential, linear, cosine, minus_sqrt, got '",
              wsd_style_, "'");
  }
}

double LRScheduler::lr(int64_t iteration) const {
  MOE_CHECK(iteration >= 0, "LRScheduler::lr: iteration must be >= 0, got ", iteration);
  return lr_at_step(static_cast<double>(iteration) * static_cast<double>(global_batch_size_));
}

double LRScheduler::lr_at_step(double num_steps) const {
  const double max_lr = max_lr_, min_lr = min_lr_;
  // Linear warm-up.
  if (warmup_steps_ > 0 && num_steps <= warmup_steps_)
    return init_lr_ + ((max_lr - init_lr_) * num_steps / warmup_steps_);
  if (style_ == "constant") return max_lr;
  if (num_steps > decay_steps_) return min_lr;
  if (style_ == "inverse-square-root") {
    const double warmup = std::max(warmup_steps_, 1.0);
    const double steps = std::max(num_steps, 1.0);
    const double lr = max_lr * std::pow(warmup, 0.5) / std::pow(steps, 0.5);
    return std::max(min_lr, lr);
  }
  const double num_steps_ = num_steps - warmup_steps_;
  const double decay_steps_since = decay_steps_ - warmup_steps_;
  const double decay_ratio = num_steps_ / decay_steps_since;
  const double delta_lr = max_lr - min_lr;
  double coeff = 0.0;
  if (style_ == "linear") {
    coeff = 1.0 - decay_ratio;
  } else if (style_ == "cosine") {
    coeff = 0.5 * (std::cos(std::numbers::pi * decay_ratio) + 1.0);
  } else {  // WSD
    const double anneal_start = decay_steps_ - wsd_steps_;
    if (num_steps <= anneal_start) {
      coeff = 1.0;
    } else {
      const double wsd_ratio = (num_steps - anneal_start) / wsd_steps_;
      if (wsd_style_ == "linear") coeff = 1.0 - wsd_ratio;
      else if (wsd_style_ == "cosine") coeff = 0.5 * (std::cos(std::numbers::pi * wsd_ratio) + 1.0);
      else if (wsd_style_ == "exponential") coeff = (2.0 * std::pow(0.5, wsd_ratio)) - 1.0;
      else coeff = 1.0 - std::sqrt(wsd_ratio);  // minus_sqrt
    }
  }
  return min_lr + coeff * delta_lr;
}

}  // namespace moe
