// One implementation of every CPU kernel, compiled three times:
// kernels_avx512.cpp (FEDSQ_ISA 2), kernels_avx2.cpp (1), kernels_scalar.cpp (0).
// Each includes this file inside its own namespace, so nothing compiled with
// AVX-512 flags can leak into code that runs on a CPU without it.
//
// Semantics pinned to eager PyTorch (see fedsq_fast/reference.py):
// mask = real compare z > 0 (ordered: +0, -0 and NaN give 0); y = z_q * mask
// as a multiply (NaN/Inf propagate, -x * 0 = -0); half types are computed in
// float32 and rounded to nearest even. Built with -ffp-contract=off so mul+add
// is never silently fused (the epilogue must match the eager reference), while
// the reductions use explicit fma on every ISA (identical results).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "kernels.h"

#if FEDSQ_ISA > 0 && !defined(FEDSQ_EMULATED_SIMD)
#include <immintrin.h>  // (tests/ops/emulated/ compiles this file against SIMDe instead)
#endif

struct f16_t { uint16_t x; };
struct bf16_t { uint16_t x; };

template <class T> struct acc_of { using type = float; };
template <> struct acc_of<double> { using type = double; };
template <class T> using acc_t = typename acc_of<T>::type;

static inline float u2f(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }
static inline uint32_t f2u(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }

