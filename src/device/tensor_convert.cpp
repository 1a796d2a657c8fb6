// Tensor methods that run a kernel (kept out of src/core so core does not depend on the ops).
#include "device/ops.h"
#include "moecore/tensor.h"

namespace moe {

Tensor Tensor::to_dtype(DType dtype) const {
  if (dtype == dtype_) return clone();
  return ops::cast(*this, dtype);
}

}  // namespace moe
