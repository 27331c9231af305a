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
    assert zerogpu.MIN_S <= seen["duration"] <= zerogpu.MAX_S


def test_missing_spaces_package_is_a_no_op(monkeypatch, demo_engine):
    monkeypatch.setenv("SPACES_ZERO_GPU", "true")
    monkeypatch.setitem(sys.modules, "spaces", None)  # import spaces → ImportError
    assert zerogpu.gpu_wrap(run, demo_engine) is run
