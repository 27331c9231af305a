"""Plans on the full-size architecture (built on the meta device): budgets, placements, step-down,
and the memory estimator's arithmetic on hand-built sizes."""

import json
import math
from dataclasses import replace

import pytest

from core.device import DeviceInfo, GiB
from core.plan.memory import CAL, PassShape, phase_bytes, phase_peak_bytes, predict_peak_bytes, slot_bytes, tokens
from core.plan.placement import Placement, store
from core.plan.planner import (
    CONTEXT_GB,
    GPU_TIERS,
    JobShape,
    budget_for,
    keep_placement,
    pass_size,
    plan_for,
    step_down,
)
from core.plan.search import spread
from core.plan.sizes import ModelSizes
from core.plan.timing import predict_step_s
from core.plan.units import UnitSize, gpu_bytes
from core.plan.units import align as _align
from core.plan.units import host_bytes as _host_bytes


def unit_bytes(u, code, es):
    return gpu_bytes(u, store(code), es)


def host_bytes(u, code, es):
    return _host_bytes(u, store(code), es)


def P(codes, slots=0, dtype="bfloat16", text_encoders="stream", ring=6):
    return Placement(codes, dtype, text_encoders, slots, ring)


NOMINAL = DeviceInfo("cuda", "test", 80, 80, True, 128.0, 25.0, 150.0)
NO_BF16 = DeviceInfo("cuda", "old", 24, 24, False, 128.0, 12.0, 30.0)
CPU = DeviceInfo("cpu", "CPU", 0.0, 0.0, True, 32.0)
SHAPE = JobShape(1024, 1024, 1)


@pytest.fixture(scope="module")
def full():
    from core.plan.sizes import sizes_from_config

    return sizes_from_config("full")


def resident_bytes(sizes, plan):
    es = 4 if plan.dtype == "float32" else 2
    b = sum(unit_bytes(u, c, es) for u, c in zip(sizes.units, plan.placement.units))
    return b + (sizes.t5_unit_params * es if plan.text_encoders == "gpu" else 0)


def test_full_size_architecture_has_the_known_parameter_counts(full):
    # FLUX.1-dev transformer ~11.9 B + Union-Pro ControlNet (5 + 10 blocks) ~3.3 B; T5-XXL encoder ~4.7 B
    denoiser = sum(u.numel for u in full.units) + full.fixed_params
    assert 14.8e9 < denoiser < 15.6e9, denoiser
    cn = sum(u.numel for u in full.units[: full.n_cn_units])
    assert 2.8e9 < cn < 3.6e9, cn
    assert 4.6e9 < full.t5_params < 5.0e9
    assert full.t5_unit_params < full.t5_params
    assert 0 < full.n_cn_units < len(full.units)
    assert full.hidden == 3072 and full.max_seq == 512
    assert all(0 < u.fp8_numel <= u.numel <= 80e6 for u in full.units)
    assert full.units[0].name.startswith("controlnet.") and full.units[-1].name.startswith("transformer.")


@pytest.mark.parametrize("tier", GPU_TIERS)
def test_every_tier_plans_within_its_budget(full, tier):
    p = plan_for(tier, SHAPE, full, NOMINAL)
    assert p.device == "cuda" and p.tier == tier
    assert p.budget_gb == pytest.approx(float(tier) - CONTEXT_GB)
    assert 0 < p.predicted_peak_gb <= p.budget_gb
    assert len(p.placement.units) == len(full.units)
    assert set(p.placement.units) <= set("BFSQ" if p.precision == "exact" else "BFSQRN")
    if tier == "4":  # exact weights fit only in 768 px tiles: 4-bit runs the job whole, and says so
        assert p.precision == "exact" or (p.tile == 0 and any("exact weights do not fit" in n for n in p.notes))
    else:
        assert p.precision == "exact", "auto: 4-bit only where exact weights do not fit (they do, at 1024², here)"
    assert p.dtype == "bfloat16" and p.predicted_step_s > 0
    # the reported peak is the estimator's value for this very plan (whole-image plans)
    if p.tile == 0:
        again = (
            predict_peak_bytes(full, p.placement, PassShape(SHAPE.width, SHAPE.height, SHAPE.controls, p.vae_tiling))
            / GiB
        )
        assert again == pytest.approx(p.predicted_peak_gb, abs=0.006)
    s = p.summary()
    assert sum(s["placement"].values()) == len(full.units)
    # each phase's predicted peak is reported; the plan's peak is the largest of them
    assert set(s["phase_peaks_gb"]) == {"denoise", "encode_image", "decode", "text"}
    assert max(s["phase_peaks_gb"].values()) == pytest.approx(p.predicted_peak_gb, abs=0.006)
    json.dumps(s)


