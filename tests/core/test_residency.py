"""Residency on the tiny demo denoiser: every placement computes what the resident model computes."""

import copy

import pytest
import torch

from core.configs import TINY
from core.plan.units import buffer_bytes, denoiser_units, unit_sizes
from core.stream.residency import Residency

GPU = torch.cuda.is_available()


def tiny_denoiser(seed=0):
    from diffusers import FluxControlNetModel, FluxTransformer2DModel

    torch.manual_seed(seed)
    tr = FluxTransformer2DModel(**TINY["transformer"]).eval()
    cn = FluxControlNetModel(**TINY["controlnet"]).eval()
    with torch.no_grad():
        for n, p in cn.named_parameters():
            if "controlnet_blocks" in n or "controlnet_single_blocks" in n:
                p.normal_(0, 0.3)
    return tr, cn


def run(tr, cn, device, steps=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    n_img, n_txt = 64, 8
    x = torch.randn(1, n_img, 64, generator=g).to(device)
    cond = torch.randn(1, n_img, 64, generator=g).to(device)
    txt = torch.randn(1, n_txt, 32, generator=g).to(device)
    pooled = torch.randn(1, 32, generator=g).to(device)
    img_ids = torch.zeros(n_img, 3)
    img_ids[:, 1] = torch.arange(n_img) // 8
    img_ids[:, 2] = torch.arange(n_img) % 8
    img_ids, txt_ids = img_ids.to(device), torch.zeros(n_txt, 3, device=device)
    outs = []
    with torch.no_grad():
        for s in range(steps):
            t = torch.full((1,), 1.0 - s / steps, device=device)
            gd = torch.full((1,), 3.5, device=device)
            bs, sbs = cn(
                hidden_states=x,
                controlnet_cond=cond,
                controlnet_mode=torch.zeros(1, 1, dtype=torch.long, device=device),
                conditioning_scale=0.7,
                timestep=t,
                guidance=gd,
                pooled_projections=pooled,
                encoder_hidden_states=txt,
                txt_ids=txt_ids,
                img_ids=img_ids,
                return_dict=False,
            )
            v = tr(
                hidden_states=x,
                timestep=t,
                guidance=gd,
                pooled_projections=pooled,
                encoder_hidden_states=txt,
                controlnet_block_samples=bs,
                controlnet_single_block_samples=sbs,
                txt_ids=txt_ids,
                img_ids=img_ids,
                return_dict=False,
            )[0]
            x = x - 0.1 * v
            outs.append(v.float().cpu())
    return torch.stack(outs)


def test_units_cover_every_block_parameter_in_execution_order():
    tr, cn = tiny_denoiser()
    units = denoiser_units(tr, cn)
    names = [n for n, _ in units]
    assert names[0].startswith("controlnet.transformer_blocks.0.")
    assert names[-1].startswith("transformer.single_transformer_blocks.1.")
    in_units = {id(p) for _, m in units for p in m.parameters()}
    blocks = [b for m in (tr, cn) for b in list(m.transformer_blocks) + list(m.single_transformer_blocks)]
    assert in_units == {id(p) for b in blocks for p in b.parameters()}
    sizes = unit_sizes(units)
    assert all(0 < s.fp8_numel <= s.numel for s in sizes)


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if GPU else []))
@pytest.mark.parametrize("pattern", ["S", "BS", "BBSS", "SB", "Q", "F", "BFQS"])
def test_placement_matches_resident(device, pattern):
    tr, cn = tiny_denoiser()
    dtype = torch.float32
    ref = run(copy.deepcopy(tr).to(device), copy.deepcopy(cn).to(device), device)
    units = denoiser_units(tr, cn)
    placement = (pattern * len(units))[: len(units)]
    for m in (tr, cn):  # non-unit params resident
        for name, child in m.named_children():
            if name not in ("transformer_blocks", "single_transformer_blocks"):
                child.to(device)
    sizes = unit_sizes(units)
    res = Residency(units, placement, torch.device(device), dtype, slots=2, ring=6)
    assert res.gpu_bytes_buffers == buffer_bytes(sizes, placement, 4, 2, 6), "the plan counts these buffers"
    got = run(tr, cn, device)
    if set(placement) <= {"B", "S"}:
        assert torch.equal(got, ref), "streaming in the compute dtype must be exact"
    else:  # fp8 storage: close, not equal
        rel = (got - ref).norm() / ref.norm()
        assert 0 < rel < 0.1, rel
    assert res.stats["misses"] + res.stats["hits"] > 0
    res.remove()
    assert all(p.device.type == "cpu" for m in (tr, cn) for b in m.transformer_blocks for p in b.parameters())


