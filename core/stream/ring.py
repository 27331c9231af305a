"""The circular GPU buffer that streamed units are copied into, handed out in order."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from core.plan.units import align


@dataclass(eq=False)
class Region:
    """Bytes [start, end) of the ring, held by one copy until its last reader releases it; `event`
    marks when that reader is done (None: done already, in stream order)."""

    start: int
    end: int
    released: bool = False
    event: object = None

    def release(self, event) -> None:
        self.released, self.event = True, event


class Ring:
    """A circular byte buffer handed out in order. A region is reused once its last reader has
    released it; `alloc` returns the events the writer must wait for (None: still in use)."""

    def __init__(self, size: int):
        self.size, self.head = size, 0
        self.live: deque[Region] = deque()  # in allocation order

    def alloc(self, n: int) -> tuple[Region, list] | None:
        if n > self.size:
            raise ValueError(f"a {n}-byte unit does not fit the {self.size}-byte ring")
        wrap = self.head + n > self.size
        spans = [(self.head, self.size), (0, n)] if wrap else [(self.head, self.head + n)]
        waits, k = [], 0
        for r in self.live:  # the regions in the way are the oldest ones
            if not any(r.start < b and a < r.end for a, b in spans):
                break
            if not r.released:
                return None
            k += 1
        for _ in range(k):
            r = self.live.popleft()
            if r.event is not None:
                waits.append(r.event)
        start = 0 if wrap else self.head
        region = Region(start, start + n)
        self.live.append(region)
        self.head = start + align(n)
        return region, waits
