// Checks the AVX-512 kernels on a CPU without AVX-512: kernels_impl.h is
// compiled with FEDSQ_ISA=2 against SIMDe's portable implementations of the
// _mm512_* intrinsics and compared, bit for bit, with the scalar variant on
// random inputs with edge values, odd sizes and every dtype.
// Built and run by tests/ops/test_isa_emulated.py (skipped when SIMDe is absent).
#define SIMDE_ENABLE_NATIVE_ALIASES
#include <simde/x86/avx512.h>
#include <simde/x86/fma.h>
#include <simde/x86/f16c.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <type_traits>
#include <vector>

#include "cpu/kernels.h"

#define FEDSQ_EMULATED_SIMD 1
namespace fedsq {
namespace plain {
#define FEDSQ_ISA 0
#define FEDSQ_ISA_NAME "scalar"
#include "cpu/kernels_impl.h"
#undef FEDSQ_ISA
#undef FEDSQ_ISA_NAME
}  // namespace plain
}  // namespace fedsq

// Intrinsics SIMDe 0.7.4 lacks, written from Intel's documented semantics.
typedef simde__mmask16 __mmask16;
#ifndef _MM_FROUND_NO_EXC
#define _MM_FROUND_NO_EXC SIMDE_MM_FROUND_NO_EXC
#endif
#ifndef _MM_FROUND_TO_NEAREST_INT
#define _MM_FROUND_TO_NEAREST_INT SIMDE_MM_FROUND_TO_NEAREST_INT
#endif
static inline __m512 _mm512_cvtph_ps(__m256i a) {  // 16 x fp16 -> fp32 (exact)
  uint16_t h[16]; float f[16];
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(h), a);
  for (int i = 0; i < 16; ++i) f[i] = fedsq::plain::to_acc(fedsq::plain::f16_t{h[i]});
  return _mm512_loadu_ps(f);
}
static inline __m256i _mm512_cvtps_ph(__m512 a, int) {  // fp32 -> fp16, round to nearest even
  float f[16]; uint16_t h[16];
  _mm512_storeu_ps(f, a);
  for (int i = 0; i < 16; ++i) h[i] = fedsq::plain::from_acc<fedsq::plain::f16_t>(f[i]).x;
  return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(h));
}
static inline __m512i _mm512_cvtepu16_epi32(__m256i a) {  // zero-extend
  uint16_t h[16]; int32_t w[16];
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(h), a);
  for (int i = 0; i < 16; ++i) w[i] = h[i];
  return _mm512_loadu_si512(w);
}
static inline __m256i _mm512_cvtepi32_epi16(__m512i a) {  // truncate
  int32_t w[16]; uint16_t h[16];
  _mm512_storeu_si512(w, a);
  for (int i = 0; i < 16; ++i) h[i] = uint16_t(w[i]);
  return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(h));
}
static inline __m512i _mm512_cvtps_epi32(__m512 a) {  // round to nearest even; NaN/out of range: INT_MIN
  float f[16]; int32_t w[16];
  _mm512_storeu_ps(f, a);
  for (int i = 0; i < 16; ++i)
    w[i] = (f[i] == f[i] && std::fabs(f[i]) < 2147483648.0f) ? int32_t(std::nearbyint(f[i])) : INT32_MIN;
  return _mm512_loadu_si512(w);
}
static inline __m512i _mm512_srai_epi32(__m512i a, unsigned int imm) {  // arithmetic shift right
  int32_t w[16];
  _mm512_storeu_si512(w, a);
  for (int i = 0; i < 16; ++i) w[i] = imm > 31 ? (w[i] < 0 ? -1 : 0) : (w[i] >> imm);
  return _mm512_loadu_si512(w);
}
static inline void _mm512_stream_ps(float* p, __m512 a) { _mm512_storeu_ps(p, a); }
#undef _mm256_stream_si256
static inline void _mm256_stream_si256(__m256i* p, __m256i a) { _mm256_storeu_si256(p, a); }

