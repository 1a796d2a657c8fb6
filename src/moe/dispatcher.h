// Token dispatchers (docs/moe.md): move routed token rows to the ranks and local experts that own
// them, and bring the expert outputs back. The layer sees only this interface:
//   dispatch:          x (T, H), probs (T, E), map (T, E)  →  rows for the local experts
//   combine:           expert outputs (N, H)               →  (T, H) for this rank's tokens
//   combine_backward:  d out (T, H)                        →  d expert outputs (N, H)
//   dispatch_backward: d rows (N, H), d row probs (N)      →  dx (T, H), dprobs (T, E)
#pragma once
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "moecore/activation_store.h"
#include "moecore/error.h"
#include "moecore/tensor.h"

namespace moe {

struct DispatchOutput {
  Tensor tokens;                          // (N, H) expert-major rows for the local experts
  Tensor probs;                           // (N) prob dtype, travelling with the rows
  std::vector<int64_t> rows_per_expert;   // (G) rows of each local expert
  // The device-count mode (local and allgather dispatchers, use_device_counts): the counts stay on
  // the device and rows_per_expert is empty; tokens and probs then have N_max rows (a bound: tokens
  // · min(routes per token, G)), of which the first row_offsets[G] are the routed rows.
  Tensor row_offsets;  // (G+1) i64 on the device: exclusive prefix sum of rows per local expert, N last
};

// Bytes a dispatcher moved between ranks, for benchmarks.
struct DispatchTraffic {
  int64_t bytes_sent = 0;
  int64_t bytes_received = 0;
  int64_t calls = 0;
};

// Several micro-batches may be dispatched before any of them is combined back (pipeline
// schedules): every call names its micro-batch by `key`, and what a dispatch keeps for the other
// three calls is held per key. dispatch() (re)starts a key; dispatch_backward(), the last call of a
// micro-batch, releases it. Callers with one micro-batch at a time leave key at 0.
class TokenDispatcher {
 public:
  virtual ~TokenDispatcher() = default;
  virtual std::string name() const = 0;
  virtual DispatchOutput dispatch(const Tensor& x, const Tensor& probs, const Tensor& routing_map, int64_t key = 0) = 0;
  virtual Tensor combine(const Tensor& expert_output, int64_t key = 0) = 0;
  virtual Tensor combine_backward(const Tensor& grad_output, int64_t key = 0) = 0;
  virtual void dispatch_backward(const Tensor& grad_rows, const Tensor& grad_row_probs, Tensor& grad_x,
                                 Tensor& grad_probs, int64_t key = 0) = 0;
  // Micro-batches dispatched and not yet released by dispatch_backward; release() drops one
  // without its backward (forward-only runs).
  virtual int64_t pending() const = 0;
  virtual void release(int64_t key) = 0;
  const DispatchTraffic& traffic() const { return traffic_; }
  void reset_traffic() { traffic_ = {}; }
  // The host-sync-free mode (docs/gpu.md; the layer turns it on): the local and allgather
  // dispatchers keep the counts on the device (DispatchOutput::row_offsets) and size their rows by
  // at most `routes_per_token` routed experts per token (the router's top-k; 0: every local expert,
  // as with capacity padding) instead of reading the counts on the host. The all-to-all dispatcher
  // needs its counts on the host and ignores it.
  void use_device_counts(int64_t routes_per_token) {
    device_counts_ = true;
    routes_per_token_ = routes_per_token;
  }

 protected:
  DispatchTraffic traffic_;
  bool device_counts_ = false;
  int64_t routes_per_token_ = 0;
};

// Per-key state of a dispatcher: find() names the dispatcher and key when a call comes without its
// dispatch.
template <class State>
class PendingStates {
 public:
  State& start(int64_t key) { return states_[key] = State{}; }
  State& find(int64_t key, const char* who) {
    auto it = states_.find(key);
    MOE_CHECK(it != states_.end(), who, ": no pending dispatch for micro-batch ", key,
              " (dispatch it first; dispatch_backward releases it)");
    return it->second;
  }
  void release(int64_t key) { states_.erase(key); }
  int64_t size() const { return static_cast<int64_t>(states_.size()); }

 private:
  std::map<int64_t, State> states_;
};

// One process, all experts local: permute / unpermute only.
class LocalDispatcher final : public TokenDispatcher {
 public:
  std::string name() const override { return "local"; }
  DispatchOutput dispatch(const Tensor& x, const Tensor& probs, const Tensor& routing_map, int64_t key = 0) override;
  Tensor combine(const Tensor& expert_output, int64_t key = 0) override;
  Tensor combine_backward(const Tensor& grad_output, int64_t key = 0) override;
  void dispatch_backward(const Tensor& grad_rows, const Tensor& grad_row_probs, Tensor& grad_x, Tensor& grad_probs,
                         int64_t key = 0) override;
  int64_t pending() const override { return states_.size(); }
  void release(int64_t key) override { states_.release(key); }

