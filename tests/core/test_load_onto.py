"""Where the weights are read: straight onto the GPU for a first plan that keeps every one of them
there as stored (no copy in host RAM, one pass over the files), onto the CPU otherwise."""

from __future__ import annotations

import pytest
import torch

from core.attempts import DeviceLimit
from core.device import DeviceInfo
from core.engine import Engine, shape_of
from core.job import ControlSpec, Job
from core.lora import LoraSpec
from core.models import ModelSpec
from core.placed import read_onto
from core.plan.planner import JobShape, plan_for
from core.plan.sizes import sizes_from_config, sizes_from_folders

H200 = DeviceInfo("cuda", "H200", 139.8, 139.0, True, 120.0, 50.9, 780.0, context_gb=0.82)


def test_sizes_from_the_configs_equal_the_loaded_pipelines(demo_engine):
    spec = ModelSpec.demo_spec()
    assert sizes_from_folders(spec.base, spec.controlnet, demo_engine.max_seq) == demo_engine.sizes


def test_only_a_plan_keeping_every_weight_on_the_gpu_as_stored_reads_onto_it():
    full, shape = sizes_from_config("full"), JobShape(1024, 1024)
    assert read_onto(plan_for("48", shape, full, H200)) == "cuda"
    assert read_onto(plan_for("24", shape, full, H200)) == "cpu"  # streams: packed from host RAM
    assert read_onto(plan_for("8", shape, full, H200, precision="exact")) == "cpu"  # fp8: packed on the CPU
    assert read_onto(plan_for("48", shape, full, H200, dtype="float32")) == "cpu"
    cpu = DeviceInfo("cpu", "CPU", 0.0, 0.0, True, 64.0)
    assert read_onto(plan_for("cpu", shape, full, cpu)) == "cpu"


@pytest.fixture()
def first_job_on_an_h200(monkeypatch):
    """A fresh engine for a full-size model on an H200, recording where it is asked to read the weights."""
    import core.engine as engine_mod

    monkeypatch.setenv("FLUX_ANYVRAM_DIRECT_READ", "1")
    engine = Engine(ModelSpec("/models/flux", "/models/union"), device=H200)
    reads = []
    monkeypatch.setattr(engine_mod, "sizes_from_folders", lambda base, cn: sizes_from_config("full"))
    monkeypatch.setattr(engine, "check_fits", lambda plan: None)
    monkeypatch.setattr(engine, "_visible_gb", lambda plan: 139.0)
    monkeypatch.setattr(engine.state, "load", lambda onto="cpu": reads.append(onto))
    return engine, reads


def job(image, tier, **kw):
    return Job("a photo", image, (ControlSpec("canny"),), 1024, 1024, steps=28, tier=tier, **kw)


def load_for(engine, job):
    """What Engine.run does first."""
    engine.load_for(job.tier, shape_of(job), job.precision, job.compile, job.loras)


def test_the_first_job_reads_onto_the_gpu_where_its_plan_keeps_the_weights(first_job_on_an_h200, astronaut, tmp_path):
    engine, reads = first_job_on_an_h200
    (tmp_path / "style.safetensors").write_bytes(b"")
    load_for(engine, job(astronaut, "8"))  # streamed: read onto the CPU by the usual path
    load_for(engine, job(astronaut, "48", loras=(LoraSpec(str(tmp_path / "style.safetensors")),)))  # merged on the CPU
    assert reads == []
    load_for(engine, job(astronaut, "48"))
    load_for(engine, job(astronaut, "auto"))  # 'auto' on an H200 is the all-resident plan
    assert reads == ["cuda", "cuda"]


def test_reading_onto_the_gpu_is_off_unless_asked(first_job_on_an_h200, astronaut, monkeypatch):
    engine, reads = first_job_on_an_h200
    monkeypatch.delenv("FLUX_ANYVRAM_DIRECT_READ")
    load_for(engine, job(astronaut, "48"))
    assert reads == []


def test_out_of_memory_while_reading_onto_the_gpu_falls_back_and_teaches_the_limit(
    first_job_on_an_h200, astronaut, monkeypatch
):
    engine, reads = first_job_on_an_h200

    def load(onto="cpu"):
        reads.append(onto)
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 100.00 MiB. GPU 0 has a total capacity")

    monkeypatch.setattr(engine.state, "load", load)
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda *a: int(23.4 * 2**30))
    load_for(engine, job(astronaut, "48"))  # no exception: the usual path reads onto the CPU next
    assert reads == ["cuda"] and engine.state.pipe is None
    assert engine.limit == DeviceLimit(23.5, 139.0, "48")
