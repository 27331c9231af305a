"""The training data: images with captions, their control images, aspect-ratio buckets, and the
cache of latents and prompt embeddings (computed once; the text encoders are not needed after).

A dataset folder holds images with a caption each, as `name.txt` beside `name.png` or as lines of
`metadata.jsonl` (`{"file_name": ..., "text": ..., "control": optional}`). Control images are made
by preprocessors/ with the same function and parameters the app uses, unless given as pairs: a
`control/` subfolder with the same file names, or the JSONL's `control` field.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from preprocessors.registry import preprocess

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
ASPECTS = (1.0, 4 / 3, 3 / 4, 16 / 9, 9 / 16)  # width / height of the buckets
CACHE_VERSION = "1"


@dataclass(frozen=True)
class Sample:
    image: Path
    caption: str
    control: Path | None = None  # a given control image (pairs); None: made by the preprocessor


def _caption(path: Path) -> str:
    txt = path.with_suffix(".txt")
    if not txt.is_file():
        raise ValueError(f"The image '{path.name}' has no caption: add '{txt.name}' beside it or a metadata.jsonl.")
    return txt.read_text(encoding="utf-8").strip()


def scan(folder: str) -> tuple[Sample, ...]:
    """The samples of a dataset folder, sorted by file name (the data order must not depend on the
    file system's listing order: a resumed run replays it)."""
    root = Path(folder).expanduser()
    meta = root / "metadata.jsonl"
    pairs = root / "control"
    out = []
    if meta.is_file():
        for n, line in enumerate(meta.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                image, text = root / row["file_name"], str(row["text"])
            except (json.JSONDecodeError, KeyError, TypeError):
                raise ValueError(f"metadata.jsonl line {n} must be JSON with 'file_name' and 'text'.") from None
            control = root / row["control"] if row.get("control") else None
            out.append(Sample(image, text.strip(), control))
    else:
        for p in sorted(root.iterdir()):
            if p.suffix.lower() in IMAGE_EXTS and p.is_file():
                out.append(Sample(p, _caption(p), pairs / p.name if (pairs / p.name).is_file() else None))
    if not out:
        raise ValueError(f"The data folder '{folder}' holds no images (looked for {', '.join(IMAGE_EXTS)}).")
    for s in out:
        for p in (s.image, s.control):
            if p is not None and not p.is_file():
                raise ValueError(f"The image '{p}' named in the data folder does not exist.")
    return tuple(sorted(out, key=lambda s: s.image.name))


def bucket_sizes(resolution: int) -> tuple[tuple[int, int], ...]:
    """(width, height) of each bucket: about resolution² pixels, sides multiples of 16."""
    area = resolution * resolution
    sizes = []
    for a in ASPECTS:
        w = max(64, int(round(math.sqrt(area * a) / 16)) * 16)
        h = max(64, int(round(math.sqrt(area / a) / 16)) * 16)
        sizes.append((w, h))
    return tuple(sizes)


def bucket_of(width: int, height: int, resolution: int) -> tuple[int, int]:
    """The bucket whose aspect ratio is nearest (in log space) to the image's."""
    r = math.log(width / height)
    return min(bucket_sizes(resolution), key=lambda wh: abs(math.log(wh[0] / wh[1]) - r))


def fit(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Scale to cover `size`, then crop the centre: no stretching."""
    w, h = size
    s = max(w / image.width, h / image.height)
    im = image.convert("RGB").resize((max(w, round(image.width * s)), max(h, round(image.height * s))), Image.LANCZOS)
    left, top = (im.width - w) // 2, (im.height - h) // 2
    return im.crop((left, top, left + w, top + h))


def control_params(kind: str, params: dict, demo: bool) -> dict:
    """The preprocessor arguments the app passes (core.denoise.generate.control_params): the demo model gets
    the demo depth model."""
    params = dict(params)
    if kind == "depth" and demo:
        params.setdefault("demo", True)
    return params


def control_image(sample: Sample, image: Image.Image, kind: str, params: dict, demo: bool) -> Image.Image:
    """The sample's control image at the size of `image` (already fitted to its bucket)."""
    if sample.control is not None:
        with Image.open(sample.control) as c:
            return fit(c, image.size)
    return preprocess(kind, image, **control_params(kind, params, demo)).convert("RGB")


def fingerprint(samples, kind: str, params: dict, resolution: int, model: str) -> str:
    h = hashlib.sha256(CACHE_VERSION.encode())
    for s in samples:
        for p in (s.image, s.control):
            if p is not None:
                st = p.stat()
                h.update(f"{p.name}:{st.st_size}:{st.st_mtime_ns}".encode())
        h.update(s.caption.encode())
    h.update(json.dumps([kind, sorted(params.items()), resolution, model], default=str).encode())
    return h.hexdigest()[:16]


@dataclass(frozen=True)
class Cached:
    """One training example, ready for the loss: latents (C, h, w) and prompt embeddings."""

    latents: torch.Tensor
    control: torch.Tensor
    prompt_embeds: torch.Tensor  # (seq, D)
    pooled: torch.Tensor  # (D,)

    @property
    def bucket(self) -> tuple[int, int]:
        return tuple(self.latents.shape[-2:])


def _vae_latents(pipe, image: Image.Image, device) -> torch.Tensor:
    vae = pipe.vae
    x = pipe.image_processor.preprocess(image, height=image.height, width=image.width)
    x = x.to(device=device, dtype=vae.dtype)
    lat = vae.encode(x).latent_dist.mode()
    return ((lat - vae.config.shift_factor) * vae.config.scaling_factor)[0].float().cpu()


@torch.no_grad()
def encode(pipe, samples, kind: str, params: dict, resolution: int, demo: bool, device, max_seq: int) -> list[Cached]:
    """VAE latents of every image and its control image, and T5 + CLIP embeddings of every caption."""
    out, prompts = [], {}
    for s in samples:
        with Image.open(s.image) as im:
            image = fit(im, bucket_of(im.width, im.height, resolution))
        control = control_image(s, image, kind, params, demo)
        if s.caption not in prompts:
            pe, pooled, _ = pipe.encode_prompt(
                prompt=s.caption, prompt_2=s.caption, device=device, max_sequence_length=max_seq
            )
            prompts[s.caption] = (pe[0].float().cpu(), pooled[0].float().cpu())
        pe, pooled = prompts[s.caption]
        out.append(Cached(_vae_latents(pipe, image, device), _vae_latents(pipe, control, device), pe, pooled))
    return out


def save_cache(path: Path, items: list[Cached], key: str) -> None:
    from safetensors.torch import save_file

    tensors = {}
    for i, c in enumerate(items):
        tensors.update(
            {f"{i}.lat": c.latents, f"{i}.ctl": c.control, f"{i}.pe": c.prompt_embeds, f"{i}.pool": c.pooled}
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(
        {k: v.clone().contiguous() for k, v in tensors.items()}, str(path), metadata={"key": key, "n": str(len(items))}
    )


def load_cache(path: Path, key: str) -> list[Cached] | None:
    """The cached examples if the cache was made from the same data, control and model, else None."""
    from safetensors import safe_open

    if not path.is_file():
        return None
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
        if meta.get("key") != key:
            return None
        n = int(meta["n"])
        return [Cached(*(f.get_tensor(f"{i}.{k}") for k in ("lat", "ctl", "pe", "pool"))) for i in range(n)]


def batches(items: list[Cached], batch_size: int, seed: int, epoch: int, rank: int = 0, world: int = 1) -> list:
    """One epoch's batches (lists of indices into `items`), each from one bucket, in an order that
    depends only on (seed, epoch): a resumed run replays the same order. Each process takes every
    `world`-th batch; the batch count is trimmed so that all processes step together."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    by_bucket: dict[tuple, list[int]] = {}
    for i, c in enumerate(items):
        by_bucket.setdefault(c.bucket, []).append(i)
    out = []
    for key in sorted(by_bucket):
        idx = by_bucket[key]
        perm = [idx[j] for j in torch.randperm(len(idx), generator=g).tolist()]
        # a bucket smaller than a batch repeats its images rather than being dropped
        while len(perm) < batch_size:
            perm += perm[: batch_size - len(perm)]
        out += [perm[j : j + batch_size] for j in range(0, len(perm) - batch_size + 1, batch_size)]
    order = torch.randperm(len(out), generator=g).tolist()
    out = [out[j] for j in order]
    n = max(1, len(out) // world) * world
    out = (out * world)[:n] if len(out) < world else out[:n]
    return out[rank::world]


def collate(items: list[Cached], idx: list[int]) -> dict[str, torch.Tensor]:
    pick = [items[i] for i in idx]
    return dict(
        latents=torch.stack([c.latents for c in pick]),
        control=torch.stack([c.control for c in pick]),
        prompt_embeds=torch.stack([c.prompt_embeds for c in pick]),
        pooled=torch.stack([c.pooled for c in pick]),
    )
