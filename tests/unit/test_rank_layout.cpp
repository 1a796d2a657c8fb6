// Parallel Folding rank layout (docs/parallelism.md): hand-checked tables, Megatron Core's golden layouts
// (re-derived with its older loop-based construction), properties over every factorisation of
// worlds up to 64 against a brute-force grouping by coordinates, and the error cases.
#include <gtest/gtest.h>

#include <algorithm>
#include <map>
#include <numeric>
#include <set>
#include <sstream>

#include "moecore/config.h"
#include "moecore/parallel.h"

using namespace moe;

namespace {

using GK = GroupKind;

// "[0,1][2,3]" → {{0,1},{2,3}}
RankGroups parse(const std::string& s) {
  RankGroups out;
  std::vector<int> cur;
  int num = 0;
  bool in_num = false;
  for (char ch : s) {
    if (ch >= '0' && ch <= '9') {
      num = num * 10 + (ch - '0');
      in_num = true;
      continue;
    }
    if (in_num) cur.push_back(num);
    num = 0;
    in_num = false;
    if (ch == ']') {
      out.push_back(cur);
      cur.clear();
    }
  }
  return out;
}

std::string str(const RankGroups& g) {
  std::ostringstream os;
  for (const auto& grp : g) {
    os << "[";
    for (size_t i = 0; i < grp.size(); ++i) os << (i ? "," : "") << grp[i];
    os << "]";
  }
  return os.str();
}

RankGroups singletons(int w) {
  RankGroups g;
  for (int r = 0; r < w; ++r) g.push_back({r});
  return g;
}

RankGroups one_group(int w) {
  std::vector<int> all(static_cast<size_t>(w));
  std::iota(all.begin(), all.end(), 0);
  return {all};
}

ParallelSizes sz(int64_t world, int64_t tp, int64_t cp, int64_t pp, int64_t ep, int64_t etp,
                 const std::string& order = "tp-cp-ep-dp-pp") {
  ParallelSizes s;
  s.world = world;
  s.tp = tp;
  s.cp = cp;
  s.pp = pp;
  s.ep = ep;
  s.etp = etp;
  s.order = order;
  return s;
}

#define EXPECT_GROUPS(L, kind, text) \
  EXPECT_EQ(str((L).of(kind)), str(parse(text))) << "group kind " << group_kind_name(kind)

std::string error_of(const ParallelSizes& s) {
  try {
    make_rank_layout(s);
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::invalid_argument);
    return e.what();
  }
  return "<no error>";
}

}  // namespace

// ---- the worked example of docs/parallelism.md -----------------------------------------------------------

TEST(RankLayout, DesignWorkedExample) {
  // W=8, TP=2, DP=4; ETP=1, EP=4, EDP=2.
  RankLayout L = make_rank_layout(sz(8, 2, 1, 1, 4, 1));
  EXPECT_EQ(L.dp, 4);
  EXPECT_EQ(L.edp, 2);
  EXPECT_GROUPS(L, GK::tp, "[0,1][2,3][4,5][6,7]");
  EXPECT_GROUPS(L, GK::dp, "[0,2,4,6][1,3,5,7]");
  EXPECT_GROUPS(L, GK::ep, "[0,1,2,3][4,5,6,7]");
  EXPECT_GROUPS(L, GK::edp, "[0,4][1,5][2,6][3,7]");
  EXPECT_EQ(L.of(GK::etp), singletons(8));
  EXPECT_GROUPS(L, GK::etp_ep, "[0,1,2,3][4,5,6,7]");
  EXPECT_EQ(L.of(GK::etp_ep_pp), parse("[0,1,2,3][4,5,6,7]"));
  EXPECT_EQ(L.of(GK::tp_dp), one_group(8));
  EXPECT_EQ(L.of(GK::tp_dp_cp), one_group(8));
  EXPECT_GROUPS(L, GK::dp_cp, "[0,2,4,6][1,3,5,7]");
  EXPECT_GROUPS(L, GK::tp_cp, "[0,1][2,3][4,5][6,7]");
  EXPECT_GROUPS(L, GK::mp, "[0,1][2,3][4,5][6,7]");
  EXPECT_EQ(L.of(GK::cp), singletons(8));
  EXPECT_EQ(L.of(GK::pp), singletons(8));
  // Lookups.
  EXPECT_EQ(L.group_of(GK::ep, 6), (std::vector<int>{4, 5, 6, 7}));
  EXPECT_EQ(L.group_index(GK::edp, 6), 2);
  EXPECT_EQ(L.rank_in_group(GK::edp, 6), 1);
  EXPECT_EQ(L.rank_in_group(GK::dp, 5), 2);
  EXPECT_EQ(L.group_size(GK::tp_dp), 8);
}

// ---- hand-checked layouts -----------------------------------------------------------------------

TEST(RankLayout, PureExpertParallel) {
  RankLayout L = make_rank_layout(sz(8, 1, 1, 1, 8, 1));
  EXPECT_EQ(L.of(GK::dp), one_group(8));
  EXPECT_EQ(L.of(GK::ep), one_group(8));
  EXPECT_EQ(L.of(GK::edp), singletons(8));
  EXPECT_EQ(L.of(GK::tp), singletons(8));
}

TEST(RankLayout, TpPpEpWithEtp) {
  // W=8, TP=2, PP=2 (DP=2); ETP=2, EP=2 (EDP=1).
  RankLayout L = make_rank_layout(sz(8, 2, 1, 2, 2, 2));
  EXPECT_EQ(L.dp, 2);
  EXPECT_EQ(L.edp, 1);
  EXPECT_GROUPS(L, GK::tp, "[0,1][2,3][4,5][6,7]");
  EXPECT_GROUPS(L, GK::dp, "[0,2][1,3][4,6][5,7]");
  EXPECT_GROUPS(L, GK::pp, "[0,4][1,5][2,6][3,7]");
  EXPECT_GROUPS(L, GK::mp, "[0,1,4,5][2,3,6,7]");
  EXPECT_GROUPS(L, GK::ep, "[0,2][1,3][4,6][5,7]");
  EXPECT_GROUPS(L, GK::etp, "[0,1][2,3][4,5][6,7]");
  EXPECT_EQ(L.of(GK::edp), singletons(8));
  EXPECT_GROUPS(L, GK::etp_ep, "[0,1,2,3][4,5,6,7]");
  EXPECT_EQ(L.of(GK::etp_ep_pp), one_group(8));
}

