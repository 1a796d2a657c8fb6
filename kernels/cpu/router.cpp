// PLACEHOLDER: replaced by the real kernels.
#include "kernels/cpu/cpu_kernels.h"
namespace moe {
void cpu_router_topk(const RouterTopkArgs&, const ExecCtx&) { MOE_THROW(ErrorCode::not_supported, "cpu_router_topk: not implemented yet"); }
void cpu_router_topk_bwd(const RouterTopkBwdArgs&, const ExecCtx&) { MOE_THROW(ErrorCode::not_supported, "cpu_router_topk_bwd: not implemented yet"); }
void cpu_aux_stats(const AuxStatsArgs&, const ExecCtx&) { MOE_THROW(ErrorCode::not_supported, "cpu_aux_stats: not implemented yet"); }
void cpu_aux_loss_bwd(const AuxLossBwdArgs&, const ExecCtx&) { MOE_THROW(ErrorCode::not_supported, "cpu_aux_loss_bwd: not implemented yet"); }
void cpu_z_loss_fwd(const ZLossArgs&, const ExecCtx&) { MOE_THROW(ErrorCode::not_supported, "cpu_z_loss_fwd: not implemented yet"); }
void cpu_z_loss_bwd(const ZLossArgs&, const ExecCtx&) { MOE_THROW(ErrorCode::not_supported, "cpu_z_loss_bwd: not implemented yet"); }
void cpu_capacity(const CapacityArgs&, const ExecCtx&) { MOE_THROW(ErrorCode::not_supported, "cpu_capacity: not implemented yet"); }
}
