// The NEON trees: every file here is compiled twice, as sp::neon (ARMv8-A Advanced SIMD) and as
// sp::neondot (-march=armv8.2-a+dotprod, SP_ISA_NS=neondot from CMake), and the dispatcher picks the
// dot-product one where the CPU has it (HWCAP_ASIMDDP). Included first by each file of the tree.
#pragma once
#ifndef SP_ISA_NS
#define SP_ISA_NS neon
#endif
