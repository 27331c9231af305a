"""Where streamed and compressed weights live: one flat pack per unit, and the pinned host arena."""

from __future__ import annotations

import bisect

import torch
from torch import nn

from core.checkpoints import deferred, native_fp8, scaled
from core.monitor import HostOutOfMemory, fault_point
from core.plan.units import align, compressed_params, packed_bytes, part_bytes
from core.stream import q4

FP8 = torch.float8_e4m3fn


class Pack:
    """One unit's weights as one flat byte buffer: [compressed part (fp8 or Q4_0) | compute-dtype
    part], a view into an arena (GPU for resident, pinned host for streamed units) so that thousands
    of packs cost two allocations and the allocator never fragments.

    keep_source: keep the parameters' own tensors and give them back on restore(). The residency
    asks for it when they are file-backed (memory-mapped safetensors): they cost no anonymous RAM,
    the kernel drops their pages under pressure, and a release is exact and copies nothing."""

    def __init__(self, module: nn.Module, fmt: str, dtype: torch.dtype, keep_source: bool = False):
        comp = compressed_params(module, fmt)
        params = [p for p in module.parameters()]
        params.sort(key=lambda p: id(p) not in comp)  # compressed part first
        self.params, self.fmt, self.dtype = params, fmt, dtype
        self.n8 = sum(p.numel() for p in params if id(p) in comp)  # values in the compressed part
        self.numel = sum(p.numel() for p in params)
        self.off = align(part_bytes(self.n8, fmt, dtype.itemsize)) if self.n8 else 0  # compute-dtype part
        self.nbytes = packed_bytes(self.numel, self.n8, dtype.itemsize, fmt)
        self.sources = [p.data for p in params] if keep_source else None
        self.scales: list[tuple[int, int, float]] = []  # (start, end, scale) of scaled fp8 file weights
        self.buf: torch.Tensor | None = None

    def _n_comp(self) -> int:
        """How many of self.params (the first ones) form the compressed part."""
        n = k = 0
        while n < self.n8:
            n += self.params[k].numel()
            k += 1
        return k

    def restore(self) -> bool:
        """Point the parameters back at their source tensors; False if none were kept."""
        if self.sources is None:
            return False
        for p, src in zip(self.params, self.sources):
            p.data = src
        return True

    def fill(self, buf: torch.Tensor, scratch: torch.Tensor, stage: torch.Tensor | None) -> None:
        """Write the module's current weights into `buf` (nbytes), casting on scratch's device
        (through `stage`, a GPU byte buffer, when buf is host memory). Deferred GGUF weights are
        dequantized on that device; a 4-bit part made only of Q4_0 weights is their bytes as they are,
        and so is an fp8 part's float8_e4m3fn file weight (its scale applied when cast)."""
        comp = self.params[: self._n_comp()]
        raw = self.fmt == "q4" and self.n8 and all(_q4_0(p) for p in comp)
        tmp = buf if buf.device == scratch.device else stage
        self.scales = []
        off = 0
        for p in self.params:  # flatten in pack order into the scratch buffer
            n, fp8 = p.numel(), self.fmt == "fp8" and off < self.n8
            src = native_fp8(p) if fp8 else None
            if src is not None:  # the file's bytes: no compute-dtype intermediate, no second rounding
                tmp[off : off + n].copy_(src.data.view(torch.uint8).reshape(-1))
                if src.scale != 1.0:
                    self.scales.append((off, off + n, src.scale))
            elif not (raw and off < self.n8):
                scratch[off : off + n].copy_(weight_of(p, scratch.device, scratch.dtype).reshape(-1))
                if fp8:
                    tmp[off : off + n].view(FP8).copy_(scratch[off : off + n])
            off += n
        if raw:
            at = 0
            for p in comp:
                b = deferred(p).data.reshape(-1)
                tmp[at : at + b.numel()].copy_(b)
                at += b.numel()
        elif self.fmt == "q4" and self.n8:
            q4.quantize_into(tmp[: q4.q4_bytes(self.n8)], scratch[: self.n8])
        tmp[self.off : self.nbytes].view(self.dtype).copy_(scratch[self.n8 : self.numel])
        if tmp is not buf:
            buf.copy_(tmp[: self.nbytes])
        if self.sources is not None:  # what it was filled from (a LoRA may have changed it since)
            self.sources = [p.data for p in self.params]
        self.buf = buf

    def unpack_into(self, dst: torch.Tensor, src: torch.Tensor | None = None) -> None:
        """Cast the packed bytes (self.buf or a copy of it) into a flat compute-dtype tensor."""
        src = self.buf if src is None else src
        if self.fmt == "q4" and self.n8:
            q4.dequantize_into(dst[: self.n8], src[: q4.q4_bytes(self.n8)])
        elif self.n8:
            dst[: self.n8].copy_(src[: self.n8].view(FP8), non_blocking=True)
            for a, b, scale in self.scales:  # a scaled fp8 file's weights, as Fp8Source.dequantize computes them
                scaled(dst[a:b], scale)
        dst[self.n8 : self.numel].copy_(src[self.off : self.nbytes].view(self.dtype), non_blocking=True)

    def point_params(self, flat: torch.Tensor) -> None:
        off = 0
        for p in self.params:
            n = p.numel()
            p.data = flat[off : off + n].view(p.shape)
            off += n


def weight_of(p: torch.Tensor, device, dtype: torch.dtype) -> torch.Tensor:
    """A parameter's values: its data, or its source (GGUF blocks, fp8 file values) dequantized on
    `device` when it is deferred."""
    src = deferred(p)
    return src.dequantize(device, dtype) if src is not None else p.data


def _q4_0(p: torch.Tensor) -> bool:
    src = deferred(p)
    return src is not None and src.is_q4_0


SMALL = 1 << 16  # parameters this small (biases, norms) are kept as they are whatever memory holds them


def file_mappings() -> list[tuple[int, int]]:
    """Sorted (start, end) address ranges this process has mapped from files (Linux); [] elsewhere."""
    try:
        with open("/proc/self/maps") as f:
            lines = f.read().splitlines()
    except OSError:
        return []
    out = []
    for line in lines:
        parts = line.split(maxsplit=5)
        if len(parts) == 6 and parts[4] != "0" and parts[5].startswith("/") and not parts[5].startswith("/dev/"):
            lo, hi = parts[0].split("-")
            out.append((int(lo, 16), int(hi, 16)))
    return sorted(out)


def file_backed(module: nn.Module, maps: list[tuple[int, int]]) -> bool:
    """Keeping `module`'s parameters costs (almost) no anonymous RAM of their own: they live in memory
    mapped from a file (a safetensors checkpoint as diffusers loads it) or are deferred GGUF or fp8
    file weights (whose sources are held anyway), but for small ones (a GGUF layer's bias)."""
    own = 0
    for p in module.parameters():
        if deferred(p) is not None or _mapped(p, maps):
            own += 1
        elif not (p.device.type == "cpu" and 0 < p.numel() <= SMALL):
            return False
    return own > 0


def _mapped(p: torch.Tensor, maps: list[tuple[int, int]]) -> bool:
    if p.device.type != "cpu" or not p.numel() or not maps:
        return False
    ptr = p.data_ptr()
    i = bisect.bisect_right(maps, (ptr, float("inf"))) - 1
    return i >= 0 and maps[i][0] <= ptr < maps[i][1]


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
