"""Controls that need no model: tile, blur, gray and low quality, each a pure image → image map.

Every function returns an RGB image of the input's size, the shape ControlNet-Union expects.
"""

from __future__ import annotations

import io
import math

import numpy as np
from PIL import Image, ImageFilter

_BICUBIC = Image.Resampling.BICUBIC
_LANCZOS = Image.Resampling.LANCZOS


def _rgb(image: Image.Image) -> Image.Image:
    if not isinstance(image, Image.Image):
        raise TypeError(f"image must be a PIL.Image.Image, got {type(image).__name__}.")
    return image if image.mode == "RGB" else image.convert("RGB")


def _int_in(name: str, value: object, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not lo <= value <= hi:
        raise ValueError(f"{name} must be an integer from {lo} to {hi}, got {value!r}.")
    return int(value)


def _down_up(image: Image.Image, factor: int) -> tuple[Image.Image, tuple[int, int]]:
    """Downscale by factor (Lanczos, so no aliasing); returns the small image and the full size."""
    size = image.size
    small = (max(1, round(size[0] / factor)), max(1, round(size[1] / factor)))
    return image.resize(small, _LANCZOS), size


def tile(image: Image.Image, downscale: int = 8) -> Image.Image:
    """A soft copy of the image (down by `downscale`, back up bicubic): Union's tile condition."""
    image = _rgb(image)
    factor = _int_in("downscale", downscale, 1, 64)
    if factor == 1:
        return image.copy()
    small, size = _down_up(image, factor)
    return small.resize(size, _BICUBIC)


def blur(image: Image.Image, radius: float = 5.0) -> Image.Image:
    """Gaussian blur with the given radius in pixels (0 keeps the image)."""
    image = _rgb(image)
    if isinstance(radius, bool) or not isinstance(radius, (int, float, np.integer, np.floating)):
        raise ValueError(f"radius must be a number from 0 to 200, got {radius!r}.")
    if not math.isfinite(radius) or not 0 <= radius <= 200:
        raise ValueError(f"radius must be a number from 0 to 200, got {radius!r}.")
    if radius == 0:
        return image.copy()
    return image.filter(ImageFilter.GaussianBlur(float(radius)))


def gray(image: Image.Image) -> Image.Image:
    """Grayscale as 3-channel RGB (R == G == B), the layout the pipeline feeds to the VAE."""
    return _rgb(image).convert("L").convert("RGB")


def low_quality(image: Image.Image, downscale: int = 4, jpeg_quality: int = 25) -> Image.Image:
    """Degrade like a poor upload: downscale, low-quality JPEG round-trip, upscale back."""
    image = _rgb(image)
    factor = _int_in("downscale", downscale, 1, 64)
    quality = _int_in("jpeg_quality", jpeg_quality, 1, 95)
    small, size = _down_up(image, factor) if factor > 1 else (image, image.size)
    buf = io.BytesIO()
    small.save(buf, format="JPEG", quality=quality)
    buf.seek(0)
    with Image.open(buf) as degraded:
        degraded = degraded.convert("RGB")
    return degraded.resize(size, _BICUBIC) if degraded.size != size else degraded