// ---- scalar conversions (exact, round to nearest even) ----
static inline float to_acc(float v) { return v; }
static inline double to_acc(double v) { return v; }
static inline float to_acc(bf16_t v) { return u2f(uint32_t(v.x) << 16); }
static inline float to_acc(f16_t h) {
  uint32_t sign = uint32_t(h.x & 0x8000u) << 16, exp = (h.x >> 10) & 0x1f, man = h.x & 0x3ffu;
  if (exp == 0) {  // zero or subnormal: man * 2^-24, exact in float
    float f = float(man) * (1.0f / 16777216.0f);
    return sign ? -f : f;
  }
  if (exp == 31) return u2f(sign | 0x7f800000u | (man << 13));
  return u2f(sign | ((exp + 112) << 23) | (man << 13));
}
template <class T> static inline T from_acc(acc_t<T> v);
template <> inline float from_acc<float>(float v) { return v; }
template <> inline double from_acc<double>(double v) { return v; }
template <> inline bf16_t from_acc<bf16_t>(float f) {
  uint32_t u = f2u(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return {uint16_t((u >> 16) | 0x40)};  // quiet NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return {uint16_t(u >> 16)};
}
template <> inline f16_t from_acc<f16_t>(float f) {
  uint32_t u = f2u(f), sign = (u >> 16) & 0x8000u, a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return {uint16_t(sign | 0x7e00u)};     // NaN
  if (a >= 0x477ff000u) return {uint16_t(sign | 0x7c00u)};    // >= 65520 rounds to Inf
  if (a < 0x38800000u) {                                      // below 2^-14: subnormal half
    uint32_t m = uint32_t(std::nearbyint(u2f(a) * 16777216.0f));  // exact scale, RNE
    return {uint16_t(sign | m)};
  }
  uint32_t r = a + 0xfffu + ((a >> 13) & 1u) - 0x38000000u;  // rebias 127 -> 15, RNE
  return {uint16_t(sign | (r >> 13))};
}

template <class T> static inline acc_t<T> ld(const T* p, int64_t i) { return to_acc(p[i]); }
template <class T> static inline void st(T* p, int64_t i, acc_t<T> v) { p[i] = from_acc<T>(v); }
template <class A> static inline A fma_s(A a, A b, A c) { return std::fma(a, b, c); }

// Output above this size bypasses the caches (streaming stores): it will not
// be re-read soon, and skipping the read-for-ownership saves a third of traffic.
static constexpr int64_t kStreamBytes = int64_t(16) << 20;

// ---------------------------------------------------------------------------
// Vector layer: float32 lanes, VW of them.
#if FEDSQ_ISA == 2
static constexpr int VW = 16;
using VF = __m512;
using VM = __mmask16;
template <class T> static inline VF vload(const T* p);
template <> inline VF vload<float>(const float* p) { return _mm512_loadu_ps(p); }
template <> inline VF vload<f16_t>(const f16_t* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
template <> inline VF vload<bf16_t>(const bf16_t* p) {
  __m512i u = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(u, 16));
}
template <class T, bool NT> static inline void vstore(T* p, VF v);
template <> inline void vstore<float, false>(float* p, VF v) { _mm512_storeu_ps(p, v); }
template <> inline void vstore<float, true>(float* p, VF v) { _mm512_stream_ps(p, v); }
static inline __m256i to_f16_bits(VF v) { return _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
static inline __m256i to_bf16_bits(VF v) {
  __m512i u = _mm512_castps_si512(v);
  __m512i hi = _mm512_srli_epi32(u, 16);
  __m512i r = _mm512_srli_epi32(
      _mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7fff), _mm512_and_si512(hi, _mm512_set1_epi32(1)))), 16);
  __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  r = _mm512_mask_mov_epi32(r, nan, _mm512_or_si512(hi, _mm512_set1_epi32(0x40)));
  return _mm512_cvtepi32_epi16(r);
}
template <> inline void vstore<f16_t, false>(f16_t* p, VF v) { _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), to_f16_bits(v)); }
template <> inline void vstore<f16_t, true>(f16_t* p, VF v) { _mm256_stream_si256(reinterpret_cast<__m256i*>(p), to_f16_bits(v)); }
template <> inline void vstore<bf16_t, false>(bf16_t* p, VF v) { _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), to_bf16_bits(v)); }
template <> inline void vstore<bf16_t, true>(bf16_t* p, VF v) { _mm256_stream_si256(reinterpret_cast<__m256i*>(p), to_bf16_bits(v)); }
static inline VF vset1(float x) { return _mm512_set1_ps(x); }
static inline VM vgt0(VF v) { return _mm512_cmp_ps_mask(v, _mm512_setzero_ps(), _CMP_GT_OQ); }
static inline uint32_t vbits(VM m) { return uint32_t(m); }
static inline VM vmask(uint32_t b) { return __mmask16(b & 0xffffu); }
static inline VF v01(VM m) { return _mm512_maskz_mov_ps(m, _mm512_set1_ps(1.0f)); }
static inline VF vmul(VF a, VF b) { return _mm512_mul_ps(a, b); }
static inline VF vadd(VF a, VF b) { return _mm512_add_ps(a, b); }
static inline VF vfma(VF a, VF b, VF c) { return _mm512_fmadd_ps(a, b, c); }
static inline VF vrelu(VF t) { return _mm512_max_ps(_mm512_setzero_ps(), t); }  // NaN -> t
static inline VF vloadf(const float* p) { return _mm512_loadu_ps(p); }
static inline void vstoref(float* p, VF v) { _mm512_storeu_ps(p, v); }
static inline VF vsub(VF a, VF b) { return _mm512_sub_ps(a, b); }
// min/max(a, b) return b when a is NaN (the instruction's rule): NaN lanes of a are skipped
static inline VF vmin_nan(VF a, VF b) { return _mm512_min_ps(a, b); }
static inline VF vmax_nan(VF a, VF b) { return _mm512_max_ps(a, b); }
// soft gates
static inline VF vdiv(VF a, VF b) { return _mm512_div_ps(a, b); }
static inline VF vabs(VF a) {
  return _mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(a), _mm512_set1_epi32(0x7fffffff)));
}
static inline VF vsel_ge0(VF z, VF a, VF b) {  // z >= 0 ? a : b (ordered: NaN -> b)
  return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(z, _mm512_setzero_ps(), _CMP_GE_OQ), b, a);
}
static inline VF vsel_gt(VF p, VF q, VF a, VF b) {  // p > q ? a : b (ordered)
  return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(p, q, _CMP_GT_OQ), b, a);
}
static inline void vpow2(VF n, VF& a, VF& b) {  // a * b = 2^n, both factors normal, n integral
  const __m512i ni = _mm512_cvtps_epi32(n);
  const __m512i n1 = _mm512_srai_epi32(ni, 1), n2 = _mm512_sub_epi32(ni, n1);
  const __m512i bias = _mm512_set1_epi32(127);
  a = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(n1, bias), 23));
  b = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(n2, bias), 23));
}
template <class T> static inline VF vquant(VF v);  // v rounded to T and back (a stored gate)
template <> inline VF vquant<float>(VF v) { return v; }
template <> inline VF vquant<f16_t>(VF v) { return _mm512_cvtph_ps(to_f16_bits(v)); }
template <> inline VF vquant<bf16_t>(VF v) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(to_bf16_bits(v)), 16));
}
#elif FEDSQ_ISA == 1
static constexpr int VW = 8;
using VF = __m256;
using VM = __m256;
template <class T> static inline VF vload(const T* p);
template <> inline VF vload<float>(const float* p) { return _mm256_loadu_ps(p); }
template <> inline VF vload<f16_t>(const f16_t* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
template <> inline VF vload<bf16_t>(const bf16_t* p) {
  __m256i u = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(u, 16));
}
template <class T, bool NT> static inline void vstore(T* p, VF v);
template <> inline void vstore<float, false>(float* p, VF v) { _mm256_storeu_ps(p, v); }
template <> inline void vstore<float, true>(float* p, VF v) { _mm256_stream_ps(p, v); }
static inline __m128i to_f16_bits(VF v) { return _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
static inline __m128i to_bf16_bits(VF v) {
  __m256i u = _mm256_castps_si256(v);
  __m256i hi = _mm256_srli_epi32(u, 16);
  __m256i r = _mm256_srli_epi32(
      _mm256_add_epi32(u, _mm256_add_epi32(_mm256_set1_epi32(0x7fff), _mm256_and_si256(hi, _mm256_set1_epi32(1)))), 16);
  __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  r = _mm256_blendv_epi8(r, _mm256_or_si256(hi, _mm256_set1_epi32(0x40)), nan);
  return _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
}
template <> inline void vstore<f16_t, false>(f16_t* p, VF v) { _mm_storeu_si128(reinterpret_cast<__m128i*>(p), to_f16_bits(v)); }
template <> inline void vstore<f16_t, true>(f16_t* p, VF v) { _mm_stream_si128(reinterpret_cast<__m128i*>(p), to_f16_bits(v)); }
template <> inline void vstore<bf16_t, false>(bf16_t* p, VF v) { _mm_storeu_si128(reinterpret_cast<__m128i*>(p), to_bf16_bits(v)); }
template <> inline void vstore<bf16_t, true>(bf16_t* p, VF v) { _mm_stream_si128(reinterpret_cast<__m128i*>(p), to_bf16_bits(v)); }
static inline VF vset1(float x) { return _mm256_set1_ps(x); }
static inline VM vgt0(VF v) { return _mm256_cmp_ps(v, _mm256_setzero_ps(), _CMP_GT_OQ); }
static inline uint32_t vbits(VM m) { return uint32_t(_mm256_movemask_ps(m)); }
static inline VM vmask(uint32_t b) {
  const __m256i lane = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
  __m256i x = _mm256_and_si256(_mm256_set1_epi32(int(b & 0xffu)), lane);
  return _mm256_castsi256_ps(_mm256_cmpeq_epi32(x, lane));
}
static inline VF v01(VM m) { return _mm256_and_ps(m, _mm256_set1_ps(1.0f)); }
static inline VF vmul(VF a, VF b) { return _mm256_mul_ps(a, b); }
static inline VF vadd(VF a, VF b) { return _mm256_add_ps(a, b); }
static inline VF vfma(VF a, VF b, VF c) { return _mm256_fmadd_ps(a, b, c); }
static inline VF vrelu(VF t) { return _mm256_max_ps(_mm256_setzero_ps(), t); }  // NaN -> t
static inline VF vloadf(const float* p) { return _mm256_loadu_ps(p); }
static inline void vstoref(float* p, VF v) { _mm256_storeu_ps(p, v); }
static inline VF vsub(VF a, VF b) { return _mm256_sub_ps(a, b); }
static inline VF vmin_nan(VF a, VF b) { return _mm256_min_ps(a, b); }  // b where a is NaN
static inline VF vmax_nan(VF a, VF b) { return _mm256_max_ps(a, b); }
// soft gates
static inline VF vdiv(VF a, VF b) { return _mm256_div_ps(a, b); }
static inline VF vabs(VF a) { return _mm256_and_ps(a, _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff))); }
static inline VF vsel_ge0(VF z, VF a, VF b) {  // z >= 0 ? a : b (ordered: NaN -> b)
  return _mm256_blendv_ps(b, a, _mm256_cmp_ps(z, _mm256_setzero_ps(), _CMP_GE_OQ));
}
static inline VF vsel_gt(VF p, VF q, VF a, VF b) {  // p > q ? a : b (ordered)
  return _mm256_blendv_ps(b, a, _mm256_cmp_ps(p, q, _CMP_GT_OQ));
}
static inline void vpow2(VF n, VF& a, VF& b) {  // a * b = 2^n, both factors normal, n integral
  const __m256i ni = _mm256_cvtps_epi32(n);
  const __m256i n1 = _mm256_srai_epi32(ni, 1), n2 = _mm256_sub_epi32(ni, n1);
  const __m256i bias = _mm256_set1_epi32(127);
  a = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(n1, bias), 23));
  b = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(n2, bias), 23));
}
template <class T> static inline VF vquant(VF v);  // v rounded to T and back (a stored gate)
template <> inline VF vquant<float>(VF v) { return v; }
template <> inline VF vquant<f16_t>(VF v) { return _mm256_cvtph_ps(to_f16_bits(v)); }
template <> inline VF vquant<bf16_t>(VF v) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(to_bf16_bits(v)), 16));
}
#endif

