#!/usr/bin/env bash
# Whole-model prefill (512) / decode (64) tok/s, ours vs llama.cpp's llama-bench, in interleaved rounds (the shared VM
# drifts by +-30 % over minutes, so the two sides alternate and each side's best round is compared).
#   MODELS="a.gguf b.gguf" [THREADS="1 2"] [R=3] [LB=native|avx2] [ISA=avx512|avx2] [OURSENV="VAR=..."] \
#       benchmarks/vs_llamacpp.sh
# LB: the llama.cpp build of benchmarks/build_llamacpp.sh under /work/llamacpp; OURSENV: e.g. the AVX2-laptop
# simulation "ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2".
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=${PYTHONPATH:-$PWD}
LB=${LB:-native}; ISA=${ISA:-avx512}; R=${R:-3}; OURSENV=${OURSENV:-}
PY=${PY:-.venv/bin/python}
for M in ${MODELS}; do
  for t in ${THREADS:-1 2}; do
    echo "=== $(basename "$M") threads=$t llama.cpp=$LB ours=$ISA  ($(uptime | sed 's/.*load/load/'))"
    for _ in $(seq "$R"); do
      /work/llamacpp/build-"$LB"/bin/llama-bench -m "$M" -t "$t" -p 512 -n 64 -r 1 -o csv 2>/dev/null | tail -2 \
        | tr -d '"' | awk -F, '{printf "llama.cpp %s tok/s  ", $(NF-1)}'; echo "(pp512, tg64)"
      # shellcheck disable=SC2086
      env $OURSENV "$PY" benchmarks/kernels.py --model "$M" --isa "$ISA" --threads "$t" --runs 1 --no-llamacpp \
        2>/dev/null | tail -1
    done
  done
done
