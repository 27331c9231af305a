"""The one table of limits: what a Job accepts, what the UI's sliders offer, what settings loaded
from a PNG are clamped to. Every number check goes through `check`, so every door says the same
sentence for the same mistake.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Limit:
    """A numeric parameter's range. `whole`: an int (bools refused); `multiple`: ints only, a
    multiple of it (image sides: FLUX's latents need multiples of 16)."""

    lo: float
    hi: float
    default: float
    step: float = 1.0
    whole: bool = False
    multiple: int = 1


MAX_PROMPT_CHARS = 2000
MAX_CONTROLS = 4
MAX_LORAS = 8
PRECISIONS = ("auto", "exact", "4bit")  # weight formats a job allows (core.plan.placement.allowed_codes)
COMPILES = ("auto", "always", "never")  # a job's compile choice (core.speed.compile_policy)
SEED_MAX = 2**63 - 1

LIMITS: dict[str, Limit] = {
    "width": Limit(64, 2048, 1024, 16, whole=True, multiple=16),
    "height": Limit(64, 2048, 1024, 16, whole=True, multiple=16),
    "steps": Limit(1, 100, 28, 1, whole=True),
    "guidance": Limit(0.0, 30.0, 3.5, 0.1),
    "seed": Limit(0, SEED_MAX, 0, 1, whole=True),
    "upscale": Limit(1.0, 4.0, 1.0, 0.5),
    "upscale_strength": Limit(0.0, 1.0, 0.3, 0.05),
    "upscale_steps": Limit(1, 100, 10, 1, whole=True),
    "scale": Limit(0.0, 2.0, 0.7, 0.05),
    "control_start": Limit(0.0, 1.0, 0.0, 0.05),
    "control_end": Limit(0.0, 1.0, 0.8, 0.05),
    "lora_scale": Limit(-2.0, 2.0, 1.0, 0.05),  # negative: a slider LoRA pushed the other way
}
MAX_SIDE = int(LIMITS["width"].hi)  # generation size before upscaling
MAX_UPSCALE = LIMITS["upscale"].hi


def check(key: str, value, name: str | None = None):
    """`value` as the limit `key` allows it (an int for whole limits, else a float), or ValueError
    naming the parameter (`name`, default the key) and its range."""
    lim, name = LIMITS[key], name or key
    lo, hi = (int(lim.lo), int(lim.hi)) if lim.whole else (lim.lo, lim.hi)
    if lim.whole:
        ok = isinstance(value, int) and not isinstance(value, bool) and lo <= value <= hi
        if ok and value % lim.multiple == 0:
            return value
        kind = f"a multiple of {lim.multiple}" if lim.multiple > 1 else "a whole number"
        raise ValueError(f"{name} must be {kind} between {lo} and {hi}, got {value!r}.")
    try:
        v = float(value)
    except (TypeError, ValueError, OverflowError):
        v = math.nan
    if isinstance(value, bool) or not math.isfinite(v) or not lo <= v <= hi:
        raise ValueError(f"{name} must be between {lo} and {hi}, got {value!r}.")
    return v


def clamp(key: str, value):
    """`value` brought into the limit's range (settings read from a file: a slider cannot show
    more); a value that is not a number gives the default."""
    lim = LIMITS[key]
    try:
        v = min(max(float(value), lim.lo), lim.hi)
    except (TypeError, ValueError, OverflowError):
        v = lim.default
    if not math.isfinite(v):
        v = lim.default
    return int(round(v / lim.multiple)) * lim.multiple if lim.whole else v
