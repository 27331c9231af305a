"""PNG metadata: every parameter and the plan travel inside the image, and can be read back."""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image, PngImagePlugin

KEY = "flux-anyvram"


def save_png(image: Image.Image, path: str | Path, params: dict) -> Path:
    info = PngImagePlugin.PngInfo()
    info.add_text(KEY, json.dumps(params, sort_keys=True))
    info.add_text("parameters", params.get("job", {}).get("prompt", ""))  # what other tools show
    path = Path(path)
    image.save(path, format="PNG", pnginfo=info)
    return path


def read_params(source) -> dict | None:
    """The parameters saved by save_png, or None for a PNG without them."""
    img = source if isinstance(source, Image.Image) else Image.open(source)
    text = getattr(img, "text", {}) or img.info
    raw = text.get(KEY)
    try:
        params = json.loads(raw) if raw else None
    except ValueError:  # written by something else, or damaged: no settings to read
        return None
    return params if isinstance(params, dict) else None
