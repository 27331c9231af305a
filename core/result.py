"""Result: what a job produced, with the plan it ran under and what happened on the way."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from core.job import Job
from core.plan.planner import Plan


@dataclass(frozen=True)
class Result:
    image: Image.Image
    job: Job
    plan: Plan
    report: dict  # memory monitor: peaks, seconds per phase, timeline
    events: tuple[str, ...]  # what the engine did that a user should know
    controls: tuple[Image.Image, ...] = field(default=(), repr=False)
    demo: bool = False

    def summary(self) -> dict:
        s = dict(
            size=list(self.image.size),
            tier=self.plan.tier,
            demo=self.demo,
            predicted_peak_gb=self.plan.predicted_peak_gb,
            measured_peak_reserved_gb=self.report["peak_reserved_gb"],
            phase_peaks_gb=phase_peaks(self.report),
            seconds=self.report["seconds"],
            events=list(self.events),
            plan=self.plan.summary(),
            fast=self.report.get("fast"),
        )
        if self.demo:
            s["note"] = "demo model with random weights: the image is noise"
        return s

    def png_params(self) -> dict:
        """What the PNG's metadata holds: every parameter of the job and the plan."""
        return dict(job=self.job.describe(), plan=self.plan.summary(), demo=self.demo)


def phase_peaks(report: dict) -> dict[str, float]:
    """Measured peak reserved GiB of each phase name (the highest where a phase ran more than once)."""
    out: dict[str, float] = {}
    for ph in report.get("phases", ()):
        out[ph["name"]] = max(out.get(ph["name"], 0.0), ph["peak_reserved_gb"])
    return out


def is_black_or_nan(image: Image.Image) -> bool:
    """NaN latents decode to black; a result with (almost) no signal is a precision fault."""
    return bool(np.asarray(image).max() <= 3)
