"""Several engines in one process, one per GPU: a job runs on whichever is free.

Each engine has its own plan for its own card (cards of one machine may differ in size), its own
placed weights and its own retries; the pool adds nothing to a job but the choice of engine, so a
job's result is the one its engine gives alone (seed-exact), cancel and out-of-memory step-down
included. An engine on GPU i runs inside `torch.cuda.device(i)`: everything it allocates as "cuda"
(weights, arenas, streams, the allocator's cap and statistics) is that GPU's. Host RAM is shared: each
engine plans with its share of it. Queueing is the caller's (the app's queue lets as many jobs run
as there are engines); `run` blocks until an engine is free.
"""

from __future__ import annotations

import contextlib
import queue
from dataclasses import replace

import torch

from core.device import DeviceInfo, detect, host_ram_limit_gb
from core.engine import Engine
from core.job import Job
from core.models import ModelSpec
from core.result import Result


class EnginePool:
    """Engines by replica; `gpus[i]` is the CUDA index engine i runs on (None: the CPU). The page and
    the planner's views (device, sizes, plan, ...) are the first engine's."""

    def __init__(self, engines: list[Engine], gpus: list[int | None]):
        if not engines or len(engines) != len(gpus):
            raise ValueError("a pool needs one or more engines, each with its GPU index (or None for the CPU).")
        self.engines, self.gpus = list(engines), list(gpus)
        self._free: queue.SimpleQueue[int] = queue.SimpleQueue()
        for i in range(len(engines)):
            self._free.put(i)

    @property
    def replicas(self) -> int:
        return len(self.engines)

    def on(self, i: int):
        """The context engine i runs in: its GPU current, or nothing on the CPU."""
        gpu = self.gpus[i]
        return torch.cuda.device(gpu) if gpu is not None else contextlib.nullcontext()

    def label(self, i: int) -> str:
        e = self.engines[i]
        return f"GPU {self.gpus[i]} ({e.device.name})" if self.gpus[i] is not None else f"CPU replica {i}"

    def run(self, job: Job, progress=None, cancel=None, source=None) -> Result:
        """Run `job` on the first free engine (waiting for one); its result says which ran it."""
        i = self._free.get()
        try:
            with self.on(i):
                result = self.engines[i].run(job, progress=progress, cancel=cancel, source=source)
        finally:
            self._free.put(i)
        return replace(result, events=(*result.events, f"ran on {self.label(i)}"))

    def load(self) -> None:
        self._each(Engine.load)

    def load_for(self, *args, **kw) -> None:
        self._each(Engine.load_for, *args, **kw)

    def _each(self, method, *args, **kw) -> None:
        """`method` of every engine, each on its own GPU."""
        for i, e in enumerate(self.engines):
            with self.on(i):
                method(e, *args, **kw)

    # -- the first engine's views: what the page shows and plans with -----------------------------
    @property
    def first(self) -> Engine:
        return self.engines[0]

    @property
    def busy(self) -> bool:
        return all(e.busy for e in self.engines)

    @property
    def spec(self) -> ModelSpec:
        return self.first.spec

    @property
    def device(self) -> DeviceInfo:
        return self.first.device

    @property
    def demo(self) -> bool:
        return self.first.demo

    @property
    def sizes(self):
        return self.first.sizes

    @property
    def fast(self):
        return self.first.fast

    @property
    def state(self):
        return self.first.state

    def plan(self, job: Job, tier: str | None = None, dtype: str | None = None):
        with self.on(0):
            return self.first.plan(job, tier, dtype)

    def compile_args(self, choice: str = "auto") -> dict:
        return self.first.compile_args(choice)


def build_pool(spec: ModelSpec, gpus: list[int] | None = None, replicas: int = 1, **engine_kw) -> EnginePool:
    """One engine per GPU index in `gpus`, or `replicas` engines on the CPU (the demo model, for tests
    and for machines without a GPU); each plans with its share of the host RAM."""
    slots: list[int | None] = list(gpus) if gpus else [None] * replicas
    engines = []
    for gpu in slots:
        info = detect(gpu) if gpu is not None else DeviceInfo("cpu", "CPU", 0.0, 0.0, True, host_ram_limit_gb())
        info = replace(info, host_ram_gb=round(info.host_ram_gb / len(slots), 1))
        engines.append(Engine(spec, device=info, **engine_kw))
    return EnginePool(engines, slots)
