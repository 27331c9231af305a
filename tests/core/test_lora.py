"""LoRAs: files in diffusers' and kohya's layouts merged into the demo denoiser's CPU weights,
unmerged exactly, on every placement, and through the engine."""

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from core.engine import Engine
from core.job import ControlSpec, Job, LoraSpec
from core.lora import Merger, folder_source, list_loras, parse_lora_arg, read_lora, suggest
from core.models import ModelSpec
from core.plan.units import denoiser_units
from core.stream.residency import Residency
from tests.core.byom_files import demo_transformer, kohya_lora, peft_lora
from tests.core.test_residency import run, tiny_denoiser

W, H = 64, 64


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("loras")
    return dict(
        a=peft_lora(d / "style-a.safetensors", seed=1),
        b=peft_lora(d / "style-b.safetensors", seed=2, rank=2, alpha=2.0),
        kohya=kohya_lora(d / "kohya.safetensors", seed=3),
        dir=d,
    )


def state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_lora_spec_refuses_bad_files_and_scales_in_one_sentence(files, tmp_path):
    with pytest.raises(ValueError, match=r"does not exist\.$"):
        LoraSpec(str(tmp_path / "missing.safetensors"))
    (tmp_path / "x.ckpt").write_bytes(b"\0")
    with pytest.raises(ValueError, match="not a .safetensors file"):
        LoraSpec(str(tmp_path / "x.ckpt"))
    with pytest.raises(ValueError, match=r"scale of LoRA 'style-a.safetensors' must be between -2.0 and 2.0"):
        LoraSpec(str(files["a"]), 3.0)
    assert LoraSpec(str(files["a"]), 0.5).describe() == dict(
        name="style-a.safetensors", path=str(files["a"]), scale=0.5
    )


def test_lora_args_parse_scales_and_names_in_the_lora_folder(files):
    assert parse_lora_arg(f"{files['a']}=0.8") == LoraSpec(str(files["a"]), 0.8)
    assert parse_lora_arg(str(files["a"])).scale == 1.0
    assert parse_lora_arg("style-b.safetensors=-0.5", files["dir"]).path == str(files["b"])
    with pytest.raises(ValueError, match="FILE\\[=SCALE\\]"):
        parse_lora_arg(f"{files['a']}=strong")
    assert list_loras(files["dir"]) == ("kohya.safetensors", "style-a.safetensors", "style-b.safetensors")
    assert list_loras(files["dir"] / "nothing-here") == ()


def test_few_step_loras_suggest_their_steps_and_guidance(tmp_path):
    def spec(name):
        (tmp_path / name).write_bytes(b"")
        return LoraSpec(str(tmp_path / name))

    assert suggest([spec("style.safetensors")]) is None
    turbo = suggest([spec("style.safetensors"), spec("FLUX.1-Turbo-Alpha.safetensors")])
    assert turbo == dict(steps=8, guidance=3.5, lora="FLUX.1-Turbo-Alpha.safetensors")
    assert suggest([spec("Hyper-FLUX.1-dev-16steps-lora.safetensors")])["steps"] == 16


def test_both_layouts_are_read_into_diffusers_module_names(files):
    a, k = read_lora(str(files["a"])), read_lora(str(files["kohya"]))
    assert "transformer_blocks.0.attn.to_q" in a["transformer"] and not a["controlnet"]
    assert a["transformer"]["transformer_blocks.0.attn.to_q"].factor == 2.0  # lora_alpha 8 / r 4
    # kohya's fused qkv is split into q, k, v; its alpha (4 / rank 4) is folded into the weights
    assert {"transformer_blocks.1.attn.to_k", "transformer_blocks.1.attn.to_out.0"} <= set(k["transformer"])


@pytest.mark.parametrize("with_source", [True, False])
def test_merge_then_unmerge_restores_every_weight_exactly(files, with_source):
    from core.demo_model import ensure_demo_model

    tr = demo_transformer()
    base = state(tr)
    sources = dict(transformer=folder_source(ensure_demo_model() / "flux" / "transformer")) if with_source else {}
    m = Merger(dict(transformer=tr), sources)
    changed = m.set([LoraSpec(str(files["a"]), 0.7), LoraSpec(str(files["kohya"]), 1.0)])
    after = state(tr)
    moved = {f"transformer.{k}" for k in base if not torch.equal(base[k], after[k])}
    assert moved == set(changed) == set(m.touched) and len(moved) > 20
    assert m.set(m.loras) == frozenset()  # the same LoRAs: nothing to do
    switched = m.set([LoraSpec(str(files["b"]), 1.0)])
    assert switched >= moved  # the old ones were taken out
    m.set([])
    assert all(torch.equal(base[k], v) for k, v in tr.state_dict().items())
    assert bool(m._saved) != with_source  # copies only where there is no source to read from


