// Tiny torch-free driver of the core (tests, cross-compiled ISA checks under emulation):
//   driver gemv QTYPE N K M IN OUT   IN = N rows of raw blocks, then M x K float32; OUT = M x N float32 (y = x @ W.T)
//   driver deq  QTYPE N K IN OUT     IN = N rows of raw blocks;                   OUT = N x K float32
// Build: g++ -std=c++17 -O2 -ffp-contract=off [-DAUTOGLM_ISA_AVX2 -march=x86-64-v3 | ...] driver.cpp gemv_core.cpp
//        quant.cpp -o driver
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "common.h"

using namespace autoglm;

static std::vector<char> slurp(const char* path) {
  std::FILE* f = std::fopen(path, "rb");
  if (!f) std::exit(2);
  std::vector<char> buf;
  char tmp[1 << 16];
  size_t n;
  while ((n = std::fread(tmp, 1, sizeof tmp, f)) > 0) buf.insert(buf.end(), tmp, tmp + n);
  std::fclose(f);
  return buf;
}

static void dump(const char* path, const float* p, size_t n) {
  std::FILE* f = std::fopen(path, "wb");
  if (!f || std::fwrite(p, 4, n, f) != n) std::exit(3);
  std::fclose(f);
}

int main(int argc, char** argv) {
  if (argc < 7) {
    std::fprintf(stderr, "usage: driver gemv|deq QTYPE N K [M] IN OUT (isa %s)\n", isa_name());
    return 1;
  }
  const std::string mode = argv[1];
  const int64_t q = std::atoll(argv[2]), N = std::atoll(argv[3]), K = std::atoll(argv[4]);
  int64_t bs, ts;
  if (!layout(q, bs, ts) || K % bs) return 4;
  const int64_t rs = K / bs * ts;
  if (mode == "deq") {
    const std::vector<char> in = slurp(argv[5]);
    if (static_cast<int64_t>(in.size()) != N * rs) return 5;
    std::vector<float> y(N * K);
    for (int64_t n = 0; n < N; ++n)
      deq_row(deq_fn(q), reinterpret_cast<const uint8_t*>(in.data()) + n * rs, K / bs, bs, ts, y.data() + n * K);
    dump(argv[6], y.data(), y.size());
    return 0;
  }
  if (argc < 8 || mode != "gemv") return 1;
  const int64_t M = std::atoll(argv[5]);
  const std::vector<char> in = slurp(argv[6]);
  if (static_cast<int64_t>(in.size()) != N * rs + M * K * 4) return 5;
  const uint8_t* wp = reinterpret_cast<const uint8_t*>(in.data());
  std::vector<float> x(M * K);
  std::memcpy(x.data(), in.data() + N * rs, M * K * 4);
  std::vector<int8_t> aq(M * K);
  std::vector<float> ad(M * K / 32), as(M * K / 32), y(M * N);
  std::vector<int32_t> an(M * K / 4);
  std::vector<ActQ> acts(M);
  for (int64_t m = 0; m < M; ++m) {
    quantize_act_row(x.data() + m * K, K, aq.data() + m * K, ad.data() + m * K / 32, as.data() + m * K / 32,
                     an.data() + m * K / 4);
    acts[m] = {aq.data() + m * K, ad.data() + m * K / 32, as.data() + m * K / 32, an.data() + m * K / 4};
  }
  gemv_rows(q, wp, rs, K / bs, 0, N, acts.data(), M, y.data(), N);
  dump(argv[7], y.data(), y.size());
  return 0;
}
