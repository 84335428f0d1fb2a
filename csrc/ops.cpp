// fedsq_fast ops: schema definitions and CPU implementations.
//
// The schemas are written here and nowhere else (TORCH_LIBRARY below); Python
// (fedsq_fast/ops/_registry.py) adds a fake kernel for every op and the autograd
// formulas, as pytorch/extension-cpp does. CUDA implementations live in ops_cuda.cpp.
// Kernels walk tensors in memory order, so inputs that must match element by
// element must also match in strides; the functional ops arrange that, the
// out= variants check it.
#include <ATen/ATen.h>
#include <ATen/EmptyTensor.h>
#include <ATen/Parallel.h>
#include <c10/core/CPUAllocator.h>
#include <sys/mman.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <string>
#include <vector>

#include "cpu/kernels.h"
#include "ops_common.h"

namespace fedsq {

DType dtype_of(const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::f32;
    case at::kHalf: return DType::f16;
    case at::kBFloat16: return DType::bf16;
    case at::kDouble: return DType::f64;
    default:
      TORCH_CHECK_TYPE(false, name, " must be float32, float16, bfloat16 or float64, got ", t.scalar_type());
  }
}

IType itype_of(const at::Tensor& t, const std::string& name) {
  switch (t.scalar_type()) {
    case at::kChar: return IType::i8;
    case at::kByte: return IType::u8;
    case at::kShort: return IType::i16;
    case at::kInt: return IType::i32;
    case at::kLong: return IType::i64;
    case at::kBool: return IType::b8;
    default:
      TORCH_CHECK_TYPE(false, name, " must be int8, uint8, int16, int32, int64 or bool, got ", t.scalar_type());
  }
}

SoftKind soft_kind(c10::string_view kind) {
  static const char* const names[kSoftKinds] = {"sigmoid", "phi", "phi_tanh", "hardsigmoid", "tanh_softplus"};
  for (int k = 0; k < kSoftKinds; ++k)
    if (kind == names[k]) return static_cast<SoftKind>(k);
  TORCH_CHECK_VALUE(false, "kind must be one of 'sigmoid', 'phi', 'phi_tanh', 'hardsigmoid', 'tanh_softplus', got '",
                    std::string(kind), "'");
  return SoftKind::sigmoid;  // not reached
}

int64_t bit_bytes(int64_t n) { return (n + 31) / 32 * 4; }

at::Tensor dense(const at::Tensor& t) { return t.is_non_overlapping_and_dense() ? t : t.contiguous(); }

// One memory order: the strides agree in every dim of size > 1 (a size-1 dim's stride is arbitrary:
// torch gives a channels_last [N, C, 1, 1] tensor strides (C, 1, C, C), a contiguous one (C, 1, 1, 1)).
bool same_layout(const at::Tensor& a, const at::Tensor& b) {
  if (a.dim() != b.dim()) return false;
  for (int64_t d = 0; d < a.dim(); ++d)
    if (a.size(d) > 1 && a.stride(d) != b.stride(d)) return false;
  return true;
}

at::Tensor like_layout(const at::Tensor& t, const at::Tensor& like) {
  if (same_layout(t, like) || like.numel() == 0) return t;
  at::Tensor out = at::empty_like(like, t.options());
  out.copy_(t);
  return out;
}

void check_same(const at::Tensor& a, const std::string& an, const at::Tensor& b, const std::string& bn) {
  TORCH_CHECK_VALUE(a.sizes() == b.sizes(), bn, " must have the shape of ", an, " ", a.sizes(), ", got ", b.sizes());
  TORCH_CHECK_TYPE(a.scalar_type() == b.scalar_type(), bn, " must have the dtype of ", an, " (", a.scalar_type(),
                   "), got ", b.scalar_type());
  TORCH_CHECK_VALUE(a.device() == b.device(), bn, " must be on ", an, "'s device ", a.device(), ", got ",
                    b.device());
  TORCH_CHECK_VALUE(a.numel() == 0 || same_layout(a, b), bn, " must have the strides of ", an, " ",
                    a.strides(), ", got ", b.strides());
  TORCH_CHECK_VALUE(a.is_non_overlapping_and_dense(), an, " must be dense (contiguous, channels_last or permuted)");
}

at::Tensor word_aligned(const at::Tensor& bits) {
  // The kernels read bits as 32-bit words. An input that is strided or starts off a word
  // boundary (a view into a larger buffer) is copied (1/32 of the data's size), so the compiled
  // ops accept what the reference accepts; outputs must be writable in place and are refused.
  if (bits.is_contiguous() && reinterpret_cast<uintptr_t>(bits.data_ptr()) % 4 == 0) return bits;
  return bits.clone(at::MemoryFormat::Contiguous);  // a fresh allocation: aligned
}

