"""Tiers and plans: how a job runs within a GPU-memory budget, as fast as the budget allows.

`plan_for(tier, shape, sizes, device)` is a pure function. It picks the compute dtype, the placement
of every denoiser unit (see core.residency), where the text encoders run, VAE tiling and the
generation tile, and predicts the peak GPU memory and the time per denoising step. The memory
model's constants (activation bytes per token, VAE bytes per pixel) were measured on an H100 with
the full-size architecture (bench/RESULTS.md); the time model (core.timing) ranks candidate
placements and is what the user is shown (within 8 % of the H100 runs).
"""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass, field, replace

from core.device import DeviceInfo, GiB
from core.job import GPU_TIERS, out_size
from core.plan.timing import simulate_step
from core.plan.units import UnitSize, buffer_bytes, ring_bytes

SLOTS = 2  # work slots for fp8 units: one in use, one cast ahead
MODEL_EFF = 0.92  # FLUX's step reaches this share of the square-matmul rate (H100: 0.240 s/step
# resident measured, 0.219-0.240 s predicted from 666-729 TFLOP/s)
FP8_MARGIN = 1.05  # fp8 placements must be predicted this much faster than exact bf16 ones
RING = 8  # copy-ring size in units of the largest streamed unit: on the H100 the 8 GB
# plan ran 0.300 / 0.282 / 0.283 s/step with rings of 4 / 8 / 16
CONTEXT_GB = 0.5  # left for the CUDA context: a tier N has N - 0.5 GiB


@dataclass(frozen=True)
class Calibration:
    """Memory-model constants (bytes), measured on the GPU machine; see bench/."""

    act_per_token: float = 36.0 * 3072 * 2  # denoiser transients per (image + text) token
    res_per_img_token: float = 30.0 * 3072 * 2  # ControlNet residuals kept for the transformer
    vae_dec_per_px: float = 2600.0  # untiled VAE decode, bytes per output pixel
    vae_enc_per_px: float = 1300.0  # untiled VAE encode (control image, img2img)
    vae_tile_px: int = 512  # tile side when VAE tiling is on
    frag: float = 1.02  # reserved / allocated (expandable segments)
    margin_gb: float = 0.2


CAL = Calibration()


@dataclass(frozen=True)
class ModelSizes:
    units: tuple[UnitSize, ...]  # denoiser units in execution order (ControlNet first)
    n_cn_units: int  # the first n units belong to the ControlNet (they run once per control)
    fixed_params: int  # non-unit denoiser params (embedders, norms, zero-convs): always resident
    t5_params: int
    t5_unit_params: int  # T5 Linear layers: resident ("gpu") or streamed with the denoiser's slots
    t5_max_unit: int
    clip_params: int  # CLIP (and T5's embedding and norms) stay on the GPU
    vae_params: int
    hidden: int = 3072
    max_seq: int = 512


@dataclass(frozen=True)
class JobShape:
    width: int
    height: int
    controls: int = 1
    upscale: float = 1.0


@dataclass(frozen=True)
class Plan:
    tier: str  # "48" ... "4", "auto", "cpu"
    device: str  # "cuda" | "cpu"
    budget_gb: float  # GiB the whole job may reserve on the GPU
    dtype: str  # compute dtype
    placement: str  # one code per denoiser unit: B F S Q (core.residency)
    slots: int  # work slots for units cast from fp8 (F, Q)
    text_encoders: str  # "gpu" resident | "stream" (T5 layers through the copy ring) | "cpu"
    vae_tiling: bool
    tile: int  # generation tile side in px (0: the whole image in one pass)
    overlap: int  # tile overlap in px (generation and upscale)
    predicted_peak_gb: float
    predicted_step_s: float
    host_ram_gb: float  # pinned host RAM for streamed weights
    notes: tuple[str, ...] = field(default=())
    upscale_tile: int = 0  # tile side of the upscale stages (0: no upscaling)
    ring: int = 0  # copy ring for streamed units, in units of the largest one

    def summary(self) -> dict:
        d = asdict(self)
        d["notes"] = list(self.notes)
        d["placement"] = {c: self.placement.count(c) for c in "BFSQ"}
        return d


