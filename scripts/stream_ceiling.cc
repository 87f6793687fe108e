// The SGD-momentum update (read w, g, m; write w, m: 20 bytes per float32 parameter) in plain
// C++ with raw threads and no TensorFlow, several ways over the same bytes, alternating rounds,
// next to glibc's memcpy: how fast this machine lets an in-place update stream at all.
// Built and run by scripts/kernel_bandwidth.py --ceiling.
//
//   stream_ceiling PARAMS THREADS ROUNDS   ->  one line per way: "<name>\t<GB/s median>\t<GB/s best>"
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <thread>
#include <vector>
#if defined(__AVX__)
#include <immintrin.h>
#endif

namespace {

float *W, *M, *G;
constexpr float kLr = 0.01f, kMu = 0.9f;

void Plain(long b, long e) {
  for (long j = b; j < e; ++j) {
    const float m = M[j] * kMu - G[j] * kLr;
    M[j] = m;
    W[j] = W[j] + m;
  }
}

void Prefetched(long b, long e) {  // as dsgd's kernels: 4 cache lines a round, 4 KB ahead
  constexpr long kStep = 64, kAhead = 1024;
  long j = b;
  for (; j + kStep <= e; j += kStep) {
    for (long l = 0; l < kStep; l += 16) {
      __builtin_prefetch(G + j + l + kAhead);
      __builtin_prefetch(W + j + l + kAhead);
      __builtin_prefetch(M + j + l + kAhead);
    }
    Plain(j, j + kStep);
  }
  Plain(j, e);
}

#if defined(__AVX__)
void NonTemporal(long b, long e) {  // stores that bypass the caches (lines were just read)
  long j = b;
  for (; j < e && (j & 7); ++j) Plain(j, j + 1);
  const __m256 lr = _mm256_set1_ps(kLr), mu = _mm256_set1_ps(kMu);
  for (; j + 8 <= e; j += 8) {
    const __m256 m = _mm256_sub_ps(_mm256_mul_ps(_mm256_load_ps(M + j), mu), _mm256_mul_ps(_mm256_load_ps(G + j), lr));
    _mm256_stream_ps(M + j, m);
    _mm256_stream_ps(W + j, _mm256_add_ps(_mm256_load_ps(W + j), m));
  }
  _mm_sfence();
  Plain(j, e);
}
#endif

template <typename F>
double Timed(int threads, long n, F f) {
  const auto t0 = std::chrono::steady_clock::now();
  std::vector<std::thread> ts;
  for (int t = 0; t < threads; ++t) {
    ts.emplace_back([=] { f(n * t / threads, n * (t + 1) / threads, t); });
  }
  for (auto& t : ts) t.join();
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

float* Buffer(long n, float value) {
  auto* p = static_cast<float*>(std::aligned_alloc(64, ((n * 4 + 63) / 64) * 64));
  if (p == nullptr) {
    std::fprintf(stderr, "out of memory\n");
    std::exit(1);
  }
  std::fill(p, p + n, value);
  return p;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 4) {
    std::fprintf(stderr, "usage: %s PARAMS THREADS ROUNDS\n", argv[0]);
    return 2;
  }
  const long n = std::atol(argv[1]);
  const int threads = std::atoi(argv[2]), rounds = std::atoi(argv[3]);
  W = Buffer(n, 1.0f);
  M = Buffer(n, 0.1f);
  G = Buffer(n, 0.5f);
  const long nc = n * 10 / 4;  // memcpy: src + dst traffic = 20 bytes per parameter, as the update
  float* src = Buffer(nc, 1.0f);
  float* dst = Buffer(nc, 0.0f);

  struct Way {
    const char* name;
    std::vector<double> t;
  };
  std::vector<Way> ways = {{"update, plain loop", {}}, {"update, prefetch 4 KB ahead (dsgd's)", {}}};
#if defined(__AVX__)
  ways.push_back({"update, non-temporal stores", {}});
#endif
  ways.push_back({"memcpy (glibc's choice of stores)", {}});
  for (int r = 0; r < rounds; ++r) {
    for (size_t k = 0; k < ways.size(); ++k) {
      const size_t w = r % 2 == 0 ? k : ways.size() - 1 - k;
      const std::string name = ways[w].name;
      double t;
      if (name == "update, plain loop") {
        t = Timed(threads, n, [](long b, long e, int) { Plain(b, e); });
      } else if (name == "update, prefetch 4 KB ahead (dsgd's)") {
        t = Timed(threads, n, [](long b, long e, int) { Prefetched(b, e); });
#if defined(__AVX__)
      } else if (name == "update, non-temporal stores") {
        t = Timed(threads, n, [](long b, long e, int) { NonTemporal(b, e); });
#endif
      } else {
        t = Timed(threads, nc, [=](long b, long e, int) { std::memcpy(dst + b, src + b, (e - b) * 4); });
      }
      ways[w].t.push_back(t);
    }
  }
  const double bytes = 20.0 * n;
  for (auto& w : ways) {
    std::vector<double> t(w.t.begin() + std::min<size_t>(1, w.t.size() - 1), w.t.end());  // round 0 warms up
    std::sort(t.begin(), t.end());
    std::printf("%s\t%.2f\t%.2f\n", w.name, bytes / t[t.size() / 2] / 1e9, bytes / t[0] / 1e9);
  }
  return 0;
}