void check_bits(const at::Tensor& bits, const at::Tensor& like, const char* name) {
  TORCH_CHECK_TYPE(bits.scalar_type() == at::kByte, name, " must be uint8, got ", bits.scalar_type());
  TORCH_CHECK_VALUE(bits.dim() == 1 && bits.numel() == bit_bytes(like.numel()), name, " must be 1-D with ",
                    bit_bytes(like.numel()), " bytes for ", like.numel(), " elements, got shape ", bits.sizes());
  TORCH_CHECK_VALUE(bits.is_contiguous() && reinterpret_cast<uintptr_t>(bits.data_ptr()) % 4 == 0, name,
                    " must be contiguous and 4-byte aligned (an output written in place: allocate it with "
                    "torch.empty)");
  TORCH_CHECK_VALUE(bits.device() == like.device(), name, " must be on ", like.device(), ", got ", bits.device());
}

c10::Device common_device(at::TensorList ts, const char* name, c10::optional<c10::Device> want) {
  const c10::Device dev = want.has_value() ? *want : ts[0].device();
  for (size_t j = 0; j < ts.size(); ++j)
    TORCH_CHECK_VALUE(ts[j].device() == dev, name, "[", j, "] is on ", ts[j].device(), ", but the other tensors of ",
                      "this call are on ", dev, " (one call runs on one device)");
  return dev;
}

Span span_of(const at::Tensor& t, int64_t slot, std::string name) {
  Span s;
  if (t.numel() > 0) {  // dense tensors (checked by the callers) fill exactly these bytes
    s.lo = reinterpret_cast<uintptr_t>(t.data_ptr());
    s.hi = s.lo + static_cast<uintptr_t>(t.numel()) * t.element_size();
  }
  s.slot = slot;
  s.name = std::move(name);
  return s;
}

void check_overlap(std::vector<Span> outs, const std::vector<Span>& ins) {
  std::vector<Span> o;
  for (auto& s : outs)
    if (s.hi > s.lo) o.push_back(std::move(s));
  std::sort(o.begin(), o.end(), [](const Span& a, const Span& b) { return a.lo < b.lo; });
  for (size_t i = 1; i < o.size(); ++i)
    TORCH_CHECK_VALUE(o[i].lo >= o[i - 1].hi, o[i - 1].name, " and ", o[i].name, " share memory: outputs must not overlap");
  for (const Span& s : ins) {
    if (s.hi <= s.lo) continue;
    // outputs are disjoint and sorted, so their ends are sorted too: the first one ending after s.lo
    auto it = std::upper_bound(o.begin(), o.end(), s.lo, [](uintptr_t v, const Span& b) { return v < b.hi; });
    if (it == o.end() || it->lo >= s.hi) continue;  // no overlap
    const bool exact = it->slot == s.slot && it->lo == s.lo && it->hi == s.hi;
    TORCH_CHECK_VALUE(exact, s.name, " overlaps ", it->name,
                      " in memory; an output may only be exactly its own input (same tensor), not a shifted or "
                      "partial view of an input");
  }
}

EpilogueLayout epilogue_layout(const at::Tensor& z) {
  EpilogueLayout L;
  L.C = z.dim() >= 2 ? z.size(1) : 1;
  if (z.numel() == 0) return L;
  if (z.is_contiguous()) {  // NC...: channel runs of prod(sizes[2:]) elements
    L.inner = z.dim() >= 2 ? z.numel() / (z.size(0) * L.C) : 1;
    return L;
  }
  L.inner = 1;  // channels-innermost (epilogue_ready was checked)
  return L;
}

c10::optional<at::Tensor> channel_vec(const at::Tensor& z, const c10::optional<at::Tensor>& v, int64_t C,
                                      const char* name) {
  if (!v.has_value()) return c10::nullopt;
  TORCH_CHECK_VALUE(v->dim() == 1 && v->numel() == C, name, " must be 1-D with one value per channel (", C,
                    "), got ", v->sizes());
  TORCH_CHECK_VALUE(v->device() == z.device(), name, " must be on ", z.device(), ", got ", v->device());
  const auto acc = z.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  return v->to(acc).contiguous();  // no copy when it already is (ops.py converts once)
}

bool epilogue_ready(const at::Tensor& z) {
  return z.is_contiguous() || (z.dim() >= 2 && z.stride(1) == 1 && z.is_non_overlapping_and_dense());
}

