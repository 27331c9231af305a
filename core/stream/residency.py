"""Which denoiser weights stay on the GPU and which stream from pinned host memory.

A plan gives every unit a `Store` (core.plan.placement): resident or streamed, in the compute dtype,
fp8 or 4-bit. `Residency` is the storage side: it packs the managed units into a GPU arena
(compressed resident ones) and one pinned host arena (streamed), allocates the copy ring and the
work slots, hooks the units, and implements the device operations of the prefetch schedule
(core.stream.schedule) with three CUDA streams: copies only on the copy stream (so a copy never
queues behind a kernel), casts (fp8 → compute dtype, 4-bit dequantization) on a high-priority side
stream, compute on the current stream.

Weights that come memory-mapped from a checkpoint file are kept as they are while placed (they cost
no anonymous RAM) and given back on removal: a release then copies nothing and rounds nothing.

diffusers' group offloading streams *every* block and casts layer by layer on the compute stream;
what it lacks is this mix of resident and streamed units with copies that never queue behind casts.
"""

from __future__ import annotations

import contextlib
import logging

import torch

from core.monitor import fault_point
from core.plan.placement import check_codes, store
from core.plan.units import align, ring_bytes, unit_sizes, work_slots
from core.stream.packs import Pack, pinned, unpin, weight_of
from core.stream.ring import Region, Ring
from core.stream.schedule import CASTS, Schedule

log = logging.getLogger(__name__)
DEFAULT_CAST = "side"  # where casts run unless a caller says (a benchmark knob)


