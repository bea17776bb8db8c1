// What the CPU can do, read once with cpuid (x86-64) or hwcaps (arm64), so one binary picks
// AVX-512 / AVX512-BF16 / AMX kernels where present and portable ones elsewhere.
#pragma once
#include <string>

namespace expertd {

struct CpuFeatures {
  bool avx2 = false;
  bool fma = false;
  bool f16c = false;
  bool avx512f = false;
  bool avx512bw = false;
  bool avx512vl = false;
  bool avx512bf16 = false;
  bool avx512vnni = false;
  bool avx512vbmi = false;
  bool amx_bf16 = false;  // AMX tiles usable (CPU bit and OS permission)
  bool amx_int8 = false;  // AMX int8 tiles usable (CPU bit and OS permission)
  bool neon = false;
  bool kernel_avx2 = false;    // the AVX2 + FMA kernels can be used (avx2, fma, f16c)
  bool kernel_avx512 = false;  // the AVX-512 kernels will be used (f+bw+vl)
  bool kernel_bf16dot = false;  // bf16 dot-product kernels will be used
  bool kernel_vnni = false;     // int8 dot-product kernels (AVX512-VNNI) will be used
};

const CpuFeatures& cpu_features();
// "amx" | "avx512bf16" | "avx512" | "avx2" | "neon" | "scalar"
std::string simd_level();
// Lets tests force a dispatch level: "scalar" (the portable kernels), "avx2" (AVX2 + FMA, no
// AVX-512 at all: the GEMM kernels of CPUs without it), "avx512" (AVX-512 without
// bf16 or int8 dot products), "avx512bf16" (bf16 dot products without AMX tiles or int8 dot
// products), "noamx" (what the CPU has but AMX tiles: fast-mode bf16 GEMMs run vdpbf16ps), "amx"
// (what the CPU has, AMX tiles included), or "auto": "amx" when the environment sets EXPERTD_AMX=1
// (or on / true), else "noamx" (AMX is opt-in: see cpu_features.cc). The levels only take away:
// one the CPU lacks stays off.
void set_simd_override(const std::string& level);

}  // namespace expertd
