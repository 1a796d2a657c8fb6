// One training step of the MoE layer, or of router → allgather dispatcher → grouped experts over a
// group of one, with a counter read around the forward and the backward (host_read_count on any
// back end, cuda_host_sync_count on a GPU). Shared by tests/layer/test_host_syncs.cpp and
// tests/cuda/test_scale_cuda.cpp.
#pragma once
#include <cstdint>
#include <functional>

#include "device/ops.h"
#include "moe/dispatcher.h"
#include "moecore/moecore.h"

namespace moe::test {

struct StepCounts {
  int64_t forward = 0, backward = 0;
  Tensor out;  // (T, H) the step's output
  Tensor dx;   // (T, H) its input gradient
};

// x, g (T, H) or (S, B, H) on the layer's device; a warm-up step runs first (handles, caches).
inline StepCounts layer_step(MoELayer& layer, const Tensor& x, const Tensor& g, const ForwardContext& ctx,
                             const std::function<int64_t()>& count) {
  layer.forward(x, ctx);
  layer.backward(g);
  StepCounts r;
  const int64_t s0 = count();
  r.out = layer.forward(x, ctx);
  const int64_t s1 = count();
  r.dx = layer.backward(g);
  const int64_t s2 = count();
  r.forward = s1 - s0;
  r.backward = s2 - s1;
  return r;
}

// The same step as the layer's, with the allgather dispatcher over a group of one (a one-rank
// ETP×EP group: the gathers are copies) instead of the local one. x, g (T, H) on `device`.
inline StepCounts allgather_step(const MoEConfig& c, Device device, const Tensor& x, const Tensor& g,
                                 const ForwardContext& ctx, const std::function<int64_t()>& count) {
  Router router(c, device);
  GroupedExperts experts(c, device);
  AllGatherDispatcher disp(make_single_communicator("etp_ep"), 0, c.num_moe_experts);
  disp.use_device_counts(c.moe_router_topk);
  const DType pd = ops::prob_dtype_for(x.dtype());
  auto step = [&](StepCounts* r) {
    ActivationStore st;
    const int64_t s0 = count();
    RouterOutput ro = router.forward_on_device(x, ctx, st);
    Tensor probs = ro.probs.dtype() == pd ? ro.probs : ops::cast(ro.probs, pd);  // (T, E)
    DispatchOutput d = disp.dispatch(x, probs, ro.routing_map);
    Tensor y = experts.forward(d.tokens, d.row_offsets, d.probs, st);  // (N_max, H)
    Tensor out = disp.combine(y);                                      // (T, H)
    const int64_t s1 = count();
    Tensor dy = disp.combine_backward(g);  // (N_max, H)
    Tensor drows = dy;
    Tensor drow_probs = Tensor::empty({dy.size(0)}, pd, device);  // (N_max)
    experts.backward(dy, drows, drow_probs, st);
    Tensor dx = Tensor::empty(x.shape(), x.dtype(), device);                   // (T, H)
    Tensor dprobs = Tensor::empty({x.size(0), c.num_moe_experts}, pd, device);  // (T, E)
    disp.dispatch_backward(drows, drow_probs, dx, dprobs);
    router.backward(dprobs.dtype() == router.router_dtype() ? dprobs : ops::cast(dprobs, router.router_dtype()), dx,
                    st);
    const int64_t s2 = count();
    if (r) *r = StepCounts{s1 - s0, s2 - s1, out, dx};
  };
  step(nullptr);  // warm-up
  StepCounts r;
  step(&r);
  return r;
}

}  // namespace moe::test
