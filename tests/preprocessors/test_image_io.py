"""Hostile and unusual inputs for load_image, plus fit_size and resize_to."""

from __future__ import annotations

import inspect
import io
import math
import re
import resource
import struct
import time
import tracemalloc
import zlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from preprocessors import image_io
from preprocessors.image_io import ImageInputError, fit_size, load_image, resize_to

# --- builders: every hostile input is made here, in memory or under tmp_path --------------


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _photo(w: int = 96, h: int = 80) -> Image.Image:
    """A smooth colour gradient: compresses well and has content in every channel."""
    y, x = np.mgrid[0:h, 0:w]
    arr = np.stack([x * 255 // (w - 1), y * 255 // (h - 1), (x + y) * 255 // (w + h - 2)], -1)
    return Image.fromarray(arr.astype(np.uint8), "RGB")


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png_header_only(width: int, height: int) -> bytes:
    """A valid PNG signature and IHDR claiming width×height, with one tiny IDAT."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit grayscale
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + _png_chunk(b"IEND", b"")
    )


def _truncated_jpeg(tmp_path):
    data = _encode(_photo(256, 256), "JPEG", quality=90)
    return data[: len(data) // 2]


def _truncated_png(tmp_path):
    data = _encode(Image.fromarray(np.random.default_rng(0).integers(0, 255, (128, 128, 3), np.uint8)), "PNG")
    return data[: len(data) // 2]


def _text_as_png(tmp_path):
    path = tmp_path / "notes.png"
    path.write_text("this is a shopping list, not a picture\n")
    return path


def _empty_file(tmp_path):
    path = tmp_path / "empty.png"
    path.write_bytes(b"")
    return path


def _gray16(tmp_path):
    ramp = np.linspace(1000, 3000, 128 * 96).reshape(96, 128).astype(np.uint16)
    return _encode(Image.fromarray(ramp), "PNG")  # Pillow writes mode I;16 as 16-bit PNG


def _cmyk_jpeg(tmp_path):
    return _encode(_photo().convert("CMYK"), "JPEG", quality=95)


def _palette_transparent(tmp_path):
    img = Image.new("P", (96, 96), 1)
    img.putpalette([0, 0, 0, 200, 30, 30] + [0] * 762)
    img.paste(0, (0, 0, 48, 96))  # index 0, declared transparent below
    return _encode(img, "PNG", transparency=0)


def _rgba_clear(tmp_path):
    return Image.new("RGBA", (80, 80), (10, 200, 30, 0))


def _la(tmp_path):
    arr = np.zeros((80, 80, 2), np.uint8)
    arr[..., 0] = 100
    arr[:, :40, 1] = 255  # left half opaque gray, right half transparent
    return _encode(Image.fromarray(arr, "LA"), "PNG")


def _animated_gif(tmp_path):
    frames = [Image.new("RGB", (72, 72), c) for c in ((255, 0, 0), (0, 0, 255), (0, 255, 0))]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    return buf.getvalue()


def _exif_rotated(tmp_path):
    arr = np.full((64, 128, 3), 255, np.uint8)
    arr[:, :64] = 0  # stored: left half black, right half white
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    path = tmp_path / "rotated.jpg"
    Image.fromarray(arr).save(path, format="JPEG", quality=95, exif=exif)
    return path


def _tiny(tmp_path):
    return _encode(Image.new("RGB", (8, 8), "white"), "PNG")


def _strip(tmp_path):
    return _encode(Image.new("L", (10000, 16), 128), "PNG")


def _float_tiff(tmp_path):
    ramp = np.linspace(-5.0, 20.0, 96 * 96, dtype=np.float32).reshape(96, 96)
    return _encode(Image.fromarray(ramp, "F"), "TIFF")


def _int32_image(tmp_path):
    ramp = np.linspace(-70000, 90000, 96 * 96).reshape(96, 96).astype(np.int32)
    return Image.fromarray(ramp, "I")


def _one_bit(tmp_path):
    checker = (np.indices((96, 96)).sum(0) // 8 % 2).astype(bool)
    return _encode(Image.fromarray(checker), "PNG")


def _too_many_bytes(tmp_path, monkeypatch):
    monkeypatch.setattr(image_io, "MAX_UPLOAD_BYTES", 1024)
    noise = np.random.default_rng(1).integers(0, 255, (96, 96, 3), np.uint8)
    return _encode(Image.fromarray(noise), "PNG")  # ~27 KB > the patched 1 KiB


def _too_big_path(tmp_path, monkeypatch):
    path = tmp_path / "big.png"
    path.write_bytes(_too_many_bytes(tmp_path, monkeypatch))
    return path


def _float_array(tmp_path):
    return np.linspace(0.0, 1.0, 80 * 90 * 3).reshape(80, 90, 3)


def _float_array_out_of_range(tmp_path):
    return np.full((80, 80), 3.5)


def _nan_array(tmp_path):
    arr = np.zeros((80, 80), np.float32)
    arr[3, 3] = np.nan
    return arr


def _uint16_rgba_array(tmp_path):
    arr = np.zeros((80, 80, 4), np.uint16)
    arr[..., 0] = np.arange(80) * 800
    return arr


# Kinds: (builder, expected check or error pattern). A builder takes tmp_path, and
# monkeypatch too when it needs one.
def _check_gray16(img, arr):
    assert arr.min() <= 5 and arr.max() >= 250  # real range stretched, not clipped at 255
    assert (arr[..., 0] == arr[..., 2]).all()


def _check_cmyk(img, arr):
    ref = np.asarray(_photo(), np.float64)
    assert np.corrcoef(arr.ravel(), ref.ravel())[0, 1] > 0.95


def _check_palette(img, arr):
    assert (arr[:, :48] == 255).all()  # transparent half is white
    assert tuple(arr[50, 80]) == (200, 30, 30)


def _check_la(img, arr):
    assert (arr[:, :40] == 100).all() and (arr[:, 40:] == 255).all()


def _check_gif(img, arr):
    r, g, b = arr[36, 36]
    assert r > 200 and g < 50 and b < 50  # the first (red) frame


def _check_exif(img, arr):
    assert img.size == (64, 128)  # 128×64 stored, shown upright as 64×128
    assert arr[:60].mean() < 20 and arr[68:].mean() > 235  # stored left half is now on top


def _check_float_tiff(img, arr):
    assert arr.min() == 0 and arr.max() == 255


def _check_one_bit(img, arr):
    assert set(np.unique(arr)) == {0, 255}


def _check_float_array(img, arr):
    assert img.size == (90, 80) and arr.max() == 255 and arr.min() == 0


def _check_uint16_rgba(img, arr):
    assert arr[..., 0].max() == 255 and img.size == (80, 80)


def _check_photo(img, arr):
    ref = np.asarray(_photo(), np.float64)
    assert np.abs(arr - ref).mean() < 8


OK, BAD = "ok", "bad"
CASES = {
    "truncated_jpeg": (_truncated_jpeg, BAD, r"damaged or truncated"),
    "truncated_png": (_truncated_png, BAD, r"damaged or truncated"),
    "zero_bytes": (lambda t: b"", BAD, r"empty \(0 bytes\)"),
    "zero_byte_file": (_empty_file, BAD, r"empty"),
    "text_renamed_png": (
        _text_as_png,
        BAD,
        r"^The upload is not an image Pillow can read \(cannot identify image file\)\.$",
    ),
    "png_bomb_50000": (lambda t: _png_header_only(50000, 50000), BAD, r"2,500,000,000.*40,000,000"),
    "png_over_limit_7000": (lambda t: _png_header_only(7000, 7000), BAD, r"49,000,000.*limit is 40,000,000"),
    "gray16_png": (_gray16, OK, _check_gray16),
    "cmyk_jpeg": (_cmyk_jpeg, OK, _check_cmyk),
    "palette_transparency": (_palette_transparent, OK, _check_palette),
    "rgba_alpha_zero": (_rgba_clear, OK, lambda img, arr: (arr == 255).all()),
    "la_mode": (_la, OK, _check_la),
    "animated_gif": (_animated_gif, OK, _check_gif),
    "exif_orientation_6": (_exif_rotated, OK, _check_exif),
    "tiny_8x8": (_tiny, BAD, r"^The image is 8×8 pixels; the smallest side must be at least 64 pixels\.$"),
    "strip_10000x16": (_strip, BAD, r"10000×16.*aspect ratio"),
    "float32_tiff": (_float_tiff, OK, _check_float_tiff),
    "one_bit": (_one_bit, OK, _check_one_bit),
    "over_max_bytes": (_too_many_bytes, BAD, r"the upload limit is 1,024 bytes\.$"),
    "over_max_bytes_path": (_too_big_path, BAD, r"the upload limit is 1,024 bytes\.$"),
    "numpy_float": (_float_array, OK, _check_float_array),
    "numpy_float_out_of_range": (_float_array_out_of_range, BAD, r"\[0, 1\]"),
    "numpy_nan": (_nan_array, BAD, r"NaN"),
    "numpy_bad_shape": (lambda t: np.zeros((80, 80, 2), np.uint8), BAD, r"shape \(80, 80, 2\)"),
    "numpy_uint16_rgba": (_uint16_rgba_array, OK, _check_uint16_rgba),
    "bmp": (lambda t: _encode(_photo(), "BMP"), OK, _check_photo),
    "webp": (lambda t: _encode(_photo(), "WEBP", lossless=True), OK, _check_photo),
    "pil_ycbcr": (lambda t: _photo().convert("YCbCr"), OK, _check_photo),
    "pil_int32_mode_I": (_int32_image, OK, _check_float_tiff),
    "file_object": (lambda t: io.BytesIO(_encode(_photo(), "PNG")), OK, _check_photo),
    "missing_path": (lambda t: t / "nowhere.png", BAD, r"No image file was found"),
    "wrong_type": (lambda t: 12345, BAD, r"Unsupported image input of type int"),
}


def _build(builder, tmp_path, monkeypatch):
    wants_monkeypatch = len(inspect.signature(builder).parameters) == 2
    return builder(tmp_path, monkeypatch) if wants_monkeypatch else builder(tmp_path)


def _assert_one_sentence(message: str) -> None:
    assert message.endswith(".")
    assert "\n" not in message and "Traceback" not in message
    assert not re.search(r"\.\s+[A-Z]", message), message  # no second sentence
    assert "<" not in message  # no object reprs such as <_io.BytesIO object at 0x...>


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_hostile_inputs(case, tmp_path, monkeypatch):
    builder, outcome, expect = CASES[case]
    source = _build(builder, tmp_path, monkeypatch)
    start = time.perf_counter()
    if outcome == BAD:
        with pytest.raises(ImageInputError) as info:
            load_image(source)
        message = str(info.value)
        _assert_one_sentence(message)
        assert re.search(expect, message), message
        assert info.value.__cause__ is None  # raised "from None": no chained traceback
    else:
        img = load_image(source)
        assert isinstance(img, Image.Image) and img.mode == "RGB"
        arr = np.asarray(img).astype(np.int64)
        assert expect(img, arr) is not False
    assert time.perf_counter() - start < 5.0


def test_bomb_rejected_before_decoding():
    data = _png_header_only(50000, 50000)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    tracemalloc.start()
    start = time.perf_counter()
    try:
        with pytest.raises(ImageInputError):
            load_image(data)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert time.perf_counter() - start < 1.0
    assert peak < 50 * 2**20
    # Pillow's pixel buffers are C allocations tracemalloc cannot see; peak RSS (KiB) would.
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before < 50 * 1024


def test_pillow_bomb_limit_matches_ours():
    assert Image.MAX_IMAGE_PIXELS == image_io.MAX_INPUT_PIXELS == 40_000_000


def test_pil_input_is_not_modified_or_returned():
    src = Image.new("RGB", (80, 80), (1, 2, 3))
    out = load_image(src)
    assert out is not src
    out.paste((9, 9, 9), (0, 0, 10, 10))
    assert src.getpixel((0, 0)) == (1, 2, 3)


def test_path_and_bytes_agree(tmp_path):
    path = tmp_path / "photo.png"
    _photo().save(path)
    assert np.array_equal(np.asarray(load_image(path)), np.asarray(load_image(path.read_bytes())))
    assert np.array_equal(np.asarray(load_image(str(path))), np.asarray(_photo()))


# --- fit_size ----------------------------------------------------------------------------


def _within_one_step(w, h, out_w, out_h, m) -> bool:
    """Some scale s puts both sides within one multiple of the exact scaled size."""
    lo = max((out_w - m) / w, (out_h - m) / h)
    hi = min((out_w + m) / w, (out_h + m) / h)
    return lo <= hi


@pytest.mark.parametrize(
    "args, kwargs, expected",
    [
        ((1024, 1024), {}, (1024, 1024)),
        ((1000, 750), {}, (1008, 752)),
        ((513, 513), {}, (512, 512)),
        ((10, 10), {}, (16, 16)),
        ((4000, 3000), {"max_side": 1024}, (1024, 768)),
        ((3000, 4000), {"max_side": 1024}, (768, 1024)),
        ((1920, 1080), {"max_side": 1024}, (1024, 576)),
        ((800, 600), {"max_side": 1024}, (800, 608)),  # never scaled up
        ((1000, 1000), {"max_side": 1000}, (992, 992)),  # rounding up would break the limit
        ((100000, 100), {"max_side": 1024}, (1024, 16)),  # at least one multiple
        ((4000, 3000), {"max_pixels": 1024 * 1024}, (1184, 880)),
        ((4000, 3000), {"max_side": 2048, "max_pixels": 1024 * 1024}, (1184, 880)),
        ((1000, 700), {"multiple": 64}, (1024, 704)),
        ((1000, 700), {"multiple": 8, "max_side": 500}, (496, 352)),
    ],
)
def test_fit_size_table(args, kwargs, expected):
    out = fit_size(*args, **kwargs)
    assert out == expected
    m = kwargs.get("multiple", 16)
    assert out[0] % m == 0 and out[1] % m == 0
    assert _within_one_step(*args, *out, m)


@pytest.mark.parametrize(
    "args, kwargs, name",
    [
        ((0, 100), {}, "width"),
        ((100, -5), {}, "height"),
        ((float("nan"), 100), {}, "width"),
        (("100", 100), {}, "width"),
        ((100, 100), {"multiple": 0}, "multiple"),
        ((100, 100), {"multiple": 2.5}, "multiple"),
        ((100, 100), {"max_side": 0}, "max_side"),
        ((100, 100), {"max_side": 8}, "max_side"),
        ((100, 100), {"max_pixels": -1}, "max_pixels"),
        ((100, 100), {"max_pixels": 100}, "max_pixels"),
    ],
)
def test_fit_size_errors(args, kwargs, name):
    with pytest.raises(ValueError, match=name):
        fit_size(*args, **kwargs)


@settings(max_examples=300, deadline=None)
@given(
    w=st.integers(1, 20000),
    h=st.integers(1, 20000),
    m=st.sampled_from([8, 16, 64]),
    max_side=st.none() | st.integers(64, 4096),
    max_pixels=st.none() | st.integers(64 * 64, 10_000_000),
)
def test_fit_size_properties(w, h, m, max_side, max_pixels):
    out_w, out_h = fit_size(w, h, max_side=max_side, multiple=m, max_pixels=max_pixels)
    assert out_w % m == 0 and out_h % m == 0 and out_w >= m and out_h >= m
    if max_side is not None:
        assert max(out_w, out_h) <= max_side
    if max_pixels is not None:
        assert out_w * out_h <= max_pixels
    if max_side is None and max_pixels is None:
        assert abs(out_w - w) <= m / 2 or out_w == m
    assert _within_one_step(w, h, out_w, out_h, m)


# --- resize_to ---------------------------------------------------------------------------


def test_resize_to_exact_size_no_crop():
    src = _photo(300, 200)
    out = resize_to(src, 96, 64)
    assert out.size == (96, 64) and out.mode == "RGB"
    # Corners survive a plain resize (a cover-crop would cut them).
    ref = np.asarray(src.resize((96, 64), Image.Resampling.LANCZOS))
    assert np.array_equal(np.asarray(out), ref)
    same = resize_to(src, 300, 200)
    assert same is not src and np.array_equal(np.asarray(same), np.asarray(src))


@pytest.mark.parametrize("w, h", [(0, 10), (10, -1), (10.5, 10), (True, 10)])
def test_resize_to_rejects_bad_sizes(w, h):
    with pytest.raises(ValueError, match="width|height"):
        resize_to(_photo(), w, h)


def test_fit_then_resize_roundtrip():
    w, h = fit_size(4000, 3000, max_side=1024)
    assert resize_to(_photo(400, 300), w, h).size == (1024, 768)
    assert math.isclose(w / h, 4 / 3, rel_tol=0.02)
