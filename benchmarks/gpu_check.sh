#!/usr/bin/env bash
# The GPU check of issue 15 (point 6): autoglm --device cuda vs llama.cpp CUDA on the same GGUF, in one short run.
# Outside CI. Two steps, because the device machine reaches no network and starts bare:
#
#   benchmarks/gpu_check.sh pack      # HERE (no GPU): .gpu/ = llama.cpp sources (from benchmarks/build_llamacpp.sh's
#                                     # /work/llamacpp/src, ~10 MiB xz) + the pure-Python `gguf` package
#   benchmarks/gpu_check.sh run       # THERE, via the device tool: run(command="bash benchmarks/gpu_check.sh run",
#                                     #   carry=[".gpu"], timeout_s=600); results under $OUT (8 files)
#
# `run` (budget < 8 min on one H200, 16 cores): builds llama-bench / llama-batched-bench / llama-quantize with CUDA
# (sm_90, FlashAttention kernels: GPU_CHECK_FA=OFF skips them if the build is too slow) in the background while it
# writes the random ~1.5 B GLM-4 (benchmarks/make_synthetic_glm4.py, F16 GGUF); quantizes it to Q4_K_M with
# llama-quantize; runs the CUDA tests of the backend and the graphs (tests/unit/test_cuda_sdpa.py,
# test_cuda_graphs.py get a "cuda" parameter there); then, back to back with nothing else running:
#   llama-bench   -p 512 -n 128 -ngl 99 -fa 1 -r 3 on Q4_K_M and F16  (prefill pp512, decode tg128, tok/s)
#   llama-batched-bench -npp 16 -ntg 128 -npl 1,8 on Q4_K_M          (aggregate decode at 1 and 8 streams)
#   benchmarks/gpu_bench.py on Q4_K_M --device cuda                  (same shapes; CUDA graphs on and off)
# and writes $OUT/gpu_check.md: the ratios autoglm / llama.cpp for the BENCHMARKS.md section "GPU path (issue 15)".
# autoglm dequantizes the GGUF to bf16 at load (loader/device.py), so its speed is the same for both files; the F16
# llama.cpp row is the like-for-like bytes-per-weight comparison.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cmd=${1:-}

