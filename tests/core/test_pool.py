"""Several engines in one process (core.pool): jobs spread over them, each result the one a single
engine gives. On the CPU with the demo model; on a multi-GPU machine the same code runs one engine
per GPU."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from core.engine import Engine
from core.job import ControlSpec, Job
from core.models import ModelSpec
from core.pool import EnginePool, build_pool


@pytest.fixture(scope="module")
def pool():
    return build_pool(ModelSpec.demo_spec(), replicas=2)


def job(image, seed):
    return Job("an astronaut", image, (ControlSpec("canny"),), 64, 64, steps=2, seed=seed, tier="cpu")


def test_sixteen_concurrent_jobs_spread_over_both_engines_and_match_one_engine(pool, astronaut):
    jobs = [job(astronaut, seed) for seed in range(16)]
    with ThreadPoolExecutor(16) as ex:
        results = list(ex.map(pool.run, jobs))
    ran_on = [r.events[-1] for r in results]
    assert set(ran_on) == {"ran on CPU replica 0", "ran on CPU replica 1"}, ran_on
    single = Engine(ModelSpec.demo_spec())
    for j, r in zip(jobs, results):
        assert np.array_equal(np.asarray(r.image), np.asarray(single.run(j).image)), j.seed


def test_each_engine_plans_with_its_share_of_the_host_ram(pool):
    from core.device import host_ram_limit_gb

    share = round(host_ram_limit_gb() / 2, 1)
    assert [e.device.host_ram_gb for e in pool.engines] == [share, share]
    assert pool.replicas == 2 and pool.device is pool.engines[0].device and pool.demo


def test_a_pool_needs_an_index_per_engine():
    with pytest.raises(ValueError, match="one or more engines"):
        EnginePool([], [])
