// The CPU backend's kernels: the readable references every other backend is tested against.
#pragma once
#include <string>
#include <vector>

#include "kernels/ops.h"

namespace moe {

const KernelTable& cpu_kernel_table();
// gemm.cpp: the GEMM engine (kernels/cpu/gemm.cpp): "onednn", "openblas" or "eigen", chosen at
// start-up by the CPU's features or by MOE_CPU_GEMM; cpu_gemm_set_engine forces one ("" = the
// automatic choice; an unknown or unbuilt name throws). cpu_gemm_kernel names the engine and
// kernel a dtype's GEMMs run on ("onednn(brg:avx512_core_amx_bf16)", "openblas(SkylakeX)");
// cpu_gemm_info is build_info's line; cpu_gemm_generic_kernel is true (and says why and the fix)
// when the engine in use runs a generic kernel on a CPU with AVX2 or AVX-512.
const char* cpu_gemm_engine();
std::vector<std::string> cpu_gemm_engines_built();  // the engines in this build, by name
void cpu_gemm_set_engine(const std::string& name);
std::string cpu_gemm_kernel(DType dt);
std::string cpu_gemm_info();
bool cpu_gemm_generic_kernel(std::string* why);
void cpu_set_num_threads(int n);
int cpu_num_threads();

// gemm.cpp
void cpu_gemm(const GemmArgs&, const ExecCtx&);
void cpu_grouped_gemm(const GroupedGemmArgs&, const ExecCtx&);
// router.cpp
void cpu_router_topk(const RouterTopkArgs&, const ExecCtx&);
void cpu_router_topk_bwd(const RouterTopkBwdArgs&, const ExecCtx&);
void cpu_aux_stats(const AuxStatsArgs&, const ExecCtx&);
void cpu_aux_loss_bwd(const AuxLossBwdArgs&, const ExecCtx&);
void cpu_z_loss_fwd(const ZLossArgs&, const ExecCtx&);
void cpu_z_loss_bwd(const ZLossArgs&, const ExecCtx&);
void cpu_capacity(const CapacityArgs&, const ExecCtx&);
// permute.cpp
void cpu_routing_counts(const RoutingCountsArgs&, const ExecCtx&);
void cpu_permute_index(const PermuteIndexArgs&, const ExecCtx&);
void cpu_permute(const PermuteArgs&, const ExecCtx&);
void cpu_unpermute(const UnpermuteArgs&, const ExecCtx&);
void cpu_chunk_sort(const ChunkSortArgs&, const ExecCtx&);
void cpu_columns(const ColumnsArgs&, const ExecCtx&);
// activation.cpp
void cpu_act_fwd(const ActFwdArgs&, const ExecCtx&);
void cpu_act_bwd(const ActBwdArgs&, const ExecCtx&);
// elementwise.cpp
void cpu_axpby(const ElementwiseArgs&, const ExecCtx&);
void cpu_mul(const ElementwiseArgs&, const ExecCtx&);
void cpu_unary(const ElementwiseArgs&, const ExecCtx&);
void cpu_cast(const CastArgs&, const ExecCtx&);
void cpu_scale_rows(const ScaleRowsArgs&, const ExecCtx&);
void cpu_row_dot(const RowDotArgs&, const ExecCtx&);
void cpu_jitter(const JitterArgs&, const ExecCtx&);
void cpu_mse(const MseArgs&, const ExecCtx&);
void cpu_adam(const AdamArgs&, const ExecCtx&);
// optim.cpp
void cpu_sgd(const SgdArgs&, const ExecCtx&);
// model_ops.cpp (norm, rope, embedding, cross entropy, qkv split)
void cpu_norm_fwd(const NormFwdArgs&, const ExecCtx&);
void cpu_norm_bwd(const NormBwdArgs&, const ExecCtx&);
void cpu_rope(const RopeArgs&, const ExecCtx&);
void cpu_embedding_fwd(const EmbeddingArgs&, const ExecCtx&);
void cpu_embedding_bwd(const EmbeddingArgs&, const ExecCtx&);
void cpu_xent_max(const XentArgs&, const ExecCtx&);
void cpu_xent_sum(const XentArgs&, const ExecCtx&);
void cpu_xent_bwd(const XentArgs&, const ExecCtx&);
void cpu_qkv(const QkvArgs&, const ExecCtx&);
// attention.cpp
void cpu_attn_fwd(const AttnFwdArgs&, const ExecCtx&);
void cpu_attn_bwd(const AttnBwdArgs&, const ExecCtx&);
// nosync.cpp (the host-sync-free path)
void cpu_grouped_gemm_dev(const GroupedGemmDevArgs&, const ExecCtx&);
void cpu_permute_dev(const PermuteDevArgs&, const ExecCtx&);
void cpu_act_fwd_dev(const ActFwdDevArgs&, const ExecCtx&);
void cpu_act_bwd_dev(const ActBwdDevArgs&, const ExecCtx&);
void cpu_row_offsets(const RowOffsetsArgs&, const ExecCtx&);
void cpu_aux_loss_value(const AuxLossValueArgs&, const ExecCtx&);
void cpu_accumulate(const AccumulateArgs&, const ExecCtx&);
void cpu_scale_at(const AccumulateArgs&, const ExecCtx&);

}  // namespace moe
