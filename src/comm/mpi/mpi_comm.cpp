// The MPI communicator: collectives on host buffers (CPU tensors or pinned host memory; CUDA
// device tensors are staged through pinned host copies, which is how several ranks share one GPU).
// The only file that includes mpi.h.
//
// Every collective is posted non-blocking (MPI_I*) and completed by a polling wait bounded by
// MOE_COMM_TIMEOUT_S; a peer that never arrives (stuck or dead) makes the others throw a communication
// error that names the world rank, the group, the op, the phase and the peers that stayed silent
// (silent_peers; docs/reliability.md). Every MPI return code is checked (the
// communicators use MPI_ERRORS_RETURN). Rows move as derived datatypes of one row, so counts stay
// within MPI's int even when the buffers exceed 2^31 bytes.
#include <mpi.h>

#include <algorithm>
#include <chrono>
#include <climits>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <numeric>
#include <sstream>
#include <thread>

#include "comm/comm_util.h"
#include "comm/shm_host.h"
#include "moecore/backend.h"
#include "moecore/comm.h"
#include "moecore/logging.h"

namespace moe {

namespace {

bool mpi_finalized() {
  int fin = 0;
  MPI_Finalized(&fin);
  return fin != 0;
}

std::string mpi_error_string(int rc) {
  char buf[MPI_MAX_ERROR_STRING];
  int len = 0;
  if (MPI_Error_string(rc, buf, &len) != MPI_SUCCESS) return "unknown MPI error";
  return std::string(buf, static_cast<size_t>(len));
}

void finalize_at_exit() {
  int init = 0;
  MPI_Initialized(&init);
  if (init && !mpi_finalized()) MPI_Finalize();
}

// Initialises MPI (FUNNELED) unless the application already did; finalisation is registered at exit
// only when we initialised it.
void ensure_mpi_initialized() {
  int init = 0;
  MPI_Initialized(&init);
  MOE_CHECK_CODE(!mpi_finalized(), ErrorCode::communication, "mpi_world: MPI has already been finalized");
  if (init) return;
  int provided = 0;
  int rc = MPI_Init_thread(nullptr, nullptr, MPI_THREAD_FUNNELED, &provided);
  MOE_CHECK_CODE(rc == MPI_SUCCESS, ErrorCode::communication, "mpi_world: MPI_Init_thread failed: ",
                 mpi_error_string(rc));
  std::atexit(finalize_at_exit);
}

// A committed datatype of exactly n contiguous bytes (n may exceed INT_MAX: it is then built from
// 1 GiB blocks plus a tail), so any row or block moves as a count of 1.
MPI_Datatype make_bytes_type(size_t n) {
  constexpr size_t kBlock = size_t(1) << 30;
  MPI_Datatype t = MPI_DATATYPE_NULL;
  int rc;
  if (n <= static_cast<size_t>(INT_MAX)) {
    rc = MPI_Type_contiguous(static_cast<int>(n), MPI_BYTE, &t);
  } else {
    size_t q = n / kBlock, r = n % kBlock;
    MOE_CHECK_CODE(q <= static_cast<size_t>(INT_MAX), ErrorCode::not_supported, "MPI: a block of ", n,
                   " bytes is too large");
    MPI_Datatype block = MPI_DATATYPE_NULL, blocks = MPI_DATATYPE_NULL;
    rc = MPI_Type_contiguous(static_cast<int>(kBlock), MPI_BYTE, &block);
    if (rc == MPI_SUCCESS) rc = MPI_Type_contiguous(static_cast<int>(q), block, &blocks);
    if (rc == MPI_SUCCESS) {
      int lens[2] = {1, static_cast<int>(r)};
      MPI_Aint displs[2] = {0, static_cast<MPI_Aint>(q * kBlock)};
      MPI_Datatype types[2] = {blocks, MPI_BYTE};
      rc = MPI_Type_create_struct(r ? 2 : 1, lens, displs, types, &t);
    }
    if (block != MPI_DATATYPE_NULL) MPI_Type_free(&block);
    if (blocks != MPI_DATATYPE_NULL) MPI_Type_free(&blocks);
  }
  MOE_CHECK_CODE(rc == MPI_SUCCESS, ErrorCode::communication, "MPI: building a datatype of ", n,
                 " bytes failed: ", mpi_error_string(rc));
  rc = MPI_Type_commit(&t);
  MOE_CHECK_CODE(rc == MPI_SUCCESS, ErrorCode::communication, "MPI_Type_commit failed: ", mpi_error_string(rc));
  return t;
}

// Frees a datatype at scope exit (legal while operations that use it are pending).
struct TypeGuard {
  MPI_Datatype t = MPI_DATATYPE_NULL;
  explicit TypeGuard(MPI_Datatype type) : t(type) {}
  ~TypeGuard() {
    if (t != MPI_DATATYPE_NULL && !mpi_finalized()) MPI_Type_free(&t);
  }
  TypeGuard(const TypeGuard&) = delete;
  TypeGuard& operator=(const TypeGuard&) = delete;
};

MPI_Datatype mpi_type(DType dt) {
  switch (dt) {
    case DType::f32: return MPI_FLOAT;
    case DType::f64: return MPI_DOUBLE;
    case DType::i32: return MPI_INT32_T;
    case DType::i64: return MPI_INT64_T;
    default: break;
  }
  MOE_THROW(ErrorCode::internal, "MPI: no reduction datatype for ", dtype_name(dt), " (bf16/f16/u8 reduce widened)");
}

MPI_Op mpi_op(ReduceOp op) {
  switch (op) {
    case ReduceOp::sum: return MPI_SUM;
    case ReduceOp::max: return MPI_MAX;
    case ReduceOp::min: return MPI_MIN;
  }
  return MPI_SUM;
}

// Reductions run in a dtype MPI reduces natively and exactly as we define: 16-bit floats in f32
// (rounded once at the end), u8 in i32 (wrapping mod 256 at the end; some MPI builds saturate u8
// sums, e.g. Open MPI 4.1's AVX kernels).
bool needs_widening(DType dt) { return dt == DType::bf16 || dt == DType::f16 || dt == DType::u8; }
DType widened(DType dt) { return dt == DType::u8 ? DType::i32 : DType::f32; }

// ---- host staging -------------------------------------------------------------------------------

// True when MPI may read and write t.data() directly.
bool host_accessible(const Tensor& t) { return t.device().is_cpu() || t.memory_kind() == MemoryKind::pinned_host; }

// The tensor itself when its memory is host-accessible (after the device's pending work on it), else
// a pinned-host copy. t: any shape and dtype; the result has t's shape and dtype.
Tensor host_input(const Tensor& t) {
  if (t.device().is_cpu()) return t;
  Backend& b = get_backend(t.device());
  if (t.memory_kind() == MemoryKind::pinned_host) {
    b.current_stream().synchronize();
    return t;
  }
  Tensor h = t.to(t.device(), MemoryKind::pinned_host);
  b.current_stream().synchronize();
  return h;
}

// Host-accessible memory to receive into: the tensor itself, or pinned-host scratch of t's shape.
Tensor host_output(const Tensor& t) {
  if (t.device().is_cpu()) return t;
  if (t.memory_kind() == MemoryKind::pinned_host) {
    get_backend(t.device()).current_stream().synchronize();
    return t;
  }
  return Tensor::empty(t.shape(), t.dtype(), t.device(), MemoryKind::pinned_host);
}

// Copies the received host data h (t's shape and dtype) back into t when it was staged.
void finish_output(Tensor& t, const Tensor& h) {
  if (host_accessible(t)) return;
  t.copy_from(h);
  get_backend(t.device()).current_stream().synchronize();  // the pinned source must outlive the copy
}

// A plain CPU copy of host-accessible memory (used when input and output overlap).
Tensor host_clone(const Tensor& h) {
  Tensor c = Tensor::empty(h.shape(), h.dtype(), Device::cpu());
  if (h.nbytes()) std::memcpy(c.data(), h.data(), h.nbytes());
  return c;
}

// h (any shape) bf16/f16/u8 on the host → (same shape) f32/i32 on the CPU, and back into h.
Tensor widen(const Tensor& h) {
  Tensor f = Tensor::empty(h.shape(), widened(h.dtype()), Device::cpu());
  const int64_t n = h.numel();
  if (h.dtype() == DType::u8) {
    auto* dst = static_cast<int32_t*>(f.data());
    const auto* src = static_cast<const uint8_t*>(h.data());
    for (int64_t i = 0; i < n; ++i) dst[i] = src[i];
    return f;
  }
  auto* dst = static_cast<float*>(f.data());
  const auto* src = static_cast<const uint16_t*>(h.data());
  if (h.dtype() == DType::bf16) {
    for (int64_t i = 0; i < n; ++i) dst[i] = bf16_to_float(bf16{src[i]});
  } else {
    for (int64_t i = 0; i < n; ++i) dst[i] = f16_to_float(f16{src[i]});
  }
  return f;
}

void narrow_into(const Tensor& f, Tensor& h) {
  const int64_t n = h.numel();
  if (h.dtype() == DType::u8) {
    auto* dst = static_cast<uint8_t*>(h.data());
    const auto* src = static_cast<const int32_t*>(f.data());
    for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<uint8_t>(static_cast<uint32_t>(src[i]) & 0xffu);
    return;
  }
  auto* dst = static_cast<uint16_t*>(h.data());
  const auto* src = static_cast<const float*>(f.data());
  if (h.dtype() == DType::bf16) {
    for (int64_t i = 0; i < n; ++i) dst[i] = float_to_bf16(src[i]).bits;
  } else {
    for (int64_t i = 0; i < n; ++i) dst[i] = float_to_f16(src[i]).bits;
  }
}

// ---- the communicator ---------------------------------------------------------------------------

// Tag of point-to-point transfers (collectives have their own matching context in MPI).
constexpr int kP2PTag = 7301;
// Tag of the notes ranks exchange after a timeout to find the silent peers (silent_peers).
constexpr int kDiagTag = 7302;

// The state a posted operation references until it completes: requests, count/displacement
// arrays and the buffers. On a timeout it is kept (never freed) so MPI can never touch freed memory.
struct Pending {
  std::vector<MPI_Request> reqs;
  std::vector<int> a, b, c, d;    // counts and displacements (rows) the requests read
  std::vector<Tensor> buffers;   // the host send/receive tensors (any shape) the requests touch
};

class MpiCommunicator final : public Communicator {
 public:
  MpiCommunicator(MPI_Comm comm, std::string name) : comm_(comm), name_(std::move(name)) {
    check(MPI_Comm_set_errhandler(comm_, MPI_ERRORS_RETURN), "create", "MPI_Comm_set_errhandler");
    check(MPI_Comm_rank(comm_, &rank_), "create", "MPI_Comm_rank");
    check(MPI_Comm_size(comm_, &size_), "create", "MPI_Comm_size");
    MPI_Group group, world_group;
    check(MPI_Comm_group(comm_, &group), "create", "MPI_Comm_group");
    check(MPI_Comm_group(MPI_COMM_WORLD, &world_group), "create", "MPI_Comm_group");
    std::vector<int> mine(static_cast<size_t>(size_));
    std::iota(mine.begin(), mine.end(), 0);
    world_ranks_.resize(mine.size());
    check(MPI_Group_translate_ranks(group, size_, mine.data(), world_group, world_ranks_.data()), "create",
          "MPI_Group_translate_ranks");
    MPI_Group_free(&group);
    MPI_Group_free(&world_group);
  }

