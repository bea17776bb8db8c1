// cpuid / hwcap detection of the instruction sets the kernels can use.
#include "expertd/cpu_features.h"

#include <atomic>
#include <cstdlib>
#include <cstring>

#if defined(__x86_64__) || defined(_M_X64)
#include <cpuid.h>
#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif
#endif

namespace expertd {

namespace {

#if defined(__x86_64__)
uint64_t xgetbv0() {
  uint32_t eax, edx;
  __asm__ volatile("xgetbv" : "=a"(eax), "=d"(edx) : "c"(0));
  return (static_cast<uint64_t>(edx) << 32) | eax;
}

bool request_amx_permission() {
#if defined(__linux__)
  // Linux requires a process to ask for the AMX tile state before using it.
  constexpr long ARCH_REQ_XCOMP_PERM = 0x1023;
  constexpr long XFEATURE_XTILEDATA = 18;
  return syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
#else
  return false;
#endif
}
#endif

CpuFeatures detect() {
  CpuFeatures f;
#if defined(__x86_64__)
  unsigned a, b, c, d;
  if (!__get_cpuid(1, &a, &b, &c, &d)) return f;
  bool osxsave = c & (1u << 27);
  f.fma = c & (1u << 12);
  f.f16c = c & (1u << 29);
  uint64_t xcr0 = osxsave ? xgetbv0() : 0;
  bool ymm_ok = (xcr0 & 0x6) == 0x6;
  bool zmm_ok = (xcr0 & 0xe6) == 0xe6;
  if (__get_cpuid_max(0, nullptr) >= 7) {
    __cpuid_count(7, 0, a, b, c, d);
    f.avx2 = ymm_ok && (b & (1u << 5));
    f.avx512f = zmm_ok && (b & (1u << 16));
    f.avx512bw = zmm_ok && (b & (1u << 30));
    f.avx512vl = zmm_ok && (b & (1u << 31));
    bool amx_tile = d & (1u << 24);
    bool amx_bf16 = d & (1u << 22);
    bool amx_int8 = d & (1u << 25);
    f.avx512vbmi = f.avx512f && (c & (1u << 1));
    f.avx512vnni = f.avx512f && (c & (1u << 11));
    __cpuid_count(7, 1, a, b, c, d);
    f.avx512bf16 = f.avx512f && (a & (1u << 5));
    bool tile_os = (xcr0 & (3ull << 17)) == (3ull << 17);
    const bool amx_ok = amx_tile && tile_os && request_amx_permission();
    f.amx_bf16 = amx_ok && amx_bf16;
    f.amx_int8 = amx_ok && amx_int8;
  }
  if (!f.fma || !f.avx2) f.avx2 = false;
  f.kernel_avx2 = f.avx2 && f.fma && f.f16c;
  f.kernel_avx512 = f.avx512f && f.avx512bw && f.avx512vl && f.fma;
  f.kernel_bf16dot = f.kernel_avx512 && f.avx512bf16;
  f.kernel_vnni = f.kernel_avx512 && f.avx512vnni;
#elif defined(__aarch64__)
  f.neon = true;
#endif
  return f;
}

std::atomic<int> g_override{0};  // 0 auto, 1 scalar, 2 avx512, 3 avx512bf16, 4 noamx, 5 amx, 6 avx2

// AMX tiles for the fast-mode bf16 GEMMs are opt-in (EXPERTD_AMX=1): they run prefill 2-4x faster
// than vdpbf16ps but one-row (decode batch 1) calls 15-35% slower on this project's bench models,
// and the path may not depend on the row count (gemm_kernels.h NOTE), so one process uses one.
bool amx_opted_in() {
  const char* v = std::getenv("EXPERTD_AMX");
  return v && (std::strcmp(v, "1") == 0 || std::strcmp(v, "on") == 0 || std::strcmp(v, "true") == 0);
}

}  // namespace

const CpuFeatures& cpu_features() {
  static const CpuFeatures detected = detect();
  static const CpuFeatures scalar = [] {
    CpuFeatures s;
    s.neon = detected.neon;
    return s;
  }();
  // The forced levels only take away: a level the CPU lacks stays off.
  static const CpuFeatures avx512 = [] {
    CpuFeatures s = detected;
    s.avx512bf16 = s.avx512vnni = s.amx_bf16 = s.amx_int8 = false;
    s.kernel_bf16dot = s.kernel_vnni = false;
    return s;
  }();
  static const CpuFeatures avx512bf16 = [] {
    CpuFeatures s = detected;
    s.avx512vnni = s.amx_bf16 = s.amx_int8 = false;
    s.kernel_vnni = false;
    return s;
  }();
  // AVX2 + FMA alone (what AMD Zen 2/3 and Intel client cores have): every AVX-512 bit off.
  static const CpuFeatures avx2 = [] {
    CpuFeatures s = detected;
    s.avx512f = s.avx512bw = s.avx512vl = s.avx512bf16 = s.avx512vnni = s.avx512vbmi = false;
    s.amx_bf16 = s.amx_int8 = false;
    s.kernel_avx512 = s.kernel_bf16dot = s.kernel_vnni = false;
    return s;
  }();
  static const CpuFeatures noamx = [] {
    CpuFeatures s = detected;
    s.amx_bf16 = s.amx_int8 = false;
    return s;
  }();
  switch (g_override.load()) {
    case 1: return scalar;
    case 2: return avx512;
    case 3: return avx512bf16;
    case 4: return noamx;
    case 5: return detected;
    case 6: return avx2;
    default: {
      static const bool amx = amx_opted_in();
      return amx ? detected : noamx;
    }
  }
}

std::string simd_level() {
  const CpuFeatures& f = cpu_features();
  if (f.amx_bf16 && f.kernel_bf16dot) return "amx";
  if (f.kernel_bf16dot) return "avx512bf16";
  if (f.kernel_avx512) return "avx512";
  if (f.kernel_avx2) return "avx2";
  if (f.neon) return "neon";
  return "scalar";
}

void set_simd_override(const std::string& level) {
  g_override.store(level == "scalar"       ? 1
                   : level == "avx512"     ? 2
                   : level == "avx512bf16" ? 3
                   : level == "noamx"      ? 4
                   : level == "amx"        ? 5
                   : level == "avx2"       ? 6
                                           : 0);
}

}  // namespace expertd
