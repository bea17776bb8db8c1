// Bindings for the ops family (to be filled in).
#include "args.h"
#include "register.h"

namespace expertd::addon {

void register_ops(Napi::Env env, Napi::Object exports) {
  (void)env;
  (void)exports;
}

}  // namespace expertd::addon
