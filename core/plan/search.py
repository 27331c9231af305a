"""Choosing a placement for a budget: candidates that fill the GPU in different ways, ranked by
the time model, filtered by the memory model and the host RAM they pin."""

from __future__ import annotations

from core.device import DeviceInfo, GiB
from core.plan.memory import CAL, PassShape, esize, host_ram_bytes, predict_peak_bytes
from core.plan.placement import RESIDENT, RESIDENT_FP8, STREAMED, STREAMED_FP8, Placement
from core.plan.sizes import ModelSizes
from core.plan.timing import predict_step_s
from core.plan.units import gpu_bytes

SLOTS = 2  # work slots for fp8 units: one in use, one cast ahead
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


def candidates(sizes: ModelSizes, es: int, avail: int) -> list[str]:
    """Placement codes that fill `avail` bytes of GPU memory in different ways: resident units in
    the compute dtype first (no per-step cost), fp8-resident next (a cast per step), the rest
    streamed in the compute dtype (twice the bus bytes, no cast) or fp8. Each group is spread evenly
    through the execution order."""
    units = sizes.units
    bf = [gpu_bytes(u, RESIDENT, es) for u in units]
    f8 = [gpu_bytes(u, RESIDENT_FP8, es) for u in units]
    out = []
    for share in (1.0, 0.75, 0.5, 0.25, 0.0):
        keep = spread(bf, int(avail * share))
        left = avail - sum(b for b, k in zip(bf, keep) if k)
        rest = [i for i, k in enumerate(keep) if not k]
        fp = spread([f8[i] for i in rest], left)
        codes = [RESIDENT.code if k else "" for k in keep]
        for tail in (STREAMED, STREAMED_FP8):
            c = codes[:]
            for i, f in zip(rest, fp):
                c[i] = RESIDENT_FP8.code if f else tail.code
            out.append("".join(c))
        # no fp8-resident units: only resident and streamed ones
        out.append("".join(RESIDENT.code if k else STREAMED.code for k in keep))
    return list(dict.fromkeys(out))


def placement_of(codes: str, dtype: str, text_encoders: str) -> Placement:
    """A placement with the buffers its codes need: work slots if anything is fp8, a ring if
    anything streams."""
    p = Placement(codes, dtype, text_encoders)
    return Placement(codes, dtype, text_encoders, SLOTS if p.any_fp8 else 0, RING if p.streams else 0)


def choose(
    sizes: ModelSizes, dtype: str, text_encoders: str, ps: PassShape, budget: int, device: DeviceInfo, host_cap: int
) -> tuple[Placement, float, float] | None:
    """Best placement for a budget: (placement, peak bytes, step s), or None if nothing fits."""
    n = len(sizes.units)
    # memory left for weights once the buffers of the largest streaming placement are paid for
    base = max(
        predict_peak_bytes(sizes, placement_of(s.code * n, dtype, text_encoders), ps) for s in (STREAMED_FP8, STREAMED)
    )
    avail = int((budget - base) / CAL.frag)
    if avail < 0:
        return None
    best = None
    for codes in candidates(sizes, esize(dtype), avail):
        p = placement_of(codes, dtype, text_encoders)
        peak = predict_peak_bytes(sizes, p, ps)
        if peak > budget or host_ram_bytes(sizes, p) > host_cap:
            continue
        t = predict_step_s(sizes, p, ps, device)
        if p.any_fp8:
            t *= FP8_MARGIN  # prefer exact compute-dtype weights unless fp8 is clearly faster
        if best is None or t < best[2]:
            best = (p, peak, t)
    return best


def host_cap_bytes(device: DeviceInfo) -> int:
    """Pinned host RAM a plan may use."""
    return int(max(device.host_ram_gb * 0.85, 8.0) * GiB)
