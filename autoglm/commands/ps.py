"""`autoglm ps`: what a running server has loaded (asks it: GET /api/ps at $AUTOGLM_HOST:$AUTOGLM_PORT)."""

from __future__ import annotations

import argparse
import json
import os
import urllib.error
import urllib.request
from typing import Any


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("ps", help="show the model a running server has loaded",
                              description="Ask a running `autoglm serve` (at --host/--port, default "
                              "$AUTOGLM_HOST / $AUTOGLM_PORT, else 127.0.0.1:8000) for its loaded model.")
    p.add_argument("--host", default=os.environ.get("AUTOGLM_HOST") or "127.0.0.1")
    p.add_argument("--port", type=int, default=int(os.environ.get("AUTOGLM_PORT") or 8000))
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from autoglm.errors import ServiceUnavailable

    host = "127.0.0.1" if args.host in ("0.0.0.0", "::") else args.host
    url = f"http://{host}:{args.port}/api/ps"
    request = urllib.request.Request(url)
    key = os.environ.get("AUTOGLM_API_KEY")
    if key:
        request.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            models = json.loads(response.read())["models"]
    except urllib.error.HTTPError as e:  # a server answered, with an error (before URLError: it is one)
        hint = (" (the server wants an API key: set AUTOGLM_API_KEY to the key it was started with)"
                if e.code == 401 else "")
        raise ServiceUnavailable(f"the server at {url} answered HTTP {e.code} {e.reason}{hint}") from None
    except (urllib.error.URLError, OSError, ValueError, KeyError) as e:
        raise ServiceUnavailable(f"no autoglm server answered at {url} ({getattr(e, 'reason', e)}); start one with "
                                 "`autoglm serve` or set AUTOGLM_HOST / AUTOGLM_PORT") from None
    rows = [("NAME", "SIZE", "PROCESSOR", "CONTEXT")]
    for m in models:
        rows.append((m["name"], f"{m['size'] / 1e6:.1f} MB", "100% CPU" if not m.get("size_vram") else "GPU",
                     str(m.get("context_length", ""))))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for r in rows:
        print("    ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    return 0
