// Device-independent half of every op: argument checks, output allocation and
// layout handling, written once as Ops<Backend>. A backend (CpuBackend in
// ops.cpp, CudaBackend in ops_cuda.cpp) supplies only the raw launches on
// already-checked tensors, and the allocation of large outputs.
#pragma once
#include <ATen/ATen.h>
#include <torch/library.h>

#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "cpu/kernels.h"
#include "int_average.h"

namespace fedsq {

DType dtype_of(const at::Tensor& t, const char* name);
IType itype_of(const at::Tensor& t, const std::string& name);
int64_t bit_bytes(int64_t n);  // 4 * ceil(n / 32)
at::Tensor dense(const at::Tensor& t);
at::Tensor like_layout(const at::Tensor& t, const at::Tensor& like);  // t copied into like's strides
// b matches a in shape, dtype, device and strides; a is dense.
void check_same(const at::Tensor& a, const std::string& an, const at::Tensor& b, const std::string& bn);
void check_bits(const at::Tensor& bits, const at::Tensor& like, const char* name);
at::Tensor word_aligned(const at::Tensor& bits);  // input bits as contiguous, 4-byte aligned words
bool epilogue_ready(const at::Tensor& z);  // contiguous or channels-innermost dense
void check_accumulate(const at::Tensor& acc, const at::Tensor& x, const std::string& an, const std::string& xn);
// The gate function named by a soft gate op's ``kind`` (ValueError for any other name).
SoftKind soft_kind(c10::string_view kind);
// All tensors on one device (list ops launch once for all of them); returns it.
c10::Device common_device(at::TensorList ts, const char* name, c10::optional<c10::Device> want = c10::nullopt);

// Memory overlap between the outputs of one call and its inputs. Kernels read
// every element before the same thread writes it, so an input may *be* its own
// output (same bytes, same strides); any other overlap (a partially shifted
// view, an input that is another tensor's output, two outputs sharing bytes)
// would race and is refused with ValueError.
struct Span {
  uintptr_t lo = 0, hi = 0;  // bytes [lo, hi) of a dense tensor
  int64_t slot = -1;         // outputs: own index; inputs: the output it may equal (-1: none)
  std::string name;
};
Span span_of(const at::Tensor& t, int64_t slot, std::string name);
void check_overlap(std::vector<Span> outs, const std::vector<Span>& ins);

struct EpilogueLayout {
  int64_t C = 1;      // channels (dim 1)
  int64_t inner = 1;  // elements per channel run in memory order
};
EpilogueLayout epilogue_layout(const at::Tensor& z);
// scale/shift checked (1-D, C values, z's device) and brought to the
// accumulation dtype (float32, float64 for float64 z), contiguous.
c10::optional<at::Tensor> channel_vec(const at::Tensor& z, const c10::optional<at::Tensor>& v, int64_t C,
                                      const char* name);

// One tensor of a list op: dtype, size, output (or accumulator) and inputs.
struct ListItem {
  DType dt;
  int64_t n;
  void* out;
  std::vector<const void*> xs;
  IType it = IType::i64;  // integer average only
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
  static void apply_mask_out(const at::Tensor& z_q, const at::Tensor& bits_in, const at::Tensor& y) {
    const DType dt = dtype_of(z_q, "z_q");
    check_same(z_q, "z_q", y, "y");
    const at::Tensor bits = word_aligned(bits_in);  // an input: strided/unaligned bits read from a copy
    check_bits(bits, z_q, "bits");
    check_overlap({span_of(y, 0, "y")}, {span_of(z_q, 0, "z_q"), span_of(bits, -1, "bits")});
    if (z_q.numel()) B::apply(dt, z_q, bits, y);
  }
  static at::Tensor apply_mask(const at::Tensor& z_q, const at::Tensor& bits) {
    at::Tensor zq = dense(z_q);
    at::Tensor y = B::empty_like(zq);
    apply_mask_out(zq, bits, y);
    return y;
  }
  static void gate_out(const at::Tensor& z_q, const at::Tensor& z_s, const at::Tensor& y, const at::Tensor& bits) {
    const DType dt = dtype_of(z_q, "z_q");
    check_same(z_q, "z_q", z_s, "z_s");
    check_same(z_q, "z_q", y, "y");
    check_bits(bits, z_q, "bits");
    check_overlap({span_of(y, 0, "y"), span_of(bits, 1, "bits")}, {span_of(z_q, 0, "z_q"), span_of(z_s, 0, "z_s")});
    if (z_q.numel()) B::gate(dt, z_q, z_s, y, bits);
  }
  static std::tuple<at::Tensor, at::Tensor> gate(const at::Tensor& z_q, const at::Tensor& z_s) {
    at::Tensor zq = dense(z_q);
    TORCH_CHECK_VALUE(z_s.sizes() == zq.sizes(), "z_s must have the shape of z_q ", zq.sizes(), ", got ",
                      z_s.sizes());
    at::Tensor zs = like_layout(z_s, zq);  // bits follow z_q's memory order
    at::Tensor y = B::empty_like(zq);
    at::Tensor bits = at::empty({bit_bytes(zq.numel())}, zq.options().dtype(at::kByte));
    gate_out(zq, zs, y, bits);
    return {y, bits};
  }
  // Soft gate: y = z_q * g(z_s), elementwise in memory order (z_s shares z_q's strides).
  static void soft_gate_apply_out(const at::Tensor& z_q, const at::Tensor& z_s, c10::string_view kind,
                                  const at::Tensor& y) {
    const SoftKind k = soft_kind(kind);
    const DType dt = dtype_of(z_q, "z_q");
    check_same(z_q, "z_q", z_s, "z_s");
    check_same(z_q, "z_q", y, "y");
    check_overlap({span_of(y, 0, "y")}, {span_of(z_q, 0, "z_q"), span_of(z_s, 0, "z_s")});
    if (z_q.numel()) B::soft(dt, k, z_q, z_s, y);
  }
  static at::Tensor soft_gate_apply(const at::Tensor& z_q, const at::Tensor& z_s, c10::string_view kind) {
    soft_kind(kind);  // before any allocation
    at::Tensor zq = dense(z_q);
    TORCH_CHECK_VALUE(z_s.sizes() == zq.sizes(), "z_s must have the shape of z_q ", zq.sizes(), ", got ",
                      z_s.sizes());
    at::Tensor zs = like_layout(z_s, zq);  // elementwise in memory order: one layout for both
    at::Tensor y = B::empty_like(zq);
    soft_gate_apply_out(zq, zs, kind, y);
    return y;
  }
  static void epilogue_out(const at::Tensor& z, const c10::optional<at::Tensor>& scale,
                           const c10::optional<at::Tensor>& shift, const at::Tensor& h, const at::Tensor& bits) {
    const DType dt = dtype_of(z, "z_s");
    check_same(z, "z_s", h, "h");
    check_bits(bits, z, "bits");
    TORCH_CHECK_VALUE(epilogue_ready(z), "z_s must be contiguous or channels-innermost (channels_last)");
    check_overlap({span_of(h, 0, "h"), span_of(bits, 1, "bits")}, {span_of(z, 0, "z_s")});
    const EpilogueLayout L = epilogue_layout(z);
    auto sc = channel_vec(z, scale, L.C, "scale");
    auto sh = channel_vec(z, shift, L.C, "shift");
    if (z.numel()) B::epilogue(dt, z, sc, sh, L, h, bits);  // C == 0 means no elements: nothing to index
  }
  static std::tuple<at::Tensor, at::Tensor> struct_epilogue(const at::Tensor& z_s,
                                                            const c10::optional<at::Tensor>& scale,
                                                            const c10::optional<at::Tensor>& shift) {
    at::Tensor z = epilogue_ready(z_s) ? z_s : z_s.contiguous();
    at::Tensor h = B::empty_like(z);
    at::Tensor bits = at::empty({bit_bytes(z.numel())}, z.options().dtype(at::kByte));
    epilogue_out(z, scale, shift, h, bits);
    return {h, bits};
  }
  static void struct_epilogue_(const at::Tensor& z_s, const c10::optional<at::Tensor>& scale,
                               const c10::optional<at::Tensor>& shift, const at::Tensor& bits) {
    epilogue_out(z_s, scale, shift, z_s, bits);  // the kernels allow h == z
  }
  static void check_weights(at::ArrayRef<double> w) {
    for (size_t k = 0; k < w.size(); ++k)
      TORCH_CHECK_VALUE(std::isfinite(w[k]), "weights[", k, "] must be finite, got ", w[k]);
  }
  // Float list items (client-major xs[k * L + j]) after every check, empty tensors dropped.
  static std::vector<ListItem> float_items(at::TensorList xs, int64_t K, at::TensorList outs, bool exact_ints) {
    const int64_t L = static_cast<int64_t>(outs.size());
    TORCH_CHECK_VALUE(K >= 1, "weights must hold at least one client");
    TORCH_CHECK_VALUE(static_cast<int64_t>(xs.size()) == K * L, "xs must hold K*L = ", K * L,
                      " tensors (client-major), got ", xs.size());
    if (L == 0) return {};
    const c10::Device dev = common_device(outs, "outs");
    common_device(xs, "xs", dev);
    std::vector<ListItem> items;
    std::vector<Span> out_spans, in_spans;
    items.reserve(L);
    for (int64_t j = 0; j < L; ++j) {
      const std::string on = "outs[" + std::to_string(j) + "]";
      ListItem it{DType::f32, outs[j].numel(), outs[j].data_ptr(), std::vector<const void*>(K)};
      if (exact_ints) it.it = itype_of(outs[j], on);
      else it.dt = dtype_of(outs[j], on.c_str());
      out_spans.push_back(span_of(outs[j], j, on));
      for (int64_t k = 0; k < K; ++k) {
        const std::string xn = "xs[" + std::to_string(k * L + j) + "]";
        check_same(outs[j], on, xs[k * L + j], xn);
        it.xs[k] = xs[k * L + j].data_ptr();
        in_spans.push_back(span_of(xs[k * L + j], j, xn));
      }
      if (it.n) items.push_back(std::move(it));
    }
    check_overlap(std::move(out_spans), in_spans);
    return items;
  }
  static void weighted_sum_out(at::TensorList xs, at::ArrayRef<double> weights, const at::Tensor& out) {
    const int64_t K = static_cast<int64_t>(xs.size());
    TORCH_CHECK_VALUE(K >= 1, "xs must hold at least one tensor");
    TORCH_CHECK_VALUE(static_cast<int64_t>(weights.size()) == K, "weights must have one entry per tensor (", K,
                      "), got ", weights.size());
    check_weights(weights);
    auto items = float_items(xs, K, at::TensorList(&out, 1), false);
    if (!items.empty()) B::weighted_sum_list(items, weights, out.device());
  }
  // Many tensors per client (a model's state) in one dispatch: xs is
  // client-major (xs[k * L + j] is client k's tensor j), outs has L tensors.
  static void weighted_sum_list_out(at::TensorList xs, at::ArrayRef<double> weights, at::TensorList outs) {
    check_weights(weights);
    auto items = float_items(xs, static_cast<int64_t>(weights.size()), outs, false);
    if (!items.empty()) B::weighted_sum_list(items, weights, outs[0].device());
  }
  // Integer and bool tensors: round_half_even(sum_k q_k x_k / sum_k q_k) exactly (int_average.h).
  static void int_weighted_sum_list_out(at::TensorList xs, at::ArrayRef<int64_t> weights, at::TensorList outs) {
    long long total = 0;
    for (size_t k = 0; k < weights.size(); ++k) {
      TORCH_CHECK_VALUE(weights[k] >= 0, "weights[", k, "] must be >= 0, got ", weights[k]);
      TORCH_CHECK_VALUE(!__builtin_add_overflow(total, static_cast<long long>(weights[k]), &total),
                        "integer weights must sum to less than 2^63");
    }
    TORCH_CHECK_VALUE(weights.empty() || total > 0, "integer weights must not all be zero");
    auto items = float_items(xs, static_cast<int64_t>(weights.size()), outs, true);
    std::vector<long long> q(weights.begin(), weights.end());
    if (!items.empty()) B::int_average_list(items, q, total, outs[0].device());
  }
  static void accumulate_list_(at::TensorList accs, at::TensorList xs, double weight) {
    TORCH_CHECK_VALUE(accs.size() == xs.size(), "acc and x must hold the same number of tensors, got ", accs.size(),
                      " and ", xs.size());
    TORCH_CHECK_VALUE(std::isfinite(weight), "weight must be finite, got ", weight);
    if (xs.empty()) return;
    const c10::Device dev = common_device(accs, "acc");
    common_device(xs, "x", dev);
    std::vector<ListItem> items;
    std::vector<Span> out_spans, in_spans;
    for (size_t j = 0; j < xs.size(); ++j) {
      const std::string an = "acc[" + std::to_string(j) + "]", xn = "x[" + std::to_string(j) + "]";
      const DType dt = dtype_of(xs[j], xn.c_str());
      check_accumulate(accs[j], xs[j], an, xn);
      out_spans.push_back(span_of(accs[j], static_cast<int64_t>(j), an));
      in_spans.push_back(span_of(xs[j], static_cast<int64_t>(j), xn));
      ListItem it{dt, xs[j].numel(), accs[j].data_ptr(), {xs[j].data_ptr()}};
      if (it.n) items.push_back(std::move(it));
    }
    check_overlap(std::move(out_spans), in_spans);
    if (!items.empty()) B::accumulate_list(items, weight, dev);
  }
  static void accumulate_(const at::Tensor& acc, const at::Tensor& x, double weight) {
    accumulate_list_(at::TensorList(&acc, 1), at::TensorList(&x, 1), weight);
  }
  // sum_j ||xs[j] - refs[j]||^2 over a whole state (a metric: drift, update norm).
  static at::Tensor sq_dist_list(at::TensorList xs, at::TensorList refs) {
    TORCH_CHECK_VALUE(xs.size() == refs.size(), "xs and refs must hold the same number of tensors, got ", xs.size(),
                      " and ", refs.size());
    if (xs.empty()) return at::zeros({}, at::kDouble);
    const c10::Device dev = common_device(xs, "xs");
    std::vector<ListItem> items;
    for (size_t j = 0; j < xs.size(); ++j) {
      const std::string xn = "xs[" + std::to_string(j) + "]", rn = "refs[" + std::to_string(j) + "]";
      check_same(refs[j], rn, xs[j], xn);
      ListItem it{dtype_of(xs[j], xn.c_str()), xs[j].numel(), const_cast<void*>(refs[j].data_ptr()),
                  {xs[j].data_ptr()}};
      if (it.n) items.push_back(std::move(it));
    }
    if (items.empty()) return at::zeros({}, at::TensorOptions().dtype(at::kDouble).device(dev));
    return B::sq_dist_list(items, dev);
  }
  static void register_impls(torch::Library& m) {
    m.impl("pack_mask", &pack_mask);
    m.impl("apply_mask", &apply_mask);
    m.impl("apply_mask_out", &apply_mask_out);
    m.impl("gate", &gate);
    m.impl("gate_out", &gate_out);
    m.impl("soft_gate_apply", &soft_gate_apply);
    m.impl("soft_gate_apply_out", &soft_gate_apply_out);
    m.impl("struct_epilogue", &struct_epilogue);
    m.impl("struct_epilogue_", &struct_epilogue_);
    m.impl("weighted_sum_out", &weighted_sum_out);
    m.impl("accumulate_", &accumulate_);
    m.impl("weighted_sum_list_out", &weighted_sum_list_out);
    m.impl("int_weighted_sum_list_out", &int_weighted_sum_list_out);
    m.impl("accumulate_list_", &accumulate_list_);
    m.impl("sq_dist_list", &sq_dist_list);
  }
};

}  // namespace fedsq
