"""Progressive tiled upscaling: stages of at most 2×, each resized in pixel space, encoded, and
refined with img2img through diffusers' FluxControlNetImg2ImgPipeline in fused latent tiles.

Defaults and why:
- Resize in pixel space, then encode: upscaling FLUX latents directly leaves grid artifacts.
- Strength 0.3 with the Union *tile* control (mode 1) on the resized image: enough to add detail,
  too little to redraw the prompt's subject in every tile; the tile control anchors each tile to
  the pixels it came from. The user's own controls are recomputed at the stage size and apply too.
- The tile prompt is the user's prompt: at this strength it steers texture, not composition.
- Tiles of the plan's size (≤ 1024 px, FLUX's native scale) fused at every step with cosine
  weights over a 128 px overlap: seamless by construction, and memory bounded by the tile.
"""

from __future__ import annotations

import math

import torch
from PIL import Image

from preprocessors.registry import preprocess

from .generate import PromptCache, Runtime, announce, control_args, control_params, decode, step_callback
from .job import ControlSpec, Job, out_size
from .memory import MemoryMonitor
from .models import has_mode_ids
from .skip import skip_idle_controls
from .tiled import tiled_denoising

TILE_SCALE = 0.45


def stage_factors(factor: float) -> list[float]:
    """Stages of at most 2×: 4 → [2, 2]; 3 → [2, 1.5]; 1.5 → [1.5]; 1 → []."""
    if factor <= 1.0 + 1e-6:
        return []
    n = math.ceil(math.log(factor, 2) - 1e-9)
    out, left = [], factor
    for _ in range(n - 1):
        out.append(2.0)
        left /= 2.0
    out.append(left)  # halving is exact in floating point: the stages multiply back to `factor`
    return out


def stage_steps(job: Job) -> int:
    """Denoising steps of each upscale stage."""
    return job.upscale_steps or max(4, min(10, job.steps // 3))


def stage_sizes(width: int, height: int, factor: float) -> list[tuple[int, int]]:
    """Pixel size after each stage; the last one is the job's output size."""
    sizes, f = [], 1.0
    for s in stage_factors(factor):
        f *= s
        sizes.append(out_size(width, height, f))
    return sizes


def stage_controls(
    job: Job, source: Image.Image, resized: Image.Image, pipe, demo: bool = False, depth_device: str | None = None
) -> tuple[tuple, list]:
    """Tile control on the resized image (or canny where the ControlNet has no tile mode) plus the
    user's controls recomputed from the source photo at this stage's size."""
    size = resized.size
    photo = source.resize(size, Image.LANCZOS)
    if has_mode_ids(pipe):
        specs = [ControlSpec("tile", scale=TILE_SCALE, end=1.0)]
        images = [resized]
    else:
        specs = [ControlSpec("canny", scale=0.5, end=0.8)]
        images = [preprocess("canny", resized)]
    for c in job.controls:
        if c.kind in ("tile",):
            continue
        specs.append(c)
        images.append(preprocess(c.kind, photo, **control_params(c, demo, depth_device)))
    return tuple(specs), images


def upscale(
    job: Job,
    source: Image.Image,
    image: Image.Image,
    rt: Runtime,
    img2img,
    monitor: MemoryMonitor,
    events: list[str],
    cache: PromptCache,
    demo: bool = False,
    depth_device: str | None = None,
) -> Image.Image:
    """Take `image` (job.width × job.height) up to job.out_size in stages."""
    steps = stage_steps(job)
    sizes = stage_sizes(job.width, job.height, job.upscale)
    for k, (w, h) in enumerate(sizes, 1):
        label = f"upscale {k}/{len(sizes)} to {w}×{h}"
        resized = image.resize((w, h), Image.LANCZOS)
        specs, controls = stage_controls(job, source, resized, rt.pipe, demo, depth_device)
        with monitor.phase("encode"):
            pe, pooled = cache.get(rt.pipe, job.prompt, rt.device, rt.max_seq)
        total = max(1, int(math.ceil(steps / max(job.upscale_strength, 1e-3))))
        runs = total - int(max(total - total * job.upscale_strength, 0))  # what img2img will run
        on_tile = (lambda i, n, label=label: rt.progress(f"{label}: tile", i, n)) if rt.progress else None
        with (
            monitor.phase(f"upscale{k}"),
            torch.no_grad(),
            skip_idle_controls(rt.pipe),
            tiled_denoising(rt.pipe, w, h, rt.upscale_tile or 1024, rt.overlap or 128, on_tile) as tiles,
        ):
            n = len(tiles)
            events.append(f"{label}: {n} tile{'s' * (n != 1)}, {runs} steps at strength {job.upscale_strength}")
            announce(rt, label, runs)
            latents = img2img(
                image=resized,
                prompt_embeds=pe,
                pooled_prompt_embeds=pooled,
                control_image=controls,
                height=h,
                width=w,
                strength=job.upscale_strength,
                num_inference_steps=total,
                guidance_scale=job.guidance,
                generator=torch.Generator("cpu").manual_seed(job.seed + k),
                output_type="latent",
                max_sequence_length=rt.max_seq,
                callback_on_step_end=step_callback(rt, label, runs, (w, h)),
                callback_on_step_end_tensor_inputs=["latents"],
                **control_args(rt.pipe, specs),
            ).images
        announce(rt, f"{label}: decode")
        image = decode(rt.pipe, latents, w, h, monitor, events)
    return image
