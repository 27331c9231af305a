"""Training on the CPU with the demo model and a tiny synthetic dataset whose target depends on the
control image (a disc at a random place; the control is its Canny edges, made by the app's function)."""

import gc
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from safetensors.torch import load_file

from core.device import DeviceInfo, detect
from core.engine import Engine
from core.job import ControlSpec, Job
from core.models import ModelSpec, load_controlnet
from core.plan.sizes import sizes_from_config
from train.__main__ import main
from train.config import TrainConfig
from train.data import scan
from train.modules import load
from train.placement import place
from train.precision import TrainingStopped
from train.run import Faults, Killed, place_frozen, run
from train.validate import Validator

ROOT = Path(__file__).resolve().parents[2]
STEPS = 30


def make_dataset(folder: Path, n: int = 8, size: int = 64, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        im = Image.new("RGB", (size, size), (20, 20, 20))
        x, y = rng.integers(8, size - 24, 2)
        r = int(rng.integers(6, 14))
        ImageDraw.Draw(im).ellipse([x, y, x + 2 * r, y + 2 * r], fill=(230, 200, 40))
        im.save(folder / f"{i:03d}.png")
        (folder / f"{i:03d}.txt").write_text("a yellow disc on a dark floor")
    return folder


def config(data, out, **kw) -> TrainConfig:
    base = dict(
        data=str(data),
        control="canny",
        out=str(out),
        demo=True,
        tier="cpu",  # the CPU path also on a machine with a GPU (bitwise-reproducible resume)
        steps=STEPS,
        resolution=64,
        lr=1e-3,
        checkpoint_every=10,
        validate_every=15,
        validation_images=1,
        validation_steps=2,
        log_every=0,
    )
    return TrainConfig(**dict(base, **kw))


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: the tiny model's kernels are too small to share, and on a busy machine
    two spinning threads made each training step 10-40 times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("discs"))


