"""A LoRA change on a placement whose fp8 and 4-bit packs rounded the weights (nothing kept to give
back): only the touched units are packed again, from the model's files, and the images are those of
a placement made with the new LoRAs from the start. The prefetch order survives a re-pack."""

import numpy as np
import pytest
import torch

import core.placed
from core.engine import Engine
from core.job import ControlSpec, Job, LoraSpec
from core.models import ModelSpec
from core.plan.units import denoiser_units
from core.stream.residency import Residency
from tests.core.byom_files import peft_lora
from tests.core.test_lora import px, streamed_engine
from tests.core.test_residency import run, tiny_denoiser


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("loras")
    return dict(a=peft_lora(d / "a.safetensors", seed=1), b=peft_lora(d / "b.safetensors", seed=2, rank=2, alpha=2.0))


@pytest.fixture(scope="module")
def job(astronaut):
    return Job("an astronaut portrait", astronaut, (ControlSpec("canny"),), 64, 64, steps=2, seed=3, tier="cpu")


@pytest.fixture
def rounded(monkeypatch):
    """Placements that keep no file-backed weights: lossy packs round them, as with weights that were
    not memory-mapped (converted on load, or built in memory)."""
    monkeypatch.setattr(core.placed, "file_mappings", lambda: [])


def test_a_lora_switch_on_rounded_fp8_and_4bit_packs_repacks_only_touched_units(rounded, monkeypatch, job, files):
    engine = streamed_engine(monkeypatch, "BSQFRN")
    a, b = LoraSpec(str(files["a"]), 0.8), LoraSpec(str(files["b"]), 0.5)
    base = px(engine.run(job))
    res = engine.state.residency
    assert not any(res.keep) and {"F", "Q", "R", "N"} <= set(res.placement)
    order = list(res.schedule.order)
    seen = []
    for loras in ((a,), (b,), (b, a), (LoraSpec(b.path, -0.5),), ()):
        image = px(engine.run(job.with_(loras=loras)))
        assert engine.state.residency is res, "the placement stayed"
        done, total, _ = engine.state.last_repack
        assert 0 < done < total
        assert res.schedule.order == order, "the learned prefetch order survives the re-pack"
        seen.append((loras, image))
    assert np.array_equal(seen[-1][1], base), "no LoRA again: the image without one"
    engine.release()
    for loras, image in seen[:-1]:
        fresh = streamed_engine(monkeypatch, "BSQFRN")
        assert np.array_equal(image, px(fresh.run(job.with_(loras=loras)))), f"as if placed with {loras}"
        fresh.release()
    assert not np.array_equal(seen[0][1], base)


def test_without_source_files_a_rounded_placement_is_made_again(rounded, monkeypatch, job, files):
    own = Engine(ModelSpec.demo_spec())
    own.load()  # not the session's engine: this placement rounds the pipeline's weights for good
    eng = Engine(ModelSpec.demo_spec(), pipe=own.pipe)  # the caller's pipeline: no files to read
    real = eng.plan
    monkeypatch.setattr(eng, "plan", lambda j, tier=None, dtype=None: _streamed(real(j, tier, dtype), "BQF"))
    base = px(eng.run(job))
    assert eng.state.lora is None or eng.state.lora.sources == {}
    styled = px(eng.run(job.with_(loras=(LoraSpec(str(files["a"]), 0.8),))))
    assert eng.state.last_repack is None, "nothing exact to pack the fp8 units again from: placed again"
    assert not np.array_equal(styled, base)
    eng.release()


def _streamed(plan, codes):
    from dataclasses import replace

    from core.plan.placement import Placement

    n = len(plan.placement.units)
    return replace(plan, placement=Placement((codes * n)[:n], plan.dtype, "cpu", slots=2, ring=4))


def transformer_step(tr, seed=1):
    """One transformer pass without the ControlNet: a unit order other than the placement's."""
    g = torch.Generator().manual_seed(seed)
    img_ids = torch.zeros(64, 3)
    img_ids[:, 1], img_ids[:, 2] = torch.arange(64) // 8, torch.arange(64) % 8
    with torch.no_grad():
        return tr(
            hidden_states=torch.randn(1, 64, 64, generator=g),
            timestep=torch.full((1,), 0.5),
            guidance=torch.full((1,), 3.5),
            pooled_projections=torch.randn(1, 32, generator=g),
            encoder_hidden_states=torch.randn(1, 8, 32, generator=g),
            txt_ids=torch.zeros(8, 3),
            img_ids=img_ids,
            return_dict=False,
        )[0]


def test_the_learned_order_and_the_counts_survive_a_repack():
    tr, cn = tiny_denoiser()
    units = denoiser_units(tr, cn)
    res = Residency(units, ("SQ" * len(units))[: len(units)], torch.device("cpu"), torch.float32, slots=2, ring=4)
    default = list(res.schedule.order)
    transformer_step(tr)
    res.end_step()
    learned = list(res.schedule.order)
    assert learned != default and set(learned) < set(default), "the step ran the transformer's units only"
    counted = dict(res.stats)
    touched = [i for i, (n, _) in enumerate(units) if n.startswith("transformer.transformer_blocks.0.")]
    res.take_back(touched)
    res.put_back(touched)
    assert res.schedule.order == learned and res.stats["misses"] == counted["misses"]
    transformer_step(tr)
    assert res.stats["misses"] == counted["misses"], "every unit was prefetched in the learned order"
    res.remove()
    assert run(tr, cn, "cpu").isfinite().all()
