// CUDA kernels of fedsq_fast. Semantics match the CPU kernels and the eager
// reference: mask = z > 0 (ordered compare), y = z_q * mask as a multiply,
// half types computed in float and rounded to nearest even; reductions use a
// multiply for client 0 then fma in client order, like the CPU, so the two
// give the same bits.
//
// Bandwidth: every elementwise kernel moves 16-byte vectors (4 x f32, 8 x
// f16/bf16, 2 x f64), U of them per lane in flight, on a grid sized to the
// SMs. A warp takes "tiles" of 32 consecutive vectors (lane l: vector l), so
// loads are coalesced; a 32-bit mask word spans 32 / V lanes and is assembled
// with shuffles inside the warp (loop bounds are warp-uniform, so full-mask
// shuffles are safe). Misaligned views take the scalar kernels at the end.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <map>
#include <mutex>
#include <utility>

#include "kernels.cuh"
#include "tiles.h"

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
__device__ __forceinline__ float fma_rn(float a, float b, float c) { return __fmaf_rn(a, b, c); }
__device__ __forceinline__ double fma_rn(double a, double b, double c) { return __fma_rn(a, b, c); }

constexpr int kThreads = 256;
// Vectors per lane in flight (elementwise kernels): 4 x 16 bytes; 2 for the
// 2-byte types, whose 8-element vectors already need twice the registers.
template <class T> constexpr int kUnroll = sizeof(T) == 2 ? 2 : 4;
constexpr int kMinBlocks = 4;  // per SM: caps registers at 64, 1024 threads resident

template <class T, int N>
struct alignas(sizeof(T) * N) Vec {
  T v[N];
};
template <class T> constexpr int kVec = 16 / static_cast<int>(sizeof(T));  // elements per 16-byte vector

// V elements at p + e: one vector load when all lie below n, else element by
// element (zero past n). The vector path needs p 16-byte aligned (checked by
// the launcher) and e a multiple of V.
template <class T, int V>
__device__ __forceinline__ Vec<T, V> load_vec(const T* p, int64_t e, int64_t n) {
  if (e + V <= n) return *reinterpret_cast<const Vec<T, V>*>(p + e);
  Vec<T, V> r;
#pragma unroll
  for (int j = 0; j < V; ++j) r.v[j] = e + j < n ? p[e + j] : from_acc<T>(acc_t<T>(0));
  return r;
}
template <class T, int V>
__device__ __forceinline__ void store_vec(T* p, int64_t e, int64_t n, const Vec<T, V>& r) {
  if (e + V <= n) {
    *reinterpret_cast<Vec<T, V>*>(p + e) = r;
    return;
  }
#pragma unroll
  for (int j = 0; j < V; ++j)
    if (e + j < n) p[e + j] = r.v[j];
}

// OR over aligned groups of G lanes (G a power of two): each lane holds its
// V bits already shifted to their place in the group's 32-bit word.
template <int G>
__device__ __forceinline__ uint32_t or_group(uint32_t x) {
#pragma unroll
  for (int o = G / 2; o > 0; o /= 2) x |= __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

// The grid's tile walk (tiles.h, replayed on the CPU by tests/ops/emulated/tile_check.cpp).
template <int V, int U>
struct TileLoop : TileIdx {
  __device__ TileLoop(int64_t n)
      : TileIdx(static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x,
                static_cast<int64_t>(gridDim.x) * blockDim.x, n, V, U) {}
  __device__ int64_t e0(int64_t t, int u) const { return TileIdx::e0(t, u, V); }
};

// ---------------------------------------------------------------------------
// Vector kernels. bits words: word w covers elements [32w, 32w + 32); its
// lane group's first lane (e0 == 32w) writes it, for every w < ceil(n / 32).
template <class T>
__global__ void __launch_bounds__(kThreads, kMinBlocks) pack_vec(const T* zs, uint32_t* bits, int64_t n) {
  constexpr int V = kVec<T>, G = 32 / V, U = kUnroll<T>;
  TileLoop<V, U> L(n);
  for (int64_t t = L.first; t < L.tiles; t += L.step) {
    Vec<T, V> z[U];
#pragma unroll
    for (int u = 0; u < U; ++u) z[u] = load_vec<T, V>(zs, L.e0(t, u), n);
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t e0 = L.e0(t, u);
      uint32_t m = 0;
#pragma unroll
      for (int j = 0; j < V; ++j) m |= uint32_t(e0 + j < n && to_acc(z[u].v[j]) > acc_t<T>(0)) << j;
      m = or_group<G>(m << ((L.lane % G) * V));
      if (L.lane % G == 0 && e0 < n) bits[e0 >> 5] = m;
    }
  }
}

