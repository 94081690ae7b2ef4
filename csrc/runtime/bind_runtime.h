// Registers the runtime's classes (Norm, Projection, Stack, KVCache, CausalLM) on the extension module.
#pragma once
#include <nanobind/nanobind.h>

namespace sp {
namespace runtime {
void bind(nanobind::module_& m);
}  // namespace runtime
}  // namespace sp
