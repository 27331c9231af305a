"""ZeroGPU on Hugging Face Spaces: the GPU function is wrapped in `spaces.GPU(duration=...)` there,
with the duration estimated from the plan; everywhere else the function is returned unchanged.
`spaces` is never a requirement: it exists only on Spaces."""
from __future__ import annotations

import logging
import math
import os

log = logging.getLogger(__name__)

MIN_S, MAX_S, MARGIN_S = 30, 300, 20


def on_zerogpu() -> bool:
    return bool(os.environ.get("SPACES_ZERO_GPU"))


def estimate_seconds(engine, job) -> int:
    """Predicted seconds per step × steps (upscale stages included), plus loading and a margin."""
    try:
        step_s = engine.plan(job).predicted_step_s
    except Exception:  # noqa: BLE001 - a bad job fails in the run with its own sentence
        return MIN_S * 2
    stages = math.ceil(math.log2(job.upscale)) if job.upscale > 1 else 0
    up_steps = job.upscale_steps or max(4, min(10, job.steps // 3))
    tiles = max(1, round(job.upscale ** 2))
    total = step_s * (job.steps + stages * up_steps * tiles)
    return int(min(MAX_S, max(MIN_S, 1.5 * total + MARGIN_S)))


def gpu_wrap(fn, engine):
    """fn(job, progress, cancel) → Result; wrapped by spaces.GPU on ZeroGPU only."""
    if not on_zerogpu():
        return fn
    try:
        import spaces  # type: ignore[import-not-found]
    except ImportError:
        log.warning("SPACES_ZERO_GPU is set but the 'spaces' package is missing: running without it")
        return fn
    return spaces.GPU(duration=lambda job, *a, **k: estimate_seconds(engine, job))(fn)
