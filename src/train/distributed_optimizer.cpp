// The mixed-precision optimizer with Megatron's gradient finalisation, global gradient norm and
// (optionally) distributed optimizer state. docs/training.md states the semantics.
//
// Layout. The trainable parameters are split into two buckets by the group that reduces their
// gradients: `dense` (reduced over DP×CP; the router and sequence-parallel parameters first, as they
// are also summed over TP) and `expert` (reduced over EDP). Each bucket's main grads are one flat f32
// buffer (the parameters concatenated in model order, padded to a multiple of the group size G);
// rank r of the group owns the shard [r·padded/G, (r+1)·padded/G).
//
// Both modes reduce the same way: reduce-scatter of the flat buffer into the shard, then the
// replicated optimizer all-gathers the reduced shards back (an all-reduce with a fixed reduction
// order), so both see the same bits. The norm counts each rank's shard only (every DP×CP or EDP
// replica of an element lies in exactly one shard), and of the model-parallel replicas only those
// on TP rank 0 (ETP rank 0). Both modes therefore compute the same partial sums and the same norm,
// and the element-wise update gives the same bits wherever it runs.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <sstream>
#include <unordered_map>
#include <unordered_set>

#include "device/ops.h"
#include "moecore/comm.h"
#include "moecore/optim.h"
#include "moecore/parallel.h"

namespace moe {

namespace {

constexpr int64_t kNormChunk = int64_t{1} << 20;  // elements widened to f64 at a time for the norm

bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

// Megatron's default parameter groups: no weight decay on biases and 1-D parameters (norms).
bool decays(const Parameter& p) { return p.canonical_shape.size() > 1 && !ends_with(p.name, ".bias"); }

std::string bytes_str(int64_t b) {
  char buf[64];
  const double d = static_cast<double>(b);
  if (b < 1024) std::snprintf(buf, sizeof buf, "%lld B", static_cast<long long>(b));
  else if (b < (int64_t{1} << 20)) std::snprintf(buf, sizeof buf, "%.2f KiB", d / 1024.0);
  else if (b < (int64_t{1} << 30)) std::snprintf(buf, sizeof buf, "%.2f MiB", d / 1048576.0);
  else std::snprintf(buf, sizeof buf, "%.2f GiB", d / 1073741824.0);
  return buf;
}

// dst (any float dtype) = src, exact when the dtypes agree.
void assign(const Tensor& src, Tensor& dst) {
  if (src.dtype() == dst.dtype()) dst.copy_from(src);
  else ops::cast_into(src, dst);
}

Tensor flat(const Tensor& t) { return t.view({t.numel()}); }

void check_config(const OptimizerConfig& c) {
  MOE_CHECK(c.optimizer == "adam" || c.optimizer == "sgd", "optimizer must be one of adam, sgd, got optimizer = '",
            c.optimizer, "'");
  MOE_CHECK(c.weight_decay >= 0 && std::isfinite(c.weight_decay), "weight_decay must be >= 0, got ", c.weight_decay);
  MOE_CHECK(c.adam_beta1 >= 0 && c.adam_beta1 < 1, "adam_beta1 must be in [0, 1), got ", c.adam_beta1);
  MOE_CHECK(c.adam_beta2 >= 0 && c.adam_beta2 < 1, "adam_beta2 must be in [0, 1), got ", c.adam_beta2);
  MOE_CHECK(c.adam_eps >= 0 && std::isfinite(c.adam_eps), "adam_eps must be >= 0, got ", c.adam_eps);
  MOE_CHECK(c.sgd_momentum >= 0 && c.sgd_momentum < 1, "sgd_momentum must be in [0, 1), got ", c.sgd_momentum);
  MOE_CHECK(c.clip_grad >= 0 && std::isfinite(c.clip_grad), "clip_grad must be >= 0 (0: no clipping), got ",
            c.clip_grad);
}

}  // namespace

struct Optimizer::Impl {
  struct Entry {
    Parameter* p = nullptr;
    int64_t offset = 0, numel = 0;  // in the bucket's flat buffer
    double wd = 0;                  // weight decay for this parameter (0: 1-D or bias)
    bool count_in_norm = true;      // false: a model-parallel replica counted on another rank
    bool own_master = false;        // bf16 value: f32 master copy; f32 value: the value is the master
  };
  // The part [begin, begin+length) (flat, within the parameter) of an entry inside a region.
  struct Segment {
    size_t entry = 0;
    int64_t begin = 0, length = 0;
    int64_t state_off = 0;    // into the moments
    int64_t master_off = -1;  // into the master buffer, -1 when the value is the master
  };
  struct Bucket {
    std::string name;
    GroupKind kind = GroupKind::dp_cp;
    std::vector<Entry> entries;
    int64_t numel = 0, padded = 0, shard = 0, shard_begin = 0;
    int64_t tp_numel = 0;      // [0, tp_numel): entries also summed over TP (router, sequence_parallel)
    DType gather_dtype = DType::f32;
    Tensor main_grad;          // (padded) f32
    std::vector<Segment> update;  // what this rank updates
    std::vector<Segment> norm;    // this rank's shard ∩ elements it counts
    Tensor master;             // (n_master) f32
    Tensor m, v;               // (n_state) f32: exp_avg, exp_avg_sq (adam) / momentum_buffer in m (sgd)
  };

