// Run-time choice of the CPU kernel table: the widest ISA this CPU has
// (never -march=native at build time), overridable with FEDSQ_FAST_CPU_ISA
// or set_isa() so tests can exercise every variant on one machine.
#include <atomic>
#include <cstdlib>
#include <cstring>

#include "kernels.h"

namespace fedsq {

bool isa_supported(const char* isa) {
  if (std::strcmp(isa, "scalar") == 0) return true;
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  if (std::strcmp(isa, "avx2") == 0)
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  if (std::strcmp(isa, "avx512") == 0)
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
#endif
  return false;
}

static const KernelTable* best() {
  if (isa_supported("avx512")) return &kernels_avx512();
  if (isa_supported("avx2")) return &kernels_avx2();
  return &kernels_scalar();
}

static const KernelTable* by_name(const char* isa) {
  if (std::strcmp(isa, "auto") == 0) return best();
  if (!isa_supported(isa)) return nullptr;
  if (std::strcmp(isa, "avx512") == 0) return &kernels_avx512();
  if (std::strcmp(isa, "avx2") == 0) return &kernels_avx2();
  return &kernels_scalar();
}

static std::atomic<const KernelTable*> g_table{nullptr};

const KernelTable& cpu_kernels() {
  const KernelTable* t = g_table.load(std::memory_order_acquire);
  if (t == nullptr) {
    const char* env = std::getenv("FEDSQ_FAST_CPU_ISA");
    t = env ? by_name(env) : nullptr;
    if (t == nullptr) t = best();  // an unknown or unsupported request falls back
    g_table.store(t, std::memory_order_release);
  }
  return *t;
}

const char* set_isa(const char* isa) {
  const KernelTable* t = by_name(isa);
  if (t == nullptr) return nullptr;
  g_table.store(t, std::memory_order_release);
  return t->name;
}

}  // namespace fedsq
