// Peer for the expert FFN benchmarks: the MoE FFN written the way a user of a vendor BLAS would,
// one OpenBLAS call per projection per expert (gate, up, SiLU*up, down), f32 (cblas_sgemm) and bf16
// (cblas_sbgemm, where the library has it). OpenBLAS is loaded with dlopen, so the bench builds
// without it; compiled at run time by bench/native-tool.ts. Protocol on stdin/stdout (one line each):
//   in:  case <id> <f32|bf16> <H> <I> <E> <reps> <warmup> <flushBytes> <count_0> ... <count_E-1>
//   out: {"id":...,"timesMs":[...],"checkRelErr":...}   (first line: library info)
#include <dlfcn.h>
#include <link.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <iostream>
#include <sstream>
#include <string>
#include <vector>

namespace {

// CBLAS enum values (cblas.h); we do not include it so the peer builds without OpenBLAS headers.
constexpr int kRowMajor = 101, kNoTrans = 111, kTrans = 112;
using SgemmFn = void (*)(int, int, int, int, int, int, float, const float*, int, const float*, int,
                         float, float*, int);
using SbgemmFn = void (*)(int, int, int, int, int, int, float, const uint16_t*, int,
                          const uint16_t*, int, float, float*, int);
using SetThreadsFn = void (*)(int);
using GetStrFn = char* (*)();
using GetIntFn = int (*)();

struct Blas {
  void* lib = nullptr;
  std::string path;
  SgemmFn sgemm = nullptr;
  SbgemmFn sbgemm = nullptr;
  SetThreadsFn set_threads = nullptr;
  GetStrFn corename = nullptr, config = nullptr;
  GetIntFn num_threads = nullptr;
};

std::string json_escape(const std::string& s) {
  std::string o;
  for (char c : s) {
    if (c == '"' || c == '\\') o += '\\';
    if (c == '\n') { o += "\\n"; continue; }
    o += c;
  }
  return o;
}

double now_ms() {
  using clock = std::chrono::steady_clock;
  return std::chrono::duration<double, std::milli>(clock::now().time_since_epoch()).count();
}

uint64_t rng_state = 0x9E3779B97F4A7C15ull;
inline float uniform_pm1() {  // xorshift64*, uniform in [-1, 1)
  rng_state ^= rng_state >> 12;
  rng_state ^= rng_state << 25;
  rng_state ^= rng_state >> 27;
  uint64_t r = rng_state * 0x2545F4914F6CDD1Dull;
  return static_cast<float>(r >> 40) / static_cast<float>(1 << 23) - 1.0f;
}

inline uint16_t to_bf16(float f) {  // round to nearest even (inputs are finite)
  uint32_t u;
  std::memcpy(&u, &f, 4);
  u += 0x7FFF + ((u >> 16) & 1);
  return static_cast<uint16_t>(u >> 16);
}
inline float from_bf16(uint16_t b) {
  uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// One layer's experts in the peer's storage dtype. W_gate, W_up [I, H]; W_down [H, I] (HF layout).
struct Experts {
  bool bf16 = false;
  int h = 0, inter = 0, e = 0;
  std::vector<std::vector<float>> gate32, up32, down32;
  std::vector<std::vector<uint16_t>> gate16, up16, down16;

  void make(bool use_bf16, int h_, int i_, int e_) {
    if (bf16 == use_bf16 && h == h_ && inter == i_ && e == e_) return;
    *this = Experts();
    bf16 = use_bf16, h = h_, inter = i_, e = e_;
    const float sg = 1.0f / std::sqrt(static_cast<float>(h)), sd = 1.0f / std::sqrt(float(inter));
    size_t n = static_cast<size_t>(h) * inter;
    auto fill32 = [&](std::vector<float>& v, float s) {
      v.resize(n);
      for (auto& x : v) x = uniform_pm1() * s;
    };
    auto fill16 = [&](std::vector<uint16_t>& v, float s) {
      v.resize(n);
      for (auto& x : v) x = to_bf16(uniform_pm1() * s);
    };
    for (int j = 0; j < e; ++j) {
      if (bf16) {
        gate16.emplace_back(), up16.emplace_back(), down16.emplace_back();
        fill16(gate16.back(), sg), fill16(up16.back(), sg), fill16(down16.back(), sd);
      } else {
        gate32.emplace_back(), up32.emplace_back(), down32.emplace_back();
        fill32(gate32.back(), sg), fill32(up32.back(), sg), fill32(down32.back(), sd);
      }
    }
  }
  float gate_at(int ex, size_t idx) const { return bf16 ? from_bf16(gate16[ex][idx]) : gate32[ex][idx]; }
  float up_at(int ex, size_t idx) const { return bf16 ? from_bf16(up16[ex][idx]) : up32[ex][idx]; }
  float down_at(int ex, size_t idx) const { return bf16 ? from_bf16(down16[ex][idx]) : down32[ex][idx]; }
};

inline float silu(float g) { return g / (1.0f + std::exp(-g)); }

// The peer proper: y[rows of e] = down_e(SiLU(gate_e(x)) * up_e(x)) for every expert with rows.
// x, y [rows, H] f32, expert-contiguous (the same permuted layout our GroupGemm receives).
void moe_ffn(const Blas& blas, const Experts& ex, const std::vector<int>& offsets, const float* x,
             float* y, std::vector<float>& g, std::vector<float>& u, std::vector<uint16_t>& x16,
             std::vector<uint16_t>& a16) {
  const int h = ex.h, inter = ex.inter;
  for (int e = 0; e < ex.e; ++e) {
    const int r0 = offsets[e], m = offsets[e + 1] - offsets[e];
    if (m == 0) continue;
    const float* xe = x + static_cast<size_t>(r0) * h;
    float* ye = y + static_cast<size_t>(r0) * h;
    if (ex.bf16) {
      for (size_t i = 0; i < static_cast<size_t>(m) * h; ++i) x16[i] = to_bf16(xe[i]);
      blas.sbgemm(kRowMajor, kNoTrans, kTrans, m, inter, h, 1.0f, x16.data(), h,
                  ex.gate16[e].data(), h, 0.0f, g.data(), inter);
      blas.sbgemm(kRowMajor, kNoTrans, kTrans, m, inter, h, 1.0f, x16.data(), h,
                  ex.up16[e].data(), h, 0.0f, u.data(), inter);
      for (size_t i = 0; i < static_cast<size_t>(m) * inter; ++i) a16[i] = to_bf16(silu(g[i]) * u[i]);
      blas.sbgemm(kRowMajor, kNoTrans, kTrans, m, h, inter, 1.0f, a16.data(), inter,
                  ex.down16[e].data(), inter, 0.0f, ye, h);
    } else {
      blas.sgemm(kRowMajor, kNoTrans, kTrans, m, inter, h, 1.0f, xe, h, ex.gate32[e].data(), h,
                 0.0f, g.data(), inter);
      blas.sgemm(kRowMajor, kNoTrans, kTrans, m, inter, h, 1.0f, xe, h, ex.up32[e].data(), h,
                 0.0f, u.data(), inter);
      for (size_t i = 0; i < static_cast<size_t>(m) * inter; ++i) g[i] = silu(g[i]) * u[i];
      blas.sgemm(kRowMajor, kNoTrans, kTrans, m, h, inter, 1.0f, g.data(), inter,
                 ex.down32[e].data(), inter, 0.0f, ye, h);
    }
  }
}

// Relative error of row `r` (of expert e) against a float64 evaluation of the same weights, so a
// wrong transpose or a skipped expert shows up as an error of order 1, not a fast time.
double check_row(const Experts& ex, int e, const float* xr, const float* yr) {
  const int h = ex.h, inter = ex.inter;
  std::vector<double> act(inter);
  for (int i = 0; i < inter; ++i) {
    double g = 0, u = 0;
    for (int c = 0; c < h; ++c) {
      size_t idx = static_cast<size_t>(i) * h + c;
      g += double(ex.gate_at(e, idx)) * xr[c];
      u += double(ex.up_at(e, idx)) * xr[c];
    }
    act[i] = g / (1.0 + std::exp(-g)) * u;
  }
  double err = 0, norm = 0;
  for (int c = 0; c < h; ++c) {
    double s = 0;
    for (int i = 0; i < inter; ++i) s += double(ex.down_at(e, static_cast<size_t>(c) * inter + i)) * act[i];
    err = std::max(err, std::fabs(s - yr[c]));
    norm = std::max(norm, std::fabs(s));
  }
  return err / std::max(norm, 1e-30);
}

bool load_blas(Blas& b, std::string& error) {
  // An explicit EXPERTD_OPENBLAS is the only candidate: silently timing another library is worse
  // than reporting that the requested one did not load.
  const char* override_path = std::getenv("EXPERTD_OPENBLAS");
  const char* names[] = {"libopenblas.so.0", "libopenblas.so"};
  if (override_path && *override_path) {
    b.lib = dlopen(override_path, RTLD_NOW | RTLD_LOCAL);
    if (!b.lib) error = dlerror();
  } else {
    for (const char* n : names) {
      b.lib = dlopen(n, RTLD_NOW | RTLD_LOCAL);
      if (b.lib) break;
      error = dlerror();
    }
  }
  if (!b.lib) return false;
  b.sgemm = reinterpret_cast<SgemmFn>(dlsym(b.lib, "cblas_sgemm"));
  b.sbgemm = reinterpret_cast<SbgemmFn>(dlsym(b.lib, "cblas_sbgemm"));
  b.set_threads = reinterpret_cast<SetThreadsFn>(dlsym(b.lib, "openblas_set_num_threads"));
  b.corename = reinterpret_cast<GetStrFn>(dlsym(b.lib, "openblas_get_corename"));
  b.config = reinterpret_cast<GetStrFn>(dlsym(b.lib, "openblas_get_config"));
  b.num_threads = reinterpret_cast<GetIntFn>(dlsym(b.lib, "openblas_get_num_threads"));
  link_map* lm = nullptr;
  if (dlinfo(b.lib, RTLD_DI_LINKMAP, &lm) == 0 && lm) b.path = lm->l_name;
  if (!b.sgemm) {
    error = "the library has no cblas_sgemm";
    return false;
  }
  return true;
}

}  // namespace

int main(int argc, char** argv) {
  int threads = 0;
  for (int i = 1; i < argc; ++i)
    if (std::string(argv[i]) == "--threads" && i + 1 < argc) threads = std::atoi(argv[++i]);

  Blas blas;
  std::string error;
  if (!load_blas(blas, error)) {
    std::printf("{\"available\":false,\"error\":\"%s\"}\n", json_escape(error).c_str());
    return 0;
  }
  if (threads > 0 && blas.set_threads) blas.set_threads(threads);
  const char* env_core = std::getenv("OPENBLAS_CORETYPE");
  std::printf(
      "{\"available\":true,\"library\":\"%s\",\"corename\":\"%s\",\"config\":\"%s\","
      "\"threads\":%d,\"sbgemm\":%s,\"envCoretype\":%s}\n",
      json_escape(blas.path).c_str(), blas.corename ? json_escape(blas.corename()).c_str() : "",
      blas.config ? json_escape(blas.config()).c_str() : "",
      blas.num_threads ? blas.num_threads() : -1, blas.sbgemm ? "true" : "false",
      env_core ? ("\"" + json_escape(env_core) + "\"").c_str() : "null");
  std::fflush(stdout);

  Experts experts;
  std::vector<float> flush;
  std::string line;
  while (std::getline(std::cin, line)) {
    std::istringstream in(line);
    std::string word, id, dtype;
    int h = 0, inter = 0, e = 0, reps = 0, warmup = 0;
    size_t flush_bytes = 0;
    in >> word >> id >> dtype >> h >> inter >> e >> reps >> warmup >> flush_bytes;
    if (word != "case" || !in || h <= 0 || inter <= 0 || e <= 0 || reps <= 0) {
      std::printf("{\"id\":\"%s\",\"error\":\"bad case line\"}\n", json_escape(id).c_str());
      std::fflush(stdout);
      continue;
    }
    std::vector<int> offsets(e + 1, 0);
    for (int j = 0; j < e; ++j) {
      int c = 0;
      in >> c;
      offsets[j + 1] = offsets[j] + std::max(c, 0);
    }
    const bool bf16 = dtype == "bf16";
    if (bf16 && !blas.sbgemm) {
      std::printf("{\"id\":\"%s\",\"error\":\"this OpenBLAS has no cblas_sbgemm\"}\n", id.c_str());
      std::fflush(stdout);
      continue;
    }
    experts.make(bf16, h, inter, e);
    const int rows = offsets[e];
    int max_rows = 0, max_e = 0;
    for (int j = 0; j < e; ++j)
      if (offsets[j + 1] - offsets[j] > max_rows) max_rows = offsets[j + 1] - offsets[j], max_e = j;
    std::vector<float> x(static_cast<size_t>(rows) * h), y(x.size(), NAN);
    for (auto& v : x) v = uniform_pm1();
    std::vector<float> g(static_cast<size_t>(max_rows) * inter), u(g.size());
    std::vector<uint16_t> x16(bf16 ? static_cast<size_t>(max_rows) * h : 0), a16(bf16 ? g.size() : 0);
    flush.resize(flush_bytes / sizeof(float), 1.0f);

    std::vector<double> times;
    volatile float sink = 0;
    for (int r = 0; r < warmup + reps; ++r) {
      // NOTE: evict the weights from the caches before each timed run: in a real model every
      // layer's experts are read once per step and nothing stays resident.
      float s = 0;
      for (size_t i = 0; i < flush.size(); i += 16) s += flush[i];
      sink = sink + s;
      double t0 = now_ms();
      moe_ffn(blas, experts, offsets, x.data(), y.data(), g, u, x16, a16);
      double dt = now_ms() - t0;
      if (r >= warmup) times.push_back(dt);
    }
    double rel = 0;
    if (rows > 0) {
      const int r0 = offsets[max_e], r1 = offsets[max_e + 1] - 1;
      rel = std::max(check_row(experts, max_e, &x[size_t(r0) * h], &y[size_t(r0) * h]),
                     check_row(experts, max_e, &x[size_t(r1) * h], &y[size_t(r1) * h]));
    }
    std::ostringstream out;
    out << "{\"id\":\"" << json_escape(id) << "\",\"dtype\":\"" << dtype << "\",\"rows\":" << rows
        << ",\"checkRelErr\":" << rel << ",\"timesMs\":[";
    for (size_t i = 0; i < times.size(); ++i) out << (i ? "," : "") << times[i];
    out << "]}";
    std::printf("%s\n", out.str().c_str());
    std::fflush(stdout);
  }
  return 0;
}
