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
    # other tools show the prompt
    assert loaded.text["parameters"] == params["job"]["prompt"]
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
    assert Image.open(path).text["parameters"] == ""


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