void check_accumulate(const at::Tensor& acc, const at::Tensor& x, const std::string& an, const std::string& xn) {
  const auto want = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK_TYPE(acc.scalar_type() == want, an, " must be ", want, " for ", xn, " of ", x.scalar_type(), ", got ",
                   acc.scalar_type());
  TORCH_CHECK_VALUE(acc.sizes() == x.sizes(), an, " must have the shape of ", xn, " ", x.sizes(), ", got ",
                    acc.sizes());
  TORCH_CHECK_VALUE(acc.device() == x.device(), an, " must be on ", xn, "'s device ", x.device(), ", got ",
                    acc.device());
  TORCH_CHECK_VALUE(x.numel() == 0 || (same_layout(acc, x) && acc.is_non_overlapping_and_dense()), an,
                    " and ", xn, " must share one dense layout");
}

namespace {

constexpr int64_t kWordGrain = 1024;  // 32K elements per task: amortises a thread wake-up
constexpr int64_t kTile = 4096;       // weighted_sum tile (the kernel's)

uint32_t* words(const at::Tensor& bits) { return reinterpret_cast<uint32_t*>(bits.data_ptr()); }

// Large CPU outputs on transparent huge pages. A fresh multi-megabyte buffer
// is mmap'ed by malloc and faulted in 4 KB pages on first touch; on these VMs
// that costs more than the kernel (16 Mi fp32: ~30 ms of faults against ~4 ms
// of work), and it is what eager pays too. With MADV_HUGEPAGE the same buffer
// faults in 2 MB pages. Small outputs keep torch's allocator.
//
// Freed blocks are kept in a small bounded cache (as CUDA's caching allocator
// does) and handed to the next request of about the same size: an op that runs
// once per step (the gate's backward, the quantitative gate outputs) then
// writes into pages that are already mapped instead of faulting in (and
// zeroing) fresh ones every call. A block goes back to the cache only when
// torch frees the tensor, so no live memory is ever shared. The limit is
// FEDSQ_FAST_CPU_CACHE_MB (default 256) or torch.ops.fedsq_fast.cpu_cache(mb);
// 0 turns the cache off and frees what it holds.
struct HugeBlock {
  void* p;
  size_t bytes;
};

struct HugePageAllocator final : c10::Allocator {
  static constexpr size_t kHuge = size_t(2) << 20;
  static constexpr size_t kMin = size_t(4) << 20;  // below this, faults are cheap
  struct Cache {
    std::mutex mu;
    std::vector<HugeBlock> blocks;  // most recently freed last
    size_t cached = 0;
    size_t limit = 0;
  };
  // Never destroyed: tensors freed during interpreter shutdown still return their blocks here.
  static Cache& cache() {
    static Cache* c = [] {
      auto* c = new Cache();
      const char* env = std::getenv("FEDSQ_FAST_CPU_CACHE_MB");
      long mb = 256;
      if (env != nullptr && *env != '\0') {
        char* end = nullptr;
        const long v = std::strtol(env, &end, 10);
        if (end != nullptr && *end == '\0' && v >= 0) mb = v;  // Python checks the value first (_loader)
      }
      c->limit = static_cast<size_t>(mb) << 20;
      return c;
    }();
    return *c;
  }
  // Oldest blocks out of the cache until it holds at most `limit` bytes; returns them (caller frees).
  static std::vector<HugeBlock> trim(Cache& c, size_t limit) {
    size_t drop = 0;
    while (c.cached > limit && drop < c.blocks.size()) c.cached -= c.blocks[drop++].bytes;
    std::vector<HugeBlock> gone(c.blocks.begin(), c.blocks.begin() + static_cast<std::ptrdiff_t>(drop));
    c.blocks.erase(c.blocks.begin(), c.blocks.begin() + static_cast<std::ptrdiff_t>(drop));
    return gone;
  }
  static void release(void* ctx) {
    auto* b = static_cast<HugeBlock*>(ctx);
    const HugeBlock blk = *b;
    delete b;
    Cache& c = cache();
    std::vector<HugeBlock> gone;
    bool kept = false;
    {
      std::lock_guard<std::mutex> g(c.mu);
      if (blk.bytes <= c.limit) {
        gone = trim(c, c.limit - blk.bytes);
        c.blocks.push_back(blk);
        c.cached += blk.bytes;
        kept = true;
      }
    }
    for (auto& x : gone) std::free(x.p);
    if (!kept) std::free(blk.p);
  }
  // The smallest cached block of at least `bytes` and at most twice that (no large waste).
  static void* take(size_t bytes, size_t* got) {
    Cache& c = cache();
    std::lock_guard<std::mutex> g(c.mu);
    size_t best = c.blocks.size();
    for (size_t i = 0; i < c.blocks.size(); ++i) {
      const size_t s = c.blocks[i].bytes;
      if (s >= bytes && s <= 2 * bytes && (best == c.blocks.size() || s < c.blocks[best].bytes)) best = i;
    }
    if (best == c.blocks.size()) return nullptr;
    const HugeBlock b = c.blocks[best];
    c.blocks.erase(c.blocks.begin() + static_cast<std::ptrdiff_t>(best));
    c.cached -= b.bytes;
    *got = b.bytes;
    return b.p;
  }
  c10::DataPtr allocate(size_t n) override {
    if (n < kMin) return c10::GetDefaultCPUAllocator()->allocate(n);
    size_t bytes = (n + kHuge - 1) / kHuge * kHuge;
    void* p = take(bytes, &bytes);
    if (p == nullptr) {
      if (posix_memalign(&p, kHuge, bytes) != 0 || p == nullptr) return c10::GetDefaultCPUAllocator()->allocate(n);
#ifdef MADV_HUGEPAGE
      madvise(p, bytes, MADV_HUGEPAGE);  // advice only: without THP it is a plain allocation
#endif
    }
    return {p, new HugeBlock{p, bytes}, &release, c10::Device(c10::DeviceType::CPU)};
  }
  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }
};

