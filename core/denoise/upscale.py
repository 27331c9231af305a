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

from core.denoise.generate import control_args, control_params, decode
from core.denoise.passes import announce, denoising, step_callback
from core.denoise.runtime import Runtime
from core.job import ControlSpec, Job
from core.models import has_mode_ids
from core.plan.stages import stage_sizes, stage_steps
from preprocessors.registry import preprocess

TILE_SCALE = 0.45


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


def upscale(job: Job, source: Image.Image, image: Image.Image, rt: Runtime) -> Image.Image:
    """Take `image` (job.width × job.height) up to job.out_size in stages (rt.img2img shares the
    placed pipeline's modules)."""
    steps = stage_steps(job.steps, job.upscale_steps)
    sizes = stage_sizes(job.width, job.height, job.upscale)
    for k, (w, h) in enumerate(sizes, 1):
        label = f"upscale {k}/{len(sizes)} to {w}×{h}"
        resized = image.resize((w, h), Image.LANCZOS)
        specs, controls = stage_controls(job, source, resized, rt.pipe, rt.demo, rt.depth_device)
        with rt.monitor.phase("encode"):
            pe, pooled = rt.cache.get(rt.pipe, job.prompt, rt.device, rt.max_seq, rt.encoders)
        total = max(1, int(math.ceil(steps / max(job.upscale_strength, 1e-3))))
        runs = total - int(max(total - total * job.upscale_strength, 0))  # what img2img will run
        on_tile = (lambda i, n, label=label: rt.progress(f"{label}: tile", i, n)) if rt.progress else None
        tile, overlap = rt.upscale_tile or 1024, rt.overlap or 128
        with rt.monitor.phase(f"upscale{k}"), denoising(rt, w, h, tile, overlap, on_tile, report=False) as info:
            n = len(info.tiles)
            rt.events.append(f"{label}: {n} tile{'s' * (n != 1)}, {runs} steps at strength {job.upscale_strength}")
            announce(rt, label, runs)
            latents = rt.img2img(
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
        image = decode(rt, latents, w, h)
    return image
