#!/usr/bin/env bash
# CMake flags for building llama-cpp-python (the test oracle) on this CPU. -march=native everywhere except on CPUs
# with AMX: llama.cpp 0.3.36's AMX weight buffers (picked by -march=native there) segfault in decode on Q8_0/K-quant
# weights (seen on Xeon with amx_int8), so there the x86 features are listed explicitly without AMX.
flags=$(grep -m1 '^flags' /proc/cpuinfo 2>/dev/null || true)
has() { case " $flags " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }
if ! has amx_int8 && ! has amx_tile; then
  echo "-DGGML_NATIVE=ON"
  exit 0
fi
args="-DGGML_NATIVE=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF"
has avx && args="$args -DGGML_AVX=ON"
has avx2 && args="$args -DGGML_AVX2=ON"
has fma && args="$args -DGGML_FMA=ON"
has f16c && args="$args -DGGML_F16C=ON"
has avx512f && args="$args -DGGML_AVX512=ON"
has avx512vbmi && args="$args -DGGML_AVX512_VBMI=ON"
has avx512_vnni && args="$args -DGGML_AVX512_VNNI=ON"
has avx512_bf16 && args="$args -DGGML_AVX512_BF16=ON"
has avx_vnni && args="$args -DGGML_AVX_VNNI=ON"
echo "$args"
