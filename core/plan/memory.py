"""The memory model: GPU bytes a placement holds and the transients of each phase of a pass.

Its constants were fitted on the H200 with the full-size architecture, from the per-phase peaks of
fresh CLI processes at every tier and of jobs over pass sizes 512-1536 px, one and two controls
(bench/ram/ANY_RAM.md, bench/probes/transients.json, denoise_peak.json; for streamed plans 8-step
jobs only, as one-step ones hold less): the resident bytes are exact within 0.07 GiB; the transients
are the measured ones rounded up, so that no tier is under-predicted and none is more than 8 % over
(0.2-3.5 % at 1024², 0.9 % at 1536²).
"""

from __future__ import annotations

from dataclasses import dataclass

from core.device import GiB
from core.plan.placement import Placement, store
from core.plan.sizes import ModelSizes
from core.plan.units import UnitSize, buffer_bytes, gpu_bytes, host_bytes, stored_bytes


@dataclass(frozen=True)
class Calibration:
    """Memory-model constants (bytes), measured on the GPU machine; see bench/."""

    # denoiser transients of a pass. The control image's VAE encode runs inside the pipeline call,
    # so the denoising phase peaks at the larger of it and the denoiser's own (the phase maximum
    # takes both). All-resident plans, linear in image tokens: 0.25-3.40 GiB from 1024 to 9216
    # tokens, which is the untiled encode of the control image (1535-1547 B/px at 768-1536 px): the
    # fit holds the activations of the fused blocks under it.
    act_per_img_token: float = 64.4 * 3072 * 2
    act_offset: float = -0.05 * 2**30
    # Plans that stream, from jobs of 8 steps (fresh CLI processes, bench/ram/ram.json, and
    # bench/probes/denoise_peak.json), reserved over the resident bytes: 0.246 GiB at 1024 tokens
    # (the 4 GB tier's 512 px generation tiles), 1.48-1.51 at 4096 (every streamed tier, the VAE
    # tiled or not), 3.15-3.19 at 9216 (1536², tiers 16, 8). What holds it (the allocator's history at the peak): the
    # ControlNet's block outputs, their projections and scaled copies, with the previous step's
    # residuals still referenced by the pipeline's loop. One-step jobs read less (0.54 at 4096, 1.10
    # at 9216: transients_streamed.json), so the model is fitted on multi-step jobs only: linear
    # between these knots (tokens, bytes before `frag`), at least act_min_streamed, and past the
    # last knot by the earlier fit's steeper slope (72.25 per token and hidden unit), so larger
    # passes keep the generation tiles they were measured with (bench/UPSCALE.md).
    act_knots_streamed: tuple[tuple[int, float], ...] = (
        (1024, 0.246 / 1.02 * 2**30),
        (4096, 1.515 / 1.02 * 2**30),
        (9216, 3.151 / 1.02 * 2**30),
    )
    act_min_streamed: float = 0.16 * 2**30
    act_per_img_token_beyond: float = 72.25 * 3072 * 2
    # a second control of the Union net adds nothing measurable (its residuals are summed in place)
    act_per_extra_control: float = 0.0
    vae_dec_per_px: float = 2830.0  # untiled VAE decode, bytes per output pixel (2826 at 1536²)
    vae_enc_per_px: float = 1550.0  # untiled VAE encode (control image, img2img): 1535-1547 measured
    vae_tile_px: int = 512  # tile side when VAE tiling is on (the engine sets the VAE to it)
    vae_small_tile_px: int = 256  # where even 512 px VAE tiles do not fit (the 4 GB tier)
    text_gb: float = 0.24  # T5 and CLIP on a 512-token prompt: 0.238-0.239 GiB at every tier
    frag: float = 1.02  # reserved / allocated of the transients (weights sit in whole blocks: 1.0)
    # headroom over the sum: 0.18 GiB, or 3 % of the resident bytes where that is less (a fixed
    # 0.18 GiB is 8 % of the 4 GB tier by itself)
    margin_gb: float = 0.18
    margin_frac: float = 0.03
    # all-resident plans: workspaces of the compiled blocks in the denoising phase. Measured: a
    # compiled 48 GB CLI run peaked at 39.48 GiB in denoise, as the eager one (bench/ram/ram.json)
    fast_path_gb: float = 0.1


CAL = Calibration()


@dataclass(frozen=True)
class PassShape:
    """One denoising pass as the memory and time models see it: the pixels one pass holds (a tile
    or the whole image), how many controls run, whether the VAE works in tiles (of `vae_tile` px)
    and the pixels it works on (`out_px`: the largest image it encodes or decodes, which with
    generation tiles or upscaling is larger than the pass; 0: the pass itself)."""

    width: int
    height: int
    controls: int = 1
    vae_tiling: bool = False
    vae_tile: int = CAL.vae_tile_px
    out_px: int = 0


def esize(dtype: str) -> int:
    return {"bfloat16": 2, "float16": 2, "float32": 4}[dtype]


