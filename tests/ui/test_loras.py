"""LoRAs on the page: rows of a file from the LoRA folder and a scale, into the Job, the API, the PNG
and back from it."""

from __future__ import annotations

import pytest

from core.pngmeta import save_png
from tests.core.byom_files import peft_lora
from ui import handlers as H
from ui import loras


@pytest.fixture
def lora_dir(tmp_path):
    peft_lora(tmp_path / "style.safetensors", seed=1)
    (tmp_path / "sub").mkdir()
    peft_lora(tmp_path / "sub" / "flux-turbo-alpha.safetensors", seed=2)
    (tmp_path / "notes.txt").write_text("not a LoRA")
    return tmp_path


def test_rows_list_the_folder_and_become_lora_specs(lora_dir):
    assert loras.choices(lora_dir) == [loras.NONE, "style.safetensors", "sub/flux-turbo-alpha.safetensors"]
    specs = loras.specs(["style.safetensors", 0.8, loras.NONE, 1.0], lora_dir)
    assert [(s.name, s.scale) for s in specs] == [("style.safetensors", 0.8)]
    assert loras.specs([loras.NONE, 1.0, None, None], lora_dir) == ()
    with pytest.raises(ValueError, match="does not exist"):
        loras.specs(["gone.safetensors", 1.0], lora_dir)
    with pytest.raises(ValueError, match="is not a file in the LoRA folder"):
        loras.specs(["../outside.safetensors", 1.0], lora_dir / "sub")
    with pytest.raises(ValueError, match="scale of LoRA"):
        loras.specs(["style.safetensors", 9.0], lora_dir)


def test_the_api_takes_a_lora_per_row(demo_engine, lora_dir):
    from ui import create_demo

    demo = create_demo(demo_engine, examples=False, lora_dir=lora_dir)
    params = [p["parameter_name"] for p in demo.get_api_info()["named_endpoints"]["/generate"]["parameters"]]
    assert params[-7:-1] == ["fp8_compute", "precision", "lora_1", "lora_scale_1", "lora_2", "lora_scale_2"]


def test_a_job_from_the_page_carries_its_loras_into_the_png_and_back(lora_dir, tmp_path, example_photo):
    from ui.run import Runner

    runner = Runner(None, H.CancelFlags(), tmp_path, None, dict(lora_dir=str(lora_dir)))
    values = [example_photo, "a photo", "canny", 0.7, 0.8, "none", 0.7, 0.8, "none", 0.7, 0.8]
    values += ["auto", "1", 3, False, 8, 3.5, 256, True, 100, 200, False, "4bit"]
    values += ["sub/flux-turbo-alpha.safetensors", 0.5, "style.safetensors", -0.25]
    job = runner._job(values)
    assert [(s.name, s.scale) for s in job.loras] == [
        ("flux-turbo-alpha.safetensors", 0.5),
        ("style.safetensors", -0.25),
    ]
    assert job.precision == "4bit"
    png = save_png(job.image, tmp_path / "out.png", dict(job=job.describe(), plan={}, demo=True))
    s = H.settings_from_png(str(png), lora_dir)
    assert s.loras == ["sub/flux-turbo-alpha.safetensors", 0.5, "style.safetensors", -0.25] and not s.lora_missing
    assert s.precision == "4bit"
    (lora_dir / "style.safetensors").unlink()  # gone since: the row stays empty and the note says so
    s = H.settings_from_png(str(png), lora_dir)
    assert s.loras == ["sub/flux-turbo-alpha.safetensors", 0.5, loras.NONE, 1.0]
    assert s.lora_missing == ["style.safetensors"]


def test_png_settings_without_loras_leave_the_rows_empty(tmp_path, example_photo):
    from PIL import Image

    png = save_png(Image.open(example_photo), tmp_path / "old.png", dict(job=dict(prompt="x", controls=[]), plan={}))
    s = H.settings_from_png(str(png), tmp_path)
    assert s.loras == [loras.NONE, 1.0, loras.NONE, 1.0] and s.lora_missing == [] and s.precision == "auto"


def test_choosing_a_few_step_lora_suggests_its_steps_and_guidance(lora_dir):
    assert loras.preset_for("sub/flux-turbo-alpha.safetensors", lora_dir)["steps"] == 8
    assert loras.preset_for("style.safetensors", lora_dir) is None
    assert loras.preset_for(loras.NONE, lora_dir) is None and loras.preset_for("gone.safetensors", lora_dir) is None
