"""What machine are we on: GPU, its free memory, bf16 support, host RAM, copy bandwidth.

Plans are pure functions of a DeviceInfo, so tests build DeviceInfo by hand.
"""

from __future__ import annotations

import functools
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import torch

GiB = 2**30


@dataclass(frozen=True)
class DeviceInfo:
    kind: str  # "cuda" or "cpu"
    name: str
    total_gb: float  # GPU memory (GiB); 0 on CPU
    free_gb: float  # free GPU memory now (GiB)
    bf16: bool  # bf16 compute supported (NaN-free FLUX needs it or fp32)
    host_ram_gb: float  # the host RAM this process may use (GiB, host_ram_limit_gb): streamed weights are pinned there
    h2d_gbps: float = 25.0  # pinned host→device copy bandwidth, GiB/s (PCIe 4.0 x16 ~25)
    tflops: float = 150.0  # effective bf16 matmul rate, TFLOP/s
    context_gb: float = 0.0  # device memory this process holds outside the allocator (CUDA context,
    # library workspaces), measured at start-up: a tier's allocator budget leaves it out


def _measure_h2d(nbytes: int = 256 * 2**20) -> float:
    """Pinned the way streamed weights are (cudaHostRegister) and unpinned after: PyTorch's caching
    host allocator would keep a pin_memory=True block locked for the life of the process."""
    from core.stream.packs import pinned, unpin

    x = pinned(nbytes, True)
    try:
        return _copy_rate(x, torch.empty(nbytes, dtype=torch.uint8, device="cuda"))
    finally:
        unpin(x)


def _copy_rate(x: torch.Tensor, y: torch.Tensor) -> float:
    nbytes = x.numel()
    y.copy_(x, non_blocking=True)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(4):
        y.copy_(x, non_blocking=True)
    torch.cuda.synchronize()
    return 4 * nbytes / GiB / (time.perf_counter() - t)


def _measure_tflops(n: int = 4096, rounds: int = 3, reps: int = 8) -> float:
    """Best of a few rounds after a warm-up: a single short round read 666 to 729 TFLOP/s on the
    same H100 (clocks ramping up), which moved the plans' time model by 9 %."""
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(4):
        a @ b
    best = 0.0
    for _ in range(rounds):
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(reps):
            a @ b
        torch.cuda.synchronize()
        best = max(best, reps * 2 * n**3 / (time.perf_counter() - t) / 1e12)
    return best


PROBE_VERSION = 1  # bump when a probe measures differently: older files are ignored


def probe_file(name: str, total_bytes: int) -> Path:
    """Where this machine's probe figures are kept: one file per GPU model and software stack."""
    from core.demo_model import cache_root

    stack = f"{name}-{total_bytes // 2**20}MiB-torch{torch.__version__}-cuda{torch.version.cuda}-v{PROBE_VERSION}"
    return cache_root() / "device" / ("".join(c if c.isalnum() or c in "-._" else "_" for c in stack) + ".json")


def _nvml_processes() -> list | None:
    """NVML's compute processes on this process's GPU (pid, usedGpuMemory); None where NVML cannot
    tell (no driver library, no per-process list)."""
    try:
        import pynvml

        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(torch.cuda.current_device())
        return list(pynvml.nvmlDeviceGetComputeRunningProcesses(handle))
    except Exception:  # noqa: BLE001 - no NVML
        return None


def _gpu_shared() -> bool:
    """Another process runs on this GPU: a probe measured now reads low. Four CLI processes started
    together on an H200 kept 13.9 GiB/s of host-to-device copy where 50.3 was measured alone, and
    every later plan streamed as if the bus were that slow. False where NVML cannot tell."""
    return any(p.pid != os.getpid() for p in _nvml_processes() or ())


