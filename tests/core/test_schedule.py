"""The prefetch schedule against fake streams: operations are queued per stream with the events they
wait for, then executed in a random order that respects only those waits (what a GPU may do), while
buffers record which unit's bytes they hold. A unit must always compute on its own, complete bytes:
copy before cast before use, and no buffer rewritten while a unit still reads it."""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from core.plan.placement import store
from core.stream.ring import Ring
from core.stream.schedule import Schedule


class FakeStreams:
    """Ops for the schedule: each call appends an op to a stream's queue; `drain` runs them."""

    def __init__(self):
        self.queues = {"copy": [], "cast": [], "compute": []}
        self.done: set[int] = set()
        self.next_event = 0
        self.ring: dict[int, object] = {}  # byte offset -> unit whose bytes are there
        self.slots: dict[int, object] = {}
        self.errors: list[str] = []

    def _op(self, stream, waits, fn):
        evt = self.next_event
        self.next_event += 1
        self.queues[stream].append((evt, [w for w in waits if w is not None], fn))
        return evt

    def copy(self, unit, region, waits):
        def run():
            for b in range(region.start, region.end):
                self.ring[b] = unit

        return self._op("copy", waits, run)

    def cast(self, unit, slot, region, waits, on_compute):
        def run():
            if region is not None and any(self.ring.get(b) != unit for b in range(region.start, region.end)):
                self.errors.append(f"cast of unit {unit} read another unit's ring bytes")
            self.slots[slot] = unit

        return self._op("compute" if on_compute else "cast", waits, run)

    def use(self, unit, region, slot, waits):
        def run():
            if slot is not None and self.slots.get(slot) != unit:
                self.errors.append(f"unit {unit} computed on slot {slot} holding {self.slots.get(slot)}")
            if region is not None and any(self.ring.get(b) != unit for b in range(region.start, region.end)):
                self.errors.append(f"unit {unit} computed on another unit's ring bytes")

        self._op("compute", waits, run)

    def compute_done(self):
        return self._op("compute", [], lambda: None)

    def drain(self, rng: random.Random) -> None:
        """Run queued ops in any order a GPU could: a stream in order, an op after its waits."""
        while any(self.queues.values()):
            ready = [n for n, q in self.queues.items() if q and all(w in self.done for w in q[0][1])]
            assert ready, "deadlock: every stream waits for an event no stream will record"
            name = rng.choice(ready)
            evt, _, fn = self.queues[name].pop(0)
            fn()
            self.done.add(evt)


def make(codes: str, ring_units: int, slots: int, cast: str):
    nbytes = [100 + 60 * (i % 3) for i in range(len(codes))]
    stores = [store(c) for c in codes]
    streamed = [n for n, s in zip(nbytes, stores) if s.streamed]
    ring = Ring(max(streamed) * 2 * max(ring_units, 2) if streamed else 0) if streamed else None
    ops = FakeStreams()
    n_slots = min(slots, sum(s.cast for s in stores)) if any(s.cast for s in stores) else 0
    return Schedule(stores, nbytes, ring, n_slots, ops, cast), ops


@settings(max_examples=80, deadline=None)
@given(
    codes=st.lists(st.sampled_from("BFSQRN"), min_size=3, max_size=7).map("".join),
    ring=st.integers(2, 4),
    slots=st.integers(1, 3),
    cast=st.sampled_from(["side", "compute"]),
    calls=st.lists(st.one_of(st.integers(0, 6), st.just(-1)), min_size=1, max_size=40),
    seed=st.integers(0, 2**16),
)
def test_no_unit_runs_before_its_copy_and_cast_under_any_interleaving(codes, ring, slots, cast, calls, seed):
    sched, ops = make(codes, ring, slots, cast)
    rng = random.Random(seed)
    steps = [c % len(codes) if c >= 0 else -1 for c in calls]
    for _ in range(2):  # a first step that learns the order, then one that prefetches along it
        for c in steps:
            if c < 0:
                sched.end_step()
            elif sched.stores[c].managed:
                sched.before(c)
                sched.after(c)
            if rng.random() < 0.3:  # the GPU runs ahead at random moments
                ops.drain(rng)
        sched.end_step()
    ops.drain(rng)
    assert not ops.errors, (codes, ops.errors[:3])


def test_a_repeated_order_is_prefetched_and_counted_as_hits():
    sched, ops = make("SQFS", ring_units=4, slots=2, cast="side")
    order = [0, 1, 2, 3]
    for _ in range(3):
        for i in order:
            sched.before(i)
            sched.after(i)
        sched.end_step()
        ops.drain(random.Random(0))
    # the schedule starts from the units' own order: only the very first unit waits for its bytes
    assert sched.stats["misses"] == 1 and sched.stats["hits"] == 11
    assert not ops.errors
