// One registration function per binding family (bind_*.cc).
#pragma once
#include <napi.h>

namespace expertd::addon {
void register_core(Napi::Env env, Napi::Object exports);       // capabilities, threads, buffers
void register_gemm(Napi::Env env, Napi::Object exports);       // packing, DenseGemm, GroupGemm
void register_ops(Napi::Env env, Napi::Object exports);        // routing, permute, norms, rope...
void register_attention(Napi::Env env, Napi::Object exports);  // paged attention, KV writes
void register_io(Napi::Env env, Napi::Object exports);         // mmap, file reads
void register_comm(Napi::Env env, Napi::Object exports);       // comm groups (loopback, NCCL)
void register_loader(Napi::Env env, Napi::Object exports);     // expert loader (copy thread)
void register_sampling(Napi::Env env, Napi::Object exports);   // batched token sampler
void register_deltanet(Napi::Env env, Napi::Object exports);   // Gated DeltaNet (conv, delta rule, gated norm)
#ifdef EXPERTD_WITH_CUDA
void register_cuda(Napi::Env env, Napi::Object exports);       // CUDA buffers, streams, ops
#endif
}  // namespace expertd::addon
