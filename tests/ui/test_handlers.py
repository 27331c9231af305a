"""ui.handlers without Gradio running: UI values → Job, bad values → the core's sentence, PNG settings."""

from __future__ import annotations

import random

import pytest
from PIL import Image

from core.device import DeviceInfo
from core.pngmeta import save_png
from ui import handlers as H

ROWS = [("canny", 0.7, 0.8), ("depth", 0.5, 0.6), ("none", 0.7, 0.8)]


@pytest.fixture(scope="module")
def photo_path(tmp_path_factory, astronaut):
    p = tmp_path_factory.mktemp("in") / "astronaut.png"
    astronaut.save(p)
    return str(p)


def job_from(photo, **kw):
    args = dict(
        image=photo,
        prompt="an astronaut",
        rows=ROWS,
        tier="auto",
        upscale="2",
        seed=7,
        randomize=False,
        steps=2,
        guidance=3.5,
        max_side=256,
    )
    args.update(kw)
    return H.build_job(**args)


def test_build_job_from_ui_values(photo_path):
    job = job_from(photo_path)
    assert (job.width, job.height) == (256, 256)  # the 512² astronaut fitted into max side 256
    assert job.out_size == (512, 512)
    assert [c.kind for c in job.controls] == ["canny", "depth"]
    assert job.controls[1].scale == 0.5 and job.controls[1].end == 0.6
    assert job.upscale == 2.0 and job.seed == 7 and job.steps == 2 and job.tier == "auto"


def test_build_job_accepts_pil_and_float_sliders(astronaut):
    job = job_from(astronaut, steps=3.0, max_side=320.0, upscale=1.5, tier="8")
    assert job.steps == 3 and max(job.width, job.height) == 320 and job.upscale == 1.5 and job.tier == "8"


def test_randomize_draws_the_seed_into_the_job(photo_path):
    a = job_from(photo_path, randomize=True, rng=random.Random(1))
    b = job_from(photo_path, randomize=True, rng=random.Random(1))
    assert a.seed == b.seed != 7 and 0 <= a.seed < 2**32


def test_canny_thresholds_go_into_the_params(photo_path):
    job = job_from(photo_path, canny=(50, 150))
    assert dict(job.controls[0].params) == {"low": 50, "high": 150}
    assert dict(job.controls[1].params) == {}  # depth gets no canny thresholds
    with pytest.raises(ValueError, match="canny low threshold"):
        job_from(photo_path, canny=(150, 50))


@pytest.mark.parametrize(
    "change, sentence",
    [
        (dict(prompt="  "), "prompt must be a non-empty text."),
        (dict(prompt="x" * 2001), "the limit is 2000"),
        (dict(rows=[("none", 0.7, 0.8)] * 3), "controls: give between 1 and 4 controls, got 0."),
        (dict(rows=[("canny", 2.5, 0.8)]), "scale of control 'canny' must be between 0.0 and 2.0"),
        (dict(rows=[("canny", 0.7, 0.0)]), "control start (0.0) must be below control end (0.0)."),
        (dict(rows=[("sketch", 0.7, 0.8)]), "Unknown control 'sketch'"),
        (dict(tier="3"), "tier must be one of auto, cpu, 4, 6, 8, 12, 16, 24, 48"),
        (dict(upscale="8"), "upscale must be between 1.0 and 4.0"),
        (dict(steps=0), "steps must be a whole number between 1 and 100"),
        (dict(steps=2.5), "steps must be a whole number between 1 and 100"),
        (dict(guidance=99), "guidance must be between 0.0 and 30.0"),
        (dict(seed=-1), "seed must be a whole number"),
        (dict(image=None), "Upload an image first"),
    ],
)
def test_bad_values_give_the_core_sentence(photo_path, change, sentence):
    with pytest.raises(ValueError) as err:
        job_from(photo_path, **change)
    assert sentence in str(err.value)