 private:
  struct State {
    Tensor row_id_map;  // (T, E) i32
    int64_t N = 0;      // rows (N_max in the device-count mode)
    Tensor num_rows;    // (1) i64 on the device: the routed rows N (device-count mode only)
  };
  PendingStates<State> states_;
};

class Communicator;
class SharedHostSegments;

// Allgather dispatcher (Megatron's MoEAllGatherTokenDispatcher), over the ETP×EP group:
//   dispatch: all-gather x, probs, map over ETP×EP → keep the local experts' columns → permute
//   combine:  unpermute → reduce-scatter over ETP×EP (which also sums the ETP partial outputs)
// The backward swaps all-gather and reduce-scatter.
class AllGatherDispatcher final : public TokenDispatcher {
 public:
  // group: ETP×EP; local experts [first_expert, first_expert + num_local_experts).
  AllGatherDispatcher(std::shared_ptr<Communicator> group, int64_t first_expert, int64_t num_local_experts);
  std::string name() const override { return "allgather"; }
  DispatchOutput dispatch(const Tensor& x, const Tensor& probs, const Tensor& routing_map, int64_t key = 0) override;
  Tensor combine(const Tensor& expert_output, int64_t key = 0) override;
  Tensor combine_backward(const Tensor& grad_output, int64_t key = 0) override;
  void dispatch_backward(const Tensor& grad_rows, const Tensor& grad_row_probs, Tensor& grad_x, Tensor& grad_probs,
                         int64_t key = 0) override;
  int64_t pending() const override { return states_.size(); }
  void release(int64_t key) override { states_.release(key); }

 private:
  struct State {
    int64_t E = 0;
    std::vector<int64_t> rank_rows;  // (group size) tokens on each rank
    Tensor row_id_map;               // (T_g, G) i32
    int64_t N = 0;                   // rows (N_max in the device-count mode)
    Tensor num_rows;                 // (1) i64 on the device: the routed rows N (device-count mode only)
  };
  Tensor gather_rows(const State& st, const Tensor& local);   // (T, ...) → (T_g, ...)
  Tensor scatter_rows(const State& st, const Tensor& global);  // (T_g, ...) → (T, ...), summed over the group
  std::shared_ptr<Communicator> group_;
  int64_t first_, G_;
  PendingStates<State> states_;
};

// All-to-all dispatcher (Megatron's MoEAlltoAllTokenDispatcher):
//   dispatch: counts → gathered over ETP×EP (one point-to-point round) → splits; permute (own rows
//             straight into place); exchange over EP straight into [local expert][source] order;
//             all-gather-v over ETP (+ a chunk sort when ETP > 1)
//   combine:  (inverse sort; reduce-scatter-v over ETP); exchange back over EP; unpermute
// The backward is the mirror with the splits swapped.
class AllToAllDispatcher final : public TokenDispatcher {
 public:
  // ep, etp and etp_ep groups of this rank; ep_rank_of / etp_rank_of give, for each member of
  // etp_ep (in its rank order), that member's rank in the EP and ETP groups.
  AllToAllDispatcher(std::shared_ptr<Communicator> ep, std::shared_ptr<Communicator> etp,
                     std::shared_ptr<Communicator> etp_ep, std::vector<int> ep_rank_of, std::vector<int> etp_rank_of,
                     int64_t num_experts);
  std::string name() const override { return "alltoall"; }
  DispatchOutput dispatch(const Tensor& x, const Tensor& probs, const Tensor& routing_map, int64_t key = 0) override;
  Tensor combine(const Tensor& expert_output, int64_t key = 0) override;
  Tensor combine_backward(const Tensor& grad_output, int64_t key = 0) override;
  void dispatch_backward(const Tensor& grad_rows, const Tensor& grad_row_probs, Tensor& grad_x, Tensor& grad_probs,
                         int64_t key = 0) override;
  int64_t pending() const override { return states_.size(); }
  void release(int64_t key) override { states_.release(key); }

