"""Choosing a placement for a budget: candidates that fill the GPU in different ways, ranked by
the time model, filtered by the memory model and the host RAM they pin."""

from __future__ import annotations

from core.device import DeviceInfo, GiB
from core.plan.memory import CAL, PassShape, esize, host_ram_bytes, margin_bytes, predict_peak_bytes, resident_bytes
from core.plan.placement import (
    RESIDENT,
    RESIDENT_FP8,
    RESIDENT_Q4,
    STREAMED,
    STREAMED_FP8,
    STREAMED_Q4,
    T5_CODES,
    Placement,
    Store,
    allowed_codes,
    store,
)
from core.plan.sizes import ModelSizes
from core.plan.timing import predict_step_s
from core.plan.units import gpu_bytes

SLOTS = 2  # work slots for cast units: one in use, one cast ahead
RING = 8  # copy-ring size in units of the largest streamed unit: on the H100 the 8 GB
# plan ran 0.300 / 0.282 / 0.283 s/step with rings of 4 / 8 / 16
FP8_MARGIN = 1.05  # fp8 placements must be predicted this much faster than exact bf16 ones


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


def candidates(sizes: ModelSizes, es: int, avail: int, allowed: str, tail: Store) -> list[str]:
    """Placement codes that fill `avail` bytes of GPU memory in different ways: resident units in
    the compute dtype first (no per-step cost), compressed-resident next (fp8 or 4-bit, as `allowed`:
    a cast per step), the rest streamed as `tail`. Each group is spread evenly through the order."""
    units = sizes.units
    bf = [gpu_bytes(u, RESIDENT, es) for u in units]
    out = []
    for share in (1.0, 0.75, 0.5, 0.25, 0.0):
        keep = spread(bf, int(avail * share))
        left = avail - sum(b for b, k in zip(bf, keep) if k)
        rest = [i for i, k in enumerate(keep) if not k]
        codes = [RESIDENT.code if k else "" for k in keep]
        for mid in (s for s in (RESIDENT_FP8, RESIDENT_Q4) if s.code in allowed):
            fp = spread([gpu_bytes(units[i], mid, es) for i in rest], left)
            c = codes[:]
            for i, f in zip(rest, fp):
                c[i] = mid.code if f else tail.code
            out.append("".join(c))
        out.append("".join(RESIDENT.code if k else tail.code for k in keep))  # no compressed-resident units
    return list(dict.fromkeys(out))


def file_fp8(codes: str, sizes: ModelSizes) -> str:
    """Units whose weights are a file's own fp8 stream as fp8 (Q), never in the compute dtype (S): the
    same values in half the pinned host RAM and half the bus bytes."""
    return "".join(STREAMED_FP8.code if c == STREAMED.code and u.fp8_file else c for c, u in zip(codes, sizes.units))


def rounds(p: Placement, sizes: ModelSizes) -> bool:
    """Some weights are rounded where this placement stores them: a compressed unit whose weights are
    not already the file's fp8 values, or T5 streamed compressed."""
    units = any(s.cast and not (s.fp8 and u.fp8_file) for s, u in zip(p.stores, sizes.units))
    return units or (p.text_encoders == "stream" and store(p.t5).cast)


def placement_of(codes: str, dtype: str, text_encoders: str, t5: str = STREAMED.code) -> Placement:
    """A placement with the buffers its codes need: work slots if anything is cast, a ring if
    anything streams."""
    p = Placement(codes, dtype, text_encoders, t5=t5)
    return Placement(codes, dtype, text_encoders, SLOTS if p.any_cast else 0, RING if p.streams else 0, t5)


def choose(
    sizes: ModelSizes,
    dtype: str,
    text_encoders: str,
    ps: PassShape,
    budget: int,
    device: DeviceInfo,
    host_cap: int,
    precision: str = "exact",
) -> tuple[Placement, float, float] | None:
    """Best placement for a budget: (placement, peak bytes, step s), or None if nothing fits.
    Streamed T5 layers take the most exact storage whose pinned RAM fits beside the best denoiser
    placement (T5 runs once per prompt: its format costs no step time)."""
    allowed = allowed_codes(precision)
    t5s = [c for c in T5_CODES if c in allowed] if text_encoders == "stream" else [STREAMED.code]
    for t5 in t5s:
        got = _choose(sizes, dtype, text_encoders, t5, ps, budget, device, host_cap, allowed)
        if got:
            return got
    return None


def _choose(sizes, dtype, text_encoders, t5, ps, budget, device, host_cap, allowed):
    n, es = len(sizes.units), esize(dtype)
    best = None
    for tail in (s for s in (STREAMED, STREAMED_FP8, STREAMED_Q4) if s.code in allowed):
        # memory left for weights once the buffers of streaming every unit as `tail` are paid for
        streamed = placement_of(file_fp8(tail.code * n, sizes), dtype, text_encoders, t5)
        base = predict_peak_bytes(sizes, streamed, ps)
        # the margin grows with the resident bytes: room for its largest value, or the placements
        # that fill `avail` would all come out over the budget
        base += CAL.margin_gb * GiB - margin_bytes(resident_bytes(sizes, streamed))
        avail = int(budget - base)
        if avail < 0:
            continue
        for codes in dict.fromkeys(file_fp8(c, sizes) for c in candidates(sizes, es, avail, allowed, tail)):
            p = placement_of(codes, dtype, text_encoders, t5)
            peak = predict_peak_bytes(sizes, p, ps)
            if peak > budget or host_ram_bytes(sizes, p) > host_cap:
                continue
            t = predict_step_s(sizes, p, ps, device)
            if rounds(p, sizes):
                t *= FP8_MARGIN  # prefer exact weights unless rounded ones are clearly faster
            if best is None or t < best[2]:
                best = (p, peak, t)
    return best


HOST_HEADROOM_GB = 3.0  # host RAM left to the OS, Python, torch and the app (measured: ~2.5 GiB
# anonymous memory of a CLI process besides its pinned weights)


def host_cap_bytes(device: DeviceInfo) -> int:
    """Pinned host RAM a plan may use: the process's RAM limit (physical RAM or the cgroup's, read
    once: never momentary free memory) less a headroom of 3 GiB and 10 %."""
    return int(max(device.host_ram_gb * 0.9 - HOST_HEADROOM_GB, 0.0) * GiB)
