"""Tiers and plans: how a job runs within a GPU-memory budget, as fast as the budget allows.

`plan_for(tier, shape, sizes, device)` is a pure function. It picks the compute dtype, the placement
of every denoiser unit (core.plan.placement), where the text encoders run, VAE tiling and the
generation tile, the devices of the helpers (depth), and predicts the peak GPU memory, the time per
denoising step, the whole job's seconds and those of a process's first job (core.plan.first_job).
The memory model is core.plan.memory, the time model core.plan.timing (both fitted on the H200's
runs: bench/ram/ANY_RAM.md), the search core.plan.search.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field, fields, replace

from core.device import DeviceInfo, GiB
from core.job import GPU_TIERS, out_size
from core.plan.first_job import CompileCache, compile_seconds, first_job_parts
from core.plan.memory import CAL, PassShape, host_ram_bytes, phase_peak_bytes, predict_peak_bytes
from core.plan.placement import RESIDENT, RESIDENT_FP8, STREAMED_FP8, STREAMED_Q4, Placement, allowed_codes
from core.plan.search import choose, host_cap_bytes, placement_of
from core.plan.sizes import ModelSizes
from core.plan.stages import stage_sizes, stage_steps
from core.plan.timing import predict_step_s
from core.tiling import tile_overlap, token_tiles

CONTEXT_GB = 0.5  # a tier N promises the whole process N - 0.5 GiB (the driver's figure)
DEPTH_ON_GPU_GB = 40  # the depth model (~0.1 GB) runs on the GPU only where the budget leaves room
UPSCALE_TILE = 1024  # upscale stages refine tiles of at most FLUX's native scale
VAE_TILE_PX = CAL.vae_tile_px  # the VAE's tile when tiling is on (the memory model counts this size)


@dataclass(frozen=True)
class JobShape:
    """What of a job the plan depends on (the prompt and the pixels do not matter)."""

    width: int
    height: int
    controls: int = 1
    upscale: float = 1.0
    steps: int = 28
    upscale_steps: int | None = None


@dataclass(frozen=True)
class Plan:
    tier: str  # "48" ... "4", "auto", "cpu"
    device: str  # "cuda" | "cpu"
    budget_gb: float  # GiB the whole job may reserve on the GPU
    placement: Placement  # storage of every denoiser unit, T5, streaming buffers, compute dtype
    vae_tiling: bool
    tile: int  # generation tile side in px (0: the whole image in one pass)
    overlap: int  # tile overlap in px (generation and upscale)
    predicted_peak_gb: float
    predicted_step_s: float  # one denoising step of the generation (all its tiles)
    host_ram_gb: float  # pinned host RAM for streamed weights
    notes: tuple[str, ...] = field(default=())
    upscale_tile: int = 0  # tile side of the upscale stages (0: no upscaling)
    depth_device: str = "cpu"  # where the depth preprocessor runs
    predicted_job_s: float = 0.0  # denoising of the whole job: generation and upscale stages
    precision: str = "exact"  # "exact" (compute dtype and fp8 weights only) or "4bit" (some 4-bit)
    phase_peaks_gb: tuple[tuple[str, float], ...] = ()  # predicted peak of each phase (text, denoise, ...)
    vae_tile_px: int = VAE_TILE_PX  # the VAE's tile side when vae_tiling (256 where 512 does not fit)
    # the job as the first of a process: weights read and placed, compiled if it compiles, encode,
    # denoise, VAE (core.plan.first_job); 0 and () on the CPU, which has no time model
    predicted_first_job_s: float = 0.0
    first_job_parts: tuple[tuple[str, float], ...] = ()  # (part, seconds): what the total is made of

    @property
    def dtype(self) -> str:
        return self.placement.dtype

    @property
    def text_encoders(self) -> str:
        return self.placement.text_encoders

    def summary(self) -> dict:
        """The plan as JSON: its own fields, the placement as counts per storage code and its buffers."""
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "placement"}
        d["phase_peaks_gb"] = dict(self.phase_peaks_gb)
        d["first_job_parts"] = dict(self.first_job_parts)
        p = self.placement
        d.update(dtype=p.dtype, placement=p.counts(), slots=p.slots, text_encoders=p.text_encoders, ring=p.ring)
        d.update(formats=p.formats())
        d.update(notes=list(self.notes), vae_tile=self.vae_tile_px if self.vae_tiling else 0)
        del d["vae_tile_px"]
        return d


def budget_for(tier: str, device: DeviceInfo) -> float:
    """GiB a tier's allocator may use: N - 0.5 GiB less what the process holds outside the allocator
    (its CUDA context and workspaces), so the whole process stays under N - 0.5 as the driver counts
    it. Auto: the free memory (which the context already left) less the margin."""
    if tier == "auto":
        return max(device.free_gb - CONTEXT_GB, 0.0)
    return float(tier) - CONTEXT_GB - device.context_gb


def pass_size(shape: JobShape, tile: int) -> tuple[int, int]:
    """The largest denoiser pass of a job: the generation tile (or image), or the ≤ 1024² px tiles
    the upscale stages refine, whichever is larger."""
    gw, gh = (shape.width, shape.height) if tile == 0 else (min(tile, shape.width), min(tile, shape.height))
    if shape.upscale <= 1:
        return gw, gh
    out_w, out_h = out_size(shape.width, shape.height, shape.upscale)
    return max(gw, min(gw if tile else UPSCALE_TILE, out_w)), max(gh, min(gh if tile else UPSCALE_TILE, out_h))


def n_tiles(width: int, height: int, tile: int, overlap: int | None = None) -> int:
    """Tiles of a pass, split exactly as core.denoise.tiled will split it."""
    return len(token_tiles(width, height, tile, tile_overlap(tile) if overlap is None else overlap)[2])


def job_seconds(shape: JobShape, step_s: float, upscale_tile: int, overlap: int) -> float:
    """Denoising seconds of the whole job: the generation's steps (step_s covers all its tiles), then
    every upscale stage's steps over its tiles, at the same time per tile pass."""
    stage_tiles = sum(
        n_tiles(w, h, upscale_tile or UPSCALE_TILE, overlap or 128)
        for w, h in stage_sizes(shape.width, shape.height, shape.upscale)
    )
    return round(step_s * (shape.steps + stage_steps(shape.steps, shape.upscale_steps) * stage_tiles), 2)