  ~MpiCommunicator() override {
    // Pending operations abandoned on a timeout may still reference their buffers: leak them.
    for (auto& p : abandoned_) (void)p.release();
    if (!mpi_finalized() && comm_ != MPI_COMM_NULL && !broken_) MPI_Comm_free(&comm_);
  }

  int rank() const override { return rank_; }
  int size() const override { return size_; }
  const std::string& name() const override { return name_; }
  std::string backend_name() const override { return "mpi"; }
  std::vector<int> world_ranks() const override { return world_ranks_; }

  void all_reduce(Tensor& t, ReduceOp op) override {
    const char* kOp = "all_reduce";
    usable(kOp);
    comm::check_all_reduce(*this, t, op);
    if (t.numel() == 0) return;
    Tensor h = host_input(t);
    if (needs_widening(t.dtype())) {
      Tensor f = widen(h);
      reduce_in_place(kOp, f, op);
      narrow_into(f, h);
    } else {
      reduce_in_place(kOp, h, op);
    }
    finish_output(t, h);
  }

  void all_gather(const Tensor& in, Tensor& out) override {
    const char* kOp = "all_gather";
    usable(kOp);
    comm::check_all_gather(*this, in, out);
    if (out.nbytes() == 0) return;
    Tensor hout = host_output(out);
    Tensor hin = host_input(in);
    if (comm::overlaps(hin, hout)) hin = host_clone(hin);
    // Every rank sends the same number of rows: one block each.
    TypeGuard block(make_bytes_type(in.nbytes()));
    auto p = std::make_unique<Pending>();
    p->reqs.resize(1);
    p->buffers = {hin, hout};
    post(p, MPI_Iallgather(hin.data(), 1, block.t, hout.data(), 1, block.t, comm_, &p->reqs[0]), kOp, "MPI_Iallgather");
    wait(std::move(p), kOp, "gather");
    finish_output(out, hout);
  }