HugePageAllocator g_huge;

// cpu_cache(mb): set the output cache's limit (mb >= 0; 0 frees every cached block and
// turns it off; -1 leaves it as it is) and return [cached bytes, limit bytes].
std::vector<int64_t> cpu_cache(int64_t mb) {
  TORCH_CHECK_VALUE(mb >= -1, "mb must be >= 0 (or -1 to only read the cache), got ", mb);
  auto& c = HugePageAllocator::cache();
  std::vector<HugeBlock> gone;
  std::vector<int64_t> out(2);
  {
    std::lock_guard<std::mutex> g(c.mu);
    if (mb >= 0) {
      c.limit = static_cast<size_t>(mb) << 20;
      gone = HugePageAllocator::trim(c, c.limit);
    }
    out[0] = static_cast<int64_t>(c.cached);
    out[1] = static_cast<int64_t>(c.limit);
  }
  for (auto& x : gone) std::free(x.p);
  return out;
}

// Raw CPU launches: at::parallel_for (torch's OpenMP pool, torch.set_num_threads
// applies) over 32-element words, so no two threads share a mask word.
struct CpuBackend {
  static at::Tensor empty_like(const at::Tensor& t) {
    return at::detail::empty_strided_generic(t.sizes(), t.strides(), &g_huge,
                                             c10::DispatchKeySet(c10::DispatchKey::CPU), t.scalar_type());
  }
  static void pack(DType dt, const at::Tensor& zs, const at::Tensor& bits) {
    const int64_t n = zs.numel();
    const void* p = zs.data_ptr();
    uint32_t* b = words(bits);
    const KernelTable& K = cpu_kernels();
    at::parallel_for(0, (n + 31) / 32, kWordGrain, [&](int64_t w0, int64_t w1) { K.pack(dt, p, b, n, w0, w1); });
  }
  static void apply(DType dt, const at::Tensor& zq, const at::Tensor& bits, const at::Tensor& y) {
    const int64_t n = zq.numel();
    const void* q = zq.data_ptr();
    const uint32_t* b = words(bits);
    void* out = y.data_ptr();
    const KernelTable& K = cpu_kernels();
    at::parallel_for(0, (n + 31) / 32, kWordGrain,
                     [&](int64_t w0, int64_t w1) { K.apply(dt, q, b, out, n, w0, w1); });
  }
  static void gate(DType dt, const at::Tensor& zq, const at::Tensor& zs, const at::Tensor& y,
                   const at::Tensor& bits) {
    const int64_t n = zq.numel();
    const void* q = zq.data_ptr();
    const void* s = zs.data_ptr();
    void* out = y.data_ptr();
    uint32_t* b = words(bits);
    const KernelTable& K = cpu_kernels();
    at::parallel_for(0, (n + 31) / 32, kWordGrain,
                     [&](int64_t w0, int64_t w1) { K.gate(dt, q, s, out, b, n, w0, w1); });
  }
  // 32-element words per task, like the gate (aligned streaming stores at every task start)
  static void soft(DType dt, SoftKind k, const at::Tensor& zq, const at::Tensor& zs, const at::Tensor& y) {
    const int64_t n = zq.numel();
    const void* q = zq.data_ptr();
    const void* s = zs.data_ptr();
    void* out = y.data_ptr();
    const KernelTable& K = cpu_kernels();
    at::parallel_for(0, (n + 31) / 32, kWordGrain,
                     [&](int64_t w0, int64_t w1) { K.soft_apply(dt, k, q, s, out, n, w0, w1); });
  }
  // The CPU kernels read C + 32 entries, entry i = channel i % C (a word of 32
  // channel-innermost lanes loads them directly): built here in one host loop,
  // not with tensor ops (a handful of small allocations and kernels per call).
  template <class A>
  static const A* ext_table(std::vector<A>& buf, const c10::optional<at::Tensor>& v, int64_t C, A fill) {
    buf.resize(static_cast<size_t>(C + 32));
    const A* src = v.has_value() ? v->data_ptr<A>() : nullptr;
    for (int64_t i = 0, c = 0; i < C + 32; ++i) {
      buf[i] = src ? src[c] : fill;
      if (++c == C) c = 0;
    }
    return buf.data();
  }
  static void epilogue(DType dt, const at::Tensor& z, const c10::optional<at::Tensor>& sc,
                       const c10::optional<at::Tensor>& sh, const EpilogueLayout& L, const at::Tensor& h,
                       const at::Tensor& bits) {
    thread_local std::vector<float> fsc, fsh;
    thread_local std::vector<double> dsc, dsh;
    const void *scp, *shp;
    if (dt == DType::f64) {
      scp = ext_table<double>(dsc, sc, L.C, 1.0);
      shp = ext_table<double>(dsh, sh, L.C, 0.0);
    } else {
      scp = ext_table<float>(fsc, sc, L.C, 1.0f);
      shp = ext_table<float>(fsh, sh, L.C, 0.0f);
    }
    const int64_t n = z.numel();
    const void* zp = z.data_ptr();
    void* hp = h.data_ptr();
    uint32_t* b = words(bits);
    const KernelTable& K = cpu_kernels();
    at::parallel_for(0, (n + 31) / 32, kWordGrain, [&](int64_t w0, int64_t w1) {
      K.epilogue(dt, zp, hp, b, scp, shp, L.C, L.inner, n, w0, w1);
    });
  }
  // One parallel region over the tiles of all tensors (not one per tensor):
  // a model's state is many small tensors.
  template <class F>
  static void over_tiles(const std::vector<ListItem>& items, F&& fn) {
    std::vector<int64_t> first(items.size() + 1, 0);  // prefix sums of tile counts
    for (size_t j = 0; j < items.size(); ++j) first[j + 1] = first[j] + (items[j].n + kTile - 1) / kTile;
    at::parallel_for(0, first.back(), 8, [&](int64_t t0, int64_t t1) {
      size_t j = std::upper_bound(first.begin(), first.end(), t0) - first.begin() - 1;
      for (int64_t t = t0; t < t1;) {
        while (t >= first[j + 1]) ++j;
        const int64_t t_end = std::min(t1, first[j + 1]);
        fn(items[j], (t - first[j]) * kTile, std::min((t_end - first[j]) * kTile, items[j].n));
        t = t_end;
      }
    });
  }
  static void weighted_sum_list(const std::vector<ListItem>& items, at::ArrayRef<double> w, c10::Device) {
    const KernelTable& T = cpu_kernels();
    const int64_t K = static_cast<int64_t>(w.size());
    over_tiles(items, [&](const ListItem& it, int64_t i0, int64_t i1) {
      T.weighted_sum(it.dt, it.xs.data(), w.data(), K, it.out, i0, i1);
    });
  }
  static void int_average_list(const std::vector<ListItem>& items, const std::vector<long long>& q,
                               long long total, c10::Device) {
    const int64_t K = static_cast<int64_t>(q.size());
    over_tiles(items, [&](const ListItem& it, int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) int_store(it.out, i, it.it, int_average_at(it.xs.data(), q.data(), K, total, i, it.it));
    });
  }
  static void accumulate_list(const std::vector<ListItem>& items, double w, c10::Device) {
    const KernelTable& T = cpu_kernels();
    over_tiles(items, [&](const ListItem& it, int64_t i0, int64_t i1) {
      T.accumulate(it.dt, it.out, it.xs[0], w, i0, i1);
    });
  }
  // Partial sums per tile, added in tile order: the same result for any thread count.
  static at::Tensor sq_dist_list(const std::vector<ListItem>& items, c10::Device) {
    const KernelTable& T = cpu_kernels();
    std::vector<int64_t> first(items.size() + 1, 0);
    for (size_t j = 0; j < items.size(); ++j) first[j + 1] = first[j] + (items[j].n + kTile - 1) / kTile;
    std::vector<double> part(first.back(), 0.0);
    over_tiles(items, [&](const ListItem& it, int64_t i0, int64_t i1) {
      const size_t j = static_cast<size_t>(&it - items.data());
      for (int64_t a = i0; a < i1; a += kTile)
        part[first[j] + a / kTile] = T.sq_dist(it.dt, it.xs[0], it.out, a, std::min(a + kTile, i1));
    });
    double total = 0.0;
    for (double p : part) total += p;
    return at::scalar_tensor(total, at::kDouble);
  }
};

