// Shared host segments over POSIX shared memory (shm_open + mmap), for the ranks of one group on
// one node (moecore/comm.h, docs/moe.md). Each rank creates its own segment under a unique name,
// the names are all-gathered, every rank maps every segment, and the names are unlinked once all
// have mapped them, so nothing is left in /dev/shm after a normal run (a rank killed in between
// leaves its file; the name says which process made it). Collectives go through the group itself.
#pragma once
#include <memory>

#include "moecore/comm.h"

namespace moe::comm {

// Segments for `group` (which must outlive them; its communicator owns them). Collective only in
// reserve and fence; construction maps nothing.
std::unique_ptr<SharedHostSegments> make_posix_shared_host(Communicator& group);

// MOE_COMM_SHM: "0" turns shared host segments off on this rank (and so for its groups), "1" or
// unset leaves them on. Anything else is refused.
bool shm_enabled_by_env();

}  // namespace moe::comm
