"""The upscale schedule as numbers: stages of at most 2×, their sizes and their steps (pure; the
planner counts their tiles, core.denoise.upscale runs them)."""

from __future__ import annotations

import math

from core.job import out_size


def stage_factors(factor: float) -> list[float]:
    """Stages of at most 2×: 4 → [2, 2]; 3 → [2, 1.5]; 1.5 → [1.5]; 1 → []."""
    if factor <= 1.0 + 1e-6:
        return []
    n = math.ceil(math.log(factor, 2) - 1e-9)
    out, left = [], factor
    for _ in range(n - 1):
        out.append(2.0)
        left /= 2.0
    out.append(left)  # halving is exact in floating point: the stages multiply back to `factor`
    return out


def stage_steps(steps: int, upscale_steps: int | None) -> int:
    """Denoising steps of each upscale stage: the job's own, or a third of its steps (4 to 10)."""
    return upscale_steps or max(4, min(10, steps // 3))


def stage_sizes(width: int, height: int, factor: float) -> list[tuple[int, int]]:
    """Pixel size after each stage; the last one is the job's output size."""
    sizes, f = [], 1.0
    for s in stage_factors(factor):
        f *= s
        sizes.append(out_size(width, height, f))
    return sizes