@pytest.mark.parametrize(
    "shape",
    [
        JobShape(512, 512, 1),
        JobShape(1024, 1024, 2),
        JobShape(1536, 1024, 4),
        JobShape(2048, 2048, 1),
        JobShape(1024, 1024, 1, 2.0),
        JobShape(768, 1024, 3, 4.0),
        JobShape(2048, 2048, 1, 4.0),
    ],
)
def test_every_tier_fits_every_job_shape(full, shape):
    for tier in GPU_TIERS:
        p = plan_for(tier, shape, full, NOMINAL)
        assert p.predicted_peak_gb <= p.budget_gb, (tier, p)
        if p.tile:
            assert p.tile <= 1024 and 0 < p.overlap < p.tile


def test_budgets_shrink_and_residency_grows_with_the_tier(full):
    plans = [plan_for(t, SHAPE, full, NOMINAL) for t in GPU_TIERS]  # largest first
    budgets = [p.budget_gb for p in plans]
    assert budgets == sorted(budgets, reverse=True) and len(set(budgets)) == len(budgets)
    # untiled plans: a tiled one streams every unit once per tile, so it may keep a few more resident
    kept = [resident_bytes(full, p) for p in plans if not p.tile]
    assert all(a >= b for a, b in zip(kept, kept[1:])), [k / GiB for k in kept]
    assert kept[0] > kept[-1] * 10


def test_48_tier_keeps_everything_resident(full):
    p = plan_for("48", SHAPE, full, NOMINAL)
    assert p.placement.units == "B" * len(full.units)
    assert p.dtype == "bfloat16" and p.text_encoders == "gpu"
    assert p.host_ram_gb == 0 and p.tile == 0
    # and it really is the whole denoiser plus text encoders plus VAE
    whole = (
        sum(u.numel for u in full.units) + full.fixed_params + full.t5_params + full.clip_params + full.vae_params
    ) * 2
    assert p.predicted_peak_gb * GiB > whole


def test_lower_tiers_stream(full):
    for tier in GPU_TIERS[1:]:
        p = plan_for(tier, SHAPE, full, NOMINAL)
        assert p.placement.units != "B" * len(full.units), tier
        assert p.text_encoders == "stream", tier
        assert p.host_ram_gb > 0, tier
    for tier in ("16", "12", "8", "6", "4"):
        p = plan_for(tier, SHAPE, full, NOMINAL)
        assert any(s.streamed for s in p.placement.stores), tier


def test_gpu_without_bf16_computes_in_float32_with_a_note(full):
    for tier in ("24", "8"):
        p = plan_for(tier, SHAPE, full, NO_BF16)
        assert p.dtype == "float32"
        assert any("float32" in n for n in p.notes), p.notes
        assert p.predicted_peak_gb <= p.budget_gb
    # float32 weights are twice the bytes: the same tier keeps fewer units resident
    assert (
        resident_bytes(full, plan_for("24", SHAPE, full, NO_BF16)) / 4
        <= resident_bytes(full, plan_for("24", SHAPE, full, NOMINAL)) / 2
    )
    assert not plan_for("24", SHAPE, full, NOMINAL).notes


def test_cpu_plans(full):
    for tier, dev in (("cpu", NOMINAL), ("auto", CPU), ("CPU", CPU)):
        p = plan_for(tier, SHAPE, full, dev)
        assert (p.tier, p.device, p.text_encoders) == ("cpu", "cpu", "cpu")
        assert p.placement.units == "B" * len(full.units) and p.budget_gb == 0 and p.placement.slots == 0
        assert p.dtype == "bfloat16"  # the full model in fp32 would need ~70 GB of RAM
        assert any("CPU" in n for n in p.notes)