TEST(RankLayout, ContextParallelWithExpertParallel) {
  // W=8, TP=2, CP=2 (DP=2); ETP=1, EP=2 (EDP=4).
  RankLayout L = make_rank_layout(sz(8, 2, 2, 1, 2, 1));
  EXPECT_GROUPS(L, GK::tp, "[0,1][2,3][4,5][6,7]");
  EXPECT_GROUPS(L, GK::cp, "[0,2][1,3][4,6][5,7]");
  EXPECT_GROUPS(L, GK::dp, "[0,4][1,5][2,6][3,7]");
  EXPECT_GROUPS(L, GK::dp_cp, "[0,2,4,6][1,3,5,7]");
  EXPECT_GROUPS(L, GK::tp_cp, "[0,1,2,3][4,5,6,7]");
  EXPECT_GROUPS(L, GK::tp_dp, "[0,1,4,5][2,3,6,7]");
  EXPECT_EQ(L.of(GK::tp_dp_cp), one_group(8));
  EXPECT_GROUPS(L, GK::ep, "[0,1][2,3][4,5][6,7]");
  EXPECT_GROUPS(L, GK::edp, "[0,2,4,6][1,3,5,7]");
  EXPECT_EQ(L.of(GK::etp), singletons(8));
}

TEST(RankLayout, EpFoldsOverTpAndCp) {
  // EP = 8 > DP = 2: the expert group spans TP, CP and DP ranks.
  RankLayout L = make_rank_layout(sz(8, 2, 2, 1, 8, 1));
  EXPECT_EQ(L.dp, 2);
  EXPECT_EQ(L.of(GK::ep), one_group(8));
  EXPECT_EQ(L.of(GK::edp), singletons(8));
  EXPECT_GROUPS(L, GK::cp, "[0,2][1,3][4,6][5,7]");
  EXPECT_GROUPS(L, GK::dp, "[0,4][1,5][2,6][3,7]");
}

TEST(RankLayout, EtpWithEp16) {
  // W=16, TP=2 (DP=8); ETP=2, EP=4 (EDP=2).
  RankLayout L = make_rank_layout(sz(16, 2, 1, 1, 4, 2));
  EXPECT_GROUPS(L, GK::tp, "[0,1][2,3][4,5][6,7][8,9][10,11][12,13][14,15]");
  EXPECT_GROUPS(L, GK::dp, "[0,2,4,6,8,10,12,14][1,3,5,7,9,11,13,15]");
  EXPECT_GROUPS(L, GK::ep, "[0,2,4,6][1,3,5,7][8,10,12,14][9,11,13,15]");
  EXPECT_GROUPS(L, GK::etp, "[0,1][2,3][4,5][6,7][8,9][10,11][12,13][14,15]");
  EXPECT_GROUPS(L, GK::edp, "[0,8][1,9][2,10][3,11][4,12][5,13][6,14][7,15]");
  EXPECT_GROUPS(L, GK::etp_ep, "[0,1,2,3,4,5,6,7][8,9,10,11,12,13,14,15]");
}

TEST(RankLayout, EtpSmallerThanTp) {
  // W=8, TP=4 (DP=2); ETP=1, EP=8.
  RankLayout L = make_rank_layout(sz(8, 4, 1, 1, 8, 1));
  EXPECT_GROUPS(L, GK::tp, "[0,1,2,3][4,5,6,7]");
  EXPECT_GROUPS(L, GK::dp, "[0,4][1,5][2,6][3,7]");
  EXPECT_EQ(L.of(GK::ep), one_group(8));
  EXPECT_EQ(L.of(GK::etp), singletons(8));
}

TEST(RankLayout, EtpLargerThanTp) {
  // W=8, TP=1 (DP=8); ETP=4, EP=2 (EDP=1).
  RankLayout L = make_rank_layout(sz(8, 1, 1, 1, 2, 4));
  EXPECT_EQ(L.of(GK::tp), singletons(8));
  EXPECT_GROUPS(L, GK::etp, "[0,1,2,3][4,5,6,7]");
  EXPECT_GROUPS(L, GK::ep, "[0,4][1,5][2,6][3,7]");
  EXPECT_EQ(L.of(GK::etp_ep), one_group(8));
  EXPECT_EQ(L.of(GK::edp), singletons(8));
}

TEST(RankLayout, PipelineWithExperts16) {
  // W=16, TP=2, PP=2 (DP=4); ETP=1, EP=2 (EDP=4).
  RankLayout L = make_rank_layout(sz(16, 2, 1, 2, 2, 1));
  EXPECT_GROUPS(L, GK::dp, "[0,2,4,6][1,3,5,7][8,10,12,14][9,11,13,15]");
  EXPECT_GROUPS(L, GK::pp, "[0,8][1,9][2,10][3,11][4,12][5,13][6,14][7,15]");
  EXPECT_GROUPS(L, GK::mp, "[0,1,8,9][2,3,10,11][4,5,12,13][6,7,14,15]");
  EXPECT_GROUPS(L, GK::ep, "[0,1][2,3][4,5][6,7][8,9][10,11][12,13][14,15]");
  EXPECT_GROUPS(L, GK::edp, "[0,2,4,6][1,3,5,7][8,10,12,14][9,11,13,15]");
  EXPECT_GROUPS(L, GK::etp_ep_pp, "[0,1,8,9][2,3,10,11][4,5,12,13][6,7,14,15]");
}

TEST(RankLayout, OrderTpPpEpDp) {
  // Megatron's alternative order (cp left out, appended): W=8, TP=2, PP=2 (DP=2); ETP=2, EP=2.
  RankLayout L = make_rank_layout(sz(8, 2, 1, 2, 2, 2, "tp-pp-ep-dp"));
  EXPECT_EQ(L.axes, (std::vector<std::string>{"tp", "pp", "ep", "dp", "cp"}));
  EXPECT_GROUPS(L, GK::tp, "[0,1][2,3][4,5][6,7]");
  EXPECT_GROUPS(L, GK::pp, "[0,2][1,3][4,6][5,7]");
  EXPECT_GROUPS(L, GK::dp, "[0,4][1,5][2,6][3,7]");
  EXPECT_GROUPS(L, GK::mp, "[0,1,2,3][4,5,6,7]");
  EXPECT_GROUPS(L, GK::ep, "[0,4][1,5][2,6][3,7]");
  EXPECT_EQ(L.of(GK::edp), singletons(8));
}