def test_scale_zero_changes_nothing_and_the_delta_is_linear_in_the_scale(files):
    tr = demo_transformer()
    base = state(tr)
    m = Merger(dict(transformer=tr))
    m.set([LoraSpec(str(files["a"]), 0.0)])
    assert all(torch.equal(base[k], v) for k, v in tr.state_dict().items())
    k = "transformer_blocks.0.attn.to_q.weight"
    m.set([LoraSpec(str(files["a"]), 0.5)])
    half = tr.state_dict()[k] - base[k]
    m.set([LoraSpec(str(files["a"]), 1.0)])
    torch.testing.assert_close(tr.state_dict()[k] - base[k], 2 * half)


def test_a_lora_for_another_model_is_one_sentence_naming_the_file(tmp_path):
    path = tmp_path / "sdxl-style.safetensors"
    save_file(
        {
            "unet.down_blocks.0.attn.to_q.lora_A.weight": torch.zeros(4, 320),
            "unet.down_blocks.0.attn.to_q.lora_B.weight": torch.zeros(320, 4),
        },
        str(path),
    )
    tr = demo_transformer()
    with pytest.raises(ValueError, match=r"^The LoRA 'sdxl-style.safetensors' matches no layer .*\.$"):
        Merger(dict(transformer=tr)).set([LoraSpec(str(path))])
    wide = tmp_path / "wide.safetensors"
    save_file(
        {
            "transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(4, 3072),
            "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": torch.zeros(3072, 4),
        },
        str(wide),
    )
    with pytest.raises(ValueError, match=r"^The LoRA 'wide.safetensors' does not fit this model"):
        Merger(dict(transformer=tr)).set([LoraSpec(str(wide))])


def test_a_controlnet_lora_changes_only_the_controlnet(tmp_path):
    tr, cn = tiny_denoiser()
    path = tmp_path / "cn.safetensors"
    g = torch.Generator().manual_seed(0)
    save_file(
        {
            "controlnet.transformer_blocks.0.attn.to_q.lora_A.weight": torch.randn(4, 32, generator=g),
            "controlnet.transformer_blocks.0.attn.to_q.lora_B.weight": torch.randn(32, 4, generator=g),
        },
        str(path),
    )
    before = state(tr)
    changed = Merger(dict(transformer=tr, controlnet=cn)).set([LoraSpec(str(path))])
    assert changed == {"controlnet.transformer_blocks.0.attn.to_q.weight"}
    assert all(torch.equal(before[k], v) for k, v in tr.state_dict().items())


def fp8_rounded(units, codes):
    """What fp8 packs hold: the Linear weights of F/Q units rounded to float8_e4m3fn."""
    with torch.no_grad():
        for (_, m), c in zip(units, codes):
            for lin in m.modules():
                if c in "FQ" and isinstance(lin, torch.nn.Linear):
                    lin.weight.copy_(lin.weight.to(torch.float8_e4m3fn).float())


@pytest.mark.parametrize("placement", ["S", "BS", "SB", "Q", "BQS"])
def test_merged_and_streamed_computes_what_merged_and_resident_computes(files, placement):
    base_tr, cn = tiny_denoiser()
    plain = run(base_tr, cn, "cpu")
    results = []
    for streamed in (False, True):
        tr, cn = tiny_denoiser()
        Merger(dict(transformer=tr, controlnet=cn)).set([LoraSpec(str(files["a"]), 0.8)])
        units = denoiser_units(tr, cn)
        codes = (placement * len(units))[: len(units)]
        res = None
        if streamed:  # the packs are made from the merged weights
            res = Residency(units, codes, torch.device("cpu"), torch.float32, slots=2, ring=6)
        else:
            fp8_rounded(units, codes)
        results.append(run(tr, cn, "cpu"))
        if res is not None:
            res.remove()
    assert not torch.allclose(results[0], plain, atol=1e-3), "the LoRA changes the denoiser's output"
    assert torch.equal(results[0], results[1])


# -- through the engine ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def job(astronaut):
    return Job("an astronaut portrait", astronaut, (ControlSpec("canny"),), W, H, steps=2, seed=3, tier="cpu")


def px(result):
    return np.asarray(result.image, dtype=np.int16)


def test_engine_merges_switches_and_unmerges_loras_between_jobs(demo_engine, job, files):
    base = px(demo_engine.run(job))
    with_a = px(demo_engine.run(job.with_(loras=(LoraSpec(str(files["a"]), 0.8),))))
    zero = px(demo_engine.run(job.with_(loras=(LoraSpec(str(files["a"]), 0.0),))))
    kohya = px(demo_engine.run(job.with_(loras=(LoraSpec(str(files["kohya"]), 1.0),))))
    again = px(demo_engine.run(job))
    assert np.abs(with_a - base).mean() > 1 and np.abs(kohya - base).mean() > 1 and np.abs(kohya - with_a).mean() > 1
    assert np.array_equal(zero, base) and np.array_equal(again, base)
    assert demo_engine.state.lora.touched == frozenset()


def test_job_describes_its_loras_and_refuses_duplicates(job, files):
    a = LoraSpec(str(files["a"]), 0.8)
    assert job.with_(loras=[a]).describe()["loras"] == [
        dict(name="style-a.safetensors", path=str(files["a"]), scale=0.8)
    ]
    with pytest.raises(ValueError, match="each LoRA file may be given once"):
        job.with_(loras=(a, LoraSpec(str(files["a"]), 0.2)))
    with pytest.raises(ValueError, match="loras must be a list of LoraSpec"):
        job.with_(loras=(str(files["a"]),))


