// The CUDA backend's kernels, one per KernelTable entry (kernels/ops.h is the contract; the CPU
// kernels in kernels/cpu/ are the reference they are tested against). Plain declarations: no CUDA
// types, so src/device/cuda/cuda_kernel_table.cpp can build the table with the host compiler.
#pragma once
#include "kernels/ops.h"

namespace moe {

// gemm.cu
void cuda_gemm(const GemmArgs&, const ExecCtx&);
void cuda_grouped_gemm(const GroupedGemmArgs&, const ExecCtx&);
// router.cu
void cuda_router_topk(const RouterTopkArgs&, const ExecCtx&);
void cuda_router_topk_bwd(const RouterTopkBwdArgs&, const ExecCtx&);
void cuda_aux_stats(const AuxStatsArgs&, const ExecCtx&);
void cuda_aux_loss_bwd(const AuxLossBwdArgs&, const ExecCtx&);
void cuda_z_loss_fwd(const ZLossArgs&, const ExecCtx&);
void cuda_z_loss_bwd(const ZLossArgs&, const ExecCtx&);
void cuda_capacity(const CapacityArgs&, const ExecCtx&);
// permute.cu
void cuda_routing_counts(const RoutingCountsArgs&, const ExecCtx&);
void cuda_permute_index(const PermuteIndexArgs&, const ExecCtx&);
void cuda_permute(const PermuteArgs&, const ExecCtx&);
void cuda_unpermute(const UnpermuteArgs&, const ExecCtx&);
void cuda_chunk_sort(const ChunkSortArgs&, const ExecCtx&);
// columns.cu
void cuda_columns(const ColumnsArgs&, const ExecCtx&);
// activation.cu
void cuda_act_fwd(const ActFwdArgs&, const ExecCtx&);
void cuda_act_bwd(const ActBwdArgs&, const ExecCtx&);
void cuda_act_fwd_dev(const ActFwdDevArgs&, const ExecCtx&);
void cuda_act_bwd_dev(const ActBwdDevArgs&, const ExecCtx&);
// elementwise.cu
void cuda_axpby(const ElementwiseArgs&, const ExecCtx&);
void cuda_mul(const ElementwiseArgs&, const ExecCtx&);
void cuda_unary(const ElementwiseArgs&, const ExecCtx&);
void cuda_cast(const CastArgs&, const ExecCtx&);
void cuda_scale_rows(const ScaleRowsArgs&, const ExecCtx&);
void cuda_row_dot(const RowDotArgs&, const ExecCtx&);
void cuda_jitter(const JitterArgs&, const ExecCtx&);
void cuda_mse(const MseArgs&, const ExecCtx&);
void cuda_adam(const AdamArgs&, const ExecCtx&);
void cuda_sgd(const SgdArgs&, const ExecCtx&);
// model_ops.cu (norm, rope, embedding, cross entropy, qkv split)
void cuda_norm_fwd(const NormFwdArgs&, const ExecCtx&);
void cuda_norm_bwd(const NormBwdArgs&, const ExecCtx&);
void cuda_rope(const RopeArgs&, const ExecCtx&);
void cuda_embedding_fwd(const EmbeddingArgs&, const ExecCtx&);
void cuda_embedding_bwd(const EmbeddingArgs&, const ExecCtx&);
void cuda_xent_max(const XentArgs&, const ExecCtx&);
void cuda_xent_sum(const XentArgs&, const ExecCtx&);
void cuda_xent_bwd(const XentArgs&, const ExecCtx&);
void cuda_qkv(const QkvArgs&, const ExecCtx&);
// attention.cu
void cuda_attn_fwd(const AttnFwdArgs&, const ExecCtx&);
void cuda_attn_bwd(const AttnBwdArgs&, const ExecCtx&);

// nosync.cu (the host-sync-free path)
void cuda_grouped_gemm_dev(const GroupedGemmDevArgs&, const ExecCtx&);
void cuda_permute_dev(const PermuteDevArgs&, const ExecCtx&);
void cuda_row_offsets(const RowOffsetsArgs&, const ExecCtx&);
void cuda_aux_loss_value(const AuxLossValueArgs&, const ExecCtx&);
void cuda_accumulate(const AccumulateArgs&, const ExecCtx&);
void cuda_scale_at(const AccumulateArgs&, const ExecCtx&);

}  // namespace moe
