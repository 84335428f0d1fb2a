// The CPU kernels compiled for avx2 (flags set per file in CMakeLists.txt).
// System headers come first so the guarded includes inside the namespace
// below are no-ops; everything ISA-specific stays in namespace isa_avx2.
#define FEDSQ_ISA 1
#define FEDSQ_ISA_NAME "avx2"
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#if FEDSQ_ISA > 0
#include <immintrin.h>
#endif
#include "kernels.h"

namespace fedsq {
namespace isa_avx2 {
#include "kernels_impl.h"
}  // namespace isa_avx2
const KernelTable& kernels_avx2() { return isa_avx2::kTable; }
}  // namespace fedsq
