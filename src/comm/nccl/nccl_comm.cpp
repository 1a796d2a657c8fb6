// The NCCL communicator: device tensors on the backend's current stream. The only communicator
// that includes nccl.h. Built with CUDA + NCCL + MPI.
//
// The communicator is created non-blocking (ncclConfig_t.blocking = 0) so no NCCL call can hang:
// every call that reports ncclInProgress is polled with ncclCommGetAsyncError, and every collective
// is completed by polling an event recorded after it (cudaEventQuery) together with the async error,
// bounded by MOE_COMM_TIMEOUT_S. On a timeout or an error the NCCL communicator is aborted
// (ncclCommAbort) and the group is unusable afterwards.
//
// Variable-size collectives are grouped point-to-point or rooted calls: all_to_all_v = ncclSend /
// ncclRecv per peer, all_gather_v = one ncclBroadcast per rank, reduce_scatter_v = one ncclReduce
// per rank, each inside ncclGroupStart/End; batch_send_recv is its ncclSend / ncclRecv in one group. Data movement uses ncclUint8 with byte counts (size_t,
// so there is no 2^31 limit); reductions use the tensor's dtype (NCCL rounds bf16/f16 at each hop).
#include "comm/nccl/nccl_comm.h"

#include <cuda_runtime.h>
#include <nccl.h>

#include <chrono>
#include <cstring>
#include <thread>

#include "comm/comm_util.h"
#include "moecore/backend.h"
#include "moecore/logging.h"

namespace moe {

namespace {

ncclDataType_t nccl_type(DType dt) {
  switch (dt) {
    case DType::f32: return ncclFloat32;
    case DType::f64: return ncclFloat64;
    case DType::bf16: return ncclBfloat16;
    case DType::f16: return ncclFloat16;
    case DType::i32: return ncclInt32;
    case DType::i64: return ncclInt64;
    case DType::u8: return ncclUint8;
  }
  MOE_THROW(ErrorCode::internal, "NCCL: unknown dtype ", static_cast<int>(dt));
}

ncclRedOp_t nccl_op(ReduceOp op) {
  switch (op) {
    case ReduceOp::sum: return ncclSum;
    case ReduceOp::max: return ncclMax;
    case ReduceOp::min: return ncclMin;
  }
  return ncclSum;
}

// Makes `index` the current CUDA device for the scope.
class DeviceGuard {
 public:
  explicit DeviceGuard(int index) {
    if (cudaGetDevice(&prev_) != cudaSuccess) prev_ = -1;
    if (prev_ != index) {
      cudaError_t e = cudaSetDevice(index);
      MOE_CHECK_CODE(e == cudaSuccess, ErrorCode::backend, "NCCL communicator: cudaSetDevice(", index,
                     ") failed: ", cudaGetErrorString(e));
    } else {
      prev_ = -1;  // nothing to restore
    }
  }
  ~DeviceGuard() {
    if (prev_ >= 0) cudaSetDevice(prev_);
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int prev_ = -1;
};

char* bytes_at(const Tensor& t, int64_t rows, size_t row_bytes) {
  return static_cast<char*>(t.data()) + static_cast<size_t>(rows) * row_bytes;
}

class NcclCommunicator final : public Communicator {
 public:
  NcclCommunicator(std::shared_ptr<Communicator> group, Device device)
      : group_(std::move(group)), device_(device), name_(group_->name()) {
    DeviceGuard dg(device_.index);
    const char* kOp = "create";
    // Rank 0 of the group makes the id; the MPI group carries it to the others.
    ncclUniqueId id;
    std::memset(&id, 0, sizeof(id));
    if (group_->rank() == 0) check_nccl_plain(ncclGetUniqueId(&id), kOp, "ncclGetUniqueId");
    Tensor id_bytes = Tensor::empty({static_cast<int64_t>(sizeof(id))}, DType::u8);
    std::memcpy(id_bytes.data(), &id, sizeof(id));
    group_->broadcast(id_bytes, 0);
    std::memcpy(&id, id_bytes.data(), sizeof(id));

    cuda_check(cudaEventCreateWithFlags(&done_, cudaEventDisableTiming), kOp, "cudaEventCreateWithFlags");
    ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
    config.blocking = 0;  // every call returns; we poll (and can abort) instead of hanging
    try {
      call(ncclCommInitRankConfig(&comm_, group_->size(), id, group_->rank(), &config), kOp, "ncclCommInitRankConfig");
      wait_ready(kOp, "init");
    } catch (...) {
      cudaEventDestroy(done_);  // the destructor does not run for a failed constructor
      throw;
    }
  }

