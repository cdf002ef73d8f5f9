// Torch-free driver of kquant_q8k.h for tests: kquant_q8k_driver QTYPE N K M IN OUT
//   IN = N rows of raw Q4_K/Q5_K/Q6_K blocks, then M x K float32; OUT = M x N float32 (y = q8_K(x) @ W.T)
// Build: g++ -std=c++17 -O2 -ffp-contract=off [-DAUTOGLM_ISA_AVX2 -march=x86-64-v3 |
//        -DAUTOGLM_ISA_AVX512 -march=x86-64-v4 -mavx512vnni] kquant_q8k_driver.cpp -o kquant_q8k_driver
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "kquant_q8k.h"

using namespace autoglm;

int main(int argc, char** argv) {
  if (argc != 7) {
    std::fprintf(stderr, "usage: kquant_q8k_driver QTYPE N K M IN OUT (isa %s)\n", kq::kq_isa());
    return 1;
  }
  const int64_t q = std::atoll(argv[1]), N = std::atoll(argv[2]), K = std::atoll(argv[3]);
  const int M = std::atoi(argv[4]);
  int64_t bs, ts;
  if ((q != Q4_K && q != Q5_K && q != Q6_K) || !layout(q, bs, ts) || K % 256 || M < 1 || M > kq::KQ_MAX_M) return 4;
  const int64_t nsb = K / 256, wbytes = N * nsb * ts;
  std::FILE* f = std::fopen(argv[5], "rb");
  if (!f) return 2;
  std::vector<uint8_t> w(wbytes);
  std::vector<float> x(M * K), y(M * N);
  if (std::fread(w.data(), 1, wbytes, f) != size_t(wbytes) || std::fread(x.data(), 4, M * K, f) != size_t(M * K))
    return 2;
  std::fclose(f);
  std::vector<kq::BlockQ8K> xq(M * nsb);
  for (int m = 0; m < M; ++m) kq::quantize_row_q8k(x.data() + m * K, xq.data() + m * nsb, K);
  kq::gemv_q8k(q, w.data(), nsb * ts, nsb, xq.data(), M, y.data(), N, 0, N);
  if (const char* rep = std::getenv("KQ_REPEAT")) {  // timing: GB/s of weight bytes over repeated calls
    const int r = std::atoi(rep);
    const auto t0 = std::chrono::steady_clock::now();
    for (int i = 0; i < r; ++i) kq::gemv_q8k(q, w.data(), nsb * ts, nsb, xq.data(), M, y.data(), N, 0, N);
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    std::fprintf(stderr, "%s q%lld M=%d: %.2f GB/s of weights\n", kq::kq_isa(), (long long)q, M, wbytes * r / s / 1e9);
  }
  std::FILE* o = std::fopen(argv[6], "wb");
  if (!o || std::fwrite(y.data(), 4, M * N, o) != size_t(M * N)) return 3;
  std::fclose(o);
  return 0;
}
