"""The app launched on a free local port with the demo engine (one per test module)."""

from __future__ import annotations

import socket

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def app_url(demo_engine):
    from ui import create_demo

    demo = create_demo(demo_engine)
    port = free_port()
    demo.queue(max_size=8).launch(
        prevent_thread_lock=True, server_port=port, server_name="127.0.0.1", quiet=True, max_file_size="50mb"
    )
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        demo.close()


@pytest.fixture(scope="module")
def example_photo():
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "assets" / "astronaut.png"
    assert path.is_file(), "run assets/make_examples.py"
    return str(path)
