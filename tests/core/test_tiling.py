import numpy as np
import pytest
import torch
from PIL import Image

from bench.seams import border_lines, fuse, paste, seam_ratio
from core.tiling import Tile, tile_grid, tile_weights, tokens_of

GRIDS = [  # (H, W, tile, overlap)
    (64, 64, 64, 16),
    (10, 10, 64, 8),
    (65, 64, 64, 16),
    (100, 37, 32, 8),
    (128, 192, 64, 16),
    (33, 33, 32, 0),
    (97, 131, 24, 23),
    (1, 200, 16, 4),
    (7, 9, 2, 1),
    (256, 256, 96, 32),
]
KINDS = ["cosine", "gaussian", "constant"]


def _pairs(tiles):
    """Horizontal / vertical neighbours in the row-major grid."""
    ys = sorted({t.y0 for t in tiles})
    xs = sorted({t.x0 for t in tiles})
    by = {(t.y0, t.x0): t for t in tiles}
    for i, y in enumerate(ys):
        for j, x in enumerate(xs):
            if j + 1 < len(xs):
                yield "h", by[(y, x)], by[(y, xs[j + 1])]
            if i + 1 < len(ys):
                yield "v", by[(y, x)], by[(ys[i + 1], x)]


@pytest.mark.parametrize("H,W,tile,overlap", GRIDS)
def test_tile_grid_covers_and_overlaps(H, W, tile, overlap):
    tiles = tile_grid(H, W, tile, overlap)
    cover = torch.zeros(H, W, dtype=torch.int32)
    for t in tiles:
        assert 0 <= t.y0 < t.y1 <= H and 0 <= t.x0 < t.x1 <= W
        assert t.height <= tile and t.width <= tile
        cover[t.slice()] += 1
    assert (cover >= 1).all()
    # row-major and deterministic
    assert tiles == sorted(tiles, key=lambda t: (t.y0, t.x0))
    assert tiles == tile_grid(H, W, tile, overlap)
    # equal sizes (so tiles can be batched), never larger than the grid
    assert len({(t.height, t.width) for t in tiles}) == 1
    assert tiles[0].height == min(H, tiles[0].height) and tiles[0].width <= W
    if H <= tile:
        assert all(t.height == H for t in tiles)
    if W <= tile:
        assert all(t.width == W for t in tiles)
    for d, a, b in _pairs(tiles):
        ov = a.x1 - b.x0 if d == "h" else a.y1 - b.y0
        assert overlap <= ov <= overlap + 1  # exact where possible, surplus spread one cell at a time
    # fewest tiles: one fewer per axis could not cover with the asked overlap
    ny, nx = len({t.y0 for t in tiles}), len({t.x0 for t in tiles})
    if ny > 1:
        assert (ny - 1) * tile - (ny - 2) * overlap < H
    if nx > 1:
        assert (nx - 1) * tile - (nx - 2) * overlap < W


def test_tile_grid_single_and_exact():
    assert tile_grid(40, 50, 64, 16) == [Tile(0, 0, 40, 50)]
    assert tile_grid(64, 64, 64, 16) == [Tile(0, 0, 64, 64)]
    # 100 = 4 * 31 - 3 * 8: four tiles of 31 overlapping by exactly 8
    assert [(t.x0, t.x1) for t in tile_grid(1, 100, 32, 8)] == [(0, 31), (23, 54), (46, 77), (69, 100)]


@pytest.mark.parametrize(
    "args,name",
    [
        ((10, 10, 0, 0), "tile"),
        ((10, 10, -4, 0), "tile"),
        ((10, 10, 8, -1), "overlap"),
        ((10, 10, 8, 8), "overlap"),
        ((10, 10, 8, 9), "overlap"),
        ((0, 10, 8, 2), "height"),
        ((10, -3, 8, 2), "width"),
        ((10.5, 10, 8, 2), "height"),
    ],
)
def test_tile_grid_errors(args, name):
    with pytest.raises(ValueError, match=name):
        tile_grid(*args)


