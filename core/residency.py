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
from dataclasses import dataclass

import torch
from torch import nn

log = logging.getLogger(__name__)
FP8 = torch.float8_e4m3fn
CODES = "BFSQ"
CASTS = ("side", "compute")
DEFAULT_CAST = "side"      # where casts run unless a caller says (a benchmark knob)


@dataclass(frozen=True)
class UnitSize:
    name: str
    numel: int        # all parameters of the unit
    fp8_numel: int    # the part stored as fp8 when the unit is F or Q (Linear weights)


def block_lists(transformer, controlnet) -> list[tuple[str, nn.ModuleList]]:
    """Transformer-block lists in execution order: the ControlNet runs first in every step."""
    out = []
    for prefix, model in (("controlnet", controlnet), ("transformer", transformer)):
        for attr in ("transformer_blocks", "single_transformer_blocks"):
            blocks = getattr(model, attr, None)
            if blocks is not None and len(blocks):
                out.append((f"{prefix}.{attr}", blocks))
    return out


def denoiser_units(transformer, controlnet) -> list[tuple[str, nn.Module]]:
    """(name, module) of every unit, in execution order."""
    units = []
    for prefix, blocks in block_lists(transformer, controlnet):
        for i, block in enumerate(blocks):
            for child_name, child in block.named_children():
                if any(True for _ in child.parameters()):
                    units.append((f"{prefix}.{i}.{child_name}", child))
    return units


def text_encoder_units(t5) -> list[tuple[str, nn.Module]]:
    """The T5 encoder's Linear layers, in execution order (q, k, v, o, wi_0, wi_1, wo per block):
    streamed through the same ring as the denoiser while a prompt is encoded."""
    return [(f"text_encoder_2.block.{i}.{n}", m) for i, block in enumerate(t5.encoder.block)
            for n, m in block.named_modules() if isinstance(m, nn.Linear)]


def _fp8_params(module: nn.Module) -> set[int]:
    return {id(m.weight) for m in module.modules() if isinstance(m, nn.Linear)}


def unit_sizes(units) -> list[UnitSize]:
    out = []
    for name, m in units:
        f8 = _fp8_params(m)
        out.append(UnitSize(name, sum(p.numel() for p in m.parameters()),
                            sum(p.numel() for p in m.parameters() if id(p) in f8)))
    return out


def _align(n: int, a: int = 256) -> int:
    return (n + a - 1) // a * a


def packed_bytes(numel: int, fp8_numel: int, es: int, fp8: bool) -> int:
    """Bytes of one unit's pack: [fp8 part (aligned) | compute-dtype part]."""
    n8 = fp8_numel if fp8 else 0
    return _align(n8) + (numel - n8) * es if n8 else numel * es


def buffer_bytes(units: list[UnitSize], placement: str, es: int, slots: int, ring: int) -> int:
    """GPU bytes of the streaming buffers: `slots` work slots of the largest F/Q unit (compute dtype)
    plus a ring of `ring` times the largest S/Q pack. The plan and Residency both use this."""
    cast = [u.numel for u, c in zip(units, placement) if c in "FQ"]
    moved = [packed_bytes(u.numel, u.fp8_numel, es, c == "Q") for u, c in zip(units, placement) if c in "SQ"]
    work = min(max(slots, 1), len(cast)) * max(cast) * es if cast else 0
    return work + (_align(max(moved)) * max(ring, 2) if moved else 0)


