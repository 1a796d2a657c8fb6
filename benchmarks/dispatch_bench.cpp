// moe_dispatch_bench — the all-to-all token dispatcher on one machine (MPI over shared memory):
// dispatch + combine time against a raw MPI_Alltoallv moving the same token bytes, and the bytes
// the dispatcher moved against the minimum for its algorithm.
//
//   mpirun -np 2 moe_dispatch_bench --hidden-size 1024 --num-moe-experts 8 --moe-router-topk 2
//          --num-tokens 2048 --iters 20 --warmup 3 [--threads 1]
//
// Every rank holds --num-tokens tokens routed uniformly at random (exactly k distinct experts per
// token, seeded by rank); experts are spread over EP = world size (E / EP each). One step is
// dispatcher.dispatch(x, probs, map) then dispatcher.combine(rows) with the experts left out (the
// rows go straight back). The reference step is MPI_Alltoallv of exactly the token rows the
// dispatcher sends (send counts from the routing), there and back: the dispatcher also moves the
// probs (one f32 per row), exchanges the counts (an all-gather of E int64 per rank), permutes and
// unpermutes locally, which is what the ratio prices. The two alternate step by step, so load from
// other processes hits both alike. Times are the slowest rank's per step, median over --iters
// steps; the ratio is printed both as median(ours) / median(raw) and as the median of the per-step
// ratios (the steadier of the two on a shared machine).
//
// Bytes: the dispatcher's own count of bytes sent to other ranks (tokens and probs, both ways),
// summed over ranks, against the minimum for the per-(token, expert) algorithm (each routed pair
// whose expert lives elsewhere sends its row there and back, and its prob there), and, for scale,
// the bound of an algorithm that sends each token once per destination rank (rows there and back).
//
// Transport: on one node the dispatcher moves rows through the EP group's shared host segments (one
// copy each way; docs/moe.md); MOE_COMM_SHM=0 makes it send messages, as across nodes. The table
// says which ran.
//
// Prints a table and, last, `dispatch_ms=<d> alltoallv_ms=<r> ratio=<d/r> step_ratio=<median of
// per-step ratios> bytes=<b> min_bytes=<m>`. --smoke: a tiny problem, 1 step.
#include <mpi.h>

#include <algorithm>
#include <cstdio>
#include <set>
#include <string>
#include <vector>

#include "bench_common.h"
#include "common/args.h"
#include "common/run_main.h"
#include "moe/dispatcher.h"
#include "moecore/moecore.h"

using namespace moe;