@pytest.mark.parametrize("kind", ["cosine", "gaussian"])
def test_tile_weights_shape_and_ramps(kind):
    H, W, ov = 100, 120, 8
    tiles = tile_grid(H, W, 40, ov)
    total = torch.zeros(H, W)
    for t in tiles:
        w = tile_weights(t, H, W, ov, kind)
        assert w.shape == (t.height, t.width) and w.dtype == torch.float32
        assert (w > 0).all() and (w <= 1).all()
        assert torch.allclose(w[ov:-ov, ov:-ov], torch.ones(()))  # interior is exactly 1
        # ramps only on sides shared with another tile; the image border stays at 1
        sides = {
            "top": (w[0, ov:-ov], t.y0 > 0),
            "bottom": (w[-1, ov:-ov], t.y1 < H),
            "left": (w[ov:-ov, 0], t.x0 > 0),
            "right": (w[ov:-ov, -1], t.x1 < W),
        }
        for name, (edge, shared) in sides.items():
            if shared:
                assert (edge < 0.05).all(), name
            else:
                assert torch.allclose(edge, torch.ones(())), name
        # monotone rise from a shared edge into the interior
        if t.x0 > 0:
            row = w[t.height // 2, : ov + 1]
            assert (row[1:] >= row[:-1]).all()
        total[t.slice()] += w
    assert (total > 0).all()


def test_tile_weights_cosine_partition_of_unity():
    # two tiles overlapping by exactly `overlap`: the cosine ramps sum to ~1 across the band
    H, W, ov = 1, 100, 8
    tiles = tile_grid(H, W, 32, ov)
    total = torch.zeros(H, W)
    for t in tiles:
        total[t.slice()] += tile_weights(t, H, W, ov, "cosine")
    assert torch.allclose(total, torch.ones(()), atol=3e-3)


def test_tile_weights_constant_and_single():
    t = tile_grid(50, 50, 32, 8)[0]
    assert torch.equal(tile_weights(t, 50, 50, 8, "constant"), torch.ones(t.height, t.width))
    whole = Tile(0, 0, 20, 30)
    assert torch.equal(tile_weights(whole, 20, 30, 8), torch.ones(20, 30))  # no neighbours, no ramp
    with pytest.raises(ValueError, match="kind"):
        tile_weights(t, 50, 50, 8, "linear")


@pytest.mark.parametrize("H,W,tile,overlap", GRIDS)
@pytest.mark.parametrize("kind", KINDS)
def test_fuse_of_crops_reproduces(H, W, tile, overlap, kind):
    g = torch.Generator().manual_seed(H * 1000 + W)
    full = torch.randn(2, 3, H, W, generator=g)
    tiles = tile_grid(H, W, tile, overlap)
    parts = [(t, full[(..., *t.slice())]) for t in tiles]
    out = fuse(parts, H, W, overlap, kind)
    assert out.shape == full.shape and out.dtype == full.dtype
    torch.testing.assert_close(out, full, atol=1e-6, rtol=0)
    assert torch.equal(paste(parts, H, W), full)


def test_fuse_half_precision_and_errors():
    full = torch.randn(4, 40, 50).to(torch.bfloat16)
    tiles = tile_grid(40, 50, 24, 6)
    out = fuse([(t, full[(..., *t.slice())]) for t in tiles], 40, 50, 6)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), full.float(), atol=1e-2, rtol=1e-2)
    with pytest.raises(ValueError):
        fuse([], 40, 50, 6)
    with pytest.raises(ValueError):
        fuse([(tiles[0], torch.zeros(3, 3))], 40, 50, 6)  # wrong shape
    with pytest.raises(ValueError, match="cover"):
        fuse([(tiles[0], full[(..., *tiles[0].slice())])], 40, 50, 6)  # holes


