// libmoecore — Parallel Folding: the rank layout and the process groups (docs/parallelism.md).
//
// Two rank generators share one order string (default "tp-cp-ep-dp-pp", first axis fastest):
//   dense side:  tp=TP,  cp=CP, ep=1,  dp=DP  = W/(TP·CP·PP), pp=PP
//   expert side: tp=ETP, cp=1,  ep=EP, dp=EDP = W/(ETP·EP·PP), pp=PP
// A rank is a mixed-radix number over the axes in order (the stride of an axis is the product of
// the sizes before it). The group for a set of axes is every rank reached by varying those axes
// with the others fixed. Groups are listed the way Megatron Core's RankGenerator lists them: group
// g is the g-th combination of the *other* axes (first fastest), and each group is sorted.
//
// make_rank_layout is a pure function (no communication); ProcessGroups::build turns a layout into
// communicators with nothing but Communicator::split.
#pragma once
#include <array>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "moecore/comm.h"

namespace moe {

struct MoEConfig;

struct ParallelSizes {
  int64_t world = 1;  // W
  int64_t tp = 1;     // tensor parallel (dense side)
  int64_t cp = 1;     // context parallel (dense side)
  int64_t pp = 1;     // pipeline parallel (both sides)
  int64_t ep = 1;     // expert model parallel (expert side)
  int64_t etp = 1;    // expert tensor parallel (expert side)
  // A permutation of tp, cp, ep, dp, pp joined by '-', first axis fastest. As in Megatron, an axis
  // may be left out when its size is 1 on both sides (it is then appended at the end).
  std::string order = "tp-cp-ep-dp-pp";
};

// Every group kind of docs/parallelism.md. Dense-side kinds come from the dense generator, the e* kinds
// from the expert generator (whose tp axis is ETP and dp axis is EDP).
enum class GroupKind : uint8_t {
  tp,         // dense: tp
  cp,         // dense: cp
  dp,         // dense: dp
  dp_cp,      // dense: dp×cp (dense gradient reduction)
  pp,         // both sides (they must agree)
  tp_cp,      // dense: tp×cp (aux / z-loss token counts)
  tp_dp,      // dense: tp×dp
  tp_dp_cp,   // dense: tp×dp×cp (global aux loss, expert-bias counts)
  mp,         // dense: tp×pp (Megatron's model-parallel group)
  ep,         // expert: ep
  etp,        // expert: tp (= ETP)
  edp,        // expert: dp (= EDP; expert gradient reduction)
  etp_ep,     // expert: tp×ep (allgather dispatcher, count exchange)
  etp_ep_pp,  // expert: tp×ep×pp
};
inline constexpr int kNumGroupKinds = 14;

const char* group_kind_name(GroupKind kind);  // "tp", "dp_cp", "etp_ep", ...
const std::array<GroupKind, kNumGroupKinds>& all_group_kinds();

using RankGroups = std::vector<std::vector<int>>;  // groups of world ranks, each sorted ascending

// The generic generator: `axis_sizes` in order (first fastest), `mask[i]` true for the axes that
// vary inside a group. Returns prod(unmasked sizes) groups of prod(masked sizes) ranks each.
RankGroups orthogonal_rank_groups(const std::vector<int64_t>& axis_sizes, const std::vector<bool>& mask);

struct RankLayout {
  ParallelSizes sizes;
  int64_t dp = 1;   // W / (tp·cp·pp)
  int64_t edp = 1;  // W / (etp·ep·pp)
  std::vector<std::string> axes;  // the five axes in order (missing ones appended)
  std::array<RankGroups, kNumGroupKinds> groups;
  // group_of_rank[kind][r]: the index into groups[kind] of the group holding rank r.
  std::array<std::vector<int>, kNumGroupKinds> group_of_rank;

  const RankGroups& of(GroupKind kind) const { return groups[static_cast<size_t>(kind)]; }
  int64_t group_size(GroupKind kind) const;  // ranks per group of this kind
  // The index (into of(kind)) of the group holding `rank`, and the group itself.
  int group_index(GroupKind kind, int rank) const;
  const std::vector<int>& group_of(GroupKind kind, int rank) const;
  // The position of `rank` inside its group (its rank in that communicator).
  int rank_in_group(GroupKind kind, int rank) const;
};

// Validates the sizes (clear errors: sizes < 1, W not divisible by tp·cp·pp or etp·ep·pp, an order
// that is not a permutation of the five axes, dense and expert PP groups that differ) and returns
// every group of every kind.
RankLayout make_rank_layout(const ParallelSizes& sizes);

// Megatron's start-up print of where rank r lives, one line per rank:
//   "rank 3: tp [2,3] cp [3] dp [1,3] pp [3] ep [0,1,2,3] etp [3] edp [3]"
// each group's member ranks comma-separated in ascending order.
std::string format_rank_line(const RankLayout& layout, int rank);

// The sizes a config asks for on `world` ranks (etp defaults to tp).
ParallelSizes parallel_sizes_from_config(const MoEConfig& config, int64_t world);

// One communicator per group kind for this process, plus the world.
class ProcessGroups {
 public:
  // Collective over `world`: computes the layout (ranks are `world`'s ranks 0..W-1) and creates
  // each group with world->split(color = index of the group holding this rank, key = position in
  // it). Groups of size 1 everywhere become single-rank communicators without communication.
  static std::shared_ptr<ProcessGroups> build(std::shared_ptr<Communicator> world, const ParallelSizes& sizes);
  // One process: every group is a single-rank communicator.
  static std::shared_ptr<ProcessGroups> single();
  // What a program launched by mpirun (or alone) runs on: the MPI world split by the config's
  // parallel sizes (validated against the world size first), or single() for one process.
  static std::shared_ptr<ProcessGroups> for_launch(const MoEConfig& config);

  Communicator& world() const { return *world_; }
  std::shared_ptr<Communicator> world_ptr() const { return world_; }
  Communicator& group(GroupKind kind) const { return *groups_[static_cast<size_t>(kind)]; }
  std::shared_ptr<Communicator> group_ptr(GroupKind kind) const { return groups_[static_cast<size_t>(kind)]; }

  Communicator& tp() const { return group(GroupKind::tp); }
  Communicator& cp() const { return group(GroupKind::cp); }
  Communicator& dp() const { return group(GroupKind::dp); }
  Communicator& dp_cp() const { return group(GroupKind::dp_cp); }
  Communicator& pp() const { return group(GroupKind::pp); }
  Communicator& tp_cp() const { return group(GroupKind::tp_cp); }
  Communicator& tp_dp() const { return group(GroupKind::tp_dp); }
  Communicator& tp_dp_cp() const { return group(GroupKind::tp_dp_cp); }
  Communicator& mp() const { return group(GroupKind::mp); }
  Communicator& ep() const { return group(GroupKind::ep); }
  Communicator& etp() const { return group(GroupKind::etp); }
  Communicator& edp() const { return group(GroupKind::edp); }
  Communicator& etp_ep() const { return group(GroupKind::etp_ep); }
  Communicator& etp_ep_pp() const { return group(GroupKind::etp_ep_pp); }

  const RankLayout& layout() const { return layout_; }
  const ParallelSizes& sizes() const { return layout_.sizes; }
  int64_t dp_size() const { return layout_.dp; }
  int64_t edp_size() const { return layout_.edp; }
  int rank() const { return world_->rank(); }  // this process's rank in `world`

 private:
  ProcessGroups() = default;
  std::shared_ptr<Communicator> world_;
  std::array<std::shared_ptr<Communicator>, kNumGroupKinds> groups_;
  RankLayout layout_;
};

}  // namespace moe