TEST(RankLayout, MegatronDocstring16) {
  // initialize_model_parallel's docstring: 16 GPUs, TP=2, PP=4.
  RankLayout L = make_rank_layout(sz(16, 2, 1, 4, 1, 2));
  EXPECT_GROUPS(L, GK::dp, "[0,2][1,3][4,6][5,7][8,10][9,11][12,14][13,15]");
  EXPECT_GROUPS(L, GK::tp, "[0,1][2,3][4,5][6,7][8,9][10,11][12,13][14,15]");
  EXPECT_GROUPS(L, GK::pp, "[0,4,8,12][1,5,9,13][2,6,10,14][3,7,11,15]");
}

TEST(RankLayout, MegatronOrthogonalDocstring) {
  // generate_masked_orthogonal_rank_groups' docstring: tp-dp-pp sizes 2-3-4, the dp groups.
  RankLayout L = make_rank_layout(sz(24, 2, 1, 4, 1, 2, "tp-dp-pp"));
  EXPECT_EQ(L.dp, 3);
  EXPECT_GROUPS(L, GK::dp, "[0,2,4][1,3,5][6,8,10][7,9,11][12,14,16][13,15,17][18,20,22][19,21,23]");
  // And its 'tp-pp-dp' 2-2-2 example: dp groups [0,4][1,5][2,6][3,7].
  RankLayout M = make_rank_layout(sz(8, 2, 1, 2, 1, 2, "tp-pp-dp"));
  EXPECT_GROUPS(M, GK::dp, "[0,4][1,5][2,6][3,7]");
  EXPECT_GROUPS(M, GK::pp, "[0,2][1,3][4,6][5,7]");
}

TEST(RankLayout, MegatronContextParallelDocstring) {
  // 8 GPUs, TP=4, CP=2: CP groups [0,4][1,5][2,6][3,7].
  RankLayout L = make_rank_layout(sz(8, 4, 2, 1, 1, 4));
  EXPECT_GROUPS(L, GK::cp, "[0,4][1,5][2,6][3,7]");
  EXPECT_GROUPS(L, GK::tp, "[0,1,2,3][4,5,6,7]");
  EXPECT_EQ(L.of(GK::dp), singletons(8));
}

TEST(RankLayout, OneRank) {
  RankLayout L = make_rank_layout(ParallelSizes{});
  for (GroupKind k : all_group_kinds()) EXPECT_EQ(L.of(k), singletons(1)) << group_kind_name(k);
}

TEST(RankLayout, TwoRanks) {
  RankLayout A = make_rank_layout(sz(2, 2, 1, 1, 1, 2));
  EXPECT_EQ(A.of(GK::tp), one_group(2));
  EXPECT_EQ(A.of(GK::dp), singletons(2));
  EXPECT_EQ(A.of(GK::etp), one_group(2));
  EXPECT_EQ(A.of(GK::edp), singletons(2));
  RankLayout B = make_rank_layout(sz(2, 1, 1, 1, 2, 1));
  EXPECT_EQ(B.of(GK::ep), one_group(2));
  EXPECT_EQ(B.of(GK::dp), one_group(2));
  EXPECT_EQ(B.of(GK::edp), singletons(2));
  EXPECT_EQ(B.of(GK::tp_dp_cp), one_group(2));
}

TEST(RankLayout, EpFoldsOverCpOnly) {
  RankLayout L = make_rank_layout(sz(4, 1, 4, 1, 4, 1));
  EXPECT_EQ(L.of(GK::cp), one_group(4));
  EXPECT_EQ(L.of(GK::dp), singletons(4));
  EXPECT_EQ(L.of(GK::dp_cp), one_group(4));
  EXPECT_EQ(L.of(GK::tp_cp), one_group(4));
  EXPECT_EQ(L.of(GK::ep), one_group(4));
}

TEST(RankLayout, OddSizes) {
  // W=6, TP=3, PP=2 (DP=1).
  RankLayout L = make_rank_layout(sz(6, 3, 1, 2, 1, 3));
  EXPECT_GROUPS(L, GK::tp, "[0,1,2][3,4,5]");
  EXPECT_GROUPS(L, GK::pp, "[0,3][1,4][2,5]");
  EXPECT_EQ(L.of(GK::dp), singletons(6));
  EXPECT_EQ(L.of(GK::mp), one_group(6));
  EXPECT_GROUPS(L, GK::etp, "[0,1,2][3,4,5]");
}

TEST(RankLayout, EpEqualsCpWhenFolded) {
  // W=12, TP=2, CP=3 (DP=2); ETP=2, EP=3 (EDP=2): EP lands exactly on the CP axis.
  RankLayout L = make_rank_layout(sz(12, 2, 3, 1, 3, 2));
  EXPECT_GROUPS(L, GK::cp, "[0,2,4][1,3,5][6,8,10][7,9,11]");
  EXPECT_GROUPS(L, GK::dp, "[0,6][1,7][2,8][3,9][4,10][5,11]");
  EXPECT_GROUPS(L, GK::ep, "[0,2,4][1,3,5][6,8,10][7,9,11]");
  EXPECT_GROUPS(L, GK::edp, "[0,6][1,7][2,8][3,9][4,10][5,11]");
}

TEST(RankLayout, TpCpPpEp32) {
  // W=32, TP=2, CP=2, PP=2 (DP=4); ETP=1, EP=4 (EDP=4).
  RankLayout L = make_rank_layout(sz(32, 2, 2, 2, 4, 1));
  EXPECT_GROUPS(L, GK::cp, "[0,2][1,3][4,6][5,7][8,10][9,11][12,14][13,15][16,18][17,19][20,22][21,23][24,26][25,27]"
                           "[28,30][29,31]");
  EXPECT_GROUPS(L, GK::dp, "[0,4,8,12][1,5,9,13][2,6,10,14][3,7,11,15][16,20,24,28][17,21,25,29][18,22,26,30]"
                           "[19,23,27,31]");
  EXPECT_GROUPS(L, GK::pp, "[0,16][1,17][2,18][3,19][4,20][5,21][6,22][7,23][8,24][9,25][10,26][11,27][12,28]"
                           "[13,29][14,30][15,31]");
  EXPECT_GROUPS(L, GK::ep, "[0,1,2,3][4,5,6,7][8,9,10,11][12,13,14,15][16,17,18,19][20,21,22,23][24,25,26,27]"
                           "[28,29,30,31]");
  EXPECT_GROUPS(L, GK::edp, "[0,4,8,12][1,5,9,13][2,6,10,14][3,7,11,15][16,20,24,28][17,21,25,29][18,22,26,30]"
                            "[19,23,27,31]");
  EXPECT_EQ(L.group_of(GK::dp_cp, 21), (std::vector<int>{17, 19, 21, 23, 25, 27, 29, 31}));
  EXPECT_EQ(L.group_of(GK::tp_cp, 21), (std::vector<int>{20, 21, 22, 23}));
}