def _cpu_plan(shape: JobShape, sizes: ModelSizes, dtype: str | None) -> Plan:
    """Everything resident on the CPU; units of a file's fp8 weights as fp8 (F), cast per use: widening
    them all would double the transformer's host RAM."""
    dtype = dtype or ("float32" if sum(u.numel for u in sizes.units) < 1e9 else "bfloat16")
    codes = "".join(RESIDENT_FP8.code if u.fp8_file else RESIDENT.code for u in sizes.units)
    p = placement_of(codes, dtype, "cpu")
    notes = ("everything runs on the CPU: expect minutes per image with the full-size model", *_fp8_note(p, sizes))
    return Plan("cpu", "cpu", 0.0, p, False, 0, 128, 0.0, 0.0, 0.0, notes, UPSCALE_TILE if shape.upscale > 1 else 0)


def _fp8_note(p: Placement, sizes: ModelSizes) -> tuple[str, ...]:
    if any(s.fp8 and u.fp8_file for s, u in zip(p.stores, sizes.units)):
        return ("fp8 units hold the transformer file's own float8 weights (no second rounding)",)
    return ()


def plan_for(
    tier: str,
    shape: JobShape,
    sizes: ModelSizes,
    device: DeviceInfo,
    tile: int | None = None,
    dtype: str | None = None,
    host_cap_gb: float | None = None,
    precision: str = "auto",
    compiles: bool = False,
    compile_cache: CompileCache = "cold",
) -> Plan:
    """The fastest plan that keeps the whole job (encode, denoise, decode, upscale) under the tier's
    budget and the host RAM. `tile` forces a generation tile (used when stepping down), `dtype` the
    compute dtype (float32 after a NaN/black result), `host_cap_gb` the pinned host RAM (after a
    failure to pin), `precision` the weight formats (core.plan.placement.PRECISIONS): "auto" is
    the most exact that fits, 4-bit only where exact weights do not. `compiles`: a first job of
    this process would compile the blocks where the whole denoiser is resident (the engine's
    policy), `compile_cache`: what the disk holds of an earlier compile (core.plan.first_job); both
    only for predicted_first_job_s."""
    tier = str(tier).lower()
    allowed_codes(precision)  # a bad value is one sentence before anything else
    if tier == "auto" and device.kind == "cpu":
        tier = "cpu"
    if tier == "cpu":
        return _cpu_plan(shape, sizes, dtype)
    if tier != "auto" and tier not in GPU_TIERS:
        raise ValueError(f"tier must be one of auto, cpu, {', '.join(GPU_TIERS)}, got {tier!r}.")
    dtype = dtype or ("bfloat16" if device.bf16 else "float32")
    budget = budget_for(tier, device) * GiB
    notes = [] if dtype != "float32" else ["computing in float32 (no bf16 on this GPU, or a NaN result in bf16)"]
    if tier != "auto" and device.context_gb > 0:
        notes.append(f"{device.context_gb:.2f} GiB of the tier kept for the CUDA context and libraries")
    host_cap = host_cap_bytes(device) if host_cap_gb is None else int(host_cap_gb * GiB)
    # the generation tile: the whole image if it fits, else the largest square tile that does; at
    # each size exact weights first, then (auto) 4-bit: a whole image in 4-bit beats exact tiles
    for t in [tile] if tile else [0, 1024, 768, 512, 384]:
        if t == 0 and shape.width * shape.height > 1024 * 1024 and shape.upscale > 1:
            continue  # upscale stages run in tiles of at most 1024 anyway
        plan = None
        for prec in ("exact", "4bit") if precision == "auto" else (precision,):
            plan = plan or _plan_at(tier, shape, sizes, device, t, dtype, budget, host_cap, prec, notes)
        if plan is not None:
            if plan.placement.any_q4:
                why = "exact weights do not fit" if precision == "auto" else "precision 4bit"
                fmts = plan.placement.formats()
                plan = replace(
                    plan,
                    notes=(
                        *plan.notes,
                        f"4-bit weights (GGUF Q4_0) where they stream: {why} "
                        f"(denoiser {fmts['denoiser']}, T5 {fmts['t5']})",
                    ),
                )
            plan = replace(plan, notes=(*plan.notes, *_fp8_note(plan.placement, sizes)))
            return with_first_job(plan, shape, sizes, device, compile_seconds(compiles, compile_cache))
    raise ValueError(_refusal(tier, shape, sizes, device, dtype, budget, host_cap, precision))


