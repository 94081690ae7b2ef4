#define SP_ISA_NS scalar
#include "runtime/ops.h"

namespace sp {
namespace scalar {

const RuntimeOps& runtime_ops() { return rt::table(); }

}  // namespace scalar
}  // namespace sp
