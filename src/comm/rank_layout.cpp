// Parallel Folding rank layout (docs/parallelism.md): a pure function from sizes to groups of ranks.
#include <algorithm>
#include <cctype>
#include <climits>
#include <sstream>

#include "moecore/config.h"
#include "moecore/parallel.h"

namespace moe {

namespace {

constexpr std::array<const char*, 5> kAxes = {"tp", "cp", "ep", "dp", "pp"};

struct KindSpec {
  GroupKind kind;
  const char* name;
  bool expert;                     // from the expert generator
  std::vector<const char*> axes;   // the axes that vary inside a group
};

const std::vector<KindSpec>& kind_specs() {
  static const std::vector<KindSpec> specs = {
      {GroupKind::tp, "tp", false, {"tp"}},
      {GroupKind::cp, "cp", false, {"cp"}},
      {GroupKind::dp, "dp", false, {"dp"}},
      {GroupKind::dp_cp, "dp_cp", false, {"dp", "cp"}},
      {GroupKind::pp, "pp", false, {"pp"}},
      {GroupKind::tp_cp, "tp_cp", false, {"tp", "cp"}},
      {GroupKind::tp_dp, "tp_dp", false, {"tp", "dp"}},
      {GroupKind::tp_dp_cp, "tp_dp_cp", false, {"tp", "dp", "cp"}},
      {GroupKind::mp, "mp", false, {"tp", "pp"}},
      {GroupKind::ep, "ep", true, {"ep"}},
      {GroupKind::etp, "etp", true, {"tp"}},
      {GroupKind::edp, "edp", true, {"dp"}},
      {GroupKind::etp_ep, "etp_ep", true, {"tp", "ep"}},
      {GroupKind::etp_ep_pp, "etp_ep_pp", true, {"tp", "ep", "pp"}},
  };
  return specs;
}

// The axes of `order` (lower-cased, split on '-'), validated; axes it leaves out are appended when
// their size is 1 on both sides.
std::vector<std::string> parse_order(const ParallelSizes& s, int64_t dp, int64_t edp) {
  std::string order = s.order;
  std::transform(order.begin(), order.end(), order.begin(), [](unsigned char ch) { return std::tolower(ch); });
  std::vector<std::string> axes;
  std::stringstream ss(order);
  std::string tok;
  while (std::getline(ss, tok, '-')) {
    MOE_CHECK(std::find(kAxes.begin(), kAxes.end(), tok) != kAxes.end(), "parallel order '", s.order,
              "': unknown axis '", tok, "' (expected a permutation of tp, cp, ep, dp, pp joined by '-', e.g. ",
              "'tp-cp-ep-dp-pp')");
    MOE_CHECK(std::find(axes.begin(), axes.end(), tok) == axes.end(), "parallel order '", s.order, "': axis '",
              tok, "' appears twice (expected a permutation of tp, cp, ep, dp, pp)");
    axes.push_back(tok);
  }
  for (const char* a : kAxes) {
    if (std::find(axes.begin(), axes.end(), a) != axes.end()) continue;
    std::string ax = a;
    int64_t dense = ax == "tp" ? s.tp : ax == "cp" ? s.cp : ax == "dp" ? dp : ax == "pp" ? s.pp : 1;
    int64_t expert = ax == "tp" ? s.etp : ax == "ep" ? s.ep : ax == "dp" ? edp : ax == "pp" ? s.pp : 1;
    MOE_CHECK(dense == 1 && expert == 1, "parallel order '", s.order, "' leaves out axis '", ax,
              "' whose size is ", dense, " (dense side) / ", expert,
              " (expert side); an axis may only be left out when its size is 1 on both sides");
    axes.push_back(ax);
  }
  return axes;
}

std::string groups_str(const RankGroups& g, size_t max_groups = 8) {
  std::ostringstream os;
  for (size_t i = 0; i < g.size() && i < max_groups; ++i) {
    os << "[";
    for (size_t j = 0; j < g[i].size(); ++j) os << (j ? "," : "") << g[i][j];
    os << "]";
  }
  if (g.size() > max_groups) os << "... (" << g.size() << " groups)";
  return os.str();
}

}  // namespace

const char* group_kind_name(GroupKind kind) {
  for (const auto& s : kind_specs())
    if (s.kind == kind) return s.name;
  return "?";
}

const std::array<GroupKind, kNumGroupKinds>& all_group_kinds() {
  static const std::array<GroupKind, kNumGroupKinds> kinds = [] {
    std::array<GroupKind, kNumGroupKinds> k{};
    for (size_t i = 0; i < k.size(); ++i) k[i] = static_cast<GroupKind>(i);
    return k;
  }();
  return kinds;
}

RankGroups orthogonal_rank_groups(const std::vector<int64_t>& axis_sizes, const std::vector<bool>& mask) {
  MOE_CHECK(axis_sizes.size() == mask.size(), "orthogonal_rank_groups: ", axis_sizes.size(), " axis sizes but ",
            mask.size(), " mask entries");
  // stride of axis i = product of the sizes before it (first axis fastest).
  std::vector<int64_t> masked_size, masked_stride, other_size, other_stride;
  int64_t stride = 1;
  for (size_t i = 0; i < axis_sizes.size(); ++i) {
    MOE_CHECK(axis_sizes[i] >= 1, "orthogonal_rank_groups: axis ", i, " has size ", axis_sizes[i], " (expected >= 1)");
    (mask[i] ? masked_size : other_size).push_back(axis_sizes[i]);
    (mask[i] ? masked_stride : other_stride).push_back(stride);
    stride *= axis_sizes[i];
    MOE_CHECK(stride <= INT_MAX, "orthogonal_rank_groups: world of more than ", INT_MAX, " ranks");
  }
  int64_t group_size = 1, num_groups = 1;
  for (int64_t s : masked_size) group_size *= s;
  for (int64_t s : other_size) num_groups *= s;

  // The mixed-radix digits of `index` over `sizes` (first fastest), dotted with `strides`.
  auto place = [](int64_t index, const std::vector<int64_t>& sizes, const std::vector<int64_t>& strides) {
    int64_t r = 0;
    for (size_t i = 0; i < sizes.size(); ++i) {
      r += (index % sizes[i]) * strides[i];
      index /= sizes[i];
    }
    return r;
  };
  RankGroups groups(static_cast<size_t>(num_groups));
  for (int64_t g = 0; g < num_groups; ++g) {
    int64_t base = place(g, other_size, other_stride);
    auto& grp = groups[static_cast<size_t>(g)];
    grp.resize(static_cast<size_t>(group_size));
    for (int64_t k = 0; k < group_size; ++k)
      grp[static_cast<size_t>(k)] = static_cast<int>(base + place(k, masked_size, masked_stride));
  }
  return groups;
}

int64_t RankLayout::group_size(GroupKind kind) const {
  const auto& g = of(kind);
  return g.empty() ? 0 : static_cast<int64_t>(g[0].size());
}

int RankLayout::group_index(GroupKind kind, int rank) const {
  MOE_CHECK(rank >= 0 && rank < sizes.world, "RankLayout: rank ", rank, " is outside the world of ", sizes.world);
  const auto& index = group_of_rank[static_cast<size_t>(kind)];
  MOE_CHECK_CODE(static_cast<size_t>(rank) < index.size(), ErrorCode::internal, "RankLayout: no ",
                 group_kind_name(kind), " index for rank ", rank, " (a layout not made by make_rank_layout?)");
  return index[static_cast<size_t>(rank)];
}

const std::vector<int>& RankLayout::group_of(GroupKind kind, int rank) const {
  return of(kind)[static_cast<size_t>(group_index(kind, rank))];
}

int RankLayout::rank_in_group(GroupKind kind, int rank) const {
  const auto& g = group_of(kind, rank);
  return static_cast<int>(std::lower_bound(g.begin(), g.end(), rank) - g.begin());
}

RankLayout make_rank_layout(const ParallelSizes& s) {
  const char* names[] = {"world", "tp", "cp", "pp", "ep", "etp"};
  const int64_t vals[] = {s.world, s.tp, s.cp, s.pp, s.ep, s.etp};
  for (int i = 0; i < 6; ++i)
    MOE_CHECK(vals[i] >= 1, "parallel sizes: ", names[i], " = ", vals[i], " (expected >= 1)");
  MOE_CHECK(s.world <= INT_MAX, "parallel sizes: world = ", s.world, " is more ranks than supported (", INT_MAX, ")");
  const int64_t dense_mp = s.tp * s.cp * s.pp, expert_mp = s.etp * s.ep * s.pp;
  MOE_CHECK(s.world % dense_mp == 0, "parallel sizes: world size ", s.world,
            " is not divisible by tp x cp x pp = ", s.tp, " x ", s.cp, " x ", s.pp, " = ", dense_mp);
  MOE_CHECK(s.world % expert_mp == 0, "parallel sizes: world size ", s.world,
            " is not divisible by etp x ep x pp = ", s.etp, " x ", s.ep, " x ", s.pp, " = ", expert_mp);

  RankLayout L;
  L.sizes = s;
  L.dp = s.world / dense_mp;
  L.edp = s.world / expert_mp;
  L.axes = parse_order(s, L.dp, L.edp);

  std::vector<int64_t> dense_sizes, expert_sizes;
  for (const auto& a : L.axes) {
    dense_sizes.push_back(a == "tp" ? s.tp : a == "cp" ? s.cp : a == "dp" ? L.dp : a == "pp" ? s.pp : 1);
    expert_sizes.push_back(a == "tp" ? s.etp : a == "ep" ? s.ep : a == "dp" ? L.edp : a == "pp" ? s.pp : 1);
  }
  for (const auto& spec : kind_specs()) {
    std::vector<bool> mask(L.axes.size(), false);
    for (const char* ax : spec.axes)
      mask[static_cast<size_t>(std::find(L.axes.begin(), L.axes.end(), ax) - L.axes.begin())] = true;
    auto& groups = L.groups[static_cast<size_t>(spec.kind)];
    groups = orthogonal_rank_groups(spec.expert ? expert_sizes : dense_sizes, mask);
    auto& index = L.group_of_rank[static_cast<size_t>(spec.kind)];
    index.assign(static_cast<size_t>(s.world), -1);
    for (size_t g = 0; g < groups.size(); ++g)
      for (int r : groups[g]) index[static_cast<size_t>(r)] = static_cast<int>(g);
  }
  std::vector<bool> pp_mask(L.axes.size(), false);
  pp_mask[static_cast<size_t>(std::find(L.axes.begin(), L.axes.end(), "pp") - L.axes.begin())] = true;
  RankGroups expert_pp = orthogonal_rank_groups(expert_sizes, pp_mask);
  MOE_CHECK(expert_pp == L.of(GroupKind::pp), "parallel sizes: with order '", s.order,
            "' the dense and expert sides give different pipeline groups (dense dp = ", L.dp, ", expert dp = ", L.edp,
            "): dense ", groups_str(L.of(GroupKind::pp)), " vs expert ", groups_str(expert_pp),
            "; put pp last in the order or choose sizes with equal dense and expert data-parallel sizes");
  return L;
}

ParallelSizes parallel_sizes_from_config(const MoEConfig& config, int64_t world) {
  ParallelSizes s;
  s.world = world;
  s.tp = config.tensor_model_parallel_size;
  s.cp = config.context_parallel_size;
  s.pp = config.pipeline_model_parallel_size;
  s.ep = config.expert_model_parallel_size;
  s.etp = config.etp();
  s.order = config.parallel_order;
  return s;
}

std::string format_rank_line(const RankLayout& layout, int rank) {
  std::string out = "rank " + std::to_string(rank) + ":";
  const std::pair<const char*, GroupKind> kinds[] = {{"tp", GroupKind::tp}, {"cp", GroupKind::cp}, {"dp", GroupKind::dp},
                                                     {"pp", GroupKind::pp}, {"ep", GroupKind::ep}, {"etp", GroupKind::etp},
                                                     {"edp", GroupKind::edp}};
  for (const auto& [name, kind] : kinds) {
    out += std::string(" ") + name + " [";
    const std::vector<int>& g = layout.group_of(kind, rank);
    for (size_t i = 0; i < g.size(); ++i) {
      if (i) out += ',';
      out += std::to_string(g[i]);
    }
    out += "]";
  }
  return out;
}

}  // namespace moe
