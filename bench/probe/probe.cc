// Machine-limit probe: all-thread read bandwidth and peak f32 FMA / bf16 dot-product rates,
// measured in the same run as a benchmark so that every figure can be reported as a ratio.
// Compiled at run time by bench/native-tool.ts with `g++ -O3 -march=native -fopenmp`; prints JSON.
#include <omp.h>
#include <pthread.h>
#include <sched.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace {

double now_s() {
  using clock = std::chrono::steady_clock;
  return std::chrono::duration<double>(clock::now().time_since_epoch()).count();
}

#if defined(__AVX512F__)
// Horizontal sum without _mm512_reduce_add_ps (GCC 12 warns inside it with -Wall).
float hsum512(__m512 v) {
  alignas(64) float lanes[16];
  _mm512_store_ps(lanes, v);
  float s = 0;
  for (float l : lanes) s += l;
  return s;
}
#endif

// Round trip of one cache line between the first two CPUs this process may run on (each thread pinned
// to one), ns, median of 5 batches; -1 with fewer than two CPUs. Where the two sit shows here: ~50 ns
// on one CCD (a shared L3), ~300 ns across two on the VM of bench/RESULTS.md session 25, which also
// moves the all-thread read bandwidth (one CCD's link to memory, or two).
double core_round_trip_ns() {
  cpu_set_t allowed;
  if (sched_getaffinity(0, sizeof(allowed), &allowed) != 0) return -1;
  int cpus[2], n = 0;
  for (int c = 0; c < CPU_SETSIZE && n < 2; ++c)
    if (CPU_ISSET(c, &allowed)) cpus[n++] = c;
  if (n < 2) return -1;
  auto pin = [](int cpu) {
    cpu_set_t one;
    CPU_ZERO(&one);
    CPU_SET(cpu, &one);
    return pthread_setaffinity_np(pthread_self(), sizeof(one), &one) == 0;
  };
  constexpr int kTrips = 20000, kBatches = 5;
  alignas(64) static std::atomic<long> line{0};
  line.store(0);
  std::vector<double> ns;
  bool peer_pinned = false;  // written by the peer, read after the join
  std::thread peer([&] {
    peer_pinned = pin(cpus[1]);
    for (long i = 0; i < long{kTrips} * kBatches; ++i) {
      while (line.load(std::memory_order_acquire) != 2 * i + 1) {}
      line.store(2 * i + 2, std::memory_order_release);
    }
  });
  const bool pinned = pin(cpus[0]);
  for (int b = 0; b < kBatches; ++b) {
    const double t0 = now_s();
    for (long i = long{b} * kTrips; i < long{b + 1} * kTrips; ++i) {
      line.store(2 * i + 1, std::memory_order_release);
      while (line.load(std::memory_order_acquire) != 2 * i + 2) {}
    }
    ns.push_back((now_s() - t0) * 1e9 / kTrips);
  }
  peer.join();
  if (!pinned || !peer_pinned) return -1;
  std::sort(ns.begin(), ns.end());
  return ns[ns.size() / 2];
}

