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
from core.plan.planner import JobShape
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


# -- what a failure shows of the card: plans over it are not attempted again -----------------------
def test_the_failed_request_is_read_from_the_message():
    from core.attempts import requested_gb

    assert requested_gb("CUDA out of memory. Tried to allocate 108.00 MiB. GPU 0 has a total capacity") == 108 / 1024
    assert requested_gb("CUDA out of memory. Tried to allocate 1.50 GiB.") == 1.5
    assert requested_gb("CUDA error: resource already mapped") == 0.0


def test_a_failure_far_under_the_budget_is_a_limit_one_near_it_is_not():
    from core.attempts import DeviceLimit, learned_limit, limit_holds

    big = P("48")
    big.budget_gb = 46.68
    oom = Failure("gpu", "load", "CUDA out of memory.", requested_gb=0.1)
    assert learned_limit(big, oom, 23.4, 139.0) == DeviceLimit(23.5, 139.0, "48")
    fits = P("8")
    fits.budget_gb = 6.68  # ran out at its budget: the estimate was short, not the card
    assert learned_limit(fits, oom, 6.6, 139.0) is None
    assert learned_limit(big, Failure("host", "load", "no RAM"), 2.0, 139.0) is None
    cpu = P("cpu", device="cpu")
    cpu.budget_gb = 24.0
    assert learned_limit(cpu, oom, 1.0, 0.0) is None
    lim = DeviceLimit(23.5, 139.0, "48")
    assert limit_holds(lim, 139.2) and not limit_holds(lim, 140.0) and not limit_holds(None, 139.0)


@pytest.fixture()
def on_a_capped_h200(demo_engine, monkeypatch):
    """The demo engine planning for an H200 whose driver shows 139 GiB (an allocator cap is invisible)."""
    from core.device import DeviceInfo

    monkeypatch.setattr(demo_engine, "device", DeviceInfo("cuda", "H200", 139.8, 139.0, True, 120.0, 50.9, 780.0, 0.82))
    monkeypatch.setattr(demo_engine, "_visible_gb", lambda plan: 139.0)
    yield demo_engine
    demo_engine.limit = None


def test_later_jobs_start_under_what_the_gpu_gave(on_a_capped_h200, astronaut, monkeypatch):
    from core.attempts import DeviceLimit
    from core.plan.planner import plan_for

    engine, job = on_a_capped_h200, job_of(astronaut)
    p48 = plan_for("48", JobShape(1024, 1024), engine.sizes, engine.device)
    events = []
    assert engine._within_limit(p48, job, events) is p48 and events == []  # nothing learned yet
    engine.limit = DeviceLimit(23.5, 139.0, "48")
    got = engine._within_limit(p48, job, events)
    assert got.tier == "24" and got.budget_gb <= 23.5
    assert len(events) == 1 and "the 48 plan ran out of GPU memory earlier with 23.5 GiB" in events[0]
    assert "ran the 24 plan" in events[0] and "without trying the 48 one" in events[0]
    monkeypatch.setattr(engine, "_visible_gb", lambda plan: 141.0)  # another program let go of 2 GiB
    assert engine._within_limit(p48, job, []) is p48 and engine.limit is None


def test_a_retry_skips_the_plans_that_would_fail_the_same_way(on_a_capped_h200, astronaut):
    """24 GB asked on 11.5 GiB: not 16 (14.7 GiB budget) and then 12, but 12 at once."""
    from core.attempts import DeviceLimit
    from core.plan.planner import plan_for

    engine, job = on_a_capped_h200, job_of(astronaut)
    p24 = plan_for("24", JobShape(1024, 1024), engine.sizes, engine.device)
    assert engine._smaller(p24, job).tier == "16"  # no limit: one step
    engine.limit = DeviceLimit(11.5, 139.0, "24")
    assert engine._smaller(p24, job).tier == "12"


def test_a_cpu_failure_teaches_no_limit(streamed, astronaut):
    streamed.faults = Faults(arenas=1)
    assert any("stepped down" in e for e in streamed.run(job_of(astronaut)).events)
    assert streamed.limit is None


def test_weights_cast_down_by_one_plan_are_read_again_for_a_wider_one(demo_engine, astronaut, monkeypatch):
    """The demo weights are float32; a bfloat16 plan rounds them as it casts. A float32 plan after it
    reads them again, so the same job gives the same pixels as before (it did not: off by up to 2)."""
    import core.engine as engine_mod

    job = job_of(astronaut)
    clean = demo_engine.run(job)
    real = engine_mod.plan_for
    monkeypatch.setattr(engine_mod, "plan_for", lambda *a, **k: real(*a, **{**k, "dtype": "bfloat16"}))
    assert demo_engine.run(job).plan.dtype == "bfloat16"
    monkeypatch.undo()
    again = demo_engine.run(job)
    assert again.plan.dtype == "float32"
    assert np.array_equal(px(again.image), px(clean.image))


def test_an_out_of_memory_reason_names_the_allocation_and_other_reasons_end_at_a_word():
    from core.attempts import short_reason

    cuda = (
        "CUDA out of memory. Tried to allocate 108.00 MiB. GPU 0 has a total capacity of 139.80 GiB of which "
        "115.9 GiB is free. Process 7 has 23.5 GiB memory in use.\nsee the documentation"
    )
    assert short_reason(cuda) == "CUDA out of memory: tried to allocate 108.00 MiB"
    long = "cudaHostRegister failed " + "because the host " * 10
    out = short_reason(long, width=40)
    assert out.endswith(" ...") and len(out) <= 44 and long.startswith(out[:-4])
    assert short_reason("short\nsecond line") == "short"
