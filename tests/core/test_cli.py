"""`python -m core`: plan and generate as a user runs them, in subprocesses (offline, demo model)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from core.pngmeta import read_params

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT = 240


def env():
    e = dict(os.environ)
    e["HF_HUB_OFFLINE"] = "1"
    e["FLUX_ANYVRAM_CACHE"] = os.environ["FLUX_ANYVRAM_CACHE"]  # the demo model conftest built
    e["PYTHONPATH"] = str(ROOT) + os.pathsep + e.get("PYTHONPATH", "")
    return e


def start(*args):
    return subprocess.Popen(
        [sys.executable, "-m", "core", *map(str, args)],
        cwd=ROOT,
        env=env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(proc):
    out, err = proc.communicate(timeout=TIMEOUT)
    return proc.returncode, out, err


def run_all(commands):
    """Run several commands at once (each is mostly import and load time)."""
    procs = [start(*c) for c in commands]
    return [finish(p) for p in procs]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, astronaut):
    d = tmp_path_factory.mktemp("cli")
    photo = d / "photo.png"
    astronaut.crop((0, 64, 512, 448)).save(photo)  # 512×384: a 4:3 input
    fake = d / "notes.png"
    fake.write_text("this is a text file, not a PNG\n")
    return d, photo, fake


def generate_args(photo, out, *extra):
    return (
        "generate",
        "--image",
        photo,
        "--control",
        "canny=0.6",
        "--control",
        "depth",
        "--prompt",
        "an astronaut portrait",
        "--tier",
        "auto",
        "--steps",
        "2",
        "--max-side",
        "128",
        "--seed",
        "11",
        "--demo",
        "--out",
        out,
        *extra,
    )


@pytest.fixture(scope="module")
def generated(inputs):
    d, photo, _ = inputs
    outs = [d / "out1.png", d / "out2.png"]
    fp8 = d / "fp8.png"
    results = run_all(
        [("plan", "--tier", "8", "--width", "1024", "--height", "1024", "--host-ram-gb", "32")]
        + [generate_args(photo, o) for o in outs]
        + [generate_args(photo, fp8, "--fp8-compute")]
    )
    return results[0], list(zip(results[1:3], outs)), (results[3], fp8)


def test_plan_prints_one_json_object_within_the_tier(generated):
    rc, out, err = generated[0]
    assert rc == 0, err
    lines = out.strip().splitlines()
    assert len(lines) == 1
    plan = json.loads(lines[0])
    assert plan["tier"] == "8" and plan["budget_gb"] == 7.5
    assert 0 < plan["predicted_peak_gb"] <= 7.5
    assert "tile" in plan and plan["tile"] >= 0 and isinstance(plan["tile"], int)
    assert sum(plan["placement"].values()) > 300  # the full-size model's units
    assert plan["dtype"] in ("bfloat16", "float32") and plan["predicted_step_s"] > 0


def test_generate_writes_a_png_with_its_parameters(generated):
    for (rc, out, err), path in generated[1]:
        assert rc == 0, err
        summary = json.loads(out.strip().splitlines()[-1])
        img = Image.open(path)
        assert img.format == "PNG" and img.size == (128, 96)  # 4:3 input fitted into 128 px
        assert summary["size"] == [128, 96] and summary["out"] == str(path) and summary["demo"] is True
        assert summary["measured_peak_reserved_gb"] > 0
        for phase in ("encode", "denoise", "decode"):
            assert summary["seconds"][phase] >= 0
            assert 0 < summary["phase_peaks_gb"][phase] <= summary["measured_peak_reserved_gb"]
        assert summary["seconds"]["denoise"] > 0
        params = read_params(path)
        job = params["job"]
        assert job["prompt"] == "an astronaut portrait" and job["steps"] == 2 and job["seed"] == 11
        assert (job["width"], job["height"], job["tier"], job["upscale"]) == (128, 96, "auto", 1.0)
        assert [(c["kind"], c["scale"]) for c in job["controls"]] == [("canny", 0.6), ("depth", 0.8)]
        assert params["demo"] is True and params["plan"]["tier"] == "cpu"
        assert params["plan"] == summary["plan"]


def test_the_same_command_gives_identical_pixels(generated):
    (_, p1), (_, p2) = generated[1]
    a, b = np.asarray(Image.open(p1)), np.asarray(Image.open(p2))
    assert a.shape == (96, 128, 3) and a.std() > 1
    assert np.array_equal(a, b)


def test_bad_inputs_exit_2_with_one_sentence_and_write_nothing(inputs):
    d, photo, fake = inputs
    bad = [  # (arguments, a word the message must contain)
        (generate_args(fake, d / "bad1.png"), "image"),
        (generate_args(photo, d / "bad2.png", "--control", "scribble"), "scribble"),
        (generate_args(photo, d / "bad3.png", "--upscale", "100"), "upscale"),
        (generate_args(photo, d / "bad4.png", "--steps", "0"), "steps"),
        (generate_args(photo, d / "bad5.png", "--control", "canny=3"), "scale"),
        (generate_args(photo, d / "missing" / "bad6.png"), "--out"),
    ]
    before = sorted(p.name for p in d.rglob("*"))
    for (_args, word), (rc, out, err) in zip(bad, run_all([a for a, _ in bad])):
        assert rc == 2, (word, rc, err)
        assert out == "", word
        lines = err.strip().splitlines()
        assert len(lines) == 1, (word, err)
        line = lines[0]
        assert line.startswith("error: ") and line.endswith("."), (word, line)
        assert word in line, (word, line)
    assert sorted(p.name for p in d.rglob("*")) == before, "nothing may be written"


def test_fp8_compute_flag_is_kept_and_ignored_on_the_cpu_with_a_note(generated):
    (rc, out, err), path = generated[2]
    assert rc == 0, err
    summary = json.loads(out.strip().splitlines()[-1])
    assert any(e.startswith("fp8 compute was ignored") for e in summary["events"]), summary["events"]
    assert read_params(path)["job"]["fp8_compute"] is True
    (_, plain), _ = generated[1]
    assert np.array_equal(np.asarray(Image.open(path)), np.asarray(Image.open(plain)))


def test_pose_and_soft_edge_controls_on_a_real_photo(tmp_path):
    photo = ROOT / "assets" / "astronaut.png"
    outs = {kind: tmp_path / f"{kind}.png" for kind in ("pose", "softedge")}
    commands = [
        ("generate", "--demo", "--control", kind, "--image", photo, "--prompt", "x", "--steps", "2", "--out", out)
        for kind, out in outs.items()
    ]
    expected = {"pose": (0.9, 0.65), "softedge": (0.7, 0.8)}  # Union-Pro-2.0's card: scale, control end
    for (kind, out), (rc, stdout, err) in zip(outs.items(), run_all(commands), strict=True):
        assert rc == 0, (kind, err)
        summary = json.loads(stdout.strip().splitlines()[-1])
        assert summary["out"] == str(out) and summary["demo"] is True
        assert Image.open(out).size == (416, 416)  # the 415² photo on FLUX's 16-pixel grid
        (control,) = read_params(out)["job"]["controls"]
        assert (control["kind"], control["scale"], control["end"]) == (kind, *expected[kind])
