#define SP_ISA_NS avx512
#include "runtime/ops.h"

namespace sp {
namespace avx512 {

const RuntimeOps& runtime_ops() { return rt::table(); }

}  // namespace avx512
}  // namespace sp
