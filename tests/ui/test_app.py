"""The Gradio app: built without launching, then launched and driven through gradio_client."""

from __future__ import annotations

import time

import pytest
from PIL import Image

from core.pngmeta import read_params


def api_args(photo, *, steps=2, upscale="2", max_side=256, controls=(("canny", 0.7), ("depth", 0.6))):
    """generate's positional parameters, in the order of the API."""
    rows = list(controls) + [("none", 0.7)] * (3 - len(controls))
    flat = [v for kind, scale in rows for v in (kind, scale, 0.8)]
    return [photo, "an astronaut, studio light", *flat, "auto", upscale, 5, False, steps, 3.5, max_side]


def test_create_demo_builds_without_launching(demo_engine):
    from ui import create_demo

    demo = create_demo(demo_engine)
    info = demo.get_api_info()
    names = list(info["named_endpoints"])
    assert names == ["/generate"], names  # helper events stay out of the API
    params = [p["parameter_name"] for p in info["named_endpoints"]["/generate"]["parameters"]]
    assert params[:5] == ["image", "prompt", "control_1", "scale_1", "end_1"]
    assert params[11:18] == ["tier", "upscale", "seed", "randomize_seed", "steps", "guidance", "max_side"]
    compile_ = info["named_endpoints"]["/generate"]["parameters"][-1]  # added last: positional callers keep working
    assert compile_["parameter_name"] == "compile" and compile_["parameter_default"] == "auto", compile_
    assert demo._queue.max_size == 8
    gen = next(f for f in demo.fns.values() if f.api_name == "generate")
    assert gen.concurrency_limit == 1 and gen.concurrency_id == "gpu"
    assert not demo.is_running


def test_generate_two_controls_and_upscale(app_url, example_photo):
    from gradio_client import Client, handle_file

    client = Client(app_url, verbose=False)
    path, summary, seed = client.predict(*api_args(handle_file(example_photo)), api_name="/generate")
    img = Image.open(path)
    assert img.format == "PNG" and max(img.size) == 512 == summary["size"][0]  # 256 generated, 2× upscaled
    params = read_params(path)
    assert params["demo"] is True and params["job"]["seed"] == seed == 5
    assert [c["kind"] for c in params["job"]["controls"]] == ["canny", "depth"]
    assert params["job"]["upscale"] == 2.0 and params["job"]["steps"] == 2 and params["plan"]["tier"] == "cpu"
    assert summary["demo"] and summary["timeline"] and "denoise" in summary["seconds"]


def test_bad_input_gives_the_core_sentence(app_url, example_photo):
    from gradio_client import Client, handle_file

    client = Client(app_url, verbose=False)
    args = api_args(handle_file(example_photo))
    args[1] = "   "
    with pytest.raises(Exception, match="prompt must be a non-empty text"):
        client.predict(*args, api_name="/generate")


def test_two_requests_run_one_at_a_time(app_url, example_photo):
    from gradio_client import Client, handle_file

    client = Client(app_url, verbose=False)
    args = api_args(handle_file(example_photo), upscale="1", max_side=128, controls=(("canny", 0.7),))
    jobs = [client.submit(*args, api_name="/generate") for _ in range(2)]
    results = [j.result(timeout=120) for j in jobs]
    spans = sorted((r[1]["started_at"], r[1]["finished_at"]) for r in results)
    assert all(Image.open(r[0]).size == (128, 128) for r in results)
    assert spans[0][1] <= spans[1][0], f"the jobs overlapped: {spans}"


def test_cancel_then_next_request_completes(app_url, example_photo, demo_engine):
    from gradio_client import Client, handle_file

    client = Client(app_url, verbose=False)
    photo = handle_file(example_photo)
    long = client.submit(
        *api_args(photo, steps=100, upscale="1", max_side=256, controls=(("canny", 0.7),)), api_name="/generate"
    )
    deadline = time.time() + 60
    while not demo_engine.busy:  # wait until the engine is running it
        assert time.time() < deadline, "the long job never started"
        time.sleep(0.1)
    time.sleep(0.5)
    long.cancel()
    t = time.time()
    while demo_engine.busy:  # the engine polls the cancel flag between steps
        assert time.time() - t < 8, "the engine kept running after the cancel"
        time.sleep(0.1)
    print(f"engine stopped {time.time() - t:.2f} s after the cancel")
    path, summary, _ = client.predict(
        *api_args(photo, upscale="1", max_side=128, controls=(("canny", 0.7),)), api_name="/generate"
    )
    assert Image.open(path).size == (128, 128)
    assert summary["started_at"] > t - 1


def test_moving_a_canny_threshold_reruns_only_canny_previews(demo_engine, example_photo):
    """The depth preview runs a model (~1 s on the CPU): a canny slider must not re-run it."""
    import gradio as gr

    from ui import create_demo

    demo = create_demo(demo_engine)
    low = next(b for b in demo.blocks.values() if isinstance(b, gr.Slider) and b.label == "low")
    fns = [f for f in demo.fns.values() if any(t[0] == low._id for t in f.targets)]
    assert fns and {f.fn.__name__ for f in fns} == {"canny_preview"}, [f.fn.__name__ for f in fns]
    fn = fns[0].fn
    assert fn(example_photo, "depth", False, 10, 20) == gr.skip()
    assert fn(example_photo, "canny", False, 10, 20) is not None
