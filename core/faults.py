"""Fault injection for tests: phases and fault points (core.monitor.fault_point) made to fail as
real out-of-memory does, and black results, on an Engine (`engine.faults = Faults(...)`)."""

from __future__ import annotations

import torch

from core.monitor import HostOutOfMemory


class Faults:
    """Test hook: make the named phases or fault points (core.monitor.fault_point: "arenas", "pin",
    "step", "tile") fail. A count `n` fails the first n passes; `(k, n)` lets k pass first (the
    k+1-th denoising step, say). "pin" fails as host RAM does, everything else as GPU memory."""

    def __init__(self, **counts):
        pairs = {k: tuple(v) if isinstance(v, (tuple, list)) else (0, v) for k, v in counts.items()}
        self.skips = {k: skip for k, (skip, _) in pairs.items()}  # passes still let through
        self.counts = {k: n for k, (_, n) in pairs.items()}  # failures still to come

    def _take(self, name: str) -> bool:
        if self.skips.get(name, 0) > 0:
            self.skips[name] -= 1
        elif self.counts.get(name, 0) > 0:
            self.counts[name] -= 1
            return True
        return False

    def check(self, phase: str) -> None:
        if self._take(phase):
            if phase == "pin":
                raise HostOutOfMemory(f"could not pin host RAM (injected in {phase})")
            raise torch.OutOfMemoryError(f"CUDA out of memory (injected in {phase})")

    def black(self) -> bool:
        """Injected precision fault: the next result comes out black."""
        return self._take("black")