 private:
  // Of one pending micro-batch. Local rows are expert-major (N_loc, ·): chunk (j, g) holds the rows
  // for local expert g of EP rank j. On the way out the rows for other EP ranks are permuted into a
  // packed send buffer and this rank's own rows straight into place; after the EP exchange this
  // rank holds (N_recv, ·) in [local expert][EP source] order; with ETP the all-gather adds the
  // ETP sources.
  struct State {
    Tensor row_id_map;                     // (T, E) i32 of the permute and the combine: into [packed rows
                                           // (n_left + n_right); own rows, (N_recv) [local expert][EP source]]
    int64_t N_local = 0, N_recv = 0, N_g = 0;
    int64_t n_left = 0, n_right = 0;       // packed rows for the EP ranks below / above this one
    std::vector<int64_t> local_counts;     // (E) = (EP·G) rows of chunk (j, g), expert-major
    std::vector<int64_t> packed_offsets;   // (E) their first row in the send buffer (other ranks' chunks)
    std::vector<int64_t> recv_counts;      // (EP·G) rows EP rank j sends to my local expert g, at [j·G + g]
    std::vector<int64_t> recv_offsets;     // (EP·G) their first row in [g][j] order
    std::vector<int64_t> etp_rows;         // (ETP) rows each ETP rank holds after the EP exchange
    std::vector<int64_t> etp_chunks;       // (ETP·G) after the ETP all-gather, [ETP rank][local expert]
    std::vector<int64_t> sort_order;       // → [local expert][ETP rank]
    std::vector<int64_t> sorted_chunks;    // chunk sizes in [local expert][ETP rank] order
    std::vector<int64_t> unsort_order;     // back to [ETP rank][local expert]
    // The exchange through shared host segments (ranks on one node, docs/moe.md): each EP rank's
    // packed rows live in its own segment, read there by the experts' ranks on the way out and
    // written there by them on the way back.
    std::vector<int64_t> peer_offsets;     // (EP·G) row in EP rank j's packed rows where its rows for
                                           // my local expert g start, at [j·G + g]
    int64_t max_packed = 0;                // the most packed rows of any EP rank
  };
  // Token rows x (T, ...) → expert-major rows of the local experts (N_g, ...); expert rows → the
  // other EP ranks' rows back, packed (N_loc − own, ...), returned, and this rank's own rows where they
  // are (`own`, (N_recv, ...) [local expert][EP source]), the two inputs of the combine's unpermute.
  // The optional probs ((T, E) → (N_g), and (N_g) → (N_loc − own) + (N_recv)) travel in the same
  // exchanges.
  Tensor forward_path(const State& st, const Tensor& x, const Tensor* probs = nullptr, Tensor* out_probs = nullptr);
  Tensor reverse_path(const State& st, const Tensor& expert_rows, Tensor& own, const Tensor* expert_probs = nullptr,
                      Tensor* out_probs = nullptr, Tensor* own_probs = nullptr);
  // MOE_SANITIZE: rows selected = sent, Σ sent = Σ received over EP, received = handed to the experts.
  void check_conservation(const State& st, const Tensor& routing_map, const DispatchOutput& out);
  // The EP exchange: packed send buffer → (N_recv, ·) [local expert][EP source]; and back into the
  // packed buffer (this rank's own rows are not moved either way).
  void exchange(const State& st, bool to_experts, const Tensor& in, Tensor& out, const Tensor* in_probs,
                Tensor* out_probs);
  // The EP group's shared host segments, reserved for this exchange's rows (row_bytes each) and
  // probs (prob_bytes each) after a fence (every rank done with the previous exchange), or nullptr:
  // the rows move by messages (tensors off the CPU, EP 1, no segments, or a reserve that failed).
  // Collective over EP; every rank gets the same answer.
  SharedHostSegments* shared_segments(const State& st, const Tensor& rows, size_t row_bytes, size_t prob_bytes);
  // Where the probs start in a segment: after the most packed rows of any rank, 64-byte aligned.
  static size_t probs_at(const State& st, size_t row_bytes);
  std::shared_ptr<Communicator> ep_, etp_, etp_ep_;
  std::vector<int> ep_rank_of_, etp_rank_of_;
  int64_t E_, G_;
  PendingStates<State> states_;
};

// The permutation every dispatcher starts from: counts, offsets and the row map of a routing map.
struct LocalPermutation {
  std::vector<int64_t> counts;  // (E) rows per expert
  Tensor row_id_map;            // (T, E) i32
  int64_t num_rows = 0;         // N = Σ counts
};
LocalPermutation make_local_permutation(const Tensor& routing_map);
// The same with the counts left on the device (the host-sync-free path): offsets (E+1) i64 on the
// map's device, rows bounded by T · min(routes_per_token, E) (routes_per_token 0: E).
struct DevicePermutation {
  Tensor row_offsets;    // (E+1) i64: exclusive prefix sum of the counts, N last
  Tensor row_id_map;     // (T, E) i32
  int64_t max_rows = 0;  // N_max
  Tensor num_rows() const { return row_offsets.narrow(row_offsets.numel() - 1, 1); }  // (1) i64 view of N
};
DevicePermutation make_device_permutation(const Tensor& routing_map, int64_t routes_per_token);
// What the local and allgather dispatchers share: the rows of x (T, H) and probs (T, E) for the
// experts of routing_map (T, E), with host counts or (device_counts) device offsets and N_max rows.
// Sets row_id_map (T, E), N (the rows) and num_rows ((1) i64 device view, device counts only).
DispatchOutput permute_for_experts(const Tensor& x, const Tensor& probs, const Tensor& routing_map, bool device_counts,
                                   int64_t routes_per_token, Tensor& row_id_map, int64_t& N, Tensor& num_rows);
// out (N, H) = in (T, H) permuted by row_id_map; rows past num_rows untouched when it is defined.
Tensor permute_rows(const Tensor& row_id_map, const Tensor& in, int64_t N, const Tensor& num_rows);

// Helpers for moving rows: bytes of one row (dim 0) of t, and an empty tensor like t with `rows` rows.
int64_t row_bytes(const Tensor& t);
Tensor rows_like(const Tensor& t, int64_t rows);

}  // namespace moe
