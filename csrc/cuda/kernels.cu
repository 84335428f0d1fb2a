// CUDA kernels of fedsq_fast. Semantics match the CPU kernels and the eager
// reference: mask = z > 0 (ordered compare), y = z_q * mask as a multiply,
// half types computed in float and rounded to nearest even. Mask words are
// built with one warp ballot per 32 consecutive elements (coalesced loads,
// one 4-byte store); the tail is a predicate inside the ballot. Reductions use
// fma in client order, so results do not depend on the launch configuration.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "kernels.cuh"

namespace fedsq {
namespace cuda {
namespace {

template <class T> struct acc_of { using type = float; };
template <> struct acc_of<double> { using type = double; };
template <class T> using acc_t = typename acc_of<T>::type;

__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }
__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }
template <class T> __device__ __forceinline__ T from_acc(acc_t<T> v);
template <> __device__ __forceinline__ float from_acc<float>(float v) { return v; }
template <> __device__ __forceinline__ double from_acc<double>(double v) { return v; }
template <> __device__ __forceinline__ __half from_acc<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

__device__ __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double mul_rn(double a, double b) { return __dmul_rn(a, b); }
__device__ __forceinline__ float add_rn(float a, float b) { return __fadd_rn(a, b); }
__device__ __forceinline__ double add_rn(double a, double b) { return __dadd_rn(a, b); }

constexpr int kThreads = 256;

// Grid of whole warps striding over 32-element words: the loop bound is
// uniform in a warp, so full-mask ballots are safe.
struct WordLoop {
  int lane;
  int64_t first, step;
  __device__ WordLoop()
      : lane(threadIdx.x & 31),
        first((static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) >> 5),
        step((static_cast<int64_t>(gridDim.x) * blockDim.x) >> 5) {}
};

template <class T>
__global__ void pack_kernel(const T* __restrict__ zs, uint32_t* __restrict__ bits, int64_t n) {
  WordLoop L;
  const int64_t words = (n + 31) >> 5;
  for (int64_t w = L.first; w < words; w += L.step) {
    const int64_t i = w * 32 + L.lane;
    const bool m = i < n && to_acc(zs[i]) > acc_t<T>(0);
    const uint32_t b = __ballot_sync(0xffffffffu, m);
    if (L.lane == 0) bits[w] = b;
  }
}

template <class T>
__global__ void apply_kernel(const T* __restrict__ zq, const uint32_t* __restrict__ bits, T* __restrict__ y,
                             int64_t n) {
  const int64_t i0 = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = i0; i < n; i += step) {
    const uint32_t word = bits[i >> 5];  // one word per warp: a broadcast load
    const acc_t<T> m = (word >> (i & 31)) & 1u;
    y[i] = from_acc<T>(mul_rn(to_acc(zq[i]), m));
  }
}

template <class T>
__global__ void gate_kernel(const T* __restrict__ zq, const T* __restrict__ zs, T* __restrict__ y,
                            uint32_t* __restrict__ bits, int64_t n) {
  WordLoop L;
  const int64_t words = (n + 31) >> 5;
  for (int64_t w = L.first; w < words; w += L.step) {
    const int64_t i = w * 32 + L.lane;
    const bool valid = i < n;
    const bool m = valid && to_acc(zs[i]) > acc_t<T>(0);
    const uint32_t b = __ballot_sync(0xffffffffu, m);
    if (valid) y[i] = from_acc<T>(mul_rn(to_acc(zq[i]), acc_t<T>(m)));
    if (L.lane == 0) bits[w] = b;
  }
}

template <class T>
__global__ void epilogue_kernel(const T* z, T* h, uint32_t* __restrict__ bits, const acc_t<T>* __restrict__ scale,
                                const acc_t<T>* __restrict__ shift, int64_t C, int64_t inner, int64_t n) {
  using A = acc_t<T>;
  WordLoop L;
  const int64_t words = (n + 31) >> 5;
  for (int64_t w = L.first; w < words; w += L.step) {
    const int64_t i = w * 32 + L.lane;
    const bool valid = i < n;
    A t = A(0);
    if (valid) {
      const int64_t c = (i / inner) % C;
      t = add_rn(mul_rn(to_acc(z[i]), scale[c]), shift[c]);  // no fma: match the eager reference
    }
    const uint32_t b = __ballot_sync(0xffffffffu, valid && t > A(0));
    if (valid) h[i] = from_acc<T>((A(0) > t) ? A(0) : t);  // max(0, t), NaN passes
    if (L.lane == 0) bits[w] = b;
  }
}