TEST(RankLayout, OrderDpBeforeEp) {
  // 'tp-cp-dp-ep-pp': W=8, EP=2 (EDP=4); the expert dp axis is now the faster one.
  RankLayout L = make_rank_layout(sz(8, 1, 1, 1, 2, 1, "tp-cp-dp-ep-pp"));
  EXPECT_EQ(L.of(GK::dp), one_group(8));
  EXPECT_GROUPS(L, GK::ep, "[0,4][1,5][2,6][3,7]");
  EXPECT_GROUPS(L, GK::edp, "[0,1,2,3][4,5,6,7]");
}

TEST(RankLayout, OrderEpFirst) {
  // 'ep-tp-cp-dp-pp': W=8, TP=2 (DP=4); ETP=2, EP=2 (EDP=2).
  RankLayout L = make_rank_layout(sz(8, 2, 1, 1, 2, 2, "ep-tp-cp-dp-pp"));
  EXPECT_GROUPS(L, GK::tp, "[0,1][2,3][4,5][6,7]");
  EXPECT_GROUPS(L, GK::ep, "[0,1][2,3][4,5][6,7]");
  EXPECT_GROUPS(L, GK::etp, "[0,2][1,3][4,6][5,7]");
  EXPECT_GROUPS(L, GK::edp, "[0,4][1,5][2,6][3,7]");
  EXPECT_GROUPS(L, GK::etp_ep, "[0,1,2,3][4,5,6,7]");
}

TEST(RankLayout, OrderPpFirst) {
  // 'pp-tp-cp-ep-dp' with ETP = TP keeps the pipeline groups equal: W=8, PP=2, TP=2 (DP=2); EP=2.
  RankLayout L = make_rank_layout(sz(8, 2, 1, 2, 2, 2, "pp-tp-cp-ep-dp"));
  EXPECT_GROUPS(L, GK::pp, "[0,1][2,3][4,5][6,7]");
  EXPECT_GROUPS(L, GK::tp, "[0,2][1,3][4,6][5,7]");
  EXPECT_GROUPS(L, GK::dp, "[0,4][1,5][2,6][3,7]");
  EXPECT_GROUPS(L, GK::mp, "[0,1,2,3][4,5,6,7]");
  EXPECT_GROUPS(L, GK::ep, "[0,4][1,5][2,6][3,7]");
}

TEST(RankLayout, TpEqualsEp16) {
  // W=16, TP=4 (DP=4); ETP=1, EP=4 (EDP=4): EP lands on the TP ranks, EDP on the DP ranks.
  RankLayout L = make_rank_layout(sz(16, 4, 1, 1, 4, 1));
  EXPECT_GROUPS(L, GK::tp, "[0,1,2,3][4,5,6,7][8,9,10,11][12,13,14,15]");
  EXPECT_EQ(L.of(GK::ep), L.of(GK::tp));
  EXPECT_GROUPS(L, GK::dp, "[0,4,8,12][1,5,9,13][2,6,10,14][3,7,11,15]");
  EXPECT_EQ(L.of(GK::edp), L.of(GK::dp));
}

TEST(RankLayout, Ep8OverTp2) {
  RankLayout L = make_rank_layout(sz(16, 2, 1, 1, 8, 1));
  EXPECT_GROUPS(L, GK::ep, "[0,1,2,3,4,5,6,7][8,9,10,11,12,13,14,15]");
  EXPECT_GROUPS(L, GK::edp, "[0,8][1,9][2,10][3,11][4,12][5,13][6,14][7,15]");
}

TEST(RankLayout, Etp2Ep2W16) {
  RankLayout L = make_rank_layout(sz(16, 2, 1, 1, 2, 2));
  EXPECT_GROUPS(L, GK::ep, "[0,2][1,3][4,6][5,7][8,10][9,11][12,14][13,15]");
  EXPECT_GROUPS(L, GK::edp, "[0,4,8,12][1,5,9,13][2,6,10,14][3,7,11,15]");
  EXPECT_GROUPS(L, GK::etp_ep, "[0,1,2,3][4,5,6,7][8,9,10,11][12,13,14,15]");
}

TEST(RankLayout, PipelineOnly) {
  RankLayout L = make_rank_layout(sz(4, 1, 1, 4, 1, 1));
  EXPECT_EQ(L.of(GK::pp), one_group(4));
  EXPECT_EQ(L.of(GK::mp), one_group(4));
  EXPECT_EQ(L.of(GK::etp_ep_pp), one_group(4));
  EXPECT_EQ(L.of(GK::dp), singletons(4));
  EXPECT_EQ(L.of(GK::tp_dp_cp), singletons(4));
}

TEST(RankLayout, PipelineWithEp4) {
  RankLayout L = make_rank_layout(sz(8, 1, 1, 2, 4, 1));
  EXPECT_GROUPS(L, GK::dp, "[0,1,2,3][4,5,6,7]");
  EXPECT_GROUPS(L, GK::pp, "[0,4][1,5][2,6][3,7]");
  EXPECT_GROUPS(L, GK::ep, "[0,1,2,3][4,5,6,7]");
  EXPECT_EQ(L.of(GK::edp), singletons(8));
  EXPECT_EQ(L.of(GK::etp_ep_pp), one_group(8));
}

TEST(RankLayout, ThreeStagePipeline) {
  // W=12, TP=2, PP=3 (DP=2); ETP=1, EP=2 (EDP=2).
  RankLayout L = make_rank_layout(sz(12, 2, 1, 3, 2, 1));
  EXPECT_GROUPS(L, GK::dp, "[0,2][1,3][4,6][5,7][8,10][9,11]");
  EXPECT_GROUPS(L, GK::pp, "[0,4,8][1,5,9][2,6,10][3,7,11]");
  EXPECT_GROUPS(L, GK::ep, "[0,1][2,3][4,5][6,7][8,9][10,11]");
  EXPECT_GROUPS(L, GK::edp, "[0,2][1,3][4,6][5,7][8,10][9,11]");
}

