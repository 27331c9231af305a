"""The prefetch schedule: which unit's copy and cast to enqueue next, and into which buffers.

Pure bookkeeping over positions in the order the units ran in the previous step; everything that
touches a device goes through `Ops` (core.stream.residency implements it with CUDA streams and
events, tests with fake streams that check the ordering). Three pipelines run ahead of compute:

  copy    host→device copies of streamed units into the ring, as far ahead as the ring has room
  cast    fp8 or 4-bit → compute dtype into a small pool of work slots, one unit ahead (or on the compute
          stream just before use: `cast="compute"`)
  compute waits only for the unit it is about to run.
"""

from __future__ import annotations

from collections import deque
from typing import Protocol

from core.plan.placement import Store
from core.stream.ring import Region, Ring

CASTS = ("side", "compute")


class Ops(Protocol):
    """What the schedule asks of the device. Events are opaque (None: already ordered)."""

    def copy(self, unit: int, region: Region, waits: list) -> object:
        """Enqueue unit's host→ring copy after `waits`; returns the copy's event."""

    def cast(self, unit: int, slot: int, region: Region | None, waits: list, on_compute: bool) -> object:
        """Enqueue the cast of unit's compressed pack (from `region` of the ring, or its resident pack)
        into work slot `slot` after `waits`; returns the cast's event."""

    def use(self, unit: int, region: Region | None, slot: int | None, waits: list) -> None:
        """Make the compute stream wait for `waits` and point unit's parameters at its buffer."""

    def compute_done(self) -> object:
        """An event on the compute stream after the work enqueued so far."""


