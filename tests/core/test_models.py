"""Loading models: one actionable sentence for everything that can go wrong, and the demo model."""

import os
import time

import pytest
import torch

from core.configs import FLUX_DEV, UNION_PRO
from core.models import ModelSpec, ModelUnavailableError, _explain, has_mode_ids, load_controlnet, load_pipeline


def assert_one_sentence(msg):
    assert msg.endswith("."), msg
    assert "\n" not in msg and "Traceback" not in msg and 'File "' not in msg, msg
    assert ". " not in msg.rstrip("."), f"more than one sentence: {msg}"
    assert len(msg) < 400, msg


@pytest.fixture(scope="module")
def demo():
    return ModelSpec.demo_spec()


def test_tests_run_offline():
    assert os.environ.get("HF_HUB_OFFLINE") == "1"


def test_uncached_hub_model_offline_is_one_sentence(demo):
    t = time.perf_counter()
    with pytest.raises(ModelUnavailableError) as info:
        load_pipeline(ModelSpec(base=FLUX_DEV, controlnet=demo.controlnet), torch.float32)
    msg = str(info.value)
    assert_one_sentence(msg)
    assert FLUX_DEV in msg and "HF_HUB_OFFLINE" in msg and "local folder" in msg and "--model" in msg
    assert "snapshot" not in msg and "OSError" not in msg  # the library's own text stays out
    assert time.perf_counter() - t < 60, "offline must fail fast, not retry the network"


def test_uncached_hub_controlnet_offline_names_the_controlnet():
    with pytest.raises(ModelUnavailableError) as info:
        load_pipeline(ModelSpec(), torch.float32)  # the ControlNet is loaded first
    msg = str(info.value)
    assert_one_sentence(msg)
    assert UNION_PRO in msg and "controlnet" in msg and "--controlnet" in msg and "HF_HUB_OFFLINE" in msg


@pytest.mark.parametrize("path", ["/nonexistent/flux-model", "./no/such/folder", "~/no-such-flux-folder-xyz"])
def test_missing_local_folder(demo, path):
    with pytest.raises(ModelUnavailableError) as info:
        load_pipeline(ModelSpec(base=path, controlnet=demo.controlnet), torch.float32)
    msg = str(info.value)
    assert_one_sentence(msg)
    assert path in msg and "does not exist" in msg and "model" in msg


def test_missing_local_controlnet_folder(tmp_path):
    with pytest.raises(ModelUnavailableError, match="controlnet folder .* does not exist"):
        load_controlnet(str(tmp_path / "gone"), torch.float32)


@pytest.mark.parametrize("what", ["model", "controlnet"])
def test_folder_without_safetensors(tmp_path, demo, what):
    folder = tmp_path / "weights"
    (folder / "transformer").mkdir(parents=True)
    (folder / "model_index.json").write_text("{}")
    (folder / "config.json").write_text("{}")
    (folder / "transformer" / "diffusion_pytorch_model.bin").write_bytes(b"\0" * 64)
    spec = (
        ModelSpec(base=str(folder), controlnet=demo.controlnet)
        if what == "model"
        else ModelSpec(base=demo.base, controlnet=str(folder))
    )
    with pytest.raises(ModelUnavailableError) as info:
        load_pipeline(spec, torch.float32)
    msg = str(info.value)
    assert what in msg and str(folder) in msg and ".safetensors" in msg
    assert "\n" not in msg and msg.endswith(".")


def test_damaged_local_folder_is_not_blamed_on_the_hub(tmp_path, demo):
    folder = tmp_path / "cn"
    folder.mkdir()
    (folder / "config.json").write_text('{"_class_name": "FluxControlNetModel"}')
    (folder / "diffusion_pytorch_model.safetensors").write_bytes(b"junk")
    with pytest.raises(ModelUnavailableError) as info:
        load_pipeline(ModelSpec(base=demo.base, controlnet=str(folder)), torch.float32)
    msg = str(info.value)
    assert "hf download" not in msg and "cache" not in msg, msg


def test_explain_messages(monkeypatch):
    gated = _explain("org/gated-model", "model", OSError("401 Client Error: access to this gated repo"))
    assert "gated" in str(gated) and "licence" in str(gated) and "HF_TOKEN" in str(gated)
    assert_one_sentence(str(gated))
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    net = _explain("org/some-model", "controlnet", ConnectionError("Max retries exceeded with url: ..."))
    msg = str(net)
    assert_one_sentence(msg)
    assert "ConnectionError" in msg and "Max retries" not in msg and "--controlnet" in msg
    assert "HF_HUB_OFFLINE" not in msg
    assert isinstance(net, ModelUnavailableError) and isinstance(net, RuntimeError)


def test_demo_model_loads_through_the_normal_path(demo):
    from diffusers import FluxControlNetPipeline, FluxMultiControlNetModel

    pipe = load_pipeline(demo, torch.float32)
    assert isinstance(pipe, FluxControlNetPipeline)
    assert isinstance(pipe.controlnet, FluxMultiControlNetModel) and len(pipe.controlnet.nets) == 1
    assert pipe.transformer.dtype == torch.float32 and pipe.controlnet.nets[0].dtype == torch.float32
    assert has_mode_ids(pipe)
    assert all(p.device.type == "cpu" for p in pipe.transformer.parameters())
    assert demo.demo and ModelSpec().demo is False


def test_pro2_demo_has_no_mode_ids():
    pipe = load_pipeline(ModelSpec.demo_spec(pro2=True), torch.bfloat16)
    assert not has_mode_ids(pipe)
    assert pipe.transformer.dtype == torch.bfloat16


def test_demo_model_folder_is_built_once(demo):
    from core.demo_model import demo_dir, ensure_demo_model

    root = ensure_demo_model()
    assert root == demo_dir() and (root / "done").exists()
    assert str(root) in demo.base and str(root) in demo.controlnet
    for sub in ("flux", "controlnet-union", "controlnet-union-pro2"):
        assert any((root / sub).rglob("*.safetensors")), sub
        assert not any((root / sub).rglob("*.bin")), sub
    stamp = (root / "done").stat().st_mtime_ns
    assert ensure_demo_model() == root and (root / "done").stat().st_mtime_ns == stamp
