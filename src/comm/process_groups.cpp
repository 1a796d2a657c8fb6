// ProcessGroups: the layout of rank_layout.cpp turned into communicators with Communicator::split.
#include "comm/comm_util.h"
#include "moecore/parallel.h"

#include "moecore/config.h"

namespace moe {

std::shared_ptr<ProcessGroups> ProcessGroups::build(std::shared_ptr<Communicator> world, const ParallelSizes& sizes) {
  MOE_CHECK(world != nullptr, "ProcessGroups::build: world communicator is null");
  MOE_CHECK(sizes.world == world->size(), "ProcessGroups::build: sizes.world = ", sizes.world, " but ",
            comm::group_desc(*world), " has ", world->size(), " ranks");
  // Validated before any communication: every rank throws the same error here.
  RankLayout layout = make_rank_layout(sizes);

  std::shared_ptr<ProcessGroups> pg(new ProcessGroups());
  pg->world_ = world;
  pg->layout_ = std::move(layout);
  const int me = world->rank();
  const std::vector<int> world_ranks = world->world_ranks();
  // Every rank walks the kinds in the same order and makes the same split / no-split decision (the
  // layout is the same everywhere), so the collective splits line up.
  for (GroupKind kind : all_group_kinds()) {
    const char* name = group_kind_name(kind);
    auto& slot = pg->groups_[static_cast<size_t>(kind)];
    if (pg->layout_.group_size(kind) == 1) {
      slot = comm::make_single_communicator(name, world_ranks[static_cast<size_t>(me)]);
      continue;
    }
    int color = pg->layout_.group_index(kind, me);
    int key = pg->layout_.rank_in_group(kind, me);
    slot = world->split(color, key, name);
    MOE_CHECK_CODE(slot && slot->size() == pg->layout_.group_size(kind) && slot->rank() == key, ErrorCode::internal,
                   "ProcessGroups::build: split for group '", name, "' gave ", (slot ? slot->size() : 0),
                   " ranks (rank ", (slot ? slot->rank() : -1), "), expected ", pg->layout_.group_size(kind),
                   " (rank ", key, ")");
  }
  return pg;
}

std::shared_ptr<ProcessGroups> ProcessGroups::single() {
  std::shared_ptr<ProcessGroups> pg(new ProcessGroups());
  pg->world_ = make_single_communicator("world");
  pg->layout_ = make_rank_layout(ParallelSizes{});
  for (GroupKind kind : all_group_kinds())
    pg->groups_[static_cast<size_t>(kind)] = make_single_communicator(group_kind_name(kind));
  return pg;
}

std::shared_ptr<ProcessGroups> ProcessGroups::for_launch(const MoEConfig& config) {
  if (world_size() <= 1) {
    validate_parallel(config, 1);
    return single();
  }
  std::shared_ptr<Communicator> world = mpi_world();
  validate_parallel(config, world->size());
  return build(world, parallel_sizes_from_config(config, world->size()));
}

}  // namespace moe