  OptimizerConfig config;
  std::shared_ptr<ProcessGroups> groups;
  Device device = Device::cpu();
  std::vector<Bucket> buckets;
  std::unordered_map<const Parameter*, std::pair<size_t, size_t>> where;  // → (bucket, entry)
  OptimizerMemory mem;
  DType param_dtype = DType::f32;
  bool mixed_dtypes = false;
  int64_t iteration = 0, skipped = 0;

  Communicator& comm(const Bucket& b) const { return groups->group(b.kind); }
  bool distributed() const { return config.use_distributed_optimizer; }
  Tensor grad_view(const Bucket& b, const Entry& e) const { return b.main_grad.narrow(e.offset, e.numel); }

  // Segments of b's entries inside the flat region [r0, r1).
  std::vector<Segment> segments(const Bucket& b, int64_t r0, int64_t r1, bool counted_only, int64_t* n_state,
                                int64_t* n_master) const {
    std::vector<Segment> out;
    for (size_t i = 0; i < b.entries.size(); ++i) {
      const Entry& e = b.entries[i];
      const int64_t lo = std::max(r0, e.offset), hi = std::min(r1, e.offset + e.numel);
      if (hi <= lo || (counted_only && !e.count_in_norm)) continue;
      Segment s;
      s.entry = i;
      s.begin = lo - e.offset;
      s.length = hi - lo;
      if (n_state) {
        s.state_off = *n_state;
        *n_state += s.length;
      }
      if (n_master && e.own_master) {
        s.master_off = *n_master;
        *n_master += s.length;
      }
      out.push_back(s);
    }
    return out;
  }