def _refusal(tier, shape, sizes, device, dtype, budget, host_cap, precision) -> str:
    """Why no plan fits, in one sentence: the GPU budget, or only the host RAM (then: how much)."""
    ram = f"{host_cap / GiB:.1f} GiB of pinned host RAM this machine allows ({device.host_ram_gb:.0f} GiB RAM)"
    four = ", precision 4bit" if precision == "exact" else ""
    fits_gpu = any(  # with unlimited RAM, would the GPU hold it?
        _plan_at(tier, shape, sizes, device, t, dtype, budget, 1 << 62, prec, []) is not None
        for prec in (("exact", "4bit") if precision == "auto" else (precision,))
        for t in (0, 384)
    )
    if fits_gpu:
        code = STREAMED_FP8.code if precision == "exact" else STREAMED_Q4.code  # the fewest bytes it may pin
        least = host_ram_bytes(sizes, Placement(code * len(sizes.units), dtype, "stream", t5=code)) / GiB
        return (
            f"The {tier} tier fits this GPU, but its streamed weights need at least {least:.1f} GiB of pinned host "
            f"RAM, more than the {ram}; choose a larger tier{four}, a machine with more RAM, or the CPU."
        )
    return (
        f"The {tier} tier ({budget / GiB:.1f} GiB) cannot hold this job even with every weight streamed and "
        f"the smallest tile; choose a larger tier{four} or the CPU."
    )


def _plan_at(tier, shape, sizes, device, t, dtype, budget, host_cap, precision, notes) -> Plan | None:
    """The fastest plan of one precision at generation tile `t` (0: whole image); None if none fits."""
    out_w, out_h = out_size(shape.width, shape.height, shape.upscale)
    pw, ph = pass_size(shape, t)
    vae_needed = out_w * out_h > pw * ph  # decoding the upscaled image needs tiles
    out_px = out_w * out_h  # the VAE decodes (and encodes) whole images, not tiles
    # the VAE whole, in 512 px tiles, or (only where nothing else fits) in 256 px tiles
    vae_tiles = [(True, VAE_TILE_PX)] if vae_needed else [(False, VAE_TILE_PX), (True, VAE_TILE_PX)]
    vae_tiles.append((True, CAL.vae_small_tile_px))
    cands = []
    for text_enc in ("gpu", "stream") if tier in ("48", "auto") else ("stream",):
        for vae_tiling, vae_tile in vae_tiles:
            if cands and vae_tile < VAE_TILE_PX:
                break
            ps = PassShape(pw, ph, shape.controls, vae_tiling, vae_tile, out_px)
            got = choose(sizes, dtype, text_enc, ps, budget, device, host_cap, precision)
            if got:  # tiled decoding costs ~0.1 s per image: count it as a small step penalty
                cands.append((got[2] * (1.01 if vae_tiling else 1.0), ps, got))
        if cands and text_enc == "gpu":
            break  # resident text encoders fit: no need to stream them
    if not cands:
        return None
    _, ps, (p, peak, _) = min(cands, key=lambda c: c[0])
    vae_tiling = ps.vae_tiling
    step = predict_step_s(sizes, p, ps, device)
    step *= n_tiles(shape.width, shape.height, t)
    tile_notes = [f"generation runs in {t}px tiles fused at every step"] if t else []
    overlap = tile_overlap(t) if t else 128
    upscale_tile = (t or UPSCALE_TILE) if shape.upscale > 1 else 0
    return Plan(
        tier,
        "cuda",
        round(budget / GiB, 2),
        p,
        vae_tiling,
        t,
        overlap,
        round(peak / GiB, 2),
        round(step, 3),
        round(host_ram_bytes(sizes, p) / GiB, 1),
        tuple(notes + tile_notes),
        upscale_tile=upscale_tile,
        depth_device="cuda" if budget / GiB >= DEPTH_ON_GPU_GB else "cpu",
        predicted_job_s=job_seconds(shape, round(step, 3), upscale_tile, overlap),
        precision="4bit" if p.any_q4 else "exact",
        phase_peaks_gb=_phase_peaks(sizes, p, ps),
        vae_tile_px=ps.vae_tile,
    )