@pytest.fixture(scope="module")
def trained(dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("full")
    return run(config(dataset, out)), out


def _log(out: Path) -> dict:
    return json.loads((out / "log.json").read_text())


def test_loss_falls_and_weights_change(trained):
    summary, out = trained
    losses = _log(out)["losses"]
    assert len(losses) == STEPS
    assert np.mean(losses[-10:]) < np.mean(losses[:10])
    before = load_file(str(Path(ModelSpec.demo_spec().controlnet) / "diffusion_pytorch_model.safetensors"))
    after = load_file(summary["out"] + "/diffusion_pytorch_model.safetensors")
    assert before.keys() == after.keys()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert len(changed) > len(before) // 2
    assert (out / "loss.png").stat().st_size > 1000
    assert [v["step"] for v in summary["validation"]] == [15, 30]
    assert all(Path(p).is_file() for v in summary["validation"] for p in v["images"])


def test_trained_controlnet_loads_and_changes_the_output(trained, dataset):
    summary, _ = trained
    demo = ModelSpec.demo_spec()
    assert load_controlnet(summary["out"], torch.float32).config.num_mode == 10
    with Image.open(dataset / "000.png") as im:
        job = Job("a yellow disc on a dark floor", im.convert("RGB"), (ControlSpec("canny"),), 64, 64, steps=3, seed=5)
    before = np.asarray(Engine(demo).run(job).image, dtype=np.int16)
    after = np.asarray(Engine(ModelSpec(demo.base, summary["out"], demo=True)).run(job).image, dtype=np.int16)
    assert np.abs(after - before).mean() > 1.0


def test_a_killed_run_resumes_and_reproduces_the_losses(trained, dataset, tmp_path):
    _, out_full = trained
    with pytest.raises(Killed):
        run(config(dataset, tmp_path), Faults(kill_after=15))
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-000010"]
    with pytest.raises(ValueError, match=r"^The checkpoint 'step-000010' was made with seed=0, not 1; resume"):
        run(config(dataset, tmp_path, resume=True, seed=1))
    summary = run(config(dataset, tmp_path, resume=True))
    assert summary["resumed_from"] == 10
    np.testing.assert_allclose(_log(tmp_path)["losses"], _log(out_full)["losses"], rtol=1e-6)


def test_nan_loss_stops_naming_the_step_and_keeps_the_checkpoint(dataset, tmp_path):
    cfg = config(dataset, tmp_path, steps=8, checkpoint_every=4, validation_images=0, gradient_checkpointing=False)
    with pytest.raises(TrainingStopped, match=r"at step 6, .*step-000004"):
        run(cfg, Faults(nan_at=6))
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-000004"]


def test_an_infinite_gradient_skips_its_update_and_three_in_a_row_stop_the_run(dataset, tmp_path):
    """Clipping by an infinite norm would make every weight NaN (the next loss NaN, the run lost)."""
    cfg = config(dataset, tmp_path / "one", steps=6, validation_images=0, gradient_checkpointing=False)
    summary = run(cfg, Faults(inf_grad_at=(3,)))
    assert summary["skipped_updates"] == [3]
    assert all(math.isfinite(x) for x in _log(tmp_path / "one")["losses"])
    saved = load_file(str(next((tmp_path / "one" / "controlnet").glob("*.safetensors"))))
    assert all(torch.isfinite(t).all() for t in saved.values())
    cfg = config(dataset, tmp_path / "three", steps=8, validation_images=0, gradient_checkpointing=False)
    with pytest.raises(TrainingStopped, match=r"not finite for 3 steps in a row \(up to step 4\)"):
        run(cfg, Faults(inf_grad_at=(2, 3, 4)))


def test_out_of_gpu_memory_while_training_is_one_sentence(dataset, tmp_path, capsys, monkeypatch):
    import train.run

    def oom(cfg, faults=None):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 54.00 MiB. GPU 0 has a total capacity")

    monkeypatch.setattr(train.run, "run", oom)
    rc = main(["--data", str(dataset), "--control", "canny", "--out", str(tmp_path), "--demo", "--tier", "24"])
    err = capsys.readouterr().err.strip()
    assert rc == 4 and "\n" not in err and "Traceback" not in err
    assert "ran out of memory while training at the 24 tier" in err and "54.00 MiB" in err


def test_training_attention_never_runs_on_cudnn(dataset, tmp_path, monkeypatch):
    """cuDNN's SDPA backward is the reported source of NaN gradients on H100/H200: every forward and
    backward of a training step (the unused-parameter probe's too) runs with that backend off, and
    what is enabled after the run is what was enabled before it."""
    import train.run

    seen, original = [], train.run.flow_matching_loss

    def recording(*args, **kw):
        seen.append(torch.backends.cuda.cudnn_sdp_enabled())
        assert torch.backends.cuda.flash_sdp_enabled() and torch.backends.cuda.mem_efficient_sdp_enabled()
        return original(*args, **kw)

    monkeypatch.setattr(train.run, "flow_matching_loss", recording)
    before = torch.backends.cuda.cudnn_sdp_enabled()
    run(config(dataset, tmp_path, steps=3, validation_images=0, gradient_checkpointing=False))
    assert seen == [False] * 4  # the probe's pass, then three steps
    assert torch.backends.cuda.cudnn_sdp_enabled() == before


def test_weights_that_do_not_change_are_an_error(dataset, tmp_path):
    cfg = config(dataset, tmp_path, steps=4, lr=1e-30, validation_images=0, gradient_checkpointing=False)
    with pytest.raises(TrainingStopped, match="did not change in the first 2 optimiser steps"):
        run(cfg)


def test_lora_and_a_new_controlnet(dataset, tmp_path):
    kw = dict(steps=4, validation_images=0, gradient_checkpointing=False)
    lora = run(config(dataset, tmp_path / "lora", lora_rank=4, **kw))
    assert lora["trainable_params"] < 10_000
    assert any("lora_B" in k for k in load_file(lora["lora"]))
    assert load_controlnet(lora["out"], torch.float32) is not None  # the LoRA merged into a plain folder
    new = run(config(dataset, tmp_path / "new", new_controlnet=True, new_layers=2, **kw))
    # the last double block's text path feeds nothing when the ControlNet has no single blocks
    assert any("ff_context" in n for n in new["frozen_unused"])
    assert load_controlnet(new["out"], torch.float32).config.num_mode is None


def _fp16_copy(src: Path, dst: Path, part: str) -> Path:
    """A copy of a demo model folder whose `part` is stored in float16."""
    from diffusers import FluxControlNetModel, FluxTransformer2DModel

    dst.mkdir()
    if part == "controlnet":
        FluxControlNetModel.from_pretrained(src).half().save_pretrained(dst)
        return dst
    for p in src.iterdir():
        if p.name != "transformer":
            (dst / p.name).symlink_to(p)
    FluxTransformer2DModel.from_pretrained(src / "transformer").half().save_pretrained(dst / "transformer")
    return dst


def test_fp16_stored_weights_and_fp16_precision_are_refused(dataset, tmp_path):
    demo = ModelSpec.demo_spec()
    base16 = _fp16_copy(Path(demo.base), tmp_path / "flux16", "transformer")
    with pytest.raises(ValueError, match=r"^The base transformer weights in .* are stored in float16"):
        run(config(dataset, tmp_path / "a", model=str(base16)))
    cn16 = _fp16_copy(Path(demo.controlnet), tmp_path / "cn16", "controlnet")
    with pytest.raises(ValueError, match=r"^The ControlNet weights in .* are stored in float16"):
        run(config(dataset, tmp_path / "b", controlnet=str(cn16)))
    with pytest.raises(ValueError, match="fp16 mixed precision is refused"):
        config(dataset, tmp_path / "c", mixed_precision="fp16")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


@pytest.mark.parametrize(
    "args, words",
    [
        (["--steps", "0"], "steps must be a whole number between 1 and"),
        (["--resolution", "70"], "resolution must be a multiple of 16"),
        (["--lora-rank", "4", "--new-controlnet"], "A LoRA adapts a trained ControlNet"),
        (["--resume"], "--resume found no checkpoint"),
    ],
)
def test_cli_bad_values_get_one_sentence(dataset, tmp_path, capsys, args, words):
    argv = ["--data", str(dataset), "--control", "canny", "--out", str(tmp_path / "o"), "--demo", *args]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and words in err and "\n" not in err


def _live_parameters() -> set:
    """Every nn.Parameter alive in the process (by identity: other tests may leave fake or meta ones)."""
    gc.collect()
    return {id(o) for o in gc.get_objects() if isinstance(o, torch.nn.Parameter)}


def test_validation_adds_no_model_copy(dataset, tmp_path):
    cfg = config(dataset, tmp_path, validation_images=2)
    spec, pipe = load(cfg, torch.float32)
    before = _live_parameters()
    validator = Validator(spec, pipe, scan(cfg.data), cfg, detect())
    paths = validator.run(1, tmp_path)
    assert len(paths) == 2 and all(Path(p).is_file() for p in paths)
    assert validator.engine.pipe.controlnet.nets[0] is pipe.controlnet.nets[0]
    assert validator.engine.img2img.transformer is pipe.transformer
    assert _live_parameters() - before == set()  # the validator holds its engine: a copy would still be alive


def test_validation_runs_an_fp8_stored_base_as_it_is_stored(dataset, tmp_path, monkeypatch):
    """The 24 GB LoRA plan stores the frozen transformer in fp8 (layerwise casting): validation runs
    it that way, moves no module and widens no weight (a bf16 copy would not fit that tier)."""
    cfg = config(dataset, tmp_path, validation_images=1)
    spec, pipe = load(cfg, torch.float32)
    place_frozen(pipe.transformer, torch.device("cpu"), torch.float32, "float8_e4m3fn")
    stored = {n: p.dtype for n, p in pipe.transformer.named_parameters()}
    assert torch.float8_e4m3fn in stored.values()
    moved = []
    for name in ("transformer", "controlnet", "vae", "text_encoder", "text_encoder_2"):
        module = getattr(pipe, name)
        monkeypatch.setattr(module, "to", lambda *a, _n=name, _m=module, **k: moved.append(_n) or _m)
    before = _live_parameters()
    validator = Validator(spec, pipe, scan(cfg.data), cfg, detect())
    (path,) = validator.run(3, tmp_path)
    image = np.asarray(Image.open(path))
    assert image.shape == (cfg.resolution, cfg.resolution, 3) and image.std() > 0
    assert {n: p.dtype for n, p in pipe.transformer.named_parameters()} == stored
    assert _live_parameters() - before == set()
    validator.engine.release()  # the training modules stay where the run keeps them
    assert moved == [] and {n: p.dtype for n, p in pipe.transformer.named_parameters()} == stored
    with pytest.raises(ValueError, match="LoRAs cannot be merged into a pipeline placed by its caller"):
        validator.engine.state.place(validator.engine.plan(validator.jobs[0]), loras=(("x.safetensors", 1.0),))


def test_placement_uses_the_planner_and_refuses_what_cannot_fit():
    sizes = sizes_from_config("full")
    gpu = DeviceInfo("cuda", "test GPU", 80.0, 79.0, True, 200.0)
    cn, base = 3_300_000_000, 11_900_000_000
    full = place("48", sizes, gpu, cn, base, 512, 512)
    assert full.device == "cuda" and full.optimizer in ("adamw8bit", "adafactor")
    assert full.predicted_peak_gb <= full.budget_gb == 47.5
    assert full.validation_plan["tier"] == "48"
    lora = place("24", sizes, gpu, 20_000_000, base, 512, 512, frozen_exact=cn)
    assert lora.optimizer == "adamw" and lora.predicted_peak_gb <= 23.5
    without = place("24", sizes, gpu, 20_000_000, base, 512, 512)  # the frozen ControlNet kept in bf16
    assert lora.predicted_peak_gb - without.predicted_peak_gb == pytest.approx(2 * cn / 2**30, abs=0.02)
    with pytest.raises(ValueError, match=r"^Training needs at least .* the 8 tier allows 7\.5 GiB"):
        place("8", sizes, gpu, cn, base, 512, 512)
    assert place("cpu", sizes_from_config("tiny"), gpu, 1000, 1000, 64, 64).device == "cpu"


def test_an_fp8_stored_base_reaches_the_device_in_fp8():
    """Cast on the device, the bf16 transformer would first have to fit there whole."""
    from diffusers import FluxTransformer2DModel

    from core.configs import TINY
    from train.run import place_frozen

    tr = FluxTransformer2DModel(**TINY["transformer"]).to(torch.bfloat16)
    moved = []
    real = tr.to

    def spy(*args, **kw):
        if args and isinstance(args[0], (str, torch.device)):
            moved.append(tr.transformer_blocks[0].ff.net[2].weight.dtype)
        return real(*args, **kw)

    tr.to = spy
    place_frozen(tr, "cpu", torch.bfloat16, "float8_e4m3fn")
    assert moved == [torch.float8_e4m3fn]
    assert tr.transformer_blocks[0].ff.net[2].weight.dtype == torch.float8_e4m3fn
    place_frozen(tr2 := FluxTransformer2DModel(**TINY["transformer"]), "cpu", torch.bfloat16, "bfloat16")
    assert tr2.transformer_blocks[0].ff.net[2].weight.dtype == torch.bfloat16


def test_two_processes_train_with_ddp(dataset, tmp_path):
    """A new ControlNet without single blocks has parameters without gradients: DDP (gloo, two CPU
    processes launched by torchrun, which accelerate reads) raises "Expected to have finished
    reduction" unless they are found and frozen (it does with the freezing removed)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "train"]
    cmd += ["--data", str(dataset), "--control", "canny", "--out", str(tmp_path), "--demo", "--new-controlnet"]
    cmd += ["--new-layers", "2", "--steps", "4", "--resolution", "64", "--lr", "1e-3", "--validation-images", "0"]
    cmd += ["--no-gradient-checkpointing", "--log-every", "0", "--tier", "cpu"]
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "Expected to have finished reduction" not in p.stderr
    summary = json.loads(p.stdout.strip().splitlines()[-1])
    assert summary["processes"] == 2 and summary["frozen_unused"]
    assert Path(summary["out"], "diffusion_pytorch_model.safetensors").is_file()


def test_the_app_runs_a_controlnet_trained_on_the_demo_model(trained):
    import app

    summary, _ = trained
    engine = app.build_engine(app.parse_args(["--demo", "--controlnet", summary["out"]]))
    assert engine.spec.controlnet == summary["out"] and engine.spec.demo
    assert app.build_engine(app.parse_args(["--demo"])).spec == ModelSpec.demo_spec()


@pytest.mark.gpu
def test_the_demo_model_trains_on_the_gpu_in_bf16(dataset, tmp_path):
    """The GPU path end to end at demo size: bf16 weights, core's placement, validation by the engine."""
    torch.cuda.reset_peak_memory_stats()
    summary = run(config(dataset, tmp_path, tier="auto", steps=12, validate_every=6, lr=1e-3))
    assert summary["placement"]["device"] == "cuda" and summary["placement"]["dtype"] == "bfloat16"
    assert all(np.isfinite(_log(tmp_path)["losses"]))
    assert all("images" in v for v in summary["validation"])
    assert summary["peak_memory_gb"] > 0