template <class T>
__global__ void __launch_bounds__(kThreads, kMinBlocks) apply_vec(const T* zq, const uint32_t* bits, T* y, int64_t n) {
  constexpr int V = kVec<T>, U = kUnroll<T>;
  using A = acc_t<T>;
  TileLoop<V, U> L(n);
  for (int64_t t = L.first; t < L.tiles; t += L.step) {
    Vec<T, V> q[U];
    uint32_t w[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t e0 = L.e0(t, u);
      q[u] = load_vec<T, V>(zq, e0, n);
      w[u] = e0 < n ? bits[e0 >> 5] >> (e0 & 31) : 0u;  // G lanes share a word: one transaction
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t e0 = L.e0(t, u);
      if (e0 >= n) continue;
      Vec<T, V> r;
#pragma unroll
      for (int j = 0; j < V; ++j) r.v[j] = from_acc<T>(mul_rn(to_acc(q[u].v[j]), A((w[u] >> j) & 1u)));
      store_vec<T, V>(y, e0, n, r);
    }
  }
}

template <class T>
__global__ void __launch_bounds__(kThreads, kMinBlocks)
    gate_vec(const T* zq, const T* zs, T* y, uint32_t* bits, int64_t n) {
  constexpr int V = kVec<T>, G = 32 / V, U = kUnroll<T>;
  using A = acc_t<T>;
  TileLoop<V, U> L(n);
  for (int64_t t = L.first; t < L.tiles; t += L.step) {
    Vec<T, V> q[U], s[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      q[u] = load_vec<T, V>(zq, L.e0(t, u), n);
      s[u] = load_vec<T, V>(zs, L.e0(t, u), n);
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t e0 = L.e0(t, u);
      uint32_t m = 0;
      Vec<T, V> r;
#pragma unroll
      for (int j = 0; j < V; ++j) {
        const bool b = e0 + j < n && to_acc(s[u].v[j]) > A(0);
        m |= uint32_t(b) << j;
        r.v[j] = from_acc<T>(mul_rn(to_acc(q[u].v[j]), A(b)));
      }
      if (e0 < n) store_vec<T, V>(y, e0, n, r);
      m = or_group<G>(m << ((L.lane % G) * V));
      if (L.lane % G == 0 && e0 < n) bits[e0 >> 5] = m;
    }
  }
}

