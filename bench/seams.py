"""Fusing and pasting tiles on the CPU, and the seam metric: how the benchmarks and tests judge
what core.denoise.tiled does on the GPU (production fuses on the token grid itself)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from core.tiling import Tile, tile_weights


def _check_parts(parts, height: int, width: int) -> None:
    if len(parts) == 0:
        raise ValueError("parts must not be empty")
    for t, x in parts:
        if tuple(x.shape[-2:]) != (t.height, t.width):
            raise ValueError(f"part for {t} has shape {tuple(x.shape)}, expected [..., {t.height}, {t.width}]")
        if not (0 <= t.y0 < t.y1 <= height and 0 <= t.x0 < t.x1 <= width):
            raise ValueError(f"tile {t} lies outside the {height}x{width} grid")


def fuse(
    parts: Sequence[tuple[Tile, torch.Tensor]], height: int, width: int, overlap: int, kind: str = "cosine"
) -> torch.Tensor:
    """Weighted average of per-tile tensors [..., h, w] on the full grid [..., height, width]."""
    _check_parts(parts, height, width)
    ref = parts[0][1]
    # Accumulate in float64 (float32 where the device has none, e.g. MPS): with many overlapping tiles a
    # float32 sum drifts by ~1e-5, and the grids are small (a latent, not an image), so this costs nothing.
    acc_dtype = torch.float32 if ref.device.type == "mps" else torch.float64
    acc = torch.zeros(*ref.shape[:-2], height, width, dtype=acc_dtype, device=ref.device)
    wsum = torch.zeros(height, width, dtype=acc_dtype, device=ref.device)
    for t, x in parts:
        w = tile_weights(t, height, width, overlap, kind).to(device=ref.device, dtype=acc_dtype)
        ys, xs = t.slice()
        acc[..., ys, xs] += w * x.to(acc_dtype)
        wsum[ys, xs] += w
    if not bool((wsum > 0).all()):
        raise ValueError("parts do not cover the whole grid")
    return (acc / wsum).to(ref.dtype)


def paste(parts: Sequence[tuple[Tile, torch.Tensor]], height: int, width: int) -> torch.Tensor:
    """Naive hard paste, later tiles overwrite earlier ones: the seam-making baseline."""
    _check_parts(parts, height, width)
    ref = parts[0][1]
    out = torch.zeros(*ref.shape[:-2], height, width, dtype=ref.dtype, device=ref.device)
    for t, x in parts:
        out[(..., *t.slice())] = x
    return out


def border_lines(tiles: Sequence[Tile], height: int, width: int) -> tuple[list[int], list[int]]:
    """Sorted interior row / column coordinates where some tile edge lies (same scale as the tiles)."""
    rows = {v for t in tiles for v in (t.y0, t.y1) if 0 < v < height}
    cols = {v for t in tiles for v in (t.x0, t.x1) if 0 < v < width}
    return sorted(rows), sorted(cols)


def _as_hwc(image) -> np.ndarray:
    if isinstance(image, torch.Tensor):
        a = image.detach().to("cpu", torch.float64).numpy()
        if a.ndim == 4 and a.shape[0] == 1:
            a = a[0]
        if a.ndim == 3:
            a = a.transpose(1, 2, 0)  # [C, H, W] -> [H, W, C]
    else:
        a = np.asarray(image, dtype=np.float64)  # PIL images convert to HxW(xC)
    if a.ndim == 2:
        a = a[:, :, None]
    if a.ndim != 3:
        raise ValueError(f"image must be HxW(xC) / [C,H,W], got shape {a.shape}")
    return a


Borders = tuple[Sequence[int], Sequence[int]]


def seam_ratio(image, tiles_or_borders: Sequence[Tile] | Borders, scale: int = 1, band: int = 1) -> float:
    """Mean squared gradient across tile borders / mean squared gradient elsewhere (~1: no seams)."""
    if scale <= 0 or band <= 0:
        raise ValueError(f"scale and band must be positive, got scale={scale}, band={band}")
    a = _as_hwc(image)
    h, w = a.shape[:2]
    tb = list(tiles_or_borders)
    if tb and isinstance(tb[0], Tile):  # tiles: borders on the tiles' own grid, then scaled to pixels
        rows, cols = border_lines(tb, max(t.y1 for t in tb), max(t.x1 for t in tb))
    else:
        rows, cols = tb if tb else ([], [])
    rows = [r * scale for r in rows if 0 < r * scale < h]
    cols = [c * scale for c in cols if 0 < c * scale < w]
    # dy[r] = a[r+1] - a[r] crosses the line between rows r and r+1; a line L lies between rows L-1 and L,
    # so the differences within `band` of it are dy[L-band .. L+band-1].
    ey = ((a[1:] - a[:-1]) ** 2).sum(-1)  # (h-1, w)
    ex = ((a[:, 1:] - a[:, :-1]) ** 2).sum(-1)  # (h, w-1)
    my = np.zeros(h - 1, dtype=bool)
    mx = np.zeros(w - 1, dtype=bool)
    for L in rows:
        my[max(L - band, 0) : min(L + band, h - 1)] = True
    for L in cols:
        mx[max(L - band, 0) : min(L + band, w - 1)] = True
    on = np.concatenate([ey[my].ravel(), ex[:, mx].ravel()])
    off = np.concatenate([ey[~my].ravel(), ex[:, ~mx].ravel()])
    if on.size == 0:
        raise ValueError("no tile border lies inside the image")
    if off.size == 0:
        raise ValueError("band covers the whole image: nothing to compare against")
    num, den = float(on.mean()), float(off.mean())
    if den == 0.0:
        return 1.0 if num == 0.0 else math.inf
    return num / den
