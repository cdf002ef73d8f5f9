// ARM64 NEON primitives: SLOT, written by the `neon` helper (issue 17). Until then this variant does not build.
//
// It must provide, in namespace autoglm::isa, everything isa_scalar.h provides, with bit-identical results:
//   kName = "neon"; types B32 (32 weight bytes), I8 (8 int32 lanes), F8 (8 float lanes);
//   h2f, load32, nibbles16, nibbles_lo, nibbles_hi, add16_bits32, add16_where, q6k_chunk,
//   dots8<SIGNED, SHIFT> (exact integer dots, e.g. by sdot/vdotq_s32; halves lo = elements 0..15, hi = 16..31),
//   add, zero, load8, load8n, cvt, mul, fma (vfmaq_f32: one rounding), hsum (the canonical tree of isa_scalar.h).
// See README.md for the numeric contract.
#pragma once

#error "isa_neon.h is a slot: the NEON primitives are not written yet (see the comment above)"
