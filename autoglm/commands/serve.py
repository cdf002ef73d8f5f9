"""`autoglm serve [MODEL]`: the OpenAI-compatible server (llama-server-like `-m X.gguf --mmproj Y.gguf` too).

The listening socket is bound before anything heavy happens, so a taken port fails at once with a clear message
(exit status 2) instead of after loading a 9B model.
"""

from __future__ import annotations

import argparse
import errno
import logging
import socket
import sys
from typing import Any

from autoglm.errors import AutoGLMError

EXIT_PORT_IN_USE = 2
EXIT_STARTUP_FAILED = 3

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def register(subparsers: Any) -> None:
    from autoglm.server.config import add_arguments

    parser = subparsers.add_parser(
        "serve",
        help="run the OpenAI-compatible HTTP server",
        description="Serve a model over the OpenAI API (/v1/chat/completions, /v1/completions, /v1/models), "
        "with /health, /health/ready, /metrics and a status page at /. Every flag can also be set with the "
        "AUTOGLM_<FLAG> environment variable (e.g. AUTOGLM_PORT=8000); flags win.",
    )
    parser.add_argument("model_pos", nargs="?", metavar="MODEL",
                        help="model directory or .gguf file (default: the built-in model) [env AUTOGLM_MODEL]")
    add_arguments(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from autoglm.server.config import ServerConfig

    values = vars(args).copy()
    if values.get("model") is None:
        values["model"] = values.get("model_pos")
    try:
        config = ServerConfig.from_sources(values)
    except AutoGLMError as exc:
        print(f"autoglm serve: {exc.message}", file=sys.stderr)
        return EXIT_STARTUP_FAILED
    return serve(config)


def bind_socket(host: str, port: int) -> socket.socket:
    """Bind and listen; raises OSError (EADDRINUSE when the port is taken)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    # SO_REUSEADDR on Linux still refuses a port another socket listens on; it only skips TIME_WAIT leftovers.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(2048)
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


def serve(config: Any, model: Any = None) -> int:
    """Run the server until SIGINT/SIGTERM. `model`: an already-built LoadedModel (tests, embedding)."""
    import uvicorn

    from autoglm.server.app import create_app

    logging.basicConfig(level=config.log_level.upper(), format=LOG_FORMAT, stream=sys.stderr, force=True)
    log = logging.getLogger("autoglm.server")
    try:
        sock = bind_socket(config.host, config.port)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            print(f"autoglm serve: port {config.port} on {config.host} is already in use "
                  "(is another server running? stop it or pick another --port)", file=sys.stderr)
            return EXIT_PORT_IN_USE
        print(f"autoglm serve: cannot listen on {config.host}:{config.port}: {exc}", file=sys.stderr)
        return EXIT_PORT_IN_USE
    app = create_app(config, model=model)
    logging.getLogger("uvicorn.error").addFilter(_no_startup_traceback)
    server = uvicorn.Server(uvicorn.Config(
        app, log_config=None, log_level=config.log_level.lower(),
        timeout_graceful_shutdown=getattr(config, "drain_grace", 10.0) + 5,  # the drain ends streams before this
        access_log=config.log_level.lower() == "debug",
    ))
    server.handle_exit = _drain_on_exit(server, app, getattr(config, "drain_grace", 10.0))  # type: ignore[method-assign]
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:
        pass
    finally:
        sock.close()
    if not server.started:
        log.error("Server did not start (see the errors above)")
        return EXIT_STARTUP_FAILED
    return 0


def _no_startup_traceback(record: logging.LogRecord) -> bool:
    """Drop the ASGI traceback of a start-up error the app already logged in one line (app.StartupFailed)."""
    return "StartupFailed" not in record.getMessage()


def _drain_on_exit(server: Any, app: Any, grace: float) -> Any:
    """SIGTERM/SIGINT: the engine drains (new requests 503; open streams get `grace` seconds, then a clean error
    event), while uvicorn stops accepting connections and waits for the open ones."""
    plain = server.handle_exit

    def handle_exit(sig: int, frame: Any) -> None:
        engine = app.state.autoglm.engine  # ServerState.engine: an EngineClient once the model is loaded
        if engine is not None:
            begin = engine.begin_drain
            try:  # run it on the event loop, not inside the signal handler (it takes locks)
                import asyncio

                asyncio.get_running_loop().call_soon_threadsafe(begin, grace)
            except RuntimeError:  # no running loop: still starting, nothing to drain
                pass
        plain(sig, frame)

    return handle_exit


def main(argv: list[str] | None = None) -> int:
    """`python -m autoglm.commands.serve ...` without the CLI frame."""
    parser = argparse.ArgumentParser(prog="autoglm")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["serve", *(sys.argv[1:] if argv is None else argv)])
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
