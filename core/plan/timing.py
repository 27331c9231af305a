"""How long a denoising step takes under a placement: a small event simulation of the three streams.

core.stream.residency runs copies (host → GPU ring), casts (fp8 or 4-bit → compute dtype) and compute on separate
CUDA streams. Whether a copy hides under compute depends on *where* the streamed units sit: a
modulation layer holds 57 M parameters and does almost no work, an attention unit at 4k tokens
does a lot. So the time of a step is not max(compute, bus) but what this simulation finds when it
walks the units in execution order with a copy ring of finite size.
"""

from __future__ import annotations

from collections import deque

from core.device import DeviceInfo, GiB
from core.plan.memory import PassShape, esize, tokens
from core.plan.placement import Placement, store
from core.plan.sizes import ModelSizes
from core.plan.units import UnitSize, ring_bytes, stored_bytes

# share of the measured host→device bandwidth the copy stream reaches under compute, by storage
# format: fitted on the H200, where streams of 4-bit packs reached 0.65 (the 4 GB tier's 512 px
# tiles, 2.17 s per step, are bus-bound; the 6 and 8 GB 4-bit plans hide it under compute)
BUS_EFF = {"exact": 0.9, "fp8": 0.9, "q4": 0.65}
CAST_BPS = 1.5e12  # bytes/s a cast moves: fp8 → bf16 reads 1 and writes 2 bytes per parameter
CAST_BYTES = {"exact": 0, "fp8": 3, "q4": 2.6}  # bytes moved per parameter: 4-bit dequantization
# (core.stream.q4's Triton kernel) reads 0.56 and writes 2
CAST_SHARE = 0.5  # share of a side-stream cast that still slows the compute stream
MODEL_EFF = 0.92  # FLUX's step reaches this share of the square-matmul rate (H100: 0.240 s/step
# resident measured, 0.219-0.240 s predicted from 666-729 TFLOP/s)
HOOK_S = 40e-6  # CPU time of the hooks per managed unit (hidden unless the GPU waits)


def unit_flops(u: UnitSize, n_img: int, n_txt: int, hidden: int) -> float:
    """FLOPs of one unit for one pass, from its name and size (FLUX block children)."""
    leaf = u.name.rsplit(".", 1)[-1]
    n_tot = n_img + n_txt
    double = ".transformer_blocks." in u.name
    if leaf.startswith("norm"):  # modulation: a Linear on the timestep embedding
        return 2.0 * u.numel
    if leaf == "ff_context":
        return 2.0 * u.numel * n_txt
    if leaf == "ff":
        return 2.0 * u.numel * n_img
    if leaf == "attn":  # projections + softmax(QK)V over every token
        proj = 2.0 * u.numel * ((n_img + n_txt) / 2 if double else n_tot)
        return proj + 4.0 * n_tot**2 * hidden
    return 2.0 * u.numel * n_tot


def simulate_step(
    units: list[UnitSize],
    codes: str,
    order: list[int],
    es: int,
    ring_bytes: int,
    compute_s: float,
    n_img: int,
    n_txt: int,
    hidden: int,
    h2d_bps: float,
) -> float:
    """Seconds of one step in steady state. `order`: unit indices as they run in a step (ControlNet
    units once per control); `compute_s`: the step's compute time with everything resident, spread
    over the units by their FLOPs."""
    stores = [store(c) for c in codes]
    flops = [unit_flops(units[i], n_img, n_txt, hidden) for i in order]
    scale = compute_s / max(sum(flops), 1.0)
    moved = [stored_bytes(units[i], stores[i], es) if stores[i].streamed else 0 for i in order]
    copy_s = [m / (h2d_bps * BUS_EFF[stores[i].fmt]) for m, i in zip(moved, order)]
    comp_free = copy_free = 0.0
    held: deque[tuple[int, float]] = deque()  # ring bytes in order of copy, with their release time
    held_bytes = 0
    step_start = 0.0
    for rep in range(2):  # the second pass is the steady state
        if rep == 1:
            step_start = comp_free
        for k, i in enumerate(order):
            s = stores[i]
            ready = 0.0
            if s.streamed:
                start = copy_free
                while held and held_bytes + moved[k] > ring_bytes:
                    b, t = held.popleft()
                    held_bytes -= b
                    start = max(start, t)
                copy_free = ready = start + copy_s[k]
            cast = units[i].numel * CAST_BYTES[s.fmt] / CAST_BPS
            begin = max(comp_free, ready)
            comp_free = begin + flops[k] * scale + CAST_SHARE * cast + (HOOK_S if s.managed else 0.0)
            if s.streamed:  # a compressed pack leaves the ring once cast, a plain one once computed
                held.append((moved[k], begin if s.cast else comp_free))
                held_bytes += moved[k]
    return comp_free - step_start


def compute_s(sizes: ModelSizes, dtype: str, ps: PassShape, device: DeviceInfo) -> float:
    """Seconds of one denoising step's compute with every weight resident."""
    es = esize(dtype)
    n_tot = tokens(ps.width, ps.height) + sizes.max_seq + 1
    k = [ps.controls if i < sizes.n_cn_units else 1 for i in range(len(sizes.units))]
    params = sum(u.numel * ki for u, ki in zip(sizes.units, k))
    flops = 2 * params * n_tot
    n_blocks = len(sizes.units) / 4.5  # ~4.5 units per block; attention cost per block
    flops += 4 * n_tot**2 * sizes.hidden * n_blocks
    return flops / (device.tflops * 1e12 * MODEL_EFF * (1.0 if es == 2 else 0.25))


def predict_step_s(sizes: ModelSizes, p: Placement, ps: PassShape, device: DeviceInfo) -> float:
    """Seconds per denoising step of one pass under a placement (the copy, cast and compute streams
    simulated). Ranks placements and is shown to the user."""
    es = esize(p.dtype)
    n_cn = sizes.n_cn_units
    order = [i for _ in range(ps.controls) for i in range(n_cn)] + list(range(n_cn, len(sizes.units)))
    units = list(sizes.units)
    return simulate_step(
        units,
        p.units,
        order,
        es,
        ring_bytes(units, p.units, es, p.ring),
        compute_s(sizes, p.dtype, ps, device),
        tokens(ps.width, ps.height),
        sizes.max_seq + 1,
        sizes.hidden,
        device.h2d_gbps * GiB,
    )
