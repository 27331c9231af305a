"""Which denoiser weights stay on the GPU and which stream from pinned host memory.

The denoiser (ControlNet + transformer) is cut into *units*: the children of every transformer
block (attention, feed-forward, modulation), at most ~75 M parameters each. A plan gives every unit
one placement:

  B  resident in the compute dtype (no cost per step)
  F  resident as fp8, cast into a compute-dtype work slot before use (half the memory)
  S  streamed: compute-dtype copy in pinned host RAM, copied into the ring and used there
  Q  streamed as fp8: half the bus bytes and half the host RAM, cast from the ring into a work slot

Three pipelines run ahead of the compute along the order the units ran in the previous step:

  copy   host→device copies of S/Q units into a ring buffer on the GPU. The copy stream does copies
         only, so it never waits for a free SM, and it runs as far ahead as the ring has room: a
         ring of several units absorbs blocks whose bytes outweigh their compute (modulation
         layers) with the compute-heavy ones (attention at 4k tokens) around them.
  cast   fp8 → compute dtype into a small pool of work slots, one unit ahead, on a high-priority
         stream (or on the compute stream: `cast="compute"`).
  compute waits only for the unit it is about to run.

diffusers' group offloading streams *every* block and casts layer by layer on the compute stream;
what it lacks is this mix of resident and streamed units with copies that never queue behind casts.
"""

from __future__ import annotations

import contextlib
import logging
from collections import deque

import torch

from core.plan.units import align, ring_bytes, unit_sizes, work_slots
from core.stream.packs import Pack, Ring, pinned

log = logging.getLogger(__name__)
CODES = "BFSQ"
CASTS = ("side", "compute")
DEFAULT_CAST = "side"  # where casts run unless a caller says (a benchmark knob)


