// Replays the CUDA vector kernels' index walk (csrc/cuda/tiles.h, the code the
// kernels use) for every thread of small grids on the CPU and checks: every
// element is visited exactly once, every mask word is written exactly once by
// the first lane of a lane group lying inside that word, and the division-free
// channel tracking of the epilogue equals (e / inner) % C at every element.
#include <cstdio>
#include <vector>

#include "cuda/tiles.h"

using namespace fedsq::cuda;

static long long failures = 0;
#define CHECK(cond, ...)                         \
  do {                                           \
    if (!(cond)) {                               \
      if (failures < 10) std::printf(__VA_ARGS__); \
      ++failures;                                \
    }                                            \
  } while (0)

static void replay(int V, int U, int64_t grid, int64_t n, int64_t C, int64_t inner) {
  const int threads = 256, G = 32 / V;
  std::vector<int> seen(n, 0), words((n + 31) / 32, 0);
  const int64_t total = grid * threads;
  const ChanStep tile_step = chan_step(32 * V, C, inner);
  const ChanStep loop_step = chan_step(loop_elems(grid, threads, V, U), C, inner);
  for (int64_t g = 0; g < total; ++g) {
    const TileIdx L(g, total, n, V, U);
    ChanPos pos = ChanPos::at(L.e0(L.first, 0, V), C, inner);
    for (int64_t t = L.first; t < L.tiles; t += L.step) {
      ChanPos p = pos;
      for (int u = 0; u < U; ++u) {
        const int64_t e0 = L.e0(t, u, V);
        ChanPos q = p;
        for (int j = 0; j < V; ++j) {
          const int64_t e = e0 + j;
          if (e < n) {
            ++seen[e];
            CHECK(q.c == (e / inner) % C && q.r == e % inner, "channel V=%d grid=%lld n=%lld C=%lld inner=%lld e=%lld\n",
                  V, (long long)grid, (long long)n, (long long)C, (long long)inner, (long long)e);
          }
          q.next(C, inner);
        }
        if (L.lane % G == 0 && e0 < n) {
          CHECK(e0 % 32 == 0 && (e0 >> 5) == ((e0 + (G - 1) * V) >> 5), "word group V=%d e0=%lld\n", V, (long long)e0);
          ++words[e0 >> 5];
        }
        p.advance(tile_step, C, inner);
      }
      pos.advance(loop_step, C, inner);
    }
  }
  for (int64_t i = 0; i < n; ++i)
    CHECK(seen[i] == 1, "element %lld seen %d times (V=%d grid=%lld n=%lld)\n", (long long)i, seen[i], V,
          (long long)grid, (long long)n);
  for (size_t w = 0; w < words.size(); ++w)
    CHECK(words[w] == 1, "word %zu written %d times (V=%d grid=%lld n=%lld)\n", w, words[w], V, (long long)grid,
          (long long)n);
}

int main() {
  const int64_t sizes[] = {0, 1, 31, 32, 33, 127, 128, 129, 1000, 4099, 65537, 300001};
  const int64_t chans[][2] = {{1, 1}, {3, 1}, {37, 1}, {64, 1}, {5, 7}, {6, 35}, {33, 3}, {2, 1000}, {129, 4}};
  const int vs[][2] = {{4, 4}, {8, 2}, {2, 4}};  // (V, U): f32, f16/bf16, f64 as the kernels instantiate them
  long long runs = 0;
  for (auto& vu : vs)
    for (int64_t grid : {1, 3, 7})
      for (int64_t n : sizes)
        for (auto& ci : chans) {
          replay(vu[0], vu[1], grid, n, ci[0], ci[1]);
          ++runs;
        }
  std::printf("%lld launches replayed\nOK: %lld mismatches\n", runs, failures);
  return failures == 0 ? 0 : 1;
}
