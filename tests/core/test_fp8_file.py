"""fp8 single-file transformers (ComfyUI / Forge layouts) written from the demo transformer: their
block weights stay the file's fp8 bytes, fp8 packs are those bytes, every store computes what the
dequantized weights compute, the planner stores them as fp8, LoRAs merge and unmerge exactly, and
malformed files are one sentence each."""

import copy
from dataclasses import replace

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from core.checkpoints import CheckpointError, deferred, load_transformer, materialize, native_fp8
from core.demo_model import ensure_demo_model
from core.fp8_file import original_parts
from core.stream.packs import _mapped, file_mappings
from tests.core.byom_files import demo_transformer, fp8_file, fp8_state_dict

BASE = str(ensure_demo_model() / "flux")
E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
LAYOUTS = {  # name: (key layout, scale key)
    "plain.safetensors": ("diffusers", ""),
    "scaled.safetensors": ("diffusers", "weight_scale"),
    "comfy.safetensors": ("original", "scale_weight"),
    "comfy-plain.safetensors": ("original", ""),
}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("fp8")
    out = {name: fp8_file(d / name, layout, scales) for name, (layout, scales) in LAYOUTS.items()}
    out["e5m2.safetensors"] = fp8_file(d / "e5m2.safetensors", dtype=E5M2)
    return dict(out, dir=d)


def block_linears(model):
    blocks = list(model.transformer_blocks) + list(model.single_transformer_blocks)
    return [(n, m) for b in blocks for n, m in b.named_modules() if isinstance(m, nn.Linear)]


def file_values(path, layout: str, scales: str) -> dict[str, tuple[torch.Tensor, float]]:
    """{diffusers weight name: (the file's fp8 tensor for it, its scale)}, read independently of the loader."""
    prefix = "model.diffusion_model." if layout == "original" else ""
    parts = original_parts(2, 2, 32) if layout == "original" else {}
    out = {}
    with safe_open(str(path), "pt") as f:
        keys = set(f.keys())
        for name in demo_transformer().state_dict():
            part = parts.get(name)
            key = prefix + (part.key if part else name)
            t = f.get_tensor(key)
            if t.dtype not in (E4M3, E5M2):
                continue
            t = part.take(t) if part else t
            skey = key[: -len("weight")] + scales
            out[name] = (t, float(f.get_tensor(skey)) if scales and skey in keys else 1.0)
    return out


def reference(path, layout, scales) -> nn.Module:
    """The demo transformer with the file's weights dequantized by hand (fp8 → float32, × scale), resident."""
    tr = load_transformer(str(path), BASE, torch.float32)
    materialize(tr, "cpu", torch.float32)
    with torch.no_grad():
        for name, (t, s) in file_values(path, layout, scales).items():
            p = tr.get_parameter(name)
            if p.dim() == 2 and name.startswith(("transformer_blocks.", "single_transformer_blocks.")):
                assert torch.equal(p, t.float() * s), name  # materialize agrees with the hand-made values
    return tr


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_block_weights_stay_the_files_fp8_bytes_with_no_compute_dtype_copy(files, name):
    layout, scales = LAYOUTS[name]
    model = load_transformer(str(files[name]), BASE, torch.float32)
    want = file_values(files[name], layout, scales)
    maps = file_mappings()
    linears = block_linears(model)
    assert len(linears) == 40
    for n, m in linears:
        src = native_fp8(m.weight)
        assert src is not None and src.data.dtype == E4M3, n
        assert all(s == 0 for s in m.weight.stride()), "a placeholder: no memory of its own"
        assert _mapped(src.data, maps), "the file's memory-mapped pages, not a copy"
    for n, p in model.named_parameters():
        src = deferred(p)
        if src is not None:  # the very bytes of the file (row slices of the fused tensors), and its scale
            t, s = want[n]
            assert torch.equal(src.data.view(torch.uint8), t.view(torch.uint8)) and src.scale == s, n
    ref = demo_transformer().state_dict()
    materialize(model, "cpu", torch.float32)
    err = max((model.state_dict()[k] - v).abs().max().item() / (v.abs().max().item() + 1e-6) for k, v in ref.items())
    assert 0 < err < 0.07, "the file's values are the demo's, rounded to fp8 (and bf16)"


