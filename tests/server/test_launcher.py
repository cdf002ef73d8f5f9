"""run_autoglm_server.sh: start in the background, /health/ready turns green, `kill -9` of the server is repaired
by the guard, status/logs/stop work, the log rotates, and a taken port fails at once with a clear message."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.fixtures.server import REPO_ROOT, free_port, server_env, wait_ready

LAUNCHER = REPO_ROOT / "run_autoglm_server.sh"


def _env(model_dir: Path, port: int, logs: Path, **extra: str) -> dict[str, str]:
    env = server_env()
    env.update(
        AUTOGLM_MODEL=str(model_dir), AUTOGLM_HOST="127.0.0.1", AUTOGLM_PORT=str(port),
        AUTOGLM_VENV=sys.prefix, AUTOGLM_LOG_DIR=str(logs), AUTOGLM_MAX_BACKOFF="2",
        AUTOGLM_MAX_MODEL_LEN="128", AUTOGLM_ENV_FILE=str(logs / "absent.env"), AUTOGLM_LOG_MAX_BYTES="1000",
        AUTOGLM_SERVED_MODEL_NAME="autoglm-phone-9b",
        **extra,
    )
    return env


def _run(env: dict[str, str], *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(LAUNCHER), *args], env=env, capture_output=True, text=True, timeout=timeout,
                          cwd=REPO_ROOT)


def _pid(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def _alive(pid: int | None) -> bool:
    if pid is None:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture(scope="module")
def launched(tiny_glm4v_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[dict, Path, int]]:
    logs = tmp_path_factory.mktemp("launcher") / "logs"
    port = free_port()
    env = _env(tiny_glm4v_dir, port, logs)
    result = _run(env, "start", "-d")
    try:
        assert result.returncode == 0, result.stdout + result.stderr
        assert "started in the background" in result.stdout
        wait_ready(f"http://127.0.0.1:{port}", None, logs / "autoglm-server.log", timeout=240)
        yield env, logs, port
    finally:
        _run(env, "stop")


def test_taken_port_fails_clearly(tiny_glm4v_dir: Path, tmp_path: Path) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen(1)
        port = holder.getsockname()[1]
        env = _env(tiny_glm4v_dir, port, tmp_path / "logs")
        for args in (["start"], ["start", "--daemon"]):
            started = time.monotonic()
            result = _run(env, *args, timeout=60)
            assert result.returncode == 2, result.stdout + result.stderr
            assert f"port {port} on 127.0.0.1 is already in use" in result.stderr
            assert time.monotonic() - started < 30  # fails before loading anything
        # the server itself says so too (e.g. when started without the launcher)
        direct = subprocess.run([sys.executable, "-m", "autoglm.commands.serve", str(tiny_glm4v_dir), "--host",
                                 "127.0.0.1", "--port", str(port)], env=server_env(), capture_output=True, text=True,
                                timeout=120, cwd=REPO_ROOT)
        assert direct.returncode == 2 and "already in use" in direct.stderr


def test_start_ready_status_and_startup_log(launched: tuple[dict, Path, int]) -> None:
    env, logs, port = launched
    status = _run(env, "status")
    assert status.returncode == 0 and "ready" in status.stdout, status.stdout
    log = "".join(p.read_text(errors="replace") for p in sorted(logs.glob("autoglm-server.log*")))
    lines = log.splitlines()
    loaded = [i for i, line in enumerate(lines) if "Loaded module " in line]
    listening = [i for i, line in enumerate(lines) if f"Server listening on http://127.0.0.1:{port}" in line]
    done = [i for i, line in enumerate(lines) if "All modules loaded successfully" in line]
    assert loaded and listening and done
    assert max(loaded[:2]) < listening[0] < done[0]  # the article's order
    assert any("decoder" in lines[i] and "safetensors float32" in lines[i] and "params" in lines[i] for i in loaded)
    models = httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=30).json()
    assert [m["id"] for m in models["data"]] == ["autoglm-phone-9b"]  # AUTOGLM_SERVED_MODEL_NAME reached it
    logs_cmd = _run(env, "logs", "-n", "5", "--no-follow")
    assert logs_cmd.returncode == 0 and logs_cmd.stdout.strip()


def test_status_and_logs_find_the_recorded_port(launched: tuple[dict, Path, int]) -> None:
    env, logs, port = launched
    assert (logs / "autoglm-server.addr").read_text().split() == ["127.0.0.1", str(port)]
    for other in ({k: v for k, v in env.items() if k != "AUTOGLM_PORT"}, {**env, "AUTOGLM_PORT": str(free_port())}):
        status = _run(other, "status")
        assert status.returncode == 0 and f"port {port}" in status.stdout and "ready:" in status.stdout, status.stdout
        logs_cmd = _run(other, "logs", "-n", "1", "--no-follow")
        assert logs_cmd.returncode == 0 and f"server on port {port}" in logs_cmd.stderr


def test_setup_tries_an_unreachable_index_once_then_falls_back(tmp_path: Path) -> None:
    """A stand-in venv python records pip's arguments and fails whenever the extra index is used."""
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    calls = tmp_path / "calls.txt"
    stub = venv / "bin" / "python"
    stub.write_text(f"""#!/usr/bin/env bash
echo "$*" >> {calls}
[ "$1" = -c ] && exit 1                      # "import autoglm.server.app, torch" fails: set-up runs
case "$*" in *--extra-index-url*) exit 1 ;; esac
exit 0
""")
    stub.chmod(0o755)
    env = {**server_env(), "AUTOGLM_VENV": str(venv), "AUTOGLM_LOG_DIR": str(tmp_path / "logs"),
           "AUTOGLM_ENV_FILE": str(tmp_path / "absent.env"), "AUTOGLM_TORCH_INDEX": "http://127.0.0.1:9/simple"}
    result = _run(env, "setup", timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    pip = [line for line in calls.read_text().splitlines() if line.startswith("-m pip install")]
    torch_calls = [line for line in pip if "torch==2.13.0" in line]
    assert len(torch_calls) == 2
    assert "--retries 0 --timeout 5 --extra-index-url http://127.0.0.1:9/simple" in torch_calls[0]
    assert "--extra-index-url" not in torch_calls[1]
    assert "pip failed with the extra index http://127.0.0.1:9/simple" in result.stdout
    assert "retrying with the default index only" in result.stdout and "Python environment ready" in result.stdout


def test_second_start_refused_while_running(launched: tuple[dict, Path, int]) -> None:
    env, _, _ = launched
    result = _run(env, "start", "-d")
    assert result.returncode != 0 and "already running" in result.stdout


def test_kill_9_is_restarted(launched: tuple[dict, Path, int]) -> None:
    env, logs, port = launched
    server_pid = _pid(logs / "autoglm-server.pid")
    guard_pid = _pid(logs / "autoglm-guard.pid")
    assert _alive(server_pid) and _alive(guard_pid)
    os.kill(server_pid, signal.SIGKILL)
    deadline = time.monotonic() + 60
    new_pid = None
    while time.monotonic() < deadline:
        new_pid = _pid(logs / "autoglm-server.pid")
        if new_pid and new_pid != server_pid and _alive(new_pid):
            break
        time.sleep(0.2)
    assert new_pid and new_pid != server_pid, "the guard did not restart the server"
    wait_ready(f"http://127.0.0.1:{port}", None, logs / "autoglm-server.log", timeout=240)
    assert _pid(logs / "autoglm-guard.pid") == guard_pid
    log = "".join(p.read_text(errors="replace") for p in logs.glob("autoglm-server.log*"))
    assert "server exited with status 137; restarting in" in log
    assert (logs / "autoglm-server.log.1").exists()  # rotated at AUTOGLM_LOG_MAX_BYTES on restart


def test_stop_ends_everything(launched: tuple[dict, Path, int]) -> None:
    env, logs, port = launched
    server_pid = _pid(logs / "autoglm-server.pid")
    guard_pid = _pid(logs / "autoglm-guard.pid")
    result = _run({k: v for k, v in env.items() if k != "AUTOGLM_PORT"}, "stop")
    assert result.returncode == 0 and f"stopped (was on port {port})" in result.stdout
    time.sleep(0.5)
    assert not _alive(server_pid) and not _alive(guard_pid)
    assert not (logs / "autoglm-guard.pid").exists()
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.1:{port}/health", timeout=5)
    status = _run(env, "status")
    assert status.returncode == 3 and "not running" in status.stdout
    assert not (logs / "autoglm-server.addr").exists()
