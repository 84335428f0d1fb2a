// The exact weighted average of integer and bool tensors, one element at a
// time, shared by the CPU (ops.cpp) and CUDA (cuda/kernels.cu) paths so both
// give the same bits by construction. No torch headers.
//
// out = round_half_even(sum_k q_k x_k / sum_k q_k) with integer weights q_k >= 0
// and sum_k q_k < 2^63, computed in 128-bit integers: |sum_k q_k x_k| <
// 2^63 * 2^63 = 2^126 for any int64 inputs, so nothing can overflow and no
// range check (no host sync) is needed. The result is a convex combination of
// the inputs, so it fits their dtype. Bool: values 0/1, so the result is the
// weighted majority; an exact tie (0.5) rounds to even, i.e. to False.
#pragma once
#include <cstdint>

#if defined(__CUDACC__)
#define FEDSQ_HD __host__ __device__ __forceinline__
#else
#define FEDSQ_HD inline
#endif

namespace fedsq {

enum class IType : int32_t { i8 = 0, u8 = 1, i16 = 2, i32 = 3, i64 = 4, b8 = 5 };

FEDSQ_HD int64_t int_load(const void* p, int64_t i, IType t) {
  switch (t) {
    case IType::i8: return static_cast<const int8_t*>(p)[i];
    case IType::u8: return static_cast<const uint8_t*>(p)[i];
    case IType::i16: return static_cast<const int16_t*>(p)[i];
    case IType::i32: return static_cast<const int32_t*>(p)[i];
    case IType::i64: return static_cast<const int64_t*>(p)[i];
    case IType::b8: return static_cast<const uint8_t*>(p)[i] != 0;  // torch bools are 0/1 bytes
  }
  return 0;
}

FEDSQ_HD void int_store(void* p, int64_t i, IType t, int64_t v) {
  switch (t) {
    case IType::i8: static_cast<int8_t*>(p)[i] = static_cast<int8_t>(v); break;
    case IType::u8: static_cast<uint8_t*>(p)[i] = static_cast<uint8_t>(v); break;
    case IType::i16: static_cast<int16_t*>(p)[i] = static_cast<int16_t>(v); break;
    case IType::i32: static_cast<int32_t*>(p)[i] = static_cast<int32_t>(v); break;
    case IType::i64: static_cast<int64_t*>(p)[i] = v; break;
    case IType::b8: static_cast<uint8_t*>(p)[i] = static_cast<uint8_t>(v != 0); break;
  }
}

// round_half_even(s / q) for q > 0 (floor division, then the remainder decides).
FEDSQ_HD int64_t round_div_even(__int128 s, int64_t q) {
  __int128 quot = s / q, rem = s % q;  // truncated toward zero
  if (rem < 0) {
    rem += q;
    quot -= 1;
  }
  const __int128 twice = rem * 2;
  if (twice > q || (twice == q && (quot & 1) != 0)) quot += 1;
  return static_cast<int64_t>(quot);
}

// One element of the average over K clients (xs[k] is client k's tensor).
FEDSQ_HD int64_t int_average_at(const void* const* xs, const long long* q, int64_t K, long long total, int64_t i,
                                IType t) {
  __int128 s = 0;
  for (int64_t k = 0; k < K; ++k) s += static_cast<__int128>(q[k]) * int_load(xs[k], i, t);
  return round_div_even(s, total);
}

}  // namespace fedsq