def test_prefetch_learns_the_order_after_one_step():
    tr, cn = tiny_denoiser()
    units = denoiser_units(tr, cn)
    res = Residency(units, "S" * len(units), torch.device("cpu"), torch.float32, slots=3, ring=6)
    run(tr, cn, "cpu", steps=1)
    res.end_step()
    res.stats.update(hits=0, misses=0)
    run(tr, cn, "cpu", steps=2)
    # one CN pass + one transformer pass per step, in a learned order: (almost) no misses
    assert res.stats["misses"] <= 2 and res.stats["hits"] > 10, res.stats
    res.remove()


def test_bad_placement_is_rejected():
    tr, cn = tiny_denoiser()
    units = denoiser_units(tr, cn)
    with pytest.raises(ValueError, match="placement"):
        Residency(units, "X" * len(units), torch.device("cpu"), torch.float32, slots=2, ring=6)


@pytest.mark.parametrize("cast,ring", [("compute", 2), ("side", 2), ("side", 9)])
def test_cast_modes_and_ring_sizes_match_resident(cast, ring):
    tr, cn = tiny_denoiser()
    ref = run(copy.deepcopy(tr), copy.deepcopy(cn), "cpu")
    units = denoiser_units(tr, cn)
    placement = ("BQSF" * len(units))[: len(units)]
    res = Residency(units, placement, torch.device("cpu"), torch.float32, slots=2, ring=ring, cast=cast)
    got = run(tr, cn, "cpu")
    assert 0 < ((got - ref).norm() / ref.norm()) < 0.1
    res.remove()


def test_skipped_units_and_unknown_order_still_compute_the_same():
    """ControlNet passes skipped after control_end, or units that run outside the learned order (the
    text encoder): what was prepared for them is dropped and the results stay exact."""
    tr, cn = tiny_denoiser()
    units = denoiser_units(tr, cn)
    ref_tr = copy.deepcopy(tr)
    res = Residency(units, "S" * len(units), torch.device("cpu"), torch.float32, slots=2, ring=3)
    run(tr, cn, "cpu", steps=1)
    res.end_step()
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, 64, 64, generator=g)
    txt, pooled = torch.randn(1, 8, 32, generator=g), torch.randn(1, 32, generator=g)
    ids = torch.zeros(64, 3)
    ids[:, 1], ids[:, 2] = torch.arange(64) // 8, torch.arange(64) % 8
    kw = dict(
        hidden_states=x,
        timestep=torch.ones(1),
        guidance=torch.full((1,), 3.5),
        pooled_projections=pooled,
        encoder_hidden_states=txt,
        txt_ids=torch.zeros(8, 3),
        img_ids=ids,
        return_dict=False,
    )
    with torch.no_grad():
        want = ref_tr(**kw)[0]
        for _ in range(3):  # the transformer alone: every ControlNet unit in the order is skipped
            assert torch.equal(tr(**kw)[0], want)
            res.end_step()
        # units called in reverse block order: none is where the order predicts
        for b in reversed(list(tr.single_transformer_blocks)):
            for m in b.children():
                if any(True for _ in m.parameters()) and isinstance(m, torch.nn.Linear):
                    m(torch.randn(2, m.in_features))
        assert torch.equal(tr(**kw)[0], want)
    res.remove()


def test_learned_order_has_no_misses():
    tr, cn = tiny_denoiser()
    units = denoiser_units(tr, cn)
    res = Residency(units, ("SQF" * len(units))[: len(units)], torch.device("cpu"), torch.float32, slots=2, ring=4)
    run(tr, cn, "cpu", steps=1)
    res.end_step()
    res.stats.update(hits=0, misses=0)
    outs = []
    for _ in range(2):
        outs.append(run(tr, cn, "cpu", steps=1))
        res.end_step()
    assert res.stats["misses"] == 0 and res.stats["hits"] == 2 * len(units), res.stats
    res.remove()