template <class T>
__global__ void wsum_kernel(const WsumArgs args, const acc_t<T>* __restrict__ acc_in, acc_t<T>* __restrict__ acc_out,
                            T* __restrict__ out, int64_t n) {
  using A = acc_t<T>;
  const int64_t i0 = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = i0; i < n; i += step) {
    A a;
    int k = 0;
    if (acc_in) {
      a = acc_in[i];
    } else {
      a = mul_rn(A(args.w[0]), to_acc(static_cast<const T*>(args.xs[0])[i]));
      k = 1;
    }
    for (; k < args.K; ++k) a = fma(A(args.w[k]), to_acc(static_cast<const T*>(args.xs[k])[i]), a);
    if (acc_out) acc_out[i] = a;
    else out[i] = from_acc<T>(a);
  }
}

template <class T>
__global__ void accumulate_kernel(acc_t<T>* __restrict__ acc, const T* __restrict__ x, double w, int64_t n) {
  const int64_t i0 = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const acc_t<T> wa = acc_t<T>(w);
  for (int64_t i = i0; i < n; i += step) acc[i] = fma(wa, to_acc(x[i]), acc[i]);
}

unsigned blocks_for(int64_t n) {
  const int64_t b = (n + kThreads - 1) / kThreads;
  return static_cast<unsigned>(b < 1 ? 1 : (b > (1 << 20) ? (1 << 20) : b));
}

}  // namespace

#define FEDSQ_CUDA_DISPATCH(dt, ...)                                    \
  switch (dt) {                                                         \
    case DType::f32: { using T = float; __VA_ARGS__; break; }           \
    case DType::f16: { using T = __half; __VA_ARGS__; break; }          \
    case DType::bf16: { using T = __nv_bfloat16; __VA_ARGS__; break; }  \
    case DType::f64: { using T = double; __VA_ARGS__; break; }          \
  }                                                                     \
  return cudaGetLastError();

cudaError_t pack(DType dt, const void* zs, uint32_t* bits, int64_t n, cudaStream_t s) {
  FEDSQ_CUDA_DISPATCH(dt, pack_kernel<T><<<blocks_for(n), kThreads, 0, s>>>(static_cast<const T*>(zs), bits, n));
}
cudaError_t apply(DType dt, const void* zq, const uint32_t* bits, void* y, int64_t n, cudaStream_t s) {
  FEDSQ_CUDA_DISPATCH(dt, apply_kernel<T><<<blocks_for(n), kThreads, 0, s>>>(static_cast<const T*>(zq), bits,
                                                                             static_cast<T*>(y), n));
}
cudaError_t gate(DType dt, const void* zq, const void* zs, void* y, uint32_t* bits, int64_t n, cudaStream_t s) {
  FEDSQ_CUDA_DISPATCH(dt, gate_kernel<T><<<blocks_for(n), kThreads, 0, s>>>(
                              static_cast<const T*>(zq), static_cast<const T*>(zs), static_cast<T*>(y), bits, n));
}
cudaError_t epilogue(DType dt, const void* z, void* h, uint32_t* bits, const void* scale, const void* shift,
                     int64_t C, int64_t inner, int64_t n, cudaStream_t s) {
  FEDSQ_CUDA_DISPATCH(dt, epilogue_kernel<T><<<blocks_for(n), kThreads, 0, s>>>(
                              static_cast<const T*>(z), static_cast<T*>(h), bits,
                              static_cast<const acc_t<T>*>(scale), static_cast<const acc_t<T>*>(shift), C, inner, n));
}
cudaError_t weighted_sum(DType dt, const WsumArgs& args, const void* acc_in, void* acc_out, void* out, int64_t n,
                         cudaStream_t s) {
  FEDSQ_CUDA_DISPATCH(dt, wsum_kernel<T><<<blocks_for(n), kThreads, 0, s>>>(
                              args, static_cast<const acc_t<T>*>(acc_in), static_cast<acc_t<T>*>(acc_out),
                              static_cast<T*>(out), n));
}
cudaError_t accumulate(DType dt, void* acc, const void* x, double w, int64_t n, cudaStream_t s) {
  FEDSQ_CUDA_DISPATCH(dt, accumulate_kernel<T><<<blocks_for(n), kThreads, 0, s>>>(
                              static_cast<acc_t<T>*>(acc), static_cast<const T*>(x), w, n));
}
#undef FEDSQ_CUDA_DISPATCH

}  // namespace cuda
}  // namespace fedsq
