"""A process's first image predicted (core.plan.first_job): the weights read and placed, the compile
only where that job compiles, the prompt, the denoising and the VAE; pure, whatever the caller knows."""

from dataclasses import replace

import pytest

from core.device import DeviceInfo, GiB
from core.engine import Engine
from core.job import ControlSpec, Job
from core.models import ModelSpec
from core.plan import JobShape, keep_placement, plan_for
from core.plan.first_job import COMPILE_COLD_S, COMPILE_WARM_S, DISK_GBPS, FILE_BYTES, first_job_parts
from core.plan.sizes import sizes_from_config
from core.speed import compile_cache
from core.speed.fast import FastConfig

GPU = DeviceInfo("cuda", "test GPU", 80.0, 80.0, True, 128.0, 25.0, 150.0)
SHAPE = JobShape(1024, 1024, 1)


@pytest.fixture(scope="module")
def full():
    return sizes_from_config("full")


def parts(plan) -> dict:
    return dict(plan.first_job_parts)


def test_the_total_is_its_parts_and_includes_the_denoising(full):
    p = plan_for("48", SHAPE, full, GPU)
    got = parts(p)
    assert list(got) == ["read", "place", "compile", "encode", "denoise", "vae"]
    assert got["denoise"] == p.predicted_job_s and got["compile"] == 0
    assert p.predicted_first_job_s == pytest.approx(sum(got.values()), abs=0.06)
    assert all(v > 0 for k, v in got.items() if k != "compile")
    assert p.summary()["first_job_parts"] == got and p.summary()["predicted_first_job_s"] == p.predicted_first_job_s
    cpu = plan_for("cpu", SHAPE, full, GPU)
    assert cpu.predicted_first_job_s == 0 and cpu.first_job_parts == ()  # no time model on the CPU


def test_the_prediction_grows_with_the_weight_bytes(full):
    p = plan_for("48", SHAPE, full, GPU).placement
    base = dict(first_job_parts(1024, 1024, 1, 1.0, full, p, GPU, 7.0))
    more = replace(full, fixed_params=full.fixed_params + 10**9)  # a billion more resident parameters
    grown = dict(first_job_parts(1024, 1024, 1, 1.0, more, p, GPU, 7.0))
    assert grown["read"] - base["read"] == pytest.approx(10**9 * FILE_BYTES / (DISK_GBPS * GiB), abs=0.01)
    assert grown["place"] - base["place"] == pytest.approx(10**9 * 2 / (GPU.h2d_gbps * GiB), abs=0.01)
    slow_bus = dict(first_job_parts(1024, 1024, 1, 1.0, full, p, replace(GPU, h2d_gbps=12.5), 7.0))
    assert slow_bus["place"] == pytest.approx(2 * base["place"], rel=0.02)
    tiny = plan_for("48", SHAPE, sizes_from_config("tiny"), GPU)
    assert parts(tiny)["read"] < base["read"] / 100


def test_the_compile_counts_only_when_the_job_compiles_on_the_fast_path(full):
    eager = plan_for("48", SHAPE, full, GPU)
    cold = plan_for("48", SHAPE, full, GPU, compiles=True)
    warm = plan_for("48", SHAPE, full, GPU, compiles=True, compile_cache="kernels")
    assert eager.placement.all_resident
    assert cold.predicted_first_job_s - eager.predicted_first_job_s == pytest.approx(COMPILE_COLD_S, abs=0.1)
    assert warm.predicted_first_job_s - eager.predicted_first_job_s == pytest.approx(COMPILE_WARM_S, abs=0.1)
    loaded = plan_for("48", SHAPE, full, GPU, compiles=True, compile_cache="artifacts")  # saved graphs load
    assert eager.predicted_first_job_s < loaded.predicted_first_job_s < warm.predicted_first_job_s
    streamed = plan_for("8", SHAPE, full, GPU, compiles=True)  # a streamed plan never compiles
    assert not streamed.placement.all_resident and parts(streamed)["compile"] == 0
    assert cold.placement == eager.placement and cold.predicted_job_s == eager.predicted_job_s  # the plan is the same


def test_more_pixels_and_upscaling_take_longer(full):
    small, big = (plan_for("48", JobShape(w, w, 1), full, GPU) for w in (512, 1024))
    assert parts(big)["vae"] > 3 * parts(small)["vae"] and big.predicted_first_job_s > small.predicted_first_job_s
    up = plan_for("48", JobShape(1024, 1024, 1, 2.0), full, GPU)
    assert parts(up)["vae"] > 4 * parts(big)["vae"]


def test_a_kept_placement_keeps_the_compile_of_the_plan(full):
    shape = JobShape(1024, 1024, 1)
    prev = plan_for("48", shape, full, GPU, compiles=True)
    new = plan_for("48", JobShape(1024, 1024, 2), full, GPU, compiles=True)
    kept = keep_placement(prev, new, JobShape(1024, 1024, 2), full, GPU)
    assert parts(kept)["compile"] == COMPILE_COLD_S


def test_the_engine_plans_the_compile_its_policy_gives_a_first_job(monkeypatch, tmp_path, astronaut):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "empty"))  # a cold cache
    job = Job("x", astronaut, (ControlSpec("canny"),), 512, 512, tier="auto")

    def first_compile(policy, choice="auto"):
        engine = Engine(ModelSpec.demo_spec(), device=GPU, fast_config=FastConfig(compile=policy))
        return parts(engine.plan(job.with_(compile=choice)))["compile"]

    assert first_compile("later") == 0  # the app: the first job runs eager
    assert first_compile("on") == COMPILE_COLD_S  # the CLI with --compile
    assert first_compile("off") == 0 and first_compile("later", "always") == COMPILE_COLD_S
    (tmp_path / "empty" / "fxgraph" / "ab").mkdir(parents=True)  # kernels stored before
    assert compile_cache.has_kernels() and first_compile("on") == COMPILE_WARM_S
