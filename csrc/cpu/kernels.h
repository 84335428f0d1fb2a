// Raw CPU kernels of fedsq_fast: plain pointers, no torch headers.
//
// Each kernel works on a range of 32-element *words* [w0, w1) so that threads
// never share a mask word; the torch-facing code (csrc/ops.cpp) splits ranges
// with at::parallel_for. The same source (kernels_impl.h) is compiled for
// AVX-512, AVX2 and plain C++; dispatch.cpp picks one at run time.
#pragma once
#include <cstdint>

namespace fedsq {

enum class DType : int { f32 = 0, f16 = 1, bf16 = 2, f64 = 3 };

// The gate g of a soft gate site (docs/models.md, "Soft gates"): sigmoid (SiLU and
// squeeze-excitation), phi = Phi(z) (GELU), phi_tanh = sigmoid(2 sqrt(2/pi) (z + 0.044715 z^3))
// (GELU, tanh form), hardsigmoid (Hardswish), tanh_softplus (Mish).
enum class SoftKind : int { sigmoid = 0, phi = 1, phi_tanh = 2, hardsigmoid = 3, tanh_softplus = 4 };
constexpr int kSoftKinds = 5;

struct KernelTable {
  const char* name;
  // bits[w] = word of (zs > 0) for elements [32w, 32w+32) ∩ [0, n)
  void (*pack)(DType, const void* zs, uint32_t* bits, int64_t n, int64_t w0, int64_t w1);
  // y = zq * mask(bits)
  void (*apply)(DType, const void* zq, const uint32_t* bits, void* y, int64_t n, int64_t w0, int64_t w1);
  // y = zq * (zs > 0), bits = pack(zs > 0)
  void (*gate)(DType, const void* zq, const void* zs, void* y, uint32_t* bits, int64_t n, int64_t w0,
               int64_t w1);
  // t = z*scale[c] + shift[c]; h = max(0, t) (NaN kept); bits = pack(t > 0).
  // Channel of element k: (k / inner) % C. scale_ext/shift_ext hold C + 32
  // entries, entry i = value of channel i % C (lets inner == 1 load lanes
  // directly); they are float, or double for f64. h may alias z (in place).
  void (*epilogue)(DType, const void* z, void* h, uint32_t* bits, const void* scale_ext,
                   const void* shift_ext, int64_t C, int64_t inner, int64_t n, int64_t w0, int64_t w1);
  // out[i] = sum_k w[k] * xs[k][i] for i in [i0, i1), accumulated in fp32 (fp64
  // for f64) with fma in client order k = 0..K-1.
  void (*weighted_sum)(DType, const void* const* xs, const double* w, int64_t K, void* out,
                       int64_t i0, int64_t i1);
  // acc[i] += w * x[i] (acc is float32, or float64 when x is f64).
  void (*accumulate)(DType, void* acc, const void* x, double w, int64_t i0, int64_t i1);
  // sum over [i0, i1) of (x[i] - ref[i])^2: differences in float32 (float64 for
  // f64), squares summed in float32 lanes then float64; NaN/Inf propagate.
  double (*sq_dist)(DType, const void* x, const void* ref, int64_t i0, int64_t i1);
  // Every check of a reply in one read of [i0, i1): out = {min and max over the non-NaN x[i]
  // (+Inf / -Inf if none), count of NaN/Inf x[i], sum (x[i] - ref[i])^2 computed exactly as
  // sq_dist computes it (the same bits)}.
  void (*reply_stats)(DType, const void* x, const void* ref, int64_t i0, int64_t i1, double* out);
  // reply_stats and accumulate (acc[i] += w * x[i], the same bits) from one read of x.
  void (*reply_stats_fold)(DType, const void* x, const void* ref, void* acc, double w, int64_t i0, int64_t i1,
                           double* out);
  // Soft gate: y = zq * g(zs) for elements [32 w0, min(32 w1, n)). g is computed in float32
  // (float64 for f64) and rounded to the tensor's dtype before the multiply (the gate a
  // half-precision site stores), so y is exactly zq * g_T as eager computes that product.
  // float32 g: the same vectorised code on every ISA (bit-identical results); float64: libm.
  void (*soft_apply)(DType, SoftKind, const void* zq, const void* zs, void* y, int64_t n, int64_t w0, int64_t w1);
};

const KernelTable& kernels_scalar();
const KernelTable& kernels_avx2();
const KernelTable& kernels_avx512();

// The table in use: the best the CPU supports, or the one set by set_isa().
const KernelTable& cpu_kernels();
// "auto", "avx512", "avx2" or "scalar"; returns the name now in use, or
// nullptr if the CPU cannot run the one asked for.
const char* set_isa(const char* isa);
bool isa_supported(const char* isa);

}  // namespace fedsq