  void all_gather_v(const Tensor& in, Tensor& out, const std::vector<int64_t>& rows) override {
    const char* kOp = "all_gather_v";
    usable(kOp);
    comm::RowInfo ri = comm::check_all_gather_v(*this, in, out, rows);
    if (out.nbytes() == 0) return;
    Tensor hout = host_output(out);
    Tensor hin = host_input(in);
    if (comm::overlaps(hin, hout)) hin = host_clone(hin);
    TypeGuard row(make_bytes_type(ri.row_bytes));
    auto p = std::make_unique<Pending>();
    p->a = int_counts(kOp, rows);
    p->b = int_displs(kOp, rows);
    p->reqs.resize(1);
    p->buffers = {hin, hout};
    post(p, MPI_Iallgatherv(hin.data(), p->a[static_cast<size_t>(rank_)], row.t, hout.data(), p->a.data(),
                          p->b.data(), row.t, comm_, &p->reqs[0]),
          kOp, "MPI_Iallgatherv");
    wait(std::move(p), kOp, "gather");
    finish_output(out, hout);
  }

  void reduce_scatter(const Tensor& in, Tensor& out) override {
    const char* kOp = "reduce_scatter";
    usable(kOp);
    comm::check_reduce_scatter(*this, in, out);
    reduce_scatter_impl(kOp, in, out, std::vector<int64_t>(static_cast<size_t>(size_), out.size(0)));
  }