def test_auto_tier_uses_the_free_memory(full):
    dev = DeviceInfo("cuda", "test", 24, 20.0, True, 128.0)
    assert budget_for("auto", dev) == pytest.approx(20.0 - CONTEXT_GB)
    p = plan_for("auto", SHAPE, full, dev)
    assert p.tier == "auto" and p.budget_gb == pytest.approx(19.5) and p.predicted_peak_gb <= 19.5
    assert budget_for("auto", DeviceInfo("cuda", "full", 8, 0.2, True, 16.0)) == 0.0


@pytest.mark.parametrize("tier", ["7", "2", "vram", "", "80"])
def test_unknown_tier_is_a_value_error(full, tier):
    with pytest.raises(ValueError, match="tier"):
        plan_for(tier, SHAPE, full, NOMINAL)


def test_a_budget_too_small_for_anything_is_a_clear_value_error(full):
    dev = DeviceInfo("cuda", "tiny", 2, 2.0, True, 128.0)
    with pytest.raises(ValueError) as info:
        plan_for("auto", SHAPE, full, dev)
    msg = str(info.value)
    assert "1.5 GiB" in msg and "larger tier" in msg and "\n" not in msg


def test_step_down_goes_tier_by_tier_then_to_smaller_tiles(full):
    plan, chain = plan_for("24", SHAPE, full, NOMINAL), []
    while plan is not None and len(chain) < 20:
        chain.append(plan)
        nxt = step_down(plan, SHAPE, full, NOMINAL)
        if nxt is not None:  # every step asks for less: a smaller budget or a smaller tile
            assert nxt.budget_gb <= plan.budget_gb
            assert nxt.budget_gb < plan.budget_gb or (0 < nxt.tile < plan.tile or (plan.tile == 0 < nxt.tile))
            assert nxt.predicted_peak_gb <= nxt.budget_gb
        plan = nxt
    assert plan is None, "step_down must end"
    tiers = [p.tier for p in chain]
    assert [t for i, t in enumerate(tiers) if i == 0 or t != tiers[i - 1]] == ["24", "16", "12", "8", "6", "4"]
    tiles = [p.tile for p in chain if p.tier == "4"]
    assert tiles[-1] == 384 and all(0 < b < a or a == 0 for a, b in zip(tiles, tiles[1:]))
    assert all(p.tile == 0 for p in chain if p.tier != "4")  # a 1024² job needs no tiles above 4 GB


def test_step_down_from_auto_starts_below_the_auto_budget(full):
    p = plan_for("auto", SHAPE, full, NOMINAL)
    nxt = step_down(p, SHAPE, full, NOMINAL)
    assert nxt.tier == "48" and nxt.budget_gb < p.budget_gb


def test_step_down_keeps_the_float32_dtype(full):
    p = plan_for("24", SHAPE, full, NO_BF16)
    nxt = step_down(p, SHAPE, full, NO_BF16)
    assert nxt.dtype == "float32" and nxt.budget_gb < p.budget_gb


def test_step_down_from_the_cpu_plan_ends(full):
    p, seen = plan_for("cpu", SHAPE, full, CPU), 0
    while p is not None:
        assert p.device == "cpu"
        nxt = step_down(p, SHAPE, full, CPU)
        if nxt is not None:
            assert 0 < nxt.tile < (p.tile or 10**9)
        p, seen = nxt, seen + 1
        assert seen < 10


def test_step_down_never_raises_the_budget_for_a_small_auto_budget(full):
    dev = DeviceInfo("cuda", "4 GB card", 4, 3.9, True, 64.0)  # auto budget 3.4 GiB
    shape = JobShape(512, 512, 1)
    p = plan_for("auto", shape, full, dev)
    nxt = step_down(p, shape, full, dev)
    assert nxt is None or nxt.budget_gb <= p.budget_gb, (p.budget_gb, nxt.budget_gb)