TEST(RankLayout, TpCpEp3W24) {
  // W=24, TP=2, CP=2 (DP=6); ETP=2, EP=3 (EDP=4).
  RankLayout L = make_rank_layout(sz(24, 2, 2, 1, 3, 2));
  EXPECT_GROUPS(L, GK::dp, "[0,4,8,12,16,20][1,5,9,13,17,21][2,6,10,14,18,22][3,7,11,15,19,23]");
  EXPECT_GROUPS(L, GK::ep, "[0,2,4][1,3,5][6,8,10][7,9,11][12,14,16][13,15,17][18,20,22][19,21,23]");
  EXPECT_GROUPS(L, GK::edp, "[0,6,12,18][1,7,13,19][2,8,14,20][3,9,15,21][4,10,16,22][5,11,17,23]");
}

TEST(RankLayout, LargeWorldSpotChecks1024) {
  // W=1024, TP=8, PP=4 (DP=32); ETP=1, EP=64 (EDP=4). Rank 700 = pp 2, dp 23, tp 4.
  RankLayout L = make_rank_layout(sz(1024, 8, 1, 4, 64, 1));
  EXPECT_EQ(L.dp, 32);
  EXPECT_EQ(L.edp, 4);
  std::vector<int> tp(8), dp(32), ep(64);
  std::iota(tp.begin(), tp.end(), 696);
  for (int d = 0; d < 32; ++d) dp[static_cast<size_t>(d)] = 516 + 8 * d;
  std::iota(ep.begin(), ep.end(), 640);
  EXPECT_EQ(L.group_of(GK::tp, 700), tp);
  EXPECT_EQ(L.group_of(GK::dp, 700), dp);
  EXPECT_EQ(L.rank_in_group(GK::dp, 700), 23);
  EXPECT_EQ(L.group_of(GK::ep, 700), ep);
  EXPECT_EQ(L.group_of(GK::edp, 700), (std::vector<int>{572, 636, 700, 764}));
  EXPECT_EQ(L.group_of(GK::pp, 700), (std::vector<int>{188, 444, 700, 956}));
}

TEST(RankLayout, LargeWorldSpotChecks4096) {
  // W=4096, TP=8, CP=2, PP=8 (DP=32); ETP=4, EP=32 (EDP=4). Rank 3000: pp 5, tp 0, cp 1, dp 27;
  // expert side etp 0, ep 14, edp 3.
  RankLayout L = make_rank_layout(sz(4096, 8, 2, 8, 32, 4));
  EXPECT_EQ(L.edp, 4);
  std::vector<int> tp(8), dp(32), ep(32), pp(8);
  std::iota(tp.begin(), tp.end(), 3000);
  for (int d = 0; d < 32; ++d) dp[static_cast<size_t>(d)] = 2568 + 16 * d;
  for (int e = 0; e < 32; ++e) ep[static_cast<size_t>(e)] = 2944 + 4 * e;
  for (int p = 0; p < 8; ++p) pp[static_cast<size_t>(p)] = 440 + 512 * p;
  EXPECT_EQ(L.group_of(GK::tp, 3000), tp);
  EXPECT_EQ(L.group_of(GK::cp, 3000), (std::vector<int>{2992, 3000}));
  EXPECT_EQ(L.group_of(GK::dp, 3000), dp);
  EXPECT_EQ(L.group_of(GK::ep, 3000), ep);
  EXPECT_EQ(L.group_of(GK::edp, 3000), (std::vector<int>{2616, 2744, 2872, 3000}));
  EXPECT_EQ(L.group_of(GK::etp, 3000), (std::vector<int>{3000, 3001, 3002, 3003}));
  EXPECT_EQ(L.group_of(GK::pp, 3000), pp);
}

TEST(RankLayout, OrthogonalGeneratorDirect) {
  // The generic generator: sizes [2, 3, 4], dp (axis 1) varying.
  EXPECT_EQ(str(orthogonal_rank_groups({2, 3, 4}, {false, true, false})),
            "[0,2,4][1,3,5][6,8,10][7,9,11][12,14,16][13,15,17][18,20,22][19,21,23]");
  EXPECT_EQ(str(orthogonal_rank_groups({2, 3}, {true, true})), "[0,1,2,3,4,5]");
  EXPECT_EQ(str(orthogonal_rank_groups({2, 3}, {false, false})), "[0][1][2][3][4][5]");
  EXPECT_THROW(orthogonal_rank_groups({2, 0}, {true, false}), Error);
  EXPECT_THROW(orthogonal_rank_groups({2}, {true, false}), Error);
}

// ---- Megatron Core's golden layouts ---------------------------------------------------------------
// tests/unit_tests/test_parallel_state.py::test_rank_generator_for_tp_dp_pp checks its RankGenerator
// against the loop-based construction of older Megatron releases for these (nodes, gpus, tp, pp, cp,
// ep). The construction is re-derived here from its description; the expert side uses ETP = TP.

namespace {

struct Golden {
  RankGroups dp, dp_cp, cp, mp, tp, pp, tp_dp, tp_dp_cp, etp_ep, edp;
};

std::vector<int> range(int start, int stop, int step = 1) {
  std::vector<int> v;
  for (int i = start; i < stop; i += step) v.push_back(i);
  return v;
}

Golden golden_from_past_code(int world, int tp, int pp, int cp, int ep) {
  Golden g;
  const int dp = world / (tp * pp * cp);
  const int num_pp_groups = world / pp;
  for (int i = 0; i < pp; ++i) {
    int start = i * num_pp_groups, end = (i + 1) * num_pp_groups;
    for (int j = 0; j < cp * tp; ++j) g.dp.push_back(range(start + j, end, cp * tp));
    for (int j = 0; j < tp; ++j) g.dp_cp.push_back(range(start + j, end, tp));
  }
  for (int i = 0; i < pp; ++i)
    for (int j = 0; j < dp; ++j) {
      int start = i * num_pp_groups + j * tp * cp, end = i * num_pp_groups + (j + 1) * tp * cp;
      for (int k = 0; k < tp; ++k) g.cp.push_back(range(start + k, end, tp));
    }
  // Model-parallel groups: the i-th member of every dp-with-cp group.
  for (int i = 0; i < dp * cp; ++i) {
    std::vector<int> ranks;
    for (const auto& grp : g.dp_cp) ranks.push_back(grp[static_cast<size_t>(i)]);
    g.mp.push_back(ranks);
  }
  for (int i = 0; i < world / tp; ++i) g.tp.push_back(range(i * tp, (i + 1) * tp));
  for (int i = 0; i < num_pp_groups; ++i) g.pp.push_back(range(i, world, num_pp_groups));
  const int tdc = tp * dp * cp;
  for (int i = 0; i < world / tdc; ++i) {
    g.tp_dp_cp.push_back(range(i * tdc, (i + 1) * tdc));
    for (int j = 0; j < cp; ++j) {
      std::vector<int> ranks;
      for (int k = 0; k < dp; ++k) {
        int start = i * tdc + j * tp + k * tp * cp;
        for (int r = start; r < start + tp; ++r) ranks.push_back(r);
      }
      g.tp_dp.push_back(ranks);
    }
  }
  // Expert side: ranks as an array (pp, edp, ep, tp), row-major.
  const int edp = world / (tp * ep * pp);
  auto at = [&](int p, int d, int e, int t) { return ((p * edp + d) * ep + e) * tp + t; };
  for (int p = 0; p < pp; ++p)
    for (int d = 0; d < edp; ++d) {
      std::vector<int> ranks;
      for (int e = 0; e < ep; ++e)
        for (int t = 0; t < tp; ++t) ranks.push_back(at(p, d, e, t));
      g.etp_ep.push_back(ranks);
    }
  for (int p = 0; p < pp; ++p)
    for (int e = 0; e < ep; ++e)
      for (int t = 0; t < tp; ++t) {
        std::vector<int> ranks;
        for (int d = 0; d < edp; ++d) ranks.push_back(at(p, d, e, t));
        g.edp.push_back(ranks);
      }
  return g;
}

}  // namespace