// Tile partials (4 per tile: the tiles of items[0], then of items[1], ...) into rows[index[i]]: min, max
// and the two sums, added in tile order; rows[L][3]: the squares' sum over the tensors marked in in_total.
// The same numbers for any thread count (the partials are per tile, whoever computed them).
void reduce_stats(const std::vector<int64_t>& index, const std::vector<int64_t>& first, const double* part,
                  at::IntArrayRef in_total, double* rows, int64_t L) {
  double total = 0.0;
  for (size_t i = 0; i < index.size(); ++i) {
    double* r = rows + index[i] * 4;
    for (int64_t t = first[i]; t < first[i + 1]; ++t) {
      const double* p = part + t * 4;
      r[0] = std::min(r[0], p[0]);
      r[1] = std::max(r[1], p[1]);
      r[2] += p[2];
      r[3] += p[3];
      if (in_total[index[i]]) total += p[3];
    }
  }
  rows[L * 4 + 3] = total;
}

// Per tensor j: row j = (min and max over the non-NaN values, count of NaN/Inf, ||xs[j] - refs[j]||^2);
// row K = (0, 0, 0, the sum of the squares over the tensors with in_total[j] != 0, tile partials
// added in order: sq_dist_list's total over those tensors). Every check of a reply in one read,
// the same numbers for any thread count. CPU only; CUDA tensors run the reference.
at::Tensor reply_stats_list(at::TensorList xs, at::TensorList refs, at::IntArrayRef in_total) {
  TORCH_CHECK_VALUE(xs.size() == refs.size(), "xs and refs must hold the same number of tensors, got ", xs.size(),
                    " and ", refs.size());
  TORCH_CHECK_VALUE(in_total.size() == xs.size(), "in_total must have one entry per tensor (", xs.size(), "), got ",
                    in_total.size());
  const int64_t K = static_cast<int64_t>(xs.size());
  at::Tensor out = at::zeros({K + 1, 4}, at::kDouble);
  double* o = out.data_ptr<double>();
  std::vector<ListItem> items;
  std::vector<int64_t> index;  // items[i] is xs[index[i]]
  for (int64_t j = 0; j < K; ++j) {
    const std::string xn = "xs[" + std::to_string(j) + "]", rn = "refs[" + std::to_string(j) + "]";
    TORCH_CHECK_VALUE(xs[j].device().is_cpu(), xn, " must be on the CPU, got ", xs[j].device());
    check_same(refs[j], rn, xs[j], xn);
    o[j * 4 + 0] = HUGE_VAL;
    o[j * 4 + 1] = -HUGE_VAL;
    ListItem it{dtype_of(xs[j], xn.c_str()), xs[j].numel(), const_cast<void*>(refs[j].data_ptr()), {xs[j].data_ptr()}};
    if (it.n) {
      items.push_back(std::move(it));
      index.push_back(j);
    }
  }
  if (items.empty()) return out;
  const KernelTable& T = cpu_kernels();
  std::vector<int64_t> first(items.size() + 1, 0);
  for (size_t i = 0; i < items.size(); ++i) first[i + 1] = first[i] + (items[i].n + kTile - 1) / kTile;
  std::vector<double> part(first.back() * 4, 0.0);
  CpuBackend::over_tiles(items, [&](const ListItem& it, int64_t i0, int64_t i1) {
    const size_t i = static_cast<size_t>(&it - items.data());
    for (int64_t a = i0; a < i1; a += kTile)
      T.reply_stats(it.dt, it.xs[0], it.out, a, std::min(a + kTile, i1), &part[(first[i] + a / kTile) * 4]);
  });
  reduce_stats(index, first, part.data(), in_total, o, K);
  return out;
}

