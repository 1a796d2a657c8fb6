// Pipeline schedules (docs/model.md, "Pipeline parallelism"): Megatron Core's
// forward_backward_pipelining_without_interleaving (1F1B), which for one stage is
// forward_backward_no_pipelining (each micro-batch's forward, then its backward).
//
//   stage s of PP, M micro-batches:
//   warm-up    w = min(PP − s − 1, M) forwards:   recv_forward → F → send_forward
//   steady     M − w times:                        F → send_forward_recv_backward → B (oldest)
//                                                  → send_backward_recv_forward (or send_backward last)
//   cool-down  w backwards:                        recv_backward → B (oldest) → send_backward
//
// Activations (s_local·b, H) travel to the next stage and their gradients back over the PP group
// with Communicator::batch_send_recv (both halves of a combined exchange are posted together, as
// Megatron's batch_isend_irecv does). A stage holds at most PP − s micro-batches' activations.
#include <algorithm>
#include <chrono>
#include <deque>

#include "moecore/error.h"
#include "moecore/model.h"
#include "moecore/parallel.h"

namespace moe {

std::vector<ScheduleEvent> one_f_one_b_order(int64_t pp, int64_t stage, int64_t M, bool forward_only) {
  MOE_CHECK(pp >= 1 && stage >= 0 && stage < pp && M >= 1, "one_f_one_b_order: need PP >= 1, 0 <= stage < PP and ",
            "M >= 1, got PP ", pp, ", stage ", stage, ", M ", M);
  std::vector<ScheduleEvent> out;
  if (forward_only) {
    for (int64_t m = 0; m < M; ++m) out.push_back({'F', m});
    return out;
  }
  // Each stage may run ahead of the next by PP − stage − 1 forwards before its first backward.
  const int64_t ahead = std::min(pp - stage - 1, M);
  int64_t f = 0, b = 0;
  while (f < ahead) out.push_back({'F', f++});
  while (f < M) {
    out.push_back({'F', f++});
    out.push_back({'B', b++});
  }
  while (b < M) out.push_back({'B', b++});
  return out;
}

namespace {

using Clock = std::chrono::steady_clock;
double since(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }

// Megatron's p2p_communication for one stage: the exchanges with the previous and next stage of
// the pipeline, timed (the time a stage waits for its neighbours is its bubble).
class StageLinks {
 public:
  StageLinks(Communicator* pp, int64_t stage, int64_t stages, double* waited)
      : pp_(pp), stage_(stage), stages_(stages), waited_(waited) {}
  bool first() const { return stage_ == 0; }
  bool last() const { return stage_ == stages_ - 1; }

  Tensor recv_forward(const Shape& shape, DType dt, Device dev) {
    if (first()) return Tensor();
    Tensor in = Tensor::empty(shape, dt, dev);
    run({{P2POp::Kind::recv, in, prev()}});
    return in;
  }
  void send_forward(const Tensor& out) {
    if (!last()) run({{P2POp::Kind::send, out, next()}});
  }
  Tensor send_forward_recv_backward(const Tensor& out, const Shape& shape, DType dt, Device dev) {
    if (last()) return Tensor();
    Tensor grad = Tensor::empty(shape, dt, dev);
    run({{P2POp::Kind::send, out, next()}, {P2POp::Kind::recv, grad, next()}});
    return grad;
  }
  Tensor send_backward_recv_forward(const Tensor& input_grad, const Shape& shape, DType dt, Device dev) {
    if (first()) return Tensor();
    Tensor in = Tensor::empty(shape, dt, dev);
    run({{P2POp::Kind::send, input_grad, prev()}, {P2POp::Kind::recv, in, prev()}});
    return in;
  }
  Tensor recv_backward(const Shape& shape, DType dt, Device dev) {
    if (last()) return Tensor();
    Tensor grad = Tensor::empty(shape, dt, dev);
    run({{P2POp::Kind::recv, grad, next()}});
    return grad;
  }
  void send_backward(const Tensor& input_grad) {
    if (!first()) run({{P2POp::Kind::send, input_grad, prev()}});
  }

