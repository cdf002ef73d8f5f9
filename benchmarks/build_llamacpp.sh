#!/usr/bin/env bash
# Builds llama.cpp's own C++ tools (llama-server, llama-bench, llama-cli, llama-mtmd-cli) from the llama.cpp sources
# vendored in the llama-cpp-python 0.3.36 sdist, for side-by-side benchmarks. Outside CI; never committed output.
#   benchmarks/build_llamacpp.sh [native|avx2|avxvnni] [DEST]   (default: native, /work/llamacpp)
# native: this CPU's features (AMX off: llama.cpp 0.3.36's AMX buffers segfault here, scripts/llamacpp_cmake_args.sh)
# avx2:   GGML_NATIVE=OFF with AVX2+FMA+F16C only — llama.cpp as an AVX2-only laptop CPU runs it (issue 17).
# avxvnni: the same plus AVX-VNNI (GGML_AVX_VNNI=ON) — llama.cpp on an Intel 12th gen+ laptop CPU (no AVX-512).
set -euo pipefail
variant=${1:-native}
dest=${2:-/work/llamacpp}
here=$(cd "$(dirname "$0")/.." && pwd)
src="$dest/src"
if [ ! -f "$src/CMakeLists.txt" ]; then
  mkdir -p "$dest/sdist"
  # the simple index (PEP 503) names the sdist with its sha256; verify it
  link=$(curl -sSf https://pypi.org/simple/llama-cpp-python/ | grep -o 'https://[^"]*llama_cpp_python-0.3.36.tar.gz#sha256=[0-9a-f]*' | head -1)
  curl -sSfL -o "$dest/sdist/llama_cpp_python-0.3.36.tar.gz" "${link%%#*}"
  echo "${link##*sha256=}  $dest/sdist/llama_cpp_python-0.3.36.tar.gz" | sha256sum -c --quiet
  tar -xzf "$dest"/sdist/llama_cpp_python-0.3.36.tar.gz -C "$dest/sdist"
  ln -sfn "$dest/sdist/llama_cpp_python-0.3.36/vendor/llama.cpp" "$src"
  # the sdist's mtimes can lie in the future here, which leaves ninja's manifest "still dirty" forever
  find "$dest/sdist/" -exec touch -h {} +
  # its .git is a submodule gitlink into llama-cpp-python's repo, absent here: cmake's git-index dependency then
  # never exists and ninja regenerates forever
  rm -f "$src/.git"
fi
case "$variant" in
  native) args=$("$here/scripts/llamacpp_cmake_args.sh") ;;
  avx2) args="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=OFF -DGGML_AVX_VNNI=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF" ;;
  avxvnni) args="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=OFF -DGGML_AVX_VNNI=ON -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF" ;;
  *) echo "unknown variant $variant (native|avx2|avxvnni)" >&2; exit 2 ;;
esac
build="$dest/build-$variant"
# shellcheck disable=SC2086
cmake -S "$src" -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF -DLLAMA_BUILD_SERVER=ON \
  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=ON $args >/dev/null
ninja -C "$build" llama-server llama-bench llama-cli llama-mtmd-cli >/dev/null
echo "$build/bin"
