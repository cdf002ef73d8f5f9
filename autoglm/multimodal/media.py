"""Fetching and decoding request images under the server's security rules.

Sources: `data:` URLs (base64; a missing `;base64` is tolerated), `file://` URLs and plain paths (only under
`allowed_local_media_path`), `http(s)://` (only with `allow_remote`), raw bytes, or an already-decoded PIL image.
Every failure is a `MediaError` (HTTP 400) naming the cause: a client's bad image is never a 5xx.
"""

from __future__ import annotations

import base64
import binascii
import io
import os
import urllib.parse
import urllib.request
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from autoglm.errors import MediaError

SUPPORTED_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")


@dataclass(frozen=True)
class MediaPolicy:
    """The limits and permissions one server applies to every image."""

    allowed_local_media_path: str | None = None
    allow_remote: bool = False
    max_bytes: int = 20 * 1024 * 1024
    max_pixels: int = 24_000_000
    timeout: float = 5.0

    def load(self, source: object) -> Image.Image:
        return load_image(
            source,
            allowed_local_media_path=self.allowed_local_media_path,
            allow_remote=self.allow_remote,
            max_bytes=self.max_bytes,
            max_pixels=self.max_pixels,
            timeout=self.timeout,
        )


def load_image(
    source: object,
    *,
    allowed_local_media_path: str | None = None,
    allow_remote: bool = False,
    max_bytes: int = 20 * 1024 * 1024,
    max_pixels: int = 24_000_000,
    timeout: float = 5.0,
) -> Image.Image:
    """Resolve `source` to an RGB PIL image, enforcing the permissions and caps. Raises MediaError."""
    if isinstance(source, Image.Image):
        _check_pixels(source.width, source.height, max_pixels)
        return displayed_rgb(source)
    if isinstance(source, (bytes, bytearray, memoryview)):
        return decode_image(bytes(source), max_bytes=max_bytes, max_pixels=max_pixels)
    if not isinstance(source, str):
        raise MediaError(f"image source must be a URL string, got {type(source).__name__}", param="image_url")
    text = source.strip()
    if not text:
        raise MediaError("image URL is empty", param="image_url")
    scheme = text.split(":", 1)[0].lower() if ":" in text[:16] else ""
    if scheme == "data":
        return decode_image(_data_url_bytes(text), max_bytes=max_bytes, max_pixels=max_pixels)
    if scheme in ("http", "https"):
        if not allow_remote:
            raise MediaError(
                "remote image URLs are disabled on this server (start it with --allow-remote-media); "
                "send the image as a data URL instead",
                param="image_url",
            )
        return decode_image(_fetch(text, max_bytes, timeout), max_bytes=max_bytes, max_pixels=max_pixels)
    if scheme == "file" or scheme == "" or (len(scheme) == 1 and os.name == "nt"):
        path = _local_path(text, allowed_local_media_path)
        return decode_image(_read_file(path, max_bytes), max_bytes=max_bytes, max_pixels=max_pixels)
    raise MediaError(f"unsupported image URL scheme {scheme!r}; use a data: URL", param="image_url")


def decode_image(data: bytes, *, max_bytes: int, max_pixels: int) -> Image.Image:
    """Encoded bytes -> RGB image (first frame for animations); checks format, size and integrity."""
    if len(data) > max_bytes:
        raise MediaError(f"image is {len(data)} bytes; the limit is {max_bytes} bytes", param="image_url")
    if not data:
        raise MediaError("image data is empty", param="image_url")
    with warnings.catch_warnings():
        # Our own pixel cap replaces Pillow's decompression-bomb warning.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(data))
        except Image.DecompressionBombError as exc:
            raise MediaError(f"image is too large: {exc}", param="image_url") from exc
        except Exception as exc:  # PIL raises UnidentifiedImageError, SyntaxError, ValueError ... on junk
            raise MediaError(
                f"data is not a supported image (expected {', '.join(SUPPORTED_FORMATS)})", param="image_url"
            ) from exc
        if image.format not in SUPPORTED_FORMATS:
            raise MediaError(
                f"image format {image.format} is not supported (expected {', '.join(SUPPORTED_FORMATS)})",
                param="image_url",
            )
        # Check dimensions from the header before decoding any pixels (decompression bombs).
        _check_pixels(image.width, image.height, max_pixels)
        try:
            image.seek(0)  # first frame of an animated GIF/WebP
            image.load()
            rgb = displayed_rgb(image)
        except Exception as exc:  # truncated or corrupt pixel data
            raise MediaError(f"{image.format} image data is truncated or corrupt ({exc})", param="image_url") from exc
    return rgb