#if FEDSQ_ISA > 0
static inline void stream_fence() { _mm_sfence(); }
// Vector paths cover float32/float16/bfloat16; float64 (gradcheck only) is scalar.
template <class T> static constexpr bool kVec = !std::is_same<T, double>::value;
#else
static inline void stream_fence() {}
template <class T> static constexpr bool kVec = false;
#endif

static inline bool aligned64(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 63u) == 0; }

// ---------------------------------------------------------------------------
// Scalar word kernels (tails, float64, and the scalar ISA).
template <class T>
static inline void pack_word_s(const T* zs, uint32_t* bits, int64_t base, int64_t end) {
  uint32_t word = 0;
  for (int64_t i = base; i < end; ++i) word |= uint32_t(ld(zs, i) > acc_t<T>(0)) << (i - base);
  bits[base >> 5] = word;
}
template <class T>
static inline void apply_word_s(const T* zq, const uint32_t* bits, T* y, int64_t base, int64_t end) {
  using A = acc_t<T>;
  const uint32_t word = bits[base >> 5];
  for (int64_t i = base; i < end; ++i) st(y, i, ld(zq, i) * A((word >> (i - base)) & 1u));
}
template <class T>
static inline void gate_word_s(const T* zq, const T* zs, T* y, uint32_t* bits, int64_t base, int64_t end) {
  using A = acc_t<T>;
  uint32_t word = 0;
  for (int64_t i = base; i < end; ++i) {
    const bool m = ld(zs, i) > A(0);
    st(y, i, ld(zq, i) * A(m));
    word |= uint32_t(m) << (i - base);
  }
  bits[base >> 5] = word;
}

// ---------------------------------------------------------------------------
template <class T>
static void pack_range(const T* zs, uint32_t* bits, int64_t n, int64_t w0, int64_t w1) {
  for (int64_t w = w0; w < w1; ++w) {
    const int64_t base = w * 32;
#if FEDSQ_ISA > 0
    if constexpr (kVec<T>) {
      if (base + 32 <= n) {
        uint32_t word = 0;
        for (int j = 0; j < 32; j += VW) word |= vbits(vgt0(vload(zs + base + j))) << j;
        bits[w] = word;
        continue;
      }
    }
#endif
    pack_word_s(zs, bits, base, std::min(base + 32, n));
  }
}

