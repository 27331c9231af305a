"""Which denoiser weights stay on the GPU and which stream from pinned host memory.

The denoiser (ControlNet + transformer) is cut into *units*: the children of every transformer
block (attention, feed-forward, modulation), at most ~75 M parameters each. A plan gives every unit
one placement:

  B  resident in the compute dtype (no cost per step)
  F  resident as fp8, cast into a compute-dtype work slot before use (half the memory)
  S  streamed: compute-dtype copy in pinned host RAM, copied into a work slot before use
  Q  streamed as fp8: half the bus bytes and half the host RAM, cast after the copy

Copies and casts run on a side CUDA stream into a small ring of work slots, ahead of use along the
order the units ran in the previous step, so they overlap the compute of the resident units in
between (the plan spreads streamed units evenly for that). diffusers' group offloading streams
*every* block and casts layer by layer on the compute stream; what it lacks is exactly this mix of
resident and streamed units with block-level casts off the compute stream.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

log = logging.getLogger(__name__)
FP8 = torch.float8_e4m3fn
CODES = "BFSQ"


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
    streamed through the same slots as the denoiser while a prompt is encoded."""
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
        self.off = _align(self.n8)                       # byte offset of the compute-dtype part
        self.nbytes = self.off + (self.numel - self.n8) * self.esize
        self.buf: torch.Tensor | None = None

    def fill(self, buf: torch.Tensor, scratch: torch.Tensor, stage: torch.Tensor | None) -> None:
        """Write the module's current weights into `buf` (nbytes), casting on scratch's device
        (through `stage`, a GPU byte buffer, when buf is host memory)."""
        off = 0
        for p in self.params:  # flatten in pack order into the scratch work slot
            n = p.numel()
            scratch[off:off + n].copy_(p.data.reshape(-1))
            off += n
        # cast where the scratch is (the GPU), through the staging buffer when buf is host memory
        tmp = buf if buf.device == scratch.device else stage
        tmp[:self.n8].view(FP8).copy_(scratch[:self.n8])
        tmp[self.off:self.nbytes].view(self.dtype).copy_(scratch[self.n8:self.numel])
        if tmp is not buf:
            buf.copy_(tmp[:self.nbytes])
        self.buf = buf

    def unpack_into(self, dst: torch.Tensor, src: torch.Tensor | None = None) -> None:
        """Cast the packed bytes (self.buf or a staged copy of it) into a flat compute-dtype tensor."""
        src = self.buf if src is None else src
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


