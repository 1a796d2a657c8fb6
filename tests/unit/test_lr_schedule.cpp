// LRScheduler: Megatron's OptimizerParamScheduler.get_lr — warm-up (with lr_warmup_init), every decay
// style against its closed form at chosen iterations, WSD's four anneals, the sample-counted steps,
// golden values from Megatron's own Python, and the constructor's checks.
#include <gtest/gtest.h>

#include <cmath>
#include <functional>
#include <numbers>
#include <string>
#include <vector>

#include "common/test_util.h"
#include "moecore/error.h"
#include "moecore/training.h"

using namespace moe;
using moe::test::contains_all;
using moe::test::error_of;

namespace {

constexpr double kMax = 1e-3, kMin = 1e-5;
constexpr int64_t kGbs = 8;

// 100 iterations, 10 of warm-up, decay over all 100 (Megatron's lr_decay_iters default).
TrainingArgs base(const std::string& style) {
  TrainingArgs a;
  a.train_iters = 100;
  a.lr = kMax;
  a.min_lr = kMin;
  a.lr_warmup_iters = 10;
  a.lr_decay_style = style;
  return a;
}

double mid(double r) { return kMin + (1.0 - r) * (kMax - kMin); }  // linear closed form at ratio r

}  // namespace

TEST(LRSchedule, WarmupIsLinearFromInit) {
  LRScheduler s(base("cosine"), kGbs);
  EXPECT_EQ(s.lr(0), 0.0);  // Megatron's first step trains at lr_warmup_init (0)
  EXPECT_DOUBLE_EQ(s.lr(1), kMax / 10);
  EXPECT_DOUBLE_EQ(s.lr(5), kMax / 2);
  EXPECT_DOUBLE_EQ(s.lr(10), kMax);  // n == warmup steps is still warm-up: exactly max
  TrainingArgs a = base("linear");
  a.lr_warmup_init = 1e-4;
  LRScheduler w(a, kGbs);
  EXPECT_DOUBLE_EQ(w.lr(0), 1e-4);
  EXPECT_DOUBLE_EQ(w.lr(5), 1e-4 + 0.5 * (kMax - 1e-4));
  EXPECT_DOUBLE_EQ(w.lr(10), kMax);
}

TEST(LRSchedule, NoWarmupStartsAtMax) {
  TrainingArgs a = base("linear");
  a.lr_warmup_iters = 0;
  LRScheduler s(a, kGbs);
  EXPECT_DOUBLE_EQ(s.lr(0), kMax);
  EXPECT_DOUBLE_EQ(s.lr(50), mid(0.5));
}

TEST(LRSchedule, Constant) {
  LRScheduler s(base("constant"), kGbs);
  EXPECT_DOUBLE_EQ(s.lr(5), kMax / 2);  // warm-up still applies
  for (int64_t i : {10, 11, 50, 100, 150}) EXPECT_EQ(s.lr(i), kMax) << i;  // even past the decay
}

TEST(LRSchedule, Linear) {
  LRScheduler s(base("linear"), kGbs);
  // r = (n − warmup) / (decay − warmup) over samples: (i − 10) / 90 in iterations.
  EXPECT_DOUBLE_EQ(s.lr(55), mid(0.5));
  EXPECT_DOUBLE_EQ(s.lr(40), mid(30.0 / 90.0));
  EXPECT_DOUBLE_EQ(s.lr(100), kMin);
  EXPECT_EQ(s.lr(101), kMin);
  EXPECT_EQ(s.lr(1000), kMin);
  // lr_decay_iters shorter than training: min after it.
  TrainingArgs a = base("linear");
  a.lr_decay_iters = 40;
  LRScheduler d(a, kGbs);
  EXPECT_DOUBLE_EQ(d.lr(25), mid(0.5));
  EXPECT_EQ(d.lr(41), kMin);
  EXPECT_EQ(d.lr(100), kMin);
}

TEST(LRSchedule, Cosine) {
  LRScheduler s(base("cosine"), kGbs);
  auto cosine = [](double r) { return kMin + 0.5 * (std::cos(std::numbers::pi * r) + 1.0) * (kMax - kMin); };
  EXPECT_DOUBLE_EQ(s.lr(55), (kMax + kMin) / 2);
  EXPECT_DOUBLE_EQ(s.lr(40), kMin + 0.75 * (kMax - kMin));  // r = 1/3: (cos(π/3) + 1) / 2 = 3/4
  EXPECT_DOUBLE_EQ(s.lr(70), cosine(60.0 / 90.0));
  EXPECT_NEAR(s.lr(100), kMin, 1e-20);
  EXPECT_EQ(s.lr(101), kMin);
}

