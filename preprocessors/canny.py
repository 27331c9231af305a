"""Canny edge control image: white edges on black, as ControlNet-Union's canny mode expects."""

from __future__ import annotations

import math

import cv2
import numpy as np
from PIL import Image

AUTO_SIGMA = 0.33  # the usual "auto Canny" spread around the median intensity


def _threshold(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"{name} must be a number between 0 and 255, got {value!r}.")
    if not math.isfinite(value) or not 0 <= value <= 255:
        raise ValueError(f"{name} must be a number between 0 and 255, got {value!r}.")
    return float(value)


def auto_thresholds(gray: np.ndarray, sigma: float = AUTO_SIGMA) -> tuple[int, int]:
    """Thresholds from the median so one setting suits dark and bright photos alike."""
    median = float(np.median(gray))
    low = int(max(0.0, (1.0 - sigma) * median))
    high = int(min(255.0, (1.0 + sigma) * median))
    # A black image has median 0; keep high above low so Canny stays well defined.
    return low, max(high, low + 1)


def canny(image: Image.Image, low: int | None = None, high: int | None = None) -> Image.Image:
    """OpenCV Canny on the grayscale image; thresholds left as None come from the median."""
    if not isinstance(image, Image.Image):
        raise TypeError(f"image must be a PIL.Image.Image, got {type(image).__name__}.")
    gray = np.asarray(image.convert("L"))
    if low is None or high is None:
        auto_low, auto_high = auto_thresholds(gray)
        low = auto_low if low is None else low
        high = auto_high if high is None else high
    lo, hi = _threshold("low", low), _threshold("high", high)
    if not lo < hi:
        raise ValueError(f"low ({low}) must be smaller than high ({high}); both lie in 0..255.")
    edges = cv2.Canny(gray, lo, hi)
    return Image.fromarray(edges).convert("RGB")
