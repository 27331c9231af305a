"""Bad input through the API door: one sentence back, nothing run, the server alive.
(NaN/inf cannot travel in JSON; the Python API's handling of them is tested in tests/core.)"""

from __future__ import annotations

import pytest
from PIL import Image

from .test_app import api_args


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    d = tmp_path_factory.mktemp("hostile")
    (d / "text.png").write_text("this is not an image")
    (d / "empty.png").write_bytes(b"")
    Image.new("RGB", (8, 8)).save(d / "tiny.png")
    Image.new("RGB", (2000, 100)).save(d / "wide.png")
    return d


@pytest.mark.parametrize(
    "case,change,message",
    [
        ("text renamed .png", {"image": "text.png"}, "not an image"),
        ("zero bytes", {"image": "empty.png"}, "empty"),
        ("8×8 image", {"image": "tiny.png"}, "at least 64"),
        ("20:1 image", {"image": "wide.png"}, "aspect"),
        ("10 000-character prompt", {1: "x" * 10_000}, "limit is 2000"),
        ("unknown control", {2: "scribble"}, "not in the list of choices"),
        ("steps 0", {15: 0}, "less than minimum value 1"),
        ("guidance 1000", {16: 1000}, "greater than maximum value"),
        ("upscale 100", {12: "100"}, "not in the list of choices"),
        ("tier the machine can't hold", {11: "24"}, "tier"),
    ],
)
def test_bad_input_is_one_sentence_and_the_server_survives(app_url, example_photo, hostile, case, change, message):
    from gradio_client import Client, handle_file

    client = Client(app_url, verbose=False)
    args = api_args(handle_file(example_photo), steps=1, upscale="1", max_side=96, controls=(("canny", 0.7),))
    for k, v in change.items():
        if k == "image":
            args[0] = handle_file(str(hostile / v))
        else:
            args[k] = v
    with pytest.raises(Exception) as err:
        client.predict(*args, api_name="/generate")
    text = str(err.value)
    assert message.lower() in text.lower(), (case, text)
    assert "Traceback" not in text
    ok = api_args(handle_file(example_photo), steps=1, upscale="1", max_side=96, controls=(("canny", 0.7),))
    path, _, _ = client.predict(*ok, api_name="/generate")  # still serving
    assert Image.open(path).size == (96, 96)
