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


def _fp8_params(module: nn.Module) -> set[int]:
    return {id(m.weight) for m in module.modules() if isinstance(m, nn.Linear)}


def unit_sizes(units) -> list[UnitSize]:
    out = []
    for name, m in units:
        f8 = _fp8_params(m)
        out.append(UnitSize(name, sum(p.numel() for p in m.parameters()),
                            sum(p.numel() for p in m.parameters() if id(p) in f8)))
    return out


class _Packed:
    """One unit's weights as one flat byte buffer: [fp8 part | compute-dtype part].
    Packing and unpacking run on `work_device` (the GPU casts 12 B parameters in seconds)."""

    def __init__(self, module: nn.Module, fp8: bool, dtype: torch.dtype, where: str, pin: bool,
                 work_device: torch.device):
        f8 = _fp8_params(module) if fp8 else set()
        params = [p for p in module.parameters()]
        params.sort(key=lambda p: id(p) not in f8)       # fp8 part first
        self.params = params
        self.n8 = sum(p.numel() for p in params if id(p) in f8)
        self.numel = sum(p.numel() for p in params)
        self.esize = torch.empty((), dtype=dtype).element_size()
        self.nbytes = self.n8 + (self.numel - self.n8) * self.esize
        self.dtype = dtype
        buf = torch.empty(self.nbytes, dtype=torch.uint8, device=work_device)
        off8, offr = 0, self.n8
        for p in params:
            n = p.numel()
            src = p.data.reshape(-1).to(work_device, non_blocking=True)
            if id(p) in f8:
                buf[off8:off8 + n].view(FP8).copy_(src)
                off8 += n
            else:
                buf[offr:offr + n * self.esize].view(dtype).copy_(src)
                offr += n * self.esize
        if where == "cpu" and buf.device.type != "cpu":
            host = torch.empty(self.nbytes, dtype=torch.uint8, pin_memory=pin)
            host.copy_(buf)
            buf = host
        self.buf = buf

    def unpack_into(self, dst: torch.Tensor, src: torch.Tensor | None = None) -> None:
        """Cast the packed bytes (self.buf or a staged copy of it) into a flat compute-dtype tensor."""
        src = self.buf if src is None else src
        dst[:self.n8].copy_(src[:self.n8].view(FP8), non_blocking=True)
        dst[self.n8:self.numel].copy_(src[self.n8:self.nbytes].view(self.dtype), non_blocking=True)

    def unpack_to_cpu(self, work_device: torch.device) -> torch.Tensor:
        flat = torch.empty(self.numel, dtype=self.dtype, device=work_device)
        self.unpack_into(flat, self.buf.to(work_device))
        return flat.cpu()

    def point_params(self, flat: torch.Tensor) -> None:
        off = 0
        for p in self.params:
            n = p.numel()
            p.data = flat[off:off + n].view(p.shape)
            off += n


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
            code = placement[i]
            if code == "B":
                m.to(device=device, dtype=dtype)
                continue
            where = str(device) if code == "F" else "cpu"
            self.packs[i] = _Packed(m, fp8=code in "FQ", dtype=dtype, where=where,
                                    pin=cuda and code in "SQ", work_device=device)
        n_slots = min(slots, len(managed)) if managed else 0
        maxn = max((self.packs[i].numel for i in managed), default=0)
        self.work = [torch.empty(maxn, dtype=dtype, device=device) for _ in range(n_slots)]
        max_stage = max((self.packs[i].nbytes for i in managed if placement[i] == "Q"), default=0)
        self.staging = torch.empty(max_stage, dtype=torch.uint8, device=device) if cuda and max_stage else None
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
            pack.point_params(pack.unpack_to_cpu(self.device))
        self.packs.clear()
        self.work, self.staging, self.slot_of, self.ready = [], None, {}, {}

    @property
    def gpu_bytes(self) -> int:
        """Bytes this residency holds on the GPU (resident units, fp8 packs, slots, staging)."""
        total = sum(p.buf.numel() for i, p in self.packs.items() if self.placement[i] == "F")
        total += sum(w.numel() * w.element_size() for w in self.work)
        total += self.staging.numel() if self.staging is not None else 0
        es = torch.empty((), dtype=self.dtype).element_size()
        total += sum(sum(p.numel() for p in m.parameters()) * es
                     for i, (_, m) in enumerate(self.units) if self.placement[i] == "B")
        return total