// SIMDe's portable fmadd rounds twice; the instructions round once.
static inline __m512 emu_fmadd512(__m512 a, __m512 b, __m512 c) {
  float x[16], y[16], z[16];
  _mm512_storeu_ps(x, a); _mm512_storeu_ps(y, b); _mm512_storeu_ps(z, c);
  for (int i = 0; i < 16; ++i) z[i] = std::fma(x[i], y[i], z[i]);
  return _mm512_loadu_ps(z);
}
static inline __m256 emu_fmadd256(__m256 a, __m256 b, __m256 c) {
  float x[8], y[8], z[8];
  _mm256_storeu_ps(x, a); _mm256_storeu_ps(y, b); _mm256_storeu_ps(z, c);
  for (int i = 0; i < 8; ++i) z[i] = std::fma(x[i], y[i], z[i]);
  return _mm256_loadu_ps(z);
}
#undef _mm512_fmadd_ps
#define _mm512_fmadd_ps emu_fmadd512
#undef _mm256_fmadd_ps
#define _mm256_fmadd_ps emu_fmadd256

namespace fedsq {
namespace emu512 {
#define FEDSQ_ISA 2
#define FEDSQ_ISA_NAME "avx512-emulated"
#include "cpu/kernels_impl.h"
#undef FEDSQ_ISA
#undef FEDSQ_ISA_NAME
}  // namespace emu512
namespace emu2 {
#define FEDSQ_ISA 1
#define FEDSQ_ISA_NAME "avx2-emulated"
#include "cpu/kernels_impl.h"
#undef FEDSQ_ISA
#undef FEDSQ_ISA_NAME
}  // namespace emu2
}  // namespace fedsq

using namespace fedsq;
static int failures = 0;

static bool is_nan_bits(DType dt, const uint8_t* p) {
  switch (dt) {
    case DType::f32: { uint32_t u; std::memcpy(&u, p, 4); return (u & 0x7fffffffu) > 0x7f800000u; }
    case DType::f64: { uint64_t u; std::memcpy(&u, p, 8); return (u & 0x7fffffffffffffffull) > 0x7ff0000000000000ull; }
    case DType::f16: { uint16_t u; std::memcpy(&u, p, 2); return (u & 0x7fffu) > 0x7c00u; }
    case DType::bf16: { uint16_t u; std::memcpy(&u, p, 2); return (u & 0x7fffu) > 0x7f80u; }
  }
  return false;
}
static size_t esize(DType dt) { return dt == DType::f32 ? 4 : dt == DType::f64 ? 8 : 2; }

// Equal bytes, except that any NaN equals any NaN (payloads are free).
static void compare(const char* what, DType dt, const std::vector<uint8_t>& a, const std::vector<uint8_t>& b,
                    size_t n, const char* isa) {
  const size_t es = esize(dt);
  for (size_t i = 0; i < n; ++i) {
    const uint8_t* pa = a.data() + i * es;
    const uint8_t* pb = b.data() + i * es;
    if (std::memcmp(pa, pb, es) == 0) continue;
    if (is_nan_bits(dt, pa) && is_nan_bits(dt, pb)) continue;
    if (failures++ < 20) std::printf("MISMATCH %s %s dtype=%d n=%zu at %zu\n", isa, what, int(dt), n, i);
    return;
  }
}
static void compare_words(const char* what, const std::vector<uint32_t>& a, const std::vector<uint32_t>& b,
                          const char* isa, size_t n) {
  if (a != b && failures++ < 20) std::printf("MISMATCH %s %s bits n=%zu\n", isa, what, n);
}

static std::vector<uint8_t> random_values(DType dt, size_t n, std::mt19937& rng) {
  std::normal_distribution<double> nd(0.0, 2.0);
  const double edges[] = {0.0, -0.0, NAN, INFINITY, -INFINITY, 1e-30, -1e-30, 65504.0, 70000.0, 1e-6, 6.0};
  std::vector<uint8_t> out(n * esize(dt));
  for (size_t i = 0; i < n; ++i) {
    double v = (rng() % 7 == 0) ? edges[rng() % 11] : nd(rng);
    uint8_t* p = out.data() + i * esize(dt);
    if (dt == DType::f32) { float f = float(v); std::memcpy(p, &f, 4); }
    else if (dt == DType::f64) { std::memcpy(p, &v, 8); }
    else if (dt == DType::f16) { auto h = plain::from_acc<plain::f16_t>(float(v)); std::memcpy(p, &h, 2); }
    else { auto h = plain::from_acc<plain::bf16_t>(float(v)); std::memcpy(p, &h, 2); }
  }
  return out;
}