def displayed_rgb(image: Image.Image) -> Image.Image:
    """The image as a browser shows it, in RGB: EXIF orientation applied (phone photos), 16-bit grey scaled to 8
    bits (Pillow's convert would clip it), transparency composited onto white (as transformers does; convert("RGB")
    alone would turn transparent pixels black)."""
    image = ImageOps.exif_transpose(image)
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N"):  # 16-bit grey PNG: 0..65535 -> 0..255
        grey = np.asarray(image.convert("I"), dtype=np.int64)
        return Image.fromarray(np.clip((grey + 128) // 257, 0, 255).astype(np.uint8), "L").convert("RGB")
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def _check_pixels(width: int, height: int, max_pixels: int) -> None:
    if width < 1 or height < 1:
        raise MediaError(f"image has no pixels ({width}x{height})", param="image_url")
    if width * height > max_pixels:
        raise MediaError(
            f"image is {width}x{height} = {width * height} pixels; the limit is {max_pixels} pixels",
            param="image_url",
        )


def _data_url_bytes(url: str) -> bytes:
    header, sep, payload = url.partition(",")
    if not sep:
        raise MediaError("malformed data URL: no ',' separating the header from the data", param="image_url")
    mime = header[5:].split(";", 1)[0].strip().lower()
    if mime and not mime.startswith("image/") and mime != "application/octet-stream":
        raise MediaError(f"data URL has media type {mime!r}; expected image/*", param="image_url")
    # Clients sometimes drop ';base64' or URL-encode the payload: decode it as base64 regardless.
    payload = urllib.parse.unquote(payload) if "%" in payload else payload
    compact = "".join(payload.split())
    if not compact:
        raise MediaError("data URL carries no data", param="image_url")
    try:
        alt = b"-_" if ("-" in compact or "_" in compact) else None
        return base64.b64decode(compact + "=" * (-len(compact) % 4), altchars=alt, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise MediaError(f"image data URL is not valid base64: {exc}", param="image_url") from exc


def _local_path(text: str, allowed: str | None) -> Path:
    if text.lower().startswith("file://"):
        parsed = urllib.parse.urlparse(text)
        if parsed.netloc not in ("", "localhost"):
            raise MediaError(f"file URL must name a local file, got host {parsed.netloc!r}", param="image_url")
        raw = urllib.parse.unquote(parsed.path)
    else:
        raw = text
    if allowed is None:
        raise MediaError(
            "local image paths are disabled on this server (start it with --allowed-local-media-path DIR)",
            param="image_url",
        )
    root = Path(allowed).resolve()
    path = Path(raw)
    path = (path if path.is_absolute() else root / path).resolve()  # resolves symlinks and '..'
    if not path.is_relative_to(root):
        raise MediaError(
            f"cannot load local file {raw!r}: the path must be a subpath of --allowed-local-media-path {root}",
            param="image_url",
        )
    if not path.is_file():
        raise MediaError(f"local image {raw!r} does not exist or is not a file", param="image_url")
    return path


def _read_file(path: Path, max_bytes: int) -> bytes:
    size = path.stat().st_size
    if size > max_bytes:
        raise MediaError(f"image is {size} bytes; the limit is {max_bytes} bytes", param="image_url")
    return path.read_bytes()


def _fetch(url: str, max_bytes: int, timeout: float) -> bytes:
    request = urllib.request.Request(url, headers={"User-Agent": "autoglm"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310 (scheme checked above)
            data = response.read(max_bytes + 1)
    except Exception as exc:
        raise MediaError(f"could not fetch image {url!r}: {exc}", param="image_url") from exc
    if len(data) > max_bytes:
        raise MediaError(f"image at {url!r} is over the limit of {max_bytes} bytes", param="image_url")
    return data
