"""The engine on the tiny random-weight demo model (CPU): sizes, determinism, controls, the Pro-2.0
ControlNet, out-of-memory recovery (injected), errors, cancelling, and the memory report."""

import json
import threading

import numpy as np
import pytest
import torch
from PIL import Image

from core.denoise.runtime import JobCancelled, PromptCache
from core.engine import Engine, Faults, OutOfMemory
from core.job import ControlSpec, Job
from core.models import ModelSpec
from core.plan.planner import JobShape, step_down

W, H = 128, 96


def px(image):
    return np.asarray(image, dtype=np.int16)


@pytest.fixture(scope="module")
def job(astronaut):
    # tier "cpu": the same plan on any machine ("auto" is checked on its own below)
    return Job("an astronaut portrait, detailed", astronaut, (ControlSpec("canny"),), W, H, steps=2, seed=7, tier="cpu")


@pytest.fixture(scope="module")
def reference(demo_engine, job):
    return demo_engine.run(job)


def test_run_returns_an_image_of_the_job_size(reference, job):
    img = reference.image
    assert isinstance(img, Image.Image) and img.mode == "RGB" and img.size == (W, H)
    a = px(img)
    assert a.std() > 1, "the demo model's output is noise, not a flat image"
    assert reference.job is job and reference.demo
    assert reference.plan.device == "cpu" and reference.plan.tier == "cpu"
    assert [c.size for c in reference.controls] == [(W, H)]
    assert not any("memory" in e or "black" in e for e in reference.events), reference.events


def test_same_seed_gives_identical_pixels(demo_engine, job, reference):
    again = demo_engine.run(job)
    assert np.array_equal(px(again.image), px(reference.image))


def test_different_seed_gives_a_different_image(demo_engine, job, reference):
    other = demo_engine.run(job.with_(seed=8))
    assert other.image.size == (W, H)
    assert np.abs(px(other.image) - px(reference.image)).mean() > 5


def test_different_prompt_gives_a_different_image(demo_engine, job, reference):
    other = demo_engine.run(job.with_(prompt="a cup of coffee on a mat"))
    assert np.abs(px(other.image) - px(reference.image)).mean() > 1


def test_two_controls_differ_from_one(demo_engine, job, reference):
    two = demo_engine.run(job.with_(controls=(ControlSpec("canny", 0.7), ControlSpec("depth", 1.5))))
    assert two.image.size == (W, H) and len(two.controls) == 2
    assert np.abs(px(two.image) - px(reference.image)).mean() > 1
    # the scale matters too
    scaled = demo_engine.run(job.with_(controls=(ControlSpec("canny", 0.7), ControlSpec("depth", 0.2))))
    assert np.abs(px(two.image) - px(scaled.image)).mean() > 1


def test_control_scale_changes_the_image(demo_engine, job, reference):
    off = demo_engine.run(job.with_(controls=(ControlSpec("canny", 0.0),)))
    strong = demo_engine.run(job.with_(controls=(ControlSpec("canny", 2.0),)))
    assert np.abs(px(off.image) - px(strong.image)).mean() > 1


@pytest.fixture(scope="module")
def pro2_engine():
    engine = Engine(ModelSpec.demo_spec(pro2=True))
    engine.load()
    return engine


def test_pro2_controlnet_runs_canny(pro2_engine, job):
    from core.models import has_mode_ids

    assert not has_mode_ids(pro2_engine.pipe)
    r = pro2_engine.run(job)
    assert r.image.size == (W, H) and px(r.image).std() > 1
    r2 = pro2_engine.run(job.with_(controls=(ControlSpec("canny"), ControlSpec("gray"))))
    assert r2.image.size == (W, H)
    r3 = pro2_engine.run(job.with_(controls=(ControlSpec("pose"), ControlSpec("softedge"))))  # on its card
    assert r3.image.size == (W, H) and [c.size for c in r3.controls] == [(W, H), (W, H)]


@pytest.mark.parametrize("kinds", [("tile",), ("canny", "blur")])
def test_pro2_controlnet_rejects_modes_it_lacks(pro2_engine, job, kinds):
    with pytest.raises(ValueError) as info:
        pro2_engine.run(job.with_(controls=tuple(ControlSpec(k) for k in kinds)))
    msg = str(info.value)
    assert kinds[-1] in msg and "support" in msg and "canny" not in msg.split(":")[-1]
    assert pro2_engine.run(job).image.size == (W, H)  # still usable


def test_injected_oom_steps_down_and_recovers(demo_engine, job, reference, monkeypatch):
    monkeypatch.setattr(demo_engine, "faults", Faults(denoise=1))
    r = demo_engine.run(job)
    assert r.image.size == (W, H)
    assert demo_engine.faults.counts["denoise"] == 0
    oom = [e for e in r.events if "out of memory" in e]
    assert len(oom) == 1 and "stepped down" in oom[0], r.events
    assert "denoise" in oom[0], "the event says in which phase memory ran out"
    assert r.plan.tile > 0, "the retry ran with the smaller plan"
    # a 128 px image fits in any step-down tile: the retry computes exactly the reference image
    assert np.array_equal(px(r.image), px(reference.image))


