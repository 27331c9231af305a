"""Engines as Ray Serve replicas (core.remote; Ray is optional, the tests skip without it): two CPU
replicas of the demo model behind a RemoteEngine; 16 concurrent jobs spread over both, all complete,
each equal to one local engine's image."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("ray.serve", reason="Ray Serve is optional: pip install 'ray[serve]'")

from core.engine import Engine
from core.job import ControlSpec, Job
from core.models import ModelSpec
from core.remote import RemoteEngine, deployment

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def remote():
    import ray
    from ray import serve

    path = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": {"PYTHONPATH": path}})
    try:
        spec = ModelSpec.demo_spec()
        handle = serve.run(deployment(spec, 2, 2, 0), name="flux-test", route_prefix=None)
        yield RemoteEngine(handle, spec, 2)
    finally:
        serve.shutdown()
        ray.shutdown()


def test_sixteen_jobs_spread_over_two_replicas_and_match_one_engine(remote, astronaut):
    jobs = [
        Job("an astronaut", astronaut, (ControlSpec("canny"),), 64, 64, steps=2, seed=s, tier="cpu") for s in range(16)
    ]
    with ThreadPoolExecutor(16) as ex:
        results = list(ex.map(remote.run, jobs))
    ran_on = {r.events[-1] for r in results}
    assert len(ran_on) == 2 and all(e.startswith("ran on replica ") for e in ran_on), ran_on
    single = Engine(ModelSpec.demo_spec())
    for j, r in zip(jobs, results):
        assert np.array_equal(np.asarray(r.image), np.asarray(single.run(j).image)), j.seed


def test_the_page_runs_over_the_replicas(remote):
    from ui import create_demo

    demo = create_demo(remote)
    gen = next(f for f in demo.fns.values() if f.api_name == "generate")
    assert gen.concurrency_limit == 2
    assert remote.device.kind == "cpu" and remote.sizes is not None


def test_the_app_serves_its_page_over_ray_replicas(remote, monkeypatch):
    import app
    import core.remote

    asked = []
    monkeypatch.setattr(core.remote, "start", lambda *a: asked.append(a) or remote)
    assert app.build_engine(app.parse_args(["--ray", "--demo", "--gpus", "2"])) is remote
    assert asked[0][1:] == (2, None, None, 0.0)
    with pytest.raises(ValueError, match="--gpus all needs GPUs on this machine"):
        app.build_engine(app.parse_args(["--ray", "--demo", "--gpus", "all"]))
