"""ZeroGPU on Hugging Face Spaces: the GPU work is wrapped in `spaces.GPU(duration=...)` there, with
the duration estimated from the plan; everywhere else the function is returned unchanged.
`spaces` is never a requirement: it exists only on Spaces.

On ZeroGPU the job runs in the GPU worker process, so only the Job (picklable) goes there: the
progress and cancel callbacks stay behind (Gradio's own cancel still drops the event)."""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)

MIN_S, MAX_S, MARGIN_S = 30, 300, 20


def on_zerogpu() -> bool:
    return bool(os.environ.get("SPACES_ZERO_GPU"))


def estimate_seconds(engine, job) -> int:
    """The plan's predicted denoising seconds for the whole job (upscale stages and tiles
    included, core.plan.planner.job_seconds), with a margin, within what ZeroGPU allows."""
    try:
        plan = engine.plan(job)
    except Exception:  # noqa: BLE001 - a bad job fails in the run with its own sentence
        return MIN_S * 2
    return int(min(MAX_S, max(MIN_S, 1.5 * plan.predicted_job_s + MARGIN_S)))


def gpu_wrap(fn, engine):
    """fn(job, progress, cancel) → Result, unchanged off ZeroGPU; on ZeroGPU engine.run(job) inside
    spaces.GPU."""
    if not on_zerogpu():
        return fn
    try:
        import spaces  # type: ignore[import-not-found]
    except ImportError:
        log.warning("SPACES_ZERO_GPU is set but the 'spaces' package is missing: running without it")
        return fn

    @spaces.GPU(duration=lambda job: estimate_seconds(engine, job))
    def run_on_gpu(job):
        return engine.run(job)

    def call(job, progress=None, cancel=None):
        return run_on_gpu(job)

    return call