template <class T>
__global__ void __launch_bounds__(kThreads, kMinBlocks)
    epilogue_vec(const T* z, T* h, uint32_t* bits, const acc_t<T>* scale, const acc_t<T>* shift, int64_t C,
                 int64_t inner, int64_t n, ChanStep tile_step, ChanStep loop_step) {
  constexpr int V = kVec<T>, G = 32 / V, U = kUnroll<T>;
  using A = acc_t<T>;
  TileLoop<V, U> L(n);
  ChanPos pos = ChanPos::at(L.e0(L.first, 0), C, inner);  // the only divisions: once per lane
  for (int64_t t = L.first; t < L.tiles; t += L.step) {
    Vec<T, V> x[U];
#pragma unroll
    for (int u = 0; u < U; ++u) x[u] = load_vec<T, V>(z, L.e0(t, u), n);
    ChanPos p = pos;
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t e0 = L.e0(t, u);
      uint32_t m = 0;
      Vec<T, V> r;
      ChanPos q = p;
#pragma unroll
      for (int j = 0; j < V; ++j) {
        const A sc = scale ? scale[q.c] : A(1), sh = shift ? shift[q.c] : A(0);
        const A v = add_rn(mul_rn(to_acc(x[u].v[j]), sc), sh);  // no fma: match the eager reference
        const bool b = e0 + j < n && v > A(0);
        m |= uint32_t(b) << j;
        r.v[j] = from_acc<T>((A(0) > v) ? A(0) : v);  // max(0, t), NaN passes
        q.next(C, inner);
      }
      if (e0 < n) store_vec<T, V>(h, e0, n, r);
      m = or_group<G>(m << ((L.lane % G) * V));
      if (L.lane % G == 0 && e0 < n) bits[e0 >> 5] = m;
      p.advance(tile_step, C, inner);
    }
    pos.advance(loop_step, C, inner);
  }
}

// Soft gates: g in the accumulation type (kernels.h's SoftKind), rounded to T (the stored gate).
// Comparisons written so that NaN passes through (fminf/fmaxf would drop it).
template <SoftKind K>
__device__ __forceinline__ float soft_g(float z) {
  if constexpr (K == SoftKind::sigmoid) {
    return __fdiv_rn(1.0f, 1.0f + expf(-z));
  } else if constexpr (K == SoftKind::phi) {
    return 0.5f * erfcf(-z * 0.707106781186547524f);
  } else if constexpr (K == SoftKind::phi_tanh) {
    const float u = z + 0.044715f * (z * z * z);
    return __fdiv_rn(1.0f, 1.0f + expf(u * -1.5957691216057308f));
  } else if constexpr (K == SoftKind::hardsigmoid) {
    float t = z + 3.0f;
    t = 0.0f > t ? 0.0f : t;
    t = 6.0f < t ? 6.0f : t;
    return __fdiv_rn(t, 6.0f);
  } else {
    const float e = expf(20.0f < z ? 20.0f : z);
    const float n = e * (e + 2.0f);
    return __fdiv_rn(n, n + 2.0f);
  }
}
template <SoftKind K>
__device__ __forceinline__ double soft_g(double z) {
  if constexpr (K == SoftKind::sigmoid) {
    return 1.0 / (1.0 + exp(-z));
  } else if constexpr (K == SoftKind::phi) {
    return 0.5 * erfc(-z * 0.70710678118654752440);
  } else if constexpr (K == SoftKind::phi_tanh) {
    return 0.5 * (1.0 + tanh(0.79788456080286535588 * (z + 0.044715 * (z * z * z))));
  } else if constexpr (K == SoftKind::hardsigmoid) {
    double t = z + 3.0;
    t = 0.0 > t ? 0.0 : t;
    t = 6.0 < t ? 6.0 : t;
    return t / 6.0;
  } else {
    return tanh(log1p(exp(z)));
  }
}
template <class T, SoftKind K>
__device__ __forceinline__ T soft_y(T q, T z) {
  using A = acc_t<T>;
  const A g = to_acc(from_acc<T>(soft_g<K>(to_acc(z))));
  return from_acc<T>(mul_rn(to_acc(q), g));
}

template <class T, SoftKind K>
__global__ void __launch_bounds__(kThreads, kMinBlocks) soft_vec(const T* zq, const T* zs, T* y, int64_t n) {
  constexpr int V = kVec<T>, U = kUnroll<T>;
  TileLoop<V, U> L(n);
  for (int64_t t = L.first; t < L.tiles; t += L.step) {
    Vec<T, V> q[U], z[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      q[u] = load_vec<T, V>(zq, L.e0(t, u), n);
      z[u] = load_vec<T, V>(zs, L.e0(t, u), n);
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t e0 = L.e0(t, u);
      if (e0 >= n) continue;
      Vec<T, V> r;
#pragma unroll
      for (int j = 0; j < V; ++j) r.v[j] = soft_y<T, K>(q[u].v[j], z[u].v[j]);
      store_vec<T, V>(y, e0, n, r);
    }
  }
}

