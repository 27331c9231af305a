"""Overlapping tiles on a 2-D grid and the smooth weights their predictions are fused with.

The upscaler runs the FLUX denoiser on overlapping tiles of the packed token grid (H/16 x W/16) at
every denoising step and fuses the tiles' predictions with weights that fall off smoothly towards the
shared tile edges (MultiDiffusion / Mixture of Diffusers). Because the fusion happens at every step,
each tile keeps being pulled towards the consensus of its neighbours, so no seam can form.
Everything here is pure: no model, no device state.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

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


def tokens_of(t: Tile, width: int) -> torch.Tensor:
    """Flat row-major indices r * width + c of the tile's cells, to slice a packed [B, H*W, C] sequence."""
    if not (0 <= t.x0 < t.x1 <= width and 0 <= t.y0 < t.y1):
        raise ValueError(f"tile {t} does not fit a grid of width {width}")
    rows = torch.arange(t.y0, t.y1, dtype=torch.long)
    cols = torch.arange(t.x0, t.x1, dtype=torch.long)
    return (rows[:, None] * width + cols[None, :]).reshape(-1)


def tile_overlap(tile: int) -> int:
    """Overlap (px) of generation tiles: an eighth of the tile, at least 64 px."""
    return max(64, tile // 8)


def token_tiles(width: int, height: int, tile_px: int, overlap_px: int) -> tuple[int, int, list[Tile], int]:
    """(token rows, token cols, tiles, overlap in tokens) for an image and a tile size in pixels."""
    rows, cols = height // 16, width // 16
    if tile_px <= 0:
        return rows, cols, [Tile(0, 0, rows, cols)], 0
    t = max(1, tile_px // 16)
    ov = min(max(1, overlap_px // 16), t - 1) if t > 1 else 0
    if rows <= t and cols <= t:
        return rows, cols, [Tile(0, 0, rows, cols)], 0
    return rows, cols, tile_grid(rows, cols, t, ov), ov
