// The single-rank communicator (a group of one: every collective is a copy, after the same argument
// checks as the real backends) and, for builds without MPI, the world fallbacks.
#include <cstdlib>

#include "comm/comm_util.h"
#include "moecore/comm.h"

namespace moe {

std::shared_ptr<Communicator> make_single_communicator(const std::string& name) {
  MOE_CHECK(!name.empty(), "make_single_communicator: the group needs a name");
  return comm::make_single_communicator(name, world_rank());
}

#if !MOE_HAVE_MPI
// Without MPI there is one process: rank 0 of a world of 1.
std::shared_ptr<Communicator> mpi_world() {
  MOE_THROW(ErrorCode::not_supported,
            "mpi_world: this build of libmoecore has no MPI communicator (configure with -DMOE_MPI=ON and "
            "install libopenmpi-dev openmpi-bin); use make_single_communicator or ProcessGroups::single()");
}
bool mpi_available() { return false; }
int world_rank() { return 0; }
int world_size() { return 1; }
[[noreturn]] void abort_world(int code) { std::exit(code); }
#endif

}  // namespace moe
