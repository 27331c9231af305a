"""Where streamed and fp8 weights live: one flat pack per unit, and the pinned host arena."""

from __future__ import annotations

import torch
from torch import nn

from core.monitor import HostOutOfMemory, fault_point
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


_REGISTERED: dict[int, int] = {}  # data_ptr -> bytes of every host buffer registered with CUDA


def pinned(nbytes: int, pin: bool) -> torch.Tensor:
    """Host memory for streamed weights. Registered with cudaHostRegister at its exact size (the
    caching host allocator would round a 13 GB request up to 16 GB). A failure to allocate or to
    register is HostOutOfMemory (the plan needs less host RAM), never a half-registered buffer."""
    try:
        t = torch.empty(nbytes, dtype=torch.uint8)
    except RuntimeError as e:  # malloc refused (a cgroup or ulimit below the plan's need)
        raise HostOutOfMemory(f"could not allocate {nbytes / 2**30:.1f} GiB of host RAM for streamed weights") from e
    if nbytes:
        fault_point("pin")
    if pin and nbytes:
        rc = torch.cuda.cudart().cudaHostRegister(t.data_ptr(), nbytes, 0)
        if int(rc) != 0:
            torch.cuda.cudart().cudaGetLastError()  # clear it: the failure is ours to report, not sticky
            raise HostOutOfMemory(f"could not pin {nbytes / 2**30:.1f} GiB of host RAM for streamed weights ({rc})")
        _REGISTERED[t.data_ptr()] = nbytes
    return t


def unpin(t: torch.Tensor) -> None:
    """Undo pinned(): idempotent, and a no-op for memory that was never registered."""
    if _REGISTERED.pop(t.data_ptr(), None) is not None:
        torch.cuda.cudart().cudaHostUnregister(t.data_ptr())


def registered_bytes() -> int:
    """Host bytes registered with CUDA now (tests check that recovery leaves none behind)."""
    return sum(_REGISTERED.values())
