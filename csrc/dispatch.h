// Run-time choice of the kernel tree: cpuid + XGETBV decide what the CPU and OS
// support; set_isa() lets tests and users force a lower level.
#pragma once
#include <string>
#include <vector>

#include "common.h"

namespace sp {

// Best level this CPU and OS support: "amx", "avx512", "avx2vnni", "avx2" or "scalar" on x86-64; "neondot", "neon" or
// "scalar" on aarch64.
std::string detect_isa();
// Levels usable here, best last.
std::vector<std::string> supported_isas();
// Levels this build has (usable here or not), lowest first.
std::vector<std::string> known_isas();
// Active table; starts at detect_isa().
const KernelTable& active_table();
// Switches the active level; throws std::invalid_argument for an unknown or unsupported name.
void set_isa(const std::string& name);

}  // namespace sp