  ~NcclCommunicator() override {
    // No throwing here: switch devices by hand and ignore failures.
    int prev = -1;
    if (cudaGetDevice(&prev) != cudaSuccess) prev = -1;
    cudaSetDevice(device_.index);
    if (done_) cudaEventDestroy(done_);
    if (scratch_) cudaFree(scratch_);
    if (comm_) {  // null once aborted
      if (finalize_quietly())
        ncclCommDestroy(comm_);
      else
        ncclCommAbort(comm_);
    }
    if (prev >= 0 && prev != device_.index) cudaSetDevice(prev);
  }

  int rank() const override { return group_->rank(); }
  int size() const override { return group_->size(); }
  const std::string& name() const override { return name_; }
  std::string backend_name() const override { return "nccl"; }
  std::vector<int> world_ranks() const override { return group_->world_ranks(); }

  void all_reduce(Tensor& t, ReduceOp op) override {
    const char* kOp = "all_reduce";
    usable(kOp);
    comm::check_all_reduce(*this, t, op);
    on_device(kOp, t, "tensor");
    if (t.numel() == 0) return;
    DeviceGuard dg(device_.index);
    cudaStream_t s = stream();
    call(ncclAllReduce(t.data(), t.data(), static_cast<size_t>(t.numel()), nccl_type(t.dtype()), nccl_op(op), comm_, s),
         kOp, "ncclAllReduce");
    wait_done(kOp, "reduce", s);
  }

  void all_gather(const Tensor& in, Tensor& out) override {
    const char* kOp = "all_gather";
    usable(kOp);
    comm::check_all_gather(*this, in, out);
    on_device(kOp, in, "input");
    on_device(kOp, out, "output");
    if (out.nbytes() == 0) return;
    DeviceGuard dg(device_.index);
    cudaStream_t s = stream();
    // In place only when the input is exactly this rank's slot; any other overlap goes via a copy.
    Tensor src = in;
    if (comm::overlaps(in, out) && in.data() != bytes_at(out, rank() * in.size(0), comm::row_info(in).row_bytes))
      src = in.clone();
    call(ncclAllGather(src.data(), out.data(), src.nbytes(), ncclUint8, comm_, s), kOp, "ncclAllGather");
    wait_done(kOp, "gather", s);
  }

  void all_gather_v(const Tensor& in, Tensor& out, const std::vector<int64_t>& rows) override {
    const char* kOp = "all_gather_v";
    usable(kOp);
    comm::RowInfo ri = comm::check_all_gather_v(*this, in, out, rows);
    on_device(kOp, in, "input");
    on_device(kOp, out, "output");
    if (out.nbytes() == 0) return;
    DeviceGuard dg(device_.index);
    cudaStream_t s = stream();
    std::vector<int64_t> off = comm::row_offsets(rows);
    Tensor src = in;
    if (comm::overlaps(in, out) && in.data() != bytes_at(out, off[static_cast<size_t>(rank())], ri.row_bytes))
      src = in.clone();
    call(ncclGroupStart(), kOp, "ncclGroupStart");
    for (int r = 0; r < size(); ++r) {
      const auto ur = static_cast<size_t>(r);
      if (rows[ur] == 0) continue;
      const void* send = r == rank() ? src.data() : bytes_at(out, off[ur], ri.row_bytes);  // used on the root only
      call(ncclBroadcast(send, bytes_at(out, off[ur], ri.row_bytes), static_cast<size_t>(rows[ur]) * ri.row_bytes,
                         ncclUint8, r, comm_, s),
           kOp, "ncclBroadcast");
    }
    call(ncclGroupEnd(), kOp, "ncclGroupEnd");
    wait_done(kOp, "gather", s);
  }