def test_ring_hands_out_regions_in_order_and_waits_for_release():
    from core.stream.ring import Ring

    ring = Ring(1024)
    a, wa = ring.alloc(400)
    b, wb = ring.alloc(400)
    assert (a.start, b.start) == (0, 512) and wa == wb == []
    assert ring.alloc(300) is None  # wraps onto a, which is still in use
    a.release("evt-a")
    c, wc = ring.alloc(300)  # reuses a's bytes after a's event
    assert c.start == 0 and wc == ["evt-a"]
    assert ring.alloc(300) is None  # b still in use
    b.release(None)  # released with no event: same-stream order suffices
    d, wd = ring.alloc(500)
    assert d.start == 512 and wd == []
    with pytest.raises(ValueError, match="does not fit"):
        ring.alloc(2000)


# -- the scheduler under any call order ----------------------------------------------------------
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


def _units(n, seed=0):
    torch.manual_seed(seed)
    return [(f"u{i}", torch.nn.Linear(8 + 8 * (i % 3), 8 + 8 * (i % 3))) for i in range(n)]


@settings(max_examples=60, deadline=None)
@given(
    placement=st.lists(st.sampled_from("BFSQ"), min_size=6, max_size=6).map("".join),
    ring=st.integers(2, 5),
    slots=st.integers(1, 3),
    cast=st.sampled_from(["side", "compute"]),
    calls=st.lists(st.one_of(st.integers(0, 5), st.just(-1)), min_size=1, max_size=40),
)
def test_any_call_order_computes_with_the_right_weights(placement, ring, slots, cast, calls):
    """Units called in any order (repeats, skips, step ends at any point: -1) always run with their
    own weights: the ring never hands a unit's bytes to another one before it has run."""
    units = _units(6)
    ref = copy.deepcopy(units)
    res = Residency(units, placement, torch.device("cpu"), torch.float32, slots=slots, ring=ring, cast=cast)
    for i, (_, m) in enumerate(ref):  # the reference: the same rounding fp8 storage applies
        if placement[i] in "FQ":
            m.weight.data = m.weight.data.to(torch.float8_e4m3fn).float()
    with torch.no_grad():
        for c in calls:
            if c < 0:
                res.end_step()
                continue
            x = torch.randn(2, units[c][1].in_features)
            assert torch.equal(units[c][1](x), ref[c][1](x)), (placement, c)
    res.remove()


def test_kept_sources_do_not_hold_device_copies_the_fast_path_replaced(tmp_path):
    """A resident unit whose weights are file-backed gives them back on release; what it keeps for
    that must not keep the device copies alive once the fast path swaps a child (fused QKV drops
    to_q/k/v: at full size that was 5 GiB of the 48 GB tier)."""
    import gc
    import weakref

    from safetensors.torch import load_file, save_file
    from torch import nn

    unit = nn.Module()
    unit.a, unit.b = nn.Linear(8, 8), nn.Linear(8, 8)
    save_file({k: v.to(torch.bfloat16) for k, v in unit.state_dict().items()}, tmp_path / "u.safetensors")
    src = load_file(tmp_path / "u.safetensors")  # bf16 on file, float32 on the "device": copies
    for name, p in unit.named_parameters():
        p.data = src[name]
    res = Residency([("u", unit)], "B", torch.device("cpu"), torch.float32, 0, 2, keep=[True])
    copy_of_a = weakref.ref(unit.a.weight)  # the Parameter, the only holder of its float32 copy
    assert unit.a.weight.dtype == torch.float32 and copy_of_a() is not None
    del unit.a  # what fusing does: the child goes, a new one takes its place
    unit.fused = nn.Linear(8, 16)
    gc.collect()
    assert copy_of_a() is None, "the residency kept the replaced child's device copy alive"
    del unit.fused  # undone: the original names are back, as new modules
    unit.a = nn.Linear(8, 8)
    res.remove()
    for name, p in unit.named_parameters():
        assert p.data_ptr() == src[name].data_ptr(), f"{name} is not the file's tensor again"