class Schedule:
    """Decides, at every unit's start and end, what to copy and cast next; `end_step()` once per
    denoising step learns the order just seen as the prediction for the next one."""

    def __init__(self, stores: list[Store], nbytes: list[int], ring: Ring | None, slots: int, ops: Ops, cast="side"):
        if cast not in CASTS:
            raise ValueError(f"cast must be one of {CASTS}, got {cast!r}.")
        self.stores, self.nbytes, self.ring, self.ops, self.cast_mode = stores, nbytes, ring, ops, cast
        self.n_slots = slots
        self.free_slots: deque[tuple[int, object]] = deque((s, None) for s in range(slots))
        self.fetched: dict[int, tuple[Region, object]] = {}  # position -> (ring region, copied event)
        self.casted: dict[int, tuple[int, object]] = {}  # position -> (work slot, cast event)
        self.order = [i for i, s in enumerate(stores) if s.managed]  # predicted order (cyclic)
        self.trace: list[int] = []
        self.cur = -1  # absolute position of the unit in use
        self.fetch_k = self.cast_k = 0  # next positions the copy / cast pipelines consider
        self.in_use: tuple | None = None  # (unit, ring region, work slot, in the order?)
        self.stats = dict(hits=0, misses=0, copied_bytes=0)

    def _unit(self, pos: int) -> int:
        return self.order[pos % len(self.order)]

    def _fetch(self, pos: int, i: int) -> bool:
        """Enqueue the copy of streamed unit i (for position pos) into the ring; False: no room."""
        got = self.ring.alloc(self.nbytes[i])
        if got is None:
            return False
        region, waits = got
        self.fetched[pos] = (region, self.ops.copy(i, region, waits))
        self.stats["copied_bytes"] += self.nbytes[i]
        return True

    def _cast(self, pos: int, i: int, on_compute: bool) -> bool:
        """Enqueue the cast of compressed unit i into a free work slot; False: no slot."""
        if not self.free_slots:
            return False
        slot, free_evt = self.free_slots.popleft()
        if self.stores[i].streamed:
            region, copied = self.fetched.pop(pos)
            evt = self.ops.cast(i, slot, region, [free_evt, copied], on_compute)
            region.release(evt)  # the ring bytes are free once cast
        else:
            evt = self.ops.cast(i, slot, None, [free_evt], on_compute)
        self.casted[pos] = (slot, evt)
        return True

    def _pump(self) -> None:
        """Run the copy and cast pipelines as far ahead as their buffers allow."""
        n = len(self.order)
        self.fetch_k = max(self.fetch_k, self.cur + 1)
        self.cast_k = max(self.cast_k, self.cur + 1)
        if self.ring is not None:
            while self.fetch_k < self.cur + n:
                i = self._unit(self.fetch_k)
                if self.stores[i].streamed and not self._fetch(self.fetch_k, i):
                    break
                self.fetch_k += 1
        if self.cast_mode == "compute" or not self.n_slots:
            return
        while self.cast_k < self.cur + n:
            i = self._unit(self.cast_k)
            if self.stores[i].cast:
                if self.stores[i].streamed and self.cast_k not in self.fetched:
                    break  # its copy is not enqueued yet
                if not self._cast(self.cast_k, i, on_compute=False):
                    break
            self.cast_k += 1

    def _drop_ahead(self, upto: int | None = None) -> None:
        """Forget what was prepared for positions before `upto` (all if None): the units there were
        skipped, or the order changed. Their buffers are free at once (same-stream order)."""
        for pos in [p for p in self.fetched if upto is None or p < upto]:
            self.fetched.pop(pos)[0].release(None)
        for pos in [p for p in self.casted if upto is None or p < upto]:
            self.free_slots.append((self.casted.pop(pos)[0], None))
        if upto is None:
            self.fetch_k = self.cast_k = self.cur + 1

    def before(self, i: int) -> None:
        """Unit i is about to run: make its weights ready on the compute stream."""
        if self.in_use is not None:  # a unit ran without its post-hook (exception): release it
            self._release()
        self.trace.append(i)
        n = len(self.order)
        pos = next((self.cur + 1 + k for k in range(n) if self._unit(self.cur + 1 + k) == i), None)
        if pos is None:  # not in the learned order (first step, text encoder): load on demand
            self._drop_ahead()
            pos, known = self.cur + 1, False
        else:
            self._drop_ahead(pos)
            self.cur, known = pos, True
        s = self.stores[i]
        ready = pos in self.fetched or pos in self.casted or (s.cast and s.resident and self.cast_mode == "compute")
        self.stats["hits" if ready else "misses"] += 1
        if s.streamed and pos not in self.fetched and pos not in self.casted and not self._fetch(pos, i):
            raise RuntimeError("streaming ring is full of units that are not in use")  # cannot happen
        if s.cast and pos not in self.casted and not self._cast(pos, i, on_compute=self.cast_mode == "compute"):
            raise RuntimeError("no free work slot for the unit in use")  # cannot happen: casts go in order
        region = slot = None
        if s.cast:
            slot, evt = self.casted.pop(pos)
        else:
            region, evt = self.fetched.pop(pos)
        self.ops.use(i, region, slot, [evt])
        self.in_use = (i, region, slot, known)
        if known:
            self._pump()

    def _release(self) -> bool:
        """Free the buffers of the unit in use once its compute is done; True if it was in the order."""
        _, region, slot, known = self.in_use
        evt = self.ops.compute_done()
        if region is not None:
            region.release(evt)
        if slot is not None:
            self.free_slots.append((slot, evt))
        self.in_use = None
        return known

    def after(self, i: int) -> None:
        """Unit i has been enqueued on the compute stream."""
        if self._release():  # after a unit outside the order (text encoder), nothing is prepared:
            self._pump()  # the next ones may not be in the order either

    def restart(self) -> None:
        """The weights behind the prepared copies and casts changed (a LoRA re-packed units in place):
        drop all of it and prepare the next step's first units again, as end_step() does; the learned
        order and the counts stay."""
        if self.in_use is not None:
            self._release()
        self._drop_ahead()
        self.trace, self.cur = [], -1
        self.fetch_k = self.cast_k = 0
        self._pump()

    def end_step(self) -> None:
        """Called once per denoising step: the order just seen predicts the next step."""
        if self.trace:
            if self.trace != self.order:
                self._drop_ahead()
                self.order = self.trace
                self.cur = -1
                self.fetch_k = self.cast_k = 0
                self._pump()  # the next step's first units
            self.trace = []