pack() {
  local src=${LLAMACPP_SRC:-/work/llamacpp/src} dest="$here/.gpu"
  if [ ! -f "$src/CMakeLists.txt" ]; then
    echo "no llama.cpp sources at $src: run benchmarks/build_llamacpp.sh first (it fetches and verifies them)" >&2
    exit 2
  fi
  local exclude
  exclude=$(git -C "$here" rev-parse --git-path info/exclude)
  case $exclude in /*) ;; *) exclude="$here/$exclude" ;; esac
  grep -qx '/.gpu/' "$exclude" 2>/dev/null || echo '/.gpu/' >>"$exclude"
  rm -rf "$dest" && mkdir -p "$dest/site"
  # what a CUDA build of llama-bench needs; tools/ui and tools/server are skipped with LLAMA_BUILD_SERVER=OFF
  XZ_OPT=-T0 tar -C "$(readlink -f "$src")" -cJf "$dest/llama.cpp.tar.xz" --exclude=tools/ui --exclude=tools/server \
    --exclude='*.gguf' CMakeLists.txt cmake ggml src include common tools vendor app licenses LICENSE
  local gguf_dir
  gguf_dir=$(/work/main/.venv/bin/python -c 'import gguf, os; print(os.path.dirname(gguf.__file__))')
  cp -r "$gguf_dir" "$dest/site/gguf"
  du -sh "$dest"
}

run() {
  local out=${OUT:-$here/gpu-out} t0=$SECONDS lc=/tmp/gpu-check/llama.cpp syn=/tmp/gpu-check/syn
  mkdir -p "$out" "$lc" "$syn"
  local log="$out/gpu_check.log"
  say() { echo "[$((SECONDS - t0))s] $*" | tee -a "$log"; }
  [ -f "$here/.gpu/llama.cpp.tar.xz" ] || { echo "no .gpu/: run 'benchmarks/gpu_check.sh pack' here first and carry .gpu" >&2; exit 2; }
  export PYTHONPATH="$here/.gpu/site:$here" PYTHONUNBUFFERED=1
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv >>"$log" 2>&1 || true
  python3 -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name(0))' 2>&1 | tee -a "$log" || true

  say "llama.cpp: configure + build (background)"
  tar -xJf "$here/.gpu/llama.cpp.tar.xz" -C "$lc"
  (
    cmake -S "$lc" -B "$lc/build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90-real \
      -DGGML_CUDA_FA="${GPU_CHECK_FA:-ON}" -DGGML_NATIVE=ON -DLLAMA_CURL=OFF -DLLAMA_BUILD_SERVER=OFF \
      -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=ON &&
      ninja -C "$lc/build" -j "$(nproc)" llama-bench llama-batched-bench llama-quantize
  ) >"$lc/build.log" 2>&1 &
  local build_pid=$!

  say "model: random GLM-4 ~1.5 B, F16 GGUF (while llama.cpp builds)"
  python3 "$here/benchmarks/make_synthetic_glm4.py" "$syn" --preset "${GPU_CHECK_PRESET:-1.5b}" --gguf f16 >>"$log" 2>&1
  rm -rf "$syn/hf"
  local f16="$syn/glm4-synthetic-f16.gguf" q4="$syn/glm4-synthetic-q4_k_m.gguf"

  if ! wait "$build_pid"; then
    tail -c 60000 "$lc/build.log" >"$out/build.log"
    say "llama.cpp build FAILED (tail in build.log); autoglm alone"
  else
    say "llama.cpp built"
    tail -c 20000 "$lc/build.log" >"$out/build.log"
  fi
  local bin="$lc/build/bin" fa=on
  [ "${GPU_CHECK_FA:-ON}" = ON ] || fa=off

  say "CUDA tests: backend + graphs"
  (cd "$here" && timeout 120 python3 -m pytest -q -x --noconftest -p no:cacheprovider \
    tests/unit/test_cuda_sdpa.py tests/unit/test_cuda_graphs.py) >>"$log" 2>&1 && say "tests passed" || say "tests FAILED (log)"

  if [ -x "$bin/llama-quantize" ]; then
    say "llama-quantize Q4_K_M"
    "$bin/llama-quantize" "$f16" "$q4" Q4_K_M "$(nproc)" >>"$log" 2>&1
  else
    say "no llama-quantize: autoglm's own Q4_K_M converter"
    python3 "$here/benchmarks/make_synthetic_glm4.py" "$syn" --preset "${GPU_CHECK_PRESET:-1.5b}" --gguf q4_k_m >>"$log" 2>&1
  fi

  if [ -x "$bin/llama-bench" ]; then
    for m in q4_k_m f16; do
      say "llama-bench $m"
      timeout 120 "$bin/llama-bench" -m "$syn/glm4-synthetic-$m.gguf" -ngl 99 -fa "$fa" -p 512 -n 128 -r 3 -o json \
        >"$out/llama-bench-$m.json" 2>>"$log" || say "llama-bench $m failed"
    done
    say "llama-batched-bench q4_k_m"
    timeout 120 "$bin/llama-batched-bench" -m "$q4" -ngl 99 -fa "$fa" -c 4096 -npp 16 -ntg 128 -npl 1,8 \
      >"$out/batched-bench.txt" 2>&1 || say "llama-batched-bench failed"
  fi

  say "autoglm gpu_bench q4_k_m"
  timeout 240 python3 "$here/benchmarks/gpu_bench.py" "$q4" --device cuda --prompt-len 512 --gen-len 128 \
    --batches 1,8 --graphs on,off --runs 3 --json "$out/autoglm.json" >>"$log" 2>&1 || say "gpu_bench failed (log)"

  say "summary"
  python3 - "$out" <<'EOF' | tee "$out/gpu_check.md" | tee -a "$log"
import json, re, sys
from pathlib import Path

out = Path(sys.argv[1])
def load(name):
    p = out / name
    try:
        return json.loads(p.read_text())
    except Exception:
        return None

lines = ["| measure | autoglm (graphs on) | autoglm (graphs off) | llama.cpp Q4_K_M | llama.cpp F16 | ratio (on / Q4_K_M) |",
         "|---|---|---|---|---|---|"]
ours = load("autoglm.json") or {}
on, off = ours.get("runs", {}).get("graphs_on", {}), ours.get("runs", {}).get("graphs_off", {})
def lb(name, key):
    rows = load(name) or []
    for r in rows:
        if key == "pp" and r.get("n_prompt", 0) > 0 and r.get("n_gen", 0) == 0:
            return r.get("avg_ts")
        if key == "tg" and r.get("n_gen", 0) > 0 and r.get("n_prompt", 0) == 0:
            return r.get("avg_ts")
    return None
def batched(npl):
    p = out / "batched-bench.txt"
    if not p.exists():
        return None
    for line in p.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 10 and cells[0].isdigit() and cells[2] == str(npl):
            return float(cells[7])  # S_TG t/s (aggregate over the npl streams)
    return None
def fmt(x):
    return "-" if x is None else f"{x:.1f}"
def ratio(a, b):
    return "-" if a is None or not b else f"{a / b:.2f}x"
rows = [("prefill 512 (tok/s)", on.get("prefill_tok_s"), off.get("prefill_tok_s"), lb("llama-bench-q4_k_m.json", "pp"), lb("llama-bench-f16.json", "pp")),
        ("decode 1 stream (tok/s)", on.get("decode_b1_tok_s"), off.get("decode_b1_tok_s"), lb("llama-bench-q4_k_m.json", "tg"), lb("llama-bench-f16.json", "tg")),
        ("decode 8 streams, aggregate (tok/s)", on.get("decode_b8_tok_s"), off.get("decode_b8_tok_s"), batched(8), None)]
for name, a, b, c, d in rows:
    lines.append(f"| {name} | {fmt(a)} | {fmt(b)} | {fmt(c)} | {fmt(d)} | {ratio(a, c)} |")
lines.append("")
lines.append(f"gpu: {ours.get('gpu')}; torch {ours.get('torch')}; autoglm load {ours.get('load_s')} s, dtype {on.get('dtype')}, "
             f"backend {on.get('backend')}, graphs {on.get('graphs')} ({on.get('graph_replays')} replays), "
             f"peak GPU {on.get('peak_gpu_mib')} MiB; greedy tokens equal with/without graphs: {ours.get('graphs_tokens_equal')}")
print("\n".join(lines))
EOF
  say "done in $((SECONDS - t0))s"
}

case "$cmd" in
  pack) pack ;;
  run) run ;;
  *) echo "usage: benchmarks/gpu_check.sh pack|run" >&2; exit 2 ;;
esac