// Last-level cache size from sysfs (sysconf reports nonsense under some hypervisors).
long l3_bytes() {
  FILE* f = std::fopen("/sys/devices/system/cpu/cpu0/cache/index3/size", "r");
  long kib = 0;
  if (f) {
    if (std::fscanf(f, "%ldK", &kib) != 1) kib = 0;
    std::fclose(f);
  }
  return kib > 0 ? kib * 1024 : sysconf(_SC_LEVEL3_CACHE_SIZE);
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  size_t n = v.size();
  return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

// Sums n floats with several independent accumulators so that the loop is bound by loads, not
// by the add latency. Returns the sum so the compiler cannot drop the reads.
float sum_range(const float* p, size_t n) {
#if defined(__AVX512F__)
  __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
  size_t i = 0;
  for (; i + 64 <= n; i += 64) {
    a0 = _mm512_add_ps(a0, _mm512_load_ps(p + i));
    a1 = _mm512_add_ps(a1, _mm512_load_ps(p + i + 16));
    a2 = _mm512_add_ps(a2, _mm512_load_ps(p + i + 32));
    a3 = _mm512_add_ps(a3, _mm512_load_ps(p + i + 48));
  }
  float s = hsum512(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
  for (; i < n; ++i) s += p[i];
  return s;
#elif defined(__AVX2__)
  __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
  size_t i = 0;
  for (; i + 32 <= n; i += 32) {
    a0 = _mm256_add_ps(a0, _mm256_load_ps(p + i));
    a1 = _mm256_add_ps(a1, _mm256_load_ps(p + i + 8));
    a2 = _mm256_add_ps(a2, _mm256_load_ps(p + i + 16));
    a3 = _mm256_add_ps(a3, _mm256_load_ps(p + i + 24));
  }
  __m256 t = _mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3));
  float lanes[8];
  _mm256_storeu_ps(lanes, t);
  float s = 0;
  for (float l : lanes) s += l;
  for (; i < n; ++i) s += p[i];
  return s;
#else
  float acc[8] = {0};
  size_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int j = 0; j < 8; ++j) acc[j] += p[i + j];
  float s = 0;
  for (float a : acc) s += a;
  for (; i < n; ++i) s += p[i];
  return s;
#endif
}

struct Bandwidth {
  double best_gbps = 0, median_gbps = 0;
};

// Reads `bytes` (much larger than the last-level cache) with `threads` threads, each a disjoint
// contiguous slice, `reps` times; the buffer is first-touched by the same threads (NUMA).
Bandwidth read_bandwidth(size_t bytes, int threads, int reps) {
  size_t n = bytes / sizeof(float);
  n -= n % (64 * static_cast<size_t>(threads));
  float* buf = static_cast<float*>(std::aligned_alloc(64, n * sizeof(float)));
  if (!buf) {
    std::fprintf(stderr, "probe: cannot allocate %zu bytes\n", n * sizeof(float));
    std::exit(2);
  }
  size_t slice = n / threads;
#pragma omp parallel num_threads(threads)
  {
    size_t t = omp_get_thread_num();
    for (size_t i = t * slice; i < (t + 1) * slice; ++i) buf[i] = 1.0f;
  }
  std::vector<double> gbps;
  volatile float sink = 0;
  for (int r = 0; r < reps + 1; ++r) {
    float total = 0;
    double t0 = now_s();
#pragma omp parallel num_threads(threads) reduction(+ : total)
    {
      size_t t = omp_get_thread_num();
      total += sum_range(buf + t * slice, slice);
    }
    double dt = now_s() - t0;
    sink = sink + total;
    if (r > 0) gbps.push_back(n * sizeof(float) / dt / 1e9);  // first pass is a warm-up
  }
  std::free(buf);
  Bandwidth b;
  b.best_gbps = *std::max_element(gbps.begin(), gbps.end());
  b.median_gbps = median(gbps);
  return b;
}

// --- peak arithmetic: register-only loops with enough independent accumulators to cover the
// FMA latency (4 cycles x 2 pipes on current cores -> >= 8; we use 12).
constexpr int kAcc = 12;