class _Packed:
    """One unit's weights as one flat byte buffer: [fp8 part | compute-dtype part], a view into an
    arena (GPU for F, pinned host for S/Q) so that thousands of packs cost two allocations and the
    allocator never fragments."""

    def __init__(self, module: nn.Module, fp8: bool, dtype: torch.dtype):
        f8 = _fp8_params(module) if fp8 else set()
        params = [p for p in module.parameters()]
        params.sort(key=lambda p: id(p) not in f8)       # fp8 part first
        self.params = params
        self.n8 = sum(p.numel() for p in params if id(p) in f8)
        self.numel = sum(p.numel() for p in params)
        self.dtype = dtype
        self.esize = torch.empty((), dtype=dtype).element_size()
        self.off = _align(self.n8) if self.n8 else 0     # byte offset of the compute-dtype part
        self.nbytes = self.off + (self.numel - self.n8) * self.esize
        self.buf: torch.Tensor | None = None

    def fill(self, buf: torch.Tensor, scratch: torch.Tensor, stage: torch.Tensor | None) -> None:
        """Write the module's current weights into `buf` (nbytes), casting on scratch's device
        (through `stage`, a GPU byte buffer, when buf is host memory)."""
        off = 0
        for p in self.params:  # flatten in pack order into the scratch buffer
            n = p.numel()
            scratch[off:off + n].copy_(p.data.reshape(-1))
            off += n
        tmp = buf if buf.device == scratch.device else stage
        tmp[:self.n8].view(FP8).copy_(scratch[:self.n8])
        tmp[self.off:self.nbytes].view(self.dtype).copy_(scratch[self.n8:self.numel])
        if tmp is not buf:
            buf.copy_(tmp[:self.nbytes])
        self.buf = buf

    def unpack_into(self, dst: torch.Tensor, src: torch.Tensor | None = None) -> None:
        """Cast the packed bytes (self.buf or a copy of it) into a flat compute-dtype tensor."""
        src = self.buf if src is None else src
        if self.n8:
            dst[:self.n8].copy_(src[:self.n8].view(FP8), non_blocking=True)
        dst[self.n8:self.numel].copy_(src[self.off:self.nbytes].view(self.dtype), non_blocking=True)

    def point_params(self, flat: torch.Tensor) -> None:
        off = 0
        for p in self.params:
            n = p.numel()
            p.data = flat[off:off + n].view(p.shape)
            off += n


def _pinned(nbytes: int, pin: bool) -> torch.Tensor:
    """Host memory for streamed weights. Registered with cudaHostRegister at its exact size (the
    caching host allocator would round a 13 GB request up to 16 GB)."""
    t = torch.empty(nbytes, dtype=torch.uint8)
    if pin and nbytes:
        rc = torch.cuda.cudart().cudaHostRegister(t.data_ptr(), nbytes, 0)
        if int(rc) != 0:
            raise RuntimeError(f"cudaHostRegister of {nbytes / 2**30:.1f} GiB failed ({rc}): not enough host RAM to pin")
    return t


class _Ring:
    """A circular byte buffer handed out in order. A region is reused once its last reader has
    released it; `alloc` returns the events the writer must wait for (None: still in use)."""

    def __init__(self, size: int):
        self.size, self.head = size, 0
        self.live: deque[list] = deque()   # [start, end, released, event] in allocation order

    def alloc(self, n: int):
        if n > self.size:
            raise ValueError(f"a {n}-byte unit does not fit the {self.size}-byte ring")
        wrap = self.head + n > self.size
        spans = [(self.head, self.size), (0, n)] if wrap else [(self.head, self.head + n)]
        waits, k = [], 0
        for r in self.live:  # the regions in the way are the oldest ones
            if not any(r[0] < b and a < r[1] for a, b in spans):
                break
            if not r[2]:
                return None
            k += 1
        for _ in range(k):
            r = self.live.popleft()
            if r[3] is not None:
                waits.append(r[3])
        start = 0 if wrap else self.head
        region = [start, start + n, False, None]
        self.live.append(region)
        self.head = start + _align(n)
        return region, waits

    @staticmethod
    def release(region: list, event) -> None:
        region[2], region[3] = True, event


