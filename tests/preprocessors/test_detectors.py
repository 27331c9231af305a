"""The pose and soft-edge detectors on tiny random-weight models (CPU, no downloads): outputs, the
person-less note, several people, the offline fallback and the real loading code on local folders."""

from __future__ import annotations

import importlib
import logging

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data

from preprocessors import pose, pose_model_is_demo, softedge, softedge_model_is_demo

# The package re-exports the functions, which shadow the submodules' attribute names.
pose_module = importlib.import_module("preprocessors.pose")
edge_module = importlib.import_module("preprocessors.softedge")


@pytest.fixture(scope="module")
def photo() -> Image.Image:
    return Image.fromarray(data.astronaut()).resize((96, 96))


def _rgb_same_size(out: Image.Image, src: Image.Image) -> np.ndarray:
    assert isinstance(out, Image.Image) and out.mode == "RGB" and out.size == src.size
    return np.asarray(out)


# --- pose ----------------------------------------------------------------------------------------


def test_pose_demo_draws_on_black_and_is_deterministic(photo):
    out = _rgb_same_size(pose(photo, demo=True, device="cpu"), photo)
    assert out.max() > 0 and (out.sum(axis=2) == 0).mean() > 0.5  # a skeleton on a black map
    assert np.array_equal(out, np.asarray(pose(photo, demo=True, device="cpu")))


def test_pose_demo_logs_a_warning(photo, caplog):
    with caplog.at_level(logging.WARNING, logger="preprocessors.pose"):
        pose(photo, demo=True, device="cpu")
    assert any("random-weight demo" in r.getMessage() for r in caplog.records)


def test_a_person_less_photo_gives_a_black_map_and_a_note(photo, monkeypatch):
    monkeypatch.setattr(pose_module, "PERSON_SCORE", 1.0)  # the detector finds nobody
    out = pose(photo, demo=True, device="cpu")
    assert np.asarray(out).max() == 0 and out.size == photo.size
    assert out.info["note"] == pose_module.NO_PEOPLE and "No person" in out.info["note"]


def test_every_person_box_gets_its_keypoints():
    models = pose_module._get_models(None, None, "cpu", demo=True)
    flat = Image.new("RGB", (96, 96), (120, 120, 120))
    boxes = np.array([[10.0, 10.0, 30.0, 40.0], [50.0, 40.0, 30.0, 40.0]])  # COCO x, y, w, h
    people = pose_module._keypoints(models, flat, boxes)
    assert len(people) == 2 and all(p.shape == (18, 3) for p in people)
    # Top-down: the same crop in a box moved by (40, 30) gives the same person moved by (40, 30).
    first, second = people
    assert np.allclose(second[:, :2], first[:, :2] + (40, 30), atol=0.05)
    assert np.allclose(second[:, 2], first[:, 2])


def test_people_boxes_are_persons_inside_the_image(photo):
    models = pose_module._get_models(None, None, "cpu", demo=True)
    boxes = pose_module._people_boxes(models, photo)
    assert boxes.ndim == 2 and boxes.shape[1] == 4 and 1 <= len(boxes) <= pose_module.MAX_PEOPLE
    assert (boxes[:, :2] >= 0).all() and (boxes[:, 0] + boxes[:, 2] <= photo.width + 1e-3).all()
    assert (boxes[:, 2:] >= 1).all()


def test_pose_missing_folder_falls_back_to_demo(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="preprocessors.pose"):
        assert pose_model_is_demo(str(tmp_path / "no-such-model"), device="cpu") is True
    assert any("unavailable" in r.getMessage() for r in caplog.records)


def test_pose_loads_both_models_from_local_folders(tmp_path, photo):
    demo = pose_module._build_demo("cpu")
    est, det = tmp_path / "vitpose", tmp_path / "rtdetr"
    demo.estimator.save_pretrained(est, safe_serialization=True)
    demo.estimator_processor.save_pretrained(est)
    demo.detector.save_pretrained(det, safe_serialization=True)
    demo.detector_processor.save_pretrained(det)
    assert not list(tmp_path.rglob("*.bin"))
    assert pose_model_is_demo(str(est), str(det), device="cpu") is False
    real = pose(photo, source=str(est), detector=str(det), device="cpu")
    assert np.array_equal(np.asarray(real), np.asarray(pose(photo, demo=True, device="cpu")))


# --- soft edge -----------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [(96, 96), (70, 45)])  # DexiNed wants multiples of 16: resized there and back
def test_softedge_demo_output(size):
    src = Image.fromarray(data.coffee()).resize(size)
    out = _rgb_same_size(softedge(src, demo=True, device="cpu"), src)
    assert (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()
    assert out.std() > 0
    assert np.array_equal(out, np.asarray(softedge(src, demo=True, device="cpu")))


def test_softedge_input_is_bgr_minus_dexineds_mean():
    x = edge_module.to_input(np.array([[[10, 20, 30]]], np.uint8))
    assert x.shape == (3, 1, 1) and x.dtype == np.float32
    assert np.allclose(x[:, 0, 0], (30 - 103.939, 20 - 116.779, 10 - 123.68))


def test_softedge_missing_folder_falls_back_to_demo(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="preprocessors.softedge"):
        assert softedge_model_is_demo(str(tmp_path / "no-such-model"), device="cpu") is True
    assert any("unavailable" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("fmt", ["safetensors", "checkpoint"])
def test_softedge_loads_a_local_folder(tmp_path, photo, fmt):
    from safetensors.torch import save_file

    state = edge_module._build_demo("cpu").model.state_dict()
    if fmt == "safetensors":
        save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / edge_module.SAFETENSORS)
    else:
        torch.save(state, tmp_path / edge_module.CHECKPOINT)  # kornia's published layout
    assert softedge_model_is_demo(str(tmp_path), device="cpu") is False
    real = softedge(photo, source=str(tmp_path), device="cpu")
    assert np.array_equal(np.asarray(real), np.asarray(softedge(photo, demo=True, device="cpu")))


def test_softedge_refuses_a_checkpoint_that_carries_code(tmp_path):
    import pickle

    torch.save({"fn": print}, tmp_path / edge_module.CHECKPOINT)  # a pickled callable
    with pytest.raises(pickle.UnpicklingError):
        edge_module._load_from(str(tmp_path), "cpu")