  void reduce_scatter_v(const Tensor& in, Tensor& out, const std::vector<int64_t>& rows) override {
    const char* kOp = "reduce_scatter_v";
    usable(kOp);
    comm::check_reduce_scatter_v(*this, in, out, rows);
    reduce_scatter_impl(kOp, in, out, rows);
  }

  void all_to_all_v(const Tensor& in, const std::vector<int64_t>& send_rows, Tensor& out,
                    const std::vector<int64_t>& recv_rows) override {
    const char* kOp = "all_to_all_v";
    usable(kOp);
    comm::RowInfo ri = comm::check_all_to_all_v(*this, in, send_rows, out, recv_rows);
    // Row size is the same on every rank, so either every rank skips or none does. A rank with no
    // rows to send or receive still takes part.
    if (ri.row_bytes == 0) return;
    Tensor hout = host_output(out);
    Tensor hin = host_input(in);
    if (comm::overlaps(hin, hout)) hin = host_clone(hin);
    TypeGuard row(make_bytes_type(ri.row_bytes));
    auto p = std::make_unique<Pending>();
    p->a = int_counts(kOp, send_rows);
    p->b = int_displs(kOp, send_rows);
    p->c = int_counts(kOp, recv_rows);
    p->d = int_displs(kOp, recv_rows);
    p->reqs.resize(1);
    p->buffers = {hin, hout};
    post(p, MPI_Ialltoallv(hin.data(), p->a.data(), p->b.data(), row.t, hout.data(), p->c.data(), p->d.data(), row.t,
                         comm_, &p->reqs[0]),
          kOp, "MPI_Ialltoallv");
    wait(std::move(p), kOp, "exchange");
    finish_output(out, hout);
  }

  void broadcast(Tensor& t, int root) override {
    const char* kOp = "broadcast";
    usable(kOp);
    comm::check_broadcast(*this, t, root);
    if (t.nbytes() == 0) return;
    Tensor h = host_input(t);
    constexpr size_t kChunk = size_t(1) << 30;
    auto p = std::make_unique<Pending>();
    p->buffers = {h};
    auto* base = static_cast<char*>(h.data());
    for (size_t off = 0; off < h.nbytes(); off += kChunk) {
      int n = static_cast<int>(std::min(kChunk, h.nbytes() - off));
      p->reqs.emplace_back();
      post(p, MPI_Ibcast(base + off, n, MPI_BYTE, root, comm_, &p->reqs.back()), kOp, "MPI_Ibcast");
    }
    wait(std::move(p), kOp, "broadcast");
    finish_output(t, h);
  }

