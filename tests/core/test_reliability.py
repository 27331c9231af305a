"""Faults at every phase, precision faults and long runs on the demo engine (CPU)."""

import gc

import psutil
import pytest

import core.engine as engine_mod
from core.engine import Faults, is_black_or_nan
from core.job import ControlSpec, Job


def small_job(img, **kw):
    args = dict(
        prompt="an astronaut",
        image=img,
        controls=(ControlSpec("canny"),),
        width=64,
        height=64,
        steps=1,
        seed=3,
        tier="cpu",
    )
    args.update(kw)
    return Job(**args)


@pytest.mark.parametrize("phase", ["load", "encode", "denoise", "decode", "upscale1"])
def test_out_of_memory_in_any_phase_is_recovered(demo_engine, astronaut, phase):
    job = small_job(astronaut, upscale=1.5 if phase == "upscale1" else 1.0, upscale_steps=1)
    clean = demo_engine.run(job)
    demo_engine.faults = Faults(**{phase: 1})
    try:
        res = demo_engine.run(job)
    finally:
        demo_engine.faults = Faults()
    assert res.image.size == job.out_size
    assert any(f"in {phase}" in e and "stepped down" in e for e in res.events), res.events
    # the CPU plan steps down by tile; a 64 px image is one tile either way: same pixels
    assert list(res.image.getdata()) == list(clean.image.getdata())


def test_black_result_is_rerun_in_float32(demo_engine, astronaut, monkeypatch):
    real = engine_mod.plan_for
    monkeypatch.setattr(
        engine_mod, "plan_for", lambda *a, **k: real(*a, **{**k, "dtype": k.get("dtype") or "bfloat16"})
    )
    demo_engine.faults = Faults(black=1)
    try:
        res = demo_engine.run(small_job(astronaut))
    finally:
        demo_engine.faults = Faults()
        monkeypatch.undo()
        demo_engine.apply(demo_engine.plan(small_job(astronaut)))  # back to the float32 CPU plan
    assert res.plan.dtype == "float32"
    assert not is_black_or_nan(res.image)
    assert any("black" in e and "float32" in e for e in res.events)


def test_black_detection():
    from PIL import Image

    assert is_black_or_nan(Image.new("RGB", (8, 8)))
    assert not is_black_or_nan(Image.new("RGB", (8, 8), (0, 0, 40)))


def test_fifty_jobs_do_not_grow_process_memory(demo_engine, astronaut):
    job = small_job(astronaut)
    for i in range(5):  # warm-up: caches, allocator pools
        demo_engine.run(job.with_(seed=i))
    gc.collect()
    before = psutil.Process().memory_info().rss
    for i in range(50):
        demo_engine.run(job.with_(seed=i, prompt=f"an astronaut {i % 3}"))
    gc.collect()
    grown = (psutil.Process().memory_info().rss - before) / 2**20
    print(f"process memory grew by {grown:.1f} MiB over 50 jobs")
    assert grown < 64, f"process memory grew by {grown:.0f} MiB over 50 jobs"