TEST(RankLayout, MegatronGoldenLayouts) {
  struct Case {
    int nodes, gpus, tp, pp, cp, ep;
  };
  const Case cases[] = {
      {1, 1, 1, 1, 1, 1},    {1, 8, 8, 1, 1, 1},    {1, 8, 2, 2, 1, 1},    {1, 8, 2, 4, 1, 1},
      {3, 8, 8, 3, 1, 1},    {4, 8, 2, 4, 1, 1},    {8, 8, 8, 8, 1, 1},    {8, 8, 2, 1, 1, 4},
      {8, 8, 2, 2, 2, 4},    {8, 8, 2, 1, 4, 8},    {8, 8, 2, 2, 2, 8},    {16, 8, 4, 8, 1, 1},
      {16, 8, 4, 8, 1, 4},   {16, 8, 4, 8, 4, 1},   {16, 8, 8, 8, 1, 1},   {32, 8, 4, 8, 1, 1},
      {32, 8, 8, 8, 1, 1},   {32, 8, 4, 8, 1, 4},   {32, 8, 8, 8, 4, 1},   {64, 8, 4, 2, 8, 8},
      {64, 8, 4, 8, 1, 1},   {64, 8, 8, 8, 1, 1},   {96, 8, 4, 8, 1, 1},   {128, 8, 4, 2, 8, 8},
      {128, 8, 4, 8, 1, 1},  {256, 8, 4, 8, 1, 1},  {316, 8, 4, 8, 1, 1},  {384, 8, 4, 8, 1, 1},
      {512, 8, 4, 8, 1, 1},  {768, 8, 4, 8, 1, 1},  {1024, 8, 4, 8, 1, 1}, {1280, 8, 4, 8, 1, 1},
      {1344, 8, 4, 8, 1, 1},
  };
  for (const Case& c : cases) {
    const int w = c.nodes * c.gpus;
    SCOPED_TRACE("world " + std::to_string(w) + " tp " + std::to_string(c.tp) + " pp " + std::to_string(c.pp) +
                 " cp " + std::to_string(c.cp) + " ep " + std::to_string(c.ep));
    Golden g = golden_from_past_code(w, c.tp, c.pp, c.cp, c.ep);
    RankLayout L = make_rank_layout(sz(w, c.tp, c.cp, c.pp, c.ep, c.tp));
    EXPECT_EQ(L.of(GK::dp), g.dp);
    EXPECT_EQ(L.of(GK::dp_cp), g.dp_cp);
    EXPECT_EQ(L.of(GK::cp), g.cp);
    EXPECT_EQ(L.of(GK::mp), g.mp);
    EXPECT_EQ(L.of(GK::tp), g.tp);
    EXPECT_EQ(L.of(GK::pp), g.pp);
    EXPECT_EQ(L.of(GK::tp_dp), g.tp_dp);
    EXPECT_EQ(L.of(GK::tp_dp_cp), g.tp_dp_cp);
    EXPECT_EQ(L.of(GK::etp_ep), g.etp_ep);
    EXPECT_EQ(L.of(GK::edp), g.edp);
  }
}

// ---- properties over every factorisation of W <= 64 -------------------------------------------------

