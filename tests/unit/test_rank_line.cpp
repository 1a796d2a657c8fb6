// The trainer's rank-layout print (Megatron's start-up lines) against the layout's groups: the
// issue's example, and every rank of a folded layout re-parsed and compared with RankLayout.
#include <gtest/gtest.h>

#include <sstream>
#include <string>
#include <vector>

#include "moecore/parallel.h"

using namespace moe;

namespace {

TEST(RankLine, TheExampleLine) {
  // W = 4, TP = 2, EP = 4, ETP = 1: DP = 2, EDP = 1.
  ParallelSizes s;
  s.world = 4;
  s.tp = 2;
  s.ep = 4;
  RankLayout l = make_rank_layout(s);
  EXPECT_EQ(format_rank_line(l, 3), "rank 3: tp [2,3] cp [3] dp [1,3] pp [3] ep [0,1,2,3] etp [3] edp [3]");
}

// "name [a,b,c]" fields back into rank lists.
std::vector<std::vector<int>> parse_groups(const std::string& line) {
  std::vector<std::vector<int>> out;
  size_t pos = 0;
  while ((pos = line.find('[', pos)) != std::string::npos) {
    size_t end = line.find(']', pos);
    std::vector<int> g;
    std::stringstream ss(line.substr(pos + 1, end - pos - 1));
    std::string item;
    while (std::getline(ss, item, ',')) g.push_back(std::stoi(item));
    out.push_back(g);
    pos = end;
  }
  return out;
}

TEST(RankLine, EveryRankOfAFoldedLayoutMatchesItsGroups) {
  ParallelSizes s;
  s.world = 16;
  s.tp = 2;
  s.cp = 2;
  s.ep = 4;
  s.etp = 1;
  RankLayout l = make_rank_layout(s);
  const GroupKind kinds[] = {GroupKind::tp, GroupKind::cp, GroupKind::dp, GroupKind::pp,
                             GroupKind::ep, GroupKind::etp, GroupKind::edp};
  for (int r = 0; r < 16; ++r) {
    const std::string line = format_rank_line(l, r);
    ASSERT_EQ(line.rfind("rank " + std::to_string(r) + ": tp [", 0), 0u) << line;
    auto groups = parse_groups(line);
    ASSERT_EQ(groups.size(), 7u) << line;
    for (size_t k = 0; k < 7; ++k) EXPECT_EQ(groups[k], l.group_of(kinds[k], r)) << line;
  }
}

}  // namespace
