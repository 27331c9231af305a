"""Safe image input: every upload becomes an RGB 8-bit PIL image or one clear error.

Uploads come from strangers, so sizes are checked from the header before any pixel is
decoded, and every Pillow failure is turned into an ImageInputError with one sentence.
"""

from __future__ import annotations

import io
import math
import re
import warnings
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

MAX_UPLOAD_BYTES = 50 * 2**20
MAX_INPUT_PIXELS = 40_000_000
MIN_SIDE = 64
MAX_ASPECT = 8.0

# Pillow warns above this and raises above twice this; we turn the warning into an error too.
Image.MAX_IMAGE_PIXELS = MAX_INPUT_PIXELS

_ALPHA_MODES = {"RGBA", "RGBa", "LA", "La", "PA"}
_WIDE_MODES = {"I;16", "I;16B", "I;16L", "I;16N", "I", "F"}


class ImageInputError(ValueError):
    """A bad image input, described in one sentence a person can act on."""


def _reason(exc: BaseException) -> str:
    """Pillow's message on one line, without object reprs or a final period."""
    text = re.sub(r"\s*<[^>]*>", "", " ".join(str(exc).split())).rstrip(".")
    return text or type(exc).__name__


def _check_size(width: int, height: int) -> None:
    """Reject sizes the pipeline cannot use; called on header sizes before decoding."""
    aspect = max(width, height) / max(1, min(width, height))
    if width * height > MAX_INPUT_PIXELS:
        problem = f" ({width * height:,}); the limit is {MAX_INPUT_PIXELS:,} pixels."
    # Aspect before the smallest side: for a 10000×16 strip the shape is the real problem.
    elif aspect > MAX_ASPECT:
        problem = f", an aspect ratio of {aspect:.1f}:1; the most allowed is {MAX_ASPECT:g}:1."
    elif min(width, height) < MIN_SIDE:
        problem = f"; the smallest side must be at least {MIN_SIDE} pixels."
    else:
        return
    raise ImageInputError(f"The image is {width}×{height} pixels{problem}")


def _read_bytes(source: Any) -> bytes:
    """Bytes of a path, bytes-like or binary file, never more than MAX_UPLOAD_BYTES + 1."""
    if isinstance(source, (str, Path)):
        path = Path(source).expanduser()
        if not path.is_file():
            raise ImageInputError(f"No image file was found at '{path}'.")
        size = path.stat().st_size
        if size > MAX_UPLOAD_BYTES:
            _too_big(size)
        return path.read_bytes()
    if isinstance(source, (bytes, bytearray, memoryview)):
        return bytes(source)
    data = source.read(MAX_UPLOAD_BYTES + 1) if hasattr(source, "read") else None
    if isinstance(data, (bytes, bytearray)):
        return bytes(data)
    kind = "text-mode file" if isinstance(data, str) else type(source).__name__
    raise ImageInputError(
        f"Unsupported image input of type {kind}; pass a path, bytes, a binary file, a PIL image or a numpy array."
    )


def _too_big(size: int) -> None:
    def fmt(n: int) -> str:
        return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n:,} bytes"

    raise ImageInputError(f"The file is {fmt(size)}; the upload limit is {fmt(MAX_UPLOAD_BYTES)}.")


def _open_bytes(data: bytes) -> Image.Image:
    if len(data) == 0:
        raise ImageInputError("The upload is empty (0 bytes).")
    if len(data) > MAX_UPLOAD_BYTES:
        _too_big(len(data))
    try:
        # Make Pillow's bomb warning an error; our own check below gives the nicer message.
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        # Pillow's check fires inside Image.open, before we see the size: reuse its count.
        found = re.search(r"\((\d+) pixels\)", str(exc))
        count = f" ({int(found.group(1)):,})" if found else ""
        limit = f"the limit is {MAX_INPUT_PIXELS:,} pixels"
        raise ImageInputError(f"The image has too many pixels{count}; {limit}.") from None
    except Exception as exc:  # noqa: BLE001 - Pillow plugins raise many types on malformed headers.
        unknown = isinstance(exc, UnidentifiedImageError)
        why = "cannot identify image file" if unknown else _reason(exc)
        raise ImageInputError(f"The upload is not an image Pillow can read ({why}).") from None
    return _decode(img)


def _decode(img: Image.Image) -> Image.Image:
    """Decode the first frame, after the header size check, so no bomb is ever allocated."""
    _check_size(*img.size)
    try:
        if getattr(img, "n_frames", 1) > 1:
            img.seek(0)  # animated images: the first frame is the control image
        img.load()
    except Exception as exc:  # noqa: BLE001 - truncated or corrupt data; LOAD_TRUNCATED_IMAGES stays off
        raise ImageInputError(f"The image file is damaged or truncated; Pillow reports: {_reason(exc)}.") from None
    return img


def _finite(arr: np.ndarray) -> np.ndarray:
    if not np.all(np.isfinite(arr)):
        raise ImageInputError("The image contains NaN or infinite values.")
    return arr