def tokens(width: int, height: int) -> int:
    return (width // 16) * (height // 16)


def t5_host_bytes(sizes: ModelSizes, code: str, es: int) -> int:
    """Pinned bytes of T5's layers streamed under a storage code."""
    if not sizes.t5_layers:
        return sizes.t5_unit_params * es
    return sum(stored_bytes(u, store(code), es) for u in sizes.t5_layers)


def host_ram_bytes(sizes: ModelSizes, p: Placement) -> int:
    """Pinned host memory a placement streams from (denoiser units, and T5 when it streams)."""
    es = esize(p.dtype)
    total = sum(host_bytes(u, s, es) for u, s in zip(sizes.units, p.stores))
    return total + (t5_host_bytes(sizes, p.t5, es) if p.text_encoders == "stream" else 0)


def _t5_unit(sizes: ModelSizes) -> UnitSize:
    """T5's largest streamed layer (all of it a Linear weight)."""
    if sizes.t5_layers:
        return max(sizes.t5_layers, key=lambda u: u.numel)
    return UnitSize("t5", sizes.t5_max_unit, sizes.t5_max_unit)


def slot_bytes(sizes: ModelSizes, p: Placement) -> int:
    """GPU bytes of the work slots and the copy ring (core.plan.units.buffer_bytes); streamed T5
    layers pass through the same ring (and the work slots, when stored compressed)."""
    units, codes = list(sizes.units), p.units
    if p.text_encoders == "stream":
        units, codes = units + [_t5_unit(sizes)], codes + p.t5
    return buffer_bytes(units, codes, esize(p.dtype), p.slots, p.ring)


def cast_scratch_bytes(sizes: ModelSizes, p: Placement) -> int:
    """Temporaries of 4-bit dequantization (core.stream.q4): none for the Triton kernel, a few
    chunks of 2^17 blocks in float32 for the torch fallback."""
    return 64 * 2**20 if p.any_q4 else 0


def knotted(n: int, knots: tuple[tuple[int, float], ...], beyond: float) -> float:
    """Linear between measured (n, bytes) knots: below the first along the first segment, past the
    last by `beyond` bytes per token."""
    for (na, ba), (nb, bb) in zip(knots, knots[1:]):
        if n <= nb:
            return ba + (bb - ba) * (n - na) / (nb - na)
    return knots[-1][1] + beyond * (n - knots[-1][0])


def phase_bytes(ps: PassShape, es: int, cal: Calibration = CAL, all_resident: bool = False) -> dict[str, float]:
    """Transient GPU bytes of each phase on top of the resident weights, for one pass."""
    n_img = tokens(ps.width, ps.height)
    scale = es / 2
    extra = cal.act_per_extra_control * max(ps.controls - 1, 0)
    if all_resident:
        act = max((cal.act_per_img_token + extra) * n_img + cal.act_offset, 0.0)
    else:
        act = max(knotted(n_img, cal.act_knots_streamed, cal.act_per_img_token_beyond), cal.act_min_streamed)
        act += extra * n_img
    denoise = act * scale
    px = max(ps.out_px, ps.width * ps.height)  # the VAE sees whole images, not generation tiles
    tpx = min(px, ps.vae_tile**2) if ps.vae_tiling else px
    encode_img = cal.vae_enc_per_px * tpx * scale
    decode = cal.vae_dec_per_px * tpx * scale + (6 * px * scale if ps.vae_tiling else 0)
    return dict(denoise=denoise, encode_image=encode_img, decode=decode, text=cal.text_gb * GiB)


def resident_bytes(sizes: ModelSizes, p: Placement) -> int:
    """Everything a placement keeps on the GPU between phases: weights, buffers, CLIP, VAE, T5."""
    es = esize(p.dtype)
    total = (sizes.fixed_params + sizes.vae_params) * es
    total += sum(gpu_bytes(u, s, es) for u, s in zip(sizes.units, p.stores))
    total += slot_bytes(sizes, p) + cast_scratch_bytes(sizes, p)
    total += (sizes.t5_params - sizes.t5_unit_params + sizes.clip_params) * es
    if p.text_encoders == "gpu":
        total += sizes.t5_unit_params * es
    return total


def phase_peak_bytes(sizes: ModelSizes, p: Placement, ps: PassShape, cal: Calibration = CAL) -> dict[str, float]:
    """Peak reserved GPU bytes of each phase: the resident bytes plus that phase's transients (what
    a job's measured per-phase peaks are compared with)."""
    resident = resident_bytes(sizes, p)
    ph = phase_bytes(ps, esize(p.dtype), cal, p.all_resident)
    if p.all_resident:
        ph["denoise"] += cal.fast_path_gb * GiB
    margin = margin_bytes(resident, cal)
    return {k: resident + v * cal.frag + margin for k, v in ph.items()}


def margin_bytes(resident: float, cal: Calibration = CAL) -> float:
    """Headroom over a placement's predicted peak: it grows with the resident bytes, up to margin_gb."""
    return min(cal.margin_gb * GiB, cal.margin_frac * resident)


def predict_peak_bytes(sizes: ModelSizes, p: Placement, ps: PassShape, cal: Calibration = CAL) -> float:
    """Peak reserved GPU bytes of a pass: that of its largest phase."""
    return max(phase_peak_bytes(sizes, p, ps, cal).values())
