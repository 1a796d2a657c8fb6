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

 protected:
  DispatchTraffic traffic_;
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
    int64_t N = 0;
  };
  PendingStates<State> states_;
};

class Communicator;

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
    int64_t N = 0;
  };
  Tensor gather_rows(const State& st, const Tensor& local);   // (T, ...) → (T_g, ...)
  Tensor scatter_rows(const State& st, const Tensor& global);  // (T_g, ...) → (T, ...), summed over the group
  std::shared_ptr<Communicator> group_;
  int64_t first_, G_;
  PendingStates<State> states_;
};

// All-to-all dispatcher (Megatron's MoEAlltoAllTokenDispatcher):
//   dispatch: counts → all-gather over ETP×EP → splits; permute; all-to-all-v over EP;
//             all-gather-v over ETP; sort chunks [source][local expert] → [local expert][source]
//   combine:  inverse sort; reduce-scatter-v over ETP; all-to-all-v back over EP; unpermute
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
  // Of one pending micro-batch:
  struct State {
    Tensor row_id_map;                     // (T, E) i32
    int64_t N_local = 0, N_recv = 0, N_g = 0;
    std::vector<int64_t> input_splits;     // (EP) rows sent to each EP rank
    std::vector<int64_t> output_splits;    // (EP) rows received from each EP rank
    std::vector<int64_t> etp_rows;         // (ETP) rows each ETP rank holds after the all-to-all
    std::vector<int64_t> chunk_sizes;      // (ETP·EP·G) in [source][local expert] order
    std::vector<int64_t> sort_order;       // → [local expert][source]
    std::vector<int64_t> sorted_sizes;     // chunk sizes in [local expert][source] order
    std::vector<int64_t> unsort_order;     // back to [source][local expert]
  };
  // Local permuted rows (N_loc, ...) → expert-major rows of the local experts (N_g, ...), and back.
  Tensor forward_path(const State& st, const Tensor& local_rows);
  Tensor reverse_path(const State& st, const Tensor& expert_rows);
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

// Helpers for moving rows: bytes of one row (dim 0) of t, and an empty tensor like t with `rows` rows.
int64_t row_bytes(const Tensor& t);
Tensor rows_like(const Tensor& t, int64_t rows);

}  // namespace moe
