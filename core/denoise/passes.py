"""One denoising pass: the stack of forward patches it runs under, built in one place.

From the outside in, on the pipeline's ControlNet and transformer:
  1. residency hooks (core.stream), on the units inside the blocks, installed by the placement:
     they make each unit's weights ready just before it runs;
  2. the fast path (core.speed: fused QKV, compiled blocks, CUDA graphs), applied to the modules
     by the engine for all-resident plans only, so it never meets the residency hooks;
  3. skip_idle_controls (core.denoise.skip): the ControlNet call leaves out controls whose scale is
     0 at this step;
  4. tiled_denoising (core.denoise.tiled), innermost: the transformer call runs ControlNet +
     transformer tile by tile (calling 3 per tile) and fuses the predictions.
1 and 2 belong to the placement and outlive a pass; 3 and 4 exist only inside `denoising`.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from core.denoise.runtime import JobCancelled, Runtime
from core.denoise.skip import skip_idle_controls
from core.denoise.tiled import tiled_denoising
from core.monitor import fault_point
from core.preview import latent_rgb
from core.tiling import Tile


@dataclass(frozen=True)
class PassInfo:
    tiles: list[Tile]
    skipped: dict  # ControlNet passes run and skipped (filled in while the pass runs)


@contextlib.contextmanager
def denoising(rt: Runtime, width: int, height: int, tile: int, overlap: int, on_tile=None, report: bool = True):
    """`with denoising(rt, w, h, tile, overlap) as info:` call the pipeline inside; `report`: tell
    the user how many idle ControlNet passes were skipped."""
    with (
        torch.no_grad(),
        skip_idle_controls(rt.pipe) as skipped,
        tiled_denoising(rt.pipe, width, height, tile, overlap, on_tile) as tiles,
    ):
        yield PassInfo(tiles, skipped)
    if report and skipped["skipped"]:
        rt.events.append(f"skipped {skipped['skipped']} idle ControlNet passes (outside control start/end)")


def announce(rt: Runtime, label: str, total: int = 1) -> None:
    """A phase starts: told only to progress callables that opted in (`phases`, core.denoise.runtime)."""
    if rt.progress is not None and getattr(rt.progress, "phases", False):
        rt.progress(label, 0, total)


def step_callback(rt: Runtime, label: str, total: int, size: tuple[int, int] | None = None):
    """diffusers' callback_on_step_end: the residency learns the step's order, the user sees
    progress (with a preview of the latents where asked and `size`, the pass's (width, height), is
    given), and a cancel takes effect between steps. Pass callback_on_step_end_tensor_inputs=["latents"]."""
    every = int(getattr(rt.progress, "preview_every", 0) or 0) if size else 0

    def cb(pipe, i, t, kw):
        fault_point("step")
        if rt.residency is not None:
            rt.residency.end_step()
        if rt.progress is not None:
            done = i + 1
            if every and "latents" in kw and (done % every == 0 or done == total):
                rt.progress(label, done, total, preview=latent_rgb(kw["latents"], *size))
            else:
                rt.progress(label, done, total)
        if rt.cancel is not None and rt.cancel():
            raise JobCancelled("cancelled")
        return {}

    return cb
