#include "comm/comm_util.h"

#include <cmath>
#include <cstdlib>
#include <sstream>

namespace moe::comm {

namespace {

double parse_timeout_env() {
  const char* env = std::getenv("MOE_COMM_TIMEOUT_S");
  if (!env || !*env) return 600.0;
  char* end = nullptr;
  double v = std::strtod(env, &end);
  MOE_CHECK(end && *end == '\0' && std::isfinite(v) && v > 0, "MOE_COMM_TIMEOUT_S: expected a positive number ",
            "of seconds (e.g. 600 or 2.5), got '", env, "'");
  return v;
}

std::string trailing_str(const Tensor& t) {
  Shape s(t.shape().begin() + 1, t.shape().end());
  std::string out = "(*";
  for (int64_t d : s) out += ", " + std::to_string(d);
  return out + ")";
}

std::string rows_str(const std::vector<int64_t>& rows) {
  std::ostringstream os;
  os << "[";
  for (size_t i = 0; i < rows.size(); ++i) os << (i ? ", " : "") << rows[i];
  os << "]";
  return os.str();
}

// Both tensors defined, same dtype and device, at least one dim, equal trailing dims.
void check_pair(const Communicator& c, const char* op, const Tensor& in, const Tensor& out) {
  MOE_CHECK(in.defined(), op, " on ", group_desc(c), ": input is undefined");
  MOE_CHECK(out.defined(), op, " on ", group_desc(c), ": output is undefined");
  MOE_CHECK(in.ndim() >= 1 && out.ndim() >= 1, op, " on ", group_desc(c),
            ": tensors move rows along dim 0 and need at least one dim, got input ", in.desc(), " and output ",
            out.desc());
  MOE_CHECK(in.dtype() == out.dtype(), op, " on ", group_desc(c), ": input and output dtypes differ: input ",
            in.desc(), ", output ", out.desc());
  MOE_CHECK(in.device() == out.device(), op, " on ", group_desc(c), ": input and output are on different devices: ",
            "input ", in.desc(), ", output ", out.desc());
  MOE_CHECK(Shape(in.shape().begin() + 1, in.shape().end()) == Shape(out.shape().begin() + 1, out.shape().end()),
            op, " on ", group_desc(c), ": trailing dims differ: input ", in.desc(), " is rows of ", trailing_str(in),
            ", output ", out.desc(), " is rows of ", trailing_str(out));
}

void check_rows(const Communicator& c, const char* op, const char* what, const std::vector<int64_t>& rows) {
  MOE_CHECK(static_cast<int>(rows.size()) == c.size(), op, " on ", group_desc(c), ": ", what, " has ", rows.size(),
            " entries, expected one per rank (", c.size(), ")");
  for (size_t r = 0; r < rows.size(); ++r)
    MOE_CHECK(rows[r] >= 0, op, " on ", group_desc(c), ": ", what, "[", r, "] = ", rows[r], " is negative (", what,
              " = ", rows_str(rows), ")");
}

class SingleCommunicator final : public Communicator {
 public:
  SingleCommunicator(std::string name, int world_rank) : name_(std::move(name)), world_rank_(world_rank) {}
  int rank() const override { return 0; }
  int size() const override { return 1; }
  const std::string& name() const override { return name_; }
  std::string backend_name() const override { return "single"; }
  std::vector<int> world_ranks() const override { return {world_rank_}; }

  void all_reduce(Tensor& t, ReduceOp op) override { check_all_reduce(*this, t, op); }
  void all_gather(const Tensor& in, Tensor& out) override {
    check_all_gather(*this, in, out);
    out.copy_from(in);
  }
  void all_gather_v(const Tensor& in, Tensor& out, const std::vector<int64_t>& rows) override {
    check_all_gather_v(*this, in, out, rows);
    out.copy_from(in);
  }
  void reduce_scatter(const Tensor& in, Tensor& out) override {
    check_reduce_scatter(*this, in, out);
    out.copy_from(in);
  }
  void reduce_scatter_v(const Tensor& in, Tensor& out, const std::vector<int64_t>& rows) override {
    check_reduce_scatter_v(*this, in, out, rows);
    out.copy_from(in);
  }
  void all_to_all_v(const Tensor& in, const std::vector<int64_t>& send_rows, Tensor& out,
                    const std::vector<int64_t>& recv_rows) override {
    check_all_to_all_v(*this, in, send_rows, out, recv_rows);
    out.copy_from(in);
  }
  void broadcast(Tensor& t, int root) override { check_broadcast(*this, t, root); }
  void batch_send_recv(const std::vector<P2POp>& ops) override {
    check_batch_send_recv(*this, ops);
    copy_self_transfers(*this, ops);
  }
  void barrier() override {}
  std::shared_ptr<Communicator> split(int color, int key, const std::string& name) override {
    check_split(*this, color, name);
    return std::make_shared<SingleCommunicator>(name, world_rank_);
  }