def test_tokens_of():
    H, W = 7, 11
    grid = torch.arange(H * W)
    for t in tile_grid(H, W, 4, 1):
        idx = tokens_of(t, W)
        assert idx.dtype == torch.long
        assert torch.equal(grid[idx], grid.view(H, W)[t.slice()].reshape(-1))
    # slicing a packed sequence [B, H*W, C] and position ids [H*W, 3]
    t = Tile(2, 3, 5, 7)
    ids = torch.stack(torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij"), -1).reshape(-1, 2)
    sel = ids[tokens_of(t, W)]
    assert sel[0].tolist() == [2, 3] and sel[-1].tolist() == [4, 6] and len(sel) == 12
    with pytest.raises(ValueError):
        tokens_of(Tile(0, 5, 2, 12), W)


def test_border_lines():
    tiles = tile_grid(1, 100, 32, 8)
    assert border_lines(tiles, 1, 100) == ([], [23, 31, 46, 54, 69, 77])
    tiles = tile_grid(64, 64, 40, 16)  # 2x2 of 40, starts 0/24
    assert border_lines(tiles, 64, 64) == ([24, 40], [24, 40])


def test_seam_ratio_inputs_and_scale():
    rng = np.random.default_rng(0)
    noise = rng.normal(size=(64, 64, 3))
    tiles = tile_grid(4, 4, 2, 0)  # token grid 4x4 -> 16 px per token
    # stationary noise: borders indistinguishable
    assert 0.8 < seam_ratio(noise, tiles, scale=16) < 1.2
    step = noise * 0.1
    step[:, 32:] += 1.0  # hard step exactly on the tile line x = 2 tokens = 32 px
    r_np = seam_ratio(step, tiles, scale=16)
    assert r_np > 10
    r_t = seam_ratio(torch.from_numpy(step).permute(2, 0, 1), tiles, scale=16)
    assert r_t == pytest.approx(r_np)
    r_b = seam_ratio(step, ([32], [32]))  # borders given directly in pixels
    assert r_b == pytest.approx(r_np)
    img = Image.fromarray(np.clip(step * 60 + 60, 0, 255).astype(np.uint8))
    assert seam_ratio(img, tiles, scale=16) > 10
    assert seam_ratio(step, tiles, scale=16, band=4) < r_np  # wider band dilutes a 1-px step


def _true_signal(H, W):
    from skimage.data import camera
    from skimage.transform import resize

    img = resize(camera().astype(np.float64) / 255.0, (H, W), anti_aliasing=True)
    # 3 "channels" of the same photo with different gains, like latent channels
    return torch.from_numpy(np.stack([img, 0.7 * img, 1.0 - img])).float()


def test_seam_fused_vs_pasted():
    H, W, tile, ov = 80, 112, 32, 8
    truth = _true_signal(H, W)
    tiles = tile_grid(H, W, tile, ov)

    def denoise(i, t, x_tile):  # toy denoiser: the truth plus a per-tile bias (a tile's own "opinion")
        return truth[(..., *t.slice())] + 0.3 * i

    # (a) MultiDiffusion: fuse the tile predictions at every step
    x = torch.zeros_like(truth)
    for _ in range(10):
        pred = fuse([(t, denoise(i, t, x[(..., *t.slice())])) for i, t in enumerate(tiles)], H, W, ov)
        x = x + 0.3 * (pred - x)
    fused_ratio = seam_ratio(x, tiles)

    # (b) independent per-tile loops, hard-pasted at the end
    outs = []
    for i, t in enumerate(tiles):
        xt = torch.zeros_like(truth[(..., *t.slice())])
        for _ in range(10):
            xt = xt + 0.3 * (denoise(i, t, xt) - xt)
        outs.append((t, xt))
    pasted_ratio = seam_ratio(paste(outs, H, W), tiles)

    ref_ratio = seam_ratio(truth, tiles)
    print(f"\nseam_ratio truth={ref_ratio:.3f} fused={fused_ratio:.3f} pasted={pasted_ratio:.3f}")
    assert fused_ratio < 1.5
    assert pasted_ratio > 3
