#define SP_ISA_NS avx2
#include "runtime/ops.h"

namespace sp {
namespace avx2 {

const RuntimeOps& runtime_ops() { return rt::table(); }

}  // namespace avx2
}  // namespace sp
