"""ZeroGPU: spaces.GPU wraps the GPU function only where SPACES_ZERO_GPU is set and `spaces` imports."""

from __future__ import annotations

import sys
import types

from PIL import Image

from core.job import ControlSpec, Job
from ui import zerogpu


def run(job, progress, cancel):
    return "ran"


def test_no_op_elsewhere(monkeypatch, demo_engine):
    monkeypatch.delenv("SPACES_ZERO_GPU", raising=False)
    assert zerogpu.gpu_wrap(run, demo_engine) is run


def test_wrapped_on_zerogpu_with_a_duration_from_the_plan(monkeypatch, demo_engine):
    seen = {}
    monkeypatch.setattr(demo_engine, "run", lambda job: "ran")

    def GPU(duration):
        def deco(fn):
            def wrapped(*a, **k):
                seen["duration"] = duration(*a, **k)
                return fn(*a, **k)

            return wrapped

        return deco

    monkeypatch.setenv("SPACES_ZERO_GPU", "true")
    monkeypatch.setitem(sys.modules, "spaces", types.SimpleNamespace(GPU=GPU))
    wrapped = zerogpu.gpu_wrap(run, demo_engine)
    assert wrapped is not run
    job = Job("a cat", Image.new("RGB", (64, 64)), (ControlSpec("canny"),), 64, 64, steps=2, upscale=2.0)
    assert wrapped(job, None, None) == "ran"
    assert seen["duration"] == zerogpu.estimate_seconds(demo_engine, job)


def test_duration_grows_with_steps_and_upscale():
    """On a GPU plan the duration follows the plan's predicted job seconds (not a clamp)."""
    from core.device import DeviceInfo
    from core.engine import shape_of
    from core.plan import plan_for
    from core.plan.sizes import sizes_from_config

    gpu, full = DeviceInfo("cuda", "nominal", 12, 12, True, 32.0), sizes_from_config("full")
    engine = types.SimpleNamespace(plan=lambda job: plan_for("8", shape_of(job), full, gpu))
    image = Image.new("RGB", (64, 64))

    def seconds(**kw):
        return zerogpu.estimate_seconds(engine, Job("a cat", image, (ControlSpec("canny"),), 768, 768, **kw))

    assert zerogpu.MIN_S < seconds(steps=16) < seconds(steps=32) < zerogpu.MAX_S
    assert seconds(steps=16) < seconds(steps=16, upscale=1.5) < zerogpu.MAX_S


def test_missing_spaces_package_is_a_no_op(monkeypatch, demo_engine):
    monkeypatch.setenv("SPACES_ZERO_GPU", "true")
    monkeypatch.setitem(sys.modules, "spaces", None)  # import spaces → ImportError
    assert zerogpu.gpu_wrap(run, demo_engine) is run
