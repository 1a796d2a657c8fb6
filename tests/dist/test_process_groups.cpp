// ProcessGroups::build over the MPI world (np 4 and 8): for several Parallel Folding layouts, every
// group's members and this rank's position in it match the pure layout, and a collective on each
// group reaches exactly its members.
#include <gtest/gtest.h>

#include "dist/dist_util.h"
#include "moecore/parallel.h"

using namespace moe;
using moe::dist::world;

namespace {

ParallelSizes sz(int64_t tp, int64_t cp, int64_t pp, int64_t ep, int64_t etp,
                 const std::string& order = "tp-cp-ep-dp-pp") {
  ParallelSizes s;
  s.world = world().size();
  s.tp = tp;
  s.cp = cp;
  s.pp = pp;
  s.ep = ep;
  s.etp = etp;
  s.order = order;
  return s;
}

std::string desc(const ParallelSizes& s) {
  return "W=" + std::to_string(s.world) + " tp=" + std::to_string(s.tp) + " cp=" + std::to_string(s.cp) +
         " pp=" + std::to_string(s.pp) + " ep=" + std::to_string(s.ep) + " etp=" + std::to_string(s.etp) + " " +
         s.order;
}

void check_groups(const ParallelSizes& s) {
  SCOPED_TRACE(desc(s));
  const int me = world().rank();
  RankLayout L = make_rank_layout(s);
  auto pg = ProcessGroups::build(mpi_world(), s);
  EXPECT_EQ(pg->dp_size(), L.dp);
  EXPECT_EQ(pg->edp_size(), L.edp);
  EXPECT_EQ(pg->rank(), me);
  for (GroupKind kind : all_group_kinds()) {
    Communicator& g = pg->group(kind);
    const std::vector<int>& members = L.group_of(kind, me);
    EXPECT_EQ(g.name(), group_kind_name(kind));
    EXPECT_EQ(g.world_ranks(), members) << group_kind_name(kind);
    EXPECT_EQ(g.size(), static_cast<int>(members.size())) << group_kind_name(kind);
    EXPECT_EQ(g.rank(), L.rank_in_group(kind, me)) << group_kind_name(kind);
    EXPECT_EQ(g.backend_name(), members.size() == 1 ? "single" : "mpi") << group_kind_name(kind);
    // Σ 2^rank over the group's members identifies the member set.
    Tensor t = Tensor::from_vector(std::vector<int64_t>{int64_t(1) << me}, {1});
    g.all_reduce(t);
    int64_t expect = 0;
    for (int r : members) expect |= int64_t(1) << r;
    EXPECT_EQ(t.to_vector<int64_t>()[0], expect) << group_kind_name(kind);
  }
}

}  // namespace

TEST(ProcessGroupsDist, LayoutsMatchThePureFunction) {
  const int W = world().size();
  std::vector<ParallelSizes> layouts = {
      sz(1, 1, 1, 1, 1),          sz(2, 1, 1, 1, 2),  sz(1, 1, 1, W, 1),           sz(2, 1, 1, W / 2, 1),
      sz(2, 1, 1, W, 1),          sz(1, 2, 1, W, 1),  sz(2, 1, 2, 2, 1),           sz(1, 1, 2, 2, 1),
      sz(2, 2, 1, 2, 1),          sz(2, 1, 2, 2, 2),  sz(2, 2, 1, W, 1),           sz(4, 1, 1, 2, 2),
      sz(2, 1, 1, 2, 2, "tp-pp-ep-dp"), sz(1, 1, 1, 2, 1, "tp-cp-dp-ep-pp"), sz(2, 1, 1, 2, 2, "ep-tp-cp-dp-pp"),
      sz(1, 1, 1, 1, W),
  };
  int built = 0;
  for (const ParallelSizes& s : layouts) {
    // Keep the layouts this world supports (every rank decides the same way).
    try {
      make_rank_layout(s);
    } catch (const Error&) {
      continue;
    }
    check_groups(s);
    ++built;
  }
  EXPECT_GE(built, W == 8 ? 14 : 10);
}

TEST(ProcessGroupsDist, DesignWorkedExampleOnEightRanks) {
  if (world().size() != 8) GTEST_SKIP() << "needs 8 ranks";
  auto pg = ProcessGroups::build(mpi_world(), sz(2, 1, 1, 4, 1));
  const int me = world().rank();
  EXPECT_EQ(pg->tp().world_ranks(), (std::vector<int>{me / 2 * 2, me / 2 * 2 + 1}));
  EXPECT_EQ(pg->dp().world_ranks(), (me % 2 ? std::vector<int>{1, 3, 5, 7} : std::vector<int>{0, 2, 4, 6}));
  EXPECT_EQ(pg->ep().world_ranks(), (me < 4 ? std::vector<int>{0, 1, 2, 3} : std::vector<int>{4, 5, 6, 7}));
  EXPECT_EQ(pg->edp().world_ranks(), (std::vector<int>{me % 4, me % 4 + 4}));
  EXPECT_EQ(pg->etp().size(), 1);
}

TEST(ProcessGroupsDist, InvalidSizesFailBeforeCommunicating) {
  ParallelSizes s = sz(3, 1, 1, 1, 1);  // 3 divides neither 4 nor 8
  try {
    ProcessGroups::build(mpi_world(), s);
    ADD_FAILURE() << "no throw";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::invalid_argument);
    EXPECT_NE(std::string(e.what()).find("not divisible by tp x cp x pp"), std::string::npos) << e.what();
  }
  ParallelSizes wrong_world = sz(1, 1, 1, 1, 1);
  wrong_world.world = world().size() * 2;
  EXPECT_THROW(ProcessGroups::build(mpi_world(), wrong_world), Error);
  world().barrier();  // still usable
}