TEST(LRSchedule, InverseSquareRoot) {
  TrainingArgs a = base("inverse-square-root");
  a.lr_decay_iters = 1000;
  LRScheduler s(a, kGbs);
  EXPECT_DOUBLE_EQ(s.lr(5), kMax / 2);     // warm-up first
  EXPECT_DOUBLE_EQ(s.lr(10), kMax);
  EXPECT_DOUBLE_EQ(s.lr(40), kMax / 2);    // max · sqrt(10 / 40)
  EXPECT_DOUBLE_EQ(s.lr(160), kMax / 4);   // max · sqrt(10 / 160)
  EXPECT_EQ(s.lr(1001), kMin);             // past the decay: min, as Megatron
  a.min_lr = 3e-4;                         // the floor
  EXPECT_EQ(LRScheduler(a, kGbs).lr(160), 3e-4);
  // Without warm-up Megatron uses max(warmup_steps, 1) = 1 sample: the value depends on the batch.
  a = base("inverse-square-root");
  a.lr_warmup_iters = 0;
  a.min_lr = 0;
  EXPECT_DOUBLE_EQ(LRScheduler(a, 8).lr(2), kMax / 4);   // n = 16 samples
  EXPECT_DOUBLE_EQ(LRScheduler(a, 32).lr(2), kMax / 8);  // n = 64 samples
  EXPECT_DOUBLE_EQ(LRScheduler(a, 8).lr(0), kMax);       // n = max(0, 1)
}

TEST(LRSchedule, WsdAnneals) {
  // Stable at max until the last lr_wsd_decay_iters of the decay, then anneal with w in [0, 1].
  auto make = [](const std::string& wsd_style) {
    TrainingArgs a = base("WSD");
    a.lr_wsd_decay_iters = 20;
    a.lr_wsd_decay_style = wsd_style;
    return LRScheduler(a, kGbs);
  };
  const double d = kMax - kMin;
  for (const char* style : {"linear", "cosine", "exponential", "minus_sqrt"}) {
    LRScheduler s = make(style);
    EXPECT_DOUBLE_EQ(s.lr(5), kMax / 2) << style;  // warm-up
    EXPECT_EQ(s.lr(11), kMax) << style;
    EXPECT_EQ(s.lr(80), kMax) << style;  // n <= decay − wsd: stable
    EXPECT_NEAR(s.lr(100), kMin, 1e-18) << style;
    EXPECT_EQ(s.lr(101), kMin) << style;
  }
  // w = (90 − 80) / 20 = 0.5 at iteration 90; 0.25 at 85.
  EXPECT_DOUBLE_EQ(make("linear").lr(90), kMin + 0.5 * d);
  EXPECT_DOUBLE_EQ(make("linear").lr(85), kMin + 0.75 * d);
  EXPECT_DOUBLE_EQ(make("cosine").lr(90), kMin + 0.5 * d);
  EXPECT_DOUBLE_EQ(make("cosine").lr(85), kMin + 0.5 * (std::cos(std::numbers::pi * 0.25) + 1.0) * d);
  EXPECT_DOUBLE_EQ(make("exponential").lr(90), kMin + (std::sqrt(2.0) - 1.0) * d);  // 2 · 0.5^0.5 − 1
  EXPECT_DOUBLE_EQ(make("minus_sqrt").lr(85), kMin + 0.5 * d);                     // 1 − sqrt(1/4)
}

TEST(LRSchedule, WarmupFractionCountsSamples) {
  TrainingArgs a = base("linear");
  a.lr_warmup_iters = 0;
  a.lr_warmup_fraction = 0.1;  // 0.1 · 100 · 8 = 80 samples = 10 iterations, as base()
  LRScheduler f(a, kGbs), i(base("linear"), kGbs);
  for (int64_t it : {0, 3, 10, 11, 40, 99, 100}) EXPECT_DOUBLE_EQ(f.lr(it), i.lr(it)) << it;
  EXPECT_DOUBLE_EQ(f.warmup_steps(), 80.0);
  EXPECT_DOUBLE_EQ(f.decay_steps(), 800.0);
  // A fraction that is not a whole number of iterations: 0.033 · 800 = 26.4 samples.
  a.lr_warmup_fraction = 0.033;
  LRScheduler g(a, kGbs);
  EXPECT_DOUBLE_EQ(g.lr(3), kMax * 24.0 / 26.4);
  EXPECT_DOUBLE_EQ(g.lr(4), mid((32.0 - 26.4) / (800.0 - 26.4)));
}

