"""Soft-edge control image from DexiNed (kornia's model class), white edges on black.

DexiNed is the edge detector that TEED, and so Anyline's MTEED (the soft-edge detector named by
Union-Pro-2.0's card), was distilled from, by the same authors and on the same BIPED data; kornia
ships its network and publishes its BIPED weights on the Hub. When the real weights cannot be had
(offline, missing folder) or demo=True, a DexiNed with random weights stands in; its maps are
meaningless and a warning says so. torch and kornia are imported lazily.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from . import weights

logger = logging.getLogger(__name__)

DEFAULT_SOFTEDGE_SOURCE = "kornia/dexined"  # DexiNed trained on BIPED (MIT), published by kornia
SAFETENSORS = "model.safetensors"
CHECKPOINT = "DexiNed_BIPED_10.pth"  # the file kornia publishes
BGR_MEAN = (103.939, 116.779, 123.68)  # DexiNed's input: BGR in 0..255 minus this mean
MULTIPLE = 16  # DexiNed halves the size four times
DEMO_SEED = 0


@dataclass(frozen=True)
class _EdgeModel:
    model: Any
    device: str
    is_demo: bool


_CACHE = weights.ModelCache()  # (source, device) → _EdgeModel


def _read_state(path: str, local_files_only: bool) -> dict:
    """model.safetensors where the folder or repo has one; else kornia's checkpoint, read with
    weights_only=True (tensors and plain containers only: a pickled callable is refused)."""
    import torch
    from huggingface_hub import hf_hub_download
    from safetensors.torch import load_file

    folder = Path(path)
    for name in (SAFETENSORS, CHECKPOINT):
        if folder.is_dir():
            file = folder / name
            if not file.is_file():
                continue
        else:
            try:
                file = Path(hf_hub_download(path, name, local_files_only=local_files_only))
            except OSError:
                if name == CHECKPOINT:
                    raise
                continue
        if name == SAFETENSORS:
            return load_file(file)
        return torch.load(file, map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"no {SAFETENSORS} or {CHECKPOINT} in '{path}'")


def _load_from(source: str, device: str) -> _EdgeModel:
    from kornia.models.dexined import DexiNed

    state = weights.from_source(source, _read_state)
    model = DexiNed(pretrained=False)
    model.load_state_dict(state, strict=True)
    return _EdgeModel(model.to(device).eval(), device, False)


def _build_demo(device: str) -> _EdgeModel:
    import torch
    from kornia.models.dexined import DexiNed

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(DEMO_SEED)
        model = DexiNed(pretrained=False)
    return _EdgeModel(model.to(device).eval(), device, True)


def _get_model(source: str | None, device: str | None, demo: bool) -> _EdgeModel:
    device = device or weights.default_device()
    source = source or DEFAULT_SOFTEDGE_SOURCE
    return _CACHE.get(
        (source, device),
        ("<demo>", device),
        demo,
        lambda: _load_from(source, device),
        lambda: _build_demo(device),
        f"Soft-edge model '{source}' is",
    )


def softedge_model_is_demo(source: str | None = None, device: str | None = None) -> bool:
    """True when soft-edge maps for `source` come from the random demo model (loads it if needed)."""
    return _get_model(source, device, demo=False).is_demo


def to_input(rgb: np.ndarray) -> np.ndarray:
    """(h, w, 3) RGB uint8 → (3, h, w) float32 in DexiNed's layout: BGR, 0..255, mean removed."""
    bgr = rgb[..., ::-1].astype(np.float32) - np.asarray(BGR_MEAN, np.float32)
    return np.ascontiguousarray(bgr.transpose(2, 0, 1))


def softedge(
    image: Image.Image, source: str | None = None, device: str | None = None, demo: bool = False
) -> Image.Image:
    """Soft-edge map as an RGB image of the input's size: sigmoid of DexiNed's fused edge output × 255."""
    import torch

    if not isinstance(image, Image.Image):
        raise TypeError(f"image must be a PIL.Image.Image, got {type(image).__name__}.")
    bundle = _get_model(source, device, demo)
    if bundle.is_demo:
        logger.warning("This soft-edge map comes from a random-weight demo model, not DexiNed.")
    rgb = image if image.mode == "RGB" else image.convert("RGB")
    w, h = (max(MULTIPLE, round(s / MULTIPLE) * MULTIPLE) for s in rgb.size)
    sized = rgb if (w, h) == rgb.size else rgb.resize((w, h), Image.Resampling.BICUBIC)
    x = torch.from_numpy(to_input(np.asarray(sized)))[None].to(bundle.device)
    with torch.inference_mode():
        edges = torch.sigmoid(bundle.model(x).float())[0, 0].cpu().numpy()
    gray = Image.fromarray(np.round(edges * 255).astype(np.uint8))
    if gray.size != rgb.size:
        gray = gray.resize(rgb.size, Image.Resampling.BICUBIC)
    return gray.convert("RGB")