// ---------------------------------------------------------------------------
// Scalar kernels: misaligned views (a storage offset that is not a multiple of
// 16 bytes). No __restrict__ on pointers that may alias.
struct WordLoop {
  int lane;
  int64_t first, step;
  __device__ WordLoop()
      : lane(threadIdx.x & 31),
        first((static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) >> 5),
        step((static_cast<int64_t>(gridDim.x) * blockDim.x) >> 5) {}
};

template <class T>
__global__ void pack_scalar(const T* zs, uint32_t* bits, int64_t n) {
  WordLoop L;
  const int64_t words = (n + 31) >> 5;
  for (int64_t w = L.first; w < words; w += L.step) {
    const int64_t i = w * 32 + L.lane;
    const uint32_t b = __ballot_sync(0xffffffffu, i < n && to_acc(zs[i]) > acc_t<T>(0));
    if (L.lane == 0) bits[w] = b;
  }
}

template <class T>
__global__ void apply_scalar(const T* zq, const uint32_t* bits, T* y, int64_t n) {
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += step)
    y[i] = from_acc<T>(mul_rn(to_acc(zq[i]), acc_t<T>((bits[i >> 5] >> (i & 31)) & 1u)));
}

template <class T>
__global__ void gate_scalar(const T* zq, const T* zs, T* y, uint32_t* bits, int64_t n) {
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

template <class T, SoftKind K>
__global__ void soft_scalar(const T* zq, const T* zs, T* y, int64_t n) {
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += step)
    y[i] = soft_y<T, K>(zq[i], zs[i]);
}

template <class T>
__global__ void epilogue_scalar(const T* z, T* h, uint32_t* bits, const acc_t<T>* scale, const acc_t<T>* shift,
                                int64_t C, int64_t inner, int64_t n) {
  using A = acc_t<T>;
  WordLoop L;
  const int64_t words = (n + 31) >> 5;
  for (int64_t w = L.first; w < words; w += L.step) {
    const int64_t i = w * 32 + L.lane;
    const bool valid = i < n;
    A t = A(0);
    if (valid) {
      const int64_t c = (i / inner) % C;  // the rare path: divisions are acceptable here
      t = add_rn(mul_rn(to_acc(z[i]), scale ? scale[c] : A(1)), shift ? shift[c] : A(0));
    }
    const uint32_t b = __ballot_sync(0xffffffffu, valid && t > A(0));
    if (valid) h[i] = from_acc<T>((A(0) > t) ? A(0) : t);
    if (L.lane == 0) bits[w] = b;
  }
}

// ---------------------------------------------------------------------------
// Multi-tensor kernels: blocks stride over chunks; a table gives each chunk's item.
__device__ __forceinline__ const MtItem& item_of(const MtTable& tb, int64_t chunk) {
  return tb.items[tb.chunk_item[chunk]];
}

template <class A> __device__ __forceinline__ const A* weights(const MtTable& tb);
template <> __device__ __forceinline__ const float* weights<float>(const MtTable& tb) { return tb.wf; }
template <> __device__ __forceinline__ const double* weights<double>(const MtTable& tb) { return tb.wd; }

