"""Serving on several machines: one engine per GPU as Ray Serve replicas, the Gradio page in front.

    python -m serve.ray_serve --model ID|DIR --controlnet ID|DIR --min-replicas 1 --max-replicas 4
    python -m serve.ray_serve --demo --replicas 2      # CPU replicas of the demo model

Each replica is a core Engine on one GPU (`num_gpus=1`), taking one job at a time
(`max_ongoing_requests=1`): Ray Serve queues the rest and scales the replicas between the bounds by
that queue. The page is the app's own (ui.create_demo) over a RemoteEngine, which sends each job to
the deployment and gets its Result back; its views (tiers, plan preview) are planned here with the
first replica's device and model sizes. A job whose replica dies is sent once more (results are
seed-exact, so the retry gives the same image); a second failure is one sentence. Progress and
cancel stay local: the page shows the result when it is done, and a cancel drops a job that has not
started. Ray is optional (`pip install "ray[serve]"`); the app itself never imports it. On a cluster
(`--address`), every node needs this checkout at the same path (the replicas import core/ from it).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

from core.device import DeviceInfo
from core.job import Job
from core.models import ModelSpec
from core.result import Result


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
        return dict(compiles=False, compile_cache_warm=False)

    def load(self) -> None:  # the replicas load their own
        pass

    def run(self, job: Job, progress=None, cancel=None, source=None) -> Result:
        from ray.exceptions import RayActorError

        from core.denoise.runtime import JobCancelled

        if cancel is not None and cancel.is_set():
            raise JobCancelled()
        for attempt in (1, 2):
            try:
                return self.handle.run.remote(job).result()
            except RayActorError as e:  # the replica died (Serve starts another): once more
                if attempt == 2:
                    raise RuntimeError(f"The engine replica running this job died twice ({type(e).__name__}).") from e
        raise AssertionError("unreachable")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="FLUX ControlNet on Ray Serve: engine replicas + the Gradio page")
    ap.add_argument("--model", default=None, metavar="ID|DIR")
    ap.add_argument("--controlnet", default=None, metavar="ID|DIR")
    ap.add_argument("--demo", action="store_true", help="CPU replicas of the demo model")
    ap.add_argument("--replicas", type=int, help="a fixed number of replicas (min = max)")
    ap.add_argument("--min-replicas", type=int, default=1)
    ap.add_argument("--max-replicas", type=int, default=1)
    ap.add_argument("--address", default=None, help="a running Ray cluster (default: start one here)")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=7860)
    a = ap.parse_args(argv)
    try:
        import ray
        from ray import serve
    except ImportError:
        print('error: Ray Serve is not installed; pip install "ray[serve]"', file=sys.stderr)
        return 2
    from core.configs import FLUX_DEV, UNION_PRO

    spec = ModelSpec.demo_spec() if a.demo else ModelSpec(a.model or FLUX_DEV, a.controlnet or UNION_PRO)
    lo, hi = (a.replicas, a.replicas) if a.replicas else (a.min_replicas, max(a.min_replicas, a.max_replicas))
    root = str(Path(__file__).resolve().parents[1])  # the replicas import core/ from this checkout
    ray.init(address=a.address, runtime_env={"env_vars": {"PYTHONPATH": root}})
    handle = serve.run(deployment(spec, lo, hi, 0 if a.demo else 1), name="flux", route_prefix=None)
    from preprocessors.image_io import MAX_UPLOAD_BYTES
    from ui import create_demo

    demo = create_demo(RemoteEngine(handle, spec, hi))
    demo.launch(server_name=a.host, server_port=a.port, max_file_size=MAX_UPLOAD_BYTES)
    return 0


if __name__ == "__main__":
    sys.exit(main())
