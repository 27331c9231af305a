"""Tiled denoising inside diffusers' own pipelines: MultiDiffusion on FLUX's token grid.

FLUX sees an image as a sequence of tokens, each with its global (row, col) position id. A tile is
just a subset of those tokens *with their global ids*, so the model knows where the tile sits. While
this context is active, the pipeline's ControlNet call is deferred and its transformer call runs
ControlNet + transformer tile by tile and fuses the predictions with smooth weights at every step:
seamless by construction, and peak memory set by the tile, not the image.
"""

from __future__ import annotations

import contextlib

import torch

from core.monitor import fault_point
from core.patch import patched_forwards
from core.tiling import tile_weights, token_tiles, tokens_of


@contextlib.contextmanager
def tiled_denoising(pipe, width: int, height: int, tile_px: int, overlap_px: int, on_tile=None):
    """Patch pipe.controlnet / pipe.transformer so that every step runs in fused tiles.
    A no-op when one tile covers the image."""
    rows, cols, tiles, ov = token_tiles(width, height, tile_px, overlap_px)
    if len(tiles) == 1:
        yield tiles
        return
    cn, tr = pipe.controlnet, pipe.transformer
    cn_forward, tr_forward = cn.forward, tr.forward
    stash: dict = {}
    index = [tokens_of(t, cols) for t in tiles]
    weights = [tile_weights(t, rows, cols, ov).reshape(-1) for t in tiles]
    on_device: dict = {}

    def prepared(dev):
        """Tile indices, weights and their sum on the latents' device, moved once (a copy from
        pageable memory waits for the GPU: per tile and step it would stall the queue)."""
        if dev not in on_device:
            idx, ws = [i.to(dev) for i in index], [w.to(dev) for w in weights]
            wsum = torch.zeros(rows * cols, device=dev, dtype=torch.float32)
            for i, w in zip(idx, ws):
                wsum[i] += w
            on_device[dev] = idx, ws, wsum[None, :, None]
        return on_device[dev]

    def deferred_controlnet(**kwargs):
        stash.clear()
        stash.update(kwargs)
        return None, None

    def tiled_transformer(
        hidden_states,
        img_ids=None,
        controlnet_block_samples=None,
        controlnet_single_block_samples=None,
        return_dict=True,
        **kwargs,
    ):
        out = torch.zeros_like(hidden_states, dtype=torch.float32)
        idx_all, w_all, wsum = prepared(hidden_states.device)
        for n, (idx_d, w_d) in enumerate(zip(idx_all, w_all)):
            fault_point("tile")
            hs, ids = hidden_states[:, idx_d], img_ids[idx_d]
            blocks = singles = None
            if stash:
                ckw = dict(
                    stash,
                    hidden_states=hs,
                    img_ids=ids,
                    return_dict=False,
                    controlnet_cond=[c[:, idx_d] for c in stash["controlnet_cond"]],
                )
                blocks, singles = cn_forward(**ckw)
            pred = tr_forward(
                hidden_states=hs,
                img_ids=ids,
                controlnet_block_samples=blocks,
                controlnet_single_block_samples=singles,
                return_dict=False,
                **kwargs,
            )[0]
            out[:, idx_d] += pred.float() * w_d[None, :, None]
            if on_tile is not None:
                on_tile(n + 1, len(tiles))
        return ((out / wsum).to(hidden_states.dtype),)

    try:
        with patched_forwards((cn, deferred_controlnet), (tr, tiled_transformer)):
            yield tiles
    finally:
        stash.clear()
