"""Image loading rules: formats, caps, corrupt data, local-path and remote permissions (all MediaError = 400)."""

from __future__ import annotations

import base64
import io
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from autoglm.errors import MediaError
from autoglm.multimodal.media import MediaPolicy, decode_image, load_image


def _image(w: int = 40, h: int = 30) -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8), "RGB")


def _encode(image: Image.Image, fmt: str, **kw: object) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _data_url(data: bytes, mime: str = "image/png", b64_marker: bool = True) -> str:
    return f"data:{mime}{';base64' if b64_marker else ''},{base64.b64encode(data).decode()}"


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "GIF", "BMP"])
def test_formats_decode_to_rgb(fmt: str) -> None:
    src = _image()
    out = load_image(_data_url(_encode(src, fmt), f"image/{fmt.lower()}"))
    assert out.mode == "RGB" and out.size == src.size
    if fmt in ("PNG", "BMP"):  # lossless: pixels survive exactly
        assert np.array_equal(np.asarray(out), np.asarray(src))


def test_gif_first_frame() -> None:
    frames = [Image.new("RGB", (16, 16), c) for c in ((255, 0, 0), (0, 0, 255))]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:])
    out = load_image(_data_url(buf.getvalue(), "image/gif"))
    r, g, b = out.getpixel((8, 8))
    assert r > 200 and b < 50


def test_decoded_as_a_browser_shows_it() -> None:
    """Transparency onto white (not black), EXIF orientation applied, 16-bit grey scaled (not clipped)."""
    clear = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    clear.putpixel((0, 0), (0, 0, 0, 255))  # one opaque black pixel: black text on a transparent background
    out = load_image(_data_url(_encode(clear, "PNG")))
    assert out.getpixel((4, 4)) == (255, 255, 255) and out.getpixel((0, 0)) == (0, 0, 0)
    pal = Image.new("P", (8, 8), 0)
    pal.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    out = load_image(_data_url(_encode(pal, "PNG", transparency=0)))
    assert out.getpixel((1, 1)) == (255, 255, 255)
    photo = _image(40, 20)
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    out = load_image(_data_url(_encode(photo, "JPEG", exif=exif.tobytes()), "image/jpeg"))
    assert out.size == (20, 40)
    grey16 = Image.fromarray(np.full((4, 4), 30000, dtype=np.uint16))  # ~46 % grey
    assert grey16.mode.startswith("I")
    out = load_image(_data_url(_encode(grey16, "PNG")))
    assert out.getpixel((0, 0)) == (117, 117, 117)  # 30000 / 257, not 255


def test_empty_url_and_a_pil_image_with_alpha() -> None:
    with pytest.raises(MediaError, match="image URL is empty"):
        load_image("   ")
    assert load_image(Image.new("RGBA", (4, 4), (0, 0, 0, 0))).getpixel((1, 1)) == (255, 255, 255)


def test_missing_base64_marker_tolerated() -> None:
    src = _image()
    out = load_image(_data_url(_encode(src, "PNG"), b64_marker=False))
    assert np.array_equal(np.asarray(out), np.asarray(src))


def test_bad_base64() -> None:
    with pytest.raises(MediaError, match="not valid base64"):
        load_image("data:image/png;base64,@@@not-base64@@@")


def test_non_image_bytes() -> None:
    with pytest.raises(MediaError, match="not a supported image"):
        load_image(_data_url(b"hello, this is plain text, not an image at all"))


def test_truncated_png() -> None:
    data = _encode(_image(64, 64), "PNG")
    with pytest.raises(MediaError, match="truncated or corrupt"):
        load_image(_data_url(data[: len(data) // 2]))


def test_caps_on_bytes_and_pixels() -> None:
    data = _encode(_image(100, 100), "PNG")
    with pytest.raises(MediaError, match="bytes; the limit is 100 bytes"):
        decode_image(data, max_bytes=100, max_pixels=10**8)
    with pytest.raises(MediaError, match="100x100 = 10000 pixels; the limit is 9999"):
        decode_image(data, max_bytes=10**8, max_pixels=9999)


def test_local_paths_need_permission(tmp_path: Path) -> None:
    allowed = tmp_path / "media"
    allowed.mkdir()
    (allowed / "a.png").write_bytes(_encode(_image(), "PNG"))
    outside = tmp_path / "secret.png"
    outside.write_bytes(_encode(_image(), "PNG"))
    with pytest.raises(MediaError, match="--allowed-local-media-path"):
        load_image(f"file://{allowed / 'a.png'}")
    policy = MediaPolicy(allowed_local_media_path=str(allowed))
    assert policy.load(f"file://{allowed / 'a.png'}").size == (40, 30)
    assert policy.load(str(allowed / "a.png")).size == (40, 30)
    assert policy.load("a.png").size == (40, 30)  # relative to the allowed directory
    for escape in (f"file://{outside}", str(outside), "../secret.png", f"file://{allowed}/../secret.png"):
        with pytest.raises(MediaError, match="must be a subpath"):
            policy.load(escape)
    (allowed / "link.png").symlink_to(outside)
    with pytest.raises(MediaError, match="must be a subpath"):
        policy.load(str(allowed / "link.png"))
    with pytest.raises(MediaError, match="does not exist"):
        policy.load("missing.png")


@pytest.fixture()
def image_http_server() -> Iterator[str]:
    png = _encode(_image(), "PNG")

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server API)
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(png)))
            self.end_headers()
            self.wfile.write(png)

        def log_message(self, *args: object) -> None:
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}/a.png"
    server.shutdown()
    server.server_close()


def test_remote_urls_refused_unless_allowed(image_http_server: str) -> None:
    with pytest.raises(MediaError, match="--allow-remote-media"):
        load_image(image_http_server)
    out = load_image(image_http_server, allow_remote=True)
    assert out.size == (40, 30)
    with pytest.raises(MediaError, match="over the limit"):
        load_image(image_http_server, allow_remote=True, max_bytes=50)


def test_unsupported_scheme() -> None:
    with pytest.raises(MediaError, match="unsupported image URL scheme"):
        load_image("ftp://example.org/a.png")
