"""The app over two engines (app.py --gpus 2; CPU replicas of the demo model here): 16 concurrent API
jobs spread over both, all complete, and each equals the single-engine app's image for its seed."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from tests.ui.conftest import free_port
from tests.ui.test_app import api_args


def serve(engine):
    from ui import create_demo

    demo = create_demo(engine)
    port = free_port()
    demo.queue(max_size=32).launch(
        prevent_thread_lock=True, server_port=port, server_name="127.0.0.1", quiet=True, max_file_size="50mb"
    )
    return demo, f"http://127.0.0.1:{port}/"


@pytest.fixture(scope="module")
def pool_url():
    from core.models import ModelSpec
    from core.pool import build_pool

    demo, url = serve(build_pool(ModelSpec.demo_spec(), replicas=2))
    gen = next(f for f in demo.fns.values() if f.api_name == "generate")
    assert gen.concurrency_limit == 2 and gen.concurrency_id == "gpu"
    try:
        yield url
    finally:
        demo.close()


@pytest.fixture(scope="module")
def single_url():
    """The app over one fresh engine (the session's shared demo engine has run other tests' jobs)."""
    from core.engine import Engine
    from core.models import ModelSpec

    demo, url = serve(Engine(ModelSpec.demo_spec()))
    try:
        yield url
    finally:
        demo.close()


def test_sixteen_api_jobs_spread_over_two_engines(pool_url, single_url, example_photo):
    from gradio_client import Client, handle_file

    def args(seed):
        a = api_args(handle_file(example_photo), upscale="1", max_side=128, controls=(("canny", 0.7),))
        a[13] = seed  # the seed (randomize_seed is False)
        return a

    client = Client(pool_url, verbose=False)
    jobs = [client.submit(*args(k % 4), api_name="/generate") for k in range(16)]
    results = [j.result(timeout=300) for j in jobs]
    ran_on = [next(e for e in r[1]["events"] if e.startswith("ran on ")) for r in results]
    assert set(ran_on) == {"ran on CPU replica 0", "ran on CPU replica 1"}, ran_on
    single = Client(single_url, verbose=False)
    for seed in range(4):
        want = np.asarray(Image.open(single.predict(*args(seed), api_name="/generate")[0]))
        for k in range(seed, 16, 4):
            assert np.array_equal(np.asarray(Image.open(results[k][0])), want), (seed, k, ran_on[k])


def test_the_gpus_flag(capsys):
    import app

    assert app.gpu_count("all", 4) == 4 and app.gpu_count("2", None) == 2
    with pytest.raises(ValueError, match="positive number or 'all'"):
        app.gpu_count("0", 2)
    with pytest.raises(ValueError, match="this machine has 2 GPU"):
        app.gpu_count("3", 2)
    assert app.build_engine(app.parse_args(["--demo", "--gpus", "2"])).replicas == 2
    assert app.main(["--demo", "--gpus", "two"]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last == "error: --gpus must be a positive number or 'all', got 'two'."
