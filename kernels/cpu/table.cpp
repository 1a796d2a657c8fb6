#include "kernels/cpu/cpu_kernels.h"

namespace moe {

const KernelTable& cpu_kernel_table() {
  static const KernelTable table = [] {
    KernelTable t;
    t.gemm = cpu_gemm;
    t.grouped_gemm = cpu_grouped_gemm;
    t.router_topk = cpu_router_topk;
    t.router_topk_bwd = cpu_router_topk_bwd;
    t.aux_stats = cpu_aux_stats;
    t.aux_loss_bwd = cpu_aux_loss_bwd;
    t.z_loss_fwd = cpu_z_loss_fwd;
    t.z_loss_bwd = cpu_z_loss_bwd;
    t.capacity = cpu_capacity;
    t.routing_counts = cpu_routing_counts;
    t.permute_index = cpu_permute_index;
    t.permute = cpu_permute;
    t.unpermute = cpu_unpermute;
    t.chunk_sort = cpu_chunk_sort;
    t.columns = cpu_columns;
    t.act_fwd = cpu_act_fwd;
    t.act_bwd = cpu_act_bwd;
    t.axpby = cpu_axpby;
    t.mul = cpu_mul;
    t.unary = cpu_unary;
    t.cast = cpu_cast;
    t.scale_rows = cpu_scale_rows;
    t.row_dot = cpu_row_dot;
    t.jitter = cpu_jitter;
    t.mse = cpu_mse;
    t.adam = cpu_adam;
    t.sgd = cpu_sgd;
    t.norm_fwd = cpu_norm_fwd;
    t.norm_bwd = cpu_norm_bwd;
    t.rope = cpu_rope;
    t.embedding_fwd = cpu_embedding_fwd;
    t.embedding_bwd = cpu_embedding_bwd;
    t.xent_max = cpu_xent_max;
    t.xent_sum = cpu_xent_sum;
    t.xent_bwd = cpu_xent_bwd;
    t.qkv = cpu_qkv;
    t.attn_fwd = cpu_attn_fwd;
    t.attn_bwd = cpu_attn_bwd;
    t.grouped_gemm_dev = cpu_grouped_gemm_dev;
    t.permute_dev = cpu_permute_dev;
    t.act_fwd_dev = cpu_act_fwd_dev;
    t.act_bwd_dev = cpu_act_bwd_dev;
    t.row_offsets = cpu_row_offsets;
    t.aux_loss_value = cpu_aux_loss_value;
    t.accumulate = cpu_accumulate;
    t.scale_at = cpu_scale_at;
    return t;
  }();
  return table;
}

}  // namespace moe