  void reduce_scatter(const Tensor& in, Tensor& out) override {
    const char* kOp = "reduce_scatter";
    usable(kOp);
    comm::check_reduce_scatter(*this, in, out);
    on_device(kOp, in, "input");
    on_device(kOp, out, "output");
    if (out.numel() == 0) return;
    DeviceGuard dg(device_.index);
    cudaStream_t s = stream();
    Tensor src = in;
    if (comm::overlaps(in, out) && out.data() != bytes_at(in, rank() * out.size(0), comm::row_info(in).row_bytes))
      src = in.clone();
    call(ncclReduceScatter(src.data(), out.data(), static_cast<size_t>(out.numel()), nccl_type(in.dtype()), ncclSum,
                           comm_, s),
         kOp, "ncclReduceScatter");
    wait_done(kOp, "reduce", s);
  }

  void reduce_scatter_v(const Tensor& in, Tensor& out, const std::vector<int64_t>& rows) override {
    const char* kOp = "reduce_scatter_v";
    usable(kOp);
    comm::RowInfo ri = comm::check_reduce_scatter_v(*this, in, out, rows);
    on_device(kOp, in, "input");
    on_device(kOp, out, "output");
    if (ri.row_elems == 0 || in.numel() == 0) return;
    DeviceGuard dg(device_.index);
    cudaStream_t s = stream();
    std::vector<int64_t> off = comm::row_offsets(rows);
    Tensor src = comm::overlaps(in, out) ? in.clone() : in;
    call(ncclGroupStart(), kOp, "ncclGroupStart");
    for (int r = 0; r < size(); ++r) {
      const auto ur = static_cast<size_t>(r);
      if (rows[ur] == 0) continue;
      void* send = bytes_at(src, off[ur], ri.row_bytes);
      void* recv = r == rank() ? out.data() : send;  // recvbuff is used on the root only
      call(ncclReduce(send, recv, static_cast<size_t>(rows[ur] * ri.row_elems), nccl_type(in.dtype()), ncclSum, r,
                      comm_, s),
           kOp, "ncclReduce");
    }
    call(ncclGroupEnd(), kOp, "ncclGroupEnd");
    wait_done(kOp, "reduce", s);
  }

  void all_to_all_v(const Tensor& in, const std::vector<int64_t>& send_rows, Tensor& out,
                    const std::vector<int64_t>& recv_rows) override {
    const char* kOp = "all_to_all_v";
    usable(kOp);
    comm::RowInfo ri = comm::check_all_to_all_v(*this, in, send_rows, out, recv_rows);
    on_device(kOp, in, "input");
    on_device(kOp, out, "output");
    if (ri.row_bytes == 0) return;
    DeviceGuard dg(device_.index);
    cudaStream_t s = stream();
    std::vector<int64_t> soff = comm::row_offsets(send_rows), roff = comm::row_offsets(recv_rows);
    Tensor src = comm::overlaps(in, out) ? in.clone() : in;
    call(ncclGroupStart(), kOp, "ncclGroupStart");
    for (int q = 0; q < size(); ++q) {
      const auto uq = static_cast<size_t>(q);
      if (send_rows[uq] > 0)
        call(ncclSend(bytes_at(src, soff[uq], ri.row_bytes), static_cast<size_t>(send_rows[uq]) * ri.row_bytes,
                      ncclUint8, q, comm_, s),
             kOp, "ncclSend");
      if (recv_rows[uq] > 0)
        call(ncclRecv(bytes_at(out, roff[uq], ri.row_bytes), static_cast<size_t>(recv_rows[uq]) * ri.row_bytes,
                      ncclUint8, q, comm_, s),
             kOp, "ncclRecv");
    }
    call(ncclGroupEnd(), kOp, "ncclGroupEnd");
    wait_done(kOp, "exchange", s);
  }

  void broadcast(Tensor& t, int root) override {
    const char* kOp = "broadcast";
    usable(kOp);
    comm::check_broadcast(*this, t, root);
    on_device(kOp, t, "tensor");
    if (t.nbytes() == 0) return;
    DeviceGuard dg(device_.index);
    cudaStream_t s = stream();
    call(ncclBroadcast(t.data(), t.data(), t.nbytes(), ncclUint8, root, comm_, s), kOp, "ncclBroadcast");
    wait_done(kOp, "broadcast", s);
  }