# -- arithmetic ------------------------------------------------------------------------------
def _esize(dtype: str) -> int:
    return {"bfloat16": 2, "float16": 2, "float32": 4}[dtype]


def unit_bytes(u: UnitSize, code: str, es: int) -> int:
    """GPU bytes of a unit in a placement (slots excluded)."""
    if code == "B":
        return u.numel * es
    if code == "F":
        return u.fp8_numel + (u.numel - u.fp8_numel) * es
    return 0


def host_bytes(u: UnitSize, code: str, es: int) -> int:
    if code == "S":
        return u.numel * es
    if code == "Q":
        return u.fp8_numel + (u.numel - u.fp8_numel) * es
    return 0


def host_ram_bytes(sizes: ModelSizes, placement: str, es: int, text_encoders: str) -> int:
    """Pinned host memory a placement streams from (denoiser units, and T5 when it streams)."""
    total = sum(host_bytes(u, c, es) for u, c in zip(sizes.units, placement))
    return total + (sizes.t5_unit_params * es if text_encoders == "stream" else 0)


def slot_bytes(sizes: ModelSizes, placement: str, slots: int, es: int, text_stream: bool = False, ring: int = 6) -> int:
    """GPU bytes of the work slots and the copy ring (core.units.buffer_bytes); streamed T5
    layers pass through the same ring."""
    units, codes = list(sizes.units), placement
    if text_stream:
        units, codes = units + [UnitSize("t5", sizes.t5_max_unit, 0)], placement + "S"
    return buffer_bytes(units, codes, es, slots, ring)