class Residency:
    """Applies placement codes (one per unit) to the units; `remove()` puts every weight back on the
    CPU and frees what it allocated.

    slots: compute-dtype work slots for cast units (one in use, the rest cast ahead).
    ring:  the copy ring's size, in units of the largest streamed pack (≥ 2).
    cast:  "side" (a high-priority stream, ahead of use) or "compute" (just before use, on the
           compute stream).
    """

    def __init__(
        self, units, codes: str, device: torch.device, dtype: torch.dtype, slots: int, ring: int, cast=None, keep=None
    ):
        check_codes(codes, len(units))
        self.keep = list(keep) if keep is not None else [False] * len(units)  # file-backed sources, given back
        cast = cast or DEFAULT_CAST
        if cast not in CASTS:
            raise ValueError(f"cast must be one of {CASTS}, got {cast!r}.")
        self.device, self.dtype, self.units, self.placement = device, dtype, units, codes
        self.stores = [store(c) for c in codes]
        cuda = device.type == "cuda"
        self.copy_stream = torch.cuda.Stream(device) if cuda else None
        self.cast_stream = torch.cuda.Stream(device, priority=-1) if cuda and cast == "side" else None
        self.hooks, self.packs = [], {}
        self.sources: dict[int, dict] = {}  # resident units' source tensors by parameter name, given back
        self.gpu_arena = self.host_arena = self.ring_buf = None
        self.work: list[torch.Tensor] = []
        try:
            self._place(units, codes, slots, ring)
        except BaseException:
            self.remove()  # a failure half-way (out of memory, no RAM to pin) leaves nothing behind
            raise
        self.cast_mode = cast
        self._new_schedule()
        for i, s in enumerate(self.stores):
            if s.managed:
                m = units[i][1]
                self.hooks.append(m.register_forward_pre_hook(lambda mod, args, i=i: self.schedule.before(i)))
                self.hooks.append(m.register_forward_hook(lambda mod, args, out, i=i: self.schedule.after(i)))

    def _new_schedule(self) -> None:
        nbytes = [self.packs[i].nbytes if i in self.packs else 0 for i in range(len(self.units))]
        ring_obj = Ring(self.ring_buf.numel()) if self.ring_buf is not None else None
        self.schedule = Schedule(self.stores, nbytes, ring_obj, len(self.work), self, self.cast_mode)

    def _place(self, units, codes: str, slots: int, ring: int) -> None:
        """Resident units onto the device; managed ones packed into the arenas (originals freed)."""
        device, dtype, cuda = self.device, self.dtype, self.device.type == "cuda"
        managed = [i for i, s in enumerate(self.stores) if s.managed]
        for i, (_, m) in enumerate(units):
            if self.stores[i].managed:
                self.packs[i] = Pack(m, self.stores[i].fmt, dtype, keep_source=self.keep[i])
            else:
                self._to_device(i)
        on_gpu = [i for i in managed if self.stores[i].resident]
        on_host = [i for i in managed if self.stores[i].streamed]
        self.gpu_arena = torch.empty(sum(align(self.packs[i].nbytes) for i in on_gpu), dtype=torch.uint8, device=device)
        self.host_arena = pinned(sum(align(self.packs[i].nbytes) for i in on_host), pin=cuda)
        fault_point("arenas")
        # streaming buffers, allocated once; they also serve as scratch while the packs are filled
        sizes = unit_sizes(units)  # the same arithmetic the plan counted this memory with
        n_work, work_numel = work_slots(sizes, codes, slots)
        self.work = [torch.empty(work_numel, dtype=dtype, device=device) for _ in range(n_work)]
        ring_total = ring_bytes(sizes, codes, dtype.itemsize, ring)
        self._m_b = ring_total // max(ring, 2)  # the largest streamed pack, aligned
        self.ring_buf = torch.empty(ring_total, dtype=torch.uint8, device=device) if ring_total else None
        goff = hoff = 0
        for i in managed:
            pack, s = self.packs[i], self.stores[i]
            if s.resident:
                buf, goff = self.gpu_arena[goff : goff + pack.nbytes], goff + align(pack.nbytes)
            else:
                buf, hoff = self.host_arena[hoff : hoff + pack.nbytes], hoff + align(pack.nbytes)
            self._fill(i, buf)
        if cuda and managed:
            torch.cuda.synchronize(device)

    def _to_device(self, i: int) -> None:
        """A plain resident unit onto the device (its source kept where it costs nothing)."""
        m = self.units[i][1]
        if self.keep[i]:  # by name, tensors only: holding the Parameters would keep their device copies
            # alive when the fast path replaces them (fused QKV drops to_q/k/v: 5 GiB at full size)
            self.sources[i] = {name: p.data for name, p in m.named_parameters()}
        for p in m.parameters():  # deferred GGUF weights: dequantized on the device itself
            p.data = weight_of(p, self.device, self.dtype)
        m.to(device=self.device, dtype=self.dtype)

    def _fill(self, i: int, buf: torch.Tensor) -> None:
        """Pack unit i's current weights into `buf`, its place in an arena (originals freed)."""
        pack, s, m_b, dtype = self.packs[i], self.stores[i], self._m_b, self.dtype
        if not s.cast:  # flatten in the ring's first part, stage through its second
            scratch, stage = self.ring_buf[:m_b].view(dtype), self.ring_buf[m_b : 2 * m_b]
        else:  # flatten in a work slot, stage (streamed, compressed) through the ring
            scratch, stage = self.work[0], self.ring_buf[:m_b] if s.streamed else None
        pack.fill(buf, scratch, stage)
        pack.point_params(self.work[0] if s.cast else self.ring_buf.view(dtype))

    # -- weights that change while placed (a LoRA) ----------------------------------------------
    def can_repack(self, idx, exact=()) -> bool:
        """Units `idx` can go back to the CPU and be packed again exactly: their sources are kept,
        their storage does not round (a lossy unit unpacked from its pack would be rounded twice), or
        the caller gives their exact weights (`exact`: unit indices, see take_back)."""
        return all(self.keep[i] or not self.stores[i].lossy() or i in exact for i in idx)

    def in_place(self, i: int) -> bool:
        """Unit i's weights can change where they are, on the device: a plain resident unit with no
        deferred file weight (those are merged on the CPU, where their source is)."""
        return not self.stores[i].managed and all(
            getattr(p, "quant_source", None) is None for p in self.units[i][1].parameters()
        )

    def changed_in_place(self, i: int, names) -> None:
        """Parameters `names` of in-place unit i changed on the device: the CPU tensors kept to give
        back on removal are stale, so removal copies these from the device instead."""
        src = self.sources.get(i)
        if src is not None:
            for name in names:
                src.pop(name, None)

    def take_back(self, idx, exact=None) -> None:
        """Units `idx` back on the CPU as remove() leaves them, their places in the arenas kept, so
        that their CPU weights can change; put_back(idx) packs them again. The rest stays placed.
        `exact` ({unit: {parameter name: tensor}}): a lossy unit's exact weights (its model's
        file, memory-mapped: no copy unless the dtype differs), which it takes instead of its
        rounded pack."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        for i in idx:
            if exact and i in exact:  # not unpacked first: its rounded weights would be thrown away
                for name, p in self.units[i][1].named_parameters():
                    p.data = exact[i][name].to(self.dtype)
            else:
                self._to_cpu(i)

    def put_back(self, idx) -> None:
        """Pack units `idx` again (same format, size and place in the arena). The learned prefetch
        order stays (the units and their sizes are the same); only what was prefetched is dropped."""
        for i in idx:
            if i in self.packs:
                self._fill(i, self.packs[i].buf)
            else:
                self._to_device(i)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.schedule.restart()  # nothing prefetched from the old weights survives; the order does

    # -- the schedule's device operations (core.stream.schedule.Ops) ----------------------------
    def _on(self, stream):
        return torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()

    @staticmethod
    def _event(stream):
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

    def _ring(self, region: Region, n: int) -> torch.Tensor:
        return self.ring_buf[region.start : region.start + n]

    def copy(self, unit: int, region: Region, waits: list) -> object:
        pack = self.packs[unit]
        with self._on(self.copy_stream):
            self._wait(self.copy_stream, waits)
            self._ring(region, pack.nbytes).copy_(pack.buf, non_blocking=True)
            return self._event(self.copy_stream)

    def cast(self, unit: int, slot: int, region: Region | None, waits: list, on_compute: bool) -> object:
        stream = self._compute() if on_compute else self.cast_stream
        pack = self.packs[unit]
        with self._on(stream):
            self._wait(stream, waits)
            pack.unpack_into(self.work[slot], None if region is None else self._ring(region, pack.nbytes))
            return self._event(stream)

    def use(self, unit: int, region: Region | None, slot: int | None, waits: list) -> None:
        self._wait(self._compute(), waits)
        pack = self.packs[unit]
        flat = self.work[slot] if slot is not None else self.ring_buf[region.start : region.end].view(self.dtype)
        pack.point_params(flat)

    def compute_done(self) -> object:
        return self._event(self._compute())

    # -- state and undo -------------------------------------------------------------------------
    @property
    def stats(self) -> dict:
        return self.schedule.stats

    def end_step(self) -> None:
        self.schedule.end_step()

    def remove(self) -> None:
        """Hooks off, every unit back on the CPU in the compute dtype (compressed units stay rounded
        unless their source was kept), every buffer and host registration released. Safe to call
        twice, and on a half-built one."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        for h in self.hooks:
            h.remove()
        self.hooks = []
        for i in range(len(self.units)):
            self._to_cpu(i)
        self.packs.clear()
        if self.host_arena is not None:
            unpin(self.host_arena)
        self.work, self.ring_buf, self.gpu_arena, self.host_arena = [], None, None, None

    def _to_cpu(self, i: int) -> None:
        m, pack = self.units[i][1], self.packs.get(i)
        if pack is not None and pack.restore():
            return
        if i in self.sources:  # the fast path is undone first: the names are the original ones
            src = self.sources.pop(i)
            for name, p in m.named_parameters():
                if name in src and src[name].shape == p.shape:
                    p.data = src[name]
            m.to("cpu")  # anything without a source of that name
        elif pack is None:
            m.to("cpu")
        elif pack.buf is not None:  # packed: unpack back into plain CPU parameters
            pack.point_params(self._unpacked(pack, self.stores[i].streamed))
        else:  # not packed yet (a failure while placing): the module still holds its weights
            m.to("cpu")

    def _unpacked(self, pack: Pack, on_host: bool) -> torch.Tensor:
        """A pack's weights as a flat CPU tensor in the compute dtype. Cast on the device where it
        has room (fast); after an out-of-memory it has none, so then on the CPU: a release must
        never need the memory whose lack it is recovering from."""
        try:
            flat = torch.empty(pack.numel, dtype=self.dtype, device=self.device)
            pack.unpack_into(flat, pack.buf.to(self.device) if on_host else pack.buf)
            return flat.cpu()
        except torch.OutOfMemoryError:
            flat = torch.empty(pack.numel, dtype=self.dtype)
            pack.unpack_into(flat, pack.buf.cpu())
            return flat

    @property
    def gpu_bytes_buffers(self) -> int:
        total = sum(w.numel() * w.element_size() for w in self.work)
        return total + (self.ring_buf.numel() if self.ring_buf is not None else 0)

    @property
    def gpu_bytes(self) -> int:
        """Bytes this residency holds on the GPU (resident units, compressed packs, slots, ring)."""
        total = self.gpu_arena.numel() if self.gpu_arena is not None else 0
        total += self.gpu_bytes_buffers
        es = self.dtype.itemsize
        total += sum(
            sum(p.numel() for p in m.parameters()) * es for (_, m), s in zip(self.units, self.stores) if not s.managed
        )
        return total
