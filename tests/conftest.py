"""Shared test setup: offline, a per-machine demo-model cache, the demo engine built once, GPU marker."""

import os
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("FLUX_ANYVRAM_CACHE", str(Path(tempfile.gettempdir()) / "flux-anyvram-tests"))
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def demo_engine():
    from core.engine import Engine
    from core.models import ModelSpec

    engine = Engine(ModelSpec.demo_spec())
    engine.load()
    return engine


@pytest.fixture(scope="session")
def astronaut():
    import skimage.data
    from PIL import Image

    return Image.fromarray(skimage.data.astronaut())
