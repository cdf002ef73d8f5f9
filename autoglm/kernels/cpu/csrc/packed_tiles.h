// The packed-layout tiles (layout: pack.cpp) shared by gemv_packed.cpp's driver: the activation row they read and the
// per-ISA block functions (packed_tiles_avx512.h: one vpdpbusd per quad vector; packed_tiles_avx2.h: two 256-bit
// halves with vpmaddubsw). Both compute the same exact integer dots and the same float ops per output in the same
// order, so their outputs are bitwise equal. AUTOGLM_PACKED (kernels.h) says whether this build has either.
#pragma once

#include "kernels.h"

namespace autoglm::packed {

// one activation row: int8 values; per 32-block scale d, d * sum(q) (K-quant mins) and -off * sum(q); per
// 16-block -off * sum(q) (Q6_K's scales are per 16)
struct ActP {
  const int8_t* q;
  const float* d;
  const float* s;
  const int32_t* init;
  const int32_t* init16;
};

}  // namespace autoglm::packed

// each defines Acc (a tile row's 16 float accumulators), acc_zero, acc_store and the block functions simple_block<Q,
// R>, q4_k_block<R>, q6_k_block<R> (one 16-row group x one block, R activation rows)
#if AUTOGLM_VNNI
#include "packed_tiles_avx512.h"
#elif AUTOGLM_PACKED
#include "packed_tiles_avx2.h"
#endif