def test_plans_respect_the_host_ram_cap(full):
    dev = DeviceInfo("cuda", "test", 80, 80, True, 24.0)  # 24 GiB of host RAM: 18.6 GiB may be pinned
    for tier in ("16", "12", "8", "6"):
        p = plan_for(tier, SHAPE, full, dev, precision="exact")
        assert 0 < p.host_ram_gb <= 24.0 * 0.9 - 3 and p.precision == "exact", (tier, p.host_ram_gb)
    small = DeviceInfo("cuda", "test", 80, 80, True, 16.0)  # a 16 GB desktop or container: 11.4 GiB pinned
    assert plan_for("16", SHAPE, full, small).host_ram_gb <= 16.0 * 0.9 - 3
    with pytest.raises(ValueError, match="host RAM.*precision 4bit"):  # exact weights do not fit its RAM
        plan_for("8", SHAPE, full, small, precision="exact")
    p = plan_for("8", SHAPE, full, small)  # auto: 4-bit where exact does not fit
    assert p.precision == "4bit" and p.placement.any_q4 and p.host_ram_gb <= 11.4
    assert any("4-bit weights" in n for n in p.notes)
    tiny_ram = DeviceInfo("cuda", "test", 80, 80, True, 8.0)
    with pytest.raises(ValueError, match=r"4\.2 GiB of pinned host RAM this machine allows \(8 GiB RAM\)"):
        plan_for("8", SHAPE, full, tiny_ram)


@pytest.mark.parametrize("ram", [15.0, 16.0, 24.0, 32.0])
def test_every_tier_plans_within_a_cgroup_sized_machine(full, ram):
    """Under a memory limit (a container's cgroup or a desktop's RAM) tiers 6-16 plan with pinned host
    RAM under the cap, exact weights first: 4-bit only where exact ones do not fit."""
    dev = DeviceInfo("cuda", "test", 80, 80, True, ram, context_gb=0.6)
    for tier in ("16", "12", "8", "6"):
        for up in (1.0, 2.0):
            p = plan_for(tier, JobShape(1024, 1024, 1, up), full, dev)
            assert p.host_ram_gb <= ram * 0.9 - 3 + 0.05, (ram, tier, p.host_ram_gb)
            assert p.predicted_peak_gb <= p.budget_gb <= float(tier) - 0.5 - 0.6 + 1e-6
            try:
                exact = plan_for(tier, JobShape(1024, 1024, 1, up), full, dev, precision="exact")
            except ValueError:
                exact = None
            if exact is not None and exact.tile == p.tile:  # exact fits as well: auto must not go 4-bit
                assert p.precision == "exact", (ram, tier)
            else:  # exact does not fit, or only in tiles: a whole image in 4-bit beats them
                assert p.precision == "4bit" and p.tile == 0, (ram, tier)


def test_precision_4bit_streams_fewer_bytes_and_exact_never_uses_4_bit(full):
    for tier in ("12", "8", "6"):
        exact = plan_for(tier, SHAPE, full, NOMINAL, precision="exact")
        q4 = plan_for(tier, SHAPE, full, NOMINAL, precision="4bit")
        assert not exact.placement.any_q4 and set(exact.placement.units) <= set("BFSQ")
        assert q4.predicted_step_s <= exact.predicted_step_s, "4bit uses 4-bit where it is faster"
        if tier != "12":  # at 12 GB, bf16 streaming already hides under compute here: no 4-bit
            assert q4.placement.any_q4 and q4.host_ram_gb < exact.host_ram_gb, tier
            assert q4.summary()["formats"]["denoiser"].endswith("q4")
    with pytest.raises(ValueError, match="precision must be one of auto, exact, 4bit"):
        plan_for("8", SHAPE, full, NOMINAL, precision="int4")


def test_upscale_plans_use_1024_tiles_and_vae_tiling(full):
    for factor in (2.0, 4.0):
        shape = JobShape(1024, 1024, 1, factor)
        for tier in GPU_TIERS:
            p = plan_for(tier, shape, full, NOMINAL)
            assert p.vae_tiling, (factor, tier)
            assert p.upscale_tile == (p.tile or 1024) and 0 < p.upscale_tile <= 1024 and p.overlap > 0
            if tier != "4":  # a 1024² base pass fits whole; the stages run in 1024 px tiles
                assert p.tile == 0 and p.upscale_tile == 1024, (factor, tier, p.tile)
            assert p.predicted_peak_gb <= p.budget_gb


# -- spread ------------------------------------------------------------------------------------
def longest_run(keep, value=False):
    best = run = 0
    for k in keep:
        run = run + 1 if k == value else 0
        best = max(best, run)
    return best


