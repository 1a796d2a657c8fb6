// PLACEHOLDER: replaced by the real kernels.
#include "kernels/cpu/cpu_kernels.h"
namespace moe {
void cpu_act_fwd(const ActFwdArgs&, const ExecCtx&) { MOE_THROW(ErrorCode::not_supported, "cpu_act_fwd: not implemented yet"); }
void cpu_act_bwd(const ActBwdArgs&, const ExecCtx&) { MOE_THROW(ErrorCode::not_supported, "cpu_act_bwd: not implemented yet"); }
}
