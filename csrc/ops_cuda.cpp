// CUDA implementations of the fedsq_fast ops: checks and allocation come from
// Ops<Backend> (ops_common.h); this file only sets the device and stream and
// calls the torch-free launchers in cuda/kernels.cu.
#include <c10/cuda/CUDAStream.h>  // not ATen/cuda/CUDAContext.h: it needs cuBLAS/cuSPARSE headers
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>

#include "cuda/kernels.cuh"
#include "ops_common.h"

namespace fedsq {
namespace {

void check(cudaError_t e, const char* what) {
  TORCH_CHECK(e == cudaSuccess, "fedsq_fast CUDA ", what, " failed: ", cudaGetErrorString(e));
}
uint32_t* words(const at::Tensor& bits) { return reinterpret_cast<uint32_t*>(bits.data_ptr()); }

struct CudaBackend {
  static void pack(DType dt, const at::Tensor& zs, const at::Tensor& bits) {
    const c10::cuda::CUDAGuard g(zs.device());
    check(cuda::pack(dt, zs.data_ptr(), words(bits), zs.numel(), c10::cuda::getCurrentCUDAStream()), "pack_mask");
  }
  static void apply(DType dt, const at::Tensor& zq, const at::Tensor& bits, const at::Tensor& y) {
    const c10::cuda::CUDAGuard g(zq.device());
    check(cuda::apply(dt, zq.data_ptr(), words(bits), y.data_ptr(), zq.numel(), c10::cuda::getCurrentCUDAStream()),
          "apply_mask");
  }
  static void gate(DType dt, const at::Tensor& zq, const at::Tensor& zs, const at::Tensor& y,
                   const at::Tensor& bits) {
    const c10::cuda::CUDAGuard g(zq.device());
    check(cuda::gate(dt, zq.data_ptr(), zs.data_ptr(), y.data_ptr(), words(bits), zq.numel(),
                     c10::cuda::getCurrentCUDAStream()),
          "gate");
  }
  static void epilogue(DType dt, const at::Tensor& z, const at::Tensor& sc, const at::Tensor& sh,
                       const EpilogueLayout& L, const at::Tensor& h, const at::Tensor& bits) {
    const c10::cuda::CUDAGuard g(z.device());
    check(cuda::epilogue(dt, z.data_ptr(), h.data_ptr(), words(bits), sc.data_ptr(), sh.data_ptr(), L.C, L.inner,
                         z.numel(), c10::cuda::getCurrentCUDAStream()),
          "struct_epilogue");
  }
  static void weighted_sum(DType dt, const std::vector<const void*>& ptrs, at::ArrayRef<double> w,
                           const at::Tensor& out) {
    const c10::cuda::CUDAGuard g(out.device());
    const int64_t K = static_cast<int64_t>(ptrs.size()), n = out.numel();
    auto stream = c10::cuda::getCurrentCUDAStream();
    // More clients than fit in one launch's parameters: carry a running sum.
    at::Tensor acc;
    if (K > cuda::kMaxClients)
      acc = at::empty({n}, out.options().dtype(out.scalar_type() == at::kDouble ? at::kDouble : at::kFloat));
    for (int64_t k0 = 0; k0 < K; k0 += cuda::kMaxClients) {
      cuda::WsumArgs args{};
      args.K = static_cast<int>(std::min<int64_t>(cuda::kMaxClients, K - k0));
      for (int j = 0; j < args.K; ++j) {
        args.xs[j] = ptrs[k0 + j];
        args.w[j] = w[k0 + j];
      }
      const bool last = k0 + args.K >= K;
      check(cuda::weighted_sum(dt, args, k0 ? acc.data_ptr() : nullptr, last ? nullptr : acc.data_ptr(),
                               out.data_ptr(), n, stream),
            "weighted_sum");
    }
  }
  static void weighted_sum_list(const std::vector<ListItem>& items, at::ArrayRef<double> w, c10::Device dev) {
    const c10::cuda::CUDAGuard g(dev);
    auto stream = c10::cuda::getCurrentCUDAStream();
    const int64_t K = static_cast<int64_t>(w.size());
    TORCH_CHECK(K <= cuda::kMaxClients, "weighted_sum_list_out on CUDA takes at most ", cuda::kMaxClients,
                " clients per call, got ", K);
    for (const ListItem& it : items) {
      cuda::WsumArgs args{};
      args.K = static_cast<int>(K);
      for (int64_t k = 0; k < K; ++k) {
        args.xs[k] = it.xs[k];
        args.w[k] = w[k];
      }
      check(cuda::weighted_sum(it.dt, args, nullptr, nullptr, it.out, it.n, stream), "weighted_sum_list_out");
    }
  }
  static void accumulate_list(const std::vector<ListItem>& items, double w, c10::Device dev) {
    const c10::cuda::CUDAGuard g(dev);
    auto stream = c10::cuda::getCurrentCUDAStream();
    for (const ListItem& it : items) check(cuda::accumulate(it.dt, it.out, it.xs[0], w, it.n, stream), "accumulate_list_");
  }
  static double sq_dist_list(const std::vector<ListItem>&, c10::Device) {
    TORCH_CHECK(false, "sq_dist_list: CUDA tensors take the torch path (fedsq_fast.ops.sq_dist)");
    return 0.0;
  }
  static void accumulate(DType dt, const at::Tensor& acc, const at::Tensor& x, double w) {
    const c10::cuda::CUDAGuard g(x.device());
    check(cuda::accumulate(dt, acc.data_ptr(), x.data_ptr(), w, x.numel(), c10::cuda::getCurrentCUDAStream()),
          "accumulate_");
  }
};

}  // namespace
}  // namespace fedsq

TORCH_LIBRARY_IMPL(fedsq_fast, CUDA, m) { fedsq::Ops<fedsq::CudaBackend>::register_impls(m); }
