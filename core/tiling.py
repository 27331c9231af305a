"""Overlapping tiles on a 2-D grid, smooth fusion of per-tile predictions, and a seam metric.

The upscaler runs the FLUX denoiser on overlapping tiles of the packed token grid (H/16 x W/16) at
every denoising step and fuses the tiles' predictions with weights that fall off smoothly towards the
shared tile edges (MultiDiffusion / Mixture of Diffusers). Because the fusion happens at every step,
each tile keeps being pulled towards the consensus of its neighbours, so no seam can form.
Everything here is pure: no model, no device state.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

_EPS = 1e-3  # floor of the weights: every covered cell keeps a strictly positive weight sum
KINDS = ("cosine", "gaussian", "constant")


@dataclass(frozen=True)
class Tile:
    """Half-open box [y0, y1) x [x0, x1) on a grid (rows, cols)."""

    y0: int
    x0: int
    y1: int
    x1: int

    @property
    def height(self) -> int:
        return self.y1 - self.y0

    @property
    def width(self) -> int:
        return self.x1 - self.x0

    def slice(self) -> tuple[slice, slice]:
        return slice(self.y0, self.y1), slice(self.x0, self.x1)


def _spans(n: int, tile: int, overlap: int) -> list[tuple[int, int]]:
    """1-D cover of [0, n) by equal spans of length <= tile overlapping by >= overlap."""
    if n <= tile:
        return [(0, n)]  # one span, never padded beyond the grid
    k = math.ceil((n - overlap) / (tile - overlap))  # fewest spans that fit with the asked overlap
    # Smallest common length for k spans: equal sizes let a caller batch all tiles in one forward pass.
    s = math.ceil((n + (k - 1) * overlap) / k)  # <= tile by the choice of k
    # Starts spread evenly from 0 to n - s; each step is <= s - overlap, so the surplus coverage
    # (k*s - (k-1)*overlap - n < k) is spread over the gaps as extra overlap of at most one cell each.
    return [((i * (n - s)) // (k - 1), (i * (n - s)) // (k - 1) + s) for i in range(k)]


def tile_grid(height: int, width: int, tile: int, overlap: int) -> list[Tile]:
    """Cover a height x width grid with overlapping tiles, row-major order."""
    for name, v in (("height", height), ("width", width), ("tile", tile), ("overlap", overlap)):
        if isinstance(v, bool) or not isinstance(v, numbers.Integral):
            raise ValueError(f"{name} must be an int, got {v!r}")
        if v < 0 or (v == 0 and name != "overlap"):
            raise ValueError(f"{name} must be {'non-negative' if name == 'overlap' else 'positive'}, got {v}")
    height, width, tile, overlap = int(height), int(width), int(tile), int(overlap)
    if overlap >= tile:
        raise ValueError(f"overlap ({overlap}) must be smaller than tile ({tile})")
    rows, cols = _spans(height, tile, overlap), _spans(width, tile, overlap)
    return [Tile(y0, x0, y1, x1) for (y0, y1) in rows for (x0, x1) in cols]


def _ramp(n: int, overlap: int, kind: str) -> torch.Tensor:
    """Rising ramp over the first `overlap` cells (edge -> interior) of a length-n axis, 1 beyond."""
    w = torch.ones(n, dtype=torch.float64)
    m = min(overlap, n)
    if m == 0 or kind == "constant":
        return w
    d = (torch.arange(m, dtype=torch.float64) + 0.5) / overlap  # cell centres, in (0, 1)
    if kind == "cosine":
        # Half-cosine: the ramps of two tiles overlapping by exactly `overlap` sum to 1 (partition of unity)
        # and have zero slope at both ends of the band, so the blend has no kink.
        r = 0.5 * (1.0 - torch.cos(math.pi * d))
    else:  # gaussian fall-off, sigma = overlap / 3: about exp(-4.5) at the outer edge
        r = torch.exp(-0.5 * ((1.0 - d) * 3.0) ** 2)
    w[:m] = _EPS + (1.0 - _EPS) * r
    return w


def tile_weights(t: Tile, height: int, width: int, overlap: int, kind: str = "cosine") -> torch.Tensor:
    """(t.height, t.width) float32 weights: 1 inside, ramping down across the overlap band on shared sides."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if overlap < 0:
        raise ValueError(f"overlap must be non-negative, got {overlap}")
    if not (0 <= t.y0 < t.y1 <= height and 0 <= t.x0 < t.x1 <= width):
        raise ValueError(f"tile {t} lies outside the {height}x{width} grid")

    def axis(n: int, shared_lo: bool, shared_hi: bool) -> torch.Tensor:
        # Only sides touching another tile ramp; image borders stay at 1 (no neighbour to hand over to).
        w = torch.ones(n, dtype=torch.float64)
        r = _ramp(n, overlap, kind)
        if shared_lo:
            w = torch.minimum(w, r)
        if shared_hi:
            w = torch.minimum(w, r.flip(0))
        return w

    wy = axis(t.height, t.y0 > 0, t.y1 < height)
    wx = axis(t.width, t.x0 > 0, t.x1 < width)
    return (wy[:, None] * wx[None, :]).to(torch.float32)  # separable: corners fade in both directions


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


def tokens_of(t: Tile, width: int) -> torch.Tensor:
    """Flat row-major indices r * width + c of the tile's cells, to slice a packed [B, H*W, C] sequence."""
    if not (0 <= t.x0 < t.x1 <= width and 0 <= t.y0 < t.y1):
        raise ValueError(f"tile {t} does not fit a grid of width {width}")
    rows = torch.arange(t.y0, t.y1, dtype=torch.long)
    cols = torch.arange(t.x0, t.x1, dtype=torch.long)
    return (rows[:, None] * width + cols[None, :]).reshape(-1)


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