def test_endless_oom_raises_out_of_memory(demo_engine, job, reference, monkeypatch):
    monkeypatch.setattr(demo_engine, "faults", Faults(denoise=100))
    with pytest.raises(OutOfMemory) as info:
        demo_engine.run(job)
    msg = str(info.value)
    assert "\n" not in msg and msg.endswith(".") and "memory" in msg and "smallest" in msg
    # it tried the plan and every step-down, no more
    shape = JobShape(W, H, 1)
    plan, tries = demo_engine.plan(job), 0
    while plan is not None:
        plan, tries = step_down(plan, shape, demo_engine.sizes, demo_engine.device), tries + 1
    assert 100 - demo_engine.faults.counts["denoise"] == tries
    monkeypatch.setattr(demo_engine, "faults", Faults())
    assert np.array_equal(px(demo_engine.run(job).image), px(reference.image))


def test_out_of_memory_on_the_cpu_does_not_advise_the_cpu_tier(demo_engine, job, monkeypatch):
    monkeypatch.setattr(demo_engine, "faults", Faults(denoise=100))
    with pytest.raises(OutOfMemory) as info:
        demo_engine.run(job)
    assert "GPU" not in str(info.value) and "CPU tier" not in str(info.value)


def test_a_non_oom_error_is_raised_once_and_the_next_job_succeeds(demo_engine, job, reference):
    tr = demo_engine.pipe.transformer
    calls = []

    def boom(*args, **kwargs):
        calls.append(1)
        raise RuntimeError("boom: a bug somewhere in the model")

    tr.forward = boom
    try:
        with pytest.raises(RuntimeError, match="boom") as info:
            demo_engine.run(job)
        assert not isinstance(info.value, OutOfMemory)
        assert len(calls) == 1, "only out-of-memory is retried"
    finally:
        del tr.forward
    assert np.array_equal(px(demo_engine.run(job).image), px(reference.image))


def test_an_error_inside_tiled_denoising_restores_the_pipeline(demo_engine, job, reference):
    from core.denoise.generate import control_images, generate_pass
    from core.denoise.runtime import Runtime

    pipe = demo_engine.pipe
    forwards = (type(pipe.transformer).forward, type(pipe.controlnet).forward)

    def progress(label, i, n):
        raise RuntimeError("a bug in a progress callback")

    rt = Runtime(pipe, torch.device("cpu"), demo_engine.max_seq, 64, 32, progress=progress)
    image = job.image.resize((W, H))
    events = rt.events
    with pytest.raises(RuntimeError, match="progress callback"):
        generate_pass(job, image, control_images(job, image, True), rt)
    assert any("fused tiles" in e for e in events), "the pass did run in tiles"
    assert "forward" not in pipe.transformer.__dict__ and "forward" not in pipe.controlnet.__dict__
    assert (type(pipe.transformer).forward, type(pipe.controlnet).forward) == forwards
    assert np.array_equal(px(demo_engine.run(job).image), px(reference.image))


def test_cancel_raises_job_cancelled_and_the_next_job_succeeds(demo_engine, job, reference):
    seen = []
    with pytest.raises(JobCancelled):
        demo_engine.run(job.with_(steps=4), progress=lambda *a: seen.append(a), cancel=lambda: True)
    assert seen in ([], [("generate", 1, 4)]), "cancelled at the end of the first step"
    r = demo_engine.run(job, progress=lambda *a: seen.append(a), cancel=lambda: False)
    assert np.array_equal(px(r.image), px(reference.image))
    assert seen[1:] == [("generate", 1, 2), ("generate", 2, 2)]


def test_the_report_has_phase_seconds_and_a_timeline(reference):
    rep = reference.report
    assert rep["device"] == "cpu"
    for phase in ("load", "preprocess", "encode", "denoise", "decode"):
        assert rep["seconds"][phase] >= 0, phase
    assert rep["seconds"]["denoise"] > 0
    names = [p["name"] for p in rep["phases"]]
    assert names.index("encode") < names.index("denoise") < names.index("decode")
    tl = rep["timeline"]
    assert len(tl) >= 2 * len(names)
    times = [t for t, _, _ in tl]
    assert times == sorted(times) and all(gb > 0 for _, gb, _ in tl)
    assert {label for _, _, label in tl} >= set(names)
    assert rep["peak_reserved_gb"] >= max(gb for _, gb, _ in tl) - 0.5
    s = reference.summary()
    assert s["size"] == [W, H] and s["seconds"] == rep["seconds"] and s["tier"] == "cpu"
    json.dumps(s)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