  void batch_send_recv(const std::vector<P2POp>& ops) override {
    const char* kOp = "batch_send_recv";
    usable(kOp);
    comm::check_batch_send_recv(*this, ops);
    // Each transfer moves one block of the tensor's bytes (count 1 of a bytes datatype, so sizes
    // beyond INT_MAX work); a receive checks that exactly its bytes arrived.
    auto p = std::make_unique<Pending>();
    std::vector<Tensor> staged(ops.size());  // host buffers of the receives that need copying back
    std::vector<std::unique_ptr<TypeGuard>> types;
    std::vector<size_t> recv_req;            // index into ops of each request that is a receive
    std::vector<size_t> req_op;
    for (size_t i = 0; i < ops.size(); ++i) {
      const P2POp& op = ops[i];
      const size_t n = op.tensor.nbytes();
      if (n == 0) continue;  // the peer skips its side too (same bytes on both sides)
      types.push_back(std::make_unique<TypeGuard>(make_bytes_type(n)));
      MPI_Datatype t = types.back()->t;
      p->reqs.emplace_back();
      if (op.kind == P2POp::Kind::send) {
        Tensor h = host_input(op.tensor);
        p->buffers.push_back(h);
        post(p, MPI_Isend(h.data(), 1, t, op.peer, kP2PTag, comm_, &p->reqs.back()), kOp, "MPI_Isend");
      } else {
        Tensor h = host_output(op.tensor);
        staged[i] = h;
        p->buffers.push_back(h);
        post(p, MPI_Irecv(h.data(), 1, t, op.peer, kP2PTag, comm_, &p->reqs.back()), kOp, "MPI_Irecv");
      }
      req_op.push_back(i);
    }
    if (p->reqs.empty()) return;
    std::vector<MPI_Status> st = wait(std::move(p), kOp, "send/recv");
    for (size_t r = 0; r < req_op.size(); ++r) {
      const P2POp& op = ops[req_op[r]];
      if (op.kind != P2POp::Kind::recv) continue;
      int count = 0;
      check(MPI_Get_count(&st[r], types[r]->t, &count), kOp, "MPI_Get_count");
      MOE_CHECK_CODE(count == 1, ErrorCode::communication, kOp, " on ", comm::group_desc(*this), ": the receive of ",
                     op.tensor.desc(), " from rank ", op.peer, " got fewer bytes than its ", op.tensor.nbytes(),
                     " (the sender's tensor is smaller)");
      Tensor out = op.tensor;
      finish_output(out, staged[req_op[r]]);
    }
  }

  void barrier() override {
    usable("barrier");
    ibarrier("barrier", "barrier");
  }

  // Shared host segments when every member runs on this node (MPI's shared-memory split says so)
  // and no member has MOE_COMM_SHM=0; decided once, by all members together.
  SharedHostSegments* shared_host() override {
    if (shm_checked_) return shm_.get();
    const char* kOp = "shared_host";
    usable(kOp);
    const bool enabled = comm::shm_enabled_by_env();  // a bad value throws here, before communicating
    shm_checked_ = true;
    if (size_ == 1) return nullptr;
    // MPI_Comm_split_type blocks without a timeout: meet in a timed barrier first.
    ibarrier(kOp, "rendezvous");
    MPI_Comm node = MPI_COMM_NULL;
    check(MPI_Comm_split_type(comm_, MPI_COMM_TYPE_SHARED, rank_, MPI_INFO_NULL, &node), kOp,
          "MPI_Comm_split_type");
    int node_size = 0;
    const int rc = MPI_Comm_size(node, &node_size);
    MPI_Comm_free(&node);
    check(rc, kOp, "MPI_Comm_size");
    Tensor ok = Tensor::from_vector(std::vector<int64_t>{enabled && node_size == size_ ? 1 : 0}, {1});  // (1) i64
    all_reduce(ok, ReduceOp::min);
    if (ok.to_vector<int64_t>()[0] == 1) shm_ = comm::make_posix_shared_host(*this);
    return shm_.get();
  }

  std::shared_ptr<Communicator> split(int color, int key, const std::string& name) override {
    const char* kOp = "split";
    usable(kOp);
    comm::check_split(*this, color, name);
    // MPI_Comm_split blocks without a timeout: meet in a timed barrier first so an absent peer is
    // reported instead of hanging.
    ibarrier(kOp, "rendezvous");
    MPI_Comm sub = MPI_COMM_NULL;
    check(MPI_Comm_split(comm_, color, key, &sub), kOp, "MPI_Comm_split");
    return std::make_shared<MpiCommunicator>(sub, name);
  }

 private:
  void check(int rc, const char* op, const char* call) const {
    if (rc == MPI_SUCCESS) return;
    MOE_THROW(ErrorCode::communication, op, " on ", comm::group_desc(*this), ": ", call, " failed: ",
              mpi_error_string(rc), " (MPI error ", rc, ")");
  }

