"""One generation pass through diffusers' FluxControlNetPipeline: encode, denoise, decode.

Phases are explicit so the memory monitor can time them and an out-of-memory says where it happened.
"""

from __future__ import annotations

import torch
from PIL import Image

from core.denoise.passes import announce, denoising, step_callback
from core.denoise.runtime import Runtime
from core.job import ControlSpec, Job
from core.models import has_mode_ids
from core.monitor import free_memory, is_oom
from preprocessors.registry import CONTROLS, preprocess


def control_images(
    job: Job, image: Image.Image, demo: bool = False, depth_device: str | None = None
) -> list[Image.Image]:
    """Each control computed from the (resized) input image; the demo model gets the demo depth model."""
    return [preprocess(c.kind, image, **control_params(c, demo, depth_device)) for c in job.controls]


def control_params(c: ControlSpec, demo: bool, depth_device: str | None = None) -> dict:
    """Preprocessor arguments. Detectors (depth, pose, soft edge) run where the plan says: on the CPU
    under small budgets, so a detector never adds to the GPU memory the tier promised."""
    params = dict(c.params)
    if CONTROLS[c.kind].uses_model:
        if demo:
            params.setdefault("demo", True)
        if depth_device:
            params.setdefault("device", depth_device)
    return params


def control_args(pipe, controls: tuple[ControlSpec, ...]) -> dict:
    """Lists for the multi-ControlNet call; Union-Pro-2.0 takes no mode ids."""
    modes = has_mode_ids(pipe)
    if not modes:
        bad = [c.kind for c in controls if not CONTROLS[c.kind].in_pro2]
        if bad:
            raise ValueError(f"This ControlNet (no mode ids, like Union-Pro-2.0) does not support: {', '.join(bad)}.")
    return dict(
        control_mode=[c.mode_id for c in controls] if modes else None,
        controlnet_conditioning_scale=[c.scale for c in controls],
        control_guidance_start=[c.start for c in controls],
        control_guidance_end=[c.end for c in controls],
    )


def decode(rt: Runtime, latents: torch.Tensor, width: int, height: int) -> Image.Image:
    """Packed latents → PIL; an out-of-memory retries with tiled VAE decoding."""
    pipe = rt.pipe
    lat = pipe._unpack_latents(latents, height, width, pipe.vae_scale_factor)
    lat = lat / pipe.vae.config.scaling_factor + pipe.vae.config.shift_factor
    with rt.monitor.phase("decode"), torch.no_grad():
        try:
            img = pipe.vae.decode(lat.to(pipe.vae.dtype), return_dict=False)[0]
        except Exception as e:
            if not is_oom(e) or pipe.vae.use_tiling:
                raise
            del e
            free_memory()
            rt.events.append("VAE decode ran out of memory: retried with tiled decoding")
            pipe.vae.enable_tiling()
            img = pipe.vae.decode(lat.to(pipe.vae.dtype), return_dict=False)[0]
    return pipe.image_processor.postprocess(img, output_type="pil")[0]


def generate_pass(job: Job, image: Image.Image, controls: list[Image.Image], rt: Runtime) -> Image.Image:
    """Text-to-image with controls at job.width × job.height (in fused tiles if the plan says so)."""
    pipe = rt.pipe
    announce(rt, "encode")
    with rt.monitor.phase("encode"):
        pe, pooled = rt.cache.get(pipe, job.prompt, rt.device, rt.max_seq, rt.encoders)
    gen = torch.Generator("cpu").manual_seed(job.seed)
    with rt.monitor.phase("denoise"), denoising(rt, job.width, job.height, rt.tile, rt.overlap) as info:
        if len(info.tiles) > 1:
            rt.events.append(f"generated in {len(info.tiles)} fused tiles of {rt.tile}px")
        announce(rt, "generate", job.steps)
        latents = pipe(
            prompt_embeds=pe,
            pooled_prompt_embeds=pooled,
            control_image=controls,
            height=job.height,
            width=job.width,
            num_inference_steps=job.steps,
            guidance_scale=job.guidance,
            generator=gen,
            output_type="latent",
            max_sequence_length=rt.max_seq,
            callback_on_step_end=step_callback(rt, "generate", job.steps, (job.width, job.height)),
            callback_on_step_end_tensor_inputs=["latents"],
            **control_args(pipe, job.controls),
        ).images
    announce(rt, "decode")
    return decode(rt, latents, job.width, job.height)
