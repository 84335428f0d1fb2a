// Launchers of the CUDA kernels: raw pointers and a stream, no torch headers,
// so kernels.cu compiles in seconds instead of minutes.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

#include "../cpu/kernels.h"  // DType (plain enum, no torch)
#include "../int_average.h"  // IType, the exact integer average (shared with the CPU)

namespace fedsq {
namespace cuda {

// Elementwise ops on one dense tensor of n elements. Each takes the 16-byte
// vector path when every float pointer is 16-byte aligned, else a scalar path.
// Outputs may alias their inputs exactly (y == z_q, h == z): every element is
// read before it is written by the same thread; partial overlap is refused by
// the caller.
cudaError_t pack(DType dt, const void* zs, uint32_t* bits, int64_t n, cudaStream_t s);
cudaError_t apply(DType dt, const void* zq, const uint32_t* bits, void* y, int64_t n, cudaStream_t s);
cudaError_t gate(DType dt, const void* zq, const void* zs, void* y, uint32_t* bits, int64_t n, cudaStream_t s);
// y = zq * g(zs) (SoftKind: kernels.h): g in float (double for f64) with CUDA's accurate
// expf/erfcf, rounded to T before the multiply, like the CPU kernels (which use their own
// vectorised approximations: the two agree to the tolerance tests/ops/test_soft_gate.py states).
cudaError_t soft_apply(DType dt, SoftKind kind, const void* zq, const void* zs, void* y, int64_t n, cudaStream_t s);
// t = z*scale[c] + shift[c], c = (i / inner) % C. scale/shift: C values, float
// (double for f64), or nullptr for 1 / 0 (the CPU kernels' tables hold the same).
cudaError_t epilogue(DType dt, const void* z, void* h, uint32_t* bits, const void* scale, const void* shift,
                     int64_t C, int64_t inner, int64_t n, cudaStream_t s);

// Multi-tensor ops: many tensors (a model's state) in one launch, like
// PyTorch's multi_tensor_apply. Tensors are cut into chunks of kChunk elements;
// one wave of blocks (as many as fit on the GPU at once) takes chunks in turn,
// and MtTable::chunk_item says which tensor a chunk belongs to. The table lives
// in device memory (one host-to-device copy per call), so neither the number of
// tensors nor of clients is limited.
constexpr int64_t kChunk = 4096;  // small enough that one wave ends evenly

struct MtItem {
  int64_t n;       // elements (> 0)
  int64_t chunk0;  // index of this tensor's first chunk (prefix sum)
  void* out;       // output, or the accumulator / reference (accumulate, sq_dist)
  int64_t x0;      // this tensor's client pointers: MtTable::xs[x0 .. x0 + K)
  int32_t dt;      // DType, or IType for the integer average
  int32_t vec;     // 1: every pointer aligned for the vector path
};

struct MtTable {  // device pointers into one uploaded buffer
  const MtItem* items;
  const void* const* xs;
  const float* wf;           // K weights as float (f32/f16/bf16 accumulate in float)
  const double* wd;          // K weights as double (f64)
  const long long* wi;       // K integer weights (integer average)
  const int32_t* chunk_item; // item of each chunk
  long long wi_total;        // their sum (> 0)
  int32_t L, K;
  int64_t chunks;            // total chunks over all items
};

// out_j = sum_k w_k x_kj: float32 (float64) accumulation, a multiply for k = 0
// then fma in client order, rounded once to the output type (the CPU's order).
cudaError_t weighted_sum_mt(const MtTable& t, cudaStream_t s);
// acc_j += w_0 * x_0j (K == 1; acc is float32, float64 for f64), one fma.
cudaError_t accumulate_mt(const MtTable& t, cudaStream_t s);
// sum_j ||x_0j - ref_j||^2: per-chunk float64 partial sums (partials: t.chunks
// entries), then summed in chunk order into *result: the same value for any grid.
cudaError_t sq_dist_mt(const MtTable& t, double* partials, double* result, cudaStream_t s);
// Exact integer average: out_j = round_half_even(sum_k wi_k x_kj / wi_total) in 128-bit.
cudaError_t int_average_mt(const MtTable& t, cudaStream_t s);

// Multiprocessors of the current device (cached): grids are sized to them.
int multiprocessors();

}  // namespace cuda
}  // namespace fedsq