class Residency:
    """Applies a placement to the denoiser units; `remove()` puts every weight back on the CPU.

    slots: compute-dtype work slots for F/Q units (one in use, the rest cast ahead).
    ring:  the copy ring's size, in units of the largest streamed pack (≥ 2).
    cast:  "side" (a high-priority stream, ahead of use) or "compute" (just before use, on the
           compute stream).
    """

    def __init__(self, units, placement: str, device: torch.device, dtype: torch.dtype,
                 slots: int = 2, ring: int = 6, cast: str | None = None):
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
        self.packs: dict[int, _Packed] = {}
        self.hooks = []
        self.stats = dict(hits=0, misses=0, copied_bytes=0)
        managed = [i for i, c in enumerate(placement) if c != "B"]
        for i, (_, m) in enumerate(units):
            if placement[i] == "B":
                m.to(device=device, dtype=dtype)
            else:
                self.packs[i] = _Packed(m, fp8=placement[i] in "FQ", dtype=dtype)
        es = torch.empty((), dtype=dtype).element_size()
        # pack every managed unit: F into a GPU arena, S/Q into one pinned host arena
        self.gpu_arena = torch.empty(sum(_align(self.packs[i].nbytes) for i in managed if placement[i] == "F"),
                                     dtype=torch.uint8, device=device)
        self.host_arena = _pinned(sum(_align(self.packs[i].nbytes) for i in managed if placement[i] in "SQ"),
                                  pin=cuda)
        self._pinned = cuda and self.host_arena.numel() > 0
        # streaming buffers, allocated once; they also serve as scratch while the packs are filled
        cast_n = [self.packs[i].numel for i in managed if placement[i] in "FQ"]
        moved = [self.packs[i].nbytes for i in managed if placement[i] in "SQ"]
        self.work = [torch.empty(max(cast_n), dtype=dtype, device=device)
                     for _ in range(min(max(slots, 1), len(cast_n)))] if cast_n else []
        m_b = _align(max(moved)) if moved else 0
        self.ring_buf = torch.empty(m_b * max(ring, 2), dtype=torch.uint8, device=device) if moved else None
        self.ring = _Ring(self.ring_buf.numel()) if moved else None
        goff = hoff = 0
        for i in managed:
            pack, code = self.packs[i], placement[i]
            if code == "F":
                buf, goff = self.gpu_arena[goff:goff + pack.nbytes], goff + _align(pack.nbytes)
            else:
                buf, hoff = self.host_arena[hoff:hoff + pack.nbytes], hoff + _align(pack.nbytes)
            if code == "S":  # flatten in the ring's first part, stage through its second
                scratch, stage = self.ring_buf[:m_b].view(dtype), self.ring_buf[m_b:2 * m_b]
            else:            # flatten in a work slot, stage (Q) through the ring
                scratch, stage = self.work[0], self.ring_buf[:m_b] if code == "Q" else None
            pack.fill(buf, scratch, stage)
            pack.point_params(self.work[0] if code in "FQ" else self.ring_buf.view(dtype))  # originals freed
        if cuda and managed:
            torch.cuda.synchronize(device)
        # the plan's memory model counts exactly these buffers
        assert self.gpu_bytes_buffers == buffer_bytes(unit_sizes(units), placement, es, slots, ring)
        self.free_slots: deque[tuple[int, object]] = deque((s, None) for s in range(len(self.work)))
        # per scheduled position: what is ready for it
        self.fetched: dict[int, tuple[list, object]] = {}   # pos -> (ring region, copied event)
        self.casted: dict[int, tuple[int, object]] = {}     # pos -> (work slot, cast event)
        self.schedule = managed[:]            # predicted order of managed units (cyclic)
        self.trace: list[int] = []
        self.cur = -1                         # absolute position of the unit in use
        self.fetch_k = self.cast_k = 0        # next positions the copy / cast pipelines consider
        self.in_use: tuple | None = None      # (unit, ring region or None, work slot or None, in the order?)
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
        dst = self.ring_buf[region[0]:region[0] + pack.nbytes]
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
                pack.unpack_into(self.work[slot], self.ring_buf[region[0]:region[0] + pack.nbytes])
                _Ring.release(region, self._event(stream))   # the ring bytes are free once cast
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
            _Ring.release(self.fetched.pop(pos)[0], None)
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
        if pos is None:      # not in the learned order (first step, text encoder): load on demand
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
            self.packs[i].point_params(self.ring_buf[region[0]:region[1]].view(self.dtype))
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
            _Ring.release(region, evt)
        if slot is not None:
            self.free_slots.append((slot, evt))
        self.in_use = None
        return known

    def _after(self, i: int) -> None:
        if self._release():  # after a unit outside the order (text encoder), nothing is prepared:
            self._pump()     # the next ones may not be in the order either

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
        total += sum(sum(p.numel() for p in m.parameters()) * es
                     for i, (_, m) in enumerate(self.units) if self.placement[i] == "B")
        return total