  void batch_send_recv(const std::vector<P2POp>& ops) override {
    const char* kOp = "batch_send_recv";
    usable(kOp);
    comm::check_batch_send_recv(*this, ops);
    bool any = false;
    for (const P2POp& op : ops) {
      on_device(kOp, op.tensor, op.kind == P2POp::Kind::send ? "sent tensor" : "received tensor");
      any = any || op.tensor.nbytes() > 0;
    }
    if (!any) return;
    DeviceGuard dg(device_.index);
    cudaStream_t s = stream();
    // One group: NCCL pairs each send with the peer's receive in posting order (a rank may send to
    // itself). Byte counts must agree on both sides (ncclUint8, size_t counts).
    call(ncclGroupStart(), kOp, "ncclGroupStart");
    for (const P2POp& op : ops) {
      if (op.tensor.nbytes() == 0) continue;
      if (op.kind == P2POp::Kind::send)
        call(ncclSend(op.tensor.data(), op.tensor.nbytes(), ncclUint8, op.peer, comm_, s), kOp, "ncclSend");
      else
        call(ncclRecv(op.tensor.data(), op.tensor.nbytes(), ncclUint8, op.peer, comm_, s), kOp, "ncclRecv");
    }
    call(ncclGroupEnd(), kOp, "ncclGroupEnd");
    wait_done(kOp, "send/recv", s);
  }

  void barrier() override {
    const char* kOp = "barrier";
    usable(kOp);
    DeviceGuard dg(device_.index);
    if (!scratch_) cuda_check(cudaMalloc(&scratch_, sizeof(float)), kOp, "cudaMalloc");
    cudaStream_t s = stream();
    call(ncclAllReduce(scratch_, scratch_, 1, ncclFloat32, ncclSum, comm_, s), kOp, "ncclAllReduce");
    wait_done(kOp, "barrier", s);
  }

  std::shared_ptr<Communicator> split(int color, int key, const std::string& name) override {
    usable("split");
    comm::check_split(*this, color, name);
    return make_nccl_communicator(group_->split(color, key, name), device_);
  }

 private:
  cudaStream_t stream() const {
    return static_cast<cudaStream_t>(get_backend(device_).current_stream().native_handle());
  }

  void on_device(const char* op, const Tensor& t, const char* what) const {
    MOE_CHECK(t.device() == device_ && t.memory_kind() == MemoryKind::device, op, " on ", comm::group_desc(*this),
              " (nccl): the ", what, " must be in ", device_.str(), " device memory, got ", t.desc(),
              " (use the MPI communicator for host tensors)");
  }

  void usable(const char* op) const {
    MOE_CHECK_CODE(!broken_, ErrorCode::communication, op, " on ", comm::group_desc(*this),
                   " (nccl): the group is unusable after an earlier failure (", broken_reason_, ")");
  }

  std::string init_hint() const {
    return size() > 1 ? std::string(" (NCCL needs one GPU per rank; on a machine with fewer GPUs than ranks use the "
                                    "MPI communicator, which stages device tensors through pinned host memory)")
                      : std::string();
  }

  // An NCCL result outside a communicator (no abort possible).
  void check_nccl_plain(ncclResult_t r, const char* op, const char* call_name) const {
    MOE_CHECK_CODE(r == ncclSuccess, ErrorCode::communication, op, " on ", comm::group_desc(*this), ": ", call_name,
                   " failed: ", ncclGetErrorString(r));
  }

  void cuda_check(cudaError_t e, const char* op, const char* call_name) const {
    MOE_CHECK_CODE(e == cudaSuccess, ErrorCode::backend, op, " on ", comm::group_desc(*this), " (nccl): ", call_name,
                   " failed: ", cudaGetErrorString(e));
  }

  [[noreturn]] void fail(const char* op, const char* what, ncclResult_t r) {
    std::string last = comm_ ? ncclGetLastError(comm_) : "";
    broken_ = true;
    broken_reason_ = std::string(op) + ": " + what + " failed";
    if (comm_) ncclCommAbort(comm_);
    comm_ = nullptr;
    MOE_THROW(ErrorCode::communication, op, " on ", comm::group_desc(*this), " (nccl): ", what, " failed: ",
              ncclGetErrorString(r), last.empty() ? "" : " (" + last + ")", std::string(op) == "create" ? init_hint() : "");
  }

