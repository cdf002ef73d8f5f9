// Picks the ISA primitives for this translation unit. The build defines exactly one AUTOGLM_ISA_* macro per variant
// (autoglm/kernels/cpu/variants.py; a plain cross-compile passes it by hand); without one, the scalar header.
#pragma once

#if defined(AUTOGLM_ISA_AVX512)
#include "isa_avx512.h"
#elif defined(AUTOGLM_ISA_AVX2)
#include "isa_avx2.h"
#elif defined(AUTOGLM_ISA_NEON)
#include "isa_neon.h"
#else
#include "isa_scalar.h"
#endif
