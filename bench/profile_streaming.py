"""Does streaming overlap compute? Profiles denoising steps of one tier plan on the GPU.

Builds the full-size random-weight model, applies the tier's plan through core.Engine, runs a warm-up
job, then profiles `--steps` denoising steps with torch.profiler and prints: step time, time the
host→device copies take, how much of it runs while a compute kernel runs (overlap), and the CPU
time spent in the residency hooks. Writes a Chrome trace to --out-dir for a closer look.

usage: python -m bench.profile_streaming [--tier 8] [--steps 3] [--out-dir bench]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def union(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    out: list[list[float]] = []
    for a, b in sorted(intervals):
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return [(a, b) for a, b in out]


def overlap(xs: list[tuple[float, float]], ys: list[tuple[float, float]]) -> float:
    """Total length of the intersection of two sets of intervals."""
    xs, ys = union(xs), union(ys)
    i = j = 0
    total = 0.0
    while i < len(xs) and j < len(ys):
        a, b = max(xs[i][0], ys[j][0]), min(xs[i][1], ys[j][1])
        total += max(0.0, b - a)
        if xs[i][1] < ys[j][1]:
            i += 1
        else:
            j += 1
    return total


def summarize(events) -> dict:
    """events: (name, is_device, start_us, end_us) of one profiled region."""
    copies = [(s, e) for n, dev, s, e in events if dev and "memcpy htod" in n.lower()]
    kernels = [(s, e) for n, dev, s, e in events if dev and "memcpy" not in n.lower() and "memset" not in n.lower()]
    hooks = [(s, e) for n, dev, s, e in events if not dev and n.startswith("residency.")]
    copy_us = sum(b - a for a, b in union(copies))
    return dict(
        copy_ms=round(copy_us / 1e3, 1),
        copy_overlapped_pct=round(100 * overlap(copies, kernels) / copy_us, 1) if copy_us else None,
        kernel_busy_ms=round(sum(b - a for a, b in union(kernels)) / 1e3, 1),
        hook_cpu_ms=round(sum(b - a for a, b in hooks) / 1e3, 1),
    )


def profile_steps(engine, job, steps: int, trace: Path | None = None):
    """(result, summary) of `steps` profiled denoising steps after a 2-step warm-up (plan applied,
    order learned), with the residency hooks labelled in the trace; the trace goes to `trace`."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from core.stream.residency import Residency

    originals = {name: getattr(Residency, name) for name in ("_before", "_after")}
    for name, fn in originals.items():  # label hook time in the trace
        setattr(Residency, name, lambda self, i, fn=fn, name=name: _timed(fn, self, i, name))
    try:
        engine.run(job.with_(steps=2))
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            res = engine.run(job.with_(steps=steps))
        torch.cuda.synchronize()
    finally:
        for name, fn in originals.items():
            setattr(Residency, name, fn)
    events = [
        (e.name, e.device_type == torch.autograd.DeviceType.CUDA, e.time_range.start, e.time_range.end)
        for e in prof.events()
    ]
    if trace is not None:
        try:
            prof.export_chrome_trace(str(trace))
        except Exception:  # noqa: BLE001 - the numbers matter more than the trace
            pass
    return res, summarize(events)


def main():
    from bench.bench_tiers import cap
    from bench.random_model import PROMPT, photo, random_engine
    from core.job import ControlSpec, Job

    ap = argparse.ArgumentParser()
    ap.add_argument("--tier", default="8")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--out-dir", default="bench")
    a = ap.parse_args()
    engine, _ = random_engine()
    cap(float(a.tier) - 0.5)
    job = Job(
        prompt=PROMPT,
        image=photo(1024),
        controls=(ControlSpec("canny", 0.7),),
        width=1024,
        height=1024,
        steps=2,
        tier=a.tier,
    )
    Path(a.out_dir).mkdir(parents=True, exist_ok=True)
    res, summary = profile_steps(engine, job, a.steps, Path(a.out_dir) / f"trace_tier{a.tier}.json")
    out = dict(
        tier=a.tier, steps=a.steps, seconds=res.report["seconds"], placement=res.plan.summary()["placement"], **summary
    )
    (Path(a.out_dir) / f"profile_tier{a.tier}.json").write_text(json.dumps(out, indent=1))
    print("PROFILE", json.dumps(out))


def _timed(fn, self, i, name):
    from torch.profiler import record_function

    with record_function(f"residency.{name}"):
        return fn(self, i)


if __name__ == "__main__":
    main()
