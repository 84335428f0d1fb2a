// CUDA implementations of the fedsq_fast ops: checks and allocation come from
// Ops<Backend> (ops_common.h); this file only sets the device and stream,
// builds the multi-tensor tables and calls the torch-free launchers in
// cuda/kernels.cu.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>  // not ATen/cuda/CUDAContext.h: it needs cuBLAS/cuSPARSE headers
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>

#include "cuda/kernels.cuh"
#include "ops_common.h"

namespace fedsq {
namespace {

// FEDSQ_FAST_CUDA_SYNC=1: synchronise after every launch, so an asynchronous
// fault (an illegal address) is reported by the op that caused it, not by a
// later one. Off by default (it serialises host and device); the GPU check
// script turns it on for its compute-sanitizer runs.
bool sync_mode() {
  static const bool on = [] {
    const char* v = std::getenv("FEDSQ_FAST_CUDA_SYNC");
    return v != nullptr && v[0] != '\0' && std::strcmp(v, "0") != 0;
  }();
  return on;
}

void check(cudaError_t e, const char* what, cudaStream_t s) {
  TORCH_CHECK(e == cudaSuccess, "fedsq_fast CUDA ", what, ": launch failed: ", cudaGetErrorString(e));
  if (sync_mode()) {
    const cudaError_t r = cudaStreamSynchronize(s);
    TORCH_CHECK(r == cudaSuccess, "fedsq_fast CUDA ", what, ": kernel failed: ", cudaGetErrorString(r));
  }
}
uint32_t* words(const at::Tensor& bits) { return reinterpret_cast<uint32_t*>(bits.data_ptr()); }
bool aligned(const void* p, size_t a) { return (reinterpret_cast<uintptr_t>(p) % a) == 0; }
size_t elem_size(DType dt) { return dt == DType::f64 ? 8 : dt == DType::f32 ? 4 : 2; }
size_t acc_size(DType dt) { return dt == DType::f64 ? 8 : 4; }

// The table of a multi-tensor launch, packed into one buffer: filled in pinned
// host memory, copied to the device on the op's stream (the caching host
// allocator keeps the pinned block until that copy is done), read by the kernel.
struct MtUpload {
  at::Tensor dev;  // kept alive until the launch is queued (stream-ordered reuse)
  cuda::MtTable table{};
};

size_t round8(size_t b) { return (b + 7) / 8 * 8; }

// vec_align(item): the alignment its pointers need for the vector path (out, xs).
template <class F>
MtUpload upload(const std::vector<ListItem>& items, int64_t K, const double* wd, const long long* wi,
                long long wi_total, c10::Device dev, F&& vec_ok) {
  const int64_t L = static_cast<int64_t>(items.size());
  int64_t chunks = 0;
  for (const ListItem& li : items) chunks += (li.n + cuda::kChunk - 1) / cuda::kChunk;
  const size_t o_items = 0, o_xs = round8(o_items + L * sizeof(cuda::MtItem)), o_wf = round8(o_xs + L * K * 8),
               o_wd = round8(o_wf + K * 4), o_wi = round8(o_wd + K * 8), o_ci = round8(o_wi + K * 8),
               total = round8(o_ci + chunks * 4);
  at::Tensor host = at::empty({static_cast<int64_t>(total)}, at::TensorOptions().dtype(at::kByte).pinned_memory(true));
  char* h = static_cast<char*>(host.data_ptr());
  auto* it = reinterpret_cast<cuda::MtItem*>(h + o_items);
  auto* xs = reinterpret_cast<const void**>(h + o_xs);
  auto* wf = reinterpret_cast<float*>(h + o_wf);
  auto* wdd = reinterpret_cast<double*>(h + o_wd);
  auto* wii = reinterpret_cast<long long*>(h + o_wi);
  auto* ci = reinterpret_cast<int32_t*>(h + o_ci);
  int64_t chunk = 0;
  for (int64_t j = 0; j < L; ++j) {
    const ListItem& li = items[j];
    it[j].n = li.n;
    it[j].chunk0 = chunk;
    it[j].out = li.out;
    it[j].x0 = j * K;
    it[j].dt = wi ? static_cast<int32_t>(li.it) : static_cast<int32_t>(li.dt);
    it[j].vec = wi ? 0 : static_cast<int32_t>(vec_ok(li));
    for (int64_t k = 0; k < K; ++k) xs[j * K + k] = li.xs[k];
    const int64_t end = chunk + (li.n + cuda::kChunk - 1) / cuda::kChunk;
    for (; chunk < end; ++chunk) ci[chunk] = static_cast<int32_t>(j);
  }
  for (int64_t k = 0; k < K; ++k) {
    wf[k] = wd ? static_cast<float>(wd[k]) : 0.0f;  // converted once, as the CPU kernels do per call
    wdd[k] = wd ? wd[k] : 0.0;
    wii[k] = wi ? wi[k] : 0;
  }
  MtUpload u;
  u.dev = host.to(at::TensorOptions().device(dev), /*non_blocking=*/true);
  const char* d = static_cast<const char*>(u.dev.data_ptr());
  u.table.items = reinterpret_cast<const cuda::MtItem*>(d + o_items);
  u.table.xs = reinterpret_cast<const void* const*>(d + o_xs);
  u.table.wf = reinterpret_cast<const float*>(d + o_wf);
  u.table.wd = reinterpret_cast<const double*>(d + o_wd);
  u.table.wi = reinterpret_cast<const long long*>(d + o_wi);
  u.table.chunk_item = reinterpret_cast<const int32_t*>(d + o_ci);
  u.table.wi_total = wi_total;
  u.table.L = static_cast<int32_t>(L);
  u.table.K = static_cast<int32_t>(K);
  u.table.chunks = chunk;
  return u;
}

struct CudaBackend {
  static at::Tensor empty_like(const at::Tensor& t) { return at::empty_like(t); }  // dense: keeps the strides
  static void pack(DType dt, const at::Tensor& zs, const at::Tensor& bits) {
    const c10::cuda::CUDAGuard g(zs.device());
    auto s = c10::cuda::getCurrentCUDAStream();
    check(cuda::pack(dt, zs.data_ptr(), words(bits), zs.numel(), s), "pack_mask", s);
  }
  static void apply(DType dt, const at::Tensor& zq, const at::Tensor& bits, const at::Tensor& y) {
    const c10::cuda::CUDAGuard g(zq.device());
    auto s = c10::cuda::getCurrentCUDAStream();
    check(cuda::apply(dt, zq.data_ptr(), words(bits), y.data_ptr(), zq.numel(), s), "apply_mask", s);
  }
  static void gate(DType dt, const at::Tensor& zq, const at::Tensor& zs, const at::Tensor& y,
                   const at::Tensor& bits) {
    const c10::cuda::CUDAGuard g(zq.device());
    auto s = c10::cuda::getCurrentCUDAStream();
    check(cuda::gate(dt, zq.data_ptr(), zs.data_ptr(), y.data_ptr(), words(bits), zq.numel(), s), "gate", s);
  }
  static void soft(DType dt, SoftKind k, const at::Tensor& zq, const at::Tensor& zs, const at::Tensor& y) {
    const c10::cuda::CUDAGuard g(zq.device());
    auto s = c10::cuda::getCurrentCUDAStream();
    check(cuda::soft_apply(dt, k, zq.data_ptr(), zs.data_ptr(), y.data_ptr(), zq.numel(), s), "soft_gate_apply", s);
  }
  static void epilogue(DType dt, const at::Tensor& z, const c10::optional<at::Tensor>& sc,
                       const c10::optional<at::Tensor>& sh, const EpilogueLayout& L, const at::Tensor& h,
                       const at::Tensor& bits) {
    const c10::cuda::CUDAGuard g(z.device());
    auto s = c10::cuda::getCurrentCUDAStream();
    check(cuda::epilogue(dt, z.data_ptr(), h.data_ptr(), words(bits), sc ? sc->data_ptr() : nullptr,
                         sh ? sh->data_ptr() : nullptr, L.C, L.inner, z.numel(), s),
          "struct_epilogue", s);
  }
  // One launch for every tensor and client (any K): no per-tensor launches,
  // no host syncs.
  static void weighted_sum_list(const std::vector<ListItem>& items, at::ArrayRef<double> w, c10::Device dev) {
    const c10::cuda::CUDAGuard g(dev);
    auto s = c10::cuda::getCurrentCUDAStream();
    const int64_t K = static_cast<int64_t>(w.size());
    MtUpload u = upload(items, K, w.data(), nullptr, 0, dev, [](const ListItem& it) {
      bool ok = aligned(it.out, 16);
      for (const void* p : it.xs) ok = ok && aligned(p, 16);
      return ok;
    });
    check(cuda::weighted_sum_mt(u.table, s), "weighted_sum", s);
  }
  static void int_average_list(const std::vector<ListItem>& items, const std::vector<long long>& q,
                               long long total, c10::Device dev) {
    const c10::cuda::CUDAGuard g(dev);
    auto s = c10::cuda::getCurrentCUDAStream();
    MtUpload u = upload(items, static_cast<int64_t>(q.size()), nullptr, q.data(), total, dev,
                        [](const ListItem&) { return false; });
    check(cuda::int_average_mt(u.table, s), "int_weighted_sum_list_out", s);
  }
  static void accumulate_list(const std::vector<ListItem>& items, double w, c10::Device dev) {
    const c10::cuda::CUDAGuard g(dev);
    auto s = c10::cuda::getCurrentCUDAStream();
    MtUpload u = upload(items, 1, &w, nullptr, 0, dev, [](const ListItem& it) {
      // x: one 16-byte vector of V elements; acc: V accumulators (16 or 32 bytes)
      const size_t V = 16 / elem_size(it.dt);
      return aligned(it.xs[0], 16) && aligned(it.out, V * acc_size(it.dt));
    });
    check(cuda::accumulate_mt(u.table, s), "accumulate", s);
  }
  // Per-chunk partial sums summed in chunk order on the device; one sync (the
  // op returns a Python float) for the whole list.
  static at::Tensor sq_dist_list(const std::vector<ListItem>& items, c10::Device dev) {
    const c10::cuda::CUDAGuard g(dev);
    auto s = c10::cuda::getCurrentCUDAStream();
    MtUpload u = upload(items, 1, nullptr, nullptr, 0, dev, [](const ListItem& it) {
      return aligned(it.xs[0], 16) && aligned(it.out, 16);
    });
    // wd == nullptr left wf/wd zero: sq_dist reads no weights.
    at::Tensor part = at::empty({u.table.chunks + 1}, at::TensorOptions().dtype(at::kDouble).device(dev));
    double* p = part.data_ptr<double>();
    check(cuda::sq_dist_mt(u.table, p, p + u.table.chunks, s), "sq_dist", s);
    return part.select(0, u.table.chunks);  // the total, left on the device: no host sync
  }
};

}  // namespace
}  // namespace fedsq

TORCH_LIBRARY_IMPL(fedsq_fast, CUDA, m) { fedsq::Ops<fedsq::CudaBackend>::register_impls(m); }
