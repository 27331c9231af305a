"""The one table of control images: name → preprocessing function, Union mode and defaults."""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass

from PIL import Image

from .canny import canny
from .depth import depth
from .pose import DEFAULT_PERSON_SOURCE, DEFAULT_POSE_SOURCE, pose, pose_model_is_demo
from .simple import blur, gray, low_quality, tile
from .softedge import DEFAULT_SOFTEDGE_SOURCE, softedge, softedge_model_is_demo

MAX_SCALE = 2.0


@dataclass(frozen=True)
class ControlKind:
    name: str  # "canny", "tile", "depth", "blur", "gray", "lq", "pose", "softedge"
    mode_id: int  # Union mode: 0 canny, 1 tile, 2 depth, 3 blur, 4 pose, 5 gray, 6 low-quality
    default_scale: float  # controlnet_conditioning_scale that works well for this control
    in_pro2: bool  # Union-Pro-2.0 has no mode ids and knows canny, soft edge, depth, pose, gray
    fn: Callable[..., Image.Image]
    label: str  # short human label for the UI
    default_end: float = 0.8  # control_guidance_end from the model cards
    uses_model: bool = False  # runs a detector model: fn takes demo= and device=


# Scales and ends of pose and soft edge are Union-Pro-2.0's card (pose 0.9 / 0.65, soft edge
# 0.7 / 0.8). The mode-id models (InstantX, Union-Pro) have no soft-edge mode: soft edge goes in
# as canny (0), the mode whose condition is also white edge lines on black.
CONTROLS: dict[str, ControlKind] = {
    c.name: c
    for c in (
        ControlKind("canny", 0, 0.7, True, canny, "Canny edges"),
        ControlKind("tile", 1, 0.45, False, tile, "Tile (soft detail)"),
        ControlKind("depth", 2, 0.8, True, depth, "Depth map", uses_model=True),
        ControlKind("blur", 3, 0.6, False, blur, "Blur"),
        ControlKind("gray", 5, 0.6, True, gray, "Grayscale"),
        ControlKind("lq", 6, 0.5, False, low_quality, "Low quality"),
        ControlKind("pose", 4, 0.9, True, pose, "Pose (body keypoints)", 0.65, True),
        ControlKind("softedge", 0, 0.7, True, softedge, "Soft edge", 0.8, True),
    )
}

# Controls whose detector may fall back to random weights, and what to tell the user then.
_RANDOM_DETECTOR = {
    "pose": (
        lambda device: pose_model_is_demo(device=device),
        f"RT-DETR or ViTPose could not be loaded (offline?): the pose control came from random demo "
        f"models; download {DEFAULT_PERSON_SOURCE} and {DEFAULT_POSE_SOURCE}",
    ),
    "softedge": (
        lambda device: softedge_model_is_demo(device=device),
        f"DexiNed could not be loaded (offline?): the soft-edge control came from a random demo model; "
        f"download {DEFAULT_SOFTEDGE_SOURCE}",
    ),
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


def random_detector_notes(kinds, device: str | None = None) -> list[str]:
    """One sentence for each of `kinds` (pose, soft edge) whose default detector is a random stand-in."""
    return [note for kind, (is_demo, note) in _RANDOM_DETECTOR.items() if kind in set(kinds) and is_demo(device)]


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
