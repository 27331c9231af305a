"""Failures at the worst moments (an arena allocated and the ring not yet, mid-denoise after k steps,
in decode, in an upscale tile, a host buffer that cannot be pinned), through the whole engine on the
CPU with a streamed placement: after each recovery the engine holds what a fresh one holds, and the
image equals a fresh run of the plan that completed, pixel for pixel."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from core.attempts import Failure, Retry, next_attempt
from core.engine import Faults, OutOfMemory
from core.job import ControlSpec, Job
from core.plan.placement import Placement
from core.stream.packs import registered_bytes


def px(image):
    return np.asarray(image)


@pytest.fixture()
def streamed(demo_engine, monkeypatch):
    """The demo engine with every job planned as a mix of resident, fp8 and streamed units (on the
    CPU: the same residency, packs, ring and schedule a GPU plan uses)."""
    real = demo_engine.plan

    def plan(job, tier=None, dtype=None):
        p = real(job, tier, dtype)
        n = len(p.placement.units)
        codes = ("BSQF" * n)[:n]
        return replace(p, placement=Placement(codes, p.dtype, "cpu", slots=2, ring=4))

    monkeypatch.setattr(demo_engine, "plan", plan)
    yield demo_engine
    demo_engine.faults = Faults()
    monkeypatch.undo()
    demo_engine.release()


def job_of(astronaut, **kw):
    return Job("an astronaut", astronaut, (ControlSpec("canny"),), 64, 64, steps=3, seed=4, tier="cpu", **kw)


def fresh(engine):
    """What a fresh engine holds: nothing placed, no residency, no host memory registered."""
    return engine.state.residency is None and engine.state.placed is None and registered_bytes() == 0


@pytest.mark.parametrize(
    "fault",
    [dict(arenas=1), dict(step=(2, 1)), dict(decode=1), dict(load=1)],
    ids=["after-the-arenas", "after-2-steps", "in-decode", "in-load"],
)
def test_a_failure_mid_attempt_recovers_to_a_fresh_run(streamed, astronaut, fault):
    job = job_of(astronaut)
    clean = streamed.run(job)
    streamed.release()
    assert fresh(streamed)
    streamed.faults = Faults(**fault)
    got = streamed.run(job)
    assert any("stepped down" in e for e in got.events), got.events
    assert px(got.image).shape == px(clean.image).shape
    assert np.array_equal(px(got.image), px(clean.image))  # one tile either way: the same plan ran
    streamed.release()
    assert fresh(streamed)


def test_a_failure_in_an_upscale_tile_recovers(streamed, astronaut, monkeypatch):
    inner = streamed.plan  # upscale in 64 px tiles
    monkeypatch.setattr(
        streamed, "plan", lambda job, tier=None, dtype=None: replace(inner(job, tier, dtype), upscale_tile=64)
    )
    job = job_of(astronaut, upscale=2.0, upscale_steps=1)
    clean = streamed.run(job)
    streamed.release()
    streamed.faults = Faults(tile=(3, 1))  # the 4th tile pass of the upscale stage
    got = streamed.run(job)
    assert any("stepped down" in e for e in got.events), got.events
    assert got.image.size == clean.image.size == job.out_size
    assert any("25 tiles" in e for e in clean.events), clean.events  # the fault hit the 4th of them
    streamed.release()
    assert fresh(streamed)


def test_a_host_buffer_that_cannot_be_pinned_ends_in_one_sentence(streamed, astronaut):
    streamed.faults = Faults(pin=5)
    with pytest.raises(OutOfMemory, match="host RAM") as info:
        streamed.run(job_of(astronaut))
    assert "\n" not in str(info.value)
    assert fresh(streamed)
    streamed.faults = Faults()
    assert streamed.run(job_of(astronaut)).image.size == (64, 64)  # and the next job runs


def test_a_failed_residency_leaves_the_weights_as_they_were(demo_engine):
    import torch

    from core.monitor import faults_active
    from core.plan.units import denoiser_units
    from core.stream.residency import Residency

    units = denoiser_units(demo_engine.pipe.transformer, demo_engine.pipe.controlnet.nets[0])[:6]
    before = [[p.detach().clone() for p in m.parameters()] for _, m in units]
    with faults_active(Faults(arenas=1).check), pytest.raises(torch.OutOfMemoryError):
        Residency(units, "SSQQBB", torch.device("cpu"), torch.float32, slots=2, ring=4)
    after = [[p.detach() for p in m.parameters()] for _, m in units]
    assert all(torch.equal(a, b) for pa, pb in zip(before, after) for a, b in zip(pa, pb))
    assert registered_bytes() == 0


# -- the policy itself ---------------------------------------------------------------------------
class P:
    def __init__(self, tier="8", dtype="bfloat16", device="cuda", host=12.0, tile=0):
        self.tier, self.dtype, self.device, self.host_ram_gb, self.tile = tier, dtype, device, host, tile


def test_policy_host_failure_asks_for_less_host_ram_then_gives_up():
    lean = P(host=6.0)
    d = next_attempt(Failure("host", "load", "no RAM"), P(), lambda p: None, lambda p: lean, lambda: None)
    assert isinstance(d, Retry) and d.plan is lean and "6.0 GiB" in d.event and "12.0 GiB" in d.event
    d = next_attempt(Failure("host", "load", "no RAM"), P(), lambda p: P("6"), lambda p: None, lambda: None)
    assert isinstance(d, str) and "host RAM" in d and "larger tier" in d


def test_policy_gpu_failure_steps_down_black_goes_to_float32():
    small = P("6")
    d = next_attempt(Failure("gpu", "denoise", "OOM"), P(), lambda p: small, lambda p: None, lambda: None)
    assert isinstance(d, Retry) and d.plan is small and "in denoise" in d.event
    assert "smallest plan" in next_attempt(Failure("gpu"), P(), lambda p: None, lambda p: None, lambda: None)
    f32 = P(dtype="float32")
    d = next_attempt(Failure("black"), P(), lambda p: None, lambda p: None, lambda: f32)
    assert isinstance(d, Retry) and d.plan is f32
    assert "even in float32" in next_attempt(Failure("black"), f32, lambda p: None, lambda p: None, lambda: f32)


def test_weights_rounded_by_a_failed_fp8_attempt_are_reloaded_for_an_exact_one(demo_engine, astronaut, monkeypatch):
    """An attempt that stored units in fp8 and then ran out of memory leaves its rounding in the CPU
    weights; the next plan keeps those units exact, so they must come from the source again."""
    import core.engine as engine_mod

    job = job_of(astronaut)
    exact = demo_engine.plan(job)  # the CPU plan: every unit resident, exact
    clean = demo_engine.run(job)
    n = len(exact.placement.units)
    fp8 = replace(exact, placement=Placement("Q" * n, exact.dtype, "cpu", slots=2, ring=4))
    monkeypatch.setattr(demo_engine, "plan", lambda job, tier=None, dtype=None: fp8)
    monkeypatch.setattr(engine_mod, "step_down", lambda plan, *a: exact)
    demo_engine.faults = Faults(step=(1, 1))
    try:
        got = demo_engine.run(job)
    finally:
        demo_engine.faults = Faults()
        monkeypatch.undo()
    assert any("stepped down" in e for e in got.events), got.events
    assert got.plan.placement == exact.placement
    assert np.array_equal(px(got.image), px(clean.image))


def test_faults_let_k_passes_through_first():
    import torch

    f = Faults(step=(2, 1), pin=1)
    f.check("step")
    f.check("step")
    with pytest.raises(torch.OutOfMemoryError):
        f.check("step")
    f.check("step")
    from core.monitor import HostOutOfMemory

    with pytest.raises(HostOutOfMemory):
        f.check("pin")
    assert f.counts == {"step": 0, "pin": 0} and f.skips == {"step": 0, "pin": 0}
