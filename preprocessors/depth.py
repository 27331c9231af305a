"""Depth control image from Depth Anything V2 Small (transformers), near = bright.

When the real weights cannot be had (offline, missing folder) or demo=True, a tiny
random-weight Depth Anything stands in so the app still runs end to end; its maps are
meaningless and a warning says so. torch and transformers are imported lazily so that
importing this package stays cheap.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from . import weights

logger = logging.getLogger(__name__)

DEFAULT_DEPTH_SOURCE = "depth-anything/Depth-Anything-V2-Small-hf"
DEMO_SEED = 0
_DEMO_FILES = ("config.json", "model.safetensors", "preprocessor_config.json")


@dataclass(frozen=True)
class _DepthModel:
    model: Any
    processor: Any
    device: str
    dtype: Any
    is_demo: bool


_CACHE = weights.ModelCache()  # (source, device) → _DepthModel


def demo_model_dir() -> Path:
    root = Path(os.environ.get("FLUX_ANYVRAM_CACHE", "~/.cache/flux-anyvram")).expanduser()
    return root / "demo" / "depth"


def _load_from(source: str, device: str, is_demo: bool = False) -> _DepthModel:
    """Load weights (safetensors only) and processor from a Hub id or local folder."""
    import torch
    from transformers import AutoImageProcessor, DepthAnythingForDepthEstimation

    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32

    def load(path: str, local_files_only: bool) -> tuple[Any, Any]:
        kw = {"local_files_only": local_files_only}
        processor = AutoImageProcessor.from_pretrained(path, **kw)
        model = DepthAnythingForDepthEstimation.from_pretrained(path, use_safetensors=True, dtype=dtype, **kw)
        return model, processor

    model, processor = weights.from_source(source, load)
    model.to(device).eval()
    return _DepthModel(model, processor, device, dtype, is_demo)


def _build_demo(folder: Path) -> None:
    """Write a tiny random Depth Anything (safetensors + processor config) to `folder`."""
    import torch
    from transformers import DepthAnythingConfig, DepthAnythingForDepthEstimation, Dinov2Config
    from transformers.models.dpt.image_processing_pil_dpt import DPTImageProcessorPil

    # Four backbone layers: the DPT neck reassembles exactly four hidden states.
    backbone = Dinov2Config(
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=2,
        intermediate_size=64,
        patch_size=14,
        image_size=70,
        out_features=["stage1", "stage2", "stage3", "stage4"],
        reshape_hidden_states=False,
    )
    config = DepthAnythingConfig(
        backbone_config=backbone,
        patch_size=14,
        reassemble_hidden_size=32,
        neck_hidden_sizes=[8, 16, 32, 32],
        fusion_hidden_size=16,
        head_hidden_size=8,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(DEMO_SEED)
        model = DepthAnythingForDepthEstimation(config).eval()
        # Random init ends in ReLU on ~0 values; a positive final bias keeps the map non-flat.
        with torch.no_grad():
            model.head.conv3.bias.fill_(1.0)
    # PIL backend with explicit args: built offline and usable without torchvision.
    processor = DPTImageProcessorPil(
        do_resize=True,
        size={"height": 70, "width": 70},
        keep_aspect_ratio=True,
        ensure_multiple_of=14,
        resample=Image.Resampling.BICUBIC,
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=[0.485, 0.456, 0.406],
        image_std=[0.229, 0.224, 0.225],
        do_pad=False,
    )
    folder.parent.mkdir(parents=True, exist_ok=True)
    # Write to a temporary sibling and rename, so a concurrent process never sees half a model.
    tmp = Path(tempfile.mkdtemp(prefix=".depth-", dir=folder.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        processor.save_pretrained(tmp)
        os.replace(tmp, folder)
    except OSError:
        if not _demo_ready(folder):
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _demo_ready(folder: Path) -> bool:
    return all((folder / name).is_file() for name in _DEMO_FILES)


def _load_demo(device: str) -> _DepthModel:
    folder = demo_model_dir()
    if not _demo_ready(folder):
        shutil.rmtree(folder, ignore_errors=True)  # a partial folder from an older crash
        _build_demo(folder)
    return _load_from(str(folder), device, is_demo=True)


def _get_model(source: str | None, device: str | None, demo: bool) -> _DepthModel:
    device = device or weights.default_device()
    source = source or DEFAULT_DEPTH_SOURCE
    return _CACHE.get(
        (source, device),
        ("<demo>", device),
        demo,
        lambda: _load_from(source, device),
        lambda: _load_demo(device),
        f"Depth model '{source}' is",
    )


def depth_model_is_demo(source: str | None = None, device: str | None = None) -> bool:
    """True when depth maps for `source` come from the random demo model (loads it if needed)."""
    return _get_model(source, device, demo=False).is_demo


def _normalise(pred: np.ndarray) -> np.ndarray:
    """min → 0, max → 255; a constant map has no depth information and becomes all 0."""
    pred = np.nan_to_num(pred.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    lo, hi = float(pred.min()), float(pred.max())
    if hi <= lo:
        return np.zeros(pred.shape, dtype=np.uint8)
    return np.round((pred - lo) * (255.0 / (hi - lo))).astype(np.uint8)


def depth(
    image: Image.Image,
    source: str | None = None,
    device: str | None = None,
    demo: bool = False,
) -> Image.Image:
    """Depth map as an RGB image of the input's size; near = bright, full 0..255 range."""
    import torch

    if not isinstance(image, Image.Image):
        raise TypeError(f"image must be a PIL.Image.Image, got {type(image).__name__}.")
    bundle = _get_model(source, device, demo)
    if bundle.is_demo:
        logger.warning("This depth map comes from a random-weight demo model, not Depth Anything.")
    rgb = image if image.mode == "RGB" else image.convert("RGB")
    inputs = bundle.processor(images=rgb, return_tensors="pt")
    pixels = inputs["pixel_values"].to(bundle.device, bundle.dtype)
    with torch.inference_mode():
        pred = bundle.model(pixel_values=pixels).predicted_depth  # (1, h, w), larger = nearer
        pred = torch.nn.functional.interpolate(
            pred[:, None].float(), size=(rgb.height, rgb.width), mode="bicubic", align_corners=False
        )[0, 0]
    gray = _normalise(pred.cpu().numpy())
    return Image.fromarray(gray).convert("RGB")
