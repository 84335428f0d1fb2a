// Launchers of the CUDA kernels: raw pointers and a stream, no torch headers,
// so kernels.cu compiles in about a second instead of minutes.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

#include "../cpu/kernels.h"  // DType (plain enum, no torch)

namespace fedsq {
namespace cuda {

constexpr int kMaxClients = 32;  // clients per weighted_sum launch (kernel parameter space)

struct WsumArgs {
  const void* xs[kMaxClients];
  double w[kMaxClients];
  int K;
};

cudaError_t pack(DType dt, const void* zs, uint32_t* bits, int64_t n, cudaStream_t s);
cudaError_t apply(DType dt, const void* zq, const uint32_t* bits, void* y, int64_t n, cudaStream_t s);
cudaError_t gate(DType dt, const void* zq, const void* zs, void* y, uint32_t* bits, int64_t n, cudaStream_t s);
// scale/shift: C values, float (double for f64); channel of element i = (i / inner) % C.
cudaError_t epilogue(DType dt, const void* z, void* h, uint32_t* bits, const void* scale, const void* shift,
                     int64_t C, int64_t inner, int64_t n, cudaStream_t s);
// One chunk of clients. acc_in (nullable): running fp32/fp64 sum to continue
// from; writes acc_out (if non-null) or out (converted to T).
cudaError_t weighted_sum(DType dt, const WsumArgs& args, const void* acc_in, void* acc_out, void* out, int64_t n,
                         cudaStream_t s);
cudaError_t accumulate(DType dt, void* acc, const void* x, double w, int64_t n, cudaStream_t s);

}  // namespace cuda
}  // namespace fedsq
