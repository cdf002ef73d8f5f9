"""What browsers and Ollama's clients need from the HTTP layer: CORS for local web UIs, and HEAD on every GET route.

CORS follows Ollama's default rather than vLLM's `*`: pages served from this machine (http(s)://localhost,
127.0.0.1, [::1] or 0.0.0.0 on any port, and the app://, file://, tauri:// and vscode-webview:// schemes of
desktop apps) may call the API from a browser; any other site may not, so a web page the user happens to visit
cannot drive the local model. `--allowed-origins` (AUTOGLM_ALLOWED_ORIGINS, comma-separated; `*` for any) adds
origins, like OLLAMA_ORIGINS. HEAD runs the GET route and drops its body (Ollama's Go client checks the server
with `HEAD /`; FastAPI's GET routes answer HEAD with 405 by themselves).
"""

from __future__ import annotations

from collections.abc import Sequence

from starlette.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

LOCAL_ORIGINS = (r"^(https?://(localhost|127\.0\.0\.1|\[::1\]|0\.0\.0\.0)(:\d+)?"
                 r"|(app|file|tauri|vscode-webview)://.*)$")


def cors_options(allowed_origins: Sequence[str]) -> dict[str, object]:
    """Keyword arguments for Starlette's CORSMiddleware: the local origins plus `allowed_origins`."""
    return {
        "allow_origins": list(allowed_origins),
        "allow_origin_regex": LOCAL_ORIGINS,
        "allow_methods": ["*"],
        "allow_headers": ["*"],  # Authorization, Content-Type, the OpenAI SDK's x-stainless-* headers
        "expose_headers": ["x-request-id"],
        "allow_credentials": False,  # bearer keys travel in a header, never in cookies
    }


class HeadAsGetMiddleware:
    """A HEAD request runs as GET; the headers (status, content-type, content-length) go out, the body does not."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "HEAD":
            await self.app(scope, receive, send)
            return

        async def headers_only(message: Message) -> None:
            if message["type"] == "http.response.body":
                if message.get("more_body", False):
                    return
                message = {"type": "http.response.body", "body": b"", "more_body": False}
            await send(message)

        await self.app({**scope, "method": "GET"}, receive, headers_only)


__all__ = ["CORSMiddleware", "HeadAsGetMiddleware", "cors_options"]