namespace {

struct KindAxes {
  GroupKind kind;
  bool expert;
  std::set<std::string> axes;
};

const std::vector<KindAxes>& kind_axes() {
  static const std::vector<KindAxes> v = {
      {GK::tp, false, {"tp"}},           {GK::cp, false, {"cp"}},
      {GK::dp, false, {"dp"}},           {GK::dp_cp, false, {"dp", "cp"}},
      {GK::pp, false, {"pp"}},           {GK::tp_cp, false, {"tp", "cp"}},
      {GK::tp_dp, false, {"tp", "dp"}},  {GK::tp_dp_cp, false, {"tp", "dp", "cp"}},
      {GK::mp, false, {"tp", "pp"}},     {GK::ep, true, {"ep"}},
      {GK::etp, true, {"tp"}},           {GK::edp, true, {"dp"}},
      {GK::etp_ep, true, {"tp", "ep"}},  {GK::etp_ep_pp, true, {"tp", "ep", "pp"}},
  };
  return v;
}

// Brute force straight from the definition: decode each rank's digits over the axes (first
// fastest) and group the ranks whose other digits agree; group g is the g-th combination of the
// other digits (first fastest).
RankGroups brute_force(const std::vector<std::string>& axes, const std::map<std::string, int64_t>& size,
                       int world, const std::set<std::string>& varying) {
  std::vector<int64_t> sizes;
  std::vector<bool> vary;
  for (const auto& a : axes) {
    sizes.push_back(size.at(a));
    vary.push_back(varying.count(a) > 0);
  }
  RankGroups groups;
  for (int r = 0; r < world; ++r) {
    int64_t rest = r, key = 0, key_stride = 1;
    for (size_t i = 0; i < sizes.size(); ++i) {
      int64_t digit = rest % sizes[i];
      rest /= sizes[i];
      if (!vary[i]) {
        key += digit * key_stride;
        key_stride *= sizes[i];
      }
    }
    if (static_cast<int64_t>(groups.size()) <= key) groups.resize(static_cast<size_t>(key + 1));
    groups[static_cast<size_t>(key)].push_back(r);
  }
  return groups;
}

void check_properties(const ParallelSizes& s) {
  RankLayout L = make_rank_layout(s);
  const int W = static_cast<int>(s.world);
  std::map<std::string, int64_t> dense = {{"tp", s.tp}, {"cp", s.cp}, {"ep", 1}, {"dp", L.dp}, {"pp", s.pp}};
  std::map<std::string, int64_t> expert = {{"tp", s.etp}, {"cp", 1}, {"ep", s.ep}, {"dp", L.edp}, {"pp", s.pp}};
  ASSERT_EQ(L.dp * s.tp * s.cp * s.pp, W);
  ASSERT_EQ(L.edp * s.etp * s.ep * s.pp, W);
  for (const auto& ka : kind_axes()) {
    const auto& sizes = ka.expert ? expert : dense;
    const RankGroups& g = L.of(ka.kind);
    int64_t expected_size = 1;
    for (const auto& a : ka.axes) expected_size *= sizes.at(a);
    ASSERT_EQ(static_cast<int64_t>(g.size()) * expected_size, W) << group_kind_name(ka.kind);
    std::vector<int> seen(static_cast<size_t>(W), 0);
    for (const auto& grp : g) {
      ASSERT_EQ(static_cast<int64_t>(grp.size()), expected_size) << group_kind_name(ka.kind);
      ASSERT_TRUE(std::is_sorted(grp.begin(), grp.end()));
      for (int r : grp) {
        ASSERT_TRUE(r >= 0 && r < W);
        ++seen[static_cast<size_t>(r)];
      }
    }
    for (int r = 0; r < W; ++r) {
      ASSERT_EQ(seen[static_cast<size_t>(r)], 1) << group_kind_name(ka.kind) << " rank " << r;
      const auto& mine = g[static_cast<size_t>(L.group_index(ka.kind, r))];
      ASSERT_TRUE(std::binary_search(mine.begin(), mine.end(), r)) << group_kind_name(ka.kind) << " rank " << r;
      ASSERT_EQ(mine[static_cast<size_t>(L.rank_in_group(ka.kind, r))], r);
    }
    ASSERT_EQ(g, brute_force(L.axes, sizes, W, ka.axes)) << group_kind_name(ka.kind);
  }
  // Dense and expert pipeline groups are the same groups.
  ASSERT_EQ(L.of(GK::pp), brute_force(L.axes, expert, W, {"pp"}));
  // Orthogonality: for every rank, tp ∩ dp_cp = {r}, pp ∩ etp_ep = {r}, and pp ⊆ etp_ep_pp.
  for (int r = 0; r < W; ++r) {
    const auto& a = L.group_of(GK::tp, r);
    const auto& b = L.group_of(GK::dp_cp, r);
    std::vector<int> both;
    std::set_intersection(a.begin(), a.end(), b.begin(), b.end(), std::back_inserter(both));
    ASSERT_EQ(both, std::vector<int>{r});
    const auto& p = L.group_of(GK::pp, r);
    const auto& e = L.group_of(GK::etp_ep, r);
    both.clear();
    std::set_intersection(p.begin(), p.end(), e.begin(), e.end(), std::back_inserter(both));
    ASSERT_EQ(both, std::vector<int>{r});
    const auto& ep_pp = L.group_of(GK::etp_ep_pp, r);
    ASSERT_TRUE(std::includes(ep_pp.begin(), ep_pp.end(), p.begin(), p.end()));
  }
}

std::vector<int64_t> divisors(int64_t n) {
  std::vector<int64_t> d;
  for (int64_t i = 1; i <= n; ++i)
    if (n % i == 0) d.push_back(i);
  return d;
}

}  // namespace

TEST(RankLayout, PropertiesEveryFactorisationUpTo64) {
  int64_t layouts = 0;
  for (int64_t w = 1; w <= 64; ++w)
    for (int64_t pp : divisors(w))
      for (int64_t tp : divisors(w / pp))
        for (int64_t cp : divisors(w / pp / tp))
          for (int64_t etp : divisors(w / pp))
            for (int64_t ep : divisors(w / pp / etp)) {
              ParallelSizes s = sz(w, tp, cp, pp, ep, etp);
              SCOPED_TRACE("W=" + std::to_string(w) + " tp=" + std::to_string(tp) + " cp=" + std::to_string(cp) +
                           " pp=" + std::to_string(pp) + " ep=" + std::to_string(ep) + " etp=" + std::to_string(etp));
              check_properties(s);
              if (::testing::Test::HasFatalFailure()) return;
              ++layouts;
            }
  EXPECT_GT(layouts, 5000);
}

TEST(RankLayout, PropertiesEveryOrderSmallWorlds) {
  // All 120 orders on a few worlds: a layout either satisfies every property or is rejected
  // because the two sides' pipeline groups differ (exactly when the brute force says they do).
  std::vector<std::string> axes = {"cp", "dp", "ep", "pp", "tp"};
  int accepted = 0, rejected = 0;
  do {
    std::string order = axes[0] + "-" + axes[1] + "-" + axes[2] + "-" + axes[3] + "-" + axes[4];
    for (const ParallelSizes& base : {sz(8, 2, 1, 2, 2, 1), sz(16, 2, 2, 2, 4, 1), sz(12, 1, 2, 3, 2, 2),
                                      sz(16, 2, 1, 2, 2, 2)}) {
      ParallelSizes s = base;
      s.order = order;
      SCOPED_TRACE(order + " W=" + std::to_string(s.world));
      const int64_t dp = s.world / (s.tp * s.cp * s.pp), edp = s.world / (s.etp * s.ep * s.pp);
      std::map<std::string, int64_t> dense = {{"tp", s.tp}, {"cp", s.cp}, {"ep", 1}, {"dp", dp}, {"pp", s.pp}};
      std::map<std::string, int64_t> expert = {{"tp", s.etp}, {"cp", 1}, {"ep", s.ep}, {"dp", edp}, {"pp", s.pp}};
      bool same_pp = brute_force(axes, dense, static_cast<int>(s.world), {"pp"}) ==
                     brute_force(axes, expert, static_cast<int>(s.world), {"pp"});
      if (same_pp) {
        check_properties(s);
        ++accepted;
      } else {
        EXPECT_NE(error_of(s).find("different pipeline groups"), std::string::npos) << error_of(s);
        ++rejected;
      }
    }
  } while (std::next_permutation(axes.begin(), axes.end()));
  EXPECT_GT(accepted, 100);
  EXPECT_GT(rejected, 10);
}

// ---- errors ---------------------------------------------------------------------------------------

