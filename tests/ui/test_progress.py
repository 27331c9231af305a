"""The result panel's progress: phases, step k/N, tiles and an ETA from the plan, then from the pace."""

from __future__ import annotations

from PIL import Image

from core.job import ControlSpec, Job
from ui.progress import Tracker, status_html


class Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


def job(**kw):
    return Job("a cat", Image.new("RGB", (64, 64)), (ControlSpec("canny"),), 512, 512, steps=10, **kw)


def test_eta_comes_from_the_plan_then_from_the_measured_pace():
    clock = Clock()
    t = Tracker(job(), predicted_step_s=0.5, clock=clock)
    assert t.phases and t.preview_every > 0  # opts in to phases and previews (core.denoise.runtime.Progress)
    snap = t.snapshot()
    assert snap.phase == "Loading the model and planning" and snap.eta_s == 5.0  # 10 steps × 0.5 s
    t("encode", 0, 1)
    assert t.snapshot().phase == "Encoding the prompt"
    t("generate", 0, 10)
    clock.t += 4.0
    t("generate", 4, 10)  # 1 s per step measured: the plan said 0.5
    snap = t.snapshot()
    assert snap.step == (4, 10) and snap.eta_s == 6.0 and abs(snap.fraction - 0.4) < 1e-9
    text = status_html("running", "", snap)
    assert "step 4/10" in text and "about 6 s left" in text and "Denoising" in text
    t("decode", 0, 1)
    assert t.snapshot().phase == "Decoding the image (VAE)"
    assert "step" not in status_html("running", "", t.snapshot())


def test_upscale_stages_and_tiles_count_in_the_eta():
    clock = Clock()
    t = Tracker(job(upscale=2.0), predicted_step_s=1.0, upscale_tile=512, clock=clock)
    # 10 generation steps, then one 2× stage: 3×3 overlapping tiles of 512², each as costly as a 512² step
    assert t.passes[1][2] == 9
    t("generate", 0, 10)
    clock.t += 10
    t("generate", 10, 10)
    t("upscale 1/1 to 1024×1024", 0, 5)  # the real step count replaces the estimate
    assert t.total_units == 10 + 5 * 9
    t("upscale 1/1 to 1024×1024: tile", 2, 9)
    snap = t.snapshot()
    assert snap.phase == "Upscale stage 1/1 to 1024×1024" and snap.tile == (2, 9)
    assert snap.eta_s == 45.0  # 5 steps × 9 tiles at the measured 1 s per unit
    assert "tile 2/9" in status_html("running", "", snap)
    t("upscale 1/1 to 1024×1024: decode", 0, 1)
    assert t.snapshot().phase == "Upscale stage 1/1 to 1024×1024: decoding"


def test_previews_are_kept_and_counted():
    t = Tracker(job(), clock=Clock())
    assert t.snapshot().eta_s is None  # no time model (CPU) and no step yet: no made-up number
    assert "ETA after the first step" in status_html("running", "", t.snapshot())
    img = Image.new("RGB", (8, 8))
    t("generate", 2, 10, preview=img)
    assert t.latest_preview() is img and t.snapshot().preview_version == 1