// K clients folded into one accumulator in one read of each (issue 28): for each tensor j and each
// client k in order, accs[j] += ws[k] * xs[k * L + j] (accs zeroed first when zero is true), tile by
// tile: the bits of K accumulate_list_ calls (that fold is one fma per element, whatever the tiling).
// With refs (L tensors, or none), also every client's reply_stats_list rows against them, taken from
// the same read with that op's tiles and order: a (K, L + 1, 4) float64 tensor ((0, L + 1, 4) without
// refs). CPU only; nothing may overlap an accumulator (zeroing it would clobber an input).
at::Tensor fold_stats_list_(at::TensorList accs, at::TensorList xs, at::ArrayRef<double> ws, bool zero,
                            at::TensorList refs, at::IntArrayRef in_total) {
  const int64_t K = static_cast<int64_t>(ws.size()), L = static_cast<int64_t>(accs.size());
  TORCH_CHECK_VALUE(K >= 1, "ws must hold at least one client");
  for (int64_t k = 0; k < K; ++k) TORCH_CHECK_VALUE(std::isfinite(ws[k]), "ws[", k, "] must be finite, got ", ws[k]);
  TORCH_CHECK_VALUE(static_cast<int64_t>(xs.size()) == K * L, "xs must hold K*L = ", K * L,
                    " tensors (client-major), got ", xs.size());
  const bool stats = !refs.empty();
  TORCH_CHECK_VALUE(!stats || static_cast<int64_t>(refs.size()) == L, "refs must hold ", L,
                    " tensors (one per accumulator) or none, got ", refs.size());
  TORCH_CHECK_VALUE(in_total.size() == refs.size(), "in_total must have one entry per ref (", refs.size(), "), got ",
                    in_total.size());
  at::Tensor out = at::zeros({stats ? K : 0, L + 1, 4}, at::kDouble);
  if (L == 0) return out;
  double* o = out.data_ptr<double>();
  std::vector<ListItem> items;
  std::vector<const void*> ref_of;  // per item
  std::vector<int64_t> index;       // items[i] is tensor index[i]
  std::vector<Span> out_spans, in_spans;
  for (int64_t j = 0; j < L; ++j) {
    const std::string an = "accs[" + std::to_string(j) + "]", x0 = "xs[" + std::to_string(j) + "]";
    TORCH_CHECK_VALUE(accs[j].device().is_cpu(), an, " must be on the CPU, got ", accs[j].device());
    const DType dt = dtype_of(xs[j], x0.c_str());
    check_accumulate(accs[j], xs[j], an, x0);
    out_spans.push_back(span_of(accs[j], j, an));
    ListItem it{dt, xs[j].numel(), accs[j].data_ptr(), std::vector<const void*>(K)};
    for (int64_t k = 0; k < K; ++k) {
      const std::string xn = "xs[" + std::to_string(k * L + j) + "]";
      check_same(xs[j], x0, xs[k * L + j], xn);
      it.xs[k] = xs[k * L + j].data_ptr();
      in_spans.push_back(span_of(xs[k * L + j], -1, xn));
    }
    if (stats) {
      const std::string rn = "refs[" + std::to_string(j) + "]";
      check_same(xs[j], x0, refs[j], rn);
      in_spans.push_back(span_of(refs[j], -1, rn));
      for (int64_t k = 0; k < K; ++k) {
        o[(k * (L + 1) + j) * 4 + 0] = HUGE_VAL;
        o[(k * (L + 1) + j) * 4 + 1] = -HUGE_VAL;
      }
    }
    if (it.n) {
      items.push_back(std::move(it));
      ref_of.push_back(stats ? refs[j].data_ptr() : nullptr);
      index.push_back(j);
    }
  }
  check_overlap(std::move(out_spans), in_spans);
  if (items.empty()) return out;
  const KernelTable& T = cpu_kernels();
  std::vector<int64_t> first(items.size() + 1, 0);
  for (size_t i = 0; i < items.size(); ++i) first[i + 1] = first[i] + (items[i].n + kTile - 1) / kTile;
  const int64_t tiles = first.back();
  std::vector<double> part(stats ? K * tiles * 4 : 0, 0.0);
  CpuBackend::over_tiles(items, [&](const ListItem& it, int64_t i0, int64_t i1) {
    const size_t i = static_cast<size_t>(&it - items.data());
    const size_t esz = it.dt == DType::f64 ? sizeof(double) : sizeof(float);
    for (int64_t a = i0; a < i1; a += kTile) {
      const int64_t b = std::min(a + kTile, i1);
      if (zero) std::memset(static_cast<char*>(it.out) + a * esz, 0, (b - a) * esz);  // +0.0, as torch.zeros
      // client by client over one tile: the accumulator's tile stays in cache, each client's tile
      // is read from memory once (its stats and its fold from the same loads)
      for (int64_t k = 0; k < K; ++k) {
        if (stats)
          T.reply_stats_fold(it.dt, it.xs[k], ref_of[i], it.out, ws[k], a, b, &part[(k * tiles + first[i] + a / kTile) * 4]);
        else
          T.accumulate(it.dt, it.out, it.xs[k], ws[k], a, b);
      }
    }
  });
  if (!stats) return out;
  for (int64_t k = 0; k < K; ++k) reduce_stats(index, first, &part[k * tiles * 4], in_total, o + k * (L + 1) * 4, L);
  return out;
}

