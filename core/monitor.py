"""Memory monitor: peak and current memory per phase, with timestamps, for every job.

On CUDA it reads the caching allocator (allocated / reserved, the numbers a tier budget is checked
against); on the CPU it reads the process RSS. The timeline feeds the UI's memory plot.
"""

from __future__ import annotations

import contextlib
import contextvars
import gc
import time
from dataclasses import dataclass, field

import psutil
import torch

GiB = 2**30


@dataclass
class Phase:
    name: str
    start_s: float
    end_s: float = 0.0
    peak_alloc_gb: float = 0.0
    peak_reserved_gb: float = 0.0

    @property
    def seconds(self) -> float:
        return round(self.end_s - self.start_s, 3)


@dataclass
class MemoryMonitor:
    device: str = "cpu"
    t0: float = field(default_factory=time.perf_counter)
    phases: list[Phase] = field(default_factory=list)
    timeline: list[tuple[float, float, str]] = field(default_factory=list)  # (s, GiB, phase)
    peak_reserved_gb: float = 0.0
    peak_alloc_gb: float = 0.0
    hook: object = None  # called with the phase name on entry (fault injection in tests)

    @property
    def cuda(self) -> bool:
        return self.device == "cuda"

    def now_gb(self) -> float:
        if self.cuda:
            return torch.cuda.memory_reserved() / GiB
        return psutil.Process().memory_info().rss / GiB

    def sample(self, label: str = "") -> None:
        self.timeline.append((round(time.perf_counter() - self.t0, 3), round(self.now_gb(), 3), label))

    @contextlib.contextmanager
    def phase(self, name: str):
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        ph = Phase(name, round(time.perf_counter() - self.t0, 3))
        self.phases.append(ph)
        self.sample(name)
        try:
            if self.hook is not None:
                self.hook(name)
            yield ph
        finally:
            if self.cuda:
                torch.cuda.synchronize()
                ph.peak_alloc_gb = round(torch.cuda.max_memory_allocated() / GiB, 3)
                ph.peak_reserved_gb = round(torch.cuda.max_memory_reserved() / GiB, 3)
            else:
                ph.peak_reserved_gb = ph.peak_alloc_gb = round(self.now_gb(), 3)
            ph.end_s = round(time.perf_counter() - self.t0, 3)
            self.peak_reserved_gb = max(self.peak_reserved_gb, ph.peak_reserved_gb)
            self.peak_alloc_gb = max(self.peak_alloc_gb, ph.peak_alloc_gb)
            self.sample(name)

    def report(self) -> dict:
        seconds: dict[str, float] = {}
        for p in self.phases:
            seconds[p.name] = round(seconds.get(p.name, 0.0) + p.seconds, 3)
        return dict(
            device=self.device,
            peak_reserved_gb=round(self.peak_reserved_gb, 3),
            peak_alloc_gb=round(self.peak_alloc_gb, 3),
            seconds=seconds,
            phases=[
                dict(
                    name=p.name,
                    start_s=p.start_s,
                    seconds=p.seconds,
                    peak_reserved_gb=p.peak_reserved_gb,
                    peak_alloc_gb=p.peak_alloc_gb,
                )
                for p in self.phases
            ],
            timeline=self.timeline,
        )


def free_memory() -> None:
    """After an OOM or a cancel: drop garbage and hand cached blocks back to the driver."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


class HostOutOfMemory(MemoryError):
    """Host RAM could not be allocated or pinned for a plan; a plan that pins less may fit."""


def is_oom(err: BaseException) -> bool:
    """GPU out of memory. 'resource already mapped' is how an allocation can fail right after an
    out-of-memory with expandable segments (seen on the H200): the same cause, the same remedy."""
    msg = str(err).lower()
    return isinstance(err, torch.OutOfMemoryError) or "out of memory" in msg or "resource already mapped" in msg


def is_host_oom(err: BaseException) -> bool:
    """Host RAM ran out: ours (HostOutOfMemory), Python's MemoryError, or PyTorch's CPU allocator."""
    msg = str(err).lower()
    return isinstance(err, MemoryError) or "can't allocate memory" in msg or "defaultcpuallocator" in msg


# -- fault points: where tests (and only tests) make an attempt fail at its worst moments -----------
_FAULTS: contextvars.ContextVar = contextvars.ContextVar("faults", default=None)


def fault_point(name: str) -> None:
    """A place where an allocation can fail for real (an arena, a pin, a denoising step, a tile);
    with faults active (core.faults.Faults) the named point may raise the failure it stands for."""
    hook = _FAULTS.get()
    if hook is not None:
        hook(name)


@contextlib.contextmanager
def faults_active(hook):
    token = _FAULTS.set(hook)
    try:
        yield
    finally:
        _FAULTS.reset(token)