// Golden values: Megatron's own OptimizerParamScheduler (megatron/core/optimizer_param_scheduler.py at
// NVIDIA/Megatron-LM d98e8a64, run with torch stubbed out), global batch 8, max 3e-4, min 3e-5,
// decay over 90 iterations, at the iterations below (printed with repr: exact doubles).
TEST(LRSchedule, MatchesMegatronsPython) {
  const std::vector<int64_t> its = {0, 1, 3, 7, 8, 20, 33, 50, 77, 80, 89, 90, 91, 120};
  struct Case {
    const char* name;
    TrainingArgs args;
    std::vector<double> want;
  };
  auto args = [](const std::string& style) {
    TrainingArgs a;
    a.train_iters = 90;
    a.lr = 3e-4;
    a.min_lr = 3e-5;
    a.lr_warmup_iters = 7;
    a.lr_decay_style = style;
    return a;
  };
  TrainingArgs linear = args("linear");
  linear.lr_warmup_init = 1e-6;
  TrainingArgs wsd_exp = args("WSD");
  wsd_exp.lr_wsd_decay_iters = 13;
  TrainingArgs wsd_msqrt = wsd_exp;
  wsd_msqrt.lr_wsd_decay_style = "minus_sqrt";
  wsd_msqrt.lr_warmup_iters = 0;
  wsd_msqrt.lr_warmup_fraction = 0.037;
  const std::vector<Case> cases = {
      {"linear", linear,
       {1e-06, 4.37142857142857e-05, 0.0001291428571428571, 0.0003, 0.0002967469879518072, 0.00025771084337349395,
        0.0002154216867469879, 0.00016012048192771082, 7.228915662650601e-05, 6.253012048192772e-05,
        3.325301204819278e-05, 3e-05, 3e-05, 3e-05}},
      {"cosine", args("cosine"),
       {0.0, 4.2857142857142856e-05, 0.00012857142857142858, 0.0003, 0.0002999033069002047, 0.00028398401391197756,
        0.00023973623061638035, 0.00015733938813243498, 4.60159860880224e-05, 3.9555560237128705e-05,
        3.0096693099795254e-05, 3e-05, 3e-05, 3e-05}},
      {"inverse-square-root", args("inverse-square-root"),
       {0.0, 4.2857142857142856e-05, 0.00012857142857142858, 0.0003, 0.00028062430400804556, 0.00017748239349298843,
        0.00013816985594155147, 0.00011224972160321822, 9.045340337332907e-05, 8.874119674649421e-05,
        8.413472342257539e-05, 8.366600265340753e-05, 3e-05, 3e-05}},
      {"WSD exponential", wsd_exp,
       {0.0, 4.2857142857142856e-05, 0.00012857142857142858, 0.0003, 0.0003, 0.0003, 0.0003, 0.0003, 0.0003,
        0.00022017741407143022, 4.47868406500446e-05, 3e-05, 3e-05, 3e-05}},
      {"WSD minus_sqrt, warm-up fraction", wsd_msqrt,
       {0.0, 9.009009009009009e-05, 0.0002702702702702703, 0.0003, 0.0003, 0.0003, 0.0003, 0.0003, 0.0003,
        0.00017029619541787937, 4.059239083575883e-05, 3e-05, 3e-05, 3e-05}},
  };
  for (const Case& c : cases) {
    LRScheduler s(c.args, 8);
    for (size_t k = 0; k < its.size(); ++k) EXPECT_DOUBLE_EQ(s.lr(its[k]), c.want[k]) << c.name << " at " << its[k];
  }
}

TEST(LRSchedule, ChecksLikeMegatron) {
  struct Case {
    const char* what;
    std::function<void(TrainingArgs&)> breaks;
    std::vector<std::string> parts;
  };
  const std::vector<Case> cases = {
      {"min > max", [](TrainingArgs& a) { a.min_lr = 2e-3; }, {"--lr", "--min-lr"}},
      {"min < 0", [](TrainingArgs& a) { a.min_lr = -1e-5; }, {"--min-lr", ">= 0"}},
      {"init > max", [](TrainingArgs& a) { a.lr_warmup_init = 1.0; }, {"--lr-warmup-init", "<= --lr"}},
      {"warm-up as long as the decay", [](TrainingArgs& a) { a.lr_warmup_iters = 100; },
       {"--lr-warmup-iters 100", "--lr-decay-iters"}},
      {"warm-up fraction 1",
       [](TrainingArgs& a) {
         a.lr_warmup_iters = 0;
         a.lr_warmup_fraction = 1.0;
       },
       {"--lr-warmup-fraction", "< 1"}},
      {"decay iters 0", [](TrainingArgs& a) { a.lr_decay_iters = 0; }, {"--lr-decay-iters", "> 0"}},
      {"style", [](TrainingArgs& a) { a.lr_decay_style = "step"; }, {"--lr-decay-style", "'step'", "WSD"}},
      {"WSD without its iterations", [](TrainingArgs& a) { a.lr_decay_style = "WSD"; }, {"--lr-wsd-decay-iters"}},
      {"WSD style",
       [](TrainingArgs& a) {
         a.lr_decay_style = "WSD";
         a.lr_wsd_decay_iters = 10;
         a.lr_wsd_decay_style = "square";
       },
       {"--lr-wsd-decay-style", "'square'", "minus_sqrt"}},
      {"no lr", [](TrainingArgs& a) { a.lr.reset(); }, {"--lr"}},
      {"no train iters", [](TrainingArgs& a) { a.train_iters.reset(); }, {"--train-iters"}},
  };
  for (const Case& c : cases) {
    TrainingArgs a = base("linear");
    c.breaks(a);
    EXPECT_TRUE(contains_all(error_of([&] { LRScheduler s(a, kGbs); }), c.parts)) << c.what;
  }
  EXPECT_TRUE(contains_all(error_of([] { LRScheduler s(base("linear"), 0); }), {"global batch size", "0"}));
  EXPECT_TRUE(contains_all(error_of([] { LRScheduler(base("linear"), 1).lr(-1); }), {"iteration", "-1"}));
}
