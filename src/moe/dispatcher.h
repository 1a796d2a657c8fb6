// Token dispatchers (DESIGN.md §7): move routed token rows to the ranks and local experts that own
// them, and bring the expert outputs back. The layer sees only this interface:
//   dispatch:          x (T, H), probs (T, E), map (T, E)  →  rows for the local experts
//   combine:           expert outputs (N, H)               →  (T, H) for this rank's tokens
//   combine_backward:  d out (T, H)                        →  d expert outputs (N, H)
//   dispatch_backward: d rows (N, H), d row probs (N)      →  dx (T, H), dprobs (T, E)
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "moecore/activation_store.h"
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

class TokenDispatcher {
 public:
  virtual ~TokenDispatcher() = default;
  virtual std::string name() const = 0;
  virtual DispatchOutput dispatch(const Tensor& x, const Tensor& probs, const Tensor& routing_map) = 0;
  virtual Tensor combine(const Tensor& expert_output) = 0;
  virtual Tensor combine_backward(const Tensor& grad_output) = 0;
  virtual void dispatch_backward(const Tensor& grad_rows, const Tensor& grad_row_probs, Tensor& grad_x,
                                 Tensor& grad_probs) = 0;
  const DispatchTraffic& traffic() const { return traffic_; }
  void reset_traffic() { traffic_ = {}; }

 protected:
  DispatchTraffic traffic_;
};

// One process, all experts local: permute / unpermute only.
class LocalDispatcher final : public TokenDispatcher {
 public:
  std::string name() const override { return "local"; }
  DispatchOutput dispatch(const Tensor& x, const Tensor& probs, const Tensor& routing_map) override;
  Tensor combine(const Tensor& expert_output) override;
  Tensor combine_backward(const Tensor& grad_output) override;
  void dispatch_backward(const Tensor& grad_rows, const Tensor& grad_row_probs, Tensor& grad_x,
                         Tensor& grad_probs) override;

 private:
  Tensor row_id_map_;  // (T, E) i32 of the pending forward
  int64_t N_ = 0;
};

// The permutation every dispatcher starts from: counts, offsets and the row map of a routing map.
struct LocalPermutation {
  std::vector<int64_t> counts;  // (E) rows per expert
  Tensor row_id_map;            // (T, E) i32
  int64_t num_rows = 0;         // N = Σ counts
};
LocalPermutation make_local_permutation(const Tensor& routing_map);

}  // namespace moe
