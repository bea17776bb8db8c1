// Finds the libraries expertd loads at run time rather than links (cuBLASLt, NCCL): the override
// variable, then the pip wheels' folders under every Python site folder (where the GPU image's
// torch keeps them), then the loader path; records every candidate tried and why it was refused.
#include <dlfcn.h>
#include <glob.h>
#include <link.h>

#include <cstdlib>
#include <set>
#include <sstream>

#include "expertd/cuda_backend.h"

namespace expertd {
namespace {

std::vector<std::string> glob_paths(const std::string& pattern) {
  std::vector<std::string> out;
  glob_t g{};
  if (glob(pattern.c_str(), 0, nullptr, &g) == 0)
    for (size_t i = 0; i < g.gl_pathc; ++i) out.emplace_back(g.gl_pathv[i]);
  globfree(&g);
  return out;
}

std::vector<std::string> split(const char* list) {
  std::vector<std::string> out;
  if (list == nullptr) return out;
  std::stringstream ss(list);
  std::string item;
  while (std::getline(ss, item, ':'))
    if (!item.empty()) out.push_back(item);
  return out;
}

// Folders that may hold pip packages, most specific first: PYTHONPATH, the interpreters on PATH
// (a venv's bin/ -> its lib/python3*/site-packages), the active venv or conda env, the system's.
std::vector<std::string> site_folders() {
  std::vector<std::string> patterns;
  for (const std::string& p : split(std::getenv("PYTHONPATH"))) patterns.push_back(p);
  for (const std::string& bin : split(std::getenv("PATH"))) {
    patterns.push_back(bin + "/../lib/python3*/site-packages");
    patterns.push_back(bin + "/../lib/python3*/dist-packages");
  }
  for (const char* env : {"VIRTUAL_ENV", "CONDA_PREFIX"}) {
    const char* v = std::getenv(env);
    if (v && *v) patterns.push_back(std::string(v) + "/lib/python3*/site-packages");
  }
  const char* home = std::getenv("HOME");
  if (home && *home) patterns.push_back(std::string(home) + "/.local/lib/python3*/site-packages");
  for (const char* p : {"/opt/*/.venv/lib/python3*/site-packages", "/opt/conda/lib/python3*/site-packages",
                        "/usr/local/lib/python3*/site-packages", "/usr/local/lib/python3*/dist-packages",
                        "/usr/lib/python3*/site-packages", "/usr/lib/python3/dist-packages"})
    patterns.push_back(p);
  std::vector<std::string> out;
  std::set<std::string> seen;
  for (const std::string& pat : patterns)
    for (const std::string& dir : glob_paths(pat)) {
      char* real = realpath(dir.c_str(), nullptr);
      const std::string key = real ? real : dir;
      std::free(real);
      if (seen.insert(key).second) out.push_back(dir);
    }
  return out;
}

std::string loaded_path(void* handle, const std::string& fallback) {
  struct link_map* lm = nullptr;
  if (dlinfo(handle, RTLD_DI_LINKMAP, &lm) == 0 && lm && lm->l_name && *lm->l_name) return lm->l_name;
  return fallback;
}

}  // namespace

std::vector<std::string> library_candidates(const char* env_var, const std::vector<std::string>& sonames) {
  std::vector<std::string> out;
  const char* env = env_var ? std::getenv(env_var) : nullptr;
  if (env && *env) out.emplace_back(env);
  const std::vector<std::string> sites = site_folders();
  // Newest soname first across every site, so that a CUDA 13 wheel wins over a CUDA 12 one.
  for (const std::string& so : sonames)
    for (const std::string& site : sites) {
      for (const std::string& p : glob_paths(site + "/nvidia/cu1[0-9]/lib/" + so)) out.push_back(p);
      for (const std::string& p : glob_paths(site + "/nvidia/*/lib/" + so)) out.push_back(p);
    }
  for (const std::string& so : sonames) out.push_back(so);  // the loader path (LD_LIBRARY_PATH, ldconfig)
  std::vector<std::string> unique;
  std::set<std::string> seen;
  for (const std::string& p : out)
    if (seen.insert(p).second) unique.push_back(p);
  return unique;
}

LoadedLibrary load_library(const char* env_var, const std::vector<std::string>& sonames,
                           const std::vector<std::string>& required_symbols) {
  LoadedLibrary lib;
  for (const std::string& cand : library_candidates(env_var, sonames)) {
    void* h = dlopen(cand.c_str(), RTLD_NOW | RTLD_LOCAL);
    if (h == nullptr) {
      const char* err = dlerror();
      lib.tried.push_back(cand + ": " + (err ? err : "dlopen failed"));
      continue;
    }
    std::string missing;
    for (const std::string& sym : required_symbols)
      if (dlsym(h, sym.c_str()) == nullptr) {
        missing = sym;
        break;
      }
    if (!missing.empty()) {
      lib.tried.push_back(cand + ": has no " + missing);
      dlclose(h);
      continue;
    }
    lib.handle = h;
    lib.path = loaded_path(h, cand);
    lib.tried.push_back(cand + ": loaded");
    break;
  }
  return lib;
}

// The entry points dense_gemm.cc and nccl.cc bind: a library without one of them is passed over.
const LoadedLibrary& cublaslt_load() {
  static const LoadedLibrary lib = load_library(
      "EXPERTD_CUBLASLT_SO", {"libcublasLt.so.13", "libcublasLt.so.12", "libcublasLt.so"},
      {"cublasLtCreate", "cublasLtMatmulDescCreate", "cublasLtMatmulDescDestroy",
       "cublasLtMatmulDescSetAttribute", "cublasLtMatrixLayoutCreate", "cublasLtMatrixLayoutDestroy",
       "cublasLtMatmulPreferenceCreate", "cublasLtMatmulPreferenceDestroy",
       "cublasLtMatmulPreferenceSetAttribute", "cublasLtMatmulAlgoGetHeuristic", "cublasLtMatmul"});
  return lib;
}

const LoadedLibrary& nccl_load() {
  static const LoadedLibrary lib = load_library(
      "EXPERTD_NCCL_SO", {"libnccl.so.2"},
      {"ncclGetUniqueId", "ncclCommInitRankConfig", "ncclCommGetAsyncError", "ncclCommAbort",
       "ncclSend", "ncclRecv", "ncclGroupStart", "ncclGroupEnd", "ncclGetErrorString"});
  return lib;
}

}  // namespace expertd
