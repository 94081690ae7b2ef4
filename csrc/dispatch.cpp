#include "dispatch.h"

#if defined(__x86_64__)
#include <cpuid.h>
#elif defined(__aarch64__)
#include <sys/auxv.h>
#endif

#include <atomic>
#include <vector>
#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif
#include <stdexcept>

namespace sp {
namespace {

// One tree per level, lowest first; `usable` says whether this CPU and OS can run it.
struct Level {
  const char* name;
  const KernelTable& (*table)();
  bool usable;
};

#if defined(__x86_64__)
uint64_t xgetbv0() {
  uint32_t lo, hi;
  __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  return (uint64_t(hi) << 32) | lo;
}

struct CpuFeatures {
  bool avx2 = false;
  bool avx_vnni = false;
  bool avx512 = false;
  bool amx = false;
};

// Linux hands out the tile registers' 8 KiB of state only to a process that asks for it
// (arch_prctl ARCH_REQ_XCOMP_PERM for XTILEDATA); without it the first tile instruction faults.
bool amx_permitted() {
#if defined(__linux__)
  constexpr long kReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
  return syscall(SYS_arch_prctl, kReqXcompPerm, kXfeatureXtiledata) == 0;
#else
  return false;
#endif
}

CpuFeatures probe() {
  CpuFeatures f;
  unsigned a, b, c, d;
  if (!__get_cpuid(1, &a, &b, &c, &d)) return f;
  const bool osxsave = c & (1u << 27), avx = c & (1u << 28), fma = c & (1u << 12);
  const bool popcnt = c & (1u << 23), f16c = c & (1u << 29);
  if (!osxsave || !avx) return f;
  const uint64_t xcr0 = xgetbv0();
  const bool os_ymm = (xcr0 & 0x6) == 0x6;             // SSE + AVX state
  const bool os_zmm = (xcr0 & 0xE6) == 0xE6;           // + opmask, ZMM_Hi256, Hi16_ZMM
  if (__get_cpuid_max(0, nullptr) < 7) return f;
  __cpuid_count(7, 0, a, b, c, d);
  const unsigned max_subleaf = a;
  const bool avx2 = b & (1u << 5), bmi1 = b & (1u << 3), bmi2 = b & (1u << 8);
  const bool f512 = b & (1u << 16), dq = b & (1u << 17), bw = b & (1u << 30), vl = b & (1u << 31);
  const bool vbmi = c & (1u << 1), vbmi2 = c & (1u << 6), vnni = c & (1u << 11);
  f.avx2 = os_ymm && avx2 && fma && bmi1 && bmi2 && popcnt && f16c;
  f.avx512 = f.avx2 && os_zmm && f512 && dq && bw && vl && vbmi && vbmi2 && vnni;
  if (max_subleaf >= 1) {
    __cpuid_count(7, 1, a, b, c, d);
    f.avx_vnni = f.avx2 && (a & (1u << 4));  // AVX-VNNI: vpdpbusd on ymm, VEX-encoded
  }
  __cpuid_count(7, 0, a, b, c, d);
  const bool amx_tile = d & (1u << 24), amx_int8 = d & (1u << 25);
  const bool os_tiles = (xcr0 & 0x60000) == 0x60000;  // XTILECFG + XTILEDATA
  f.amx = f.avx512 && amx_tile && amx_int8 && os_tiles && amx_permitted();
  return f;
}

const Level* levels(int* n) {
  static const CpuFeatures f = probe();
  static const std::vector<Level> all = [] {
    std::vector<Level> v = {{"scalar", scalar::table, true}, {"avx2", avx2::table, f.avx2}};
#if defined(SP_HAVE_AVX2VNNI)
    v.push_back({"avx2vnni", avx2vnni::table, f.avx_vnni});
#endif
    v.push_back({"avx512", avx512::table, f.avx512});
#if defined(SP_HAVE_AMX)
    v.push_back({"amx", avx512::amx_table, f.amx});
#endif
    return v;
  }();
  *n = int(all.size());
  return all.data();
}
#elif defined(__aarch64__)
const Level* levels(int* n) {
  // Advanced SIMD is part of ARMv8-A; the dot-product instructions (sdot) came with ARMv8.2 as an option.
#ifndef HWCAP_ASIMDDP
#define HWCAP_ASIMDDP (1 << 20)
#endif
  static const bool dot = (getauxval(AT_HWCAP) & HWCAP_ASIMDDP) != 0;
  static const Level all[] = {{"scalar", scalar::table, true}, {"neon", neon::table, true},
                              {"neondot", neondot::table, dot}};
  *n = 3;
  return all;
}
#else
const Level* levels(int* n) {
  static const Level all[] = {{"scalar", scalar::table, true}};
  *n = 1;
  return all;
}
#endif

// The level called `name`: null for an unknown name, *known set either way.
const Level* find(const std::string& name) {
  int n = 0;
  const Level* all = levels(&n);
  for (int i = 0; i < n; ++i)
    if (name == all[i].name) return &all[i];
  return nullptr;
}

std::atomic<const KernelTable*>& active() {
  static std::atomic<const KernelTable*> t{&find(detect_isa())->table()};
  return t;
}

}  // namespace

std::string detect_isa() {
  int n = 0;
  const Level* all = levels(&n);
  for (int i = n - 1; i > 0; --i)
    if (all[i].usable) return all[i].name;
  return "scalar";
}

std::vector<std::string> supported_isas() {
  int n = 0;
  const Level* all = levels(&n);
  std::vector<std::string> out;
  for (int i = 0; i < n; ++i)
    if (all[i].usable) out.push_back(all[i].name);
  return out;
}

std::vector<std::string> known_isas() {
  int n = 0;
  const Level* all = levels(&n);
  std::vector<std::string> out;
  for (int i = 0; i < n; ++i) out.push_back(all[i].name);
  return out;
}

const KernelTable& active_table() { return *active().load(std::memory_order_acquire); }

void set_isa(const std::string& name) {
  const Level* level = find(name);
  if (!level) {
    std::string names;
    for (const std::string& k : known_isas()) names += (names.empty() ? "" : " | ") + k;
    throw std::invalid_argument("unknown ISA level '" + name + "' (" + names + ")");
  }
  if (!level->usable) throw std::invalid_argument("this CPU does not support ISA level '" + name + "'");
  active().store(&level->table(), std::memory_order_release);
}

}  // namespace sp