def test_bad_upload_gives_the_image_sentence(tmp_path):
    bad = tmp_path / "not-an-image.png"
    bad.write_bytes(b"hello")
    with pytest.raises(ValueError, match="image"):
        job_from(str(bad))
    strip = tmp_path / "strip.png"
    Image.new("RGB", (2000, 40)).save(strip)
    with pytest.raises(ValueError, match="aspect ratio"):
        job_from(str(strip))


def test_png_settings_round_trip(photo_path, tmp_path):
    job = job_from(photo_path, canny=(40, 120), tier="12", upscale="1.5", seed=1234, steps=9, guidance=4.5)
    path = save_png(
        job.image.resize((job.width, job.height)), tmp_path / "out.png", dict(job=job.describe(), plan={}, demo=True)
    )
    s = H.settings_from_png(str(path))
    assert s.prompt == "an astronaut" and s.tier == "12" and s.upscale == "1.5" and s.seed == 1234
    assert s.steps == 9 and s.guidance == 4.5 and s.max_side == 256 and s.canny == (40, 120)
    assert s.rows == [("canny", 0.7, 0.8), ("depth", 0.5, 0.6), ("none", 0.7, 0.8)]
    again = job_from(
        photo_path,
        prompt=s.prompt,
        rows=s.rows,
        tier=s.tier,
        upscale=s.upscale,
        seed=s.seed,
        steps=s.steps,
        guidance=s.guidance,
        max_side=s.max_side,
        canny=s.canny,
    )
    assert again.describe() == job.describe()


def test_png_without_settings_is_refused(tmp_path):
    plain = tmp_path / "plain.png"
    Image.new("RGB", (64, 64)).save(plain)
    with pytest.raises(ValueError, match="holds no generation settings"):
        H.settings_from_png(str(plain))
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"junk")
    with pytest.raises(ValueError, match="holds no generation settings"):
        H.settings_from_png(str(junk))


def test_settings_from_an_a1111_png(tmp_path):
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text(
        "parameters",
        "a red fox\nSteps: 500, Sampler: Euler, CFG scale: 1, Distilled CFG Scale: 3, Seed: 42, Size: 768x512, "
        'ControlNet 0: "Module: canny, Weight: 0.6, Threshold A: 50, Threshold B: 150, Guidance End: 0.7", '
        'ControlNet 1: "Module: openpose_full, Weight: 1"',
    )
    path = tmp_path / "forge.png"
    Image.new("RGB", (64, 64)).save(path, pnginfo=info)
    s = H.settings_from_png(str(path))
    assert s.source == "A1111/Forge" and s.prompt == "a red fox" and s.seed == 42 and s.guidance == 3.0
    assert s.steps == 100  # clamped to core.limits
    assert s.max_side == 768 and s.canny == (50, 150) and s.tier == "auto"
    assert s.rows[0] == ("canny", 0.6, 0.7) and s.rows[1][0] == "none" and s.dropped == ["openpose_full"]


def test_tier_choices_offer_what_the_machine_can_run():
    gpu = DeviceInfo("cuda", "NVIDIA RTX 4090", 23.6, 22.08, True, 60.0)
    choices = H.tier_choices(gpu)
    assert choices[0] == ("Auto — NVIDIA RTX 4090, 22.1 GB free", "auto")
    assert [v for _, v in choices] == ["auto", "cpu", "4", "6", "8", "12", "16", "24"]
    assert "Not offered: 48 GB (needs a 48 GB GPU; this one has 24 GB)." in H.tier_info(gpu)
    cpu = DeviceInfo("cpu", "CPU", 0.0, 0.0, True, 60.0)
    assert H.tier_choices(cpu) == [("Auto (CPU)", "auto"), ("CPU (slow)", "cpu")]
    assert "Not offered: 4–48 GB (needs a CUDA GPU; none was found)." in H.tier_info(cpu)