// f32 FMA: returns flops per thread done in `iters` iterations.
double fma_f32_loop(long iters, float* out) {
#if defined(__AVX512F__)
  __m512 acc[kAcc];
  for (int j = 0; j < kAcc; ++j) acc[j] = _mm512_set1_ps(0.001f * j);
  const __m512 a = _mm512_set1_ps(0.999999f), b = _mm512_set1_ps(1e-7f);
  for (long i = 0; i < iters; ++i)
    for (int j = 0; j < kAcc; ++j) acc[j] = _mm512_fmadd_ps(acc[j], a, b);
  __m512 s = acc[0];
  for (int j = 1; j < kAcc; ++j) s = _mm512_add_ps(s, acc[j]);
  *out = hsum512(s);
  return 2.0 * 16 * kAcc * iters;
#elif defined(__AVX2__) && defined(__FMA__)
  __m256 acc[kAcc];
  for (int j = 0; j < kAcc; ++j) acc[j] = _mm256_set1_ps(0.001f * j);
  const __m256 a = _mm256_set1_ps(0.999999f), b = _mm256_set1_ps(1e-7f);
  for (long i = 0; i < iters; ++i)
    for (int j = 0; j < kAcc; ++j) acc[j] = _mm256_fmadd_ps(acc[j], a, b);
  float lanes[8];
  __m256 s = acc[0];
  for (int j = 1; j < kAcc; ++j) s = _mm256_add_ps(s, acc[j]);
  _mm256_storeu_ps(lanes, s);
  *out = lanes[0];
  return 2.0 * 8 * kAcc * iters;
#else
  // Scalar estimate: the compiler may or may not vectorise this; it is labelled as such.
  float acc[kAcc];
  for (int j = 0; j < kAcc; ++j) acc[j] = 0.001f * j;
  for (long i = 0; i < iters; ++i)
    for (int j = 0; j < kAcc; ++j) acc[j] = acc[j] * 0.999999f + 1e-7f;
  float s = 0;
  for (float x : acc) s += x;
  *out = s;
  return 2.0 * kAcc * iters;
#endif
}

// bf16 dot products (vdpbf16ps): each zmm instruction does 16 lanes x 2 bf16 products.
// Returns 0 when the compiler target has no AVX512_BF16.
double dot_bf16_loop(long iters, float* out) {
#if defined(__AVX512BF16__)
  __m512 acc[kAcc];
  for (int j = 0; j < kAcc; ++j) acc[j] = _mm512_set1_ps(0.001f * j);
  const __m512bh a = (__m512bh)_mm512_set1_epi16(0x3f80);  // 1.0 bf16
  const __m512bh b = (__m512bh)_mm512_set1_epi16(0x3380);  // ~6e-8 bf16
  for (long i = 0; i < iters; ++i)
    for (int j = 0; j < kAcc; ++j) acc[j] = _mm512_dpbf16_ps(acc[j], a, b);
  __m512 s = acc[0];
  for (int j = 1; j < kAcc; ++j) s = _mm512_add_ps(s, acc[j]);
  *out = hsum512(s);
  return 2.0 * 32 * kAcc * iters;
#else
  (void)iters;
  *out = 0;
  return 0;
#endif
}

struct Rate {
  double best_gflops = 0, median_gflops = 0;
};

template <class Loop>
Rate peak_rate(Loop loop, int threads, long iters, int reps) {
  std::vector<double> g;
  volatile float sink = 0;
  for (int r = 0; r < reps + 1; ++r) {
    double flops = 0;
    double t0 = now_s();
#pragma omp parallel num_threads(threads) reduction(+ : flops)
    {
      float o = 0;
      flops += loop(iters, &o);
#pragma omp critical
      sink = sink + o;
    }
    double dt = now_s() - t0;
    if (r > 0) g.push_back(flops / dt / 1e9);
  }
  Rate rate;
  rate.best_gflops = *std::max_element(g.begin(), g.end());
  rate.median_gflops = median(g);
  return rate;
}

std::string cpu_model() {
  FILE* f = std::fopen("/proc/cpuinfo", "r");
  if (!f) return "unknown";
  char line[512];
  std::string model = "unknown";
  while (std::fgets(line, sizeof line, f)) {
    if (std::strncmp(line, "model name", 10) == 0) {
      const char* c = std::strchr(line, ':');
      if (c) {
        model = c + 2;
        while (!model.empty() && (model.back() == '\n' || model.back() == ' ')) model.pop_back();
      }
      break;
    }
  }
  std::fclose(f);
  return model;
}