  void usable(const char* op) const {
    MOE_CHECK_CODE(!broken_, ErrorCode::communication, op, " on ", comm::group_desc(*this),
                   ": the group is unusable after an earlier failure (", broken_reason_, ")");
  }

  std::vector<int> int_counts(const char* op, const std::vector<int64_t>& rows) const {
    std::vector<int> out(rows.size());
    int64_t total = 0;
    for (size_t i = 0; i < rows.size(); ++i) {
      total += rows[i];
      MOE_CHECK_CODE(total <= INT_MAX, ErrorCode::not_supported, op, " on ", comm::group_desc(*this),
                     ": more than ", INT_MAX, " rows in total exceed MPI's int counts");
      out[i] = static_cast<int>(rows[i]);
    }
    return out;
  }
  std::vector<int> int_displs(const char* op, const std::vector<int64_t>& rows) const {
    std::vector<int64_t> off = comm::row_offsets(rows);
    return std::vector<int>(off.begin(), off.end());  // bounded by int_counts' total check
  }

  // The result of posting one more request of `p`: on failure the requests already posted stay
  // pending, so `p` is kept (the group is unusable) and the error is thrown.
  void post(std::unique_ptr<Pending>& p, int rc, const char* op, const char* call) {
    if (rc == MPI_SUCCESS) return;
    broken_ = true;
    broken_reason_ = std::string(op) + ": " + call + " failed";
    abandoned_.push_back(std::move(p));
    check(rc, op, call);
  }

  // Polls the requests until they complete, an error is reported, or the timeout passes. Returns
  // the requests' statuses.
  std::vector<MPI_Status> wait(std::unique_ptr<Pending> p, const char* op, const char* phase) {
    const double limit = comm::timeout_seconds();
    const auto t0 = std::chrono::steady_clock::now();
    std::vector<MPI_Status> st(p->reqs.size());
    for (int iter = 0;; ++iter) {
      int flag = 0;
      int rc = MPI_Testall(static_cast<int>(p->reqs.size()), p->reqs.data(), &flag, st.data());
      if (rc != MPI_SUCCESS) {
        if (rc == MPI_ERR_IN_STATUS)
          for (const auto& s : st)
            if (s.MPI_ERROR != MPI_SUCCESS && s.MPI_ERROR != MPI_ERR_PENDING) {
              rc = s.MPI_ERROR;
              break;
            }
        broken_ = true;
        broken_reason_ = std::string(op) + " failed in phase " + phase;
        abandoned_.push_back(std::move(p));
        MOE_THROW(ErrorCode::communication, op, " on ", comm::group_desc(*this), " failed (phase: ", phase,
                  "): ", mpi_error_string(rc), " (MPI error ", rc, ")");
      }
      if (flag) return st;
      double elapsed = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      if (elapsed > limit) {
        broken_ = true;
        broken_reason_ = std::string(op) + " timed out in phase " + phase;
        abandoned_.push_back(std::move(p));
        log_warn(std::string(op) + " on " + comm::group_desc(*this) + " timed out; the group is now unusable");
        comm::throw_timeout(*this, op, phase, limit, silent_peers());
      }
      // Poll with yields (MPI only progresses inside MPI calls, so long sleeps throttle large
      // transfers); after 10 ms also nap 50 us every 16 polls so a wait for a slow peer leaves the
      // core to others (ranks may share cores).
      if (elapsed > 0.01 && iter % 16 == 0)
        std::this_thread::sleep_for(std::chrono::microseconds(50));
      else
        std::this_thread::yield();
    }
  }