namespace {

double max_over_ranks(double v) {
  double m = v;
  MPI_Allreduce(&v, &m, 1, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);
  return m;
}
int64_t sum_over_ranks(int64_t v) {
  long long in = v, out = 0;
  MPI_Allreduce(&in, &out, 1, MPI_LONG_LONG, MPI_SUM, MPI_COMM_WORLD);
  return out;
}

int run(int argc, char** argv) {
  examples::Args args(argc, argv, {"smoke"});
  const bool smoke = args.get("smoke", "false") == "true";
  MoEConfig cfg = bench::base_config();
  cfg.hidden_size = smoke ? 16 : 1024;
  cfg.moe_ffn_hidden_size = 16;  // the experts do not run here: keep their weights small
  cfg.num_moe_experts = smoke ? 4 : 8;
  cfg.moe_router_topk = 2;
  const int64_t T = args.get_int("num-tokens", smoke ? 32 : 2048);
  const int64_t iters = args.get_int("iters", smoke ? 1 : 20);
  const int64_t warmup = args.get_int("warmup", smoke ? 0 : 3);
  const int64_t threads = args.get_int("threads", 1);
  args.apply_config_flags(cfg);

  std::shared_ptr<Communicator> world = mpi_world();
  const int W = world->size(), rank = world->rank();
  cfg.expert_model_parallel_size = W;
  cfg.moe_token_dispatcher_type = "alltoall";
  validate(cfg);
  MOE_CHECK(cfg.num_moe_experts % W == 0, "moe_dispatch_bench: ", cfg.num_moe_experts,
            " experts do not divide over ", W, " ranks");
  if (threads > 0) set_num_threads(static_cast<int>(threads));
  const int64_t H = cfg.hidden_size, E = cfg.num_moe_experts, k = cfg.moe_router_topk, G = E / W;

  std::shared_ptr<ProcessGroups> groups = ProcessGroups::for_launch(cfg);
  MoELayer layer(cfg, Device::cpu(), groups);
  TokenDispatcher& disp = layer.dispatcher();
  bench::Routing r = bench::random_routing(T, E, k, 100 + static_cast<uint64_t>(rank));
  Tensor x = bench::randn({T, H}, 200 + static_cast<uint64_t>(rank));

  // Rows this rank sends to each rank, and what it receives (for the raw reference).
  std::vector<int> send(W, 0), recv(W, 0), sdispl(W, 0), rdispl(W, 0);
  for (int64_t e = 0; e < E; ++e) send[static_cast<size_t>(e / G)] += static_cast<int>(r.counts[static_cast<size_t>(e)] * H);
  MPI_Alltoall(send.data(), 1, MPI_INT, recv.data(), 1, MPI_INT, MPI_COMM_WORLD);
  for (int j = 1; j < W; ++j) {
    sdispl[j] = sdispl[j - 1] + send[j - 1];
    rdispl[j] = rdispl[j - 1] + recv[j - 1];
  }
  const int n_send = sdispl[W - 1] + send[W - 1], n_recv = rdispl[W - 1] + recv[W - 1];
  std::vector<float> sbuf(static_cast<size_t>(n_send), 1.0f), rbuf(static_cast<size_t>(n_recv), 0.0f);

  std::vector<double> t_disp, t_raw, ratios;
  disp.reset_traffic();
  for (int64_t it = 0; it < warmup + iters; ++it) {
    // The dispatcher: dispatch, then combine the rows unchanged.
    MPI_Barrier(MPI_COMM_WORLD);
    double t0 = bench::now_s();
    DispatchOutput d = disp.dispatch(x, r.probs, r.map);
    Tensor out = disp.combine(d.tokens);
    const double td = max_over_ranks(bench::now_s() - t0);
    // The same token bytes by MPI_Alltoallv, there and back.
    MPI_Barrier(MPI_COMM_WORLD);
    t0 = bench::now_s();
    MPI_Alltoallv(sbuf.data(), send.data(), sdispl.data(), MPI_FLOAT, rbuf.data(), recv.data(), rdispl.data(),
                  MPI_FLOAT, MPI_COMM_WORLD);
    MPI_Alltoallv(rbuf.data(), recv.data(), rdispl.data(), MPI_FLOAT, sbuf.data(), send.data(), sdispl.data(),
                  MPI_FLOAT, MPI_COMM_WORLD);
    const double tr = max_over_ranks(bench::now_s() - t0);
    if (it == warmup - 1) disp.reset_traffic();
    if (it < warmup) continue;
    t_disp.push_back(td);
    t_raw.push_back(tr);
    if (tr > 0) ratios.push_back(td / tr);
  }
  const int64_t steps = iters;
  const int64_t bytes = sum_over_ranks(disp.traffic().bytes_sent) / steps;

  // Minimum for the algorithm: remote (token, expert) pairs × (row there + row back + prob there).
  std::vector<uint8_t> map = r.map.to_vector<uint8_t>();
  int64_t remote_pairs = 0, remote_token_ranks = 0;
  for (int64_t t = 0; t < T; ++t) {
    std::set<int64_t> dest;
    for (int64_t e = 0; e < E; ++e)
      if (map[static_cast<size_t>(t * E + e)] && e / G != rank) {
        ++remote_pairs;
        dest.insert(e / G);
      }
    remote_token_ranks += static_cast<int64_t>(dest.size());
  }
  const int64_t min_bytes = sum_over_ranks(remote_pairs * (2 * H * 4 + 4));
  const int64_t dedup_bytes = sum_over_ranks(remote_token_ranks * 2 * H * 4);

  SharedHostSegments* shm = groups->ep().shared_host();
  const bool shared = shm && shm->bytes() > 0;
  const double md = bench::median(t_disp) * 1e3, mr = bench::median(t_raw) * 1e3;
  const double step_ratio = ratios.empty() ? 0.0 : bench::median(ratios);
  if (rank == 0) {
    std::printf("moe_dispatch_bench  %s; ranks %d; threads %d\n", build_info().c_str(), W, num_threads());
    std::printf("cpu: %s\n", bench::cpu_model_name().c_str());
    std::printf("config: alltoall EP=%d H=%lld E=%lld k=%lld T=%lld per rank, %lld steps\n", W,
                static_cast<long long>(H), static_cast<long long>(E), static_cast<long long>(k),
                static_cast<long long>(T), static_cast<long long>(iters));
    std::printf("transport: %s\n",
                shared ? "shared host segments (one node)" : "messages (MOE_COMM_SHM=0 or no shared segments)");
    std::printf("%-44s %14s\n", "metric", "value");
    std::printf("%-44s %14.3f\n", "dispatch + combine ms (slowest rank, median)", md);
    std::printf("%-44s %14.3f\n", "raw MPI_Alltoallv x2 ms (same token bytes)", mr);
    std::printf("%-44s %14.3f\n", "ratio (dispatcher / raw)", mr > 0 ? md / mr : 0.0);
    std::printf("%-44s %14.3f\n", "median of the per-step ratios", step_ratio);
    std::printf("%-44s %14lld\n", "bytes sent per step (all ranks)", static_cast<long long>(bytes));
    std::printf("%-44s %14lld\n", "minimum for per-pair all-to-all", static_cast<long long>(min_bytes));
    std::printf("%-44s %14.4f\n", "bytes / minimum", min_bytes > 0 ? static_cast<double>(bytes) / min_bytes : 0.0);
    std::printf("%-44s %14lld\n", "bound, one copy per (token, rank)", static_cast<long long>(dedup_bytes));
    std::printf("dispatch_ms=%.4f alltoallv_ms=%.4f ratio=%.4f step_ratio=%.4f bytes=%lld min_bytes=%lld\n", md, mr,
                mr > 0 ? md / mr : 0.0, step_ratio, static_cast<long long>(bytes), static_cast<long long>(min_bytes));
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) { return moe::examples::run_main("moe_dispatch_bench", run, argc, argv); }
