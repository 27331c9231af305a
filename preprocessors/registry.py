"""The one table of control images: name → preprocessing function, Union mode and defaults."""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass

from PIL import Image

from .canny import canny
from .depth import depth
from .simple import blur, gray, low_quality, tile

MAX_SCALE = 2.0


@dataclass(frozen=True)
class ControlKind:
    name: str  # "canny", "tile", "depth", "blur", "gray", "lq"
    mode_id: int  # Union mode: 0 canny, 1 tile, 2 depth, 3 blur, 4 pose, 5 gray, 6 low-quality
    default_scale: float  # controlnet_conditioning_scale that works well for this control
    in_pro2: bool  # Union-Pro-2.0 has no mode ids and only knows canny, depth, gray (and pose)
    fn: Callable[..., Image.Image]
    label: str  # short human label for the UI


# Pose (mode 4) is not offered: there is no pose detector without controlnet-aux.
CONTROLS: dict[str, ControlKind] = {
    c.name: c
    for c in (
        ControlKind("canny", 0, 0.7, True, canny, "Canny edges"),
        ControlKind("tile", 1, 0.45, False, tile, "Tile (soft detail)"),
        ControlKind("depth", 2, 0.8, True, depth, "Depth map"),
        ControlKind("blur", 3, 0.6, False, blur, "Blur"),
        ControlKind("gray", 5, 0.6, True, gray, "Grayscale"),
        ControlKind("lq", 6, 0.5, False, low_quality, "Low quality"),
    )
}


def get_control(name: str) -> ControlKind:
    """Look a control up by name (case and surrounding spaces ignored)."""
    key = name.strip().lower() if isinstance(name, str) else name
    if key not in CONTROLS:
        raise ValueError(f"Unknown control {name!r}; choose one of: {', '.join(CONTROLS)}.")
    return CONTROLS[key]


def check_params(name: str, keys) -> None:
    """A clear error if the control's preprocessing function does not take one of `keys`."""
    control = get_control(name)
    allowed = [p for p in inspect.signature(control.fn).parameters if p != "image"]
    unknown = sorted({str(k) for k in keys} - set(allowed))
    if unknown:
        raise ValueError(
            f"Control '{control.name}' does not take parameter {unknown[0]!r}; "
            f"it takes: {', '.join(allowed) or 'no parameters'}."
        )


def preprocess(name: str, image: Image.Image, **params) -> Image.Image:
    """Run the control's preprocessing function, with a clear error for unknown parameters."""
    check_params(name, params)
    return get_control(name).fn(image, **params)


def parse_control_arg(text: str) -> tuple[str, float | None]:
    """Parse "name" or "name=scale" (e.g. "canny=0.6"); the scale must lie in [0, 2]."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"A control must be given as 'name' or 'name=scale', got {text!r}.")
    name, sep, raw = text.strip().partition("=")
    control = get_control(name)
    if not sep:
        return control.name, None
    try:
        scale = float(raw.strip())
    except ValueError:
        scale = math.nan
    if not math.isfinite(scale) or not 0.0 <= scale <= MAX_SCALE:
        raise ValueError(
            f"The scale in {text.strip()!r} must be a number from 0 to {MAX_SCALE:g}, got {raw.strip()!r}."
        )
    return control.name, scale
