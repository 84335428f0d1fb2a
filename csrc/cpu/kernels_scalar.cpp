// The CPU kernels compiled for scalar (flags set per file in CMakeLists.txt).
// System headers come first so the guarded includes inside the namespace
// below are no-ops; everything ISA-specific stays in namespace isa_scalar.
#define FEDSQ_ISA 0
#define FEDSQ_ISA_NAME "scalar"
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
namespace isa_scalar {
#include "kernels_impl.h"
}  // namespace isa_scalar
const KernelTable& kernels_scalar() { return isa_scalar::kTable; }
}  // namespace fedsq