  Tensor master_of(Bucket& b, const Segment& s) const {
    const Entry& e = b.entries[s.entry];
    return s.master_off >= 0 ? b.master.narrow(s.master_off, s.length) : flat(e.p->value).narrow(s.begin, s.length);
  }
};

Optimizer::Optimizer(std::vector<Parameter*> params, OptimizerConfig config, std::shared_ptr<ProcessGroups> groups)
    : impl_(std::make_unique<Impl>()) {
  check_config(config);
  Impl& I = *impl_;
  I.config = config;
  I.groups = groups ? std::move(groups) : ProcessGroups::single();
  const ProcessGroups& g = *I.groups;
  const int64_t tp = g.tp().size(), tp_rank = g.tp().rank();
  const int64_t ep = g.ep().size(), etp = g.etp().size(), etp_rank = g.etp().rank();

  I.buckets.resize(2);
  I.buckets[0].name = "dense";
  I.buckets[0].kind = GroupKind::dp_cp;
  I.buckets[1].name = "expert";
  I.buckets[1].kind = GroupKind::edp;
  std::vector<Impl::Entry> tp_reduced, dense;
  std::unordered_set<const Parameter*> seen;
  bool first = true;
  for (Parameter* p : params) {
    MOE_CHECK(p != nullptr, "Optimizer: null parameter");
    if (!p->trainable) continue;
    const DType dt = p->value.dtype();
    MOE_CHECK(dt != DType::f16, "Optimizer: parameter '", p->name, "' is fp16: fp16 training needs dynamic loss ",
              "scaling, which is not implemented (use params_dtype bf16)");
    MOE_CHECK(dt == DType::f32 || dt == DType::bf16, "Optimizer: parameter '", p->name,
              "' must be f32 or bf16 (params_dtype fp32 or bf16), got ", p->value.desc());
    MOE_CHECK(p->grad.defined() && p->grad.dtype() == dt && p->grad.numel() == p->value.numel(),
              "Optimizer: parameter '", p->name, "' needs a gradient like its value ", p->value.desc(), ", got ",
              p->grad.defined() ? p->grad.desc() : std::string("none"));
    MOE_CHECK(seen.insert(p).second, "Optimizer: parameter '", p->name, "' is listed twice");
    if (first) {
      I.device = p->value.device();
      I.param_dtype = dt;
      first = false;
    }
    MOE_CHECK(p->value.device() == I.device, "Optimizer: every parameter must be on ", I.device.str(), ", got '",
              p->name, "' on ", p->value.device().str());
    if (dt != I.param_dtype) I.mixed_dtypes = true;

    Impl::Entry e;
    e.p = p;
    e.numel = p->value.numel();
    e.wd = decays(*p) ? config.weight_decay : 0.0;
    e.own_master = dt != DType::f32;
    const int64_t local = e.numel, canon = shape_numel(p->canonical_shape);
    I.mem.num_params += local;
    I.mem.param_bytes += static_cast<int64_t>(p->value.nbytes());
    // Which model-parallel replica counts in the norm: an element held by several TP (ETP) ranks is
    // counted on TP (ETP) rank 0 only. DP×CP and EDP replicas are handled by the shards.
    if (p->grad_group == GradGroup::expert) {
      if (local * etp * ep == canon) e.count_in_norm = true;              // split over ETP×EP
      else if (local * ep == canon) e.count_in_norm = etp_rank == 0;      // split over EP, replicated over ETP
      else
        MOE_THROW(ErrorCode::internal, "Optimizer: expert parameter '", p->name, "' holds ", local, " of ",
                       canon, " elements: neither split over ETP×EP = ", etp * ep, " nor over EP = ", ep);
      I.buckets[1].entries.push_back(e);
    } else {
      if (local == canon) e.count_in_norm = tp_rank == 0;  // replicated over TP (or TP = 1)
      else if (local * tp == canon && p->grad_group == GradGroup::dense) e.count_in_norm = true;  // split over TP
      else
        MOE_THROW(ErrorCode::internal, "Optimizer: parameter '", p->name, "' holds ", local, " of ", canon,
                       " elements: neither replicated nor (as a dense parameter) split over TP = ", tp);
      if (p == config.not_in_norm) e.count_in_norm = false;  // counted on the first pipeline stage
      if (p->grad_group == GradGroup::router || p->grad_group == GradGroup::sequence_parallel) tp_reduced.push_back(e);
      else dense.push_back(e);
    }
  }
  I.buckets[0].entries = tp_reduced;
  I.buckets[0].entries.insert(I.buckets[0].entries.end(), dense.begin(), dense.end());

  for (size_t bi = 0; bi < I.buckets.size(); ++bi) {
    Impl::Bucket& b = I.buckets[bi];
    for (size_t i = 0; i < b.entries.size(); ++i) {
      Impl::Entry& e = b.entries[i];
      e.offset = b.numel;
      b.numel += e.numel;
      if (i < tp_reduced.size() && bi == 0) b.tp_numel = b.numel;
      I.where[e.p] = {bi, i};
    }
    const int64_t G = I.comm(b).size(), r = I.comm(b).rank();
    b.padded = (b.numel + G - 1) / G * G;
    b.shard = b.padded / G;
    b.shard_begin = r * b.shard;
    bool same = true;
    for (const Impl::Entry& e : b.entries) same = same && e.p->value.dtype() == b.entries[0].p->value.dtype();
    b.gather_dtype = !b.entries.empty() && same ? b.entries[0].p->value.dtype() : DType::f32;
    if (b.numel == 0) continue;

    b.main_grad = Tensor::zeros({b.padded}, DType::f32, I.device);
    int64_t n_state = 0, n_master = 0;
    const int64_t r0 = I.distributed() ? b.shard_begin : 0, r1 = I.distributed() ? b.shard_begin + b.shard : b.numel;
    b.update = I.segments(b, r0, r1, false, &n_state, &n_master);
    b.norm = I.segments(b, b.shard_begin, b.shard_begin + b.shard, true, nullptr, nullptr);
    if (n_master > 0) {
      b.master = Tensor::empty({n_master}, DType::f32, I.device);
      for (const Impl::Segment& s : b.update)
        if (s.master_off >= 0) {
          Tensor dst = b.master.narrow(s.master_off, s.length);
          ops::cast_into(flat(b.entries[s.entry].p->value).narrow(s.begin, s.length), dst);
        }
    }
    const bool adam = config.optimizer == "adam";
    if (n_state > 0 && (adam || config.sgd_momentum != 0.0)) b.m = Tensor::zeros({n_state}, DType::f32, I.device);
    if (n_state > 0 && adam) b.v = Tensor::zeros({n_state}, DType::f32, I.device);
    I.mem.main_grad_bytes += static_cast<int64_t>(b.main_grad.nbytes());
    if (b.master.defined()) I.mem.master_bytes += static_cast<int64_t>(b.master.nbytes());
    if (b.m.defined()) I.mem.moment_bytes += static_cast<int64_t>(b.m.nbytes());
    if (b.v.defined()) I.mem.moment_bytes += static_cast<int64_t>(b.v.nbytes());
  }
}

Optimizer::~Optimizer() = default;

void Optimizer::zero_grad() {
  for (Impl::Bucket& b : impl_->buckets) {
    if (b.main_grad.defined()) b.main_grad.zero_();
    for (Impl::Entry& e : b.entries) e.p->zero_grad();
  }
}

void Optimizer::accumulate_grads() {
  for (Impl::Bucket& b : impl_->buckets)
    for (Impl::Entry& e : b.entries) {
      Tensor mg = impl_->grad_view(b, e);
      if (e.p->grad.dtype() == DType::f32) ops::add_(mg, flat(e.p->grad));
      else ops::add_(mg, flat(ops::cast(e.p->grad, DType::f32)));
      e.p->grad.zero_();
    }
}

OptimizerStepResult Optimizer::step(double lr) {
  Impl& I = *impl_;
  const ProcessGroups& g = *I.groups;
  const OptimizerConfig& c = I.config;
  const double scale = 1.0 / static_cast<double>(g.dp_cp().size());

  // (1) finalize_model_grads: router / sequence-parallel grads summed over TP, then every bucket
  // reduce-scattered over its group into this rank's shard and scaled to the DP·CP mean.
  Impl::Bucket& dense = I.buckets[0];
  if (g.tp().size() > 1 && dense.tp_numel > 0) {
    Tensor t = dense.main_grad.narrow(0, dense.tp_numel);
    g.tp().all_reduce(t);
  }
  for (Impl::Bucket& b : I.buckets) {
    if (b.numel == 0) continue;
    Communicator& comm = I.comm(b);
    Tensor sh = b.main_grad.narrow(b.shard_begin, b.shard);
    if (comm.size() > 1) comm.reduce_scatter(b.main_grad, sh);
    if (scale != 1.0) ops::axpby(scale, sh, 0.0, sh);
    if (!I.distributed() && comm.size() > 1) comm.all_gather(sh, b.main_grad);
  }

  // (2) The global norm: each rank's shard, the elements it counts, f64 sums, over the world.
  int64_t chunks = 0, widest = 0;
  for (const Impl::Bucket& b : I.buckets)
    for (const Impl::Segment& s : b.norm) {
      chunks += (s.length + kNormChunk - 1) / kNormChunk;
      widest = std::max(widest, std::min(s.length, kNormChunk));
    }
  double sq = 0.0;
  if (chunks > 0) {
    Tensor wide = Tensor::empty({widest}, DType::f64, I.device);
    Tensor sums = Tensor::empty({chunks}, DType::f64, I.device);
    int64_t k = 0;
    for (const Impl::Bucket& b : I.buckets)
      for (const Impl::Segment& s : b.norm) {
        Tensor gseg = I.grad_view(b, b.entries[s.entry]).narrow(s.begin, s.length);
        for (int64_t off = 0; off < s.length; off += kNormChunk, ++k) {
          const int64_t n = std::min(kNormChunk, s.length - off);
          Tensor w = wide.narrow(0, n);
          ops::cast_into(gseg.narrow(off, n), w);
          Tensor out = sums.narrow(k, 1);
          ops::row_dot(w.view({1, n}), w.view({1, n}), out);
        }
      }
    for (double v : sums.to_vector<double>()) sq += v;
  }
  if (g.world().size() > 1) {
    Tensor t = Tensor::from_vector(std::vector<double>{sq}, {1}, I.device);
    g.world().all_reduce(t);
    sq = t.to_vector<double>()[0];
  }
  OptimizerStepResult result;
  result.grad_norm = std::sqrt(sq);

  // (3) A non-finite norm skips the update (Megatron's "number of skipped iterations").
  if (!std::isfinite(result.grad_norm)) {
    result.skipped = true;
    ++I.skipped;
    return result;
  }

  // (4) clip_grad_norm_fp32: clip_coeff = max_norm / (total_norm + 1e-6), applied when < 1.
  if (c.clip_grad > 0) {
    const double coeff = c.clip_grad / (result.grad_norm + 1.0e-6);
    if (coeff < 1.0)
      for (Impl::Bucket& b : I.buckets) {
        if (b.numel == 0) continue;
        Tensor region = I.distributed() ? b.main_grad.narrow(b.shard_begin, b.shard) : b.main_grad;
        ops::axpby(coeff, region, 0.0, region);
      }
  }

  // (5) The update on the f32 masters this rank owns.
  ++I.iteration;
  const bool adam = c.optimizer == "adam";
  for (Impl::Bucket& b : I.buckets)
    for (const Impl::Segment& s : b.update) {
      const Impl::Entry& e = b.entries[s.entry];
      Tensor master = I.master_of(b, s);
      Tensor grad = I.grad_view(b, e).narrow(s.begin, s.length);
      if (adam) {
        Tensor m = b.m.narrow(s.state_off, s.length), v = b.v.narrow(s.state_off, s.length);
        ops::adam(master, grad, m, v, lr, c.adam_beta1, c.adam_beta2, c.adam_eps, e.wd, I.iteration);
      } else if (b.m.defined()) {
        Tensor buf = b.m.narrow(s.state_off, s.length);
        ops::sgd(master, grad, &buf, lr, c.sgd_momentum, e.wd);
      } else {
        ops::sgd(master, grad, nullptr, lr, 0.0, e.wd);
      }
    }

  // (6) Masters back into the parameters: cast in place, or all-gather the shards.
  for (Impl::Bucket& b : I.buckets) {
    if (b.numel == 0) continue;
    Communicator& comm = I.comm(b);
    if (!I.distributed() || comm.size() == 1) {
      for (const Impl::Segment& s : b.update)
        if (s.master_off >= 0) {
          Tensor dst = flat(b.entries[s.entry].p->value).narrow(s.begin, s.length);
          ops::cast_into(I.master_of(b, s), dst);
        }
      continue;
    }
    Tensor send = Tensor::zeros({b.shard}, b.gather_dtype, I.device);
    for (const Impl::Segment& s : b.update) {
      Tensor dst = send.narrow(b.entries[s.entry].offset + s.begin - b.shard_begin, s.length);
      assign(I.master_of(b, s), dst);
    }
    Tensor all = Tensor::empty({b.padded}, b.gather_dtype, I.device);
    comm.all_gather(send, all);
    for (const Impl::Entry& e : b.entries) {
      Tensor dst = flat(e.p->value);
      assign(all.narrow(e.offset, e.numel), dst);
    }
  }
  return result;
}

int64_t Optimizer::state_bytes() const { return impl_->mem.state_bytes(); }
OptimizerMemory Optimizer::memory() const { return impl_->mem; }
int64_t Optimizer::iteration() const { return impl_->iteration; }
int64_t Optimizer::skipped_iterations() const { return impl_->skipped; }
const OptimizerConfig& Optimizer::config() const { return impl_->config; }

std::vector<OptimizerStateSlice> Optimizer::state_slices() {
  Impl& I = *impl_;
  std::vector<OptimizerStateSlice> out;
  const bool adam = I.config.optimizer == "adam";
  for (Impl::Bucket& b : I.buckets)
    for (const Impl::Segment& s : b.update) {
      OptimizerStateSlice o;
      o.param = b.entries[s.entry].p;
      o.begin = s.begin;
      o.length = s.length;
      if (s.master_off >= 0) o.master = b.master.narrow(s.master_off, s.length);
      if (adam) {
        o.exp_avg = b.m.narrow(s.state_off, s.length);
        o.exp_avg_sq = b.v.narrow(s.state_off, s.length);
      } else if (b.m.defined()) {
        o.momentum = b.m.narrow(s.state_off, s.length);
      }
      out.push_back(std::move(o));
    }
  return out;
}

void Optimizer::set_iteration(int64_t iteration, int64_t skipped_iterations) {
  MOE_CHECK(iteration >= 0 && skipped_iterations >= 0, "Optimizer::set_iteration: counts must be >= 0, got iteration ",
            iteration, ", skipped ", skipped_iterations);
  impl_->iteration = iteration;
  impl_->skipped = skipped_iterations;
}

void Optimizer::reload_model_params() {
  Impl& I = *impl_;
  for (Impl::Bucket& b : I.buckets)
    for (const Impl::Segment& s : b.update)
      if (s.master_off >= 0) {
        Tensor dst = b.master.narrow(s.master_off, s.length);
        ops::cast_into(flat(b.entries[s.entry].p->value).narrow(s.begin, s.length), dst);
      }
}

Tensor Optimizer::main_grad(const Parameter* p) const {
  auto it = impl_->where.find(p);
  MOE_CHECK(it != impl_->where.end(), "Optimizer::main_grad: '", p ? p->name : std::string("null"),
            "' is not a trainable parameter of this optimizer");
  const Impl::Bucket& b = impl_->buckets[it->second.first];
  const Impl::Entry& e = b.entries[it->second.second];
  return impl_->grad_view(b, e).view(p->value.shape());
}

std::string Optimizer::memory_report() const {
  const Impl& I = *impl_;
  const OptimizerMemory& m = I.mem;
  const Impl::Bucket &d = I.buckets[0], &x = I.buckets[1];
  std::ostringstream os;
  os << "[optimizer] " << (I.config.optimizer == "adam" ? "AdamW" : "SGD") << ", "
     << (I.distributed() ? "distributed optimizer (state sharded: dense over DP x CP = " : "replicated state (DP x CP = ")
     << I.groups->dp_cp().size() << ", experts over EDP = " << I.groups->edp().size() << "), world rank "
     << I.groups->rank() << "\n";
  os << "  parameters:      " << m.num_params << " elements on this rank (dense " << d.numel << ", expert " << x.numel
     << "), " << (I.mixed_dtypes ? "mixed" : dtype_name(I.param_dtype)) << ", " << bytes_str(m.param_bytes)
     << " (the model's)\n";
  os << "  main grads:      f32, " << bytes_str(m.main_grad_bytes) << " (padded to " << d.padded << " + " << x.padded
     << " elements)\n";
  int64_t owned = 0;
  for (const Impl::Bucket& b : I.buckets)
    for (const Impl::Segment& s : b.update) owned += s.length;
  os << "  master weights:  f32, " << bytes_str(m.master_bytes)
     << (m.master_bytes == 0 ? " (f32 parameters are their own masters)" : "") << "\n";
  os << "  optimizer moments: f32, " << bytes_str(m.moment_bytes)
     << (I.config.optimizer == "adam" ? " (exp_avg, exp_avg_sq)" : " (momentum_buffer)") << " for " << owned
     << " elements\n";
  os << "  optimizer state: " << bytes_str(m.state_bytes()) << " on this rank";
  return os.str();
}

}  // namespace moe
