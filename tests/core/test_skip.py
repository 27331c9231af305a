"""Skipping idle ControlNet passes changes no pixel and saves the passes."""

import torch

from core.denoise.generate import control_args
from core.denoise.skip import skip_idle_controls
from core.job import ControlSpec, Job


def run(pipe, job, controls, skip):
    kw = dict(
        prompt="an astronaut",
        control_image=controls,
        height=job.height,
        width=job.width,
        num_inference_steps=job.steps,
        guidance_scale=3.5,
        output_type="np",
        generator=torch.Generator("cpu").manual_seed(1),
        max_sequence_length=64,
        **control_args(pipe, job.controls),
    )
    if not skip:
        return pipe(**kw).images, None
    with skip_idle_controls(pipe) as stats:
        return pipe(**kw).images, stats


def test_skipping_idle_controls_is_exact_and_saves_passes(demo_engine, astronaut):
    pipe = demo_engine.pipe
    demo_engine.apply(demo_engine.plan(Job("x", astronaut, (ControlSpec("canny"),), 64, 64, tier="cpu")))
    specs = (ControlSpec("canny", 0.7, start=0.0, end=0.5), ControlSpec("gray", 0.5, start=0.25, end=1.0))
    job = Job("an astronaut", astronaut, specs, 64, 64, steps=4, tier="cpu")
    img = astronaut.resize((64, 64))
    from preprocessors.registry import preprocess

    controls = [preprocess("canny", img), preprocess("gray", img)]
    ref, _ = run(pipe, job, controls, skip=False)
    got, stats = run(pipe, job, controls, skip=True)
    assert (got == ref).all()
    # 4 steps × 2 controls = 8 passes; canny idles in steps 3-4, gray in step 1
    assert stats == {"ran": 5, "skipped": 3}
    assert "forward" not in pipe.controlnet.__dict__  # restored