def test_a_checkpoint_bundling_the_vae_and_text_encoders_is_read_for_its_transformer(files, tmp_path):
    from safetensors.torch import load_file

    sd = load_file(str(files["comfy.safetensors"]))
    sd["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]  # I64
    sd["first_stage_model.decoder.conv_in.weight"] = torch.zeros(4, 4, 3, 3)
    save_file(sd, str(tmp_path / "bundle.safetensors"))
    tr = load_transformer(str(tmp_path / "bundle.safetensors"), BASE, torch.float32)
    assert all(native_fp8(m.weight) is not None for _, m in block_linears(tr))


def test_the_original_layout_is_read_as_diffusers_converts_it():
    """original_parts against diffusers' own conversion, on a full-width state dict of one block each
    (diffusers' conversion assumes FLUX's width; only the rows matter, so each row is 2 wide)."""
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

    inner = 3072
    parts = original_parts(1, 1, inner)
    rows = {"double_blocks.0.img_attn.qkv": 3 * inner, "double_blocks.0.txt_attn.qkv": 3 * inner}
    rows["single_blocks.0.linear1"] = 7 * inner  # q, k, v and the MLP's 4x
    sd, n = {}, 0
    for key in dict.fromkeys(part.key for part in parts.values()):
        r = rows.get(key.rsplit(".", 1)[0], 6)
        shape = (r, 2) if key.endswith(".weight") else (r,)
        sd[key] = torch.arange(n, n + np.prod(shape), dtype=torch.float32).reshape(shape)  # every value distinct
        n += int(np.prod(shape))
    converted = convert_flux_transformer_checkpoint_to_diffusers(dict(sd))
    assert set(converted) == set(parts)
    for name, part in parts.items():
        assert torch.equal(part.take(sd[part.key]), converted[name]), name


def _units(tr):
    from core.plan.units import denoiser_units
    from core.stream.packs import file_backed
    from tests.core.test_residency import tiny_denoiser

    _, cn = tiny_denoiser()
    units = denoiser_units(tr, cn)
    maps = file_mappings()
    return cn, units, [file_backed(m, maps) for _, m in units]


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
@pytest.mark.parametrize("name", ["plain.safetensors", "comfy.safetensors"])
def test_fp8_packs_are_the_files_bytes_and_every_store_computes_the_dequantized_weights(files, name, device):
    from core.stream.residency import Residency
    from tests.core.test_residency import run

    layout, scales = LAYOUTS[name]
    tr = load_transformer(str(files[name]), BASE, torch.float32)
    cn, units, keep = _units(tr)
    ref = run(reference(files[name], layout, scales).to(device), copy.deepcopy(cn).to(device), device)
    for m in (tr, cn):  # what is not in a unit stays resident, as the placement keeps it
        for child_name, child in m.named_children():
            if child_name not in ("transformer_blocks", "single_transformer_blocks"):
                child.to(device)
    file_bytes = {id(p): deferred(p).data.view(torch.uint8).reshape(-1) for p in tr.parameters() if deferred(p)}
    for pattern in ("F", "Q", "FQ", "B", "S", "BQSF"):
        # the ControlNet (bf16 from the base) resident, so that only the file's weights are stored this way
        tr_codes = iter((pattern * len(units))[: len(units)])
        codes = "".join(next(tr_codes) if n.startswith("transformer.") else "B" for n, _ in units)
        assert all(k for k, (n, _) in zip(keep, units) if n.startswith("transformer."))
        res = Residency(units, codes, torch.device(device), torch.float32, slots=2, ring=4, keep=keep)
        for i, pack in res.packs.items():
            if pack.fmt == "fp8":  # the compressed part is the file's bytes, weight after weight
                comp = pack.params[: pack._n_comp()]
                got = pack.buf[: pack.n8].cpu()
                assert torch.equal(got, torch.cat([file_bytes[id(p)] for p in comp])), units[i][0]
                assert len(pack.scales) == (len(comp) if scales else 0)
        got = run(tr, cn, device)
        res.remove()
        assert torch.equal(got, ref), f"{pattern}: not what the dequantized weights compute, resident"
        assert all(deferred(m.weight) is not None for _, m in block_linears(tr)), "released: deferred again"


def test_an_e5m2_file_is_read_but_its_fp8_stores_round_it_again(files):
    from core.plan.units import unit_sizes
    from core.stream.residency import Residency
    from tests.core.test_residency import run

    tr = load_transformer(str(files["e5m2.safetensors"]), BASE, torch.float32)
    assert all(deferred(m.weight).data.dtype == E5M2 and native_fp8(m.weight) is None for _, m in block_linears(tr))
    cn, units, keep = _units(tr)
    assert not any(u.fp8_file for u in unit_sizes(units)), "as fp8 (e4m3) its weights are rounded: not exact"
    ref = run(reference(files["e5m2.safetensors"], "diffusers", ""), cn, "cpu")
    for pattern, exact in (("B", True), ("S", True), ("Q", False)):
        codes = "".join(pattern if n.startswith("transformer.") else "B" for n, _ in units)
        res = Residency(units, codes, torch.device("cpu"), torch.float32, slots=2, ring=4, keep=keep)
        got = run(tr, cn, "cpu")
        res.remove()
        assert torch.equal(got, ref) if exact else (got - ref).norm() / ref.norm() < 0.1, pattern


def test_the_planner_stores_a_files_fp8_units_as_fp8(files):
    from core.device import DeviceInfo
    from core.plan.planner import JobShape, plan_for
    from core.plan.sizes import sizes_from_config
    from core.plan.units import unit_sizes

    tr = load_transformer(str(files["plain.safetensors"]), BASE, torch.float32)
    _, units, _ = _units(tr)
    assert [u.fp8_file for u in unit_sizes(units)] == [n.startswith("transformer.") for n, _ in units]
    full = sizes_from_config("full")
    fp8 = replace(full, units=tuple(replace(u, fp8_file=u.name.startswith("transformer.")) for u in full.units))
    gpu = DeviceInfo("cuda", "test", 80, 80, True, 128.0, 25.0, 150.0)
    shape = JobShape(1024, 1024, 1)
    for tier in ("24", "16", "12", "8"):
        bf, f8 = (plan_for(tier, shape, s, gpu, precision="exact") for s in (full, fp8))
        codes = [c for u, c in zip(fp8.units, f8.placement.units) if u.fp8_file]
        assert "S" not in codes and {"F", "Q"} & set(codes), tier  # the file's bytes, never widened to stream
        assert f8.precision == "exact" and bf.precision == "exact", tier
        assert any("file's own float8" in n for n in f8.notes), tier
    cpu = plan_for("cpu", shape, fp8, DeviceInfo("cpu", "CPU", 0.0, 0.0, True, 32.0))
    assert [c == "F" for c in cpu.placement.units] == [u.fp8_file for u in fp8.units] and cpu.placement.slots
    assert plan_for("cpu", shape, full, gpu).placement.all_resident  # a bf16 file: as before


@pytest.fixture(scope="module")
def job(astronaut):
    from core.job import ControlSpec, Job

    return Job("an astronaut portrait", astronaut, (ControlSpec("canny"),), 64, 64, steps=2, seed=5, tier="cpu")


def _image(engine, job):
    return np.asarray(engine.run(job).image, dtype=np.int16)


def test_a_pipeline_with_an_fp8_file_generates_what_its_dequantized_weights_generate(files, job):
    from core.engine import Engine
    from core.models import ModelSpec, load_pipeline

    spec = replace(ModelSpec.demo_spec(), transformer=str(files["comfy.safetensors"]))
    engine = Engine(spec)
    out = _image(engine, job)
    assert "F" in engine.state.placed.placement.units, "the CPU plan keeps the file's units as fp8"
    pipe = load_pipeline(spec, torch.float32)
    materialize(pipe.transformer, "cpu", torch.float32)
    assert np.array_equal(out, _image(Engine(spec, pipe=pipe), job)) and out.std() > 1


def test_loras_on_an_fp8_file_merge_into_widened_weights_and_unmerge_to_the_file(files, job, tmp_path):
    from core.engine import Engine
    from core.lora import LoraSpec, Merger
    from core.models import ModelSpec
    from core.speed import attention
    from tests.core.byom_files import peft_lora

    lora = (LoraSpec(str(peft_lora(tmp_path / "style.safetensors")), 0.8),)
    tr = load_transformer(str(files["plain.safetensors"]), BASE, torch.float32)
    ref = reference(files["plain.safetensors"], "diffusers", "")
    m, m_ref = Merger(dict(transformer=tr)), Merger(dict(transformer=ref))
    touched = m.set(lora)
    m_ref.set(lora)
    assert touched and all(torch.equal(tr.get_parameter(n[12:]), ref.get_parameter(n[12:])) for n in touched)
    m.set(())
    assert all(deferred(tr.get_parameter(n[12:])) is not None for n in touched if "blocks." in n), "the file again"
    m.set(lora)
    attention.fuse_qkv(tr)  # what the all-resident fast path does (and undoes) while a LoRA is merged
    attention.unfuse_qkv(tr)
    m.set(())
    assert all(deferred(tr.get_parameter(n[12:])) is not None for n in touched if "blocks." in n)

    engine = Engine(replace(ModelSpec.demo_spec(), transformer=str(files["plain.safetensors"])))
    plain, styled = _image(engine, job), _image(engine, job.with_(loras=lora))
    assert engine.state.last_repack is not None, "the placement was kept: only touched units packed again"
    assert not np.array_equal(plain, styled)
    assert np.array_equal(_image(engine, job), plain) and np.array_equal(_image(engine, job.with_(loras=lora)), styled)
    engine.state.release()  # what a failed attempt does: the merged weights come back, not the file's
    assert np.array_equal(_image(engine, job.with_(loras=lora)), styled)


def test_malformed_fp8_files_are_one_sentence_each(files, tmp_path):
    def refused(sd, match, name="bad.safetensors"):
        save_file(sd, str(tmp_path / name))
        with pytest.raises(CheckpointError, match=match) as e:
            load_transformer(str(tmp_path / name), BASE, torch.float32)
        assert str(e.value).count(". ") == 0 and str(e.value).endswith("."), str(e.value)

    data = files["comfy.safetensors"].read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) - 1000])
    with pytest.raises(CheckpointError, match=r"'cut.safetensors' is truncated \("):
        load_transformer(str(tmp_path / "cut.safetensors"), BASE, torch.float32)
    controlnet = next((ensure_demo_model() / "controlnet-union").glob("*.safetensors"))
    from safetensors.torch import load_file

    refused(fp8_state_dict(load_file(str(controlnet))), "is not a FLUX transformer matching")

    sd = fp8_state_dict(demo_transformer().state_dict(), "weight_scale")
    q = "transformer_blocks.0.attn.to_q."
    bad = {**sd, q + "weight_scale": torch.ones(96)}
    refused(bad, r"per-channel or block-wise fp8 scales \(transformer_blocks.0.attn.to_q.weight_scale, shape \[96\]\)")
    refused({**sd, q + "weight_scale_inv": torch.ones(1, 1)}, "per-channel or block-wise fp8 scales")
    refused(
        {**sd, "transformer_blocks.0.attn.to_r.weight_scale": torch.ones(1)}, "to_r.weight_scale belongs to no weight"
    )
    refused({**sd, "proj_out.bias.weight_scale": torch.ones(1)}, "belongs to no weight")
    refused(
        {**sd, "norm_out.linear.weight_scale": torch.ones(1), "norm_out.linear.weight": torch.ones(64, 32)},
        "scales a F32 weight, not an fp8 one",
    )
    refused(
        {**sd, q + "scale_weight": torch.ones(())},
        r"to_q.(scale_weight|weight_scale) is the second scale of transformer_blocks.0.attn.to_q.weight",
    )
    refused(
        {**sd, q + "weight_scale": torch.ones(1, dtype=E4M3)},
        "to_q.weight_scale is stored as F8_E4M3; scales are read as bf16, fp16 or fp32",
    )
    for value in (0.0, float("nan"), -1.0):
        refused(
            {**sd, q + "weight_scale": torch.full((1,), value)},
            r"to_q.weight_scale is .*, not a positive finite number",
        )
    refused(
        {**sd, q + "weight": sd[q + "weight"].view(torch.uint8)},
        r"stores transformer_blocks.0.attn.to_q.weight as U8, a format that is not read",
    )