@pytest.mark.parametrize("tier", ["8", "48", "4"])
def test_gpu_tier_without_a_gpu_is_refused(demo_engine, job, tier):
    with pytest.raises(ValueError) as info:
        demo_engine.run(job.with_(tier=tier))
    msg = str(info.value)
    assert msg.startswith("No CUDA GPU") and tier in msg and "auto" in msg


def test_auto_tier_on_a_cpu_machine_plans_the_cpu(demo_engine, job):
    if demo_engine.device.kind == "cuda":
        pytest.skip("a CUDA machine plans a GPU tier")
    assert demo_engine.plan(job.with_(tier="auto")).tier == "cpu"
    r = demo_engine.run(job.with_(tier="auto"))
    assert r.plan.tier == "cpu" and r.image.size == (W, H)
    assert demo_engine.plan(job, tier="8").device == "cuda"  # planning alone is allowed


def test_concurrent_runs_are_serialised_and_deterministic(demo_engine, job, reference):
    out = [None, None]

    def go(i):
        out[i] = demo_engine.run(job).image

    threads = [threading.Thread(target=go, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for img in out:
        assert img is not None and np.array_equal(px(img), px(reference.image))


def test_prompt_cache_encodes_each_prompt_once_and_stays_bounded():
    class Enc:
        dtype = torch.float32

    class FakePipe:
        text_encoder_2 = Enc()
        calls = 0

        def encode_prompt(self, prompt, prompt_2, device, max_sequence_length):
            FakePipe.calls += 1
            return torch.full((1, 3, 4), float(len(prompt))), torch.zeros(1, 4), None

    pipe, cache = FakePipe(), PromptCache(size=2)
    a1, _ = cache.get(pipe, "a", torch.device("cpu"), 8)
    a2, _ = cache.get(pipe, "a", torch.device("cpu"), 8)
    assert FakePipe.calls == 1 and torch.equal(a1, a2)
    cache.get(pipe, "bb", torch.device("cpu"), 8)
    cache.get(pipe, "a", torch.device("cpu"), 16)  # another sequence length is another entry
    assert FakePipe.calls == 3 and len(cache.data) == 2
    cache.get(pipe, "bb", torch.device("cpu"), 8)
    assert FakePipe.calls == 3  # recently used: kept
    cache.get(pipe, "a", torch.device("cpu"), 8)
    assert FakePipe.calls == 4  # evicted earlier: encoded again
    cache.get(pipe, "a", torch.device("cpu"), 8, "fp8 (streamed)")
    assert FakePipe.calls == 5  # T5 stored otherwise gives other embeddings: not reused


def test_faults_count_down():
    f = Faults(denoise=2)
    for _ in range(2):
        with pytest.raises(torch.OutOfMemoryError):
            f.check("denoise")
    f.check("denoise")
    f.check("decode")
    assert f.counts == {"denoise": 0}


def test_a_pose_control_without_people_runs_with_a_note(demo_engine, astronaut, monkeypatch):
    import importlib

    pose_module = importlib.import_module("preprocessors.pose")
    monkeypatch.setattr(pose_module, "PERSON_SCORE", 1.0)  # the detector finds nobody
    job = Job("a person", astronaut, (ControlSpec("pose"),), W, H, steps=1, seed=1, tier="cpu")
    r = demo_engine.run(job)
    assert r.image.size == (W, H) and np.asarray(r.controls[0]).max() == 0
    assert pose_module.NO_PEOPLE in r.events, r.events


def test_soft_edge_on_a_union_with_mode_ids_says_it_ran_as_canny(demo_engine, job):
    res = demo_engine.run(job.with_(controls=(ControlSpec("softedge"),), steps=1))
    assert any("soft edge ran as the canny mode" in e for e in res.events), res.events
    plain = demo_engine.run(job.with_(steps=1))
    assert not any("soft edge" in e for e in plain.events)


def test_the_plans_vae_tile_is_the_vaes(demo_engine, astronaut, monkeypatch):
    """A plan that tiles the VAE in 256 px tiles (where 512 do not fit) decodes in those tiles."""
    from dataclasses import replace

    real = demo_engine.plan
    monkeypatch.setattr(
        demo_engine,
        "plan",
        lambda job, tier=None, dtype=None: replace(real(job, tier, dtype), vae_tiling=True, vae_tile_px=256),
    )
    job = Job("x", astronaut, (ControlSpec("canny"),), 64, 64, steps=1, seed=1, tier="cpu")
    demo_engine.run(job)
    vae = demo_engine.state.pipe.vae
    assert vae.use_tiling and vae.tile_sample_min_size == 256 and vae.tile_latent_min_size == 32
    monkeypatch.undo()
    demo_engine.run(job)
    assert not demo_engine.state.pipe.vae.use_tiling