template <class T, bool NT>
static void apply_range_t(const T* zq, const uint32_t* bits, T* y, int64_t n, int64_t w0, int64_t w1) {
  for (int64_t w = w0; w < w1; ++w) {
    const int64_t base = w * 32;
#if FEDSQ_ISA > 0
    if constexpr (kVec<T>) {
      if (base + 32 <= n) {
        const uint32_t word = bits[w];
        for (int j = 0; j < 32; j += VW)
          vstore<T, NT>(y + base + j, vmul(vload(zq + base + j), v01(vmask(word >> j))));
        continue;
      }
    }
#endif
    apply_word_s(zq, bits, y, base, std::min(base + 32, n));
  }
  if (NT) stream_fence();
}

template <class T, bool NT>
static void gate_range_t(const T* zq, const T* zs, T* y, uint32_t* bits, int64_t n, int64_t w0, int64_t w1) {
  for (int64_t w = w0; w < w1; ++w) {
    const int64_t base = w * 32;
#if FEDSQ_ISA > 0
    if constexpr (kVec<T>) {
      if (base + 32 <= n) {
        uint32_t word = 0;
        for (int j = 0; j < 32; j += VW) {
          const VM m = vgt0(vload(zs + base + j));
          vstore<T, NT>(y + base + j, vmul(vload(zq + base + j), v01(m)));
          word |= vbits(m) << j;
        }
        bits[w] = word;
        continue;
      }
    }
#endif
    gate_word_s(zq, zs, y, bits, base, std::min(base + 32, n));
  }
  if (NT) stream_fence();
}

template <class T>
static bool use_stream(const void* out, int64_t n) {
  return kVec<T> && aligned64(out) && n * int64_t(sizeof(T)) >= kStreamBytes;
}

template <class T>
static void apply_range(const T* zq, const uint32_t* bits, T* y, int64_t n, int64_t w0, int64_t w1) {
  if (use_stream<T>(y, n)) apply_range_t<T, true>(zq, bits, y, n, w0, w1);
  else apply_range_t<T, false>(zq, bits, y, n, w0, w1);
}
template <class T>
static void gate_range(const T* zq, const T* zs, T* y, uint32_t* bits, int64_t n, int64_t w0, int64_t w1) {
  if (use_stream<T>(y, n)) gate_range_t<T, true>(zq, zs, y, bits, n, w0, w1);
  else gate_range_t<T, false>(zq, zs, y, bits, n, w0, w1);
}

// ---------------------------------------------------------------------------
// Structural epilogue: t = z*scale[c] + shift[c]; h = max(0, t); bits = t > 0.
template <class T>
static void epilogue_range(const T* z, T* h, uint32_t* bits, const acc_t<T>* sc_ext, const acc_t<T>* sh_ext,
                           int64_t C, int64_t inner, int64_t n, int64_t w0, int64_t w1) {
  using A = acc_t<T>;
  alignas(64) A sc[32], sh[32];
  for (int64_t w = w0; w < w1; ++w) {
    const int64_t base = w * 32, end = std::min(base + 32, n);
    const A* psc;
    const A* psh;
    bool uniform = false;
    if (inner == 1) {  // channel-innermost: lanes read the extended tables directly
      const int64_t c0 = base % C;
      psc = sc_ext + c0;
      psh = sh_ext + c0;
    } else {
      int64_t r = base % inner, c = (base / inner) % C;
      if (r + 32 <= inner) {
        uniform = true;
        sc[0] = sc_ext[c];
        sh[0] = sh_ext[c];
      } else {
        for (int64_t j = 0; j < end - base; ++j) {
          sc[j] = sc_ext[c];
          sh[j] = sh_ext[c];
          if (++r == inner) { r = 0; if (++c == C) c = 0; }
        }
      }
      psc = sc;
      psh = sh;
    }
#if FEDSQ_ISA > 0
    if constexpr (kVec<T>) {
      if (end - base == 32) {
        uint32_t word = 0;
        const VF usc = vset1(psc[0]), ush = vset1(psh[0]);
        for (int j = 0; j < 32; j += VW) {
          const VF vs = uniform ? usc : vloadf(psc + j);
          const VF vh = uniform ? ush : vloadf(psh + j);
          const VF t = vadd(vmul(vload(z + base + j), vs), vh);
          word |= vbits(vgt0(t)) << j;
          vstore<T, false>(h + base + j, vrelu(t));
        }
        bits[w] = word;
        continue;
      }
    }
#endif
    uint32_t word = 0;
    for (int64_t i = base; i < end; ++i) {
      const int64_t j = uniform ? 0 : i - base;
      const A t = ld(z, i) * psc[j] + psh[j];
      word |= uint32_t(t > A(0)) << (i - base);
      st(h, i, (A(0) > t) ? A(0) : t);  // same as max(0, t): NaN and -0 pass through
    }
    bits[w] = word;
  }
}

// ---------------------------------------------------------------------------
// Weighted sum over K clients, tiled so the accumulator stays in L1.
static constexpr int64_t kTile = 4096;

