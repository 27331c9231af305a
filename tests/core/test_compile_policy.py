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


# -- what the compiling job says: from torch's own counters -------------------------------------------
def test_the_wording_says_cache_hit_only_when_the_disk_cache_served_every_graph():
    C = compile_policy.Counters
    hit = compile_policy.compiled_event(C(seconds=2.4, graphs=2, hits=4))
    assert hit.startswith("compiled the denoiser blocks (cache hit, 2.4 s"), hit
    for cold in (C(seconds=21.0, graphs=2, misses=4), C(seconds=12.0, graphs=2, hits=2, misses=2)):
        assert compile_policy.compiled_event(cold).startswith("compiled the denoiser blocks in "), cold
    assert compile_policy.compiled_event(C(seconds=0.6, graphs=2)).startswith("compiled the denoiser blocks in 0.6 s")
    assert compile_policy.compiled_event(C()) is None  # nothing compiled: nothing to say
    assert (C(seconds=3.0, graphs=2, hits=5) - C(seconds=1.0, hits=1)) == C(2.0, 2, 4, 0)


def test_the_counters_are_read_from_torch(monkeypatch):
    from torch._dynamo.utils import counters

    before = compile_policy.Counters.now()
    for group, key, n in (("inductor", "fxgraph_cache_hit", 2), ("aot_autograd", "autograd_cache_hit", 2)):
        monkeypatch.setitem(counters[group], key, counters[group][key] + n)
    monkeypatch.setitem(counters["stats"], "unique_graphs", counters["stats"]["unique_graphs"] + 2)
    done = compile_policy.Counters.now() - before
    assert (done.graphs, done.hits, done.misses, done.cache) == (2, 4, 0, "hit")
    monkeypatch.setitem(counters["inductor"], "fxgraph_cache_miss", counters["inductor"]["fxgraph_cache_miss"] + 1)
    assert (compile_policy.Counters.now() - before).cache == "miss"


def test_the_compiling_job_says_cache_hit_when_inductor_found_its_graphs(monkeypatch, later_engine, job):
    from dataclasses import replace

    from torch._dynamo.utils import counters

    def cached(gm, example_inputs):  # Inductor's disk cache answering, as torch counts it
        counters["inductor"]["fxgraph_cache_hit"] += 1
        return gm.forward

    monkeypatch.setitem(counters["inductor"], "fxgraph_cache_hit", counters["inductor"]["fxgraph_cache_hit"])
    later_engine.fast = replace(later_engine.fast, backend=cached)
    later_engine.run(job)
    second = later_engine.run(job)
    assert second.report["fast"]["compile_cache"] == "hit"
    said = compiled_events(second)
    assert len(said) == 1 and said[0].startswith("compiled the denoiser blocks (cache hit, "), second.events
    plain = later_engine.run(job.with_(width=112))  # nothing new compiled: no sentence
    assert not compiled_events(plain) and plain.report["fast"]["compile_cache"] is None