template <class T>
__device__ void wsum_chunk(const MtTable& tb, const MtItem& it, int64_t i0, int64_t i1) {
  using A = acc_t<T>;
  constexpr int V = kVec<T>;
  const A* w = weights<A>(tb);
  const void* const* xs = tb.xs + it.x0;
  T* out = static_cast<T*>(it.out);
  const int K = tb.K;
  if (it.vec) {  // i0 is a multiple of kChunk, so of V
    for (int64_t e = i0 + static_cast<int64_t>(threadIdx.x) * V; e < i1; e += static_cast<int64_t>(blockDim.x) * V) {
      A a[V];
      Vec<T, V> x = load_vec<T, V>(static_cast<const T*>(xs[0]), e, i1);
#pragma unroll
      for (int j = 0; j < V; ++j) a[j] = mul_rn(w[0], to_acc(x.v[j]));
#pragma unroll 4
      for (int k = 1; k < K; ++k) {
        x = load_vec<T, V>(static_cast<const T*>(xs[k]), e, i1);
        const A wk = w[k];
#pragma unroll
        for (int j = 0; j < V; ++j) a[j] = fma_rn(wk, to_acc(x.v[j]), a[j]);
      }
      Vec<T, V> r;
#pragma unroll
      for (int j = 0; j < V; ++j) r.v[j] = from_acc<T>(a[j]);
      store_vec<T, V>(out, e, i1, r);
    }
    return;
  }
  for (int64_t i = i0 + threadIdx.x; i < i1; i += blockDim.x) {
    A a = mul_rn(w[0], to_acc(static_cast<const T*>(xs[0])[i]));
    for (int k = 1; k < K; ++k) a = fma_rn(w[k], to_acc(static_cast<const T*>(xs[k])[i]), a);
    out[i] = from_acc<T>(a);
  }
}

template <class T>
__device__ void accumulate_chunk(const MtTable& tb, const MtItem& it, int64_t i0, int64_t i1) {
  using A = acc_t<T>;
  constexpr int V = kVec<T>;
  const A w = weights<A>(tb)[0];
  const T* x = static_cast<const T*>(tb.xs[it.x0]);
  A* acc = static_cast<A*>(it.out);
  if (it.vec) {
    for (int64_t e = i0 + static_cast<int64_t>(threadIdx.x) * V; e < i1; e += static_cast<int64_t>(blockDim.x) * V) {
      const Vec<T, V> xv = load_vec<T, V>(x, e, i1);
      Vec<A, V> av = load_vec<A, V>(acc, e, i1);
#pragma unroll
      for (int j = 0; j < V; ++j) av.v[j] = fma_rn(w, to_acc(xv.v[j]), av.v[j]);
      store_vec<A, V>(acc, e, i1, av);
    }
    return;
  }
  for (int64_t i = i0 + threadIdx.x; i < i1; i += blockDim.x) acc[i] = fma_rn(w, to_acc(x[i]), acc[i]);
}

template <class T>
__device__ double sq_dist_chunk(const MtTable& tb, const MtItem& it, int64_t i0, int64_t i1) {
  constexpr int V = kVec<T>;
  const T* x = static_cast<const T*>(tb.xs[it.x0]);
  const T* r = static_cast<const T*>(it.out);
  double s = 0.0;
  if (it.vec) {
    for (int64_t e = i0 + static_cast<int64_t>(threadIdx.x) * V; e < i1; e += static_cast<int64_t>(blockDim.x) * V) {
      const Vec<T, V> xv = load_vec<T, V>(x, e, i1), rv = load_vec<T, V>(r, e, i1);  // zeros past i1
#pragma unroll
      for (int j = 0; j < V; ++j) {
        const double d = add_rn(to_acc(xv.v[j]), -to_acc(rv.v[j]));  // difference in A, like the CPU
        s += d * d;
      }
    }
  } else {
    for (int64_t i = i0 + threadIdx.x; i < i1; i += blockDim.x) {
      const double d = add_rn(to_acc(x[i]), -to_acc(r[i]));
      s += d * d;
    }
  }
  return s;
}

#define FEDSQ_MT_DISPATCH(dt, ...)                                      \
  switch (static_cast<DType>(dt)) {                                     \
    case DType::f32: { using T = float; __VA_ARGS__; break; }           \
    case DType::f16: { using T = __half; __VA_ARGS__; break; }          \
    case DType::bf16: { using T = __nv_bfloat16; __VA_ARGS__; break; }  \
    case DType::f64: { using T = double; __VA_ARGS__; break; }          \
  }