template <class T, bool NT>
static void wsum_range_t(const void* const* xs, const double* w, int64_t K, T* out, int64_t i0, int64_t i1) {
  using A = acc_t<T>;
  alignas(64) A acc[kTile];
  for (int64_t t0 = i0; t0 < i1; t0 += kTile) {
    const int64_t len = std::min(kTile, i1 - t0);
    for (int64_t k = 0; k < K; ++k) {
      const T* x = static_cast<const T*>(xs[k]) + t0;
      const A wk = A(w[k]);
      int64_t j = 0;
#if FEDSQ_ISA > 0
      if constexpr (kVec<T>) {
        const VF vw = vset1(wk);
        if (k == 0)
          for (; j + VW <= len; j += VW) vstoref(acc + j, vmul(vw, vload(x + j)));
        else
          for (; j + VW <= len; j += VW) vstoref(acc + j, vfma(vw, vload(x + j), vloadf(acc + j)));
      }
#endif
      if (k == 0)
        for (; j < len; ++j) acc[j] = wk * ld(x, j);
      else
        for (; j < len; ++j) acc[j] = fma_s<A>(wk, ld(x, j), acc[j]);
    }
    int64_t j = 0;
#if FEDSQ_ISA > 0
    if constexpr (kVec<T>) {
      for (; j + VW <= len; j += VW) vstore<T, NT>(out + t0 + j, vloadf(acc + j));
    }
#endif
    for (; j < len; ++j) st(out, t0 + j, acc[j]);
  }
  if (NT) stream_fence();
}

template <class T>
static void wsum_range(const void* const* xs, const double* w, int64_t K, T* out, int64_t i0, int64_t i1) {
  // Streaming needs every vector store aligned: tiles start at multiples of kTile.
  if (kVec<T> && aligned64(out + i0) && (i1 - i0) * int64_t(sizeof(T)) * K >= kStreamBytes)
    wsum_range_t<T, true>(xs, w, K, out, i0, i1);
  else
    wsum_range_t<T, false>(xs, w, K, out, i0, i1);
}

template <class T>
static void accumulate_range(acc_t<T>* acc, const T* x, double w, int64_t i0, int64_t i1) {
  using A = acc_t<T>;
  const A wa = A(w);
  int64_t i = i0;
#if FEDSQ_ISA > 0
  if constexpr (kVec<T>) {
    const VF vw = vset1(wa);
    for (; i + VW <= i1; i += VW) vstoref(acc + i, vfma(vw, vload(x + i), vloadf(acc + i)));
  }
#endif
  for (; i < i1; ++i) acc[i] = fma_s<A>(wa, ld(x, i), acc[i]);
}

template <class T>
static double sq_dist_range(const T* x, const T* ref, int64_t i0, int64_t i1) {
  using A = acc_t<T>;
  double total = 0.0;
  int64_t i = i0;
#if FEDSQ_ISA > 0
  if constexpr (kVec<T>) {
    // float32 lanes per block of up to 4096 elements, then into the float64 total
    alignas(64) float lanes[VW];
    while (i + VW <= i1) {
      const int64_t end = std::min(i1, i + 4096);
      VF acc = vset1(0.0f);
      for (; i + VW <= end; i += VW) {
        const VF d = vadd(vload(x + i), vmul(vset1(-1.0f), vload(ref + i)));
        acc = vfma(d, d, acc);
      }
      vstoref(lanes, acc);
      for (int j = 0; j < VW; ++j) total += double(lanes[j]);
    }
  }
#endif
  for (; i < i1; ++i) {
    const A d = ld(x, i) - ld(ref, i);
    total += double(d) * double(d);
  }
  return total;
}

// One read of a reply for every check the server makes (issue 28): min/max over the non-NaN
// values, the NaN/Inf count, and the squared distance to the global model with exactly
// sq_dist_range's blocks, lanes and order (the norm bound's numbers do not move). The hot
// loop only sums x - x (0 unless some x is NaN/Inf); the count is taken in a second pass over
// the range only when that sum says a value is not finite (a hostile reply, refused anyway).
// FOLD: also acc[i] += w * x[i] from the same load (accumulate_range's fma per element, so the
// same bits as that op): a held reply checked and folded in one read (fold_stats_list_).
template <class T, bool FOLD = false>
static void reply_stats_range(const T* x, const T* ref, int64_t i0, int64_t i1, double* out,
                              acc_t<T>* facc = nullptr, double w = 0.0) {
  using A = acc_t<T>;
  const A wa = A(w);
  double total = 0.0, lo = HUGE_VAL, hi = -HUGE_VAL;
  int64_t bad = 0, i = i0;
  bool recount = false;
#if FEDSQ_ISA > 0
  if constexpr (kVec<T>) {
    alignas(64) float lanes[VW];
    VF vlo = vset1(HUGE_VALF), vhi = vset1(-HUGE_VALF), flag = vset1(0.0f);
    const VF vw = vset1(float(w));
    while (i + VW <= i1) {
      const int64_t end = std::min(i1, i + 4096);
      VF acc = vset1(0.0f);
      for (; i + VW <= end; i += VW) {
        const VF xv = vload(x + i);
        if constexpr (FOLD) vstoref(facc + i, vfma(vw, xv, vloadf(facc + i)));
        const VF d = vadd(xv, vmul(vset1(-1.0f), vload(ref + i)));
        acc = vfma(d, d, acc);
        flag = vadd(flag, vsub(xv, xv));
        vlo = vmin_nan(xv, vlo);  // a NaN lane of xv keeps vlo
        vhi = vmax_nan(xv, vhi);
      }
      vstoref(lanes, acc);
      for (int j = 0; j < VW; ++j) total += double(lanes[j]);
    }
    vstoref(lanes, vlo);
    for (int j = 0; j < VW; ++j) lo = std::min(lo, double(lanes[j]));
    vstoref(lanes, vhi);
    for (int j = 0; j < VW; ++j) hi = std::max(hi, double(lanes[j]));
    vstoref(lanes, flag);
    for (int j = 0; j < VW; ++j) recount |= lanes[j] != 0.0f;  // NaN != 0 too
    if (recount)
      for (int64_t k = i0; k < i; ++k) bad += !std::isfinite(ld(x, k));
  }
#endif
  for (; i < i1; ++i) {
    const A v = ld(x, i);
    if constexpr (FOLD) facc[i] = fma_s<A>(wa, v, facc[i]);
    const A d = v - ld(ref, i);
    total += double(d) * double(d);
    if (v == v) {
      lo = std::min(lo, double(v));
      hi = std::max(hi, double(v));
    }
    bad += !std::isfinite(v);
  }
  out[0] = lo;
  out[1] = hi;
  out[2] = double(bad);
  out[3] = total;
}


