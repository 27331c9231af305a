"""The fast path on the CPU with the tiny demo model: fp8 numerics (emulated, and the real
`_scaled_mm` where this torch has it on the CPU), fused QKV, compile wiring (the cheap "eager"
backend), exact undo, the Job field, and the engine's choices (fp8 ignored with a note where it
cannot apply)."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn
from torch._dynamo.utils import counters

from core.engine import Engine
from core.job import ControlSpec, Job
from core.models import ModelSpec
from core.speed import attention, fast, fp8_compute
from core.speed.compile_policy import compile_seconds

W, H = 128, 96


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Compiled code is cached per block class for the process: each test starts and ends clean."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).norm() / b.norm())


def state(model: nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same_state(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


@pytest.fixture
def parts():
    """A fresh tiny transformer + ControlNet, shaped like the pipeline's (`controlnet.nets[0]`)."""
    from diffusers import FluxMultiControlNetModel

    from core.demo_model import build_demo_components

    c = build_demo_components()
    tr, cn = c["transformer"].eval(), c["controlnet"].eval()
    return SimpleNamespace(transformer=tr, controlnet=FluxMultiControlNetModel([cn]), cn=cn)


def transformer_inputs(n=48, t=8, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    return dict(
        hidden_states=torch.randn(1, n, 64, generator=g, dtype=dtype),
        encoder_hidden_states=torch.randn(1, t, 32, generator=g, dtype=dtype),
        pooled_projections=torch.randn(1, 32, generator=g, dtype=dtype),
        timestep=torch.tensor([0.5]),
        guidance=torch.tensor([3.5]),
        img_ids=torch.zeros(n, 3),
        txt_ids=torch.zeros(t, 3),
        return_dict=False,
    )


# -- fp8 numerics -----------------------------------------------------------------------------------
def test_quantize_rows_scales_each_row_to_the_fp8_range():
    x = torch.randn(5, 64) * torch.tensor([1e-3, 1.0, 10.0, 300.0, 0.0])[:, None]
    q, s = fp8_compute.quantize_rows(x)
    assert q.dtype == torch.float8_e4m3fn and s.dtype == torch.float32 and s.shape == (5, 1)
    back = q.float() * s
    assert torch.isfinite(back).all() and back[4].abs().max() == 0  # an all-zero row stays zero
    for i in range(4):
        assert q[i].float().abs().max() == fp8_compute.FP8_MAX  # the row's largest value uses the range
        assert rel_err(back[i], x[i]) < 0.05


@pytest.mark.parametrize("shape", [(7, 64), (2, 5, 64), (1, 300, 64)])
@pytest.mark.parametrize("bias", [True, False])
def test_fp8_linear_is_close_to_the_bf16_matmul(shape, bias):
    torch.manual_seed(0)
    lin = nn.Linear(64, 48, bias=bias).to(torch.bfloat16)
    x = torch.randn(*shape, dtype=torch.bfloat16)
    ref = lin(x)
    f8 = fp8_compute.Fp8Linear(lin, scaled_mm=False)
    out = f8(x)
    assert out.shape == ref.shape == (*shape[:-1], 48) and out.dtype == torch.bfloat16
    assert rel_err(out, ref) < 0.06, "e4m3 keeps 3 mantissa bits; row scales keep the error at a few %"
    assert rel_err(out, ref) > 0, "it really is quantized"
    assert f8._original[0] is lin and not list(f8.children())  # the original is not a submodule


def test_fp8_linear_keeps_the_input_dtype_and_handles_float32():
    lin = nn.Linear(32, 16)
    x = torch.randn(3, 32)
    out = fp8_compute.Fp8Linear(lin, scaled_mm=False)(x)
    assert out.dtype == torch.float32 and rel_err(out, lin(x)) < 0.06


def test_fp8_linear_emulation_matches_the_real_scaled_mm():
    """The emulation computes what `_scaled_mm` computes: checked on the CPU where torch has the op."""
    torch.manual_seed(1)
    lin = nn.Linear(64, 48).to(torch.bfloat16)
    x = torch.randn(2, 9, 64, dtype=torch.bfloat16)
    try:
        real = fp8_compute.Fp8Linear(lin, scaled_mm=True, fast_accum=False)(x)
    except (RuntimeError, NotImplementedError) as e:
        pytest.skip(f"no fp8 _scaled_mm on this CPU build: {e}")
    emulated = fp8_compute.Fp8Linear(lin, scaled_mm=False)(x)
    assert rel_err(real, emulated) < 0.01


def test_fp8_linear_split_into_column_blocks_matches_the_whole_matmul():
    """A proj_out reading cat(a, b) computed per block of columns, each with its own row scales."""
    torch.manual_seed(2)
    lin = nn.Linear(96, 40).to(torch.bfloat16)
    a = torch.randn(3, 7, 32, dtype=torch.bfloat16)
    b = 20 * torch.randn(3, 7, 64, dtype=torch.bfloat16)  # a part with another range: its own scale
    x = torch.cat([a, b], dim=-1)
    split = fp8_compute.Fp8Linear(lin, scaled_mm=False, split=(32, 64))
    whole = fp8_compute.Fp8Linear(lin, scaled_mm=False)
    ref = lin(x)
    assert split(x).shape == ref.shape and rel_err(split(x), ref) < 0.06
    assert rel_err(split(x), ref) <= rel_err(whole(x), ref) * 1.5
    assert split.weight.shape == (40, 32) and split.weight1.shape == (40, 64) and split.weight1_scale.shape == (1, 40)
    try:
        real = fp8_compute.Fp8Linear(lin, scaled_mm=True, fast_accum=False, split=(32, 64))(x)
    except (RuntimeError, NotImplementedError):
        real = None  # no fp8 _scaled_mm on this CPU build
    if real is not None:
        assert rel_err(real, split(x)) < 0.01
    with pytest.raises(ValueError, match="does not add up to 96"):
        fp8_compute.Fp8Linear(lin, scaled_mm=False, split=(32, 32))


def test_fp8_supported_is_false_without_cuda():
    if torch.cuda.is_available():
        pytest.skip("reports the GPU's capability")
    assert fp8_compute.fp8_supported() is False


# -- whole models ----------------------------------------------------------------------------------
def test_fused_qkv_matches_unfused_costs_no_memory_and_unfuses_exactly(parts):
    tr = parts.transformer
    kw = transformer_inputs()
    before, n_params = state(tr), sum(p.numel() for p in tr.parameters())
    objects = {n: p for n, p in tr.named_parameters()}
    with torch.no_grad():
        ref = tr(**kw)[0]
        assert attention.fuse_qkv(tr) == 4 and attention.fuse_qkv(tr) == 0  # 2 double + 2 single blocks; idempotent
        out = tr(**kw)[0]
    attn = tr.transformer_blocks[0].attn
    assert attn.fused_projections and hasattr(attn, "to_added_qkv") and not hasattr(attn, "to_q")
    assert sum(p.numel() for p in tr.parameters()) == n_params  # the unfused copies are gone
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert attention.unfuse_qkv(tr) == 4
    assert not attn.fused_projections and not hasattr(attn, "to_qkv")
    assert same_state(state(tr), before)
    # the very Parameters again: what refers to them (a placement's kept sources, a file's fp8 source) still holds
    assert all(p is objects[n] for n, p in tr.named_parameters())


def test_fusing_frees_the_weights_a_placement_keeps_and_unfusing_gives_them_back():
    """Fusing empties the unfused q/k/v Parameters it sets aside (whoever still holds them holds no
    weights: on the GPU that was twice their memory), and unfusing puts those very Parameters back in
    the model (a LoRA merged into them unmerges by name); the placement's file-backed sources stay."""
    from core.plan.units import denoiser_units
    from core.stream.packs import file_backed, file_mappings
    from core.stream.residency import Residency
    from tests.core.byom_files import demo_transformer

    tr = demo_transformer()  # memory-mapped from its safetensors: file-backed
    units = denoiser_units(tr, None)
    maps = file_mappings()
    keep = [file_backed(m, maps) for _, m in units]
    assert all(keep)
    res = Residency(units, "B" * len(units), torch.device("cpu"), torch.float32, slots=0, ring=0, keep=keep)
    held = [p for _, m in units for p in m.parameters()]
    attention.fuse_qkv(tr)
    fused_away = [p for p in held if all(p is not q for q in tr.parameters())]
    assert len(fused_away) == 2 * 12 + 2 * 6 and all(p.numel() == 0 for p in fused_away)
    attention.unfuse_qkv(tr)
    assert all(any(p is q for q in tr.parameters()) for p in held)
    res.remove()


def test_quantize_fp8_swaps_block_linears_only_and_undoes_exactly(parts):
    tr = parts.transformer.to(torch.bfloat16)
    kw = transformer_inputs(dtype=torch.bfloat16)
    before = state(tr)
    with torch.no_grad():
        ref = tr(**kw)[0]
        attention.fuse_qkv(tr)
        n = fp8_compute.quantize_fp8(tr)
        out = tr(**kw)[0]
    # per double block: to_qkv, to_added_qkv, to_out.0, to_add_out, ff (2), ff_context (2) = 8;
    # per single block: to_qkv, proj_mlp, proj_out = 3
    assert n == 2 * 8 + 2 * 3 == fp8_compute.fp8_layers(tr)
    names = {name for name, m in tr.named_modules() if isinstance(m, fp8_compute.Fp8Linear)}
    assert "transformer_blocks.0.attn.to_qkv" in names and "single_transformer_blocks.1.proj_out" in names
    assert not any(".norm" in name for name in names), "modulation stays in bf16"
    assert isinstance(tr.x_embedder, nn.Linear) and isinstance(tr.proj_out, nn.Linear)
    assert isinstance(tr.transformer_blocks[0].norm1.linear, nn.Linear)
    assert rel_err(out, ref) < 0.1
    f8s = [m for m in tr.modules() if isinstance(m, fp8_compute.Fp8Linear)]
    weights = sum(m.out_features * m.in_features for m in f8s)
    scales = sum(m.out_features * len(m.split) for m in f8s)
    assert fp8_compute.fp8_bytes(tr) == weights + scales * 4 + sum(m.out_features for m in f8s) * 2
    proj_out = tr.single_transformer_blocks[0].proj_out  # reads cat(attention, MLP): one matmul per part
    assert proj_out.split == (32, 128) and fp8_compute.Fp8Linear(nn.Linear(8, 4), False).split == (8,)
    assert fp8_compute.dequantize_fp8(tr) == n and fp8_compute.fp8_layers(tr) == 0
    attention.unfuse_qkv(tr)
    assert same_state(state(tr), before)


def test_compiled_blocks_give_the_same_output_and_uncompile(parts):
    tr = parts.transformer
    kw = transformer_inputs()
    with torch.no_grad():
        ref = tr(**kw)[0]
        t0 = compile_seconds()
        assert fast.compile_blocks(tr, backend="eager") == 4
        assert fast.compile_blocks(tr, backend="eager") == 0  # already compiled
        assert all(fast.is_compiled(b) for b in fast.repeated_blocks(tr))
        out = tr(**kw)[0]
        assert compile_seconds() > t0, "the first call compiled (fullgraph)"
    torch.testing.assert_close(out, ref)
    assert fast.uncompile_blocks(tr) == 4 and not any(fast.is_compiled(b) for b in fast.repeated_blocks(tr))


def test_the_controlnet_blocks_are_found_without_repeated_blocks(parts):
    assert not getattr(parts.cn, "_repeated_blocks", None)
    assert len(fast.repeated_blocks(parts.cn)) == 2  # 1 double + 1 single
    assert fast.denoisers(parts) == (parts.transformer, parts.cn)


def test_apply_fast_is_idempotent_and_undo_fast_restores_every_bit(parts):
    before = (state(parts.transformer), state(parts.cn))
    got = fast.apply_fast(parts, fp8=True, compile=True, backend="eager")
    assert got == fast.Fast(
        fused=True, compiled=True, fp8=True, attention="sdpa", fp8_layers=22 + 11, compiled_blocks=6, fused_blocks=True
    )
    assert "fp8 compute (33 layers)" in got.label() and "fused QKV" in got.label()
    again = fast.apply_fast(parts, fp8=True, compile=True, backend="eager")
    assert again == got and fp8_compute.fp8_layers(parts.transformer) == 22
    off = fast.apply_fast(parts, fp8=False, compile=True, backend="eager")  # fp8 off, the rest stays
    assert not off.fp8 and off.fp8_layers == 0 and off.fused and off.compiled
    fast.undo_fast(parts)
    assert same_state(state(parts.transformer), before[0]) and same_state(state(parts.cn), before[1])
    assert not any(fast.is_compiled(b) for m in fast.denoisers(parts) for b in fast.repeated_blocks(m))


def test_attention_choice_is_per_processor_and_resolves_on_the_cpu(parts):
    from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry

    active = _AttentionBackendRegistry.get_active_backend()[0]
    attention.set_attention(parts.transformer, "cudnn")
    procs = {a.processor._attention_backend for a in attention.attentions(parts.transformer)}
    assert procs == {AttentionBackendName._NATIVE_CUDNN}
    assert _AttentionBackendRegistry.get_active_backend()[0] == active  # nothing process-wide
    attention.set_attention(parts.transformer, "sdpa")
    assert {a.processor._attention_backend for a in attention.attentions(parts.transformer)} == {None}
    assert attention.resolve_attention("auto", "cpu") == "sdpa"
    with pytest.raises(ValueError, match="attention"):
        attention.resolve_attention("fast", "cpu")


# -- decisions -------------------------------------------------------------------------------------
def plan(device="cuda", placement="BBBB", dtype="bfloat16", tier="48"):
    from core.plan.placement import Placement

    return SimpleNamespace(device=device, placement=Placement(placement, dtype), dtype=dtype, tier=tier)


def test_the_fast_path_needs_every_unit_resident_on_the_gpu():
    cfg = fast.FastConfig()
    assert fast.eligible(plan(), cfg)
    assert not fast.eligible(plan(placement="BBSB"), cfg) and not fast.eligible(plan(placement="BFBB"), cfg)
    assert not fast.eligible(plan(device="cpu"), cfg)
    assert not fast.eligible(plan(), fast.FastConfig(enabled=False))


def test_fp8_decision_says_why_it_was_ignored(monkeypatch):
    cfg = fast.FastConfig()
    assert fast.fp8_decision(plan(), cfg, wanted=False) == (False, None)
    use, why = fast.fp8_decision(plan(placement="BSSB", tier="16"), cfg, wanted=True)
    assert not use and "ignored" in why and "16 GB" in why and "resident" in why
    use, why = fast.fp8_decision(plan(device="cpu", dtype="float32", tier="cpu"), cfg, wanted=True)
    assert not use and "CPU" in why
    use, why = fast.fp8_decision(plan(dtype="float32"), cfg, wanted=True)
    assert not use and "float32" in why
    monkeypatch.setattr(fp8_compute, "fp8_supported", lambda index=0: False)
    use, why = fast.fp8_decision(plan(device="cpu", tier="cpu"), fast.FastConfig(devices=("cpu",)), wanted=True)
    assert not use and "8.9" in why
    monkeypatch.setattr(fp8_compute, "fp8_supported", lambda index=0: True)
    assert fast.fp8_decision(plan(device="cpu", tier="cpu"), fast.FastConfig(devices=("cpu",)), True) == (True, None)


# -- the Job field ---------------------------------------------------------------------------------
def test_job_fp8_compute_is_a_validated_bool_that_round_trips(astronaut):
    job = Job("x", astronaut, (ControlSpec("canny"),), 64, 64, fp8_compute=True)
    assert job.fp8_compute is True and job.describe()["fp8_compute"] is True
    assert Job("x", astronaut, (ControlSpec("canny"),), 64, 64).fp8_compute is False
    for bad in ("yes", 1, None, 0.0):
        with pytest.raises(ValueError, match="fp8_compute"):
            Job("x", astronaut, (ControlSpec("canny"),), 64, 64, fp8_compute=bad)
    d = job.describe()
    rebuilt = Job(
        image=astronaut,
        controls=tuple(
            ControlSpec(c["kind"], c["scale"], c["start"], c["end"], tuple(c["params"].items()))
            for c in d.pop("controls")
        ),
        **d,
    )
    assert rebuilt == job


# -- the engine ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def job(astronaut):
    return Job(
        "an astronaut portrait", astronaut, (ControlSpec("canny", 0.7, end=1.0),), W, H, steps=2, seed=3, tier="cpu"
    )


def px(image):
    return np.asarray(image, dtype=np.int16)


def test_engine_ignores_fp8_on_a_cpu_plan_and_says_so(demo_engine, job):
    plain = demo_engine.run(job)
    r = demo_engine.run(job.with_(fp8_compute=True))
    notes = [e for e in r.events if "fp8 compute was ignored" in e]
    assert len(notes) == 1 and "CPU" in notes[0], r.events
    assert r.summary()["fast"] is None and "fast" not in r.report
    assert np.array_equal(px(r.image), px(plain.image))


@pytest.fixture
def cpu_fast_engine(monkeypatch):
    """An engine whose fast path also applies to CPU plans (compiled with the "eager" backend), with
    the fp8 matmul emulated: the wiring of the GPU path, on the CPU."""
    engine = Engine(ModelSpec.demo_spec())
    engine.load()
    engine.fast = fast.FastConfig(devices=("cuda", "cpu"), backend="eager")
    bf16 = engine.plan
    monkeypatch.setattr(engine, "plan", lambda job, tier=None: bf16(job, tier, dtype="bfloat16"))
    monkeypatch.setattr(fp8_compute, "fp8_supported", lambda index=0: True)
    return engine


def test_engine_fast_path_fp8_toggles_and_undoes_exactly(cpu_fast_engine, job, monkeypatch):
    engine = cpu_fast_engine
    pipe = engine.pipe
    engine.apply(engine.plan(job))  # placed (cast to bf16), not yet fast
    before = state(pipe.transformer)
    graphs = counters["stats"]["unique_graphs"]
    r1 = engine.run(job)
    # one graph per block class serves the transformer and the ControlNet (whose text is one token
    # longer), first and later single blocks alike
    assert counters["stats"]["unique_graphs"] - graphs == 2
    f = r1.report["fast"]
    assert f["fused"] and f["compiled"] and not f["fp8"] and f["attention"] == "sdpa"
    assert f["compile_s"] > 0 and any("compiled the denoiser blocks" in e for e in r1.events), r1.events
    assert r1.summary()["fast"] == f
    applied = []
    monkeypatch.setattr(fast, "apply_fast", lambda *a, _f=fast.apply_fast, **k: applied.append(1) or _f(*a, **k))
    r2 = engine.run(job)  # nothing recompiles for the same job
    assert not applied, "an unchanged fast path is not walked again"
    assert r2.report["fast"]["compile_s"] < 0.5 and not any("compiled" in e for e in r2.events)
    assert np.array_equal(px(r2.image), px(r1.image))
    engine.run(job.with_(width=160, controls=(ControlSpec("canny", end=0.5), ControlSpec("gray"))))
    assert counters["stats"]["unique_graphs"] - graphs == 2, "a new size, two controls, a skip: no recompile"
    r8 = engine.run(job.with_(fp8_compute=True))
    assert r8.report["fast"]["fp8"] and r8.report["fast"]["fp8_layers"] == 33
    assert any(e.startswith("fp8 compute: 33 block matmuls") for e in r8.events), r8.events
    diff = np.abs(px(r8.image) - px(r1.image)).mean()
    assert 0 < diff < 40, diff
    back = engine.run(job)  # fp8 off: the bf16 weights came back exactly
    assert not back.report["fast"]["fp8"] and np.array_equal(px(back.image), px(r1.image))
    engine.release()  # what a streamed plan does first
    assert engine.state.fast is None and same_state(state(pipe.transformer), before)
    assert not any(fast.is_compiled(b) for b in fast.repeated_blocks(pipe.transformer))


def test_engine_cuda_graphs_replay_the_denoiser_calls_and_give_the_same_image(cpu_fast_engine, job, monkeypatch):
    from dataclasses import replace

    from core.speed import graphs
    from tests.core.test_graphs import fake_capture

    engine = cpu_fast_engine
    plain = engine.run(job.with_(steps=4))
    monkeypatch.setattr(graphs.Pool, "capture", lambda self, run: fake_capture(run))
    engine.fast = replace(engine.fast, cuda_graphs=True)
    r = engine.run(job.with_(steps=4))
    cn, tr = graphs.installed(engine.pipe.controlnet), graphs.installed(engine.pipe.transformer)
    assert r.report["fast"]["cuda_graphs"] and "CUDA graphs" in engine.state.fast.label()
    assert (cn.replays, tr.replays) == (3, 3), "step 1 eager; step 2 captured; steps 2-4 replayed"
    assert np.array_equal(px(r.image), px(plain.image))
    engine.run(job.with_(steps=4, fp8_compute=True))  # new weights: the old graphs are gone
    assert graphs.installed(engine.pipe.transformer) is not tr and tr.graphs == {}
    engine.release()
    assert graphs.installed(engine.pipe.transformer) is None and "forward" not in vars(engine.pipe.transformer)


def test_engine_runs_without_compiling_when_compilation_fails(cpu_fast_engine, job):
    def broken(gm, example_inputs):
        raise RuntimeError("no compiler here")

    engine = cpu_fast_engine
    engine.fast = fast.FastConfig(devices=("cuda", "cpu"), backend=broken)
    r = engine.run(job)
    assert any(e.startswith("torch.compile failed") for e in r.events), r.events
    assert engine.fast_in_use.compile == "off" and not r.report["fast"]["compiled"]
    assert px(r.image).std() > 1


def test_engine_drops_the_fast_path_when_a_kernel_fails(cpu_fast_engine, job, monkeypatch):
    def refuse(compiled, *args, **kwargs):
        raise RuntimeError("cuDNN refused these shapes")

    monkeypatch.setattr(fast, "_same_form", refuse)
    engine = cpu_fast_engine
    r = engine.run(job)
    assert any(e.startswith("the fast path failed (cuDNN refused") for e in r.events), r.events
    assert not engine.fast_in_use.enabled and r.report.get("fast") is None and engine.state.fast is None
    assert not any(fast.is_compiled(b) for b in fast.repeated_blocks(engine.pipe.transformer))
    assert px(r.image).std() > 1