__global__ void __launch_bounds__(kThreads) wsum_mt_kernel(const MtTable tb) {
  for (int64_t c = blockIdx.x; c < tb.chunks; c += gridDim.x) {
    const MtItem& it = item_of(tb, c);
    const int64_t i0 = (c - it.chunk0) * kChunk, i1 = min(i0 + kChunk, it.n);
    FEDSQ_MT_DISPATCH(it.dt, wsum_chunk<T>(tb, it, i0, i1));
  }
}

__global__ void __launch_bounds__(kThreads) accumulate_mt_kernel(const MtTable tb) {
  for (int64_t c = blockIdx.x; c < tb.chunks; c += gridDim.x) {
    const MtItem& it = item_of(tb, c);
    const int64_t i0 = (c - it.chunk0) * kChunk, i1 = min(i0 + kChunk, it.n);
    FEDSQ_MT_DISPATCH(it.dt, accumulate_chunk<T>(tb, it, i0, i1));
  }
}

// Block sum in a fixed order (warp shuffles, then warp 0): deterministic.
__device__ double block_sum(double v) {
  __shared__ double warp_sums[kThreads / 32];
#pragma unroll
  for (int o = 16; o > 0; o /= 2) v += __shfl_down_sync(0xffffffffu, v, o);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  __syncthreads();  // warp_sums may still be read from the previous call
  if (lane == 0) warp_sums[warp] = v;
  __syncthreads();
  v = 0.0;
  if (warp == 0) {
    v = lane < static_cast<int>(blockDim.x >> 5) ? warp_sums[lane] : 0.0;
#pragma unroll
    for (int o = 16; o > 0; o /= 2) v += __shfl_down_sync(0xffffffffu, v, o);
  }
  return v;  // valid in thread 0
}

__global__ void __launch_bounds__(kThreads) sq_dist_mt_kernel(const MtTable tb, double* partials) {
  for (int64_t c = blockIdx.x; c < tb.chunks; c += gridDim.x) {
    const MtItem& it = item_of(tb, c);
    const int64_t i0 = (c - it.chunk0) * kChunk, i1 = min(i0 + kChunk, it.n);
    double s = 0.0;
    FEDSQ_MT_DISPATCH(it.dt, s = sq_dist_chunk<T>(tb, it, i0, i1));
    s = block_sum(s);
    if (threadIdx.x == 0) partials[c] = s;
  }
}

__global__ void __launch_bounds__(kThreads) sum_partials_kernel(const double* partials, int64_t count, double* out) {
  double s = 0.0;
  for (int64_t i = threadIdx.x; i < count; i += blockDim.x) s += partials[i];
  s = block_sum(s);
  if (threadIdx.x == 0) *out = s;
}

__global__ void __launch_bounds__(kThreads) int_average_mt_kernel(const MtTable tb) {
  for (int64_t c = blockIdx.x; c < tb.chunks; c += gridDim.x) {
    const MtItem& it = item_of(tb, c);
    const int64_t i0 = (c - it.chunk0) * kChunk, i1 = min(i0 + kChunk, it.n);
    const IType t = static_cast<IType>(it.dt);
    for (int64_t i = i0 + threadIdx.x; i < i1; i += blockDim.x)
      int_store(it.out, i, t, int_average_at(tb.xs + it.x0, tb.wi, tb.K, tb.wi_total, i, t));
  }
}

// ---------------------------------------------------------------------------
bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

template <class F> const void* kp(F* f) { return reinterpret_cast<const void*>(f); }

// Blocks of `kernel` resident per SM (cached per kernel and device).
int resident_blocks(const void* kernel) {
  static std::mutex mu;
  static std::map<std::pair<const void*, int>, int> cache;
  int dev = 0;
  cudaGetDevice(&dev);
  std::lock_guard<std::mutex> lock(mu);
  auto it = cache.find({kernel, dev});
  if (it != cache.end()) return it->second;
  int b = 0;
  if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&b, kernel, kThreads, 0) != cudaSuccess || b < 1) {
    cudaGetLastError();  // clear it: the launch reports real errors
    b = kMinBlocks;
  }
  cache[{kernel, dev}] = b;
  return b;
}

