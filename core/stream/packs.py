"""Where streamed and fp8 weights live: one flat pack per unit, a pinned host arena, and the
circular GPU ring that copies land in (used by core.residency)."""

from __future__ import annotations

from collections import deque

import torch
from torch import nn

from core.plan.units import align, fp8_params, packed_bytes

FP8 = torch.float8_e4m3fn


class Pack:
    """One unit's weights as one flat byte buffer: [fp8 part | compute-dtype part], a view into an
    arena (GPU for F, pinned host for S/Q) so that thousands of packs cost two allocations and the
    allocator never fragments."""

    def __init__(self, module: nn.Module, fp8: bool, dtype: torch.dtype):
        f8 = fp8_params(module) if fp8 else set()
        params = [p for p in module.parameters()]
        params.sort(key=lambda p: id(p) not in f8)  # fp8 part first
        self.params = params
        self.n8 = sum(p.numel() for p in params if id(p) in f8)
        self.numel = sum(p.numel() for p in params)
        self.dtype = dtype
        self.off = align(self.n8) if self.n8 else 0  # byte offset of the compute-dtype part
        self.nbytes = packed_bytes(self.numel, self.n8, dtype.itemsize, fp8)
        self.buf: torch.Tensor | None = None

    def fill(self, buf: torch.Tensor, scratch: torch.Tensor, stage: torch.Tensor | None) -> None:
        """Write the module's current weights into `buf` (nbytes), casting on scratch's device
        (through `stage`, a GPU byte buffer, when buf is host memory)."""
        off = 0
        for p in self.params:  # flatten in pack order into the scratch buffer
            n = p.numel()
            scratch[off : off + n].copy_(p.data.reshape(-1))
            off += n
        tmp = buf if buf.device == scratch.device else stage
        tmp[: self.n8].view(FP8).copy_(scratch[: self.n8])
        tmp[self.off : self.nbytes].view(self.dtype).copy_(scratch[self.n8 : self.numel])
        if tmp is not buf:
            buf.copy_(tmp[: self.nbytes])
        self.buf = buf

    def unpack_into(self, dst: torch.Tensor, src: torch.Tensor | None = None) -> None:
        """Cast the packed bytes (self.buf or a copy of it) into a flat compute-dtype tensor."""
        src = self.buf if src is None else src
        if self.n8:
            dst[: self.n8].copy_(src[: self.n8].view(FP8), non_blocking=True)
        dst[self.n8 : self.numel].copy_(src[self.off : self.nbytes].view(self.dtype), non_blocking=True)

    def point_params(self, flat: torch.Tensor) -> None:
        off = 0
        for p in self.params:
            n = p.numel()
            p.data = flat[off : off + n].view(p.shape)
            off += n


def pinned(nbytes: int, pin: bool) -> torch.Tensor:
    """Host memory for streamed weights. Registered with cudaHostRegister at its exact size (the
    caching host allocator would round a 13 GB request up to 16 GB)."""
    t = torch.empty(nbytes, dtype=torch.uint8)
    if pin and nbytes:
        rc = torch.cuda.cudart().cudaHostRegister(t.data_ptr(), nbytes, 0)
        if int(rc) != 0:
            raise RuntimeError(
                f"cudaHostRegister of {nbytes / 2**30:.1f} GiB failed ({rc}): not enough host RAM to pin"
            )
    return t


class Ring:
    """A circular byte buffer handed out in order. A region is reused once its last reader has
    released it; `alloc` returns the events the writer must wait for (None: still in use)."""

    def __init__(self, size: int):
        self.size, self.head = size, 0
        self.live: deque[list] = deque()  # [start, end, released, event] in allocation order

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
        self.head = start + align(n)
        return region, waits

    @staticmethod
    def release(region: list, event) -> None:
        region[2], region[3] = True, event
