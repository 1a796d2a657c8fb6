#include "moecore/dtype.h"

#include <cmath>

#include "moecore/error.h"

namespace moe {

size_t dtype_size(DType dt) {
  switch (dt) {
    case DType::f32: return 4;
    case DType::f64: return 8;
    case DType::bf16: return 2;
    case DType::f16: return 2;
    case DType::i32: return 4;
    case DType::i64: return 8;
    case DType::u8: return 1;
  }
  MOE_THROW(ErrorCode::internal, "dtype_size: unknown dtype ", static_cast<int>(dt));
}

const char* dtype_name(DType dt) {
  switch (dt) {
    case DType::f32: return "f32";
    case DType::f64: return "f64";
    case DType::bf16: return "bf16";
    case DType::f16: return "f16";
    case DType::i32: return "i32";
    case DType::i64: return "i64";
    case DType::u8: return "u8";
  }
  return "?";
}

DType dtype_from_name(const std::string& n) {
  if (n == "f32" || n == "fp32" || n == "float32" || n == "F32") return DType::f32;
  if (n == "f64" || n == "fp64" || n == "float64" || n == "F64") return DType::f64;
  if (n == "bf16" || n == "bfloat16" || n == "BF16") return DType::bf16;
  if (n == "f16" || n == "fp16" || n == "float16" || n == "F16") return DType::f16;
  if (n == "i32" || n == "int32" || n == "I32") return DType::i32;
  if (n == "i64" || n == "int64" || n == "I64") return DType::i64;
  if (n == "u8" || n == "uint8" || n == "U8" || n == "bool" || n == "BOOL") return DType::u8;
  MOE_THROW(ErrorCode::invalid_argument, "unknown dtype '", n,
            "': expected one of fp32, fp64, bf16, fp16, i32, i64, u8");
}

bool dtype_is_float(DType dt) {
  return dt == DType::f32 || dt == DType::f64 || dt == DType::bf16 || dt == DType::f16;
}

float f16_to_float(f16 v) {
  uint32_t sign = (v.bits >> 15) & 1u, exp = (v.bits >> 10) & 0x1fu, man = v.bits & 0x3ffu;
  float f;
  if (exp == 0) {
    f = std::ldexp(static_cast<float>(man), -24);
  } else if (exp == 31) {
    f = man ? NAN : INFINITY;
  } else {
    f = std::ldexp(static_cast<float>(man | 0x400u), static_cast<int>(exp) - 25);
  }
  return sign ? -f : f;
}

f16 float_to_f16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  uint32_t sign = (u >> 16) & 0x8000u;
  uint32_t a = u & 0x7fffffffu;
  if (a >= 0x7f800000u) return f16{static_cast<uint16_t>(sign | 0x7c00u | (a > 0x7f800000u ? 0x200u : 0u))};
  if (a >= 0x477ff000u) return f16{static_cast<uint16_t>(sign | 0x7c00u)};  // overflow to inf
  if (a < 0x38800000u) {  // subnormal or zero: round to nearest even at 2^-24
    float af;
    std::memcpy(&af, &a, 4);
    float scaled = af * 16777216.0f;  // exact multiple of 2^-24 units
    uint32_t m = static_cast<uint32_t>(std::nearbyint(scaled));
    return f16{static_cast<uint16_t>(sign | m)};
  }
  uint32_t exp = ((a >> 23) - 112) << 10;
  uint32_t man = (a >> 13) & 0x3ffu;
  uint32_t rest = a & 0x1fffu;
  uint32_t h = exp | man;
  if (rest > 0x1000u || (rest == 0x1000u && (h & 1u))) h += 1;
  return f16{static_cast<uint16_t>(sign | h)};
}

}  // namespace moe