  // After a timeout: which peers are silent? Each rank that timed out on this group sends a one-byte
  // note to every peer and listens for theirs for a short grace period (peers that time out in the
  // same operation do the same, a little earlier or later); a peer whose note does not arrive is
  // dead or stuck elsewhere. Returns "silent: rank 3 (world rank 7); answered: ranks 0, 1, 2". The
  // requests are abandoned with the group (it is unusable afterwards anyway).
  std::string silent_peers() {
    if (size_ == 1) return "";
    const double grace = std::min(1.0, 0.2 * comm::timeout_seconds());
    auto p = std::make_unique<Pending>();
    Tensor note = Tensor::zeros({1}, DType::u8);                        // (1) u8
    Tensor heard = Tensor::zeros({static_cast<int64_t>(size_)}, DType::u8);  // (size) u8
    p->buffers = {note, heard};
    std::vector<int> recv_of(static_cast<size_t>(size_), -1);           // peer -> index into reqs
    auto* h = static_cast<uint8_t*>(heard.data());
    for (int q = 0; q < size_; ++q) {
      if (q == rank_) continue;
      p->reqs.emplace_back();
      if (MPI_Isend(note.data(), 1, MPI_BYTE, q, kDiagTag, comm_, &p->reqs.back()) != MPI_SUCCESS) p->reqs.pop_back();
      p->reqs.emplace_back();
      if (MPI_Irecv(h + q, 1, MPI_BYTE, q, kDiagTag, comm_, &p->reqs.back()) == MPI_SUCCESS)
        recv_of[static_cast<size_t>(q)] = static_cast<int>(p->reqs.size() - 1);
      else
        p->reqs.pop_back();
    }
    std::vector<bool> answered(static_cast<size_t>(size_), false);
    const auto t0 = std::chrono::steady_clock::now();
    int missing = size_ - 1;
    while (missing > 0 &&
           std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() < grace) {
      for (int q = 0; q < size_; ++q) {
        const int i = recv_of[static_cast<size_t>(q)];
        if (i < 0 || answered[static_cast<size_t>(q)]) continue;
        int flag = 0;
        if (MPI_Test(&p->reqs[static_cast<size_t>(i)], &flag, MPI_STATUS_IGNORE) == MPI_SUCCESS && flag) {
          answered[static_cast<size_t>(q)] = true;
          --missing;
        }
      }
      std::this_thread::sleep_for(std::chrono::microseconds(200));
    }
    abandoned_.push_back(std::move(p));
    std::ostringstream silent, heard_from;
    for (int q = 0; q < size_; ++q) {
      if (q == rank_) continue;
      std::ostringstream& os = answered[static_cast<size_t>(q)] ? heard_from : silent;
      os << (os.tellp() > 0 ? ", " : "") << "rank " << q << " (world rank " << world_ranks_[static_cast<size_t>(q)]
         << ")";
    }
    std::ostringstream out;
    if (silent.tellp() > 0)
      out << "silent (dead, or not in this operation; no answer within " << grace << " s): " << silent.str();
    else
      out << "every peer answered afterwards (they were late, not dead)";
    if (heard_from.tellp() > 0) out << "; timed out here too: " << heard_from.str();
    return out.str();
  }

  void ibarrier(const char* op, const char* phase) {
    auto p = std::make_unique<Pending>();
    p->reqs.resize(1);
    post(p, MPI_Ibarrier(comm_, &p->reqs[0]), op, "MPI_Ibarrier");
    wait(std::move(p), op, phase);
  }

  // In-place reduction of h (any shape) f32/f64/i32/i64 in host memory, in chunks of int counts.
  void reduce_in_place(const char* op_name, Tensor& h, ReduceOp op) {
    constexpr int64_t kChunk = int64_t(1) << 28;
    MPI_Datatype type = mpi_type(h.dtype());
    const size_t esize = dtype_size(h.dtype());
    auto p = std::make_unique<Pending>();
    p->buffers = {h};
    auto* base = static_cast<char*>(h.data());
    for (int64_t off = 0; off < h.numel(); off += kChunk) {
      int n = static_cast<int>(std::min(kChunk, h.numel() - off));
      p->reqs.emplace_back();
      post(p, MPI_Iallreduce(MPI_IN_PLACE, base + static_cast<size_t>(off) * esize, n, type, mpi_op(op), comm_,
                           &p->reqs.back()),
            op_name, "MPI_Iallreduce");
    }
    wait(std::move(p), op_name, "reduce");
  }

