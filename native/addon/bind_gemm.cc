// Bindings for the gemm family (to be filled in).
#include "args.h"
#include "register.h"

namespace expertd::addon {

void register_gemm(Napi::Env env, Napi::Object exports) {
  (void)env;
  (void)exports;
}

}  // namespace expertd::addon
