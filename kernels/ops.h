// libmoecore — the op contract shared by every backend.
// One plain Args struct per op; a KernelTable holds one function per op. Pointers in Args point to
// the backend's memory (device memory on CUDA) unless the field name ends in `_host`. Shapes are in
// the comment beside each pointer; all tensors are row-major and contiguous. Element counts and
// offsets are 64-bit (T·k·H may exceed 2^31). Compute is f32 for f32/bf16/f16 storage and f64 for
// f64 storage ("acc" below). Kernels validate nothing: the Tensor-level wrappers in
// src/device/ops.cpp check shapes, dtypes and devices before building an Args.
#pragma once
#include <cstdint>

#include "moecore/backend.h"
#include "moecore/dtype.h"

namespace moe {

// Where a kernel runs: the backend and its current stream (cudaStream_t as void* on CUDA).
struct ExecCtx {
  Backend* backend = nullptr;
  void* stream = nullptr;
};

// ---------------------------------------------------------------------------------------------
// Dense GEMM: C (M,N) = alpha · op(A) · op(B) + beta · C, op(A) (M,K), op(B) (K,N).
// A is (M,K) or, with trans_a, (K,M); B is (K,N) or, with trans_b, (N,K). dtype: f32, f64, bf16.
struct GemmArgs {
  DType dtype = DType::f32;
  bool trans_a = false, trans_b = false;
  int64_t M = 0, N = 0, K = 0;
  const void* A = nullptr;
  const void* B = nullptr;
  void* C = nullptr;
  double alpha = 1.0, beta = 0.0;
};

// Grouped GEMM over G groups of rows (the local experts). Row counts m_g may be zero.
// rows_host (G) is always given; rows_device (G) i64 is given on CUDA when available.
//   fwd:   C_g (m_g, N) = A_g (m_g, K) · B_g^T        A (M,K), B (G,N,K), C (M,N)      y  = x W^T
//   dgrad: C_g (m_g, K) = A_g (m_g, N) · B_g          A (M,N), B (G,N,K), C (M,K)      dx = dy W
//   wgrad: C_g (N, K) = A_g^T (N, m_g) · B_g (m_g, K) A (M,N), B (M,K), C (G,N,K)      dW = dy^T x
// with M = Σ m_g. `accumulate` adds into C instead of overwriting (wgrad: a group with m_g = 0
// then leaves C_g unchanged; without accumulate it is zeroed).
enum class GroupedGemmMode : uint8_t { fwd, dgrad, wgrad };
struct GroupedGemmArgs {
  DType dtype = DType::f32;
  GroupedGemmMode mode = GroupedGemmMode::fwd;
  int64_t G = 0, M = 0, N = 0, K = 0;
  const int64_t* rows_host = nullptr;    // (G) host
  const int64_t* rows_device = nullptr;  // (G) device, optional
  const void* A = nullptr;
  const void* B = nullptr;
  void* C = nullptr;
  bool accumulate = false;
};

// ---------------------------------------------------------------------------------------------
// Router: scores, group-limited top-k, probabilities (docs/moe.md). `dtype` is the router dtype of
// logits and probs: f32 or f64. Ties in top-k go to the lower expert index.
enum class ScoreFunction : uint8_t { softmax, sigmoid, sqrtsoftplus };

struct RouterTopkArgs {
  DType dtype = DType::f32;
  int64_t T = 0, E = 0, k = 0;
  ScoreFunction score = ScoreFunction::softmax;
  bool pre_softmax = false;
  int64_t num_groups = 0, group_topk = 0;  // 0: no group limit
  double scaling_factor = 1.0;
  const void* logits = nullptr;       // (T, E) dtype
  const float* expert_bias = nullptr;  // (E) f32 or null; sigmoid/sqrtsoftplus only, selection only
  void* probs = nullptr;               // (T, E) dtype out, zero off the map
  uint8_t* routing_map = nullptr;      // (T, E) u8 out
  int32_t* topk_idx = nullptr;         // (T, k) i32 out, in selection order
};

// dlogits (+)= d probs / d logits applied to dprobs, reading dprobs only at (t, topk_idx[t, j])
// where routing_map is set (a dropped selection carries no gradient). Scores are recomputed from
// logits; the expert bias only selected, so it needs no gradient.
struct RouterTopkBwdArgs {
  DType dtype = DType::f32;
  int64_t T = 0, E = 0, k = 0;
  ScoreFunction score = ScoreFunction::softmax;
  bool pre_softmax = false;
  double scaling_factor = 1.0;
  const void* logits = nullptr;          // (T, E) dtype
  const int32_t* topk_idx = nullptr;     // (T, k) i32
  const uint8_t* routing_map = nullptr;  // (T, E) u8, final (after capacity)
  const void* dprobs = nullptr;          // (T, E) dtype
  void* dlogits = nullptr;               // (T, E) dtype
  bool accumulate = false;
};

// Load-balancing statistics for the aux losses. p̂ = softmax(l) (softmax) or σ(l)/(Σσ(l)+1e-20)
// (sigmoid; sqrtsoftplus uses sqrt(softplus(l)) in place of σ). Token t belongs to sequence
// t % num_seqs (tokens are flattened s·B + b). Outputs (overwritten):
//   prob_sum (num_seqs, E) f64 = Σ_{t in seq} p̂(t, :)
//   counts   (num_seqs, E) i64 = Σ_{t in seq} topk_map(t, :) with topk_map a plain top-k over p̂
struct AuxStatsArgs {
  DType dtype = DType::f32;
  int64_t T = 0, E = 0, k = 0, num_seqs = 1;
  ScoreFunction score = ScoreFunction::softmax;
  const void* logits = nullptr;  // (T, E) dtype
  double* prob_sum = nullptr;    // (num_seqs, E) f64
  int64_t* counts = nullptr;     // (num_seqs, E) i64
};
// dlogits(t, :) += J_p̂(t)^T · weight(t % num_seqs, :), the aux loss gradient when weight carries
// coeff·scale·E/(k·T²)·c (already divided by the batch for seq_aux_loss).
struct AuxLossBwdArgs {
  DType dtype = DType::f32;
  int64_t T = 0, E = 0, num_seqs = 1;
  ScoreFunction score = ScoreFunction::softmax;
  const void* logits = nullptr;  // (T, E) dtype
  const double* weight = nullptr;  // (num_seqs, E) f64
  void* dlogits = nullptr;       // (T, E) dtype, accumulated
};
// z-loss: sum_out[0] = Σ_t logsumexp(l_t)² (f64, overwritten). Backward: dlogits(t,:) +=
// coef · 2·lse(l_t)·softmax(l_t) with coef = coeff·scale/T_total supplied by the caller.
struct ZLossArgs {
  DType dtype = DType::f32;
  int64_t T = 0, E = 0;
  const void* logits = nullptr;  // (T, E) dtype
  double* sum_out = nullptr;     // (1) f64, forward
  void* dlogits = nullptr;       // (T, E) dtype, backward, accumulated
  double coef = 0.0;             // backward
};

// Capacity (docs/moe.md), in place on probs and routing_map, per expert column:
//   policy probs:    keep the `capacity` routed tokens with the largest probs (ties: lower token)
//   policy position: keep the earliest `capacity` routed tokens
//   pad:             then fill the column to exactly `capacity` rows with the earliest tokens not
//                    yet kept; their probs are zero (the map gains them, the probs stay 0)
// Dropped entries get map 0 and prob 0. capacity >= T keeps everything (and pads to T).
enum class DropPolicy : uint8_t { probs, position };
struct CapacityArgs {
  DType dtype = DType::f32;  // of probs
  int64_t T = 0, E = 0, capacity = 0;
  DropPolicy policy = DropPolicy::probs;
  bool pad = false;
  void* probs = nullptr;         // (T, E) dtype, in/out
  uint8_t* routing_map = nullptr;  // (T, E) u8, in/out
};

// ---------------------------------------------------------------------------------------------
// Permutation (docs/moe.md). Rows are expert-major, token index ascending within an expert.
// routing_counts: counts (E) i64 = column sums of the map.
struct RoutingCountsArgs {
  int64_t T = 0, E = 0;
  const uint8_t* routing_map = nullptr;  // (T, E) u8
  int64_t* counts = nullptr;             // (E) i64 out
};
// permute_index: row_id_map (T, E) i32 = the permuted row of (t, e), or -1 when unrouted.
// expert_offsets_host (E) = exclusive prefix sum of the counts.
struct PermuteIndexArgs {
  int64_t T = 0, E = 0;
  const uint8_t* routing_map = nullptr;        // (T, E) u8
  const int64_t* expert_offsets_host = nullptr;  // (E) host
  const int64_t* expert_offsets = nullptr;       // (E) device copy (CUDA), optional
  int32_t* row_id_map = nullptr;               // (T, E) i32 out
};
// permute: out[row(t,e)] = in[t]; out_probs[row(t,e)] = probs[t, e] when probs are given.
// Every row of `out` (N rows) is written exactly once.
// Two outputs (N2 > 0): row ids in [N, N + N2) write out2 (and out_probs2) at row id − N; of out2
// only the N2_written rows the map names are written, the others are left as they are (the
// all-to-all dispatcher permutes the other EP ranks' rows into its send buffer and its own rows
// straight into their place among the rows it receives, in one pass over the tokens).
struct PermuteArgs {
  DType dtype = DType::f32;       // of in/out rows
  DType prob_dtype = DType::f32;  // of probs/out_probs
  int64_t T = 0, E = 0, H = 0, N = 0;
  int64_t N2 = 0, N2_written = 0;       // rows of out2, and how many of them the map names
  const int32_t* row_id_map = nullptr;  // (T, E) i32, row ids in [0, N + N2) or -1
  const void* in = nullptr;             // (T, H) dtype
  void* out = nullptr;                  // (N, H) dtype
  void* out2 = nullptr;                 // (N2, H) dtype, rows N .. N + N2 − 1 (when N2 > 0)
  const void* probs = nullptr;          // (T, E) prob_dtype, optional
  void* out_probs = nullptr;            // (N) prob_dtype, optional
  void* out_probs2 = nullptr;           // (N2) prob_dtype, with out_probs when N2 > 0
};
// unpermute: out[t] = Σ_e w(t,e) · in[row(t,e)] over routed e, in expert order, with w = row_weights
// at that row when given, else 1 (a token with no routed expert gets zeros). The mirror of permute:
// it is permute's backward and permute is its backward. When `probs_grad` is given it also writes
// probs_grad[t, e] = row_values[row(t,e)] for routed (t, e) and 0 elsewhere (the dprobs scatter).
// Two inputs (N2 > 0): the rows are the concatenation [in; in2] without a copy — row ids in
// [N, N + N2) read in2 (and row_weights2 / row_values2) at row id − N; the same bits as one input
// holding both (the all-to-all combine reads the peers' rows and this rank's own rows where they are).
struct UnpermuteArgs {
  DType dtype = DType::f32;
  DType prob_dtype = DType::f32;
  int64_t T = 0, E = 0, H = 0, N = 0;
  int64_t N2 = 0;                       // rows of the second input (0: one input)
  const int32_t* row_id_map = nullptr;  // (T, E) i32, row ids in [0, N + N2) or -1
  const void* in = nullptr;             // (N, H) dtype, may be null when only scattering probs
  const void* in2 = nullptr;            // (N2, H) dtype, rows N .. N + N2 − 1 (when N2 > 0 and out)
  void* out = nullptr;                  // (T, H) dtype
  const void* row_weights = nullptr;    // (N) prob_dtype, optional
  const void* row_weights2 = nullptr;   // (N2) prob_dtype, with row_weights when N2 > 0
  const void* row_values = nullptr;     // (N) prob_dtype, optional (with probs_grad)
  const void* row_values2 = nullptr;    // (N2) prob_dtype, with row_values when N2 > 0
  void* probs_grad = nullptr;           // (T, E) prob_dtype, optional
};
// chunk_sort: the input rows are `num_chunks` consecutive chunks of split_sizes_host rows; the
// output is the chunks concatenated in the order sorted_idxs_host (a permutation). The optional
// probs (N) travel the same way.
struct ChunkSortArgs {
  DType dtype = DType::f32;
  DType prob_dtype = DType::f32;
  int64_t num_chunks = 0, N = 0, H = 0;
  const int64_t* split_sizes_host = nullptr;  // (num_chunks)
  const int64_t* sorted_idxs_host = nullptr;  // (num_chunks)
  const void* in = nullptr;                   // (N, H)
  void* out = nullptr;                        // (N, H)
  const void* probs = nullptr;                // (N) optional
  void* out_probs = nullptr;                  // (N) optional
};

// columns: a block of columns of a row-major matrix, for any element size (bytes are copied).
//   gather:  out (rows, out_cols) = in (rows, in_cols)[:, start : start + out_cols]
//   scatter: out (rows, out_cols) = 0 except out[:, start : start + in_cols] = in (rows, in_cols)
// (the allgather dispatcher's local-expert slice of probs and map, and its mirror for dprobs).
struct ColumnsArgs {
  int64_t elem_size = 4;
  int64_t rows = 0, in_cols = 0, out_cols = 0, start = 0;
  bool scatter = false;
  const void* in = nullptr;
  void* out = nullptr;
};

// ---------------------------------------------------------------------------------------------
// Activations with the prob multiply (docs/moe.md). With glu the input row is [a | b] (F each):
// out = act(a) · b · s; without, out = act(x) · s. s = row_scale[r] when given, else 1.
//   silu(x) = x·σ(x); gelu(x) = x·Φ(x) (erf form, PyTorch's default); relu2(x) = max(x,0)²
enum class Activation : uint8_t { silu, gelu, relu2 };
struct ActFwdArgs {
  DType dtype = DType::f32;
  DType scale_dtype = DType::f32;
  Activation act = Activation::silu;
  bool glu = false;
  int64_t rows = 0, F = 0;
  const void* in = nullptr;         // (rows, glu ? 2F : F)
  const void* row_scale = nullptr;  // (rows) scale_dtype, optional
  void* out = nullptr;              // (rows, F)
};
// din = ∂out/∂in · dout (overwritten); drow_scale[r] = Σ_f dout·out/s (= dout·act(...)) when given.
struct ActBwdArgs {
  DType dtype = DType::f32;
  DType scale_dtype = DType::f32;
  Activation act = Activation::silu;
  bool glu = false;
  int64_t rows = 0, F = 0;
  const void* in = nullptr;         // (rows, glu ? 2F : F)
  const void* row_scale = nullptr;  // (rows) optional
  const void* dout = nullptr;       // (rows, F)
  void* din = nullptr;              // (rows, glu ? 2F : F)
  void* drow_scale = nullptr;       // (rows) scale_dtype, optional
};

// ---------------------------------------------------------------------------------------------
// Elementwise and small helpers. n elements; all of one dtype unless said.
enum class UnaryOp : uint8_t { sigmoid, sigmoid_bwd };  // sigmoid_bwd: out = x · y · (1 − y)
struct ElementwiseArgs {
  DType dtype = DType::f32;
  UnaryOp op = UnaryOp::sigmoid;  // unary only
  int64_t n = 0;
  // axpby: y = a·x + b·y            (x, y)
  // mul:   out = x · y              (x, y, out)
  // sigmoid: out = σ(x)             (x, out)
  // sigmoid_bwd: out = x · y·(1−y)  (x = upstream grad, y = σ output, out)
  const void* x = nullptr;
  void* y = nullptr;
  void* out = nullptr;
  double a = 1.0, b = 0.0;
};
struct CastArgs {
  DType src_dtype = DType::f32, dst_dtype = DType::f32;
  int64_t n = 0;
  const void* src = nullptr;
  void* dst = nullptr;
};
// out[r, :] = in[r, :] · scale[r] (+ out when accumulate).  scale in scale_dtype.
struct ScaleRowsArgs {
  DType dtype = DType::f32;
  DType scale_dtype = DType::f32;
  int64_t rows = 0, H = 0;
  const void* in = nullptr;     // (rows, H)
  const void* scale = nullptr;  // (rows)
  void* out = nullptr;          // (rows, H)
  bool accumulate = false;
};
// out[r] = Σ_h a[r,h]·b[r,h]   (out in out_dtype)
struct RowDotArgs {
  DType dtype = DType::f32;
  DType out_dtype = DType::f32;
  int64_t rows = 0, H = 0;
  const void* a = nullptr;  // (rows, H)
  const void* b = nullptr;  // (rows, H)
  void* out = nullptr;      // (rows)
};
// Input jitter noise, a pure function of (key, element index): out[i] ∈ [1−eps, 1+eps), the same
// bits on every backend (a counter-based hash, see kernels/common/rng.h).
struct JitterArgs {
  DType dtype = DType::f32;
  int64_t n = 0;
  uint64_t key = 0;
  double eps = 0.0;
  void* out = nullptr;  // (n)
};
// Mean-squared error against a target: sum_out[0] = Σ (y − t)²  (f64); dy = scale · 2 (y − t).
struct MseArgs {
  DType dtype = DType::f32;
  int64_t n = 0;
  const void* y = nullptr;
  const void* target = nullptr;
  double* sum_out = nullptr;  // (1) f64
  void* dy = nullptr;         // (n) optional
  double scale = 1.0;
};
// Adam(W) on f32 master parameters: m = b1 m + (1−b1) g; v = b2 v + (1−b2) g²;
// p −= lr · (m/(1−b1^t)) / (sqrt(v/(1−b2^t)) + eps) + lr · wd · p.
struct AdamArgs {
  int64_t n = 0;
  float* param = nullptr;
  const float* grad = nullptr;
  float* m = nullptr;
  float* v = nullptr;
  double lr = 1e-3, beta1 = 0.9, beta2 = 0.999, eps = 1e-8, weight_decay = 0.0;
  int64_t step = 1;
};
// SGD with momentum on f32 master parameters, PyTorch's torch.optim.SGD order (dampening 0, not
// Nesterov; weight decay coupled, i.e. added to the gradient):
//   d = g + wd · p (f32);  buf = momentum · buf + d (f32; buf starts at 0, so the first step gives
//   buf = d as PyTorch's clone does);  p −= lr · buf (in f64, rounded once to f32).
// momentum_buf may be null when momentum is 0 (then p −= lr · d).
struct SgdArgs {
  int64_t n = 0;
  float* param = nullptr;         // (n)
  const float* grad = nullptr;    // (n)
  float* momentum_buf = nullptr;  // (n) or null
  double lr = 1e-2, momentum = 0.0, weight_decay = 0.0;
};

// ---------------------------------------------------------------------------------------------
// The transformer around the MoE layer (docs/model.md). "stat" below is the statistics dtype:
// f64 when dtype is f64, else f32.

// Normalisation over the last dimension D of `rows` rows, computed in acc:
//   rms:   y = x · rstd · w,                rstd = 1 / sqrt(mean(x²) + eps)
//   layer: y = (x − mean) · rstd · w + b,   rstd = 1 / sqrt(var + eps), var biased
enum class NormKind : uint8_t { rms, layer };
struct NormFwdArgs {
  DType dtype = DType::f32;
  NormKind kind = NormKind::rms;
  int64_t rows = 0, D = 0;
  double eps = 1e-5;
  const void* x = nullptr;       // (rows, D) dtype
  const void* weight = nullptr;  // (D) dtype
  const void* bias = nullptr;    // (D) dtype, layer only, optional
  void* y = nullptr;             // (rows, D) dtype out (may alias x)
  void* mean = nullptr;          // (rows) stat out, layer only
  void* rstd = nullptr;          // (rows) stat out
};
// dx (rows, D) overwritten (may alias dy); dweight (D) and dbias (D) accumulated (+=) over the rows.
// On the CPU in row order, so the result does not depend on the thread count; other backends may
// sum in another fixed order (equal within tolerance).
struct NormBwdArgs {
  DType dtype = DType::f32;
  NormKind kind = NormKind::rms;
  int64_t rows = 0, D = 0;
  const void* x = nullptr;       // (rows, D) dtype
  const void* weight = nullptr;  // (D) dtype
  const void* mean = nullptr;    // (rows) stat, layer only
  const void* rstd = nullptr;    // (rows) stat
  const void* dy = nullptr;      // (rows, D) dtype
  void* dx = nullptr;            // (rows, D) dtype out
  void* dweight = nullptr;       // (D) dtype, accumulated
  void* dbias = nullptr;         // (D) dtype, accumulated, layer only, optional
};

// Rotary position embedding, not interleaved, on the first rd (even) dims of every head; the rest
// are copied. inv_freq_i = base^(−2i/rd) for i < rd/2, angle = positions[s] · inv_freq_i (both in
// f64), rounded to acc, cos/sin taken in acc (f32 angles as Megatron's f32 frequencies give):
//   y[i] = x[i]·cos − x[i + rd/2]·sin,   y[i + rd/2] = x[i + rd/2]·cos + x[i]·sin   (i < rd/2)
// inverse applies the transposed rotation (angle → −angle): the backward.
struct RopeArgs {
  DType dtype = DType::f32;
  int64_t S = 0, B = 0, heads = 0, hd = 0, rd = 0;
  double base = 10000.0;
  bool inverse = false;
  const int64_t* positions = nullptr;  // (S) i64
  const void* x = nullptr;             // (S, B, heads, hd) dtype
  void* y = nullptr;                   // (S, B, heads, hd) dtype out (may alias x)
};

// Embedding rows of a (vocab-parallel) table holding ids [vocab_start, vocab_start + V):
//   fwd: out[i] (+)= table[ids[i] − vocab_start] when the id is in range, else (+)0
//   bwd: dtable[ids[i] − vocab_start] += dout[i] for the ids in range, summed in i order per row
struct EmbeddingArgs {
  DType dtype = DType::f32;
  int64_t n = 0, V = 0, H = 0, vocab_start = 0;
  bool accumulate = false;     // fwd: add into out
  const int64_t* ids = nullptr;  // (n) i64
  const void* table = nullptr;   // (V, H) dtype, fwd
  void* out = nullptr;           // (n, H) dtype, fwd
  const void* dout = nullptr;    // (n, H) dtype, bwd
  void* dtable = nullptr;        // (V, H) dtype, bwd, accumulated
};

// Cross entropy over a vocabulary split across ranks (this rank holds ids [vocab_start,
// vocab_start + V)), in steps with all-reduces between them:
//   xent_max: row_max[i] = max_v logits[i, v]                                   → all-reduce max
//   xent_sum: sum_exp[i] = Σ_v exp(logits[i, v] − row_max[i]);
//             target[i]  = logits[i, labels[i] − vocab_start] in range, else 0  → all-reduce sum
//   (the caller: loss_i = log(sum_exp_i) + row_max_i − target_i)
//   xent_bwd: dlogits[i, v] = grad[i] · (exp(logits[i, v] − row_max[i]) / sum_exp[i]
//                                        − [v == labels[i] − vocab_start])
struct XentArgs {
  DType dtype = DType::f32;
  int64_t n = 0, V = 0, vocab_start = 0;
  const void* logits = nullptr;    // (n, V) dtype
  const int64_t* labels = nullptr;  // (n) i64 (sum, bwd)
  void* row_max = nullptr;         // (n) stat: out (max), in (sum, bwd)
  void* sum_exp = nullptr;         // (n) stat: out (sum), in (bwd)
  void* target = nullptr;          // (n) stat: out (sum)
  const void* grad = nullptr;      // (n) stat (bwd): d loss / d loss_i
  void* dlogits = nullptr;         // (n, V) dtype out (bwd; may alias logits)
};

// The fused QKV projection's output, per query group g (ng groups): q_per_group query heads, then
// one key head, then one value head, hd each. Row r of qkv (rows, ng·(q_per_group + 2)·hd):
//   split: q (rows, ng·q_per_group, hd) (query head g·q_per_group + j), k (rows, ng, hd), v alike
//   merge: qkv from q, k and v (the split's backward)
struct QkvArgs {
  DType dtype = DType::f32;
  int64_t rows = 0, ng = 0, q_per_group = 0, hd = 0;
  bool merge = false;
  void* qkv = nullptr;  // (rows, ng·(q_per_group + 2)·hd)
  void* q = nullptr;    // (rows, ng·q_per_group, hd)
  void* k = nullptr;    // (rows, ng, hd)
  void* v = nullptr;    // (rows, ng, hd)
};

// Causal softmax attention with grouped query heads, computed block by block with an online
// softmax (never an (Sq × Sk) matrix; FlashAttention-2's algorithm). Query head h reads key/value
// head h / (nq / nkv). For query i: s_j = scale · q_i·k_j over the keys with k_pos[j] ≤ q_pos[i]
// (causal by position, so context-parallel chunks work), o_i = Σ_j softmax(s)_j · v_j,
// lse[b, h, i] = logsumexp_j s_j (a query with no visible key gets o_i = 0, lse = −inf).
struct AttnFwdArgs {
  DType dtype = DType::f32;
  int64_t Sq = 0, Sk = 0, B = 0, nq = 0, nkv = 0, hd = 0;
  double scale = 1.0;
  const int64_t* q_pos = nullptr;  // (Sq) i64
  const int64_t* k_pos = nullptr;  // (Sk) i64
  const void* q = nullptr;         // (Sq, B, nq, hd) dtype
  const void* k = nullptr;         // (Sk, B, nkv, hd) dtype
  const void* v = nullptr;         // (Sk, B, nkv, hd) dtype
  void* o = nullptr;               // (Sq, B, nq, hd) dtype out
  void* lse = nullptr;             // (B, nq, Sq) stat out
};
// Backward: D_i = Σ dO_i·O_i; P recomputed block by block from lse; dV = Pᵀ·dO; dP = dO·Vᵀ;
// dS = P ∘ (dP − D); dQ = scale · dS·K; dK = scale · dSᵀ·Q. dq, dk, dv are overwritten (dk/dv sum
// over the query heads of their group).
struct AttnBwdArgs {
  DType dtype = DType::f32;
  int64_t Sq = 0, Sk = 0, B = 0, nq = 0, nkv = 0, hd = 0;
  double scale = 1.0;
  const int64_t* q_pos = nullptr;  // (Sq) i64
  const int64_t* k_pos = nullptr;  // (Sk) i64
  const void* q = nullptr;         // (Sq, B, nq, hd)
  const void* k = nullptr;         // (Sk, B, nkv, hd)
  const void* v = nullptr;         // (Sk, B, nkv, hd)
  const void* o = nullptr;         // (Sq, B, nq, hd)
  const void* lse = nullptr;       // (B, nq, Sq) stat
  const void* dout = nullptr;      // (Sq, B, nq, hd)
  void* dq = nullptr;              // (Sq, B, nq, hd) out
  void* dk = nullptr;              // (Sk, B, nkv, hd) out
  void* dv = nullptr;              // (Sk, B, nkv, hd) out
};

// ---------------------------------------------------------------------------------------------
// The host-sync-free layer path (docs/gpu.md): ops whose sizes live in device memory, so a layer
// step never reads counts or losses on the host. Rows are allocated for an upper bound N_max; the
// true count is on the device and rows past it are neither read nor written.
//   grouped_gemm_dev: GroupedGemmArgs with m_g = row_offsets[g+1] − row_offsets[g] read from
//                     device memory (base.rows_host unused, base.M = N_max ≥ row_offsets[G]).
//   permute_dev:      permute into out (base.N = N_max rows) of which num_rows[0] are routed.
//   act_fwd_dev / act_bwd_dev: the activation over the first num_rows[0] of base.rows rows.
struct GroupedGemmDevArgs {
  GroupedGemmArgs base;
  const int64_t* row_offsets = nullptr;  // (G+1) i64 device: exclusive prefix sum, total last
};
struct PermuteDevArgs {
  PermuteArgs base;
  const int64_t* num_rows = nullptr;  // (1) i64 device
};
struct ActFwdDevArgs {
  ActFwdArgs base;
  const int64_t* num_rows = nullptr;  // (1) i64 device
};
struct ActBwdDevArgs {
  ActBwdArgs base;
  const int64_t* num_rows = nullptr;  // (1) i64 device
};
// row_offsets: offsets (G+1) i64 = [0, c_0, c_0 + c_1, ...] of counts (G) i64.
struct RowOffsetsArgs {
  int64_t G = 0;
  const int64_t* counts = nullptr;  // (G) i64
  int64_t* offsets = nullptr;       // (G+1) i64 out
};
// aux_loss_value: one load-balancing loss term from its statistics, on the device. With
// global_acc: acc[e] += c[e] and c[e] = acc[e] / global_steps (the step's running mean). Then per
// sequence b: r_b = E·Σ_e P_be·c_be / denom with denom = k·T_tot², value[0] += coeff·(Σ_b r_b / B),
// weight_be = loss_scale·coeff·E / denom · c_be / B (0 when denom is 0). The same f64 operations,
// in the same order, as the host formula they replace.
struct AuxLossValueArgs {
  int64_t B = 1, E = 0, k = 1;
  double T_tot = 0.0, coeff = 0.0, loss_scale = 1.0, global_steps = 1.0;
  const double* prob_sum = nullptr;  // (B, E) f64
  const double* counts = nullptr;    // (B, E) f64 (integers, reduced over the group)
  double* global_acc = nullptr;      // (E) f64 in/out, global_aux_loss only
  double* weight = nullptr;          // (B, E) f64 out
  double* value = nullptr;           // (1) f64, accumulated
};
// accumulate: y[i] += x[i] / divisor (f64 y: x f64 or i64 converted; i64 y: x i64, divisor 1);
// scale_at: y[index] = y[index] · mul / div (f64). Small device-side bookkeeping of counts and losses.
struct AccumulateArgs {
  DType y_dtype = DType::f64, x_dtype = DType::f64;
  int64_t n = 0, index = 0;
  double divisor = 1.0, mul = 1.0;
  const void* x = nullptr;  // (n)
  void* y = nullptr;        // (n)
};

// ---------------------------------------------------------------------------------------------
// One function per op. A null entry means the backend lacks the op (the wrapper says so).
struct KernelTable {
  void (*gemm)(const GemmArgs&, const ExecCtx&) = nullptr;
  void (*grouped_gemm)(const GroupedGemmArgs&, const ExecCtx&) = nullptr;
  void (*router_topk)(const RouterTopkArgs&, const ExecCtx&) = nullptr;
  void (*router_topk_bwd)(const RouterTopkBwdArgs&, const ExecCtx&) = nullptr;
  void (*aux_stats)(const AuxStatsArgs&, const ExecCtx&) = nullptr;
  void (*aux_loss_bwd)(const AuxLossBwdArgs&, const ExecCtx&) = nullptr;
  void (*z_loss_fwd)(const ZLossArgs&, const ExecCtx&) = nullptr;
  void (*z_loss_bwd)(const ZLossArgs&, const ExecCtx&) = nullptr;
  void (*capacity)(const CapacityArgs&, const ExecCtx&) = nullptr;
  void (*routing_counts)(const RoutingCountsArgs&, const ExecCtx&) = nullptr;
  void (*permute_index)(const PermuteIndexArgs&, const ExecCtx&) = nullptr;
  void (*permute)(const PermuteArgs&, const ExecCtx&) = nullptr;
  void (*unpermute)(const UnpermuteArgs&, const ExecCtx&) = nullptr;
  void (*chunk_sort)(const ChunkSortArgs&, const ExecCtx&) = nullptr;
  void (*columns)(const ColumnsArgs&, const ExecCtx&) = nullptr;
  void (*act_fwd)(const ActFwdArgs&, const ExecCtx&) = nullptr;
  void (*act_bwd)(const ActBwdArgs&, const ExecCtx&) = nullptr;
  void (*axpby)(const ElementwiseArgs&, const ExecCtx&) = nullptr;
  void (*mul)(const ElementwiseArgs&, const ExecCtx&) = nullptr;
  void (*unary)(const ElementwiseArgs&, const ExecCtx&) = nullptr;
  void (*cast)(const CastArgs&, const ExecCtx&) = nullptr;
  void (*scale_rows)(const ScaleRowsArgs&, const ExecCtx&) = nullptr;
  void (*row_dot)(const RowDotArgs&, const ExecCtx&) = nullptr;
  void (*jitter)(const JitterArgs&, const ExecCtx&) = nullptr;
  void (*mse)(const MseArgs&, const ExecCtx&) = nullptr;
  void (*adam)(const AdamArgs&, const ExecCtx&) = nullptr;
  void (*sgd)(const SgdArgs&, const ExecCtx&) = nullptr;
  void (*norm_fwd)(const NormFwdArgs&, const ExecCtx&) = nullptr;
  void (*norm_bwd)(const NormBwdArgs&, const ExecCtx&) = nullptr;
  void (*rope)(const RopeArgs&, const ExecCtx&) = nullptr;
  void (*embedding_fwd)(const EmbeddingArgs&, const ExecCtx&) = nullptr;
  void (*embedding_bwd)(const EmbeddingArgs&, const ExecCtx&) = nullptr;
  void (*xent_max)(const XentArgs&, const ExecCtx&) = nullptr;
  void (*xent_sum)(const XentArgs&, const ExecCtx&) = nullptr;
  void (*xent_bwd)(const XentArgs&, const ExecCtx&) = nullptr;
  void (*qkv)(const QkvArgs&, const ExecCtx&) = nullptr;
  void (*attn_fwd)(const AttnFwdArgs&, const ExecCtx&) = nullptr;
  void (*attn_bwd)(const AttnBwdArgs&, const ExecCtx&) = nullptr;
  // the host-sync-free path
  void (*grouped_gemm_dev)(const GroupedGemmDevArgs&, const ExecCtx&) = nullptr;
  void (*permute_dev)(const PermuteDevArgs&, const ExecCtx&) = nullptr;
  void (*act_fwd_dev)(const ActFwdDevArgs&, const ExecCtx&) = nullptr;
  void (*act_bwd_dev)(const ActBwdDevArgs&, const ExecCtx&) = nullptr;
  void (*row_offsets)(const RowOffsetsArgs&, const ExecCtx&) = nullptr;
  void (*aux_loss_value)(const AuxLossValueArgs&, const ExecCtx&) = nullptr;
  void (*accumulate)(const AccumulateArgs&, const ExecCtx&) = nullptr;
  void (*scale_at)(const AccumulateArgs&, const ExecCtx&) = nullptr;
};

}  // namespace moe