const char* f32_isa() {
#if defined(__AVX512F__)
  return "avx512";
#elif defined(__AVX2__) && defined(__FMA__)
  return "avx2";
#else
  return "scalar";
#endif
}

}  // namespace

// Usage: probe [--bw-mib N] [--threads N] [--reps N] [--quick] [--bw-only]
// --bw-only: the all-thread read bandwidth and the core round trip alone (a bench's probe beside each
// of its measurements).
int main(int argc, char** argv) {
  size_t bw_mib = 1024;
  int threads = omp_get_max_threads();
  int reps = 5;
  long iters = 20'000'000;
  bool bw_only = false;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    auto next = [&]() -> const char* {
      if (i + 1 >= argc) {
        std::fprintf(stderr, "probe: %s needs a value\n", a.c_str());
        std::exit(2);
      }
      return argv[++i];
    };
    if (a == "--bw-mib") bw_mib = std::strtoull(next(), nullptr, 10);
    else if (a == "--threads") threads = std::atoi(next());
    else if (a == "--reps") reps = std::atoi(next());
    else if (a == "--quick") { bw_mib = 256; reps = 2; iters = 2'000'000; }
    else if (a == "--bw-only") bw_only = true;
    else {
      std::fprintf(stderr, "probe: unknown flag %s\n", a.c_str());
      return 2;
    }
  }
  if (threads < 1) threads = 1;

  Bandwidth bw_all = read_bandwidth(bw_mib << 20, threads, reps);
  const double rt = threads >= 2 ? core_round_trip_ns() : -1;
  const std::string rt_json = rt > 0 ? std::to_string(rt) : "null";
  if (bw_only) {
    std::printf("{\"threads\":%d,\"bandwidthBufferBytes\":%zu,\"readBandwidthGBps\":%.3f,\"readBandwidthMedianGBps\":%.3f,"
                "\"coreRoundTripNs\":%s}\n",
                threads, bw_mib << 20, bw_all.best_gbps, bw_all.median_gbps, rt_json.c_str());
    return 0;
  }
  Bandwidth bw_one = read_bandwidth(bw_mib << 20, 1, std::max(1, reps / 2));
  Rate f32 = peak_rate(fma_f32_loop, threads, iters, reps);
  Rate f32_one = peak_rate(fma_f32_loop, 1, iters, reps);
  float dummy = 0;
  bool has_bf16 = dot_bf16_loop(1, &dummy) > 0;
  Rate bf16 = has_bf16 ? peak_rate(dot_bf16_loop, threads, iters, reps) : Rate{};

  long l3 = l3_bytes();
  std::printf(
      "{\"cpuModel\":\"%s\",\"threads\":%d,\"hardwareThreads\":%ld,\"l3Bytes\":%ld,"
      "\"bandwidthBufferBytes\":%zu,"
      "\"readBandwidthGBps\":%.3f,\"readBandwidthMedianGBps\":%.3f,"
      "\"readBandwidth1ThreadGBps\":%.3f,\"coreRoundTripNs\":%s,"
      "\"f32Isa\":\"%s\",\"peakF32Gflops\":%.3f,\"peakF32MedianGflops\":%.3f,"
      "\"peakF32PerThreadGflops\":%.3f,"
      "\"bf16Dot\":%s,\"peakBf16Gflops\":%s,\"peakBf16MedianGflops\":%s}\n",
      cpu_model().c_str(), threads, sysconf(_SC_NPROCESSORS_ONLN), l3, bw_mib << 20,
      bw_all.best_gbps, bw_all.median_gbps, bw_one.best_gbps, rt_json.c_str(), f32_isa(), f32.best_gflops,
      f32.median_gflops, f32_one.best_gflops, has_bf16 ? "true" : "false",
      has_bf16 ? std::to_string(bf16.best_gflops).c_str() : "null",
      has_bf16 ? std::to_string(bf16.median_gflops).c_str() : "null");
  return 0;
}
