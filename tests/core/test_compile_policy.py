"""When the blocks compile, by what pays back: the CLI's one job is not delayed by a compile it cannot
earn back (off unless --compile), a long-lived engine's first job runs eager and its second compiles
("later"), a job's own choice overrides the policy; compiled kernels are cached under the cache root."""

import os

import pytest
import torch

from core import __main__ as cli
from core.engine import Engine
from core.job import ControlSpec, Job
from core.models import ModelSpec
from core.speed import compile_cache, compile_policy
from core.speed.compile_policy import compiles
from core.speed.fast import FastConfig


def test_cli_generate_compiles_only_when_asked(monkeypatch, tmp_path):
    seen = {}

    class Stop(Exception):
        pass

    class FakeEngine:
        def __init__(self, spec, fast_config=None):
            seen["compile"] = fast_config.compile
            raise Stop

    import core.engine

    monkeypatch.setattr(core.engine, "Engine", FakeEngine)
    args = ["generate", "--demo", "--image", "assets/astronaut.png", "--prompt", "x", "--out", str(tmp_path / "o.png")]
    for extra, want in (([], "off"), (["--compile"], "on"), (["--no-compile"], "off")):
        try:
            cli.main(args + extra)
        except Stop:
            pass
        assert seen.pop("compile") == want, extra


def test_compile_cache_lives_under_the_cache_root_unless_set(monkeypatch, tmp_path):
    monkeypatch.setenv("FLUX_ANYVRAM_CACHE", str(tmp_path))
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    assert compile_cache.use_persistent_cache() == tmp_path / "torch-compile"
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "torch-compile")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))
    assert compile_cache.use_persistent_cache() == tmp_path / "mine"


def test_the_policy_decides_by_job_count_and_the_job_overrides_it():
    assert [compiles("later", "auto", n) for n in (0, 1, 5)] == [False, True, True]
    assert [compiles("on", "auto", n) for n in (0, 1)] == [True, True]
    assert [compiles("off", "auto", n) for n in (0, 1)] == [False, False]
    for policy in compile_policy.POLICIES:
        assert compiles(policy, "always", 0) and not compiles(policy, "never", 3)
    assert compile_policy.deferred("later", "auto", 0) and not compile_policy.deferred("later", "auto", 1)
    assert not compile_policy.deferred("later", "always", 0) and not compile_policy.deferred("off", "auto", 0)


def test_fast_config_takes_a_policy_or_a_bool():
    assert FastConfig().compile == "on"
    assert FastConfig(compile=True).compile == "on" and FastConfig(compile=False).compile == "off"
    assert FastConfig(compile="later").compile == "later"
    with pytest.raises(ValueError, match="compile must be one of off, on, later"):
        FastConfig(compile="sometimes")


def test_a_long_lived_engine_compiles_later_unless_on_zerogpu(monkeypatch):
    monkeypatch.delenv("SPACES_ZERO_GPU", raising=False)
    assert Engine(ModelSpec.demo_spec()).fast.compile == "later"
    monkeypatch.setenv("SPACES_ZERO_GPU", "1")
    assert Engine(ModelSpec.demo_spec()).fast.compile == "off"


def test_a_job_refuses_an_unknown_compile_choice(astronaut):
    with pytest.raises(ValueError, match="compile must be one of auto, always, never"):
        Job("x", astronaut, (ControlSpec("canny"),), 64, 64, compile="sometimes")


@pytest.fixture
def later_engine():
    """The web app's engine, its fast path also on CPU plans (compiled with the "eager" backend)."""
    torch._dynamo.reset()
    engine = Engine(
        ModelSpec.demo_spec(), fast_config=FastConfig(compile="later", devices=("cuda", "cpu"), backend="eager")
    )
    engine.load()
    yield engine
    engine.release()
    torch._dynamo.reset()


@pytest.fixture(scope="module")
def job(astronaut):
    return Job("an astronaut portrait", astronaut, (ControlSpec("canny", 0.7, end=1.0),), 96, 64, steps=2, tier="cpu")


def compiled_events(result) -> list[str]:
    return [e for e in result.events if e.startswith("compiled the denoiser blocks")]


def test_the_first_job_runs_eager_and_the_second_compiles(later_engine, job):
    first = later_engine.run(job)
    assert not first.report["fast"]["compiled"] and first.report["fast"]["compiled_blocks"] == 0
    assert compile_policy.DEFERRED in first.events and not compiled_events(first), first.events
    second = later_engine.run(job)
    assert second.report["fast"]["compiled"] and second.report["fast"]["compiled_blocks"] > 0
    assert len(compiled_events(second)) == 1 and compile_policy.DEFERRED not in second.events, second.events
    third = later_engine.run(job)  # compiled once: nothing more to say
    assert (
        third.report["fast"]["compiled"] and not compiled_events(third) and compile_policy.DEFERRED not in third.events
    )
    assert later_engine.fast_jobs == 3


def test_a_job_choice_overrides_the_policy(later_engine, job):
    always = later_engine.run(job.with_(compile="always"))  # the first job, compiled as asked
    assert always.report["fast"]["compiled"] and compile_policy.DEFERRED not in always.events
    never = later_engine.run(job.with_(compile="never"))
    assert not never.report["fast"]["compiled"] and compile_policy.DEFERRED not in never.events
