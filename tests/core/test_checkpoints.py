"""A transformer from one file: bf16 / fp8 single-file safetensors and Q8_0 / Q4_0 GGUF written from
the demo transformer, loaded through load_pipeline and generating; bad files are one sentence.
fp8 files in their own layouts: tests/core/test_fp8_file.py."""

from dataclasses import replace

import gguf
import numpy as np
import pytest
import torch
from torch import nn

from core.checkpoints import CheckpointError, deferred, load_transformer, materialize, q8_quantize_into, write_gguf
from core.demo_model import ensure_demo_model
from core.engine import Engine
from core.job import ControlSpec, Job
from core.models import ModelSpec, ModelUnavailableError, load_pipeline
from tests.core.byom_files import demo_transformer, gguf_file, single_file

BASE = str(ensure_demo_model() / "flux")
# how far each file's weights may be from the demo's: its storage's rounding
FILES = {"bf16.safetensors": 4e-3, "fp8.safetensors": 0.07, "q8_0.gguf": 4e-3, "q4_0.gguf": 0.1}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpt")
    return dict(
        {
            "bf16.safetensors": single_file(d / "bf16.safetensors", torch.bfloat16),
            "fp8.safetensors": single_file(d / "fp8.safetensors", torch.float8_e4m3fn),
            "q8_0.gguf": gguf_file(d / "q8_0.gguf", "Q8_0"),
            "q4_0.gguf": gguf_file(d / "q4_0.gguf", "Q4_0"),
        },
        dir=d,
    )


@pytest.mark.parametrize("name", list(FILES))
def test_each_file_loads_as_plain_modules_close_to_the_weights_it_was_written_from(files, name):
    ref = demo_transformer().state_dict()
    model = load_transformer(str(files[name]), BASE, torch.float32)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert linears and all(type(m) is nn.Linear for m in linears)  # plain Linears: packable
    kept = [p for p in model.parameters() if deferred(p) is not None]
    if name != "bf16.safetensors":  # block weights stay as the file has them until placed (no compute-dtype copy)
        blocks = [b for b in list(model.transformer_blocks) + list(model.single_transformer_blocks)]
        in_blocks = {id(m.weight) for b in blocks for m in b.modules() if isinstance(m, nn.Linear)}
        assert kept and {id(p) for p in kept} == in_blocks
        assert materialize(model, "cpu", torch.float32) == len(kept)
    else:
        assert not kept
    assert all(p.dtype == torch.float32 and not p.is_meta for p in model.parameters())
    err = max((model.state_dict()[k] - v).abs().max().item() for k, v in ref.items())
    assert 0 < err <= FILES[name]


@pytest.fixture(scope="module")
def job(astronaut):
    return Job("an astronaut portrait", astronaut, (ControlSpec("canny"),), 64, 64, steps=2, seed=5, tier="cpu")


@pytest.mark.parametrize("name", ["bf16.safetensors", "q4_0.gguf"])
def test_a_pipeline_with_a_file_transformer_generates_near_the_base_image(files, job, demo_engine, name):
    spec = replace(ModelSpec.demo_spec(), transformer=str(files[name]))
    pipe = load_pipeline(spec, torch.float32)
    assert pipe.transformer is not demo_engine.pipe.transformer
    out = np.asarray(Engine(spec).run(job).image, dtype=np.int16)
    base = np.asarray(demo_engine.run(job).image, dtype=np.int16)
    assert out.shape == base.shape and out.std() > 1
    assert np.abs(out - base).mean() < 20  # the same weights, rounded: close to the base image


def test_bad_files_are_one_sentence_each(files, tmp_path):
    def refused(path, match):
        with pytest.raises(CheckpointError, match=match) as e:
            load_transformer(str(path), BASE, torch.float32)
        assert str(e.value).count(". ") == 0 and str(e.value).endswith(".")

    data = files["bf16.safetensors"].read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    refused(tmp_path / "cut.safetensors", r"'cut.safetensors' is truncated \(")
    data = files["q8_0.gguf"].read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[: len(data) - 100])
    refused(tmp_path / "cut.gguf", "'cut.gguf' is truncated")
    (tmp_path / "junk.gguf").write_bytes(b"GGUF" + b"\xff" * 64)
    refused(tmp_path / "junk.gguf", "truncated or not a GGUF file")
    controlnet = next((ensure_demo_model() / "controlnet-union").glob("*.safetensors"))
    refused(controlnet, "is not a FLUX transformer matching")
    refused(tmp_path / "missing.gguf", "does not exist")
    (tmp_path / "model.ckpt").write_bytes(b"\0")
    refused(tmp_path / "model.ckpt", r"must be a .safetensors or a .gguf file")

    sd = demo_transformer().state_dict()
    from core.checkpoints import write_gguf

    write_gguf(sd, tmp_path / "ternary.gguf", "TQ1_0")  # gguf can write it, diffusers cannot read it
    refused(tmp_path / "ternary.gguf", r"uses the quant type TQ1_0, which cannot be read; use one of .*Q8_0")
    del sd["transformer_blocks.1.attn.to_q.weight"]
    from safetensors.torch import save_file

    save_file(sd, str(tmp_path / "partial.safetensors"))
    refused(
        tmp_path / "partial.safetensors", r"1 tensors differ; the first, transformer_blocks.1.attn.to_q.weight: missing"
    )


