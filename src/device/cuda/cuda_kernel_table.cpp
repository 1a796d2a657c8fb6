// The CUDA backend's kernel table: one entry per op of kernels/ops.h.
#include "device/cuda/cuda_backend.h"
#include "kernels/cuda/cuda_kernels.h"

namespace moe {

const KernelTable& cuda_kernel_table() {
  static const KernelTable table = [] {
    KernelTable t;
    t.gemm = cuda_gemm;
    t.grouped_gemm = cuda_grouped_gemm;
    t.router_topk = cuda_router_topk;
    t.router_topk_bwd = cuda_router_topk_bwd;
    t.aux_stats = cuda_aux_stats;
    t.aux_loss_bwd = cuda_aux_loss_bwd;
    t.z_loss_fwd = cuda_z_loss_fwd;
    t.z_loss_bwd = cuda_z_loss_bwd;
    t.capacity = cuda_capacity;
    t.routing_counts = cuda_routing_counts;
    t.permute_index = cuda_permute_index;
    t.permute = cuda_permute;
    t.unpermute = cuda_unpermute;
    t.chunk_sort = cuda_chunk_sort;
    t.columns = cuda_columns;
    t.act_fwd = cuda_act_fwd;
    t.act_bwd = cuda_act_bwd;
    t.axpby = cuda_axpby;
    t.mul = cuda_mul;
    t.unary = cuda_unary;
    t.cast = cuda_cast;
    t.scale_rows = cuda_scale_rows;
    t.row_dot = cuda_row_dot;
    t.jitter = cuda_jitter;
    t.mse = cuda_mse;
    t.adam = cuda_adam;
    t.sgd = cuda_sgd;
    t.norm_fwd = cuda_norm_fwd;
    t.norm_bwd = cuda_norm_bwd;
    t.rope = cuda_rope;
    t.embedding_fwd = cuda_embedding_fwd;
    t.embedding_bwd = cuda_embedding_bwd;
    t.xent_max = cuda_xent_max;
    t.xent_sum = cuda_xent_sum;
    t.xent_bwd = cuda_xent_bwd;
    t.qkv = cuda_qkv;
    t.attn_fwd = cuda_attn_fwd;
    t.attn_bwd = cuda_attn_bwd;
    t.grouped_gemm_dev = cuda_grouped_gemm_dev;
    t.permute_dev = cuda_permute_dev;
    t.act_fwd_dev = cuda_act_fwd_dev;
    t.act_bwd_dev = cuda_act_bwd_dev;
    t.row_offsets = cuda_row_offsets;
    t.aux_loss_value = cuda_aux_loss_value;
    t.accumulate = cuda_accumulate;
    t.scale_at = cuda_scale_at;
    return t;
  }();
  return table;
}

}  // namespace moe