  // out (rows[rank], ...) = rows of the sum over ranks of in (Σ rows, ...).
  void reduce_scatter_impl(const char* op, const Tensor& in, Tensor& out, const std::vector<int64_t>& rows) {
    comm::RowInfo ri = comm::row_info(in);
    int64_t total_rows = 0;
    std::vector<int64_t> offsets = comm::row_offsets(rows, &total_rows);
    if (ri.row_elems == 0 || total_rows == 0) return;  // the same on every rank
    Tensor hout = host_output(out);
    Tensor hin = host_input(in);
    // Reduce in a dtype MPI handles exactly (see needs_widening).
    const bool wide = needs_widening(in.dtype());
    Tensor rin = wide ? widen(hin) : hin;
    Tensor rout = wide ? Tensor::empty(out.shape(), widened(in.dtype()), Device::cpu()) : hout;
    if (!wide && comm::overlaps(rin, rout)) rin = host_clone(rin);

    if (total_rows * ri.row_elems <= INT_MAX) {
      auto p = std::make_unique<Pending>();
      p->a.resize(rows.size());
      for (size_t r = 0; r < rows.size(); ++r) p->a[r] = static_cast<int>(rows[r] * ri.row_elems);
      p->reqs.resize(1);
      p->buffers = {rin, rout};
      post(p, MPI_Ireduce_scatter(rin.data(), rout.data(), p->a.data(), mpi_type(rin.dtype()), MPI_SUM, comm_,
                                &p->reqs[0]),
            op, "MPI_Ireduce_scatter");
      wait(std::move(p), op, "reduce");
    } else {
      // Beyond int element counts: reduce everything in chunks, keep this rank's rows.
      Tensor all = wide ? rin : host_clone(rin);
      reduce_in_place(op, all, ReduceOp::sum);
      const size_t rb = ri.row_elems * dtype_size(all.dtype());
      std::memcpy(rout.data(), static_cast<char*>(all.data()) + static_cast<size_t>(offsets[rank_u()]) * rb,
                  static_cast<size_t>(rows[rank_u()]) * rb);
    }
    if (wide) narrow_into(rout, hout);
    finish_output(out, hout);
  }

  size_t rank_u() const { return static_cast<size_t>(rank_); }

  MPI_Comm comm_ = MPI_COMM_NULL;
  std::string name_;
  int rank_ = 0, size_ = 1;
  std::vector<int> world_ranks_;
  bool broken_ = false;
  std::string broken_reason_;
  std::vector<std::unique_ptr<Pending>> abandoned_;
  bool shm_checked_ = false;                  // shared_host() has decided
  std::unique_ptr<SharedHostSegments> shm_;  // its segments, when the members share a node
};

int env_int(const char* const* names, int fallback) {
  for (const char* const* n = names; *n; ++n) {
    const char* v = std::getenv(*n);
    if (v && *v) {
      char* end = nullptr;
      long x = std::strtol(v, &end, 10);
      if (end && *end == '\0' && x >= 0 && x <= INT_MAX) return static_cast<int>(x);
    }
  }
  return fallback;
}

bool mpi_running() {
  int init = 0;
  MPI_Initialized(&init);
  return init && !mpi_finalized();
}

}  // namespace

std::shared_ptr<Communicator> mpi_world() {
  static std::mutex mutex;
  static std::shared_ptr<Communicator> world;
  std::lock_guard<std::mutex> lock(mutex);
  if (!world) {
    ensure_mpi_initialized();
    MPI_Comm dup = MPI_COMM_NULL;
    int rc = MPI_Comm_dup(MPI_COMM_WORLD, &dup);
    MOE_CHECK_CODE(rc == MPI_SUCCESS, ErrorCode::communication, "mpi_world: MPI_Comm_dup failed: ",
                   mpi_error_string(rc));
    world = std::make_shared<MpiCommunicator>(dup, "world");
    set_process_rank(world->world_ranks()[static_cast<size_t>(world->rank())]);
  }
  return world;
}

bool mpi_available() { return true; }

int world_rank() {
  if (mpi_running()) {
    int r = 0;
    MPI_Comm_rank(MPI_COMM_WORLD, &r);
    return r;
  }
  static const char* const names[] = {"OMPI_COMM_WORLD_RANK", "PMIX_RANK", "PMI_RANK", "MV2_COMM_WORLD_RANK", nullptr};
  return env_int(names, 0);
}

[[noreturn]] void abort_world(int code) {
  if (mpi_running()) MPI_Abort(MPI_COMM_WORLD, code);
  std::exit(code);
}

int world_size() {
  if (mpi_running()) {
    int n = 1;
    MPI_Comm_size(MPI_COMM_WORLD, &n);
    return n;
  }
  static const char* const names[] = {"OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MV2_COMM_WORLD_SIZE", nullptr};
  return std::max(1, env_int(names, 1));
}

}  // namespace moe

#if defined(__SANITIZE_ADDRESS__)
// LeakSanitizer asks this at exit (sanitizer builds, docs/reliability.md): leak checking is off in a
// process that initialised MPI. Open MPI keeps MPI_Init's allocations until exit, made from
// components it has dlclose'd by then, so a suppression file cannot name them.
extern "C" int __lsan_is_turned_off() {
  int init = 0;
  MPI_Initialized(&init);
  return init ? 1 : 0;
}
#endif