def test_the_original_layout_is_checked_block_by_block(tmp_path):
    from core.checkpoints import check_architecture

    keys = {f"model.diffusion_model.double_blocks.{i}.img_attn.qkv.weight": ("BF16", (96, 32)) for i in range(2)}
    keys.update({f"model.diffusion_model.single_blocks.{i}.linear2.weight": ("BF16", (32, 160)) for i in range(3)})
    with pytest.raises(CheckpointError, match="it has 2 double and 3 single blocks of width 32, the model 2 and 2"):
        check_architecture(keys, BASE, "flux1-dev-fp8.safetensors")
    del keys["model.diffusion_model.single_blocks.2.linear2.weight"]
    check_architecture(keys, BASE, "flux1-dev-fp8.safetensors")  # as many blocks as the base: accepted


def test_load_pipeline_turns_a_bad_file_into_model_unavailable(tmp_path):
    (tmp_path / "empty.safetensors").write_bytes(b"")
    spec = replace(ModelSpec.demo_spec(), transformer=str(tmp_path / "empty.safetensors"))
    with pytest.raises(ModelUnavailableError, match="is not a readable safetensors file"):
        load_pipeline(spec, torch.float32)


def _placed_units(tr):
    from core.plan.units import denoiser_units
    from core.stream.packs import file_backed, file_mappings
    from tests.core.test_residency import tiny_denoiser

    _, cn = tiny_denoiser()
    units = denoiser_units(tr, cn)
    maps = file_mappings()
    return cn, units, [file_backed(m, maps) for _, m in units]


def test_a_q4_0_gguf_streams_its_own_bytes_and_stays_quantized_on_the_host(files):
    """4-bit units of a Q4_0 file carry the file's blocks (no requantizing) and compute what its
    dequantized weights compute; released, the weights are placeholders again (no compute-dtype copy)."""
    import gguf

    from core.stream.residency import Residency
    from tests.core.test_residency import run

    tr = load_transformer(str(files["q4_0.gguf"]), BASE, torch.float32)
    ref_tr = load_transformer(str(files["q4_0.gguf"]), BASE, torch.float32)
    for m in ref_tr.modules():  # the gguf package's own reading of the file's blocks
        src = deferred(m.weight) if isinstance(m, nn.Linear) else None
        if src is not None:
            values = gguf.quants.dequantize(src.data.numpy(), gguf.GGMLQuantizationType.Q4_0)
            m.weight = nn.Parameter(torch.from_numpy(values).reshape(m.weight.shape), requires_grad=False)
    cn, units, keep = _placed_units(tr)
    ref = run(ref_tr, cn, "cpu")
    codes = "".join("N" if n.startswith("transformer.") else "B" for n, _ in units)
    assert all(k for k, c in zip(keep, codes) if c == "N"), "deferred GGUF units keep their source"
    res = Residency(units, codes, torch.device("cpu"), torch.float32, slots=2, ring=4, keep=keep)
    i = codes.index("N")
    pack = res.packs[i]
    blocks = torch.cat([p.quant_source.data.reshape(-1) for p in pack.params[: pack._n_comp()]])
    assert torch.equal(pack.buf[: blocks.numel()], blocks), "the pack holds the file's own Q4_0 bytes"
    assert torch.equal(run(tr, cn, "cpu"), ref)
    res.remove()
    weights = [m.weight for _, u in units[i:] for m in u.modules() if isinstance(m, nn.Linear)]
    assert weights and all(deferred(w) is not None for w in weights), "released: quantized again, not bf16"


def test_a_q8_0_gguf_places_on_every_store(files):
    from core.stream.residency import Residency
    from tests.core.test_residency import run

    tr = load_transformer(str(files["q8_0.gguf"]), BASE, torch.float32)
    ref_tr = load_transformer(str(files["q8_0.gguf"]), BASE, torch.float32)
    materialize(ref_tr, "cpu", torch.float32)
    cn, units, keep = _placed_units(tr)
    ref = run(ref_tr, cn, "cpu")
    for pattern in ("B", "S", "BS", "FQ", "RN"):
        codes = (pattern * len(units))[: len(units)]
        res = Residency(units, codes, torch.device("cpu"), torch.float32, slots=2, ring=4, keep=keep)
        got = run(tr, cn, "cpu")
        res.remove()
        if set(codes) <= {"B", "S"}:
            assert torch.equal(got, ref), pattern  # dequantized exactly as the reference was
        else:
            assert (got - ref).norm() / ref.norm() < 0.15, pattern
        assert all(
            deferred(m.weight) is not None
            for _, u in units
            if _.startswith("transformer.")
            for m in u.modules()
            if isinstance(m, nn.Linear)
        )