std::string cpu_isa(c10::string_view isa) {
  if (isa.empty()) return cpu_kernels().name;
  const std::string want(isa);
  const char* got = set_isa(want.c_str());
  TORCH_CHECK(got != nullptr, "isa must be 'auto', 'avx512', 'avx2' or 'scalar' supported by this CPU, got '", want,
              "'");
  return got;
}

}  // namespace
}  // namespace fedsq

TORCH_LIBRARY(fedsq_fast, m) {
  m.def("pack_mask(Tensor z_s) -> Tensor");
  m.def("apply_mask(Tensor z_q, Tensor bits) -> Tensor");
  m.def("apply_mask_out(Tensor z_q, Tensor bits, Tensor(a!) y) -> ()");
  m.def("gate(Tensor z_q, Tensor z_s) -> (Tensor, Tensor)");
  m.def("gate_out(Tensor z_q, Tensor z_s, Tensor(a!) y, Tensor(b!) bits) -> ()");
  // y = z_q * g(z_s), g the gate of a soft gate site (kind: 'sigmoid', 'phi', 'phi_tanh',
  // 'hardsigmoid', 'tanh_softplus'); differentiable in z_q (its backward is this op on grad_y).
  m.def("soft_gate_apply(Tensor z_q, Tensor z_s, str kind) -> Tensor");
  m.def("soft_gate_apply_out(Tensor z_q, Tensor z_s, str kind, Tensor(a!) y) -> ()");
  m.def("struct_epilogue(Tensor z_s, Tensor? scale, Tensor? shift) -> (Tensor, Tensor)");
  m.def("struct_epilogue_(Tensor(a!) z_s, Tensor? scale, Tensor? shift, Tensor(b!) bits) -> ()");
  m.def("weighted_sum_out(Tensor[] xs, float[] weights, Tensor(a!) out) -> ()");
  m.def("accumulate_(Tensor(a!) acc, Tensor x, float weight) -> ()");
  m.def("weighted_sum_list_out(Tensor[] xs, float[] weights, Tensor(a!)[] outs) -> ()");
  m.def("int_weighted_sum_list_out(Tensor[] xs, int[] weights, Tensor(a!)[] outs) -> ()");
  m.def("accumulate_list_(Tensor(a!)[] acc, Tensor[] x, float weight) -> ()");
  // A 0-dim float64 tensor on the inputs' device: traceable (a float is not) and no host sync on CUDA.
  m.def("sq_dist_list(Tensor[] xs, Tensor[] refs) -> Tensor");
  // (K + 1, 4) float64 on the CPU: per tensor min/max of the non-NaN values, NaN/Inf count, squared
  // distance; last row: the squared distance over the tensors marked in in_total (a reply's checks).
  m.def("reply_stats_list(Tensor[] xs, Tensor[] refs, int[] in_total) -> Tensor");
  // K clients folded into accs in one read each (xs client-major), zeroing accs first if zero; with
  // refs, each client's reply_stats_list rows from that read: (K, L + 1, 4) float64 on the CPU.
  m.def("fold_stats_list_(Tensor(a!)[] accs, Tensor[] xs, float[] ws, bool zero, Tensor[] refs, int[] in_total) -> Tensor");
  // Not a tensor op: selects the CPU kernel variant (tests run every ISA the CPU has).
  m.def("cpu_isa(str isa='') -> str", &fedsq::cpu_isa);
  // Not a tensor op: the CPU output cache's limit in MiB (-1: unchanged) -> [cached bytes, limit bytes].
  m.def("cpu_cache(int mb=-1) -> int[]", &fedsq::cpu_cache);
}

TORCH_LIBRARY_IMPL(fedsq_fast, CPU, m) {
  fedsq::Ops<fedsq::CpuBackend>::register_impls(m);
  m.impl("reply_stats_list", &fedsq::reply_stats_list);
  m.impl("fold_stats_list_", &fedsq::fold_stats_list_);
}