def tokens(width: int, height: int) -> int:
    return (width // 16) * (height // 16)


def phase_bytes(
    sizes: ModelSizes, w: int, h: int, controls: int, es: int, vae_tiling: bool, cal: Calibration = CAL
) -> dict[str, float]:
    """Transient GPU bytes of each phase on top of the resident weights, for a w×h pass."""
    n_img = tokens(w, h)
    n_tot = n_img + sizes.max_seq + 1
    scale = es / 2
    denoise = (cal.act_per_token * n_tot + cal.res_per_img_token * n_img * min(controls, 2)) * scale
    px = w * h
    tpx = min(px, cal.vae_tile_px**2) if vae_tiling else px
    encode_img = cal.vae_enc_per_px * tpx * scale
    decode = cal.vae_dec_per_px * tpx * scale + (6 * px * scale if vae_tiling else 0)
    text = 0.15 * GiB  # T5 activations for 512 tokens
    return dict(denoise=denoise + 0.1 * GiB, encode_image=encode_img, decode=decode, text=text)


def predict_peak_bytes(
    sizes: ModelSizes,
    placement: str,
    slots: int,
    dtype: str,
    text_encoders: str,
    vae_tiling: bool,
    w: int,
    h: int,
    controls: int,
    cal: Calibration = CAL,
    ring: int = 6,
) -> float:
    es = _esize(dtype)
    resident = sizes.fixed_params * es + sizes.vae_params * es
    resident += sum(unit_bytes(u, c, es) for u, c in zip(sizes.units, placement))
    resident += slot_bytes(sizes, placement, slots, es, text_encoders == "stream", ring)
    resident += (sizes.t5_params - sizes.t5_unit_params + sizes.clip_params) * es
    if text_encoders == "gpu":
        resident += sizes.t5_unit_params * es
    ph = phase_bytes(sizes, w, h, controls, es, vae_tiling, cal)
    return (resident + max(ph.values())) * cal.frag + cal.margin_gb * GiB


def compute_s(sizes: ModelSizes, dtype: str, w: int, h: int, controls: int, device: DeviceInfo) -> float:
    """Seconds of one denoising step's compute with every weight resident."""
    es = _esize(dtype)
    n_tot = tokens(w, h) + sizes.max_seq + 1
    k = [controls if i < sizes.n_cn_units else 1 for i in range(len(sizes.units))]
    params = sum(u.numel * ki for u, ki in zip(sizes.units, k))
    flops = 2 * params * n_tot
    n_blocks = len(sizes.units) / 4.5  # ~4.5 units per block; attention cost per block
    flops += 4 * n_tot**2 * sizes.hidden * n_blocks
    return flops / (device.tflops * 1e12 * MODEL_EFF * (1.0 if es == 2 else 0.25))


def predict_step_s(
    sizes: ModelSizes, placement: str, dtype: str, w: int, h: int, controls: int, device: DeviceInfo, ring: int = 6
) -> float:
    """Seconds per denoising step under a placement (core.timing simulates the copy, cast and compute
    streams). Ranks placements and is shown to the user."""
    es = _esize(dtype)
    order = [i for _ in range(controls) for i in range(sizes.n_cn_units)] + list(
        range(sizes.n_cn_units, len(sizes.units))
    )
    return simulate_step(
        list(sizes.units),
        placement,
        order,
        es,
        ring_bytes(list(sizes.units), placement, es, ring),
        compute_s(sizes, dtype, w, h, controls, device),
        tokens(w, h),
        sizes.max_seq + 1,
        sizes.hidden,
        device.h2d_gbps * GiB,
    )


# -- choosing a placement ---------------------------------------------------------------------
def spread(costs: list[int], budget: int) -> list[bool]:
    """Choose units to keep (True) within `budget` bytes so the rest are spread evenly through the
    order: each streamed copy then overlaps the compute of the kept units around it."""
    total = sum(costs)
    if total <= budget:
        return [True] * len(costs)
    if budget <= 0:
        return [False] * len(costs)
    frac = budget / total
    keep, kept, seen = [], 0, 0
    for c in costs:
        seen += c
        ok = kept + c <= frac * seen + c / 2 and kept + c <= budget
        keep.append(ok)
        kept += c if ok else 0
    return keep


def candidates(sizes: ModelSizes, es: int, avail: int) -> list[str]:
    """Placements that fill `avail` bytes of GPU memory in different ways: bf16-resident units first
    (no per-step cost), fp8-resident next (a cast per step), the rest streamed in bf16 (twice the
    bus bytes, no cast) or fp8. Each group is spread evenly through the execution order."""
    units = sizes.units
    bf = [u.numel * es for u in units]
    f8 = [unit_bytes(u, "F", es) for u in units]
    out = []
    for share in (1.0, 0.75, 0.5, 0.25, 0.0):
        keep = spread(bf, int(avail * share))
        left = avail - sum(b for b, k in zip(bf, keep) if k)
        rest = [i for i, k in enumerate(keep) if not k]
        fp = spread([f8[i] for i in rest], left)
        codes = ["B" if k else "" for k in keep]
        for tail in "SQ":
            c = codes[:]
            for i, f in zip(rest, fp):
                c[i] = "F" if f else tail
            out.append("".join(c))
        # no fp8-resident units: only bf16-resident and streamed ones
        out.append("".join("B" if k else "S" for k in keep))
    return list(dict.fromkeys(out))


def _choose(
    sizes: ModelSizes,
    dtype: str,
    budget: int,
    text_encoders: str,
    vae_tiling: bool,
    w: int,
    h: int,
    controls: int,
    device: DeviceInfo,
    slots: int,
    ring: int,
) -> tuple[str, float, float] | None:
    """Best placement for a budget: (placement, peak bytes, step s), or None if nothing fits."""
    es = _esize(dtype)
    best = None
    host_cap = max(device.host_ram_gb * 0.85, 8.0) * GiB
    n = len(sizes.units)
    # memory left for weights once the buffers of the largest streaming placement are paid for
    base = max(
        predict_peak_bytes(sizes, c * n, slots, dtype, text_encoders, vae_tiling, w, h, controls, ring=ring)
        for c in "QS"
    )
    avail = int((budget - base) / CAL.frag)
    if avail < 0:
        return None
    for p in candidates(sizes, es, avail):
        peak = predict_peak_bytes(sizes, p, slots, dtype, text_encoders, vae_tiling, w, h, controls, ring=ring)
        if peak > budget or host_ram_bytes(sizes, p, es, text_encoders) > host_cap:
            continue
        t = predict_step_s(sizes, p, dtype, w, h, controls, device, ring)
        if "F" in p or "Q" in p:
            t *= FP8_MARGIN  # prefer exact compute-dtype weights unless fp8 is clearly faster
        if best is None or t < best[2]:
            best = (p, peak, t)
    return best


def tile_overlap(tile: int) -> int:
    """Overlap (px) of generation tiles: an eighth of the tile, at least 64 px."""
    return max(64, tile // 8)


def _n_tiles(shape: JobShape, tile: int) -> int:
    """Tiles of the generation pass, split exactly as core.tiled will split it."""
    from core.denoise.tiled import token_tiles

    return len(token_tiles(shape.width, shape.height, tile, tile_overlap(tile))[2])


def budget_for(tier: str, device: DeviceInfo) -> float:
    """GiB a tier may use."""
    if tier == "auto":
        return max(device.free_gb - CONTEXT_GB, 0.0)
    return float(tier) - CONTEXT_GB


def pass_size(shape: JobShape, tile: int) -> tuple[int, int]:
    """The largest denoiser pass of a job: the generation tile (or image), or the ≤ 1024² px tiles
    the upscale stages refine, whichever is larger."""
    gw, gh = (shape.width, shape.height) if tile == 0 else (min(tile, shape.width), min(tile, shape.height))
    if shape.upscale <= 1:
        return gw, gh
    out_w, out_h = out_size(shape.width, shape.height, shape.upscale)
    return max(gw, min(gw if tile else 1024, out_w)), max(gh, min(gh if tile else 1024, out_h))


def plan_for(
    tier: str, shape: JobShape, sizes: ModelSizes, device: DeviceInfo, tile: int | None = None, dtype: str | None = None
) -> Plan:
    """The fastest plan that keeps the whole job (encode, denoise, decode, upscale) under the tier's
    budget. `tile` forces a generation tile (used when stepping down), `dtype` the compute dtype
    (float32 after a NaN/black result)."""
    tier = str(tier).lower()
    if tier == "auto" and device.kind == "cpu":
        tier = "cpu"
    if tier == "cpu":
        dtype = dtype or ("float32" if sum(u.numel for u in sizes.units) < 1e9 else "bfloat16")
        return Plan(
            "cpu",
            "cpu",
            0.0,
            dtype,
            "B" * len(sizes.units),
            0,
            "cpu",
            False,
            0,
            128,
            0.0,
            0.0,
            0.0,
            ("everything runs on the CPU: expect minutes per image with the full-size model",),
            upscale_tile=1024 if shape.upscale > 1 else 0,
        )
    if tier != "auto" and tier not in GPU_TIERS:
        raise ValueError(f"tier must be one of auto, cpu, {', '.join(GPU_TIERS)}, got {tier!r}.")
    dtype = dtype or ("bfloat16" if device.bf16 else "float32")
    budget = budget_for(tier, device) * GiB
    notes = [] if dtype != "float32" else ["computing in float32 (no bf16 on this GPU, or a NaN result in bf16)"]
    out_w, out_h = out_size(shape.width, shape.height, shape.upscale)
    big = shape.width * shape.height
    # generation tile: the whole image if it fits, else the largest square tile that does
    tiles = [tile] if tile else [0, 1024, 768, 512, 384]
    for t in tiles:
        if t == 0 and big > 1024 * 1024 and shape.upscale > 1:
            continue  # upscale stages run in tiles of at most 1024 anyway
        pw, ph = pass_size(shape, t)
        vae_needed = out_w * out_h > pw * ph  # decoding the upscaled image needs tiles
        cands = []
        for text_enc in ("gpu", "stream") if tier in ("48", "auto") else ("stream",):
            for vae_tiling in (True,) if vae_needed else (False, True):
                got = _choose(sizes, dtype, budget, text_enc, vae_tiling, pw, ph, shape.controls, device, SLOTS, RING)
                if got:  # tiled decoding costs ~0.1 s per image: count it as a small step penalty
                    cands.append((got[2] * (1.01 if vae_tiling else 1.0), text_enc, vae_tiling, got))
            if cands and text_enc == "gpu":
                break  # resident text encoders fit: no need to stream them
        if cands:
            _, text_enc, vae_tiling, (p, peak, _) = min(cands, key=lambda c: c[0])
            streams = any(c in "SQ" for c in p) or text_enc == "stream"
            slots = SLOTS if any(c in "FQ" for c in p) else 0
            step = predict_step_s(sizes, p, dtype, pw, ph, shape.controls, device, RING) * _n_tiles(shape, t)
            if t:
                notes.append(f"generation runs in {t}px tiles fused at every step")
            hostb = host_ram_bytes(sizes, p, _esize(dtype), text_enc)
            return Plan(
                tier,
                "cuda",
                round(budget / GiB, 2),
                dtype,
                p,
                slots,
                text_enc,
                vae_tiling,
                t,
                tile_overlap(t) if t else 128,
                round(peak / GiB, 2),
                round(step, 3),
                round(hostb / GiB, 1),
                tuple(notes),
                upscale_tile=(t or 1024) if shape.upscale > 1 else 0,
                ring=RING if streams else 0,
            )
    raise ValueError(
        f"The {tier} tier ({budget / GiB:.1f} GiB) cannot hold this job even with every weight "
        f"streamed and the smallest tile (or the streamed weights need more than the "
        f"{device.host_ram_gb:.0f} GiB of host RAM); choose a larger tier or the CPU."
    )


def keep_placement(prev: Plan | None, new: Plan, shape: JobShape, sizes: ModelSizes, device: DeviceInfo) -> Plan:
    """`new`, but with the placement already on the GPU (`prev`) when that one also holds this job
    and is at most 15 % slower per step: moving the weights again costs 10-25 s (full size), a few
    percent of the step time costs less. A different tier, dtype or device always takes `new`."""
    if (
        prev is None
        or prev.device != "cuda"
        or (prev.tier, prev.dtype) != (new.tier, new.dtype)
        or (prev.placement, prev.text_encoders, prev.ring) == (new.placement, new.text_encoders, new.ring)
    ):
        return new
    w, h = pass_size(shape, new.tile)
    peak = predict_peak_bytes(
        sizes,
        prev.placement,
        prev.slots,
        prev.dtype,
        prev.text_encoders,
        new.vae_tiling,
        w,
        h,
        shape.controls,
        ring=prev.ring,
    )
    if peak > new.budget_gb * GiB:
        return new
    n_tiles = _n_tiles(shape, new.tile)
    step = predict_step_s(sizes, prev.placement, prev.dtype, w, h, shape.controls, device, prev.ring)
    if step * n_tiles > 1.15 * new.predicted_step_s:
        return new
    return replace(
        new,
        placement=prev.placement,
        slots=prev.slots,
        ring=prev.ring,
        text_encoders=prev.text_encoders,
        predicted_peak_gb=round(peak / GiB, 2),
        predicted_step_s=round(step * n_tiles, 3),
        host_ram_gb=prev.host_ram_gb,
    )


def step_down(plan: Plan, shape: JobShape, sizes: ModelSizes, device: DeviceInfo) -> Plan | None:
    """The next smaller plan after an out-of-memory: a smaller tier, then a smaller tile."""
    if plan.device != "cpu":
        smaller = [t for t in GPU_TIERS if float(t) - CONTEXT_GB < plan.budget_gb - 1e-6]
        if smaller:
            with contextlib.suppress(ValueError):
                return plan_for(smaller[0], shape, sizes, device, dtype=plan.dtype)
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
            return plan_for(plan.tier, shape, sizes, device, tile=t, dtype=plan.dtype)
    return None
