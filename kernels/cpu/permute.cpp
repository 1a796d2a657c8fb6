// PLACEHOLDER: replaced by the real kernels.
#include "kernels/cpu/cpu_kernels.h"
namespace moe {
void cpu_routing_counts(const RoutingCountsArgs&, const ExecCtx&) { MOE_THROW(ErrorCode::not_supported, "cpu_routing_counts: not implemented yet"); }
void cpu_permute_index(const PermuteIndexArgs&, const ExecCtx&) { MOE_THROW(ErrorCode::not_supported, "cpu_permute_index: not implemented yet"); }
void cpu_permute(const PermuteArgs&, const ExecCtx&) { MOE_THROW(ErrorCode::not_supported, "cpu_permute: not implemented yet"); }
void cpu_unpermute(const UnpermuteArgs&, const ExecCtx&) { MOE_THROW(ErrorCode::not_supported, "cpu_unpermute: not implemented yet"); }
void cpu_chunk_sort(const ChunkSortArgs&, const ExecCtx&) { MOE_THROW(ErrorCode::not_supported, "cpu_chunk_sort: not implemented yet"); }
}