def _probes(path: Path) -> tuple[float, float, float]:
    """(h2d GiB/s, TFLOP/s, context GiB) measured once per machine and kept under the cache root.
    Plans depend on them (the time model picks exact or fp8 units, the context sets the budget), and
    a probe run while other programs use the GPU reads lower: measured anew in every process, the
    same job on the same machine could get another placement, and another image for the same seed.
    Figures measured beside another process are kept marked `shared`: the first process that finds
    the GPU to itself measures again and replaces them."""
    try:
        d = json.loads(path.read_text())
        kept = float(d["h2d_gbps"]), float(d["tflops"]), float(d["context_gb"])
        if not d.get("shared") or _gpu_shared():
            return kept
    except (OSError, ValueError, KeyError, TypeError):
        pass
    shared = _gpu_shared()
    h2d, tflops = round(_measure_h2d(), 1), round(_measure_tflops(), 0)  # cuBLAS is initialised now
    context = _measure_context_gb()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(dict(h2d_gbps=h2d, tflops=tflops, context_gb=context, shared=shared)))
        tmp.replace(path)  # atomic: a process starting beside this one reads all of it or nothing
    except OSError:
        pass  # a read-only cache: measured again next time
    return h2d, tflops, context


@functools.lru_cache(maxsize=16)
def _static_cuda_info(index: int = 0) -> tuple[str, float, bool, float, float, float]:
    """What does not change for GPU `index` while the process runs (probes measured on it)."""
    with torch.cuda.device(index):
        props = torch.cuda.get_device_properties(index)
        h2d, tflops, context = _probes(probe_file(props.name, props.total_memory))
        return props.name, props.total_memory / GiB, torch.cuda.is_bf16_supported(), h2d, tflops, context


LATER_GB = 0.25  # device memory a job adds outside the allocator after start-up: kernel modules
# loaded on first use (torch, cuDNN attention, Triton). H200, full-size tiers 8 and 6: the driver's
# figure less peak reserved was 0.77 GiB against 0.57 measured at start-up.


def _measure_context_gb(cap_gb: float = 1.5) -> float:
    """What this process holds on the GPU beyond PyTorch's allocator: the driver's per-process figure
    (NVML) minus reserved memory; without NVML, the device's used memory minus reserved, capped (it
    would count other processes too). Plus LATER_GB for what a job loads later."""
    torch.cuda.synchronize()
    reserved = torch.cuda.memory_reserved()
    used = next((p.usedGpuMemory for p in _nvml_processes() or () if p.pid == os.getpid()), None)
    if used is None:  # no NVML (or no per-process figure): the device-wide estimate
        free, total = torch.cuda.mem_get_info()
        used = min(total - free, reserved + cap_gb * GiB)
    return round(max(0.0, (used - reserved) / GiB) + LATER_GB, 2)


def _cgroup_limits(root: Path = Path("/sys/fs/cgroup"), self_cgroup: Path = Path("/proc/self/cgroup")) -> list[int]:
    """Memory limits (bytes) of this process's cgroups, v2 and v1, the cgroup and its parents."""
    out = []
    try:
        lines = self_cgroup.read_text().splitlines()
    except OSError:
        lines = []
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # v2: 0::/path
            files = [root / path.lstrip("/") / "memory.max"]
        elif "memory" in controllers.split(","):  # v1: N:memory:/path
            files = [root / "memory" / path.lstrip("/") / "memory.limit_in_bytes"]
        else:
            continue
        files += [f.parent.parent / f.name for f in files]  # the parent's limit applies too
        for f in [*files, root / "memory.max", root / "memory" / "memory.limit_in_bytes"]:
            try:
                text = f.read_text().strip()
            except OSError:
                continue
            if text.isdigit() and int(text) < 2**60:  # "max", or v1's huge number: no limit
                out.append(int(text))
    return out


def host_ram_limit_gb() -> float:
    """The host RAM this process may use: the machine's physical RAM or its memory cgroup's limit
    (a container, a Space), whichever is smaller. Not the momentary free memory: the same machine
    size gives the same plans, whatever else runs."""
    return round(min([psutil.virtual_memory().total, *_cgroup_limits()]) / GiB, 1)


def detect(index: int | None = None) -> DeviceInfo:
    """CUDA GPU `index` (default: the current one) if there is a GPU, else the CPU. Bandwidth and
    matmul rate are measured once per machine and GPU (~0.1 s); free memory is read each call."""
    host = host_ram_limit_gb()
    if not torch.cuda.is_available():
        return DeviceInfo("cpu", "CPU", 0.0, 0.0, True, round(host, 1))
    index = torch.cuda.current_device() if index is None else index
    name, total, bf16, h2d, tflops, context = _static_cuda_info(index)
    free, _ = torch.cuda.mem_get_info(index)
    return DeviceInfo("cuda", name, round(total, 2), round(free / GiB, 2), bf16, round(host, 1), h2d, tflops, context)
