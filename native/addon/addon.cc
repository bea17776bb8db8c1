// Module entry: registers every binding family. Bindings live one file per op family
// (bind_*.cc); this file only wires them together and owns per-env data.
#include <napi.h>

#include "handles.h"
#include "register.h"

namespace expertd::addon {

Napi::Object init(Napi::Env env, Napi::Object exports) {
  auto* data = new AddonData();
  env.SetInstanceData<AddonData>(data);
  Napi::Function weight = WeightHandle::define(env);
  data->weight_ctor = Napi::Persistent(weight);
  Napi::Function table = ExpertTableHandle::define(env);
  data->expert_table_ctor = Napi::Persistent(table);
  exports.Set("PackedWeight", weight);
  exports.Set("ExpertTable", table);

  register_core(env, exports);
  register_gemm(env, exports);
  register_ops(env, exports);
  register_attention(env, exports);
  register_io(env, exports);
  register_comm(env, exports);
  register_loader(env, exports);
  register_sampling(env, exports);
  register_deltanet(env, exports);
#ifdef EXPERTD_WITH_CUDA
  register_cuda(env, exports);
#endif
  return exports;
}

}  // namespace expertd::addon

static Napi::Object expertd_init(Napi::Env env, Napi::Object exports) {
  return expertd::addon::init(env, exports);
}

NODE_API_MODULE(expertd_addon, expertd_init)
