"""Write the example photos (scikit-image's astronaut, coffee, chelsea, rocket) as PNGs next to this
file, each shrunk until it is under 300 KB. Run: `python assets/make_examples.py`."""

from __future__ import annotations

import io
from pathlib import Path

import skimage.data
from PIL import Image

HERE = Path(__file__).resolve().parent
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket")
LIMIT = 300_000


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def make(name: str, folder: Path = HERE, limit: int = LIMIT) -> Path:
    img = Image.fromarray(getattr(skimage.data, name)()).convert("RGB")
    data = png_bytes(img)
    while len(data) >= limit:
        w, h = img.size
        img = img.resize((round(w * 0.9), round(h * 0.9)), Image.LANCZOS)
        data = png_bytes(img)
    path = folder / f"{name}.png"
    path.write_bytes(data)
    return path


def main() -> None:
    for name in PHOTOS:
        p = make(name)
        w, h = Image.open(p).size
        print(f"{p.name}: {w}×{h}, {p.stat().st_size // 1024} KB")


if __name__ == "__main__":
    main()
