"""Where the all-resident (48 GB) plan's memory goes: one job in this process, the fast path on or
off, with each phase's allocated and reserved peak and the CUDA bytes of every model by dtype.

usage: python -m bench.probes.resident_peak --model /tmp/flux-random [--fast on|off] [--steps 2]
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import torch

GiB = 2**30


def cuda_bytes(pipe) -> dict:
    out = {}
    for name in ("transformer", "controlnet", "text_encoder", "text_encoder_2", "vae"):
        m, by = getattr(pipe, name, None), defaultdict(int)
        if m is None:
            continue
        for t in list(m.parameters()) + list(m.buffers()):
            if t.device.type == "cuda":
                by[str(t.dtype).replace("torch.", "")] += t.numel() * t.element_size()
        out[name] = {k: round(v / GiB, 3) for k, v in by.items()}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--fast", default="on")
    ap.add_argument("--steps", type=int, default=2)
    a = ap.parse_args(argv)
    from bench.random_model import PROMPT, photo
    from core.engine import Engine
    from core.job import ControlSpec, Job
    from core.models import ModelSpec
    from core.speed.fast import FastConfig

    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(47.5 * GiB / total)
    spec = ModelSpec(str(a.model / "flux"), str(a.model / "cn"))
    engine = Engine(spec, fast_config=FastConfig(enabled=a.fast == "on", compile=False))
    job = Job(PROMPT, photo(1024), (ControlSpec("canny"),), 1024, 1024, steps=a.steps, seed=7, tier="48")
    res = engine.run(job)
    phases = [
        dict(name=p["name"], reserved_gb=p["peak_reserved_gb"], allocated_gb=p["peak_alloc_gb"])
        for p in res.report["phases"]
    ]
    stats = torch.cuda.memory_stats()
    print(
        json.dumps(
            dict(
                fast=a.fast,
                predicted=res.plan.summary()["phase_peaks_gb"],
                phases=phases,
                allocated_gb=round(torch.cuda.memory_allocated() / GiB, 3),
                reserved_gb=round(torch.cuda.memory_reserved() / GiB, 3),
                peak_allocated_gb=round(stats["allocated_bytes.all.peak"] / GiB, 3),
                inactive_split_gb=round(stats.get("inactive_split_bytes.all.current", 0) / GiB, 3),
                models=cuda_bytes(engine.state.pipe),
                fast_report=res.report.get("fast"),
            )
        ),
        flush=True,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