TEST(RankLayout, RejectsSizesBelowOne) {
  EXPECT_NE(error_of(sz(0, 1, 1, 1, 1, 1)).find("world = 0 (expected >= 1)"), std::string::npos);
  EXPECT_NE(error_of(sz(8, 0, 1, 1, 1, 1)).find("tp = 0"), std::string::npos);
  EXPECT_NE(error_of(sz(8, 1, 1, 1, -2, 1)).find("ep = -2"), std::string::npos);
  EXPECT_NE(error_of(sz(8, 1, 1, 1, 1, 0)).find("etp = 0"), std::string::npos);
}

TEST(RankLayout, RejectsIndivisibleWorlds) {
  std::string m = error_of(sz(8, 3, 1, 1, 1, 1));
  EXPECT_NE(m.find("world size 8 is not divisible by tp x cp x pp = 3 x 1 x 1 = 3"), std::string::npos) << m;
  m = error_of(sz(12, 2, 2, 2, 1, 2));
  EXPECT_NE(m.find("tp x cp x pp = 2 x 2 x 2 = 8"), std::string::npos) << m;
  m = error_of(sz(8, 1, 1, 1, 3, 1));
  EXPECT_NE(m.find("not divisible by etp x ep x pp = 1 x 3 x 1 = 3"), std::string::npos) << m;
  m = error_of(sz(8, 2, 1, 2, 4, 2));
  EXPECT_NE(m.find("etp x ep x pp = 2 x 4 x 2 = 16"), std::string::npos) << m;
}

TEST(RankLayout, RejectsBadOrders) {
  std::string m = error_of(sz(8, 2, 1, 1, 1, 2, "tp-cp-xp-dp-pp"));
  EXPECT_NE(m.find("unknown axis 'xp'"), std::string::npos) << m;
  m = error_of(sz(8, 2, 1, 1, 1, 2, "tp-tp-ep-dp-pp"));
  EXPECT_NE(m.find("axis 'tp' appears twice"), std::string::npos) << m;
  m = error_of(sz(8, 2, 2, 1, 1, 2, "tp-ep-dp-pp"));
  EXPECT_NE(m.find("leaves out axis 'cp'"), std::string::npos) << m;
  m = error_of(sz(8, 1, 1, 1, 2, 1, "tp-cp-dp-pp"));
  EXPECT_NE(m.find("leaves out axis 'ep'"), std::string::npos) << m;
  m = error_of(sz(8, 2, 1, 1, 1, 2, "tp--cp-ep-dp-pp"));
  EXPECT_NE(m.find("unknown axis ''"), std::string::npos) << m;
  // Upper case is accepted (Megatron lower-cases the order).
  EXPECT_EQ(make_rank_layout(sz(8, 2, 1, 1, 4, 1, "TP-CP-EP-DP-PP")).of(GK::ep), parse("[0,1,2,3][4,5,6,7]"));
}

TEST(RankLayout, RejectsDifferentPipelineGroups) {
  // pp before dp with dense dp (4) != expert dp (1): the sides disagree on who shares a pipeline.
  std::string m = error_of(sz(8, 2, 1, 2, 2, 1, "tp-pp-cp-ep-dp"));
  EXPECT_NE(m.find("different pipeline groups"), std::string::npos) << m;
  EXPECT_NE(m.find("dense [0,2][1,3]"), std::string::npos) << m;
}

TEST(RankLayout, LookupErrors) {
  RankLayout L = make_rank_layout(sz(8, 2, 1, 1, 4, 1));
  EXPECT_THROW(L.group_index(GK::tp, 8), Error);
  EXPECT_THROW(L.group_of(GK::ep, -1), Error);
}

TEST(RankLayout, GroupKindNames) {
  std::set<std::string> names;
  for (GroupKind k : all_group_kinds()) names.insert(group_kind_name(k));
  EXPECT_EQ(names.size(), static_cast<size_t>(kNumGroupKinds));
  EXPECT_STREQ(group_kind_name(GK::etp_ep_pp), "etp_ep_pp");
  EXPECT_STREQ(group_kind_name(GK::dp_cp), "dp_cp");
}

TEST(RankLayout, SizesFromConfig) {
  MoEConfig c;
  c.tensor_model_parallel_size = 2;
  c.context_parallel_size = 2;
  c.pipeline_model_parallel_size = 2;
  c.expert_model_parallel_size = 4;
  ParallelSizes s = parallel_sizes_from_config(c, 16);
  EXPECT_EQ(s.world, 16);
  EXPECT_EQ(s.tp, 2);
  EXPECT_EQ(s.cp, 2);
  EXPECT_EQ(s.pp, 2);
  EXPECT_EQ(s.ep, 4);
  EXPECT_EQ(s.etp, 2);  // defaults to tp
  EXPECT_EQ(s.order, "tp-cp-ep-dp-pp");
  c.expert_tensor_parallel_size = 1;
  c.parallel_order = "tp-cp-ep-dp-pp";
  EXPECT_EQ(parallel_sizes_from_config(c, 16).etp, 1);
  RankLayout L = make_rank_layout(parallel_sizes_from_config(c, 16));
  EXPECT_EQ(L.dp, 2);
  EXPECT_EQ(L.edp, 2);
}

// ---- ProcessGroups on one process ------------------------------------------------------------------

TEST(ProcessGroups, SingleProcess) {
  auto pg = ProcessGroups::single();
  EXPECT_EQ(pg->world().size(), 1);
  for (GroupKind k : all_group_kinds()) {
    EXPECT_EQ(pg->group(k).size(), 1);
    EXPECT_EQ(pg->group(k).rank(), 0);
    EXPECT_EQ(pg->group(k).name(), group_kind_name(k));
    EXPECT_EQ(pg->group(k).backend_name(), "single");
  }
  EXPECT_EQ(pg->dp_size(), 1);
  EXPECT_EQ(pg->edp_size(), 1);
  EXPECT_EQ(&pg->ep(), pg->group_ptr(GK::ep).get());
}

TEST(ProcessGroups, BuildOverSingleCommunicator) {
  auto world = make_single_communicator("world");
  auto pg = ProcessGroups::build(world, ParallelSizes{});
  for (GroupKind k : all_group_kinds()) EXPECT_EQ(pg->group(k).world_ranks(), world->world_ranks());
  // Validation happens before any communication.
  ParallelSizes bad;
  bad.world = 2;
  EXPECT_THROW(ProcessGroups::build(world, bad), Error);
  EXPECT_THROW(ProcessGroups::build(nullptr, ParallelSizes{}), Error);
}
