"""One generation pass through diffusers' FluxControlNetPipeline: encode, denoise, decode.

Phases are explicit so the memory monitor can time them and an out-of-memory says where it happened.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import torch
from PIL import Image

from preprocessors.registry import CONTROLS, preprocess

from .job import ControlSpec, Job
from .memory import MemoryMonitor, free_memory, is_oom
from .models import has_mode_ids
from .preview import latent_rgb
from .skip import skip_idle_controls
from .tiled import tiled_denoising

Progress = Callable[..., None]
"""Called as (stage label, done, total) at every step end. A callable may opt in to more through
attributes (plain three-argument callables see nothing new):
`phases = True`: also (phase, 0, 1) as "encode" and "decode" start, and (label, 0, total) before a
pass's first step, so a UI can say what runs between steps;
`preview_every = k`: every k-th step end (and the last) comes with a keyword `preview=`, a small
RGB image of the latents (core/preview.py)."""


class JobCancelled(Exception):
    """The user cancelled; raised between denoising steps."""


@dataclass
class Runtime:
    """What a pass needs besides the job: the pipeline as placed by the plan."""

    pipe: object
    device: torch.device
    max_seq: int
    tile: int  # generation tile (px), 0: whole image
    overlap: int
    upscale_tile: int = 1024  # tile of the upscale stages
    residency: object | None = None  # core.residency.Residency, told about step ends
    progress: Progress | None = None
    cancel: Callable[[], bool] | None = None


class PromptCache:
    """Prompt embeddings kept on the CPU: the text encoders run once per prompt."""

    def __init__(self, size: int = 8):
        self.size, self.data = size, OrderedDict()

    def get(self, pipe, prompt: str, device: torch.device, max_seq: int):
        key = (prompt, max_seq, pipe.text_encoder_2.dtype)
        if key not in self.data:
            with torch.no_grad():
                pe, pooled, _ = pipe.encode_prompt(
                    prompt=prompt, prompt_2=prompt, device=device, max_sequence_length=max_seq
                )
            self.data[key] = (pe.cpu(), pooled.cpu())
            while len(self.data) > self.size:
                self.data.popitem(last=False)
        self.data.move_to_end(key)
        pe, pooled = self.data[key]
        return pe.to(device), pooled.to(device)


def control_images(
    job: Job, image: Image.Image, demo: bool = False, depth_device: str | None = None
) -> list[Image.Image]:
    """Each control computed from the (resized) input image; the demo model gets the demo depth model."""
    return [preprocess(c.kind, image, **control_params(c, demo, depth_device)) for c in job.controls]


def control_params(c: ControlSpec, demo: bool, depth_device: str | None = None) -> dict:
    """Preprocessor arguments. Depth runs where the plan says: on the CPU under small budgets, so the
    depth model never adds to the GPU memory the tier promised."""
    params = dict(c.params)
    if c.kind == "depth":
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


def announce(rt: Runtime, label: str, total: int = 1) -> None:
    """A phase starts: told only to progress callables that opted in (`phases`)."""
    if rt.progress is not None and getattr(rt.progress, "phases", False):
        rt.progress(label, 0, total)


def step_callback(rt: Runtime, label: str, total: int, size: tuple[int, int] | None = None):
    """diffusers' callback_on_step_end; `size` (width, height) of the pass enables previews."""
    every = int(getattr(rt.progress, "preview_every", 0) or 0) if size else 0

    def cb(pipe, i, t, kw):
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


def decode(
    pipe, latents: torch.Tensor, width: int, height: int, monitor: MemoryMonitor, events: list[str]
) -> Image.Image:
    """Packed latents → PIL; an out-of-memory retries with tiled VAE decoding."""
    lat = pipe._unpack_latents(latents, height, width, pipe.vae_scale_factor)
    lat = lat / pipe.vae.config.scaling_factor + pipe.vae.config.shift_factor
    with monitor.phase("decode"), torch.no_grad():
        try:
            img = pipe.vae.decode(lat.to(pipe.vae.dtype), return_dict=False)[0]
        except Exception as e:
            if not is_oom(e) or pipe.vae.use_tiling:
                raise
            del e
            free_memory()
            events.append("VAE decode ran out of memory: retried with tiled decoding")
            pipe.vae.enable_tiling()
            img = pipe.vae.decode(lat.to(pipe.vae.dtype), return_dict=False)[0]
    return pipe.image_processor.postprocess(img, output_type="pil")[0]


def generate_pass(
    job: Job,
    image: Image.Image,
    controls: list[Image.Image],
    rt: Runtime,
    monitor: MemoryMonitor,
    events: list[str],
    cache: PromptCache,
) -> Image.Image:
    """Text-to-image with controls at job.width × job.height (in fused tiles if the plan says so)."""
    pipe = rt.pipe
    announce(rt, "encode")
    with monitor.phase("encode"):
        pe, pooled = cache.get(pipe, job.prompt, rt.device, rt.max_seq)
    gen = torch.Generator("cpu").manual_seed(job.seed)
    label = "generate"
    with (
        monitor.phase("denoise"),
        torch.no_grad(),
        skip_idle_controls(pipe) as skipped,
        tiled_denoising(pipe, job.width, job.height, rt.tile, rt.overlap) as tiles,
    ):
        if len(tiles) > 1:
            events.append(f"generated in {len(tiles)} fused tiles of {rt.tile}px")
        announce(rt, label, job.steps)
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
            callback_on_step_end=step_callback(rt, label, job.steps, (job.width, job.height)),
            callback_on_step_end_tensor_inputs=["latents"],
            **control_args(pipe, job.controls),
        ).images
    if skipped["skipped"]:
        events.append(f"skipped {skipped['skipped']} idle ControlNet passes (outside control start/end)")
    announce(rt, "decode")
    return decode(pipe, latents, job.width, job.height, monitor, events)
