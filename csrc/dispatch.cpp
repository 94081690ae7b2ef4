#include "dispatch.h"

#include <cpuid.h>

#include <atomic>
#include <stdexcept>

namespace sp {
namespace {

struct CpuFeatures {
  bool avx2 = false;
  bool avx512 = false;
};

uint64_t xgetbv0() {
  uint32_t lo, hi;
  __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  return (uint64_t(hi) << 32) | lo;
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
  const bool avx2 = b & (1u << 5), bmi1 = b & (1u << 3), bmi2 = b & (1u << 8);
  const bool f512 = b & (1u << 16), dq = b & (1u << 17), bw = b & (1u << 30), vl = b & (1u << 31);
  const bool vbmi = c & (1u << 1), vbmi2 = c & (1u << 6), vnni = c & (1u << 11);
  f.avx2 = os_ymm && avx2 && fma && bmi1 && bmi2 && popcnt && f16c;
  f.avx512 = f.avx2 && os_zmm && f512 && dq && bw && vl && vbmi && vbmi2 && vnni;
  return f;
}

const CpuFeatures& features() {
  static const CpuFeatures f = probe();
  return f;
}

const KernelTable* table_for(const std::string& name) {
  if (name == "scalar") return &scalar::table();
  if (name == "avx2") return features().avx2 ? &avx2::table() : nullptr;
  if (name == "avx512") return features().avx512 ? &avx512::table() : nullptr;
  return nullptr;
}

std::atomic<const KernelTable*>& active() {
  static std::atomic<const KernelTable*> t{table_for(detect_isa())};
  return t;
}

}  // namespace

std::string detect_isa() {
  if (features().avx512) return "avx512";
  if (features().avx2) return "avx2";
  return "scalar";
}

std::vector<std::string> supported_isas() {
  std::vector<std::string> out{"scalar"};
  if (features().avx2) out.push_back("avx2");
  if (features().avx512) out.push_back("avx512");
  return out;
}

const KernelTable& active_table() { return *active().load(std::memory_order_acquire); }

void set_isa(const std::string& name) {
  if (name != "scalar" && name != "avx2" && name != "avx512")
    throw std::invalid_argument("unknown ISA level '" + name + "' (scalar | avx2 | avx512)");
  const KernelTable* t = table_for(name);
  if (!t) throw std::invalid_argument("this CPU does not support ISA level '" + name + "'");
  active().store(t, std::memory_order_release);
}

}  // namespace sp
