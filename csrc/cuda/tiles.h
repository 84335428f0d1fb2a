// Index arithmetic of the CUDA vector kernels, host- and device-callable so
// that tests/ops/emulated/tile_check.cpp can replay every (block, thread, step) of
// a launch on the CPU and check coverage, mask words and channels exactly.
#pragma once
#include <cstdint>

#if defined(__CUDACC__)
#define FEDSQ_TILE_HD __host__ __device__ __forceinline__
#else
#define FEDSQ_TILE_HD inline
#endif

namespace fedsq {
namespace cuda {

// Warps stride over groups of U tiles; a tile is 32 vectors of V elements.
// Lane l of a warp owns vector (tile * 32 + l): elements e0 .. e0 + V. A 32-bit
// mask word spans G = 32 / V lanes; the group's first lane (e0 == 32 w) writes
// word w. The loop bound (tiles) is uniform in a warp, so shuffles are safe.
struct TileIdx {
  int lane;
  int64_t first, step, tiles;  // in tiles
  FEDSQ_TILE_HD TileIdx(int64_t global_thread, int64_t total_threads, int64_t n, int V, int U)
      : lane(static_cast<int>(global_thread & 31)),
        first((global_thread >> 5) * U),
        step((total_threads >> 5) * U),
        tiles((n + 32 * V - 1) / (32 * V)) {}
  FEDSQ_TILE_HD int64_t e0(int64_t t, int u, int V) const { return ((t + u) * 32 + lane) * V; }
};

// Distance of one loop step in elements (all warps of the grid, U tiles each).
FEDSQ_TILE_HD int64_t loop_elems(int64_t grid, int threads, int V, int U) {
  return grid * (threads / 32) * U * 32 * V;
}

// Channel bookkeeping of the epilogue without per-element division: a lane
// keeps (c, r) = ((e / inner) % C, e % inner) of its element e and advances it
// by a fixed distance D with precomputed (D / inner) % C and D % inner.
struct ChanStep {
  int64_t dq, dr;  // (D / inner) % C, D % inner
};
FEDSQ_TILE_HD ChanStep chan_step(int64_t D, int64_t C, int64_t inner) { return ChanStep{(D / inner) % C, D % inner}; }

struct ChanPos {
  int64_t c, r;
  FEDSQ_TILE_HD static ChanPos at(int64_t e, int64_t C, int64_t inner) { return ChanPos{(e / inner) % C, e % inner}; }
  FEDSQ_TILE_HD void advance(const ChanStep& s, int64_t C, int64_t inner) {
    r += s.dr;
    c += s.dq;
    if (r >= inner) {
      r -= inner;
      ++c;
    }
    if (c >= C) c -= C;  // c < 2C here: dq < C, and the carry adds at most one
  }
  FEDSQ_TILE_HD void next(int64_t C, int64_t inner) {  // D = 1
    if (++r == inner) {
      r = 0;
      if (++c == C) c = 0;
    }
  }
};

}  // namespace cuda
}  // namespace fedsq