// One wave: every block resident at once, so blocks that stride over equal
// work finish together (a second, partial wave would idle most SMs).
unsigned grid_for(const void* kernel, int64_t work_items) {  // work_items: tile groups or chunks
  const int64_t cap = static_cast<int64_t>(multiprocessors()) * resident_blocks(kernel);
  const int64_t b = work_items < 1 ? 1 : (work_items < cap ? work_items : cap);
  return static_cast<unsigned>(b);
}

template <class T>
unsigned vec_grid(const void* kernel, int64_t n) {  // blocks of 8 warps, each warp kUnroll tiles per step
  constexpr int64_t per_block = static_cast<int64_t>(kThreads / 32) * kUnroll<T> * 32 * kVec<T>;
  return grid_for(kernel, (n + per_block - 1) / per_block);
}

unsigned scalar_grid(const void* kernel, int64_t n) { return grid_for(kernel, (n + kThreads - 1) / kThreads); }

}  // namespace

int multiprocessors() {
  static int cache[64] = {0};
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || dev < 0 || dev >= 64) return 132;
  if (cache[dev] == 0) {
    int sms = 0;
    if (cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess || sms <= 0) sms = 132;
    cache[dev] = sms;
  }
  return cache[dev];
}

#define FEDSQ_CUDA_DISPATCH(dt, ...)                                    \
  switch (dt) {                                                         \
    case DType::f32: { using T = float; __VA_ARGS__; break; }           \
    case DType::f16: { using T = __half; __VA_ARGS__; break; }          \
    case DType::bf16: { using T = __nv_bfloat16; __VA_ARGS__; break; }  \
    case DType::f64: { using T = double; __VA_ARGS__; break; }          \
  }                                                                     \
  return cudaGetLastError();

cudaError_t pack(DType dt, const void* zs, uint32_t* bits, int64_t n, cudaStream_t s) {
  FEDSQ_CUDA_DISPATCH(dt, {
    const T* p = static_cast<const T*>(zs);
    if (aligned16(zs)) pack_vec<T><<<vec_grid<T>(kp(&pack_vec<T>), n), kThreads, 0, s>>>(p, bits, n);
    else pack_scalar<T><<<scalar_grid(kp(&pack_scalar<T>), n), kThreads, 0, s>>>(p, bits, n);
  });
}

cudaError_t apply(DType dt, const void* zq, const uint32_t* bits, void* y, int64_t n, cudaStream_t s) {
  FEDSQ_CUDA_DISPATCH(dt, {
    const T* q = static_cast<const T*>(zq);
    T* o = static_cast<T*>(y);
    if (aligned16(zq) && aligned16(y))
      apply_vec<T><<<vec_grid<T>(kp(&apply_vec<T>), n), kThreads, 0, s>>>(q, bits, o, n);
    else apply_scalar<T><<<scalar_grid(kp(&apply_scalar<T>), n), kThreads, 0, s>>>(q, bits, o, n);
  });
}

cudaError_t gate(DType dt, const void* zq, const void* zs, void* y, uint32_t* bits, int64_t n, cudaStream_t s) {
  FEDSQ_CUDA_DISPATCH(dt, {
    const T* q = static_cast<const T*>(zq);
    const T* z = static_cast<const T*>(zs);
    T* o = static_cast<T*>(y);
    if (aligned16(zq) && aligned16(zs) && aligned16(y))
      gate_vec<T><<<vec_grid<T>(kp(&gate_vec<T>), n), kThreads, 0, s>>>(q, z, o, bits, n);
    else gate_scalar<T><<<scalar_grid(kp(&gate_scalar<T>), n), kThreads, 0, s>>>(q, z, o, bits, n);
  });
}

