// Tensor-level ops: validate shapes, dtypes and devices, then call the tensor's backend kernel.
// Every module (router, experts, layer) computes through these, so the same code runs on any
// backend. Output tensors are allocated by the caller unless the function returns one.
#pragma once
#include <cstdint>
#include <vector>

#include "kernels/ops.h"
#include "moecore/tensor.h"

namespace moe::ops {

ExecCtx exec_ctx(Device device);

// C (M,N) = alpha · op(A) · op(B) + beta · C. All 2-D, one float dtype, one device.
void gemm(const Tensor& A, bool trans_a, const Tensor& B, bool trans_b, Tensor& C, double alpha = 1.0,
          double beta = 0.0);
Tensor matmul(const Tensor& A, bool trans_a, const Tensor& B, bool trans_b);

// See GroupedGemmArgs. rows (G) on the host; rows_device optional.
void grouped_gemm(GroupedGemmMode mode, const Tensor& A, const Tensor& B, Tensor& C,
                  const std::vector<int64_t>& rows, bool accumulate = false,
                  const Tensor* rows_device = nullptr);

struct TopkSpec {
  int64_t k = 1;
  ScoreFunction score = ScoreFunction::softmax;
  bool pre_softmax = false;
  int64_t num_groups = 0, group_topk = 0;
  double scaling_factor = 1.0;
};
void router_topk(const TopkSpec& spec, const Tensor& logits, const Tensor* expert_bias, Tensor& probs,
                 Tensor& routing_map, Tensor& topk_idx);
void router_topk_bwd(const TopkSpec& spec, const Tensor& logits, const Tensor& topk_idx,
                     const Tensor& routing_map, const Tensor& dprobs, Tensor& dlogits, bool accumulate);
void aux_stats(ScoreFunction score, int64_t k, int64_t num_seqs, const Tensor& logits, Tensor& prob_sum,
               Tensor& counts);
void aux_loss_bwd(ScoreFunction score, int64_t num_seqs, const Tensor& logits, const Tensor& weight,
                  Tensor& dlogits);
double z_loss_fwd(const Tensor& logits);  // Σ_t lse(l_t)², synchronises
void z_loss_bwd(const Tensor& logits, double coef, Tensor& dlogits);
void capacity(int64_t capacity, DropPolicy policy, bool pad, Tensor& probs, Tensor& routing_map);

Tensor routing_counts(const Tensor& routing_map);  // (E) i64 on the map's device
// row_id_map (T, E) i32 from the map and the exclusive prefix sum of the counts.
void permute_index(const Tensor& routing_map, const std::vector<int64_t>& expert_offsets, Tensor& row_id_map);
void permute(const Tensor& row_id_map, const Tensor& in, Tensor& out, const Tensor* probs = nullptr,
             Tensor* out_probs = nullptr);
void unpermute(const Tensor& row_id_map, const Tensor& in, Tensor& out, const Tensor* row_weights = nullptr);
// probs_grad (T, E) = row_values scattered to the routed (t, e), zero elsewhere.
void scatter_rows_to_map(const Tensor& row_id_map, const Tensor& row_values, Tensor& probs_grad);
// ops::permute into two outputs without a copy: row ids below N = out's rows write out (and
// out_probs), the ones from N on write out2 (and out_probs2) at row id − N. Every row of out is
// written once; of out2 the map must name exactly out2_written rows and the rest are left as they
// are. Internal (the all-to-all dispatcher: the send buffer and this rank's own rows in place).
void permute2(const Tensor& row_id_map, const Tensor& in, Tensor& out, Tensor& out2, int64_t out2_written,
              const Tensor* probs = nullptr, Tensor* out_probs = nullptr, Tensor* out_probs2 = nullptr);
// ops::unpermute over the rows [in; in2] (N + N2) without concatenating them: row ids from N on read
// in2 (and row_weights2). The same bits as ops::unpermute on the concatenation. Internal (the
// all-to-all dispatcher's combine).
void unpermute2(const Tensor& row_id_map, const Tensor& in, const Tensor& in2, Tensor& out,
                const Tensor* row_weights = nullptr, const Tensor* row_weights2 = nullptr);
// ops::scatter_rows_to_map over [row_values; row_values2] without concatenating them. Internal.
void scatter_rows_to_map2(const Tensor& row_id_map, const Tensor& row_values, const Tensor& row_values2,
                          Tensor& probs_grad);
void chunk_sort(const std::vector<int64_t>& split_sizes, const std::vector<int64_t>& sorted_idxs,
                const Tensor& in, Tensor& out, const Tensor* probs = nullptr, Tensor* out_probs = nullptr);

// out (R, C) = in[:, start : start + C]   /   out (R, C_total) = 0 with in placed at column start.
Tensor gather_columns(const Tensor& in, int64_t start, int64_t count);
Tensor scatter_columns(const Tensor& in, int64_t start, int64_t total_cols);

void act_fwd(Activation act, bool glu, const Tensor& in, const Tensor* row_scale, Tensor& out);
void act_bwd(Activation act, bool glu, const Tensor& in, const Tensor* row_scale, const Tensor& dout,
             Tensor& din, Tensor* drow_scale);

void axpby(double a, const Tensor& x, double b, Tensor& y);  // y = a x + b y
void add_(Tensor& y, const Tensor& x);                       // y += x
void mul(const Tensor& x, const Tensor& y, Tensor& out);
void sigmoid(const Tensor& x, Tensor& out);
void sigmoid_bwd(const Tensor& dy, const Tensor& y, Tensor& dx);
Tensor cast(const Tensor& x, DType dtype);  // a copy when the dtype already matches
void cast_into(const Tensor& x, Tensor& out);
void scale_rows(const Tensor& in, const Tensor& scale, Tensor& out, bool accumulate = false);
void row_dot(const Tensor& a, const Tensor& b, Tensor& out);
void jitter(uint64_t key, double eps, Tensor& out);
double mse(const Tensor& y, const Tensor& target, Tensor* dy, double scale);  // Σ(y−t)², synchronises
void adam(Tensor& param, const Tensor& grad, Tensor& m, Tensor& v, double lr, double beta1, double beta2,
          double eps, double weight_decay, int64_t step);
// SgdArgs: f32 param, grad and (when momentum != 0) momentum_buf of one element count.
void sgd(Tensor& param, const Tensor& grad, Tensor* momentum_buf, double lr, double momentum, double weight_decay);

// ---- the transformer around the MoE layer (kernels/ops.h has each op's exact contract) ----------
// The statistics dtype next to `dtype`: f64 with f64, else f32 (norm stats, lse, cross-entropy rows).
inline DType stat_dtype_for(DType dtype) { return dtype == DType::f64 ? DType::f64 : DType::f32; }

// ops_model.cpp
// x (rows, D), weight (D), bias (D) optional (layer only) → y (rows, D) (may be x), mean (rows)
// (layer only, else null), rstd (rows) in the stat dtype.
void norm_fwd(NormKind kind, double eps, const Tensor& x, const Tensor& weight, const Tensor* bias, Tensor& y,
              Tensor* mean, Tensor& rstd);
// dx (rows, D) overwritten (may be dy); dweight (D) and dbias (D, layer only, optional) accumulated.
void norm_bwd(NormKind kind, const Tensor& x, const Tensor& weight, const Tensor* mean, const Tensor& rstd,
              const Tensor& dy, Tensor& dx, Tensor& dweight, Tensor* dbias);
// x, y (S, B, heads, hd) (y may be x), positions (S) i64; rd rotary dims (even, <= hd).
void rope(const Tensor& positions, int64_t rd, double base, bool inverse, const Tensor& x, Tensor& y);
// ids (n) i64, table (V, H), out (n, H): rows of this rank's vocabulary slice [vocab_start, +V).
void embedding_fwd(const Tensor& ids, const Tensor& table, int64_t vocab_start, Tensor& out, bool accumulate);
// dtable (V, H) += the rows of dout (n, H) whose ids fall in the slice.
void embedding_bwd(const Tensor& ids, const Tensor& dout, int64_t vocab_start, Tensor& dtable);
// logits (n, V) → row_max (n) stat.
void xent_max(const Tensor& logits, Tensor& row_max);
// logits (n, V), labels (n) i64, row_max (n) → sum_exp (n), target (n) stat.
void xent_sum(const Tensor& logits, const Tensor& labels, int64_t vocab_start, const Tensor& row_max,
              Tensor& sum_exp, Tensor& target);
// → dlogits (n, V) (may be logits) = grad[i] · (softmax − one-hot).
void xent_bwd(const Tensor& logits, const Tensor& labels, int64_t vocab_start, const Tensor& row_max,
              const Tensor& sum_exp, const Tensor& grad, Tensor& dlogits);
// qkv (rows, ng·(q_per_group + 2)·hd) ↔ q (rows, ng·q_per_group, hd), k (rows, ng, hd), v (rows, ng, hd).
void qkv_split(const Tensor& qkv, int64_t ng, int64_t q_per_group, Tensor& q, Tensor& k, Tensor& v);
void qkv_merge(const Tensor& q, const Tensor& k, const Tensor& v, int64_t ng, int64_t q_per_group, Tensor& qkv);

// ops_attention.cpp
// q (Sq, B, nq, hd), k/v (Sk, B, nkv, hd), q_pos (Sq) i64, k_pos (Sk) i64 → o (Sq, B, nq, hd),
// lse (B, nq, Sq) stat.
void attention_fwd(double scale, const Tensor& q_pos, const Tensor& k_pos, const Tensor& q, const Tensor& k,
                   const Tensor& v, Tensor& o, Tensor& lse);
// → dq (Sq, B, nq, hd), dk, dv (Sk, B, nkv, hd), overwritten.
void attention_bwd(double scale, const Tensor& q_pos, const Tensor& k_pos, const Tensor& q, const Tensor& k,
                   const Tensor& v, const Tensor& o, const Tensor& lse, const Tensor& dout, Tensor& dq, Tensor& dk,
                   Tensor& dv);

// ops_nosync.cpp: the host-sync-free layer path (kernels/ops.h has each op's contract). Sizes and
// loss values stay in device tensors; nothing here reads on the host.
// counts (G) i64 → offsets (G+1) i64 (exclusive prefix sum, total last).
Tensor row_offsets(const Tensor& counts);
// grouped_gemm with m_g from row_offsets (G+1) i64 on the device; A/C rows are a bound (N_max).
void grouped_gemm_dev(GroupedGemmMode mode, const Tensor& A, const Tensor& B, Tensor& C, const Tensor& row_offsets,
                      bool accumulate = false);
// permute_index with the expert offsets (>= E) i64 in device memory.
void permute_index_dev(const Tensor& routing_map, const Tensor& row_offsets, Tensor& row_id_map);
// permute into out (N_max, H) of which num_rows (1) i64 are routed; the rest is left untouched.
void permute_dev(const Tensor& row_id_map, const Tensor& in, Tensor& out, const Tensor* probs, Tensor* out_probs,
                 const Tensor& num_rows);
// act_fwd / act_bwd over the first num_rows (1) i64 of the rows; the rest is left untouched.
void act_fwd_dev(Activation act, bool glu, const Tensor& in, const Tensor* row_scale, Tensor& out,
                 const Tensor& num_rows);
void act_bwd_dev(Activation act, bool glu, const Tensor& in, const Tensor* row_scale, const Tensor& dout, Tensor& din,
                 Tensor* drow_scale, const Tensor& num_rows);
// One aux loss term (spec: B, E, k, T_tot, coeff, loss_scale, global_steps) from prob_sum and the
// reduced counts (B, E) f64: weight (B, E) f64,
// value (1) f64 += the term; global_acc (E) f64 for global_aux_loss.
void aux_loss_value(const AuxLossValueArgs& spec, const Tensor& prob_sum, const Tensor& counts, Tensor* global_acc,
                    Tensor& weight, Tensor& value);
// sum (1) f64 = Σ_t lse(l_t)², left on the device.
void z_loss_sum(const Tensor& logits, Tensor& sum);
// y += x / divisor (f64 y with f64 or i64 x; i64 y and x with divisor 1).
void accumulate(Tensor& y, const Tensor& x, double divisor = 1.0);
// y[index] = y[index] · mul / div (f64).
void scale_at(Tensor& y, int64_t index, double mul, double div);

// The dtype probabilities travel in next to rows of `dtype`: f64 with f64, else f32.
inline DType prob_dtype_for(DType dtype) { return dtype == DType::f64 ? DType::f64 : DType::f32; }

}  // namespace moe::ops