 private:
  int prev() const { return static_cast<int>(stage_ - 1); }
  int next() const { return static_cast<int>(stage_ + 1); }
  void run(const std::vector<P2POp>& ops) {
    const Clock::time_point t0 = Clock::now();
    pp_->batch_send_recv(ops);
    *waited_ += since(t0);
  }
  Communicator* pp_;
  int64_t stage_, stages_;
  double* waited_;
};

}  // namespace

ScheduleResult run_schedule(MoEGPTModel& model, const std::vector<MicroBatch>& batches, const ForwardContext& ctx,
                            const ScheduleOptions& opt) {
  const char* who = "run_schedule";
  const int64_t M = static_cast<int64_t>(batches.size());
  MOE_CHECK(M >= 1, who, ": no micro-batches");
  const int64_t PP = model.pipeline_size(), stage = model.pipeline_rank();
  const MoEConfig& c = model.config();
  const int64_t S = c.seq_length, H = c.hidden_size, s_loc = model.layout().s_local();
  for (int64_t m = 0; m < M; ++m)
    MOE_CHECK(batches[m].tokens.defined() && batches[m].tokens.ndim() == 2 && batches[m].tokens.size(1) == S &&
                  batches[m].tokens.size(0) >= 1,
              who, ": micro-batch ", m, " needs tokens (b, seq_length=", S, ") on every stage (b sets the shapes), got ",
              batches[m].tokens.defined() ? batches[m].tokens.desc() : std::string("undefined"));
  // A step starts from nothing pending: forwards left without a backward (an evaluation through
  // model.forward, an earlier step that failed) are dropped, as a new forward of them would be.
  model.release_all();
  const DType dt = dtype_from_name(c.params_dtype);
  const Device dev = model.device();
  auto io_shape = [&](int64_t m) { return Shape{s_loc * batches[static_cast<size_t>(m)].tokens.size(0), H}; };

  ScheduleResult r;
  r.losses.assign(static_cast<size_t>(M), 0.0);
  const Clock::time_point t_start = Clock::now();
  Communicator* pp = PP > 1 ? &model.groups()->pp() : nullptr;
  StageLinks link(pp, stage, PP, &r.bubble_s);

  auto forward_step = [&](int64_t m, const Tensor& input) {
    ForwardContext mctx = ctx;
    mctx.microbatch = m;
    mctx.loss_scale = ctx.loss_scale / static_cast<double>(M);
    const Clock::time_point t0 = Clock::now();
    double loss = 0.0;
    Tensor out = model.forward_stage(batches[static_cast<size_t>(m)], mctx, input, &loss,
                                     opt.keep_logits && model.is_last_stage());
    r.compute_s += since(t0);
    r.losses[static_cast<size_t>(m)] = loss;
    r.max_in_flight = std::max(r.max_in_flight, model.pending_microbatches());
    r.peak_saved_bytes = std::max(r.peak_saved_bytes, model.saved_activation_bytes());
    if (opt.record_order) r.order.push_back({'F', m});
    if (opt.after_forward) opt.after_forward(m);
    if (opt.forward_only) model.release(m);
    return out;
  };
  auto backward_step = [&](int64_t m, const Tensor& output_grad) {
    const Clock::time_point t0 = Clock::now();
    Tensor input_grad = model.backward_stage(m, output_grad);
    r.compute_s += since(t0);
    if (opt.record_order) r.order.push_back({'B', m});
    if (opt.after_backward) opt.after_backward(m);
    return input_grad;
  };

  // Megatron's forward_backward_pipelining_without_interleaving, step for step.
  const int64_t warmup = std::min(PP - stage - 1, M), remaining = M - warmup;
  std::deque<int64_t> waiting;  // forwarded micro-batches whose backward is still to come, oldest first
  int64_t next_fwd = 0;
  for (int64_t i = 0; i < warmup; ++i) {
    Tensor input = link.recv_forward(io_shape(next_fwd), dt, dev);
    Tensor out = forward_step(next_fwd, input);
    link.send_forward(out);
    if (!opt.forward_only) waiting.push_back(next_fwd);
    ++next_fwd;
  }
  Tensor input;
  if (remaining > 0) input = link.recv_forward(io_shape(next_fwd), dt, dev);
  for (int64_t i = 0; i < remaining; ++i) {
    const bool last_iteration = i == remaining - 1;
    const int64_t m = next_fwd++;
    Tensor out = forward_step(m, input);
    if (opt.forward_only) {
      link.send_forward(out);
      if (!last_iteration) input = link.recv_forward(io_shape(next_fwd), dt, dev);
      continue;
    }
    waiting.push_back(m);
    const int64_t mb = waiting.front();
    waiting.pop_front();
    Tensor output_grad = link.send_forward_recv_backward(out, io_shape(mb), dt, dev);
    out = Tensor();
    Tensor input_grad = backward_step(mb, output_grad);
    if (last_iteration) {
      input = Tensor();
      link.send_backward(input_grad);
    } else {
      input = link.send_backward_recv_forward(input_grad, io_shape(next_fwd), dt, dev);
    }
  }
  if (!opt.forward_only) {
    for (int64_t i = 0; i < warmup; ++i) {
      const int64_t mb = waiting.front();
      waiting.pop_front();
      Tensor output_grad = link.recv_backward(io_shape(mb), dt, dev);
      Tensor input_grad = backward_step(mb, output_grad);
      link.send_backward(input_grad);
    }
  }
  MOE_CHECK_CODE(waiting.empty() && model.pending_microbatches() == 0, ErrorCode::internal, who, ": stage ", stage,
                 " ends with ", model.pending_microbatches(), " micro-batch(es) still pending");

  // The lm losses live on the last stage: every rank of the pipeline gets them.
  if (pp) {
    Tensor l = Tensor::from_vector(r.losses, {M});
    pp->broadcast(l, static_cast<int>(PP - 1));
    r.losses = l.to_vector<double>();
  }
  for (double v : r.losses) r.loss += v;
  r.loss /= static_cast<double>(M);
  r.total_s = since(t_start);
  return r;
}

}  // namespace moe
