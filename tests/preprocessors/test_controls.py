"""Control preprocessors on real photos, the registry table and control-argument parsing."""

from __future__ import annotations

import dataclasses
import importlib
import logging
import math

import cv2
import numpy as np
import pytest
from PIL import Image
from skimage import data

from preprocessors import (
    CONTROLS,
    blur,
    canny,
    depth,
    depth_model_is_demo,
    get_control,
    gray,
    low_quality,
    parse_control_arg,
    pose,
    preprocess,
    random_detector_notes,
    softedge,
    tile,
)

# The package re-exports the function `depth`, which shadows the submodule's attribute name.
depth_module = importlib.import_module("preprocessors.depth")

PHOTOS = {
    "astronaut": data.astronaut,
    "coffee": data.coffee,
    "chelsea": data.chelsea,
    "rocket": data.rocket,
}


@pytest.fixture(scope="module", params=list(PHOTOS))
def photo(request) -> Image.Image:
    return Image.fromarray(PHOTOS[request.param]())


@pytest.fixture(scope="module", autouse=True)
def demo_cache(tmp_path_factory):
    """Keep the demo depth model out of the user's real cache folder."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FLUX_ANYVRAM_CACHE", str(tmp_path_factory.mktemp("flux-cache")))
        yield


def _gray(img: Image.Image) -> np.ndarray:
    return np.asarray(img.convert("L"))


def _gradient_energy(img: Image.Image) -> float:
    g = _gray(img).astype(np.float64)
    return float((np.diff(g, axis=0) ** 2).mean() + (np.diff(g, axis=1) ** 2).mean())


def _corr(a: Image.Image, b: Image.Image) -> float:
    x = np.asarray(a, np.float64).ravel()
    y = np.asarray(b, np.float64).ravel()
    return float(np.corrcoef(x, y)[0, 1])


def _assert_rgb_same_size(out: Image.Image, src: Image.Image) -> None:
    assert isinstance(out, Image.Image) and out.mode == "RGB" and out.size == src.size


# --- canny -------------------------------------------------------------------------------


@pytest.mark.parametrize("low, high", [(100, 200), (50, 150), (0, 255)])
def test_canny_matches_opencv(photo, low, high):
    out = canny(photo, low, high)
    _assert_rgb_same_size(out, photo)
    arr = np.asarray(out)
    assert (arr[..., 0] == arr[..., 1]).all() and (arr[..., 1] == arr[..., 2]).all()
    assert np.array_equal(arr[..., 0], cv2.Canny(_gray(photo), low, high))


def test_canny_auto_thresholds_follow_the_median(photo):
    g = _gray(photo)
    median = float(np.median(g))
    low, high = int(max(0, 0.67 * median)), int(min(255, 1.33 * median))
    arr = np.asarray(canny(photo))[..., 0]
    assert np.array_equal(arr, cv2.Canny(g, low, high))
    assert set(np.unique(arr)) <= {0, 255}
    fraction = (arr > 0).mean()
    assert 0.01 < fraction < 0.35, fraction  # photos have edges, but are not all edges


@pytest.mark.parametrize("value", [0, 128, 255])
def test_canny_flat_image_has_no_edges(value):
    flat = Image.new("RGB", (128, 96), (value, value, value))
    assert np.asarray(canny(flat)).max() == 0


@pytest.mark.parametrize(
    "low, high",
    [(200, 100), (100, 100), (-1, 100), (10, 256), (float("nan"), 100), (True, 100), ("1", 9)],
)
def test_canny_rejects_bad_thresholds(low, high):
    with pytest.raises(ValueError, match="low|high"):
        canny(Image.new("RGB", (64, 64)), low, high)


# --- depth (tiny random demo model: CPU, no downloads) -----------------------------------


def test_depth_demo_output(photo):
    out = depth(photo, demo=True)
    _assert_rgb_same_size(out, photo)
    arr = np.asarray(out)
    assert arr.min() == 0 and arr.max() == 255  # normalised to the full range
    assert (arr[..., 0] == arr[..., 1]).all() and (arr[..., 1] == arr[..., 2]).all()


def test_depth_demo_is_safetensors_and_cached():
    first = depth_module._get_model(None, "cpu", demo=True)
    assert first.is_demo and depth_module._get_model(None, "cpu", demo=True) is first
    assert depth_module._load_demo("cpu").is_demo  # (re)uses the folder under our cache root
    folder = depth_module.demo_model_dir()
    assert (folder / "model.safetensors").is_file() and (folder / "preprocessor_config.json").is_file()
    assert not list(folder.glob("*.bin"))


def test_depth_demo_logs_a_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="preprocessors.depth"):
        depth(Image.new("RGB", (96, 64), "gray"), demo=True)
    assert any("demo" in r.getMessage() for r in caplog.records)


def test_missing_local_folder_falls_back_to_demo(tmp_path, caplog):
    missing = str(tmp_path / "no-such-model")
    with caplog.at_level(logging.WARNING, logger="preprocessors.depth"):
        assert depth_model_is_demo(missing, device="cpu") is True
        out = depth(Image.new("RGB", (80, 64), "white"), source=missing, device="cpu")
    assert out.size == (80, 64)
    assert any("unavailable" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize(
    "pred, expected",
    [
        (np.full((4, 4), 3.0), np.zeros((4, 4), np.uint8)),  # constant map: no information
        (np.array([[0.0, 1.0], [2.0, 4.0]]), np.array([[0, 64], [128, 255]], np.uint8)),
        (np.array([[-2.0, -1.0]]), np.array([[0, 255]], np.uint8)),
    ],
)
def test_depth_normalisation(pred, expected):
    assert np.array_equal(depth_module._normalise(pred), expected)


# --- simple controls ---------------------------------------------------------------------


def test_blur_reduces_gradient_energy(photo):
    out = blur(photo, 5.0)
    _assert_rgb_same_size(out, photo)
    assert _gradient_energy(out) < 0.5 * _gradient_energy(photo)
    assert _gradient_energy(blur(photo, 10.0)) < _gradient_energy(out)
    assert np.array_equal(np.asarray(blur(photo, 0)), np.asarray(photo))


def test_tile_is_a_soft_copy(photo):
    out = tile(photo)
    _assert_rgb_same_size(out, photo)
    assert _gradient_energy(out) < 0.5 * _gradient_energy(photo)
    assert _corr(out, photo) > 0.85
    assert np.array_equal(np.asarray(tile(photo, 1)), np.asarray(photo))


def test_gray_has_equal_channels(photo):
    out = gray(photo)
    _assert_rgb_same_size(out, photo)
    arr = np.asarray(out)
    assert (arr[..., 0] == arr[..., 1]).all() and (arr[..., 1] == arr[..., 2]).all()
    assert np.array_equal(arr[..., 0], _gray(photo))


def test_low_quality_differs_but_correlates(photo):
    out = low_quality(photo)
    _assert_rgb_same_size(out, photo)
    diff = np.abs(np.asarray(out, np.int16) - np.asarray(photo, np.int16)).mean()
    assert diff > 2.0
    assert _corr(out, photo) > 0.8
    worse = low_quality(photo, downscale=8, jpeg_quality=5)
    assert _corr(worse, photo) < _corr(out, photo)


@pytest.mark.parametrize("mode", ["L", "RGBA", "P"])
def test_simple_ops_accept_other_modes(mode):
    src = Image.fromarray(data.coffee()).convert(mode)
    for fn in (tile, blur, gray, low_quality, canny):
        _assert_rgb_same_size(fn(src), src)


@pytest.mark.parametrize(
    "fn, kwargs, name",
    [
        (tile, {"downscale": 0}, "downscale"),
        (tile, {"downscale": 2.5}, "downscale"),
        (blur, {"radius": -1}, "radius"),
        (blur, {"radius": float("inf")}, "radius"),
        (low_quality, {"downscale": 0}, "downscale"),
        (low_quality, {"jpeg_quality": 0}, "jpeg_quality"),
        (low_quality, {"jpeg_quality": 101}, "jpeg_quality"),
    ],
)
def test_simple_ops_validate_parameters(fn, kwargs, name):
    with pytest.raises(ValueError, match=name):
        fn(Image.new("RGB", (64, 64)), **kwargs)


def test_functions_reject_non_images():
    for fn in (tile, blur, gray, low_quality, canny, depth, pose, softedge):
        with pytest.raises(TypeError, match="PIL"):
            fn(np.zeros((64, 64, 3), np.uint8))


# --- registry ----------------------------------------------------------------------------

EXPECTED = {
    # name: (mode id, default scale, in Union-Pro-2.0, function, default end, runs a model)
    "canny": (0, 0.7, True, canny, 0.8, False),
    "tile": (1, 0.45, False, tile, 0.8, False),
    "depth": (2, 0.8, True, depth, 0.8, True),
    "blur": (3, 0.6, False, blur, 0.8, False),
    "gray": (5, 0.6, True, gray, 0.8, False),
    "lq": (6, 0.5, False, low_quality, 0.8, False),
    "pose": (4, 0.9, True, pose, 0.65, True),  # Union-Pro-2.0's card: pose 0.9, end 0.65
    "softedge": (0, 0.7, True, softedge, 0.8, True),  # soft edge 0.7 / 0.8; canny's mode elsewhere
}


def test_registry_table():
    assert list(CONTROLS) == list(EXPECTED)  # the UI lists controls in this order
    for name, (mode_id, scale, pro2, fn, end, model) in EXPECTED.items():
        kind = get_control(name)
        got = (kind.name, kind.mode_id, kind.default_scale, kind.in_pro2, kind.fn, kind.default_end, kind.uses_model)
        assert got == (name, mode_id, scale, pro2, fn, end, model)
        assert kind.label and len(kind.label) <= 24
    assert get_control("pose").label == "Pose (body keypoints)" and get_control("softedge").label == "Soft edge"
    with pytest.raises(dataclasses.FrozenInstanceError):
        CONTROLS["canny"].mode_id = 3


def test_get_control_normalises_and_rejects():
    assert get_control("  Canny ").name == "canny"
    assert get_control("SoftEdge").name == "softedge"
    with pytest.raises(ValueError) as info:
        get_control("scribble")
    assert str(info.value) == (
        "Unknown control 'scribble'; choose one of: canny, tile, depth, blur, gray, lq, pose, softedge."
    )


def test_preprocess_dispatches_and_checks_parameters():
    img = Image.fromarray(data.astronaut())
    assert np.array_equal(np.asarray(preprocess("canny", img, low=50, high=150)), np.asarray(canny(img, 50, 150)))
    assert np.array_equal(np.asarray(preprocess("gray", img)), np.asarray(gray(img)))
    with pytest.raises(ValueError, match="does not take parameter 'radius'; it takes: low, high"):
        preprocess("canny", img, radius=3)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("canny", ("canny", None)),
        ("canny=0.6", ("canny", 0.6)),
        (" Depth = 1.2 ", ("depth", 1.2)),
        ("lq=0", ("lq", 0.0)),
        ("tile=2", ("tile", 2.0)),
        ("gray=1e-1", ("gray", 0.1)),
        ("blur=.5", ("blur", 0.5)),
        ("pose", ("pose", None)),
        ("SoftEdge=0.7", ("softedge", 0.7)),
    ],
)
def test_parse_control_arg_accepts(text, expected):
    name, scale = parse_control_arg(text)
    assert name == expected[0]
    assert scale == expected[1] or math.isclose(scale, expected[1])


@pytest.mark.parametrize(
    "text, pattern",
    [
        ("canny=abc", "must be a number from 0 to 2"),
        ("canny=", "must be a number from 0 to 2"),
        ("canny=nan", "must be a number from 0 to 2"),
        ("canny=inf", "must be a number from 0 to 2"),
        ("canny=-0.1", "must be a number from 0 to 2"),
        ("canny=2.01", "must be a number from 0 to 2"),
        ("canny=0.5=1", "must be a number from 0 to 2"),
        ("scribble=0.5", "Unknown control 'scribble'"),
        ("=0.5", "Unknown control ''"),
        ("", "'name' or 'name=scale'"),
        ("   ", "'name' or 'name=scale'"),
    ],
)
def test_parse_control_arg_rejects(text, pattern):
    with pytest.raises(ValueError, match=pattern) as info:
        parse_control_arg(text)
    message = str(info.value)
    assert message.endswith(".") and "\n" not in message


def test_random_detector_notes_name_the_models_to_download():
    # tests run offline (conftest): the default weights are not in the cache, random models stand in
    notes = random_detector_notes(["canny", "pose", "softedge"], device="cpu")
    assert len(notes) == 2
    assert "usyd-community/vitpose-base-simple" in notes[0] and "PekingU/rtdetr_r50vd_coco_o365" in notes[0]
    assert "kornia/dexined" in notes[1] and all("random" in n for n in notes)
    assert random_detector_notes(["canny", "depth"], device="cpu") == []
