// The AVX2 trees: every file here is compiled twice, as sp::avx2 (AVX2, FMA, BMI2) and as sp::avx2vnni
// (the same with AVX-VNNI: -mavxvnni, SP_ISA_NS=avx2vnni from CMake), and the dispatcher picks the
// VNNI one where the CPU has it (Alder Lake and later, Zen 5). Where the sources differ, they test
// SP_AVX2_VNNI. Included first by each file of the tree.
#pragma once
#ifndef SP_ISA_NS
#define SP_ISA_NS avx2
#endif
// vpdpbusd on 256-bit registers: VEX-encoded (AVX-VNNI) in the shipped tree; the EVEX form (AVX-512
// VNNI + VL) computes the same and lets an AVX-512 CPU test this tree's code (tests/test_kernel_trees.py)
#if defined(__AVXVNNI__) || (defined(__AVX512VNNI__) && defined(__AVX512VL__))
#define SP_AVX2_VNNI 1
#else
#define SP_AVX2_VNNI 0
#endif