def test_a_caller_given_pipeline_restores_from_copies(job, files, demo_engine):
    base = px(demo_engine.run(job))
    eng = Engine(ModelSpec.demo_spec(), pipe=demo_engine.pipe)  # not loaded from the spec: no source
    styled = px(eng.run(job.with_(loras=(LoraSpec(str(files["b"]), 1.0),))))
    assert eng.state.lora.sources == {} and eng.state.lora._saved
    assert np.abs(styled - base).mean() > 1 and np.array_equal(px(eng.run(job)), base)


def test_a_lora_that_cannot_be_merged_is_refused_before_anything_moves(demo_engine, job, files, tmp_path):
    demo_engine.run(job.with_(loras=(LoraSpec(str(files["a"]), 0.5),)))
    placed = demo_engine.state.placed
    other = tmp_path / "other.safetensors"
    save_file({"unet.x.lora_A.weight": torch.zeros(2, 4), "unet.x.lora_B.weight": torch.zeros(4, 2)}, str(other))
    with pytest.raises(ValueError, match="'other.safetensors' matches no layer"):
        demo_engine.run(job.with_(loras=(LoraSpec(str(other)),)))
    assert demo_engine.state.placed is placed and demo_engine.state.lora.loras == (LoraSpec(str(files["a"]), 0.5),)
    read = dict(demo_engine.state.lora._read)
    demo_engine.run(job.with_(loras=(LoraSpec(str(files["a"]), 0.9),)))  # a new scale: the file is not read again
    assert demo_engine.state.lora._read[str(files["a"])] is read[str(files["a"])]
    demo_engine.run(job)


def test_settings_from_a_png_bring_the_loras_back(files, job, tmp_path):
    from core.lora import loras_from_params

    a, b = LoraSpec(str(files["a"]), 0.8), LoraSpec(str(files["b"]), -0.5)
    described = job.with_(loras=(a, b)).describe()["loras"]
    moved = dict(described[1], path=str(tmp_path / "elsewhere" / "style-b.safetensors"))  # found by name instead
    gone = dict(name="gone.safetensors", path="/nowhere/gone.safetensors", scale=1.0)
    specs, missing = loras_from_params([described[0], moved, gone, "junk"], files["dir"])
    assert specs == (a, b) and missing == ("gone.safetensors",)
    assert loras_from_params([dict(described[0], scale=9)], files["dir"])[0][0].scale == 2.0  # clamped
    assert loras_from_params(None) == ((), ())


def test_a_lora_on_a_transformer_file_restores_from_copies(files, job, tmp_path):
    from dataclasses import replace

    from tests.core.byom_files import single_file

    spec = replace(ModelSpec.demo_spec(), transformer=str(single_file(tmp_path / "t.safetensors", torch.float32)))
    eng = Engine(spec)
    base = px(eng.run(job))
    styled = px(eng.run(job.with_(loras=(LoraSpec(str(files["a"]), 1.0),))))
    assert "transformer" not in eng.state.lora.sources and "controlnet" in eng.state.lora.sources
    assert np.abs(styled - base).mean() > 1 and np.array_equal(px(eng.run(job)), base)


def streamed_engine(monkeypatch, codes_of="BSQFRN"):
    """A fresh demo engine (weights memory-mapped from its files) whose plans stream a mix of every
    store on the CPU: the same residency a GPU plan uses."""
    from dataclasses import replace

    from core.plan.placement import Placement

    engine = Engine(ModelSpec.demo_spec())
    real = engine.plan

    def plan(job, tier=None, dtype=None):
        p = real(job, tier, dtype)
        n = len(p.placement.units)
        return replace(p, placement=Placement((codes_of * n)[:n], p.dtype, "cpu", slots=2, ring=4))

    monkeypatch.setattr(engine, "plan", plan)
    return engine


def test_a_lora_change_packs_again_only_the_units_it_touches(monkeypatch, job, files):
    engine = streamed_engine(monkeypatch)
    a, b = LoraSpec(str(files["a"]), 0.8), LoraSpec(str(files["b"]), 0.5)
    base = px(engine.run(job))
    residency = engine.state.residency
    res_a = engine.run(job.with_(loras=(a,)))
    with_a = px(res_a)
    assert engine.state.residency is residency, "the placement stayed; only LoRA units were packed again"
    done, total, _ = engine.state.last_repack
    assert 0 < done < total and any(e.startswith(f"LoRAs changed: {done} of {total} units") for e in res_a.events)
    with_b = px(engine.run(job.with_(loras=(b,))))
    back = px(engine.run(job))
    assert engine.state.residency is residency
    fresh = streamed_engine(monkeypatch)
    assert np.array_equal(with_b, px(fresh.run(job.with_(loras=(b,))))), "as if placed with B from the start"
    assert np.array_equal(with_a, px(fresh.run(job.with_(loras=(a,)))))
    assert np.array_equal(back, base) and not np.array_equal(with_a, base)
    engine.release()
    fresh.release()