@pytest.mark.parametrize("n,frac", [(100, 0.5), (312, 0.5), (50, 0.25), (60, 0.75), (7, 0.5)])
def test_spread_keeps_within_budget_and_spreads_the_streamed_units(n, frac):
    costs = [10] * n
    budget = int(sum(costs) * frac)
    keep = spread(costs, budget)
    kept = sum(c for c, k in zip(costs, keep) if k)
    assert kept <= budget
    assert kept >= budget - 10  # no budget wasted (equal costs)
    # streamed units are spread through the order, not bunched at the end
    assert longest_run(keep, False) <= math.ceil(1 / frac), keep
    if frac == 0.5:
        assert longest_run(keep, True) <= 2 and longest_run(keep, False) <= 2


def test_spread_with_uneven_costs_and_edges():
    costs = [75, 5, 40, 40, 5, 75, 10, 30, 60, 20] * 10
    for budget in (0, 1, 100, 1000, 2000, sum(costs) - 1):
        keep = spread(costs, budget)
        assert len(keep) == len(costs)
        assert sum(c for c, k in zip(costs, keep) if k) <= budget
    assert spread(costs, sum(costs)) == [True] * len(costs)
    assert spread(costs, -5) == [False] * len(costs)


# -- estimator arithmetic on a hand-built ModelSizes ---------------------------------------------
SMALL = ModelSizes(
    units=(
        UnitSize("cn.0.attn", 1000, 900),
        UnitSize("cn.0.ff", 3000, 2900),
        UnitSize("tr.0.attn", 1200, 1100),
        UnitSize("tr.0.ff", 4000, 3800),
        UnitSize("tr.1.ff", 4000, 3800),
    ),
    n_cn_units=2,
    fixed_params=500,
    t5_params=7000,
    t5_unit_params=6000,
    t5_max_unit=2500,
    clip_params=300,
    vae_params=800,
    hidden=64,
    max_seq=16,
)
NUMEL = sum(u.numel for u in SMALL.units)


def test_unit_and_slot_bytes_arithmetic():
    n = len(SMALL.units)
    assert (
        sum(unit_bytes(u, "B", 2) for u in SMALL.units) - sum(unit_bytes(u, "S", 2) for u in SMALL.units) == NUMEL * 2
    )
    assert sum(unit_bytes(u, "B", 4) for u in SMALL.units) == NUMEL * 4
    assert all(unit_bytes(u, c, 2) == 0 for u in SMALL.units for c in "SQ")
    u = SMALL.units[1]
    # an fp8 pack is [aligned fp8 part | bf16 rest], itself aligned: the same bytes on the GPU and the host
    assert unit_bytes(u, "F", 2) == _align(_align(2900) + 100 * 2) == host_bytes(u, "Q", 2)
    assert host_bytes(u, "S", 2) == _align(3000 * 2) and host_bytes(u, "B", 2) == host_bytes(u, "F", 2) == 0
    # buffers: work slots for fp8 units (F, Q), a copy ring for streamed ones (S, Q)
    assert slot_bytes(SMALL, P("B" * n, 3, "bfloat16", "gpu", 6)) == 0
    assert slot_bytes(SMALL, P("S" * n, 2, "bfloat16", "gpu", 4)) == 4 * _align(4000 * 2)  # ring only: S needs no cast
    assert slot_bytes(SMALL, P("F" * n, 2, "bfloat16", "gpu", 6)) == 2 * 4000 * 2  # slots only: F needs no copy
    assert slot_bytes(SMALL, P("F" * n, 9, "bfloat16", "gpu", 6)) == n * 4000 * 2  # never more slots than units
    assert slot_bytes(SMALL, P("SBBBB", 3, "bfloat16", "gpu", 3)) == 3 * _align(1000 * 2)
    assert slot_bytes(SMALL, P("BBBBB", 3, "bfloat16", "stream", 5)) == 5 * _align(2500 * 2)  # T5 too
    # Q: a slot to cast into and a ring of fp8 packs ([aligned fp8 part | bf16 rest])
    q_pack = _align(_align(2900) + 100 * 2)
    assert slot_bytes(SMALL, P("QQBBB", 2, "bfloat16", "gpu", 4)) == 2 * 3000 * 2 + 4 * q_pack
    assert slot_bytes(SMALL, P("QQBBB", 2, "bfloat16", "gpu", 1)) == slot_bytes(
        SMALL, P("QQBBB", 2, "bfloat16", "gpu", 2)
    )  # at least 2