def test_loras_on_a_gguf_transformer_are_one_sentence(files, job):
    from core.lora import LoraSpec
    from tests.core.byom_files import peft_lora

    spec = replace(ModelSpec.demo_spec(), transformer=str(files["q4_0.gguf"]))
    lora = peft_lora(files["dir"] / "style.safetensors")
    with pytest.raises(ValueError, match="LoRAs cannot be merged into a GGUF transformer yet"):
        Engine(spec).run(job.with_(loras=(LoraSpec(str(lora), 0.8),)))


@pytest.mark.parametrize(("name", "want"), [("q4_0.gguf", "4bit"), ("q8_0.gguf", "auto"), ("bf16.safetensors", "auto")])
def test_auto_precision_on_a_q4_0_file_keeps_its_4_bit_blocks(files, job, name, want):
    engine = Engine(replace(ModelSpec.demo_spec(), transformer=str(files[name])))
    engine.load()
    assert engine.precision(job) == want
    assert engine.precision(job.with_(precision="exact")) == "exact"  # the user's choice stands


def test_the_app_takes_a_transformer_file(files, job):
    import app

    engine = app.build_engine(app.parse_args(["--demo", "--transformer", str(files["q4_0.gguf"])]))
    assert engine.spec.transformer == str(files["q4_0.gguf"]) and engine.precision(job) == "4bit"
    from ui.handlers import model_name

    assert model_name(replace(engine.spec, demo=False)).endswith("transformer q4_0.gguf")


@pytest.mark.parametrize("name", ["q8_0.gguf", "fp8.safetensors"])
def test_a_float32_plan_keeps_the_deferred_weights_of_a_file_loaded_in_bf16(files, name):
    """The retry after a black result computes in float32: converting the pipeline must not turn the
    placeholders into tensors of NaN (which would also drop their sources)."""
    from core.device import DeviceInfo
    from core.placed import PlacedPipeline
    from core.plan.planner import JobShape, plan_for

    spec = replace(ModelSpec.demo_spec(), transformer=str(files[name]))
    cpu = DeviceInfo("cpu", "CPU", 0.0, 0.0, True, 32.0)
    state = PlacedPipeline(spec, cpu, pipe=load_pipeline(spec, torch.bfloat16))
    state.place(plan_for("cpu", JobShape(64, 64), state.sizes, cpu, dtype="float32"))
    tr = state.pipe.transformer
    assert all(p.dtype == torch.float32 and not p.isnan().any() for p in tr.parameters() if deferred(p) is None)
    state.release()
    if name == "fp8.safetensors":  # placed as fp8 on the CPU (a GGUF is dequantized there for good)
        weights = [m.weight for b in tr.transformer_blocks for m in b.modules() if isinstance(m, nn.Linear)]
        assert all(deferred(w) is not None and w.dtype == torch.float32 for w in weights)


# -- writing GGUF with torch (the full-size benchmark's files): the gguf package's bytes --------------
def test_q8_0_bytes_are_the_gguf_reference_quantizer_s():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3000, 32, generator=g) * torch.rand(3000, 1, generator=g) * 3
    x[0] = 0  # an all-zero block: scale 0
    x[1, 7] = -x[1].abs().max() - 1  # a negative extreme
    x[2] = torch.arange(32) - 15.5  # x / d lands on halves and near-halves: the rounding rule shows
    x[3, 0], x[3, 1:] = 127, torch.arange(31) + 0.5  # d = 1: exact ties, rounded away from zero
    x = x.reshape(-1).to(torch.bfloat16)
    out = torch.empty(x.numel() // 32 * 34, dtype=torch.uint8)
    q8_quantize_into(out, x)
    ref = gguf.quants.quantize(x.float().numpy(), gguf.GGMLQuantizationType.Q8_0).reshape(-1)
    assert np.array_equal(out.numpy(), ref)


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0"])
def test_the_gguf_written_with_torch_is_the_numpy_written_one_byte_for_byte(tmp_path, qtype):
    g = torch.Generator().manual_seed(1)
    sd = {
        "blocks.0.attn.to_q.weight": torch.randn(48, 64, generator=g),  # quantized
        "blocks.0.attn.to_q.bias": torch.randn(48, generator=g),  # F32
        "proj.weight": torch.randn(8, 40, generator=g),  # rows of 40: not whole blocks, F32
        "x_embedder.weight": torch.randn(96, 32, generator=g).to(torch.bfloat16),
    }
    ours = write_gguf(sd, tmp_path / "ours.gguf", qtype, device="cpu")
    ref = write_gguf(sd, tmp_path / "ref.gguf", qtype)
    assert ours.read_bytes() == ref.read_bytes()
