"""Where a denoising step's GPU time goes: kernel time by kind (matmul, attention, Triton-fused,
other), how busy the GPU is, and the largest kernels.

A run of `lo` steps and one of `hi` steps are profiled (CUDA activity only) and subtracted, so what is
left is `hi - lo` pure denoising steps: the text encoder, preprocessing and the VAE decode cancel out.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable

from bench.profile_streaming import union

KINDS = (  # first match wins: cuDNN/flash attention kernels also say "cutlass" or "gemm" at times
    ("attention", ("fmha", "flash", "sdpa", "attention", "attn")),
    ("matmul", ("gemm", "nvjet", "cutlass", "xmma", "f8f8bf16", "matmul", "scaled_mm")),
    ("copy", ("memcpy", "memset")),
)


def kind_of(name: str) -> str:
    """Inductor names a fused kernel after the ops it serves ("triton_red_fused__fused_rms_norm__scaled_
    dot_product_cudnn_attention..." is the RMSNorm + RoPE before attention), so Triton kernels are told
    apart by prefix first: templates ("triton_tem") are matmuls, the rest element-wise work."""
    low = name.lower()
    if low.startswith("triton_"):
        return "matmul" if low.startswith("triton_tem") else "triton"
    for kind, keys in KINDS:
        if any(k in low for k in keys):
            return kind
    return "other"


def _busy_us(intervals: list[tuple[float, float]]) -> float:
    return sum(b - a for a, b in union(intervals))


def _profile(run: Callable[[int], object], steps: int) -> tuple[float, list[tuple[str, float, float]]]:
    import torch
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        t = time.perf_counter()
        run(steps)
        torch.cuda.synchronize()
        wall = time.perf_counter() - t
    kernels = [
        (e.name, e.time_range.start, e.time_range.end)
        for e in prof.events()
        if e.device_type == torch.autograd.DeviceType.CUDA
    ]
    return wall, kernels


def summarize(lo: tuple[float, list], hi: tuple[float, list], steps: int, top: int = 12) -> dict:
    """Per-step numbers of the difference between a `hi`-step and a `lo`-step profile."""

    def totals(kernels):
        by_kind, by_name, count = defaultdict(float), defaultdict(float), defaultdict(int)
        for name, a, b in kernels:
            by_kind[kind_of(name)] += b - a
            by_name[name] += b - a
            count[name] += 1
        return by_kind, by_name, count, _busy_us([(a, b) for _, a, b in kernels])

    (wl, kl), (wh, kh) = lo, hi
    lk, ln, lc, lb = totals(kl)
    hk, hn, hc, hb = totals(kh)
    per = 1e3 * steps  # µs over `steps` steps → ms per step
    kinds = {k: round((hk[k] - lk.get(k, 0.0)) / per, 2) for k in sorted(hk, key=hk.get, reverse=True)}
    names = sorted(hn, key=lambda n: hn[n] - ln.get(n, 0.0), reverse=True)[:top]
    wall_ms = (wh - wl) * 1e3 / steps
    busy_ms = (hb - lb) / per
    return dict(
        step_ms=round(wall_ms, 2),
        gpu_busy_ms=round(busy_ms, 2),
        gpu_idle_pct=round(100 * max(0.0, 1 - busy_ms / wall_ms), 1) if wall_ms > 0 else None,
        kind_ms=kinds,
        top=[
            dict(
                name=n[:90],
                ms=round((hn[n] - ln.get(n, 0.0)) / per, 2),
                calls=round((hc[n] - lc.get(n, 0)) / steps, 1),
                kind=kind_of(n),
            )
            for n in names
        ],
    )


def gaps(kernels: list[tuple[str, float, float]], top: int = 6, min_us: float = 50.0) -> dict:
    """The GPU's idle stretches of a run: how many over `min_us`, their total, and the longest with
    the kernels on either side (where the CPU fell behind)."""
    ks = sorted(kernels, key=lambda k: k[1])
    found, end, last = [], None, None
    for name, a, b in ks:
        if end is not None and a - end >= min_us:
            found.append((a - end, last, name))
        if end is None or b > end:
            end, last = b, name
    found.sort(key=lambda g: g[0], reverse=True)
    return dict(
        count=len(found),
        total_ms=round(sum(g[0] for g in found) / 1e3, 2),
        longest=[dict(us=round(g, 1), after=p[:70], before=n[:70]) for g, p, n in found[:top]],
    )


def kernel_breakdown(run: Callable[[int], object], lo: int = 2, hi: int = 6) -> dict:
    """run(k) makes one image with k denoising steps (already warmed up and compiled)."""
    lo_run, hi_run = _profile(run, lo), _profile(run, hi)
    return dict(summarize(lo_run, hi_run, hi - lo), gaps_hi_run=gaps(hi_run[1]))


def profile_table(paths: list[str]) -> str:
    """A Markdown table of the profiled rows of bench_speed result files (`--profile` runs)."""
    import json

    rows = [
        "| run | variant | s/image | denoise s | compile s | step ms (profiled) | GPU busy ms | idle % | "
        "matmul | attention | Triton | other |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    cmds = []
    for i, path in enumerate(paths, 1):
        data = json.loads(open(path).read())
        cmds.append(f"{i}. `{data['env']['command']}` ({data['env'].get('device')}, torch {data['env']['torch']})")
        for r in data["rows"]:
            p = r.get("profile") or {}
            k = p.get("kind_ms", {})
            cells = [
                i,
                r["variant"],
                r.get("image_s"),
                r.get("denoise_s"),
                r.get("compile_s"),
                p.get("step_ms"),
                p.get("gpu_busy_ms"),
                p.get("gpu_idle_pct"),
                k.get("matmul"),
                k.get("attention"),
                k.get("triton"),
                k.get("other"),
            ]
            if r.get("error"):
                cells[2] = r["error"][:60]
            rows.append("| " + " | ".join("" if c is None else str(c) for c in cells) + " |")
    return "\n".join(rows) + "\n\nRuns:\n" + "\n".join(cmds) + "\n"


if __name__ == "__main__":
    import sys

    print(profile_table(sys.argv[1:]))
