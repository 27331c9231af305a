"""`python -m core generate` with the user's own files: --lora FILE=SCALE and --transformer FILE
(demo model, offline, in subprocesses as a user runs them)."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from core.__main__ import main
from core.pngmeta import read_params
from tests.core.byom_files import gguf_file, peft_lora, single_file
from tests.core.test_cli import run_all


def args(photo, out, *extra):
    return ("generate", "--image", photo, "--control", "canny", "--prompt", "a cat on a mat", "--tier", "cpu",
            "--steps", "2", "--max-side", "64", "--seed", "4", "--demo", "--out", out, *extra)  # fmt: skip


@pytest.fixture(scope="module")
def runs(tmp_path_factory, astronaut):
    d = tmp_path_factory.mktemp("byom-cli")
    photo = d / "photo.png"
    astronaut.resize((64, 64)).save(photo)
    lora = peft_lora(d / "Style-Turbo.safetensors", seed=5)
    names = ["base", "lora", "zero", "gguf", "bf16"]
    extra = dict(
        base=(),
        lora=("--lora", f"{lora}=0.8"),
        zero=("--lora", "Style-Turbo.safetensors=0", "--lora-dir", d),
        gguf=("--transformer", gguf_file(d / "tiny.gguf", "Q4_0")),
        bf16=("--transformer", single_file(d / "tiny.safetensors", torch.bfloat16)),
    )
    results = run_all([args(photo, d / f"{n}.png", *extra[n]) for n in names])
    return {n: (r, d / f"{n}.png") for n, r in zip(names, results)}, d, photo, lora


def pixels(path):
    return np.asarray(Image.open(path), dtype=np.int16)


def test_a_lora_changes_the_image_scale_zero_does_not_and_the_png_records_it(runs):
    out = {}
    for name in ("base", "lora", "zero"):
        (rc, stdout, err), path = runs[0][name]
        assert rc == 0, err
        out[name] = (json.loads(stdout.strip().splitlines()[-1]), pixels(path), read_params(path))
    assert np.abs(out["lora"][1] - out["base"][1]).mean() > 1
    assert np.array_equal(out["zero"][1], out["base"][1])
    lora = runs[3]
    assert out["lora"][2]["job"]["loras"] == [dict(name=lora.name, path=str(lora), scale=0.8)]
    assert out["zero"][2]["job"]["loras"][0]["scale"] == 0.0 and out["base"][2]["job"]["loras"] == []
    # --steps was given, --guidance was not: only the guidance came from the turbo LoRA's preset
    assert out["lora"][2]["job"]["steps"] == 2
    assert out["lora"][0]["preset"] == dict(guidance=3.5, lora=lora.name) and "preset" not in out["base"][0]


@pytest.mark.parametrize("name", ["gguf", "bf16"])
def test_a_transformer_file_generates(runs, name):
    (rc, stdout, err), path = runs[0][name]
    assert rc == 0, err
    summary = json.loads(stdout.strip().splitlines()[-1])
    assert summary["size"] == [64, 64] and pixels(path).std() > 1


def test_a_turbo_lora_sets_the_steps_unless_given(runs, capsys):
    _, d, photo, lora = runs
    without_steps = [a for a in args(photo, d / "x.png") if a not in ("--steps", "2")]
    assert main([*map(str, without_steps), "--lora", f"{lora}=0.5", "--guidance", "2"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["preset"] == dict(steps=8, lora=lora.name)
    assert read_params(d / "x.png")["job"]["steps"] == 8 and read_params(d / "x.png")["job"]["guidance"] == 2.0


def test_bad_files_exit_2_in_one_sentence_before_anything_is_written(runs, capsys):
    _, d, photo, lora = runs
    assert main([*map(str, args(photo, d / "y.png")), "--lora", str(d / "nope.safetensors")]) == 2
    assert capsys.readouterr().err == f"error: The LoRA file '{d / 'nope.safetensors'}' does not exist.\n"
    assert main([*map(str, args(photo, d / "z.png")), "--transformer", str(lora)]) == 2  # a LoRA is no transformer
    err = capsys.readouterr().err
    assert err.startswith("error: The transformer file 'Style-Turbo.safetensors' is not a FLUX transformer")
    assert err.count("\n") == 1 and not (d / "y.png").exists() and not (d / "z.png").exists()
