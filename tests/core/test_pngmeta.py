"""PNG metadata: every parameter travels inside the image and comes back unchanged."""

import io
import json

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from core.job import ControlSpec, Job
from core.pngmeta import KEY, read_params, save_png


def noise(w=48, h=32, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


@pytest.fixture
def params():
    job = Job(
        "an astronaut — «portrait», 宇宙飛行士 🚀",
        noise(),
        (ControlSpec("canny", 0.6, params=(("low", 40),)), ControlSpec("depth", start=0.1, end=0.9)),
        1024,
        768,
        steps=20,
        guidance=2.5,
        seed=2**62 + 1,
        upscale=2.0,
        tier="8",
        upscale_steps=None,
    )
    plan = dict(tier="8", budget_gb=7.5, placement=dict(B=0, F=70, S=0, Q=242), notes=["a note"], tile=0)
    return dict(job=job.describe(), plan=plan, demo=False)


def test_round_trip_through_a_file(tmp_path, params):
    img = noise()
    path = save_png(img, tmp_path / "out.png", params)
    assert path == tmp_path / "out.png" and path.exists()
    back = read_params(path)
    assert back == params
    assert back["job"]["seed"] == 2**62 + 1  # big integers stay exact
    loaded = Image.open(path)
    assert loaded.format == "PNG" and loaded.size == img.size
    assert np.array_equal(np.asarray(loaded.convert("RGB")), np.asarray(img)), "metadata must not touch pixels"
    # other tools (A1111/Forge "PNG Info") show the prompt and the settings line
    prompt, line = loaded.text["parameters"].rsplit("\n", 1)
    assert prompt == params["job"]["prompt"]
    assert line.startswith(
        "Steps: 20, Sampler: Euler, CFG scale: 1, Distilled CFG Scale: 2.5, Seed: 4611686018427387905"
    )
    assert "Size: 1024x768" in line and 'ControlNet 0: "Module: canny, ' in line
    assert json.loads(loaded.text[KEY]) == params


def test_round_trip_rebuilds_the_same_job(tmp_path, params):
    path = save_png(noise(), tmp_path / "job.png", params)
    j = read_params(Image.open(path))["job"]  # a PIL image works as well as a path
    controls = tuple(
        ControlSpec(c["kind"], c["scale"], c["start"], c["end"], tuple(c["params"].items())) for c in j.pop("controls")
    )
    rebuilt = Job(image=noise(), controls=controls, **j)
    assert rebuilt.describe() == params["job"]


def test_round_trip_through_uploaded_bytes(tmp_path, params):
    path = save_png(noise(), tmp_path / "up.png", params)
    assert read_params(Image.open(io.BytesIO(path.read_bytes()))) == params


def test_png_without_parameters_gives_none(tmp_path):
    plain = tmp_path / "plain.png"
    noise().save(plain)
    assert read_params(plain) is None
    other = tmp_path / "other.png"
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", "a prompt from another tool")
    noise().save(other, pnginfo=info)
    assert read_params(other) is None
    jpg = tmp_path / "photo.jpg"
    noise().save(jpg)
    assert read_params(jpg) is None


def test_params_without_a_job_still_save(tmp_path):
    path = save_png(noise(), tmp_path / "x.png", {"note": "no job"})
    assert read_params(path) == {"note": "no job"}
    assert Image.open(path).text["parameters"] == ""  # no job: no settings line


def test_broken_metadata_reads_as_no_settings(tmp_path):
    path = tmp_path / "broken.png"
    info = PngImagePlugin.PngInfo()
    info.add_text(KEY, "{not json")
    noise().save(path, pnginfo=info)
    assert read_params(path) is None
    info = PngImagePlugin.PngInfo()
    info.add_text(KEY, "[1, 2]")  # JSON, but not our settings
    noise().save(path, pnginfo=info)
    assert read_params(path) is None


def test_a1111_text_reads_back_as_the_job(tmp_path, params):
    from core.pngmeta import read_a1111

    path = save_png(noise(), tmp_path / "a.png", params)
    back, want = read_a1111(path), params["job"]
    for key in ("prompt", "steps", "guidance", "seed", "width", "height", "upscale", "upscale_strength", "tier"):
        assert back[key] == want[key], key
    assert [c["kind"] for c in back["controls"]] == ["canny", "depth"]
    canny, depth = back["controls"]
    assert canny["scale"] == 0.6 and canny["end"] == 0.8 and depth["start"] == 0.1 and depth["end"] == 0.9


def test_a1111_text_from_forge_and_a1111():
    from core.pngmeta import parse_a1111

    forge = (
        "a cat, soft light\nNegative prompt: blurry\nSteps: 20, Sampler: Euler, Schedule type: Simple, "
        "CFG scale: 1, Distilled CFG Scale: 3.5, Seed: 1234, Size: 896x1152, Model hash: abc, Model: flux1-dev, "
        'ControlNet 0: "Module: canny, Model: union [x], Weight: 0.65, Resize Mode: Crop and Resize, '
        'Processor Res: 512, Threshold A: 50.0, Threshold B: 150.0, Guidance Start: 0.0, Guidance End: 0.7", '
        'ControlNet 1: "Module: depth_anything_v2, Model: union, Weight: 0.5, Guidance Start: 0, Guidance End: 1", '
        "Version: f2.0.1"
    )
    job = parse_a1111(forge)
    assert job["prompt"] == "a cat, soft light" and job["steps"] == 20 and job["seed"] == 1234
    assert job["guidance"] == 3.5 and (job["width"], job["height"]) == (896, 1152)
    assert job["controls"][0] == dict(kind="canny", scale=0.65, start=0.0, end=0.7, params=dict(low=50, high=150))
    assert job["controls"][1]["kind"] == "depth"
    sd = parse_a1111("a dog\nSteps: 30, Sampler: DPM++ 2M, CFG scale: 7, Seed: 5, Size: 512x512")
    assert sd["guidance"] == 7.0 and sd["controls"] == [] and "upscale" not in sd
    assert parse_a1111("just a prompt") is None and parse_a1111("") is None and parse_a1111(None) is None
