// Device-independent half of every op: argument checks, output allocation and
// layout handling, written once as Ops<Backend>. A backend (CpuBackend in
// ops.cpp, CudaBackend in ops_cuda.cpp) supplies only the raw launches on
// already-checked tensors.
#pragma once
#include <ATen/ATen.h>
#include <torch/library.h>

#include <tuple>
#include <utility>
#include <vector>

#include "cpu/kernels.h"

namespace fedsq {

DType dtype_of(const at::Tensor& t, const char* name);
int64_t bit_bytes(int64_t n);  // 4 * ceil(n / 32)
at::Tensor dense(const at::Tensor& t);
at::Tensor like_layout(const at::Tensor& t, const at::Tensor& like);  // t copied into like's strides
// b matches a in shape, dtype, device and strides; a is dense.
void check_same(const at::Tensor& a, const char* an, const at::Tensor& b, const char* bn);
void check_bits(const at::Tensor& bits, const at::Tensor& like, const char* name);
bool epilogue_ready(const at::Tensor& z);  // contiguous or channels-innermost dense

struct EpilogueLayout {
  int64_t C = 1;      // channels (dim 1)
  int64_t inner = 1;  // elements per channel run in memory order
};
EpilogueLayout epilogue_layout(const at::Tensor& z);
// (scale_ext, shift_ext): C + 32 entries each, entry i = channel i % C, float32
// (float64 for float64 z); a missing scale is 1, a missing shift is 0.
std::pair<at::Tensor, at::Tensor> channel_tables(const at::Tensor& z, const c10::optional<at::Tensor>& scale,
                                                  const c10::optional<at::Tensor>& shift, int64_t C);
void check_accumulate(const at::Tensor& acc, const at::Tensor& x);

// One tensor of a list op: dtype, size, output (or accumulator) and inputs.
struct ListItem {
  DType dt;
  int64_t n;
  void* out;
  std::vector<const void*> xs;
};

template <class B>
struct Ops {
  static at::Tensor pack_mask(const at::Tensor& z_s) {
    at::Tensor zs = dense(z_s);
    const DType dt = dtype_of(zs, "z_s");
    at::Tensor bits = at::empty({bit_bytes(zs.numel())}, zs.options().dtype(at::kByte));
    if (zs.numel()) B::pack(dt, zs, bits);
    return bits;
  }
  static void apply_mask_out(const at::Tensor& z_q, const at::Tensor& bits, const at::Tensor& y) {
    const DType dt = dtype_of(z_q, "z_q");
    check_same(z_q, "z_q", y, "y");
    check_bits(bits, z_q, "bits");
    if (z_q.numel()) B::apply(dt, z_q, bits, y);
  }
  static at::Tensor apply_mask(const at::Tensor& z_q, const at::Tensor& bits) {
    at::Tensor zq = dense(z_q);
    at::Tensor y = at::empty_like(zq);
    apply_mask_out(zq, bits, y);
    return y;
  }
  static void gate_out(const at::Tensor& z_q, const at::Tensor& z_s, const at::Tensor& y, const at::Tensor& bits) {
    const DType dt = dtype_of(z_q, "z_q");
    check_same(z_q, "z_q", z_s, "z_s");
    check_same(z_q, "z_q", y, "y");
    check_bits(bits, z_q, "bits");
    if (z_q.numel()) B::gate(dt, z_q, z_s, y, bits);
  }
  static std::tuple<at::Tensor, at::Tensor> gate(const at::Tensor& z_q, const at::Tensor& z_s) {
    at::Tensor zq = dense(z_q);
    TORCH_CHECK(z_s.sizes() == zq.sizes(), "z_s must have the shape of z_q ", zq.sizes(), ", got ", z_s.sizes());
    at::Tensor zs = like_layout(z_s, zq);  // bits follow z_q's memory order
    at::Tensor y = at::empty_like(zq);
    at::Tensor bits = at::empty({bit_bytes(zq.numel())}, zq.options().dtype(at::kByte));
    gate_out(zq, zs, y, bits);
    return {y, bits};
  }
  static void epilogue_out(const at::Tensor& z, const c10::optional<at::Tensor>& scale,
                           const c10::optional<at::Tensor>& shift, const at::Tensor& h, const at::Tensor& bits) {
    const DType dt = dtype_of(z, "z_s");
    check_same(z, "z_s", h, "h");
    check_bits(bits, z, "bits");
    TORCH_CHECK(epilogue_ready(z), "z_s must be contiguous or channels-innermost (channels_last)");
    const EpilogueLayout L = epilogue_layout(z);
    auto tables = channel_tables(z, scale, shift, L.C);
    if (z.numel()) B::epilogue(dt, z, tables.first, tables.second, L, h, bits);
  }
  static std::tuple<at::Tensor, at::Tensor> struct_epilogue(const at::Tensor& z_s,
                                                            const c10::optional<at::Tensor>& scale,
                                                            const c10::optional<at::Tensor>& shift) {
    at::Tensor z = epilogue_ready(z_s) ? z_s : z_s.contiguous();
    at::Tensor h = at::empty_like(z);
    at::Tensor bits = at::empty({bit_bytes(z.numel())}, z.options().dtype(at::kByte));
    epilogue_out(z, scale, shift, h, bits);
    return {h, bits};
  }
  static void struct_epilogue_(const at::Tensor& z_s, const c10::optional<at::Tensor>& scale,
                               const c10::optional<at::Tensor>& shift, const at::Tensor& bits) {
    epilogue_out(z_s, scale, shift, z_s, bits);  // the kernels allow h == z
  }
  static void weighted_sum_out(at::TensorList xs, at::ArrayRef<double> weights, const at::Tensor& out) {
    const int64_t K = static_cast<int64_t>(xs.size());
    TORCH_CHECK(K >= 1, "xs must hold at least one tensor");
    TORCH_CHECK(static_cast<int64_t>(weights.size()) == K, "weights must have one entry per tensor (", K,
                "), got ", weights.size());
    const DType dt = dtype_of(out, "out");
    std::vector<const void*> ptrs(K);
    for (int64_t k = 0; k < K; ++k) {
      check_same(out, "out", xs[k], "xs[k]");
      ptrs[k] = xs[k].data_ptr();
    }
    if (out.numel()) B::weighted_sum(dt, ptrs, weights, out);
  }
  // Many tensors per client (a model's state) in one dispatch: xs is
  // client-major (xs[k * L + j] is client k's tensor j), outs has L tensors.
  static void weighted_sum_list_out(at::TensorList xs, at::ArrayRef<double> weights, at::TensorList outs) {
    const int64_t L = static_cast<int64_t>(outs.size()), K = static_cast<int64_t>(weights.size());
    TORCH_CHECK(K >= 1, "weights must hold at least one client");
    TORCH_CHECK(static_cast<int64_t>(xs.size()) == K * L, "xs must hold K*L = ", K * L, " tensors (client-major), got ",
                xs.size());
    std::vector<ListItem> items;
    items.reserve(L);
    for (int64_t j = 0; j < L; ++j) {
      ListItem it{dtype_of(outs[j], "outs[j]"), outs[j].numel(), outs[j].data_ptr(), std::vector<const void*>(K)};
      for (int64_t k = 0; k < K; ++k) {
        check_same(outs[j], "outs[j]", xs[k * L + j], "xs[k*L+j]");
        it.xs[k] = xs[k * L + j].data_ptr();
      }
      if (it.n) items.push_back(std::move(it));
    }
    if (!items.empty()) B::weighted_sum_list(items, weights, outs[0].device());
  }
  static void accumulate_list_(at::TensorList accs, at::TensorList xs, double weight) {
    TORCH_CHECK(accs.size() == xs.size(), "acc and x must hold the same number of tensors, got ", accs.size(),
                " and ", xs.size());
    std::vector<ListItem> items;
    for (size_t j = 0; j < xs.size(); ++j) {
      check_accumulate(accs[j], xs[j]);
      ListItem it{dtype_of(xs[j], "x[j]"), xs[j].numel(), accs[j].data_ptr(), {xs[j].data_ptr()}};
      if (it.n) items.push_back(std::move(it));
    }
    if (!items.empty()) B::accumulate_list(items, weight, xs[0].device());
  }
  // sum_j ||xs[j] - refs[j]||^2 over a whole state (a metric: drift, update norm).
  static double sq_dist_list(at::TensorList xs, at::TensorList refs) {
    TORCH_CHECK(xs.size() == refs.size(), "xs and refs must hold the same number of tensors, got ", xs.size(),
                " and ", refs.size());
    std::vector<ListItem> items;
    for (size_t j = 0; j < xs.size(); ++j) {
      check_same(refs[j], "refs[j]", xs[j], "xs[j]");
      ListItem it{dtype_of(xs[j], "xs[j]"), xs[j].numel(), const_cast<void*>(refs[j].data_ptr()), {xs[j].data_ptr()}};
      if (it.n) items.push_back(std::move(it));
    }
    return items.empty() ? 0.0 : B::sq_dist_list(items, xs[0].device());
  }
  static void accumulate_(const at::Tensor& acc, const at::Tensor& x, double weight) {
    const DType dt = dtype_of(x, "x");
    check_accumulate(acc, x);
    if (x.numel()) B::accumulate(dt, acc, x, weight);
  }
  static void register_impls(torch::Library& m) {
    m.impl("pack_mask", &pack_mask);
    m.impl("apply_mask", &apply_mask);
    m.impl("apply_mask_out", &apply_mask_out);
    m.impl("gate", &gate);
    m.impl("gate_out", &gate_out);
    m.impl("struct_epilogue", &struct_epilogue);
    m.impl("struct_epilogue_", &struct_epilogue_);
    m.impl("weighted_sum_out", &weighted_sum_out);
    m.impl("accumulate_", &accumulate_);
    m.impl("weighted_sum_list_out", &weighted_sum_list_out);
    m.impl("accumulate_list_", &accumulate_list_);
    m.impl("sq_dist_list", &sq_dist_list);
  }
};

}  // namespace fedsq