class Residency:
    """Applies a placement to the denoiser units; `remove()` puts every weight back on the CPU.

    slots: compute-dtype work slots for F/Q units (one in use, the rest cast ahead).
    ring:  the copy ring's size, in units of the largest streamed pack (≥ 2).
    cast:  "side" (a high-priority stream, ahead of use) or "compute" (just before use, on the
           compute stream).
    """

    def __init__(
        self,
        units,
        placement: str,
        device: torch.device,
        dtype: torch.dtype,
        slots: int = 2,
        ring: int = 6,
        cast: str | None = None,
    ):
        if len(placement) != len(units) or set(placement) - set(CODES):
            raise ValueError(f"placement must have one of {CODES} per unit ({len(units)}), got {len(placement)}.")
        cast = cast or DEFAULT_CAST
        if cast not in CASTS:
            raise ValueError(f"cast must be one of {CASTS}, got {cast!r}.")
        self.device, self.dtype, self.units, self.placement = device, dtype, units, placement
        cuda = device.type == "cuda"
        self.copy_stream = torch.cuda.Stream(device) if cuda else None
        self.cast_stream = torch.cuda.Stream(device, priority=-1) if cuda and cast == "side" else None
        self.cast_mode = cast
        self.packs: dict[int, Pack] = {}
        self.hooks = []
        self.stats = dict(hits=0, misses=0, copied_bytes=0)
        managed = [i for i, c in enumerate(placement) if c != "B"]
        sizes = unit_sizes(units)  # the same arithmetic the plan counted this memory with
        for i, (_, m) in enumerate(units):
            if placement[i] == "B":
                m.to(device=device, dtype=dtype)
            else:
                self.packs[i] = Pack(m, fp8=placement[i] in "FQ", dtype=dtype)
        es = dtype.itemsize
        # pack every managed unit: F into a GPU arena, S/Q into one pinned host arena
        self.gpu_arena = torch.empty(
            sum(align(self.packs[i].nbytes) for i in managed if placement[i] == "F"), dtype=torch.uint8, device=device
        )
        self.host_arena = pinned(sum(align(self.packs[i].nbytes) for i in managed if placement[i] in "SQ"), pin=cuda)
        self._pinned = cuda and self.host_arena.numel() > 0
        # streaming buffers, allocated once; they also serve as scratch while the packs are filled
        n_work, work_numel = work_slots(sizes, placement, slots)
        self.work = [torch.empty(work_numel, dtype=dtype, device=device) for _ in range(n_work)]
        ring_total = ring_bytes(sizes, placement, es, ring)
        m_b = ring_total // max(ring, 2)  # the largest S/Q pack, aligned
        self.ring_buf = torch.empty(ring_total, dtype=torch.uint8, device=device) if ring_total else None
        self.ring = Ring(ring_total) if ring_total else None
        goff = hoff = 0
        for i in managed:
            pack, code = self.packs[i], placement[i]
            if code == "F":
                buf, goff = self.gpu_arena[goff : goff + pack.nbytes], goff + align(pack.nbytes)
            else:
                buf, hoff = self.host_arena[hoff : hoff + pack.nbytes], hoff + align(pack.nbytes)
            if code == "S":  # flatten in the ring's first part, stage through its second
                scratch, stage = self.ring_buf[:m_b].view(dtype), self.ring_buf[m_b : 2 * m_b]
            else:  # flatten in a work slot, stage (Q) through the ring
                scratch, stage = self.work[0], self.ring_buf[:m_b] if code == "Q" else None
            pack.fill(buf, scratch, stage)
            pack.point_params(self.work[0] if code in "FQ" else self.ring_buf.view(dtype))  # originals freed
        if cuda and managed:
            torch.cuda.synchronize(device)
        self.free_slots: deque[tuple[int, object]] = deque((s, None) for s in range(len(self.work)))
        # per scheduled position: what is ready for it
        self.fetched: dict[int, tuple[list, object]] = {}  # pos -> (ring region, copied event)
        self.casted: dict[int, tuple[int, object]] = {}  # pos -> (work slot, cast event)
        self.schedule = managed[:]  # predicted order of managed units (cyclic)
        self.trace: list[int] = []
        self.cur = -1  # absolute position of the unit in use
        self.fetch_k = self.cast_k = 0  # next positions the copy / cast pipelines consider
        self.in_use: tuple | None = None  # (unit, ring region or None, work slot or None, in the order?)
        for i in managed:
            m = units[i][1]
            self.hooks.append(m.register_forward_pre_hook(lambda mod, args, i=i: self._before(i)))
            self.hooks.append(m.register_forward_hook(lambda mod, args, out, i=i: self._after(i)))

    # -- streams and events ---------------------------------------------------------------------
    def _on(self, stream):
        return torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()

    def _event(self, stream):
        if stream is None:
            return None
        e = torch.cuda.Event()
        e.record(stream)
        return e

    @staticmethod
    def _wait(stream, events) -> None:
        if stream is not None:
            for e in events:
                if e is not None:
                    stream.wait_event(e)

    def _compute(self):
        return torch.cuda.current_stream(self.device) if self.device.type == "cuda" else None

    # -- the three pipelines ------------------------------------------------------------------
    def _unit(self, pos: int) -> int:
        return self.schedule[pos % len(self.schedule)]

    def _fetch(self, pos: int, i: int) -> bool:
        """Enqueue the copy of streamed unit i (for position pos) into the ring; False: no room."""
        pack = self.packs[i]
        got = self.ring.alloc(pack.nbytes)
        if got is None:
            return False
        region, waits = got
        dst = self.ring_buf[region[0] : region[0] + pack.nbytes]
        with self._on(self.copy_stream):
            self._wait(self.copy_stream, waits)
            dst.copy_(pack.buf, non_blocking=True)
            self.fetched[pos] = (region, self._event(self.copy_stream))
        self.stats["copied_bytes"] += pack.nbytes
        return True

    def _cast(self, pos: int, i: int, stream) -> bool:
        """Enqueue the cast of F/Q unit i into a free work slot on `stream`; False: no slot."""
        if not self.free_slots:
            return False
        slot, free_evt = self.free_slots.popleft()
        pack = self.packs[i]
        with self._on(stream):
            self._wait(stream, [free_evt])
            if self.placement[i] == "Q":
                region, copied = self.fetched.pop(pos)
                self._wait(stream, [copied])
                pack.unpack_into(self.work[slot], self.ring_buf[region[0] : region[0] + pack.nbytes])
                Ring.release(region, self._event(stream))  # the ring bytes are free once cast
            else:
                pack.unpack_into(self.work[slot])
            self.casted[pos] = (slot, self._event(stream))
        return True

    def _pump(self) -> None:
        """Run the copy and cast pipelines as far ahead as their buffers allow."""
        n = len(self.schedule)
        self.fetch_k = max(self.fetch_k, self.cur + 1)
        self.cast_k = max(self.cast_k, self.cur + 1)
        if self.ring is not None:
            while self.fetch_k < self.cur + n:
                i = self._unit(self.fetch_k)
                if self.placement[i] in "SQ" and not self._fetch(self.fetch_k, i):
                    break
                self.fetch_k += 1
        if self.cast_mode == "compute" or not self.work:
            return
        while self.cast_k < self.cur + n:
            i = self._unit(self.cast_k)
            if self.placement[i] in "FQ":
                if self.placement[i] == "Q" and self.cast_k not in self.fetched:
                    break  # its copy is not enqueued yet
                if not self._cast(self.cast_k, i, self.cast_stream):
                    break
            self.cast_k += 1

    def _drop_ahead(self, upto: int | None = None) -> None:
        """Forget what was prepared for positions before `upto` (all if None): the units there were
        skipped, or the order changed. Their buffers are free at once (same-stream order)."""
        for pos in [p for p in self.fetched if upto is None or p < upto]:
            Ring.release(self.fetched.pop(pos)[0], None)
        for pos in [p for p in self.casted if upto is None or p < upto]:
            self.free_slots.append((self.casted.pop(pos)[0], None))
        if upto is None:
            self.fetch_k = self.cast_k = self.cur + 1

    def _before(self, i: int) -> None:
        if self.in_use is not None:  # a unit ran without its post-hook (exception): release it
            self._release()
        self.trace.append(i)
        n = len(self.schedule)
        pos = next((self.cur + 1 + k for k in range(n) if self._unit(self.cur + 1 + k) == i), None)
        if pos is None:  # not in the learned order (first step, text encoder): load on demand
            self._drop_ahead()
            pos, known = self.cur + 1, False
        else:
            self._drop_ahead(pos)
            self.cur, known = pos, True
        if pos in self.fetched or pos in self.casted or self.placement[i] == "F" and self.cast_mode == "compute":
            self.stats["hits"] += 1
        else:
            self.stats["misses"] += 1
        code = self.placement[i]
        if code in "SQ" and pos not in self.fetched and pos not in self.casted:
            if not self._fetch(pos, i):
                raise RuntimeError("streaming ring is full of units that are not in use")  # cannot happen
        if code in "FQ" and pos not in self.casted:
            if not self._cast(pos, i, self._compute() if self.cast_mode == "compute" else self.cast_stream):
                raise RuntimeError("no free work slot for the unit in use")  # cannot happen: casts go in order
        compute = self._compute()
        region = slot = None
        if code == "S":
            region, copied = self.fetched.pop(pos)
            self._wait(compute, [copied])
            self.packs[i].point_params(self.ring_buf[region[0] : region[1]].view(self.dtype))
        else:
            slot, ready = self.casted.pop(pos)
            self._wait(compute, [ready])
            self.packs[i].point_params(self.work[slot])
        self.in_use = (i, region, slot, known)
        if known:
            self._pump()

    def _release(self) -> bool:
        """Free the buffers of the unit in use once its compute is done; True if it was in the order."""
        i, region, slot, known = self.in_use
        evt = self._event(self._compute())
        if region is not None:
            Ring.release(region, evt)
        if slot is not None:
            self.free_slots.append((slot, evt))
        self.in_use = None
        return known

    def _after(self, i: int) -> None:
        if self._release():  # after a unit outside the order (text encoder), nothing is prepared:
            self._pump()  # the next ones may not be in the order either

    def end_step(self) -> None:
        """Called once per denoising step: the order just seen predicts the next step."""
        if self.trace:
            if self.trace != self.schedule:
                self._drop_ahead()
                self.schedule = self.trace
                self.cur = -1
                self.fetch_k = self.cast_k = 0
                self._pump()  # the next step's first units
            self.trace = []

    # -- undo ---------------------------------------------------------------------------------
    def remove(self) -> None:
        """Hooks off, every unit back on the CPU in the compute dtype (fp8 units stay fp8-rounded)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        for h in self.hooks:
            h.remove()
        self.hooks = []
        for i, (_, m) in enumerate(self.units):
            pack = self.packs.get(i)
            if pack is None:
                m.to("cpu")
                continue
            flat = torch.empty(pack.numel, dtype=self.dtype, device=self.device)
            src = pack.buf.to(self.device) if self.placement[i] in "SQ" else pack.buf
            pack.unpack_into(flat, src)
            pack.point_params(flat.cpu())
        self.packs.clear()
        if self._pinned:
            torch.cuda.cudart().cudaHostUnregister(self.host_arena.data_ptr())
        self.work, self.ring_buf, self.ring, self.fetched, self.casted = [], None, None, {}, {}
        self.gpu_arena = self.host_arena = None

    @property
    def gpu_bytes_buffers(self) -> int:
        total = sum(w.numel() * w.element_size() for w in self.work)
        return total + (self.ring_buf.numel() if self.ring_buf is not None else 0)

    @property
    def gpu_bytes(self) -> int:
        """Bytes this residency holds on the GPU (resident units, fp8 packs, slots, ring)."""
        total = self.gpu_arena.numel() if self.gpu_arena is not None else 0
        total += self.gpu_bytes_buffers
        es = torch.empty((), dtype=self.dtype).element_size()
        total += sum(
            sum(p.numel() for p in m.parameters()) * es
            for i, (_, m) in enumerate(self.units)
            if self.placement[i] == "B"
        )
        return total