cudaError_t epilogue(DType dt, const void* z, void* h, uint32_t* bits, const void* scale, const void* shift,
                     int64_t C, int64_t inner, int64_t n, cudaStream_t s) {
  FEDSQ_CUDA_DISPATCH(dt, {
    using A = acc_t<T>;
    const T* zp = static_cast<const T*>(z);
    T* hp = static_cast<T*>(h);
    const A* sc = static_cast<const A*>(scale);
    const A* sh = static_cast<const A*>(shift);
    if (aligned16(z) && aligned16(h)) {
      const unsigned grid = vec_grid<T>(kp(&epilogue_vec<T>), n);
      const int64_t tile = 32 * kVec<T>, loop = loop_elems(grid, kThreads, kVec<T>, kUnroll<T>);
      epilogue_vec<T><<<grid, kThreads, 0, s>>>(zp, hp, bits, sc, sh, C, inner, n, chan_step(tile, C, inner),
                                                chan_step(loop, C, inner));
    } else {
      epilogue_scalar<T><<<scalar_grid(kp(&epilogue_scalar<T>), n), kThreads, 0, s>>>(zp, hp, bits, sc, sh, C,
                                                                                         inner, n);
    }
  });
}
template <SoftKind K>
cudaError_t soft_kind_launch(DType dt, const void* zq, const void* zs, void* y, int64_t n, cudaStream_t s) {
  FEDSQ_CUDA_DISPATCH(dt, {
    const T* q = static_cast<const T*>(zq);
    const T* z = static_cast<const T*>(zs);
    T* o = static_cast<T*>(y);
    if (aligned16(zq) && aligned16(zs) && aligned16(y))
      soft_vec<T, K><<<vec_grid<T>(kp(&soft_vec<T, K>), n), kThreads, 0, s>>>(q, z, o, n);
    else soft_scalar<T, K><<<scalar_grid(kp(&soft_scalar<T, K>), n), kThreads, 0, s>>>(q, z, o, n);
  });
}

cudaError_t soft_apply(DType dt, SoftKind kind, const void* zq, const void* zs, void* y, int64_t n, cudaStream_t s) {
  switch (kind) {
    case SoftKind::sigmoid: return soft_kind_launch<SoftKind::sigmoid>(dt, zq, zs, y, n, s);
    case SoftKind::phi: return soft_kind_launch<SoftKind::phi>(dt, zq, zs, y, n, s);
    case SoftKind::phi_tanh: return soft_kind_launch<SoftKind::phi_tanh>(dt, zq, zs, y, n, s);
    case SoftKind::hardsigmoid: return soft_kind_launch<SoftKind::hardsigmoid>(dt, zq, zs, y, n, s);
    case SoftKind::tanh_softplus: return soft_kind_launch<SoftKind::tanh_softplus>(dt, zq, zs, y, n, s);
  }
  return cudaErrorInvalidValue;
}
#undef FEDSQ_CUDA_DISPATCH

cudaError_t weighted_sum_mt(const MtTable& t, cudaStream_t s) {
  wsum_mt_kernel<<<grid_for(kp(&wsum_mt_kernel), t.chunks), kThreads, 0, s>>>(t);
  return cudaGetLastError();
}
cudaError_t accumulate_mt(const MtTable& t, cudaStream_t s) {
  accumulate_mt_kernel<<<grid_for(kp(&accumulate_mt_kernel), t.chunks), kThreads, 0, s>>>(t);
  return cudaGetLastError();
}
cudaError_t sq_dist_mt(const MtTable& t, double* partials, double* result, cudaStream_t s) {
  sq_dist_mt_kernel<<<grid_for(kp(&sq_dist_mt_kernel), t.chunks), kThreads, 0, s>>>(t, partials);
  sum_partials_kernel<<<1, kThreads, 0, s>>>(partials, t.chunks, result);
  return cudaGetLastError();
}
cudaError_t int_average_mt(const MtTable& t, cudaStream_t s) {
  int_average_mt_kernel<<<grid_for(kp(&int_average_mt_kernel), t.chunks), kThreads, 0, s>>>(t);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace fedsq
