"""Engines on several machines: core Engines as Ray Serve replicas, and an engine-like front for them.

`python app.py --ray --gpus 8 [--min-replicas 1] [--ray-address ADDR]` serves the app's page over
`start(...)`'s RemoteEngine. Each replica is an Engine on one GPU (`num_gpus=1`) taking one job at a
time (`max_ongoing_requests=1`): Ray Serve queues the rest and scales the replicas between the bounds
by that queue. The page's views (tiers, plan preview) are planned here with the first replica's
device and model sizes. A job whose replica dies is sent once more (results are seed-exact, so the
retry gives the same image); a second failure is one sentence. Progress and cancel stay local: the
page shows the result when it is done, and a cancel drops a job that has not started. Ray is
optional (`pip install "ray[serve]"`): nothing imports it unless asked. On a cluster, every node needs
this checkout at the same path (the replicas import core/ from it). No Gradio here.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

from core.device import DeviceInfo
from core.job import Job
from core.models import ModelSpec
from core.result import Result

log = logging.getLogger(__name__)


class EngineReplica:
    """One Engine in one Ray actor (wrapped by serve.deployment in `deployment`)."""

    def __init__(self, spec: ModelSpec):
        import os

        from core.engine import Engine

        self.engine = Engine(spec)
        self.engine.load()
        self.name = f"replica {os.getpid()} ({self.engine.device.name})"

    def describe(self) -> dict:
        return dict(device=self.engine.device, sizes=self.engine.sizes, max_seq=self.engine.max_seq)

    def run(self, job: Job) -> Result:
        result = self.engine.run(job)
        return replace(result, events=(*result.events, f"ran on {self.name}"))


def deployment(spec: ModelSpec, min_replicas: int, max_replicas: int, gpus_per_replica: float):
    """The bound Serve application: replicas of EngineReplica, autoscaled on their queue."""
    from ray import serve

    return serve.deployment(
        EngineReplica,
        name="flux-engine",
        ray_actor_options={"num_gpus": gpus_per_replica},
        max_ongoing_requests=1,
        autoscaling_config=dict(min_replicas=min_replicas, max_replicas=max_replicas, target_ongoing_requests=1),
    ).bind(spec)


class _RemoteState:
    """What the page reads of the placed pipeline: nothing is placed here."""

    placed = None

    @staticmethod
    def precision(asked: str) -> str:
        return asked


class RemoteEngine:
    """An engine-like front for ui.create_demo over a Serve deployment handle."""

    def __init__(self, handle, spec: ModelSpec, replicas: int):
        from core.speed.fast import FastConfig

        self.handle, self.spec, self.replicas = handle, spec, replicas
        info = handle.describe.remote().result()
        self.device: DeviceInfo = info["device"]
        self.sizes, self.max_seq = info["sizes"], info["max_seq"]
        self.fast, self.state = FastConfig(compile="off"), _RemoteState()

    @property
    def demo(self) -> bool:
        return self.spec.demo

    def plan(self, job: Job, tier: str | None = None, dtype: str | None = None):
        from core.engine import shape_of
        from core.plan.planner import plan_for

        return plan_for(tier or job.tier, shape_of(job), self.sizes, self.device, dtype=dtype, precision=job.precision)

    @staticmethod
    def compile_args(choice: str = "auto") -> dict:
        return dict(compiles=False, compile_cache="cold")

    def load(self) -> None:  # the replicas load their own
        pass

    def run(self, job: Job, progress=None, cancel=None, source=None) -> Result:
        from ray.exceptions import RayActorError

        from core.denoise.runtime import JobCancelled

        if cancel is not None and cancel.is_set():
            raise JobCancelled()
        try:
            return self.handle.run.remote(job).result()
        except RayActorError:  # the replica died (Serve starts another): once more
            log.warning("the replica running a job died: sent once more")
        try:
            return self.handle.run.remote(job).result()
        except RayActorError as e:
            raise RuntimeError(f"The engine replica running this job died twice ({type(e).__name__}).") from e


def start(
    spec: ModelSpec,
    max_replicas: int,
    min_replicas: int | None = None,
    address: str | None = None,
    gpus_per_replica: float = 1.0,
) -> RemoteEngine:
    """Ray (a running cluster at `address`, or one started here) with the engine deployment on it."""
    try:
        import ray
        from ray import serve
    except ImportError as e:
        raise ValueError('--ray needs Ray Serve: pip install "ray[serve]"') from e
    lo = max_replicas if min_replicas is None else min(min_replicas, max_replicas)
    root = str(Path(__file__).resolve().parents[1])  # the replicas import core/ from this checkout
    ray.init(address=address, runtime_env={"env_vars": {"PYTHONPATH": root}})
    handle = serve.run(deployment(spec, lo, max_replicas, gpus_per_replica), name="flux", route_prefix=None)
    return RemoteEngine(handle, spec, max_replicas)
