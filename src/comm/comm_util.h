// Internal helpers shared by the communicators (single, MPI, NCCL): argument validation with
// messages that name the op and the group, the MOE_COMM_TIMEOUT_S knob, and timeout errors.
// Every backend validates with these before it communicates, so a bad call fails the same way on
// every backend (and on every rank that makes it) instead of hanging in the collective.
#pragma once
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "moecore/comm.h"
#include "moecore/tensor.h"

namespace moe::comm {

// MOE_COMM_TIMEOUT_S (seconds, fractional allowed, > 0), read once; 600 when unset.
double timeout_seconds();

// "group 'ep' (rank 1 of 4)"
std::string group_desc(const Communicator& c);

// A single-rank communicator that reports `world_rank` as its member (used by ProcessGroups for
// groups of one inside a larger world).
std::shared_ptr<Communicator> make_single_communicator(const std::string& name, int world_rank);

// Row geometry of a tensor moved along dim 0.
struct RowInfo {
  int64_t row_elems = 0;  // elements per row (product of the trailing dims)
  size_t row_bytes = 0;   // row_elems · dtype size
};
RowInfo row_info(const Tensor& t);  // t (R, ...) any dtype

// Each check throws moe::Error(invalid_argument) naming `op`, the group and what was expected vs
// got. They return the row geometry where the op moves rows. Shapes as in moecore/comm.h: rows
// along dim 0, equal trailing dims, one dtype and one device for input and output.
void check_all_reduce(const Communicator& c, const Tensor& t, ReduceOp op);
RowInfo check_all_gather(const Communicator& c, const Tensor& in, const Tensor& out);
RowInfo check_all_gather_v(const Communicator& c, const Tensor& in, const Tensor& out,
                           const std::vector<int64_t>& rows);
RowInfo check_reduce_scatter(const Communicator& c, const Tensor& in, const Tensor& out);
RowInfo check_reduce_scatter_v(const Communicator& c, const Tensor& in, const Tensor& out,
                               const std::vector<int64_t>& rows);
RowInfo check_all_to_all_v(const Communicator& c, const Tensor& in, const std::vector<int64_t>& send_rows,
                           const Tensor& out, const std::vector<int64_t>& recv_rows);
void check_broadcast(const Communicator& c, const Tensor& t, int root);
void check_split(const Communicator& c, int color, const std::string& name);
// Every op's tensor defined and its peer a rank of the group; receives must not overlap any other
// op's tensor.
void check_batch_send_recv(const Communicator& c, const std::vector<P2POp>& ops);
// Sends and receives of a batch to this rank itself, paired in order (the k-th send to self with the
// k-th receive from self): sizes must agree, and every self receive needs its send in the batch
// (it could never complete otherwise). Copies the bytes (host or device alike).
void copy_self_transfers(const Communicator& c, const std::vector<P2POp>& ops);

// Exclusive prefix sum: offsets[r] = Σ_{q<r} rows[q]; returns the total in *total when given.
std::vector<int64_t> row_offsets(const std::vector<int64_t>& rows, int64_t* total = nullptr);

// True when the byte ranges of the two tensors' data overlap (host or device addresses alike).
bool overlaps(const Tensor& a, const Tensor& b);

// Throws moe::Error(communication): "<op> on group 'g' (rank r of n) timed out after <s> s waiting
// for peers (phase: <phase>; MOE_COMM_TIMEOUT_S=<s>[; <detail>])". `detail` says which peers were
// silent where the backend can tell.
[[noreturn]] void throw_timeout(const Communicator& c, const char* op, const char* phase, double seconds,
                                const std::string& detail = "");

}  // namespace moe::comm
