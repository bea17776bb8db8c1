// Bindings for the io family: read-only file mappings exposed as external ArrayBuffers (zero-copy
// checkpoint tensors) and positioned reads into caller memory (the offloader's slow tier).
#include "args.h"
#include "expertd/io.h"
#include "register.h"

#include <mutex>
#include <unordered_map>

namespace expertd::addon {

namespace {

std::string get_path(const Napi::CallbackInfo& info, size_t i) {
  if (!info[i].IsString()) throw_type(info.Env(), "path must be a string");
  std::string path = info[i].As<Napi::String>().Utf8Value();
  if (path.empty()) throw_type(info.Env(), "path must not be empty");
  return path;
}

[[noreturn]] void throw_io(Napi::Env env, const std::string& msg) {
  Napi::Error e = Napi::Error::New(env, msg);
  e.Set("code", Napi::String::New(env, "E_IO"));
  throw e;
}

// The live mappings handed to JavaScript (dropMappedPages only acts on these).
std::mutex g_maps_mu;
std::unordered_map<void*, size_t> g_maps;

// mmapFile(path): ArrayBuffer over a PROT_READ, MAP_SHARED mapping of the whole file; the
// finalizer unmaps it when the buffer (and every view on it) is collected.
// NOTE: the pages are read-only: writing through a view of this buffer faults the process.
// Callers only ever read from it (weights are copied or packed elsewhere).
Napi::Value mmap_file(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  expect_args(info, 1, "mmapFile");
  std::string path = get_path(info, 0);
  MappedFile m;
  guard(env, [&] { m = map_file(path); });
  if (m.size == 0) return Napi::ArrayBuffer::New(env, 0);

  auto* holder = new MappedFile(m);
  napi_value result = nullptr;
  napi_status st = napi_create_external_arraybuffer(
      env, m.data, m.size,
      [](napi_env, void*, void* hint) {
        auto* mf = static_cast<MappedFile*>(hint);
        {
          std::lock_guard<std::mutex> lk(g_maps_mu);
          g_maps.erase(mf->data);
        }
        unmap_file(*mf);
        delete mf;
      },
      holder, &result);
  if (st != napi_ok) {
    // Builds with the V8 sandbox refuse external buffers (napi_no_external_buffers_allowed).
    unmap_file(*holder);
    delete holder;
    const napi_extended_error_info* err = nullptr;
    napi_get_last_error_info(env, &err);
    bool pending = false;
    napi_is_exception_pending(env, &pending);
    if (pending) {
      napi_value ignored;
      napi_get_and_clear_last_exception(env, &ignored);
    }
    throw_io(env, "cannot expose the mapping of " + path + " to JavaScript: " +
                      (err && err->error_message ? err->error_message : "unknown napi error") +
                      " (this Node build refuses external ArrayBuffers; use readFileRange)");
  }
  {
    std::lock_guard<std::mutex> lk(g_maps_mu);
    g_maps[m.data] = m.size;
  }
  return Napi::Value(env, result);
}

// dropMappedPages(buffer): a mapping's resident pages released (the checkpoint loader calls it
// once the weights are packed: the pages it read stay in the page cache, not in this process's
// RSS). A buffer that is not a live mmapFile mapping is refused.
Napi::Value drop_mapped_pages(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  expect_args(info, 1, "dropMappedPages");
  if (!info[0].IsArrayBuffer()) throw_type(env, "dropMappedPages takes an ArrayBuffer from mmapFile");
  Napi::ArrayBuffer buf = info[0].As<Napi::ArrayBuffer>();
  MappedFile m{buf.Data(), buf.ByteLength()};
  {
    std::lock_guard<std::mutex> lk(g_maps_mu);
    auto it = g_maps.find(m.data);
    if (it == g_maps.end() || it->second != m.size) throw_type(env, "dropMappedPages: the buffer is not a live mmapFile mapping");
  }
  drop_file_pages(m);
  return env.Undefined();
}

// readFileRange(path, offset, dst): pread of dst.length bytes at offset (real I/O, no mapping).
Napi::Value read_file_range_js(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  expect_args(info, 3, "readFileRange");
  std::string path = get_path(info, 0);
  int64_t offset = get_int(info, 1, "offset", 0, (int64_t(1) << 53));
  Span<uint8_t> dst = get_array<uint8_t>(info, 2, "dst", 0);
  guard(env, [&] { read_file_range(path, static_cast<uint64_t>(offset), dst.data, dst.length); });
  return env.Undefined();
}

}  // namespace

void register_io(Napi::Env env, Napi::Object exports) {
  exports.Set("mmapFile", Napi::Function::New(env, mmap_file, "mmapFile"));
  exports.Set("dropMappedPages", Napi::Function::New(env, drop_mapped_pages, "dropMappedPages"));
  exports.Set("readFileRange", Napi::Function::New(env, read_file_range_js, "readFileRange"));
}

}  // namespace expertd::addon