def test_predicted_peak_difference_is_the_weight_bytes():
    n = len(SMALL.units)
    ps = PassShape(256, 256, 1, False)
    # weights only: the fast path's allowance is checked below, the margin fixed (not 3 % of the weights)
    cal = replace(CAL, fast_path_gb=0.0, margin_frac=1e9)
    b = predict_peak_bytes(SMALL, P("B" * n, 3), ps, cal)
    s = predict_peak_bytes(SMALL, P("S" * n, 3), ps, cal)
    slots = slot_bytes(SMALL, P("S" * n, 3, "bfloat16", "stream", 6)) - slot_bytes(
        SMALL, P("B" * n, 3, "bfloat16", "stream", 6)
    )
    assert b - s == pytest.approx(NUMEL * 2 - slots, abs=1e-3)  # weights count whole: no fragmentation
    # text encoders resident add exactly their streamed layers (and drop the ring they streamed through)
    g = predict_peak_bytes(SMALL, P("B" * n, 3, text_encoders="gpu"), ps, cal)
    ring = slot_bytes(SMALL, P("B" * n, 3, "bfloat16", "stream", 6))
    assert g - b == pytest.approx(6000 * 2 - ring, abs=1e-3)
    # an all-resident plan counts the fast path's workspaces in its denoising phase
    fast = replace(cal, fast_path_gb=CAL.fast_path_gb)
    with_fast = phase_peak_bytes(SMALL, P("B" * n, 3), ps, fast)["denoise"]
    assert with_fast - phase_peak_bytes(SMALL, P("B" * n, 3), ps, cal)["denoise"] == pytest.approx(
        CAL.fast_path_gb * GiB * CAL.frag, abs=1e-3
    )
    # float32 doubles every weight byte
    b32 = predict_peak_bytes(SMALL, P("B" * n, 3, dtype="float32"), ps, cal)
    assert b32 > b


def test_peak_grows_with_image_size(full):
    p = plan_for("12", SHAPE, full, NOMINAL)

    def peak(w, h, c, tiling=False):
        return predict_peak_bytes(full, p.placement, PassShape(w, h, c, tiling))

    sizes = [(256, 256), (512, 512), (768, 1024), (1024, 1024), (1536, 1536), (2048, 2048)]
    peaks = [peak(w, h, 1) for w, h in sizes]
    assert all(a < b for a, b in zip(peaks, peaks[1:]))
    # more controls of the Union net never lower the peak (measured: they add nothing, the residuals
    # are summed in place); a calibration that counts them raises it
    by_controls = [peak(1024, 1024, c, tiling=True) for c in (1, 2, 3, 4)]
    untiled = [peak(1024, 1024, c) for c in (1, 2, 3, 4)]
    assert all(a <= b for a, b in zip(untiled, untiled[1:]))
    assert all(a <= b for a, b in zip(by_controls, by_controls[1:]))
    counted = replace(CAL, act_per_extra_control=0.2 * CAL.act_per_img_token)
    two = [predict_peak_bytes(full, p.placement, PassShape(1024, 1024, c, True), counted) for c in (1, 2)]
    assert two[0] < two[1]
    # VAE tiling bounds the decode of a large image
    assert peak(2048, 2048, 1, tiling=True) < peak(2048, 2048, 1, tiling=False)


def test_phase_bytes_and_tokens():
    assert tokens(1024, 1024) == 4096 and tokens(1024, 768) == 64 * 48 and tokens(15, 1024) == 0
    small = phase_bytes(PassShape(512, 512, 1, False), 2)
    big = phase_bytes(PassShape(1024, 1024, 1, False), 2)
    assert set(small) == {"denoise", "encode_image", "decode", "text"}
    assert big["denoise"] > small["denoise"] and big["decode"] == pytest.approx(4 * small["decode"])
    tiled = phase_bytes(PassShape(2048, 2048, 1, True), 2)
    assert tiled["decode"] < phase_bytes(PassShape(2048, 2048, 1, False), 2)["decode"] / 4
    f32 = phase_bytes(PassShape(512, 512, 1, False), 4)
    assert f32["denoise"] > small["denoise"]
    # the VAE decodes the whole image, not the generation tile (the 4 GB tier's 384 px tiles)
    tile = phase_bytes(PassShape(384, 384, 1, True, out_px=1024 * 1024), 2)
    whole = phase_bytes(PassShape(1024, 1024, 1, True), 2)
    assert tile["decode"] == whole["decode"] and tile["denoise"] < whole["denoise"]
    small_tiles = phase_bytes(PassShape(1024, 1024, 1, True, vae_tile=256), 2)
    assert small_tiles["decode"] < whole["decode"] / 3