 private:
  std::string name_;
  int world_rank_;
};

}  // namespace

double timeout_seconds() {
  static const double v = parse_timeout_env();
  return v;
}

std::string group_desc(const Communicator& c) {
  return "group '" + c.name() + "' (rank " + std::to_string(c.rank()) + " of " + std::to_string(c.size()) + ")";
}

std::shared_ptr<Communicator> make_single_communicator(const std::string& name, int world_rank) {
  return std::make_shared<SingleCommunicator>(name, world_rank);
}

RowInfo row_info(const Tensor& t) {
  RowInfo r;
  r.row_elems = 1;
  for (int64_t i = 1; i < t.ndim(); ++i) r.row_elems *= t.shape()[static_cast<size_t>(i)];
  r.row_bytes = static_cast<size_t>(r.row_elems) * dtype_size(t.dtype());
  return r;
}

void check_all_reduce(const Communicator& c, const Tensor& t, ReduceOp op) {
  MOE_CHECK(t.defined(), "all_reduce on ", group_desc(c), ": tensor is undefined");
  MOE_CHECK(op == ReduceOp::sum || op == ReduceOp::max || op == ReduceOp::min, "all_reduce on ", group_desc(c),
            ": unknown ReduceOp ", static_cast<int>(op));
}

RowInfo check_all_gather(const Communicator& c, const Tensor& in, const Tensor& out) {
  check_pair(c, "all_gather", in, out);
  MOE_CHECK(out.size(0) == c.size() * in.size(0), "all_gather on ", group_desc(c), ": output needs ", c.size(),
            " x ", in.size(0), " = ", c.size() * in.size(0), " rows for input ", in.desc(), ", got ", out.desc());
  return row_info(in);
}

RowInfo check_all_gather_v(const Communicator& c, const Tensor& in, const Tensor& out,
                           const std::vector<int64_t>& rows) {
  check_pair(c, "all_gather_v", in, out);
  check_rows(c, "all_gather_v", "rows", rows);
  int64_t total = 0;
  row_offsets(rows, &total);
  MOE_CHECK(in.size(0) == rows[static_cast<size_t>(c.rank())], "all_gather_v on ", group_desc(c),
            ": input has ", in.size(0), " rows but rows[", c.rank(), "] = ", rows[static_cast<size_t>(c.rank())],
            " (input ", in.desc(), ", rows = ", rows_str(rows), ")");
  MOE_CHECK(out.size(0) == total, "all_gather_v on ", group_desc(c), ": output needs sum(rows) = ", total,
            " rows, got ", out.desc(), " (rows = ", rows_str(rows), ")");
  return row_info(in);
}

RowInfo check_reduce_scatter(const Communicator& c, const Tensor& in, const Tensor& out) {
  check_pair(c, "reduce_scatter", in, out);
  MOE_CHECK(in.size(0) == c.size() * out.size(0), "reduce_scatter on ", group_desc(c), ": input needs ", c.size(),
            " x ", out.size(0), " = ", c.size() * out.size(0), " rows for output ", out.desc(), ", got ", in.desc());
  return row_info(in);
}

RowInfo check_reduce_scatter_v(const Communicator& c, const Tensor& in, const Tensor& out,
                               const std::vector<int64_t>& rows) {
  check_pair(c, "reduce_scatter_v", in, out);
  check_rows(c, "reduce_scatter_v", "rows", rows);
  int64_t total = 0;
  row_offsets(rows, &total);
  MOE_CHECK(in.size(0) == total, "reduce_scatter_v on ", group_desc(c), ": input needs sum(rows) = ", total,
            " rows, got ", in.desc(), " (rows = ", rows_str(rows), ")");
  MOE_CHECK(out.size(0) == rows[static_cast<size_t>(c.rank())], "reduce_scatter_v on ", group_desc(c),
            ": output has ", out.size(0), " rows but rows[", c.rank(), "] = ", rows[static_cast<size_t>(c.rank())],
            " (output ", out.desc(), ", rows = ", rows_str(rows), ")");
  return row_info(in);
}

RowInfo check_all_to_all_v(const Communicator& c, const Tensor& in, const std::vector<int64_t>& send_rows,
                           const Tensor& out, const std::vector<int64_t>& recv_rows) {
  check_pair(c, "all_to_all_v", in, out);
  check_rows(c, "all_to_all_v", "send_rows", send_rows);
  check_rows(c, "all_to_all_v", "recv_rows", recv_rows);
  int64_t send_total = 0, recv_total = 0;
  row_offsets(send_rows, &send_total);
  row_offsets(recv_rows, &recv_total);
  MOE_CHECK(in.size(0) == send_total, "all_to_all_v on ", group_desc(c), ": input needs sum(send_rows) = ",
            send_total, " rows, got ", in.desc(), " (send_rows = ", rows_str(send_rows), ")");
  MOE_CHECK(out.size(0) == recv_total, "all_to_all_v on ", group_desc(c), ": output needs sum(recv_rows) = ",
            recv_total, " rows, got ", out.desc(), " (recv_rows = ", rows_str(recv_rows), ")");
  return row_info(in);
}

void check_broadcast(const Communicator& c, const Tensor& t, int root) {
  MOE_CHECK(t.defined(), "broadcast on ", group_desc(c), ": tensor is undefined");
  MOE_CHECK(root >= 0 && root < c.size(), "broadcast on ", group_desc(c), ": root ", root,
            " is not a rank of the group (expected 0 <= root < ", c.size(), ")");
}

void check_split(const Communicator& c, int color, const std::string& name) {
  MOE_CHECK(color >= 0, "split of ", group_desc(c), " into '", name, "': color must be >= 0, got ", color);
  MOE_CHECK(!name.empty(), "split of ", group_desc(c), ": the new group needs a name");
}

void check_batch_send_recv(const Communicator& c, const std::vector<P2POp>& ops) {
  for (size_t i = 0; i < ops.size(); ++i) {
    const P2POp& op = ops[i];
    const char* kind = op.kind == P2POp::Kind::send ? "send" : "recv";
    MOE_CHECK(op.kind == P2POp::Kind::send || op.kind == P2POp::Kind::recv, "batch_send_recv on ", group_desc(c),
              ": op ", i, " has an unknown kind ", static_cast<int>(op.kind));
    MOE_CHECK(op.tensor.defined(), "batch_send_recv on ", group_desc(c), ": op ", i, " (", kind,
              ") has an undefined tensor");
    MOE_CHECK(op.peer >= 0 && op.peer < c.size(), "batch_send_recv on ", group_desc(c), ": op ", i, " (", kind,
              ") names peer ", op.peer, ", which is not a rank of the group (expected 0 <= peer < ", c.size(), ")");
    if (op.kind != P2POp::Kind::recv) continue;
    for (size_t j = 0; j < ops.size(); ++j)
      MOE_CHECK(j == i || !overlaps(op.tensor, ops[j].tensor), "batch_send_recv on ", group_desc(c), ": the receive ",
                "buffer of op ", i, " ", op.tensor.desc(), " overlaps the tensor of op ", j, " ", ops[j].tensor.desc());
  }
}

void copy_self_transfers(const Communicator& c, const std::vector<P2POp>& ops) {
  std::vector<const P2POp*> sends, recvs;
  for (const P2POp& op : ops) {
    if (op.peer != c.rank()) continue;
    (op.kind == P2POp::Kind::send ? sends : recvs).push_back(&op);
  }
  MOE_CHECK(recvs.size() <= sends.size(), "batch_send_recv on ", group_desc(c), ": ", recvs.size(),
            " receive(s) from this rank itself but only ", sends.size(), " send(s) to it in the batch");
  for (size_t k = 0; k < recvs.size(); ++k) {
    const Tensor& src = sends[k]->tensor;
    Tensor dst = recvs[k]->tensor;
    MOE_CHECK(src.dtype() == dst.dtype() && src.shape() == dst.shape(), "batch_send_recv on ", group_desc(c),
              ": send ", k, " to this rank itself is ", src.desc(), " but the matching receive expects ", dst.desc());
    if (dst.nbytes() > 0) dst.copy_from(src);
  }
}

std::vector<int64_t> row_offsets(const std::vector<int64_t>& rows, int64_t* total) {
  std::vector<int64_t> off(rows.size());
  int64_t acc = 0;
  for (size_t i = 0; i < rows.size(); ++i) {
    off[i] = acc;
    acc += rows[i];
  }
  if (total) *total = acc;
  return off;
}

bool overlaps(const Tensor& a, const Tensor& b) {
  if (!a.defined() || !b.defined() || a.nbytes() == 0 || b.nbytes() == 0) return false;
  auto pa = reinterpret_cast<uintptr_t>(a.data()), pb = reinterpret_cast<uintptr_t>(b.data());
  return pa < pb + b.nbytes() && pb < pa + a.nbytes();
}

}  // namespace moe::comm

namespace moe {

void Communicator::batch_send_recv(const std::vector<P2POp>&) {
  MOE_THROW(ErrorCode::not_supported, "batch_send_recv on ", comm::group_desc(*this), ": the '", backend_name(),
            "' communicator has no point-to-point transfers");
}

}  // namespace moe

namespace moe::comm {

[[noreturn]] void throw_timeout(const Communicator& c, const char* op, const char* phase, double seconds,
                                const std::string& detail) {
  std::ostringstream os;
  os << op << " on " << group_desc(c) << " timed out after " << seconds << " s waiting for peers (phase: " << phase
     << "; MOE_COMM_TIMEOUT_S=" << timeout_seconds() << (detail.empty() ? "" : "; ") << detail << ")";
  throw Error(ErrorCode::communication, os.str());
}

}  // namespace moe::comm
