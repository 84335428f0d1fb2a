// The CPU kernels compiled for avx512 (flags set per file in CMakeLists.txt).
// System headers come first so the guarded includes inside the namespace
// below are no-ops; everything ISA-specific stays in namespace isa_avx512.
#define FEDSQ_ISA 2
#define FEDSQ_ISA_NAME "avx512"
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
namespace isa_avx512 {
#include "kernels_impl.h"
}  // namespace isa_avx512
const KernelTable& kernels_avx512() { return isa_avx512::kTable; }
}  // namespace fedsq