def with_first_job(plan: Plan, shape: JobShape, sizes: ModelSizes, device: DeviceInfo, compile_s: float) -> Plan:
    """`plan` with its first job's seconds; `compile_s` counts only where the fast path compiles (the
    whole denoiser resident)."""
    compile_s = compile_s if plan.placement.all_resident else 0.0
    parts = first_job_parts(
        shape.width,
        shape.height,
        shape.controls,
        shape.upscale,
        sizes,
        plan.placement,
        device,
        plan.predicted_job_s,
        compile_s,
    )
    return replace(plan, predicted_first_job_s=round(sum(s for _, s in parts), 1), first_job_parts=parts)


def _phase_peaks(sizes: ModelSizes, p: Placement, ps: PassShape) -> tuple[tuple[str, float], ...]:
    return tuple((k, round(v / GiB, 2)) for k, v in phase_peak_bytes(sizes, p, ps).items())


def keep_placement(prev: Plan | None, new: Plan, shape: JobShape, sizes: ModelSizes, device: DeviceInfo) -> Plan:
    """`new`, but with the placement already on the GPU (`prev`) when that one also holds this job
    and is at most 15 % slower per step: moving the weights again costs 10-25 s (full size), a few
    percent of the step time costs less. A different tier, dtype, precision or device always takes
    `new`."""
    if (
        prev is None
        or prev.device != "cuda"
        or (prev.tier, prev.dtype, prev.precision) != (new.tier, new.dtype, new.precision)
        or prev.placement == new.placement
    ):
        return new
    w, h = pass_size(shape, new.tile)
    out_w, out_h = out_size(shape.width, shape.height, shape.upscale)
    ps = PassShape(w, h, shape.controls, new.vae_tiling, new.vae_tile_px, out_w * out_h)
    peak = predict_peak_bytes(sizes, prev.placement, ps)
    if peak > new.budget_gb * GiB:
        return new
    step = predict_step_s(sizes, prev.placement, ps, device) * n_tiles(shape.width, shape.height, new.tile)
    if step > 1.15 * new.predicted_step_s:
        return new
    kept = replace(
        new,
        placement=prev.placement,
        predicted_peak_gb=round(peak / GiB, 2),
        phase_peaks_gb=_phase_peaks(sizes, prev.placement, ps),
        predicted_step_s=round(step, 3),
        host_ram_gb=prev.host_ram_gb,
        predicted_job_s=job_seconds(shape, round(step, 3), new.upscale_tile, new.overlap),
    )
    # `new`'s compile seconds: the kept placement compiles too if it is all-resident
    return with_first_job(kept, shape, sizes, device, dict(new.first_job_parts).get("compile", 0.0))


def step_down(
    plan: Plan, shape: JobShape, sizes: ModelSizes, device: DeviceInfo, precision: str = "auto"
) -> Plan | None:
    """The next smaller plan after an out-of-memory: a smaller tier, then a smaller tile."""
    if plan.device != "cpu":
        smaller = [t for t in GPU_TIERS if budget_for(t, device) < plan.budget_gb - 1e-6]
        if smaller:
            with contextlib.suppress(ValueError):
                return plan_for(smaller[0], shape, sizes, device, dtype=plan.dtype, precision=precision)
    for t in (768, 512, 384):  # then smaller generation tiles (on the CPU too: RAM-bound activations)
        if plan.tile and t >= plan.tile:
            continue
        if plan.device == "cpu":
            return replace(
                plan,
                tile=t,
                overlap=tile_overlap(t),
                upscale_tile=min(plan.upscale_tile or t, t) if shape.upscale > 1 else 0,
            )
        with contextlib.suppress(ValueError):  # 'auto' keeps its own budget rather than stepping up
            return plan_for(plan.tier, shape, sizes, device, tile=t, dtype=plan.dtype, precision=precision)
    return None