static void check_table(const KernelTable& T, const KernelTable& R) {
  std::mt19937 rng(1234);
  const DType dts[] = {DType::f32, DType::f16, DType::bf16, DType::f64};
  const size_t sizes[] = {1, 31, 32, 33, 64, 95, 1000, 4101};
  for (DType dt : dts) {
    for (size_t n : sizes) {
      const int64_t words = int64_t((n + 31) / 32);
      auto zq = random_values(dt, n, rng), zs = random_values(dt, n, rng);
      std::vector<uint8_t> y1(zq.size()), y2(zq.size());
      std::vector<uint32_t> b1(words), b2(words);
      T.gate(dt, zq.data(), zs.data(), y1.data(), b1.data(), int64_t(n), 0, words);
      R.gate(dt, zq.data(), zs.data(), y2.data(), b2.data(), int64_t(n), 0, words);
      compare("gate.y", dt, y1, y2, n, T.name);
      compare_words("gate", b1, b2, T.name, n);
      std::vector<uint32_t> p1(words), p2(words);
      T.pack(dt, zs.data(), p1.data(), int64_t(n), 0, words);
      R.pack(dt, zs.data(), p2.data(), int64_t(n), 0, words);
      compare_words("pack", p1, p2, T.name, n);
      T.apply(dt, zq.data(), b2.data(), y1.data(), int64_t(n), 0, words);
      R.apply(dt, zq.data(), b2.data(), y2.data(), int64_t(n), 0, words);
      compare("apply", dt, y1, y2, n, T.name);
      // soft gates: every kind, bit for bit (float32 gates use the same operations on every
      // ISA; float64 is libm on every ISA); zs also spans the ranges where exp under- and
      // overflows (|z| up to ~300)
      {
        std::vector<uint8_t> zw = zs;
        if (dt == DType::f32 || dt == DType::f64)
          for (size_t i = 0; i < n; i += 3) {
            const double v = (double(rng() % 60001) - 30000.0) / 100.0;
            if (dt == DType::f32) { float f = float(v); std::memcpy(zw.data() + i * 4, &f, 4); }
            else std::memcpy(zw.data() + i * 8, &v, 8);
          }
        for (int kind = 0; kind < kSoftKinds; ++kind) {
          // a range starting mid-tensor too (threads split at word boundaries)
          T.soft_apply(dt, SoftKind(kind), zq.data(), zw.data(), y1.data(), int64_t(n), 0, words);
          R.soft_apply(dt, SoftKind(kind), zq.data(), zw.data(), y2.data(), int64_t(n), 0, words);
          compare("soft_apply", dt, y1, y2, n, T.name);
          if (words > 1) {
            T.soft_apply(dt, SoftKind(kind), zq.data(), zw.data(), y1.data(), int64_t(n), 1, words);
            R.soft_apply(dt, SoftKind(kind), zq.data(), zw.data(), y2.data(), int64_t(n), 1, words);
            compare("soft_apply(w0=1)", dt, y1, y2, n, T.name);
          }
        }
      }
      // epilogue: channel-innermost (inner 1) and runs of 7 and 40 elements
      for (int64_t inner : {int64_t(1), int64_t(7), int64_t(40)}) {
        const int64_t C = 5;
        std::vector<double> scd(C + 32), shd(C + 32);
        std::vector<float> scf(C + 32), shf(C + 32);
        for (int64_t i = 0; i < C + 32; ++i) {
          scd[i] = 0.5 + 0.25 * double(i % C);
          shd[i] = -0.3 + 0.2 * double(i % C);
          scf[i] = float(scd[i]);
          shf[i] = float(shd[i]);
        }
        const void* sc = dt == DType::f64 ? static_cast<const void*>(scd.data()) : scf.data();
        const void* sh = dt == DType::f64 ? static_cast<const void*>(shd.data()) : shf.data();
        T.epilogue(dt, zs.data(), y1.data(), b1.data(), sc, sh, C, inner, int64_t(n), 0, words);
        R.epilogue(dt, zs.data(), y2.data(), b2.data(), sc, sh, C, inner, int64_t(n), 0, words);
        compare("epilogue.h", dt, y1, y2, n, T.name);
        compare_words("epilogue", b1, b2, T.name, n);
      }
      // weighted sum of 5 clients, and accumulate (finite values only: fma
      // order is the same on every ISA, so results must agree bit for bit)
      std::vector<std::vector<uint8_t>> xs;
      std::vector<const void*> ptrs;
      for (int k = 0; k < 5; ++k) {
        auto v = random_values(dt, n, rng);
        for (size_t i = 0; i < n; ++i)
          if (is_nan_bits(dt, v.data() + i * esize(dt))) std::memset(v.data() + i * esize(dt), 0, esize(dt));
        xs.push_back(v);
      }
      for (auto& v : xs) ptrs.push_back(v.data());
      const double w[5] = {0.1, 0.2, 0.3, 0.15, 0.25};
      T.weighted_sum(dt, ptrs.data(), w, 5, y1.data(), 0, int64_t(n));
      R.weighted_sum(dt, ptrs.data(), w, 5, y2.data(), 0, int64_t(n));
      compare("weighted_sum", dt, y1, y2, n, T.name);
      const size_t accsz = dt == DType::f64 ? 8 : 4;
      std::vector<uint8_t> a1(n * accsz, 0), a2(n * accsz, 0);
      for (int k = 0; k < 5; ++k) {
        T.accumulate(dt, a1.data(), ptrs[k], w[k], 0, int64_t(n));
        R.accumulate(dt, a2.data(), ptrs[k], w[k], 0, int64_t(n));
      }
      compare("accumulate", dt == DType::f64 ? DType::f64 : DType::f32, a1, a2, n, T.name);
      // sq_dist: vector lanes sum squares in float32 per block, the scalar path in
      // float64, so compare with a relative tolerance.
      const double d1 = T.sq_dist(dt, ptrs[0], ptrs[1], 0, int64_t(n));
      const double d2 = R.sq_dist(dt, ptrs[0], ptrs[1], 0, int64_t(n));
      const bool same_nonfinite = (std::isnan(d1) && std::isnan(d2)) || (std::isinf(d1) && d1 == d2);
      const bool close = std::isfinite(d1) && std::isfinite(d2) && std::fabs(d1 - d2) <= 1e-5 * std::fabs(d2) + 1e-30;
      if (!(same_nonfinite || close) && failures++ < 20)
        std::printf("MISMATCH %s sq_dist dtype=%d n=%zu: %.17g vs %.17g\n", T.name, int(dt), n, d1, d2);
      // reply_stats on values with NaN/Inf/edges: min, max and count exact on every ISA; the
      // squared distance equal to this ISA's own sq_dist bit for bit
      double o1[4], o2[4];
      T.reply_stats(dt, zq.data(), zs.data(), 0, int64_t(n), o1);
      R.reply_stats(dt, zq.data(), zs.data(), 0, int64_t(n), o2);
      const double own = T.sq_dist(dt, zq.data(), zs.data(), 0, int64_t(n));
      const bool same_sq = std::memcmp(&o1[3], &own, 8) == 0 || (std::isnan(o1[3]) && std::isnan(own));
      if ((o1[0] != o2[0] || o1[1] != o2[1] || o1[2] != o2[2] || !same_sq) && failures++ < 20)
        std::printf("MISMATCH %s reply_stats dtype=%d n=%zu: (%g %g %g %g) vs (%g %g %g) own sq %g\n", T.name,
                    int(dt), n, o1[0], o1[1], o1[2], o1[3], o2[0], o2[1], o2[2], own);
    }
  }
}

int main() {
  check_table(emu512::kTable, plain::kTable);
  check_table(emu2::kTable, plain::kTable);
  std::printf("%s: %d mismatches\n", failures ? "FAIL" : "OK", failures);
  return failures ? 1 : 0;
}