def _stretch_to_uint8(arr: np.ndarray) -> np.ndarray:
    """Map the real value range to 0..255: 16-bit and float data rarely fill their nominal range."""
    arr = _finite(arr.astype(np.float64))
    lo, hi = float(arr.min()), float(arr.max())
    if hi > lo:
        return np.round((arr - lo) * (255.0 / (hi - lo))).astype(np.uint8)
    # A flat image carries no range to stretch; keep it black, or white if it is bright.
    return np.full(arr.shape, 255 if hi > 0 else 0, dtype=np.uint8)


def _from_array(arr: np.ndarray) -> Image.Image:
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] in (3, 4))):
        raise ImageInputError(f"The array has shape {arr.shape}; expected H×W, H×W×3 or H×W×4.")
    _check_size(arr.shape[1], arr.shape[0])
    if arr.dtype == np.uint8:
        out = arr
    elif arr.dtype == np.uint16:
        out = _stretch_to_uint8(arr)
    elif np.issubdtype(arr.dtype, np.floating):
        lo, hi = float(_finite(arr).min()), float(arr.max())
        if lo < 0.0 or hi > 1.0:
            raise ImageInputError(f"Float image arrays must hold values in [0, 1]; this one spans {lo:g} to {hi:g}.")
        out = np.round(arr * 255.0).astype(np.uint8)
    else:
        raise ImageInputError(f"The array has dtype {arr.dtype}; expected uint8, uint16 or float.")
    return Image.fromarray(np.ascontiguousarray(out))


def _to_rgb(img: Image.Image) -> Image.Image:
    mode = img.mode
    if mode in ("P", "L", "RGB") and "transparency" in img.info:
        img, mode = img.convert("RGBA"), "RGBA"
    if mode in _ALPHA_MODES:
        # Transparent areas become white, the neutral background for control images.
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if mode in _WIDE_MODES:
        gray = _stretch_to_uint8(np.asarray(img))
        return Image.fromarray(gray).convert("RGB")
    try:
        return img.convert("RGB")
    except (ValueError, OSError) as exc:
        why = _reason(exc)
        raise ImageInputError(f"Images in mode '{mode}' cannot become RGB ({why}).") from None


def load_image(source: Any) -> Image.Image:
    """Load a path, bytes, binary file, PIL image or numpy array as an RGB 8-bit PIL image.

    Raises ImageInputError with one sentence for anything unusable.
    """
    if isinstance(source, np.ndarray):
        img = _from_array(source)
    elif isinstance(source, Image.Image):
        img = _decode(source)
    else:
        img = _open_bytes(_read_bytes(source))
    try:
        img = ImageOps.exif_transpose(img) or img
    except Exception:  # noqa: BLE001 - malformed EXIF should not cost the user the image
        pass  # (a rotation swaps width and height: the size was checked before decoding)
    return _to_rgb(img)  # always a new image: edits never reach the caller's object


def _positive(name: str, value: Any) -> float:
    real = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)
    if not real or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive number, got {value!r}.")
    return float(value)


def fit_size(
    width: int,
    height: int,
    max_side: int | None = None,
    multiple: int = 16,
    max_pixels: int | None = None,
) -> tuple[int, int]:
    """Size with (nearly) the same aspect, both sides multiples of `multiple`, within the limits.

    Only scales down; rounds to the nearest multiple, then steps down where a limit is hit.
    """
    named = (("width", width), ("height", height), ("multiple", multiple))
    w, h, m = (_positive(name, value) for name, value in named)
    if m != int(m):
        raise ValueError(f"multiple must be a positive integer, got {multiple!r}.")
    m = int(m)
    side = math.inf if max_side is None else _positive("max_side", max_side)
    area = math.inf if max_pixels is None else _positive("max_pixels", max_pixels)
    if side < m:
        raise ValueError(f"max_side ({max_side}) must be at least multiple ({m}).")
    if area < m * m:
        raise ValueError(f"max_pixels ({max_pixels}) must be at least multiple² ({m * m}).")
    scale = min(1.0, side / max(w, h), math.sqrt(area / (w * h)))
    top = side if side == math.inf else int(side // m) * m

    def snap(x: float) -> int:  # half up (not banker's rounding), at least one multiple, <= top
        return min(top, max(m, int(math.floor(x / m + 0.5)) * m))

    out_w, out_h = snap(w * scale), snap(h * scale)
    while out_w * out_h > area:
        # Step down the side whose reduction keeps the aspect closest to the original.
        steps = [c for c in ((out_w - m, out_h), (out_w, out_h - m)) if min(c) >= m]
        out_w, out_h = min(steps, key=lambda c: abs(math.log(c[0] * h / (c[1] * w))))
    return out_w, out_h


def resize_to(image: Image.Image, width: int, height: int) -> Image.Image:
    """Resize (no crop) to exactly width×height with Lanczos; always a new image."""
    if not isinstance(image, Image.Image):
        raise TypeError(f"image must be a PIL.Image.Image, got {type(image).__name__}.")
    for name, value in (("width", width), ("height", height)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
            raise ValueError(f"{name} must be a positive integer, got {value!r}.")
    return image.resize((int(width), int(height)), Image.Resampling.LANCZOS)