def test_preview_and_plan_panel(photo_path, demo_engine):
    prev = H.preview_control(photo_path, "canny", (50, 150))
    assert prev.mode == "RGB" and max(prev.size) == H.PREVIEW_SIDE
    assert H.preview_control(photo_path, "none") is None and H.preview_control(None, "canny") is None
    job = job_from(photo_path, steps=1, max_side=64, upscale="1", rows=[("canny", 0.7, 0.8)])
    result = demo_engine.run(job)
    s = H.summary_of(result, 1.0, 2.0)
    md = H.plan_markdown(s)
    for text in ("| Tier | CPU (demo model) |", "Peak memory", "measured", "Seconds per phase", "denoise"):
        assert text in md
    assert "predicted 0.00" not in md  # the CPU has no time or memory model: not shown as zero
    from ui.plots import memory_figure

    fig = memory_figure(s)
    assert fig.axes[0].lines, "the timeline is drawn"


def test_cancel_flags_are_per_session():
    flags = H.CancelFlags()
    a, b = flags.start("a"), flags.start("b")
    assert flags.cancel("a") and a.is_set() and not b.is_set()
    flags.finish("a", a)
    assert not flags.cancel("a")


def test_slider_pair_is_capped(astronaut):
    job = H.build_job(astronaut, "x", [("canny", 0.7, 0.8)], max_side=256)
    before, after = H.slider_pair(job, Image.new("RGB", (1024, 1024)), cap=512)
    assert before.size == after.size == (512, 512)


def test_fp8_compute_travels_from_the_checkbox_to_the_png_and_back(photo_path, tmp_path):
    assert job_from(photo_path).fp8_compute is False
    assert job_from(photo_path, fp8_compute=None).fp8_compute is False  # an API call leaving it out
    job = job_from(photo_path, fp8_compute=True)
    assert job.fp8_compute is True
    with pytest.raises(ValueError, match="fp8_compute"):
        job_from(photo_path, fp8_compute="yes")
    path = save_png(job.image, tmp_path / "fp8.png", dict(job=job.describe(), plan={}, demo=True))
    s = H.settings_from_png(str(path))
    assert s.fp8_compute is True
    old = save_png(
        job.image,
        tmp_path / "old.png",
        dict(job={k: v for k, v in job.describe().items() if k != "fp8_compute"}, plan={}, demo=True),
    )
    assert H.settings_from_png(str(old)).fp8_compute is False  # PNGs from before the option


def test_plan_panel_names_the_speed_ups():
    plan = dict(
        tier="48",
        device="cuda",
        dtype="bfloat16",
        placement=dict(B=312, F=0, S=0, Q=0),
        slots=3,
        text_encoders="gpu",
        vae_tiling=False,
        tile=0,
        overlap=128,
        predicted_peak_gb=41.0,
        predicted_step_s=0.2,
        host_ram_gb=0.0,
        notes=[],
    )
    fast = dict(
        fused=True, compiled=True, fp8=True, attention="cudnn", fp8_layers=500, compiled_blocks=72, compile_s=40.0
    )
    md = H.plan_markdown(dict(plan=plan, fast=fast, seconds={}, size=[1024, 1024], seed=1))
    assert "| Speed-ups | fused QKV, compiled blocks, cuDNN attention, fp8 compute (500 layers) |" in md
    assert "| Speed-ups | — |" in H.plan_markdown(dict(plan=plan, seconds={}, size=[1024, 1024], seed=1))


def test_errors_land_on_their_field(photo_path):
    cases = [
        (dict(prompt="  "), "prompt"),
        (dict(prompt="x" * 2001), "prompt"),
        (dict(seed=-5), "seed"),
        (dict(steps=0), "advanced"),
        (dict(rows=[("canny", 5.0, 0.8)]), "controls"),
        (dict(rows=[("none", 0.7, 0.8)]), "controls"),
        (dict(canny=(200, 100)), "controls"),
        (dict(tier="7"), "tier"),
        (dict(image=None), "image"),
        (dict(image=__file__), "image"),  # not an image
    ]
    for change, field in cases:
        with pytest.raises(ValueError) as err:
            job_from(photo_path, **change)
        assert H.field_of(err.value) == field, (change, str(err.value))
    assert H.field_of("Out of GPU memory even with the smallest plan; close other programs") is None
    assert "seed must be a whole number" in H.seed_error(-5) and H.seed_error(5) == ""
    assert H.prompt_note("abc") == ("3 / 2000 characters", False)
    assert H.prompt_note("x" * 2005)[1] is True


