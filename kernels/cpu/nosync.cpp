// The host-sync-free path's ops on the CPU (kernels/ops.h, "The host-sync-free layer path"). On the
// CPU back end device memory is host memory, so each kernel reads the device-side counts directly
// and runs the existing CPU kernel over the rows that are really there: the results are the bits
// of the host-count path.
#include <algorithm>
#include <vector>

#include "kernels/cpu/cpu_kernels.h"
#include "moecore/error.h"

namespace moe {

void cpu_grouped_gemm_dev(const GroupedGemmDevArgs& d, const ExecCtx& ctx) {
  const GroupedGemmArgs& b = d.base;
  std::vector<int64_t> rows(static_cast<size_t>(b.G));  // (G) m_g from the device offsets
  for (int64_t g = 0; g < b.G; ++g) {
    rows[g] = d.row_offsets[g + 1] - d.row_offsets[g];
    MOE_CHECK(rows[g] >= 0, "grouped_gemm_dev: group ", g, " has a negative row count ", rows[g]);
  }
  const int64_t M = d.row_offsets[b.G] - d.row_offsets[0];
  MOE_CHECK(d.row_offsets[0] == 0 && M <= b.M, "grouped_gemm_dev: the row offsets cover [", d.row_offsets[0], ", ",
            d.row_offsets[b.G], ") but the bound is ", b.M, " rows starting at 0");
  GroupedGemmArgs a = b;
  a.M = M;
  a.rows_host = rows.data();
  a.rows_device = nullptr;
  cpu_grouped_gemm(a, ctx);
}

void cpu_permute_dev(const PermuteDevArgs& d, const ExecCtx& ctx) {
  const int64_t n = d.num_rows[0];
  MOE_CHECK(n >= 0 && n <= d.base.N, "permute_dev: ", n, " routed rows do not fit the bound of ", d.base.N, " rows");
  PermuteArgs a = d.base;
  a.N = n;  // rows past n stay untouched; cpu_permute checks that exactly n pairs are routed
  cpu_permute(a, ctx);
}

namespace {
int64_t bounded_rows(const int64_t* num_rows, int64_t bound, const char* op) {
  const int64_t n = num_rows[0];
  MOE_CHECK(n >= 0 && n <= bound, op, ": ", n, " rows do not fit the bound of ", bound, " rows");
  return n;
}
}  // namespace

void cpu_act_fwd_dev(const ActFwdDevArgs& d, const ExecCtx& ctx) {
  ActFwdArgs a = d.base;
  a.rows = bounded_rows(d.num_rows, a.rows, "act_fwd_dev");
  cpu_act_fwd(a, ctx);
}

void cpu_act_bwd_dev(const ActBwdDevArgs& d, const ExecCtx& ctx) {
  ActBwdArgs a = d.base;
  a.rows = bounded_rows(d.num_rows, a.rows, "act_bwd_dev");
  cpu_act_bwd(a, ctx);
}

void cpu_row_offsets(const RowOffsetsArgs& a, const ExecCtx&) {
  int64_t run = 0;
  for (int64_t g = 0; g < a.G; ++g) {
    a.offsets[g] = run;
    run += a.counts[g];
  }
  a.offsets[a.G] = run;
}

void cpu_aux_loss_value(const AuxLossValueArgs& a, const ExecCtx&) {
  const int64_t B = a.B, E = a.E;
  std::vector<double> cnt(a.counts, a.counts + B * E);  // (B, E) f64
  if (a.global_acc) {
    for (int64_t e = 0; e < E; ++e) a.global_acc[e] += cnt[e];
    for (int64_t e = 0; e < E; ++e) cnt[e] = a.global_acc[e] / a.global_steps;
  }
  const double denom = static_cast<double>(a.k) * a.T_tot * a.T_tot;
  double r_sum = 0.0;
  std::fill(a.weight, a.weight + B * E, 0.0);
  for (int64_t b = 0; b < B && denom > 0; ++b) {
    double dot = 0.0;
    for (int64_t e = 0; e < E; ++e) dot += a.prob_sum[b * E + e] * cnt[b * E + e];
    r_sum += static_cast<double>(E) * dot / denom;
    for (int64_t e = 0; e < E; ++e)
      a.weight[b * E + e] =
          a.loss_scale * a.coeff * static_cast<double>(E) / denom * cnt[b * E + e] / static_cast<double>(B);
  }
  a.value[0] += a.coeff * (r_sum / static_cast<double>(B));
}

void cpu_accumulate(const AccumulateArgs& a, const ExecCtx&) {
  if (a.y_dtype == DType::i64) {
    MOE_CHECK(a.x_dtype == DType::i64 && a.divisor == 1.0, "accumulate: an i64 sum needs i64 x and divisor 1");
    int64_t* y = static_cast<int64_t*>(a.y);
    const int64_t* x = static_cast<const int64_t*>(a.x);
    for (int64_t i = 0; i < a.n; ++i) y[i] += x[i];
    return;
  }
  double* y = static_cast<double*>(a.y);
  if (a.x_dtype == DType::i64) {
    const int64_t* x = static_cast<const int64_t*>(a.x);
    for (int64_t i = 0; i < a.n; ++i) y[i] += static_cast<double>(x[i]) / a.divisor;
  } else {
    const double* x = static_cast<const double*>(a.x);
    for (int64_t i = 0; i < a.n; ++i) y[i] += x[i] / a.divisor;
  }
}

void cpu_scale_at(const AccumulateArgs& a, const ExecCtx&) {
  double* y = static_cast<double*>(a.y);
  y[a.index] = y[a.index] * a.mul / a.divisor;
}

}  // namespace moe