  [[noreturn]] void timed_out(const char* op, const char* phase) {
    broken_ = true;
    broken_reason_ = std::string(op) + " timed out in phase " + phase;
    if (comm_) ncclCommAbort(comm_);
    comm_ = nullptr;
    log_warn(std::string(op) + " on " + comm::group_desc(*this) + " (nccl) timed out; the communicator was aborted");
    comm::throw_timeout(*this, op, phase, comm::timeout_seconds());
  }

  // Result of an NCCL call on the communicator: in progress → wait until ready; error → abort.
  void call(ncclResult_t r, const char* op, const char* what) {
    if (r == ncclSuccess) return;
    if (r == ncclInProgress) {
      wait_ready(op, what);
      return;
    }
    fail(op, what, r);
  }

  // The GPU makes the progress: yield at first (latency), nap briefly once the wait is long.
  static void backoff(double elapsed) {
    if (elapsed < 0.001)
      std::this_thread::yield();
    else
      std::this_thread::sleep_for(std::chrono::microseconds(20));
  }

  // Polls the communicator's async state until it leaves ncclInProgress.
  void wait_ready(const char* op, const char* phase) {
    const double limit = comm::timeout_seconds();
    const auto t0 = std::chrono::steady_clock::now();
    for (;;) {
      ncclResult_t st = ncclSuccess;
      ncclResult_t r = ncclCommGetAsyncError(comm_, &st);
      if (r != ncclSuccess) fail(op, "ncclCommGetAsyncError", r);
      if (st == ncclSuccess) return;
      if (st != ncclInProgress) fail(op, phase, st);
      double elapsed = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      if (elapsed > limit) timed_out(op, phase);
      backoff(elapsed);
    }
  }

  // Records an event after the enqueued work and polls it (and the async error) until complete.
  void wait_done(const char* op, const char* phase, cudaStream_t s) {
    cuda_check(cudaEventRecord(done_, s), op, "cudaEventRecord");
    const double limit = comm::timeout_seconds();
    const auto t0 = std::chrono::steady_clock::now();
    for (;;) {
      cudaError_t e = cudaEventQuery(done_);
      if (e == cudaSuccess) return;
      if (e != cudaErrorNotReady) cuda_check(e, op, "cudaEventQuery");
      ncclResult_t st = ncclSuccess;
      ncclResult_t r = ncclCommGetAsyncError(comm_, &st);
      if (r != ncclSuccess) fail(op, "ncclCommGetAsyncError", r);
      if (st != ncclSuccess && st != ncclInProgress) fail(op, phase, st);
      double elapsed = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      if (elapsed > limit) timed_out(op, phase);
      backoff(elapsed);
    }
  }

  // Finalizes the communicator without throwing; false when it did not finish in time.
  bool finalize_quietly() {
    ncclResult_t r = ncclCommFinalize(comm_);
    if (r != ncclSuccess && r != ncclInProgress) return false;
    const auto t0 = std::chrono::steady_clock::now();
    for (;;) {
      ncclResult_t st = ncclSuccess;
      if (ncclCommGetAsyncError(comm_, &st) != ncclSuccess) return false;
      if (st == ncclSuccess) return true;
      if (st != ncclInProgress) return false;
      double elapsed = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      if (elapsed > comm::timeout_seconds()) return false;
      backoff(elapsed);
    }
  }

  std::shared_ptr<Communicator> group_;  // the MPI group the communicator was made from
  Device device_;
  std::string name_;
  ncclComm_t comm_ = nullptr;
  cudaEvent_t done_ = nullptr;
  void* scratch_ = nullptr;  // one float for barrier()
  bool broken_ = false;
  std::string broken_reason_;
};

}  // namespace

std::shared_ptr<Communicator> make_nccl_communicator(std::shared_ptr<Communicator> mpi_group, Device device) {
  MOE_CHECK(mpi_group != nullptr, "make_nccl_communicator: the MPI group is null");
  MOE_CHECK(device.type == DeviceType::cuda, "make_nccl_communicator: NCCL needs a CUDA device, got ", device.str());
  MOE_CHECK_CODE(backend_available(DeviceType::cuda), ErrorCode::not_supported,
                 "make_nccl_communicator: no CUDA device is available (", build_info(), ")");
  return std::make_shared<NcclCommunicator>(std::move(mpi_group), device);
}

}  // namespace moe
