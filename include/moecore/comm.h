// libmoecore — communicators.
// A Communicator is one process group. Collectives move rows of tensors (dim 0) between the ranks
// of the group; every rank calls each collective in the same order. Backends: single-rank, MPI
// (host buffers), NCCL (device buffers on the current stream). Every blocking wait is bounded by
// MOE_COMM_TIMEOUT_S (default 600 s) and fails with an error naming rank, group, op and phase.
#pragma once
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "moecore/tensor.h"

namespace moe {

enum class ReduceOp : uint8_t { sum, max, min };

// One point-to-point transfer of a batch (Communicator::batch_send_recv).
struct P2POp {
  enum class Kind : uint8_t { send, recv };
  Kind kind = Kind::send;
  Tensor tensor;  // send: the bytes to send; recv: where the received bytes go (same shape and dtype as the send)
  int peer = 0;   // rank in this group
};

// Host memory that the ranks of one group on one node map together (Communicator::shared_host):
// one segment per rank, every segment mapped in every rank of the group. Writes become visible to
// the other ranks at the next fence. Used by the all-to-all dispatcher to move token rows with one
// copy instead of a message's two (docs/moe.md).
class SharedHostSegments {
 public:
  virtual ~SharedHostSegments() = default;
  // Collective, with the same `bytes` on every rank: afterwards every segment holds at least `bytes`.
  // Growing maps new, larger segments (tensors over the old ones keep them mapped but no longer
  // shared). Returns false on every rank alike when the memory cannot be had (e.g. /dev/shm is
  // full; a warning says why): the group has no shared segments from then on.
  virtual bool reserve(size_t bytes) = 0;
  virtual size_t bytes() const = 0;
  // Rank r's segment from byte `offset` as a tensor of `shape` and `dtype` on the CPU (no copy).
  virtual Tensor segment(int rank, size_t offset, const Shape& shape, DType dtype) const = 0;
  // Collective: a barrier bounded by MOE_COMM_TIMEOUT_S, after which every rank sees every write
  // made to any segment before any rank entered it.
  virtual void fence() = 0;
};

class Communicator {
 public:
  virtual ~Communicator() = default;
  virtual int rank() const = 0;
  virtual int size() const = 0;
  virtual const std::string& name() const = 0;  // the group's name, e.g. "ep"
  virtual std::string backend_name() const = 0;  // "single", "mpi", "nccl"
  // Global (world) rank of each member, in group-rank order.
  virtual std::vector<int> world_ranks() const = 0;

  // In place over all ranks.
  virtual void all_reduce(Tensor& t, ReduceOp op = ReduceOp::sum) = 0;
  // out (size·R, ...) = concat over ranks of in (R, ...).
  virtual void all_gather(const Tensor& in, Tensor& out) = 0;
  // out (Σ rows, ...) = concat over ranks of in (rows[r], ...); rows has size() entries.
  virtual void all_gather_v(const Tensor& in, Tensor& out, const std::vector<int64_t>& rows) = 0;
  // out (R, ...) = this rank's slice of the sum over ranks of in (size·R, ...).
  virtual void reduce_scatter(const Tensor& in, Tensor& out) = 0;
  // out (rows[rank], ...) = this rank's slice (row offsets by rows) of the sum over ranks of in.
  virtual void reduce_scatter_v(const Tensor& in, Tensor& out, const std::vector<int64_t>& rows) = 0;
  // Sends send_rows[r] consecutive rows of in to rank r; receives recv_rows[r] rows from rank r
  // into out, in rank order.
  virtual void all_to_all_v(const Tensor& in, const std::vector<int64_t>& send_rows, Tensor& out,
                            const std::vector<int64_t>& recv_rows) = 0;
  virtual void broadcast(Tensor& t, int root) = 0;
  // Point-to-point (Megatron's batch_isend_irecv): posts every send and receive of `ops`, then waits
  // for all of them (bounded by MOE_COMM_TIMEOUT_S like the collectives). Only the two ranks of
  // each transfer take part: a send to rank q must meet a receive of the same number of bytes
  // posted by q for this rank. Transfers between two ranks in one direction match in the order
  // they were posted. A rank may send to itself (a copy). Back ends that have no point-to-point
  // (test doubles) throw not_supported.
  virtual void batch_send_recv(const std::vector<P2POp>& ops);
  void send(const Tensor& t, int peer) { batch_send_recv({P2POp{P2POp::Kind::send, t, peer}}); }
  void recv(Tensor& t, int peer) { batch_send_recv({P2POp{P2POp::Kind::recv, t, peer}}); }
  virtual void barrier() = 0;
  // The group's shared host segments (made on the first call, which is collective), or nullptr when
  // its ranks cannot share host memory: a group of one, ranks on more than one node, a back end
  // without it, or MOE_COMM_SHM=0 on any rank. Owned by the communicator.
  virtual SharedHostSegments* shared_host() { return nullptr; }
  // Ranks with equal color form a new group, ordered by key then by rank. Collective.
  virtual std::shared_ptr<Communicator> split(int color, int key, const std::string& name) = 0;
};

// A group of one: every collective is a copy.
std::shared_ptr<Communicator> make_single_communicator(const std::string& name = "single");

// The world group over MPI (MPI is initialised on first use and finalised at exit). Throws
// not_supported when the library was built without MPI.
std::shared_ptr<Communicator> mpi_world();
bool mpi_available();
// World rank/size from MPI when it is initialised or launched under mpirun, else 0/1.
int world_rank();
int world_size();
// Ends the whole job after an error on this rank: MPI_Abort when MPI runs (so peers blocked in a
// collective do not wait for their timeout), else exit. For programs' top-level error handlers.
[[noreturn]] void abort_world(int code);

}  // namespace moe