// ---------------------------------------------------------------------------
// Soft gates: y = zq * g(zs) (kernels.h). The float32 gate functions are written once
// over "lanes" L (float, or the ISA's VF) from operations that round the same way
// everywhere (IEEE add/mul/div, explicit fma, min/max with the instructions' operand
// rule, rounding to an integer by adding 1.5 * 2^23), so every ISA gives the same bits
// (tests/ops/emulated/isa_check.cpp checks it). Accuracy against float64 is stated and
// tested in tests/ops/test_soft_gate.py.
template <class L> static inline L k_(float c);
template <> inline float k_<float>(float c) { return c; }
static inline float o_add(float a, float b) { return a + b; }
static inline float o_sub(float a, float b) { return a - b; }
static inline float o_mul(float a, float b) { return a * b; }
static inline float o_div(float a, float b) { return a / b; }
static inline float o_fma(float a, float b, float c) { return std::fma(a, b, c); }
static inline float o_min(float a, float b) { return a < b ? a : b; }  // MINPS: b when either is NaN
static inline float o_max(float a, float b) { return a > b ? a : b; }  // MAXPS: likewise
static inline float o_abs(float a) { return u2f(f2u(a) & 0x7fffffffu); }
static inline float o_sel_ge0(float z, float a, float b) { return z >= 0.0f ? a : b; }
static inline float o_sel_gt(float p, float q, float a, float b) { return p > q ? a : b; }
static inline void o_pow2(float n, float& a, float& b) {
  const int32_t ni = n == n ? int32_t(n) : 0;  // NaN: any factors (the result is NaN anyway)
  const int32_t n1 = ni >> 1, n2 = ni - n1;
  a = u2f(uint32_t(n1 + 127) << 23);
  b = u2f(uint32_t(n2 + 127) << 23);
}
#if FEDSQ_ISA > 0
template <> inline VF k_<VF>(float c) { return vset1(c); }
static inline VF o_add(VF a, VF b) { return vadd(a, b); }
static inline VF o_sub(VF a, VF b) { return vsub(a, b); }
static inline VF o_mul(VF a, VF b) { return vmul(a, b); }
static inline VF o_div(VF a, VF b) { return vdiv(a, b); }
static inline VF o_fma(VF a, VF b, VF c) { return vfma(a, b, c); }
static inline VF o_min(VF a, VF b) { return vmin_nan(a, b); }
static inline VF o_max(VF a, VF b) { return vmax_nan(a, b); }
static inline VF o_abs(VF a) { return vabs(a); }
static inline VF o_sel_ge0(VF z, VF a, VF b) { return vsel_ge0(z, a, b); }
static inline VF o_sel_gt(VF p, VF q, VF a, VF b) { return vsel_gt(p, q, a, b); }
static inline void o_pow2(VF n, VF& a, VF& b) { vpow2(n, a, b); }
#endif

// exp(x), float32: Cephes' expf (range reduction by ln 2 in two parts, degree-5
// polynomial), 2^n applied as two normal factors so results down to the subnormals are
// rounded once; x > 89 gives +Inf, x < -104 gives +0, NaN stays NaN (constants come
// first in min/max: the instructions return the second operand when one is NaN).
template <class L>
static inline L g_exp(L x) {
  x = o_max(k_<L>(-104.0f), o_min(k_<L>(89.0f), x));
  const L n = o_sub(o_add(o_mul(x, k_<L>(1.44269504088896341f)), k_<L>(12582912.0f)), k_<L>(12582912.0f));
  L r = o_fma(n, k_<L>(-0.693359375f), x);
  r = o_fma(n, k_<L>(2.12194440e-4f), r);
  L p = k_<L>(1.9875691500e-4f);
  p = o_fma(p, r, k_<L>(1.3981999507e-3f));
  p = o_fma(p, r, k_<L>(8.3334519073e-3f));
  p = o_fma(p, r, k_<L>(4.1665795894e-2f));
  p = o_fma(p, r, k_<L>(1.6666665459e-1f));
  p = o_fma(p, r, k_<L>(5.0000001201e-1f));
  p = o_add(o_fma(p, o_mul(r, r), r), k_<L>(1.0f));
  L a, b;
  o_pow2(n, a, b);
  return o_mul(o_mul(p, a), b);
}