def test_history_keeps_what_a_click_restores(tmp_path):
    pngs = []
    for k in range(3):
        p = tmp_path / f"r{k}.png"
        Image.new("RGB", (8, 8)).save(p)
        pngs.append(p)
    summary = dict(seed=3, size=[8, 8], job=dict(prompt="a cat"))
    h = []
    for p in pngs:
        h = H.history_add(h, H.history_entry(p, tmp_path / "b.jpg", summary, None))
    assert [e["png"] for e in h] == [str(p) for p in reversed(pngs)]  # newest first
    pngs[0].unlink()
    h = H.history_add(h, H.history_entry(pngs[1], tmp_path / "b.jpg", summary, "photo.png"))
    assert len(h) == 3 and h[0]["photo"] == "photo.png" and str(pngs[0]) not in [e["png"] for e in h]
    assert H.gallery_items(h)[0] == (str(pngs[1]), "seed 3 · 8×8 · a cat")


def test_loaded_settings_keep_to_the_tiers_this_machine_runs():
    from ui.events import settings_values

    s = H.Settings("a fox", [("canny", 0.7, 0.8), ("none", 0.7, 0.8), ("none", 0.7, 0.8)], "24", "2", 5, 20, 3.5, 512)
    values, note = settings_values(s, ["auto", "cpu"])
    assert values[10] == "auto" and "the 24 GB tier does not run on this machine" in note
    assert values[13] is False  # randomize off: the loaded seed is kept
    values, note = settings_values(H.Settings(**{**s.__dict__, "tier": "cpu", "dropped": ["pose"]}), ["auto", "cpu"])
    assert values[10] == "cpu" and "left out" in note and "pose" in note


def test_pose_and_soft_edge_rows_and_previews(photo_path):
    choices = dict((v, label) for label, v in H.control_choices())
    assert choices["pose"] == "Pose (body keypoints)" and choices["softedge"] == "Soft edge"
    assert (H.default_scale("pose"), H.default_end("pose")) == (0.9, 0.65)
    assert (H.default_scale("softedge"), H.default_end("softedge")) == (0.7, 0.8)
    assert H.default_end("none") == 0.8
    for kind in ("pose", "softedge"):
        prev = H.preview_control(photo_path, kind, demo=True)
        assert prev.mode == "RGB" and max(prev.size) == H.PREVIEW_SIDE, kind


def test_the_compile_choice_travels_from_the_page_to_the_job(photo_path, tmp_path):
    from ui.run import Runner

    assert job_from(photo_path).compile == "auto" and job_from(photo_path, compile=None).compile == "auto"
    assert job_from(photo_path, compile="never").compile == "never"
    with pytest.raises(ValueError, match="compile must be one of auto, always, never") as err:
        job_from(photo_path, compile="sometimes")
    assert H.field_of(err.value) == "advanced"
    runner = Runner(None, H.CancelFlags(), tmp_path, None, dict(lora_dir=str(tmp_path)))
    values = [photo_path, "a photo", "canny", 0.7, 0.8, "none", 0.7, 0.8, "none", 0.7, 0.8]
    values += ["auto", "1", 3, False, 8, 3.5, 256, True, 100, 200, False, "auto", "None", 1.0, "None", 1.0]
    assert runner._job(values + ["always"]).compile == "always"
    assert runner._job(values).compile == "auto"  # a caller that does not send it yet
    assert "compile" not in runner._job(values + ["never"]).describe()  # speed, not the picture: not in the PNG


def test_auto_compile_says_what_the_engine_does():
    assert H.compile_choices("later")[0] == ("Auto (compile from the second job)", "auto")
    assert H.compile_choices("off")[0][0] == "Auto (never compile here)"
    assert [v for _, v in H.compile_choices("on")] == ["auto", "always", "never"]


def test_handlers_and_app_import_without_gradio():
    """Benchmarks and scripts build jobs the way the app does on machines without Gradio."""
    import subprocess
    import sys

    code = "import sys; sys.modules['gradio'] = None; import app; from ui.handlers import build_job, save_result"
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-2000:]