def test_streamed_transients_cover_every_measured_pass_and_grow_past_them():
    """Plans that stream, H200, jobs of 8 steps (bench/ram/ram.json, bench/probes/denoise_peak.json):
    the denoising phase's measured transient over the resident bytes, by pass side. The model never
    predicts less, nor less than one-step jobs read (transients_streamed.json), and past the
    largest measured pass it grows again."""
    measured = {512: 0.246, 1024: 1.514, 1536: 3.151}
    one_step = {768: 0.416, 1024: 0.54, 1280: 0.81, 1536: 1.10}
    for side, gb in measured.items():
        got = phase_bytes(PassShape(side, side, 1, True), 2)["denoise"] * CAL.frag / GiB
        assert gb <= got <= gb + 0.05, (side, got)
    for side, gb in one_step.items():
        assert phase_bytes(PassShape(side, side, 1, True), 2)["denoise"] * CAL.frag / GiB >= gb
    at = [phase_bytes(PassShape(s, s, 1, True), 2)["denoise"] for s in (1536, 1792, 2048)]
    assert at[0] < at[1] < at[2]
    # all-resident plans: the control image's untiled encode, 1535-1547 B/px, is under the phases'
    # maximum (it runs inside the pipeline call: measured in the denoising phase)
    for side in (768, 1024, 1280, 1536):
        ph = phase_bytes(PassShape(side, side, 1, False), 2, all_resident=True)
        assert max(ph["denoise"], ph["encode_image"]) * CAL.frag >= 1547 * side * side


def test_vae_tiles_of_256_px_only_where_512_do_not_fit(full):
    h200 = DeviceInfo("cuda", "H200", 139.8, 139.0, True, 16.0, 50.9, 780.0, context_gb=0.82)
    desktop = replace(h200, context_gb=1.0)  # a context 0.18 GiB larger leaves the 4 tier no room for 512 px
    four = plan_for("4", SHAPE, full, desktop)
    assert four.vae_tiling and four.vae_tile_px == 256 and four.summary()["vae_tile"] == 256
    assert four.predicted_peak_gb <= four.budget_gb
    assert plan_for("4", SHAPE, full, h200).summary()["vae_tile"] == 512
    for tier in ("6", "8", "12", "16", "24"):
        p = plan_for(tier, SHAPE, full, h200)
        assert p.summary()["vae_tile"] in (0, 512), tier


def test_step_time_prefers_resident_weights(full):
    n = len(full.units)
    ps = PassShape(1024, 1024, 1)
    resident = predict_step_s(full, P("B" * n), ps, NOMINAL)
    streamed = predict_step_s(full, P("S" * n), ps, NOMINAL)
    fp8 = predict_step_s(full, P("Q" * n, 2), ps, NOMINAL)
    assert 0 < resident < fp8 < streamed
    slow_bus = DeviceInfo("cuda", "slow", 80, 80, True, 128.0, 5.0, 150.0)
    assert predict_step_s(full, P("S" * n), ps, slow_bus) > streamed
    assert predict_step_s(full, P("B" * n), PassShape(1024, 1024, 2), NOMINAL) > resident  # the CN runs twice


def test_plan_is_a_frozen_record(full):
    import dataclasses

    p = plan_for("8", SHAPE, full, NOMINAL)
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.tile = 0
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.placement.units = "B" * len(full.units)


H100 = DeviceInfo("cuda", "H100", 79.2, 79.2, True, 86.5, 51.4, 740.0)