template <SoftKind K, class L>
static inline L g_soft(L z) {
  const L one = k_<L>(1.0f);
  if constexpr (K == SoftKind::sigmoid) {
    return o_div(one, o_add(one, g_exp(o_mul(z, k_<L>(-1.0f)))));
  } else if constexpr (K == SoftKind::phi) {
    // Phi(z) = (1 + erf(x)) / 2, x = z / sqrt 2, with N. Juffa's float erf (two minimax
    // branches, about 1 ulp): |x| <= 0.9277 an odd polynomial; above, erf = 1 - e^r, and
    // Phi = 1 - e^r / 2 (z > 0) or e^r / 2 (z < 0): no cancellation for negative z
    const L x = o_mul(z, k_<L>(0.707106781186547524f));
    const L t = o_abs(x), s = o_mul(x, x);
    L r = o_fma(k_<L>(-1.72853470e-5f), t, k_<L>(3.83197126e-4f));
    const L u = o_fma(k_<L>(-3.88396438e-3f), t, k_<L>(2.42546219e-2f));
    r = o_fma(r, s, u);
    r = o_fma(r, t, k_<L>(-1.06777877e-1f));
    r = o_fma(r, t, k_<L>(-6.34846687e-1f));
    r = o_fma(r, t, k_<L>(-1.28717512e-1f));
    r = o_fma(r, t, o_mul(t, k_<L>(-1.0f)));
    const L half_erfc = o_mul(k_<L>(0.5f), g_exp(r));
    const L big = o_sel_ge0(z, o_sub(one, half_erfc), half_erfc);
    L p = k_<L>(-5.96761703e-4f);
    p = o_fma(p, s, k_<L>(4.99119423e-3f));
    p = o_fma(p, s, k_<L>(-2.67681349e-2f));
    p = o_fma(p, s, k_<L>(1.12819925e-1f));
    p = o_fma(p, s, k_<L>(-3.76125336e-1f));
    p = o_fma(p, s, k_<L>(1.28379166e-1f));
    const L small = o_fma(k_<L>(0.5f), o_fma(p, x, x), k_<L>(0.5f));
    return o_sel_gt(t, k_<L>(0.927734375f), big, small);
  } else if constexpr (K == SoftKind::phi_tanh) {
    // 0.5 (1 + tanh(u)) = sigmoid(2u), u = sqrt(2/pi) (z + 0.044715 z^3)
    const L u = o_add(z, o_mul(k_<L>(0.044715f), o_mul(o_mul(z, z), z)));
    return o_div(one, o_add(one, g_exp(o_mul(u, k_<L>(-1.5957691216057308f)))));
  } else if constexpr (K == SoftKind::hardsigmoid) {
    // min(max(z + 3, 0), 6) / 6: ATen's operations in its order (the same bits)
    return o_div(o_min(k_<L>(6.0f), o_max(k_<L>(0.0f), o_add(z, k_<L>(3.0f)))), k_<L>(6.0f));
  } else {
    // tanh(log(1 + e)) = n / (n + 2), n = e (e + 2), e = exp(min(z, 20)) (tanh(20) is 1 in float)
    const L e = g_exp(o_min(k_<L>(20.0f), z));
    const L n = o_mul(e, o_add(e, k_<L>(2.0f)));
    return o_div(n, o_add(n, k_<L>(2.0f)));
  }
}

// float64: libm (the float64 path is the gradcheck / oracle dtype, not a fast path)
template <SoftKind K>
static inline double g_soft_d(double z) {
  if constexpr (K == SoftKind::sigmoid) {
    return 1.0 / (1.0 + std::exp(-z));
  } else if constexpr (K == SoftKind::phi) {
    return 0.5 * std::erfc(-z * 0.70710678118654752440);
  } else if constexpr (K == SoftKind::phi_tanh) {
    return 0.5 * (1.0 + std::tanh(0.79788456080286535588 * (z + 0.044715 * (z * z * z))));
  } else if constexpr (K == SoftKind::hardsigmoid) {
    double t = z + 3.0;
    t = 0.0 > t ? 0.0 : t;  // NaN passes
    t = 6.0 < t ? 6.0 : t;
    return t / 6.0;
  } else {
    return std::tanh(std::log1p(std::exp(z)));
  }
}

template <class T, SoftKind K>
static inline acc_t<T> soft_gate_s(acc_t<T> z) {
  if constexpr (std::is_same<T, double>::value) return g_soft_d<K>(z);
  else return to_acc(from_acc<T>(g_soft<K>(z)));  // the gate as T stores it
}

template <class T, SoftKind K, bool NT>
static void soft_range_t(const T* zq, const T* zs, T* y, int64_t n, int64_t w0, int64_t w1) {
  const int64_t i1 = std::min(w1 * 32, n);
  int64_t i = w0 * 32;
#if FEDSQ_ISA > 0
  if constexpr (kVec<T>) {
    for (; i + VW <= i1; i += VW) {
      const VF g = vquant<T>(g_soft<K>(vload(zs + i)));
      vstore<T, NT>(y + i, vmul(vload(zq + i), g));
    }
  }
#endif
  for (; i < i1; ++i) st(y, i, ld(zq, i) * soft_gate_s<T, K>(ld(zs, i)));
  if (NT) stream_fence();
}

