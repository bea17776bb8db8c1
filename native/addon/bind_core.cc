// Core bindings: capabilities(), thread control, SIMD override, aligned host buffers.
#include <memory>
#include <thread>

#include "args.h"
#include "expertd/comm.h"
#include "expertd/cpu_features.h"
#include "expertd/errors.h"
#include "expertd/thread_pool.h"
#include "expertd/weight_memory.h"
#include "register.h"

#ifdef EXPERTD_WITH_CUDA
#include "expertd/cuda_backend.h"
#endif

namespace expertd::addon {

namespace {

Napi::Value capabilities(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const CpuFeatures& f = cpu_features();
  Napi::Object o = Napi::Object::New(env);
#if defined(__x86_64__)
  o.Set("arch", "x64");
#elif defined(__aarch64__)
  o.Set("arch", "arm64");
#else
  o.Set("arch", "other");
#endif
  o.Set("simd", simd_level());
  Napi::Object isa = Napi::Object::New(env);
  isa.Set("avx2", f.avx2);
  isa.Set("fma", f.fma);
  isa.Set("f16c", f.f16c);
  isa.Set("avx512f", f.avx512f);
  isa.Set("avx512bw", f.avx512bw);
  isa.Set("avx512vl", f.avx512vl);
  isa.Set("avx512bf16", f.avx512bf16);
  isa.Set("avx512vnni", f.avx512vnni);
  isa.Set("avx512vbmi", f.avx512vbmi);
  isa.Set("amxBf16", f.amx_bf16);
  isa.Set("amxInt8", f.amx_int8);
  isa.Set("neon", f.neon);
  o.Set("isa", isa);
  o.Set("bf16Dot", f.kernel_bf16dot);
  o.Set("amxTiles", f.kernel_bf16dot && f.amx_bf16);  // gemm::choose_path's Path::Amx
  o.Set("int8Dot", f.kernel_vnni);
  o.Set("threads", static_cast<double>(ThreadPool::instance().num_threads()));
  o.Set("hardwareThreads", static_cast<double>(std::thread::hardware_concurrency()));
#ifdef EXPERTD_WITH_CUDA
  o.Set("build", "full");
  o.Set("cudaCompiled", true);
  const CudaRuntimeStatus st = cuda_runtime_status();
  o.Set("cudaDevices", static_cast<double>(st.device_count));
  // NOTE: kept, never swallowed: a GPU test that skips says why (no fake green).
  o.Set("cudaError", st.error.empty() ? env.Null() : Napi::String::New(env, st.error));
  o.Set("cudaDriverVersion", static_cast<double>(st.driver_version));
  o.Set("cudaRuntimeVersion", static_cast<double>(st.runtime_version));
  o.Set("ncclFound", nccl_available());
#else
  o.Set("build", "portable");
  o.Set("cudaCompiled", false);
  o.Set("cudaDevices", 0);
  o.Set("cudaError", env.Null());
  o.Set("cudaDriverVersion", 0);
  o.Set("cudaRuntimeVersion", 0);
  o.Set("ncclFound", false);
#endif
  o.Set("gloo", gloo_compiled());
  return o;
}

Napi::Value set_num_threads(const Napi::CallbackInfo& info) {
  expect_args(info, 1, "setNumThreads");
  int64_t n = get_int(info, 0, "threads", 0, 1024);
  ThreadPool::instance().set_num_threads(static_cast<size_t>(n));
  return Napi::Number::New(info.Env(), static_cast<double>(ThreadPool::instance().num_threads()));
}

Napi::Value set_simd(const Napi::CallbackInfo& info) {
  expect_args(info, 1, "setSimdLevel");
  const char* kLevels = "'auto', 'scalar', 'avx2', 'avx512', 'avx512bf16', 'noamx' or 'amx'";
  if (!info[0].IsString()) throw_type(info.Env(), std::string("level must be ") + kLevels);
  std::string s = info[0].As<Napi::String>().Utf8Value();
  if (s != "auto" && s != "scalar" && s != "avx2" && s != "avx512" && s != "avx512bf16" && s != "noamx" && s != "amx")
    throw_type(info.Env(), "level is '" + s + "', expected " + kLevels);
  set_simd_override(s);
  return Napi::String::New(info.Env(), simd_level());
}

// allocHostBuffer(sizeBytes): a 64-byte aligned, zeroed ArrayBuffer owned by native code (freed by
// its finalizer), for arenas, staging and KV caches: from the weights' allocator, so on 2 MiB pages
// where the kernel lends them (weight_memory.h; EXPERTD_HUGE_PAGES=0: the C heap).
Napi::Value alloc_host_buffer(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  expect_args(info, 1, "allocHostBuffer");
  int64_t size = get_int(info, 0, "sizeBytes", 0, int64_t(1) << 46);
  if (size == 0) return Napi::ArrayBuffer::New(env, 0);
  std::shared_ptr<uint8_t> mem;
  try {
    mem = alloc_weight_bytes(static_cast<size_t>(size), "allocHostBuffer");
  } catch (const Error&) {
    Napi::Error e = Napi::Error::New(env, "allocHostBuffer: out of host memory for " + std::to_string(size) + " bytes");
    e.Set("code", Napi::String::New(env, "E_OOM"));
    throw e;
  }
  const int64_t rounded = (size + 63) / 64 * 64;
  Napi::MemoryManagement::AdjustExternalMemory(env, rounded);
  auto* owner = new std::shared_ptr<uint8_t>(std::move(mem));
  return Napi::ArrayBuffer::New(env, owner->get(), static_cast<size_t>(size),
                                [rounded](Napi::Env e, void*, std::shared_ptr<uint8_t>* o) {
                                  delete o;
                                  Napi::MemoryManagement::AdjustExternalMemory(e, -rounded);
                                },
                                owner);
}

}  // namespace

void register_core(Napi::Env env, Napi::Object exports) {
  exports.Set("capabilities", Napi::Function::New(env, capabilities, "capabilities"));
  exports.Set("setNumThreads", Napi::Function::New(env, set_num_threads, "setNumThreads"));
  exports.Set("setSimdLevel", Napi::Function::New(env, set_simd, "setSimdLevel"));
  exports.Set("allocHostBuffer", Napi::Function::New(env, alloc_host_buffer, "allocHostBuffer"));
}

}  // namespace expertd::addon