def test_placement_on_the_gpu_is_kept_for_a_job_it_also_holds(full):
    """A smaller image at the same tier: the weights stay where they are if the placement still
    fits the budget and is at most 15 % slower (moving them again costs 10-25 s)."""
    two = plan_for("8", JobShape(1024, 1280, 1), full, H100)
    one_shape = JobShape(1024, 1024, 1)
    one = plan_for("8", one_shape, full, H100)
    assert one.placement != two.placement
    kept = keep_placement(two, one, one_shape, full, H100)
    assert (
        kept.placement == two.placement
        and kept.placement.ring == two.placement.ring
        and kept.placement.slots == two.placement.slots
    )
    again = predict_peak_bytes(full, two.placement, PassShape(1024, 1024, 1, kept.vae_tiling)) / GiB
    assert kept.predicted_peak_gb == pytest.approx(again, abs=0.006) and kept.predicted_peak_gb <= kept.budget_gb
    assert one.predicted_step_s <= kept.predicted_step_s <= 1.15 * one.predicted_step_s
    # nothing on the GPU, another tier or dtype: the new plan as it is
    assert keep_placement(None, one, one_shape, full, H100) is one
    assert keep_placement(plan_for("12", JobShape(1024, 1024, 2), full, H100), one, one_shape, full, H100) is one
    f32 = plan_for("8", one_shape, full, H100, dtype="float32")
    assert keep_placement(two, f32, one_shape, full, H100) is f32


def test_placement_is_moved_when_it_would_not_fit_or_is_much_slower(full):
    small = plan_for("24", JobShape(768, 768, 1), full, H100)  # more resident: less room for activations
    big_shape = JobShape(1280, 1280, 1)
    big = plan_for("24", big_shape, full, H100)
    over = predict_peak_bytes(full, small.placement, PassShape(1280, 1280, 1, big.vae_tiling)) / GiB
    assert small.placement != big.placement and over > big.budget_gb
    assert keep_placement(small, big, big_shape, full, H100) is big
    large = plan_for("24", JobShape(1536, 1536, 1), full, H100)
    small_shape = JobShape(768, 768, 1)
    new = plan_for("24", small_shape, full, H100)
    step = predict_step_s(full, large.placement, PassShape(768, 768, 1, new.vae_tiling), H100)
    assert step > 1.15 * new.predicted_step_s  # the placement for 1536² is much slower at 768²
    assert keep_placement(large, new, small_shape, full, H100) is new  # so the weights move


def test_pass_size_is_the_larger_of_generation_and_upscale_tiles():
    assert pass_size(JobShape(1024, 768, 1), 0) == (1024, 768)
    assert pass_size(JobShape(768, 768, 1, 2.0), 0) == (1024, 1024)  # upscale tiles of 1024
    assert pass_size(JobShape(768, 768, 1, 1.25), 0) == (960, 960)  # the whole 960² output
    assert pass_size(JobShape(2048, 2048, 1), 768) == (768, 768)


def test_the_context_outside_the_allocator_comes_off_a_tier(full):
    from dataclasses import replace

    ctx = replace(NOMINAL, context_gb=0.6)
    for tier in ("24", "8"):
        p, q = plan_for(tier, SHAPE, full, NOMINAL), plan_for(tier, SHAPE, full, ctx)
        assert q.budget_gb == pytest.approx(p.budget_gb - 0.6)
        assert q.predicted_peak_gb <= q.budget_gb and any("CUDA context" in n for n in q.notes)
    auto = plan_for("auto", SHAPE, full, ctx)  # free memory already excludes the context
    assert auto.budget_gb == pytest.approx(NOMINAL.free_gb - CONTEXT_GB)
    # stepping down goes to the next smaller tier, with the same allowance
    p = plan_for("8", SHAPE, full, ctx)
    assert step_down(p, SHAPE, full, ctx).tier == "6"


def test_a_refusal_says_whether_the_gpu_or_the_host_ram_is_short(full):
    small_ram = DeviceInfo("cuda", "test", 80, 80, True, 8.0)
    with pytest.raises(ValueError, match=r"fits this GPU, but .* at least 10\.\d GiB .*more RAM") as e:
        plan_for("8", SHAPE, full, small_ram)
    assert str(e.value).count(". ") == 0
    with pytest.raises(ValueError, match=r"cannot hold this job even with every weight streamed"):
        plan_for("4", SHAPE, full, DeviceInfo("cuda", "old GPU", 12.0, 11.5, False, 30.0))  # float32 weights
