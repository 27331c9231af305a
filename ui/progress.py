"""What the result panel says while a job runs: phase, step k/N, tile, an ETA and the latest preview.

`Tracker` is the engine's progress callable (it opts in to phases and previews, see core.denoise.runtime.s
Progress) and is read by the UI's polling loop: thread-safe, no Gradio. The ETA counts the job's
denoising work in units of one generation step: an upscale step weighs its tiles' pixels relative to
the generation pass. Before the first step it uses the plan's time model (predicted_step_s); once
steps are done it uses their measured pace, which also covers machines the model does not know.
"""

from __future__ import annotations

import html
import threading
import time
from dataclasses import dataclass

from PIL import Image

from core.job import Job

PREVIEW_EVERY = 2  # steps between live previews


def upscale_work(job: Job, tile: int) -> list[tuple[str, int, float]]:
    """(label prefix, steps, weight per step) for each upscale stage, as core.denoise.upscale splits it."""
    from core.plan.planner import UPSCALE_TILE, n_tiles
    from core.plan.stages import stage_sizes, stage_steps

    sizes = stage_sizes(job.width, job.height, job.upscale)
    out = []
    for k, (w, h) in enumerate(sizes, 1):
        t = tile or UPSCALE_TILE
        n = n_tiles(w, h, t, 128)
        weight = n * min(t, w) * min(t, h) / (job.width * job.height)
        out.append((f"upscale {k}/{len(sizes)}", stage_steps(job.steps, job.upscale_steps) + 1, weight))
    return out


@dataclass(frozen=True)
class Snapshot:
    phase: str  # a sentence: "Denoising", "Decoding (VAE)", ...
    step: tuple[int, int] | None  # (done, total) of the current pass
    tile: tuple[int, int] | None
    eta_s: float | None
    elapsed_s: float
    fraction: float  # of the job's denoising work
    version: int  # bumps on every change
    preview_version: int


def phase_text(label: str) -> str:
    if label == "encode":
        return "Encoding the prompt"
    if label == "decode":
        return "Decoding the image (VAE)"
    if label == "generate":
        return "Denoising"
    if label.startswith("upscale"):
        stage = label.split(":")[0].replace("upscale", "Upscale stage", 1)
        return f"{stage}: decoding" if label.endswith(": decode") else stage
    return label[:1].upper() + label[1:]


class Tracker:
    """progress(label, done, total, preview=None), from the engine's thread; snapshot() from the UI's."""

    phases = True
    preview_every = PREVIEW_EVERY

    def __init__(self, job: Job, predicted_step_s: float = 0.0, upscale_tile: int = 1024, clock=time.monotonic):
        self.clock, self.started = clock, clock()
        self.predicted = max(0.0, float(predicted_step_s or 0.0))
        self.passes = [("generate", job.steps, 1.0)] + upscale_work(job, upscale_tile)
        self.total_units = sum(n * w for _, n, w in self.passes)
        self._lock = threading.Lock()
        self.label, self.step, self.tile = "Loading the model and planning", None, None
        self.units_done, self.pass_index = 0.0, 0
        self.pace_start: float | None = None  # clock and units when the first pass's first step began
        self.pace_units = 0.0
        self.version = self.preview_version = 0
        self.preview: Image.Image | None = None

    def _pass(self, label: str) -> int:
        for i, (prefix, _, _) in enumerate(self.passes):
            if label.startswith(prefix):
                return i
        return self.pass_index

    def __call__(self, label: str, done: int, total: int, preview: Image.Image | None = None) -> None:
        with self._lock:
            self.version += 1
            if preview is not None:
                self.preview, self.preview_version = preview, self.preview_version + 1
            if label.endswith(": tile"):
                self.tile = (done, total)
                return
            if label in ("encode", "decode") or label.endswith(": decode"):
                self.label, self.tile = label, None
                return
            i = self._pass(label)
            if i != self.pass_index or self.step is None or done == 0:
                # a pass starts: its real step count replaces the estimate
                prefix, _, weight = self.passes[i]
                self.passes[i] = (prefix, total, weight)
                self.total_units = sum(n * w for _, n, w in self.passes)
            self.pass_index, self.label, self.step = i, label, (done, total)
            if done == 0:
                self.tile = None
            before = sum(n * w for _, n, w in self.passes[:i])
            self.units_done = before + done * self.passes[i][2]
            if done == 0 and self.pace_start is None:
                self.pace_start, self.pace_units = self.clock(), self.units_done

    def snapshot(self) -> Snapshot:
        with self._lock:
            now = self.clock()
            left = max(0.0, self.total_units - self.units_done)
            eta = None
            if self.pace_start is not None and self.units_done > self.pace_units:
                eta = left * (now - self.pace_start) / (self.units_done - self.pace_units)
            elif self.predicted > 0:
                eta = left * self.predicted
            frac = self.units_done / self.total_units if self.total_units else 0.0
            return Snapshot(
                phase_text(self.label),
                self.step,
                self.tile,
                eta,
                now - self.started,
                min(1.0, frac),
                self.version,
                self.preview_version,
            )

    def latest_preview(self) -> Image.Image | None:
        with self._lock:
            return self.preview


def _eta(s: float) -> str:
    return f"about {s:.0f} s left" if s < 90 else f"about {s / 60:.0f} min left"


def status_html(kind: str, text: str = "", snap: Snapshot | None = None) -> str:
    """The status bar over the result. kind: idle, queued, running, cancelling, cancelled, error, done."""
    parts = [html.escape(text)] if text else []
    bar = ""
    if snap is not None:
        parts = [f"<b>{html.escape(snap.phase)}</b>"]
        if snap.step is not None and snap.phase.startswith(("Denoising", "Upscale")) and "decoding" not in snap.phase:
            parts.append(f"step {snap.step[0]}/{snap.step[1]}")
        if snap.tile is not None:
            parts.append(f"tile {snap.tile[0]}/{snap.tile[1]}")
        parts.append(_eta(snap.eta_s) if snap.eta_s is not None else "ETA after the first step")
        parts.append(f"{snap.elapsed_s:.1f} s elapsed")
        if text:
            parts.append(html.escape(text))
        bar = f'<div class="bar"><div style="width:{100 * snap.fraction:.1f}%"></div></div>'
    return f'<div class="status status-{kind}" role="status" aria-live="polite">{" · ".join(parts)}{bar}</div>'
