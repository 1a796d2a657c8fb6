// The NCCL communicator's entry point (no NCCL or CUDA types here). Built only with CUDA, NCCL and
// MPI (MOE_HAVE_NCCL).
#pragma once
#include <memory>

#include "moecore/comm.h"

namespace moe {

// A NCCL communicator over the members of `mpi_group` (collective over that group: rank 0 makes an
// ncclUniqueId and broadcasts it with mpi_group->broadcast), for device tensors of `device`
// (a CUDA device) on that backend's current stream. Collectives return once the work is complete on
// the stream; a wait longer than MOE_COMM_TIMEOUT_S aborts the NCCL communicator and throws a
// communication error naming the rank, group, op and phase. split() splits `mpi_group` and builds
// a new NCCL communicator over the part. NCCL needs one GPU per rank.
std::shared_ptr<Communicator> make_nccl_communicator(std::shared_ptr<Communicator> mpi_group, Device device);

}  // namespace moe
