// libmoecore — element types.
// Storage types; compute is f32 (f64 where the storage is f64). bf16 and f16 are plain 16-bit
// payloads here: conversion helpers below, arithmetic happens after widening to float.
#pragma once
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>

namespace moe {

enum class DType : uint8_t { f32, f64, bf16, f16, i32, i64, u8 };

size_t dtype_size(DType dt);
const char* dtype_name(DType dt);  // "f32", "f64", "bf16", ...
// Parses "f32"/"float32"/"fp32", ... Throws moe::Error naming the accepted spellings.
DType dtype_from_name(const std::string& name);
bool dtype_is_float(DType dt);

// bfloat16: the top 16 bits of an IEEE float; round-to-nearest-even on conversion.
struct bf16 {
  uint16_t bits = 0;
};
struct f16 {
  uint16_t bits = 0;
};

inline float bf16_to_float(bf16 v) {
  uint32_t u = static_cast<uint32_t>(v.bits) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline bf16 float_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7f800000u) == 0x7f800000u && (u & 0x007fffffu)) return bf16{uint16_t((u >> 16) | 0x40)};  // NaN stays NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return bf16{static_cast<uint16_t>(u >> 16)};
}
float f16_to_float(f16 v);
f16 float_to_f16(float f);

// The DType of a C++ element type, for typed accessors.
template <class T> struct dtype_of;
template <> struct dtype_of<float> { static constexpr DType value = DType::f32; };
template <> struct dtype_of<double> { static constexpr DType value = DType::f64; };
template <> struct dtype_of<bf16> { static constexpr DType value = DType::bf16; };
template <> struct dtype_of<f16> { static constexpr DType value = DType::f16; };
template <> struct dtype_of<int32_t> { static constexpr DType value = DType::i32; };
template <> struct dtype_of<int64_t> { static constexpr DType value = DType::i64; };
template <> struct dtype_of<uint8_t> { static constexpr DType value = DType::u8; };

}  // namespace moe