class Residency:
    """Applies a placement to the denoiser units; `remove()` puts every weight back on the CPU."""

    def __init__(self, units, placement: str, device: torch.device, dtype: torch.dtype,
                 slots: int = 3):
        if len(placement) != len(units) or set(placement) - set(CODES):
            raise ValueError(f"placement must have one of {CODES} per unit ({len(units)}), got {len(placement)}.")
        self.device, self.dtype = device, dtype
        self.units = units
        self.placement = placement
        cuda = device.type == "cuda"
        self.stream = torch.cuda.Stream(device) if cuda else None
        self.packs: dict[int, _Packed] = {}
        self.hooks = []
        self.stats = dict(hits=0, misses=0, copied_bytes=0)
        managed = [i for i, c in enumerate(placement) if c != "B"]
        for i, (_, m) in enumerate(units):
            if placement[i] == "B":
                m.to(device=device, dtype=dtype)
            else:
                self.packs[i] = _Packed(m, fp8=placement[i] in "FQ", dtype=dtype)
        # every GPU buffer is allocated once, up front: work slots, staging, the fp8 arena
        n_slots = min(slots, len(managed)) if managed else 0
        maxn = max((self.packs[i].numel for i in managed), default=0)
        self.work = [torch.empty(maxn, dtype=dtype, device=device) for _ in range(n_slots)]
        max_stage = max((self.packs[i].nbytes for i in managed), default=0)
        self.staging = torch.empty(max_stage, dtype=torch.uint8, device=device) if cuda and max_stage else None
        self.gpu_arena = torch.empty(sum(_align(self.packs[i].nbytes) for i in managed if placement[i] == "F"),
                                     dtype=torch.uint8, device=device)
        self.host_arena = _pinned(sum(_align(self.packs[i].nbytes) for i in managed if placement[i] in "SQ"),
                                  pin=cuda)
        self._pinned = cuda and self.host_arena.numel() > 0
        goff = hoff = 0
        for i in managed:
            pack = self.packs[i]
            if placement[i] == "F":
                buf, goff = self.gpu_arena[goff:goff + pack.nbytes], goff + _align(pack.nbytes)
            else:
                buf, hoff = self.host_arena[hoff:hoff + pack.nbytes], hoff + _align(pack.nbytes)
            pack.fill(buf, self.work[0], self.staging)
        if cuda:
            torch.cuda.synchronize(device)
        for i in managed:  # params point into slot 0 until loaded; the CPU originals are freed
            self.packs[i].point_params(self.work[0])
        self.slot_of: dict[int, int] = {}         # unit -> slot holding (or receiving) it
        self.ready: dict[int, torch.cuda.Event] = {}
        self.free_evt: list[torch.cuda.Event | None] = [None] * n_slots
        self.free_slots = list(range(n_slots))
        self.in_use: int | None = None
        self.schedule = managed[:]                # predicted order of managed units
        self.trace: list[int] = []
        self.pos = 0
        for i in managed:
            m = units[i][1]
            self.hooks.append(m.register_forward_pre_hook(lambda mod, args, i=i: self._before(i)))
            self.hooks.append(m.register_forward_hook(lambda mod, args, out, i=i: self._after(i)))

    # -- loading ------------------------------------------------------------------------------
    def _load(self, i: int) -> None:
        """Copy (S, Q) and cast (F, Q) unit i into a free work slot, on the side stream."""
        slot = self.free_slots.pop(0)
        pack, code, dst = self.packs[i], self.placement[i], self.work[slot]
        if self.stream is None:  # CPU: synchronous, same arithmetic
            pack.unpack_into(dst)
        else:
            with torch.cuda.stream(self.stream):
                if self.free_evt[slot] is not None:  # the slot's last unit has finished computing
                    self.stream.wait_event(self.free_evt[slot])
                if code == "Q":  # fp8 bytes over the bus, cast on the GPU
                    stage = self.staging[:pack.nbytes]
                    stage.copy_(pack.buf, non_blocking=True)
                    pack.unpack_into(dst, stage)
                else:            # S: straight from pinned memory; F: cast from GPU memory
                    pack.unpack_into(dst)
                evt = torch.cuda.Event()
                evt.record(self.stream)
                self.ready[i] = evt
        if code in "SQ":
            self.stats["copied_bytes"] += pack.nbytes
        self.slot_of[i] = slot

    def _prefetch(self) -> None:
        n = len(self.schedule)
        k = 1
        while self.free_slots and k <= n:
            j = self.schedule[(self.pos + k) % n]
            if j not in self.slot_of:
                self._load(j)
            k += 1

    def _before(self, i: int) -> None:
        if self.in_use is not None:  # a unit ran without its post-hook (exception): release it
            self._release(self.in_use)
        self.trace.append(i)
        n = len(self.schedule)
        for k in range(n):  # follow the predicted order; tolerate surprises
            if self.schedule[(self.pos + k) % n] == i:
                self.pos = (self.pos + k) % n
                break
        if i in self.slot_of:
            self.stats["hits"] += 1
        else:
            self.stats["misses"] += 1
            if not self.free_slots:  # evict the prefetched unit predicted furthest ahead
                victim = max(self.slot_of, key=lambda u: self._distance(u))
                self._release(victim)
            self._load(i)
        if self.stream is not None and i in self.ready:
            torch.cuda.current_stream(self.device).wait_event(self.ready.pop(i))
        self.packs[i].point_params(self.work[self.slot_of[i]])
        self.in_use = i
        self._prefetch()

    def _distance(self, u: int) -> int:
        n = len(self.schedule)
        for k in range(n):
            if self.schedule[(self.pos + k) % n] == u:
                return k
        return n

    def _release(self, i: int) -> None:
        slot = self.slot_of.pop(i)
        self.ready.pop(i, None)
        if self.stream is not None:
            evt = torch.cuda.Event()
            evt.record(torch.cuda.current_stream(self.device))
            self.free_evt[slot] = evt
        self.free_slots.append(slot)
        if self.in_use == i:
            self.in_use = None

    def _after(self, i: int) -> None:
        self._release(i)
        self._prefetch()

    def end_step(self) -> None:
        """Called once per denoising step: the order just seen predicts the next step."""
        if self.trace:
            self.schedule, self.trace = self.trace, []
            self.pos = len(self.schedule) - 1

    # -- undo ---------------------------------------------------------------------------------
    def remove(self) -> None:
        """Hooks off, every unit back on the CPU in the compute dtype (fp8 units stay fp8-rounded)."""
        if self.stream is not None:
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
        self.work, self.staging, self.slot_of, self.ready = [], None, {}, {}
        self.gpu_arena = self.host_arena = None

    @property
    def gpu_bytes(self) -> int:
        """Bytes this residency holds on the GPU (resident units, fp8 packs, slots, staging)."""
        total = self.gpu_arena.numel() if self.gpu_arena is not None else 0
        total += sum(w.numel() * w.element_size() for w in self.work)
        total += self.staging.numel() if self.staging is not None else 0
        es = torch.empty((), dtype=self.dtype).element_size()
        total += sum(sum(p.numel() for p in m.parameters()) * es
                     for i, (_, m) in enumerate(self.units) if self.placement[i] == "B")
        return total
