"""Seconds to a process's first image: what the first job pays beyond the denoising.

The denoising is core.plan.timing's (Plan.predicted_job_s). Before it the weights are read from disk
and placed (copied to the GPU, or pinned in host RAM to be streamed from), the denoiser blocks are
compiled where this job compiles (core.speed.compile_policy), and the prompt is encoded; after it
the VAE decodes (and encodes, for controls and upscale stages). Pure: whether the job compiles and
whether Inductor's cache is warm are arguments, never read here.
"""

from __future__ import annotations

from typing import Literal

from core.device import DeviceInfo, GiB
from core.plan.memory import cast_scratch_bytes, esize, host_ram_bytes, resident_bytes, slot_bytes, t5_host_bytes
from core.plan.placement import Placement, store
from core.plan.sizes import ModelSizes
from core.plan.stages import stage_sizes
from core.plan.timing import BUS_EFF, MODEL_EFF

DISK_GBPS = 2.0  # GiB/s the checkpoints are read at: a local NVMe SSD's sequential read (a network
# disk is slower, files in the page cache faster)
FILE_BYTES = 2  # bytes per parameter in the checkpoint files (FLUX.1-dev and the Union ControlNets ship bf16)
COMPILE_COLD_S = 23.0  # torch.compile of the two block graphs, Inductor's disk cache cold: 23.2 s (H200,
# full size, bench/first); 15.9-18.0 s when they are compiled ahead of time and saved (2026-12-03)
COMPILE_WARM_S = 15.5  # the same with Inductor's cache serving every graph: 14.7 and 16.5 s in two runs
# (H200): Dynamo's tracing, guards and loading are most of it
ENCODE_S = 0.03  # a prompt's fixed cost (tokenizers, CLIP, launches): H100 0.036 s with T5 resident
VAE_FLOP_PER_PX = 6.5e7  # the VAE decoder's effective FLOPs per output pixel: 0.093 s at 1024² on an
# H100 measured at 729 TFLOP/s (bench/results.json)
VAE_ENCODE_SHARE = 0.5  # encoding a pixel costs about half of decoding it (the lighter half of the VAE)


COMPILE_LOAD_S = 3.0  # the same blocks loaded as ahead-of-time artifacts (core.speed.precompile): 2.2 s in
# the CLI's second process, 1.9-3.0 s in the app's second job (H200, full size, bench/first, 2026-12-03)
CompileCache = Literal["cold", "kernels", "artifacts"]  # nothing on disk, Inductor's kernels, saved graphs


def compile_seconds(compiles: bool, cache: CompileCache = "cold") -> float:
    """What compiling the blocks adds to a job: nothing unless it compiles."""
    if not compiles:
        return 0.0
    return {"cold": COMPILE_COLD_S, "kernels": COMPILE_WARM_S, "artifacts": COMPILE_LOAD_S}[cache]


def _rate(device: DeviceInfo, dtype: str) -> float:
    """FLOP/s the compute dtype reaches (float32 at a quarter of the bf16 rate, as core.plan.timing)."""
    return device.tflops * 1e12 * (1.0 if esize(dtype) == 2 else 0.25)


def first_job_parts(
    width: int,
    height: int,
    controls: int,
    upscale: float,
    sizes: ModelSizes,
    p: Placement,
    device: DeviceInfo,
    denoise_s: float,
    compile_s: float = 0.0,
) -> tuple[tuple[str, float], ...]:
    """(part, seconds) of a first job: read, place, compile, encode, denoise, vae. `compile_s`:
    what compiling adds (compile_seconds; 0 where the job does not compile)."""
    total = sum(u.numel for u in sizes.units) + sizes.fixed_params + sizes.t5_params + sizes.clip_params
    read = (total + sizes.vae_params) * FILE_BYTES / (DISK_GBPS * GiB)
    # weights copied to the GPU (its work buffers are allocated, not copied) and streamed ones pinned;
    # a lower bound: packing into fp8 or 4-bit on the host is not counted
    on_gpu = resident_bytes(sizes, p) - slot_bytes(sizes, p) - cast_scratch_bytes(sizes, p)
    place = (on_gpu + host_ram_bytes(sizes, p)) / (device.h2d_gbps * GiB)
    rate = _rate(device, p.dtype)
    encode = ENCODE_S + 2.0 * (sizes.t5_params + sizes.clip_params) * sizes.max_seq / (rate * MODEL_EFF)
    if p.text_encoders == "stream":  # T5's layers cross the bus for every prompt
        encode += t5_host_bytes(sizes, p.t5, esize(p.dtype)) / (device.h2d_gbps * GiB * BUS_EFF[store(p.t5).fmt])
    px = width * height
    vae_px = px * (1 + VAE_ENCODE_SHARE * controls)  # the control images in, the image out
    vae_px += sum(w * h * (1 + VAE_ENCODE_SHARE) for w, h in stage_sizes(width, height, upscale))
    vae = vae_px * VAE_FLOP_PER_PX / rate
    parts = dict(read=read, place=place, compile=compile_s, encode=encode, denoise=denoise_s, vae=vae)
    return tuple((k, round(v, 2)) for k, v in parts.items())