template <class T, SoftKind K>
static void soft_range(const T* zq, const T* zs, T* y, int64_t n, int64_t w0, int64_t w1) {
  if (use_stream<T>(y, n)) soft_range_t<T, K, true>(zq, zs, y, n, w0, w1);
  else soft_range_t<T, K, false>(zq, zs, y, n, w0, w1);
}

// ---------------------------------------------------------------------------
// Type dispatch and the exported table.
#define FEDSQ_DISPATCH(dt, ...)                                   \
  switch (dt) {                                                   \
    case DType::f32: { using T = float; __VA_ARGS__; break; }     \
    case DType::f16: { using T = f16_t; __VA_ARGS__; break; }     \
    case DType::bf16: { using T = bf16_t; __VA_ARGS__; break; }   \
    case DType::f64: { using T = double; __VA_ARGS__; break; }    \
  }

static void k_pack(DType dt, const void* zs, uint32_t* bits, int64_t n, int64_t w0, int64_t w1) {
  FEDSQ_DISPATCH(dt, pack_range<T>(static_cast<const T*>(zs), bits, n, w0, w1));
}
static void k_apply(DType dt, const void* zq, const uint32_t* bits, void* y, int64_t n, int64_t w0, int64_t w1) {
  FEDSQ_DISPATCH(dt, apply_range<T>(static_cast<const T*>(zq), bits, static_cast<T*>(y), n, w0, w1));
}
static void k_gate(DType dt, const void* zq, const void* zs, void* y, uint32_t* bits, int64_t n, int64_t w0,
                   int64_t w1) {
  FEDSQ_DISPATCH(dt, gate_range<T>(static_cast<const T*>(zq), static_cast<const T*>(zs), static_cast<T*>(y), bits,
                                   n, w0, w1));
}
static void k_epilogue(DType dt, const void* z, void* h, uint32_t* bits, const void* sc, const void* sh, int64_t C,
                       int64_t inner, int64_t n, int64_t w0, int64_t w1) {
  FEDSQ_DISPATCH(dt, epilogue_range<T>(static_cast<const T*>(z), static_cast<T*>(h), bits,
                                       static_cast<const acc_t<T>*>(sc), static_cast<const acc_t<T>*>(sh), C, inner,
                                       n, w0, w1));
}
static void k_wsum(DType dt, const void* const* xs, const double* w, int64_t K, void* out, int64_t i0, int64_t i1) {
  FEDSQ_DISPATCH(dt, wsum_range<T>(xs, w, K, static_cast<T*>(out), i0, i1));
}
static void k_accumulate(DType dt, void* acc, const void* x, double w, int64_t i0, int64_t i1) {
  FEDSQ_DISPATCH(dt, accumulate_range<T>(static_cast<acc_t<T>*>(acc), static_cast<const T*>(x), w, i0, i1));
}
static double k_sq_dist(DType dt, const void* x, const void* ref, int64_t i0, int64_t i1) {
  double r = 0.0;
  FEDSQ_DISPATCH(dt, r = sq_dist_range<T>(static_cast<const T*>(x), static_cast<const T*>(ref), i0, i1));
  return r;
}
static void k_reply_stats(DType dt, const void* x, const void* ref, int64_t i0, int64_t i1, double* out) {
  FEDSQ_DISPATCH(dt, reply_stats_range<T>(static_cast<const T*>(x), static_cast<const T*>(ref), i0, i1, out));
}
static void k_reply_stats_fold(DType dt, const void* x, const void* ref, void* acc, double w, int64_t i0, int64_t i1,
                               double* out) {
  FEDSQ_DISPATCH(dt, (reply_stats_range<T, true>(static_cast<const T*>(x), static_cast<const T*>(ref), i0, i1, out,
                                                 static_cast<acc_t<T>*>(acc), w)));
}
template <SoftKind K>
static void k_soft_kind(DType dt, const void* zq, const void* zs, void* y, int64_t n, int64_t w0, int64_t w1) {
  FEDSQ_DISPATCH(dt, (soft_range<T, K>(static_cast<const T*>(zq), static_cast<const T*>(zs), static_cast<T*>(y),
                                       n, w0, w1)));
}
static void k_soft(DType dt, SoftKind kind, const void* zq, const void* zs, void* y, int64_t n, int64_t w0,
                   int64_t w1) {
  switch (kind) {
    case SoftKind::sigmoid: k_soft_kind<SoftKind::sigmoid>(dt, zq, zs, y, n, w0, w1); break;
    case SoftKind::phi: k_soft_kind<SoftKind::phi>(dt, zq, zs, y, n, w0, w1); break;
    case SoftKind::phi_tanh: k_soft_kind<SoftKind::phi_tanh>(dt, zq, zs, y, n, w0, w1); break;
    case SoftKind::hardsigmoid: k_soft_kind<SoftKind::hardsigmoid>(dt, zq, zs, y, n, w0, w1); break;
    case SoftKind::tanh_softplus: k_soft_kind<SoftKind::tanh_softplus>(dt, zq, zs, y, n, w0, w1); break;
  }
}
#undef FEDSQ_DISPATCH

static const KernelTable kTable = {FEDSQ_ISA_NAME, k_pack, k_apply, k_gate, k_epilogue, k_wsum, k_accumulate,
                                   k_sq_dist, k_reply_stats, k_reply_stats_fold, k_soft};
