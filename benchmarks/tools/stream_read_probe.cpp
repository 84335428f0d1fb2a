// Memory-read probe behind the K-client averaging numbers in benchmarks/RESULTS.md: reads the
// same 384 MB once as one sequential stream and once as 8 streams interleaved in 16 KB tiles
// (the access pattern of weighted_average over K = 8 clients of 48 MB). On machines where the
// 8-stream read is much slower, no single-pass K-client kernel can reach the copy_ floor.
//   g++ -O3 -mavx2 -fopenmp benchmarks/tools/stream_read_probe.cpp -o /tmp/probe && OMP_NUM_THREADS=2 /tmp/probe
#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>

int main() {
  using clk = std::chrono::steady_clock;
  const long P = 12L << 20, K = 8, kTile = 4096;  // bench_ops.py's sizes; kernels_impl.h's tile
  float* xs[K];
  for (long k = 0; k < K; ++k) xs[k] = static_cast<float*>(aligned_alloc(64, P * 4)), memset(xs[k], 0, P * 4);
  float* big = static_cast<float*>(aligned_alloc(64, K * P * 4));
  memset(big, 0, K * P * 4);
  for (int rep = 0; rep < 3; ++rep) {
    double one = 1e9, inter = 1e9;
    for (int r = 0; r < 10; ++r) {  // minima: noise only adds time
      float s = 0;
      auto t = clk::now();
#pragma omp parallel reduction(+ : s)
      {
        __m256 acc = _mm256_setzero_ps();
        const long c = K * P / omp_get_num_threads(), i0 = omp_get_thread_num() * c;
        for (long i = i0; i < i0 + c; i += 8) acc = _mm256_add_ps(acc, _mm256_load_ps(big + i));
        alignas(32) float l[8];
        _mm256_store_ps(l, acc);
        for (float v : l) s += v;
      }
      one = std::min(one, std::chrono::duration<double, std::milli>(clk::now() - t).count());
      t = clk::now();
#pragma omp parallel reduction(+ : s)
      {
        __m256 acc = _mm256_setzero_ps();
        const long c = P / omp_get_num_threads(), i0 = omp_get_thread_num() * c;
        for (long t0 = i0; t0 < i0 + c; t0 += kTile)
          for (long k = 0; k < K; ++k)
            for (long i = t0; i < t0 + kTile; i += 8) acc = _mm256_add_ps(acc, _mm256_load_ps(xs[k] + i));
        alignas(32) float l[8];
        _mm256_store_ps(l, acc);
        for (float v : l) s += v;
      }
      inter = std::min(inter, std::chrono::duration<double, std::milli>(clk::now() - t).count());
      if (s != 0) std::puts("");  // keeps the reads
    }
    std::printf("read %ld MB: one stream %.2f ms (%.1f GB/s), %ld streams interleaved by %ld KB %.2f ms (%.1f GB/s)\n",
                K * P * 4 >> 20, one, K * P * 4 / one / 1e6, K, kTile * 4 / 1024, inter, K * P * 4 / inter / 1e6);
  }
}
