"""What holds the denoising phase's peak: the GPU allocations alive at the moment a job's allocated
memory peaked, each with the Python frames that made it.

The fresh CLI processes of bench_ram read 1.48-1.51 GiB of transients in the denoising phase at
1024² for every streamed tier, the VAE tiled or not, while one-step jobs in one process read 0.42,
0.81 and 1.08 GiB at 768, 1280 and 1536 px (bench/probes/transients_streamed.json). This probe runs
jobs of several sizes and step counts in one process and, for the runs marked `+`, records the
caching allocator's history (torch.cuda.memory._record_memory_history) and replays it to the peak.

usage: python -m bench.probes.denoise_peak --model /tmp/flux-random [--runs 8:1024:1,8:1024:8+,8:1536:8]
                                           [--out bench/probes/denoise_peak.json]
  a run is TIER:SIZE:STEPS[+]; the allocator is capped at TIER - 0.5 GiB while it runs.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from bench.env import environment, write
from bench.probes.transients import each_run, phases_of, probe_engine

GiB = 2**30
MiB = 2**20
RUNS = "8:1024:1,8:1024:8+,8:1536:8,8:1536:1,16:1024:8"
KEEP = ("/core/", "/diffusers/", "torch/nn/functional", "/transformers/")


def frames_of(ev: dict) -> list[str]:
    out = []
    for f in ev.get("frames", []):
        name = f.get("filename", "")
        if any(k in name for k in KEEP):
            out.append(f"{name.split('site-packages/')[-1]}:{f.get('line')} {f.get('name')}")
    return out[:8]


def live_at_peak(trace: list[dict]) -> tuple[int, list[dict]]:
    """Replay alloc/free events: the peak of bytes allocated since recording began, and what was
    alive then (largest first)."""
    cur = peak = 0
    at = -1
    for i, ev in enumerate(trace):
        if ev["action"] == "alloc":
            cur += ev["size"]
            if cur > peak:
                peak, at = cur, i
        elif ev["action"] == "free_requested":
            cur -= ev["size"]
    live: dict[int, dict] = {}
    for ev in trace[: at + 1]:
        if ev["action"] == "alloc":
            live[ev["addr"]] = ev
        elif ev["action"] == "free_requested":
            live.pop(ev["addr"], None)
    top = sorted(live.values(), key=lambda e: -e["size"])
    return peak, [dict(mib=round(e["size"] / MiB, 1), frames=frames_of(e)) for e in top[:14]]


def one(engine, tier: str, size: int, steps: int, record: bool) -> dict:
    from bench.random_model import PROMPT, photo
    from core.job import ControlSpec, Job

    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction((float(tier) - 0.5) * GiB / total)
    job = Job(PROMPT, photo(size), (ControlSpec("canny"),), size, size, steps=steps, seed=7, tier=tier)
    torch.cuda.empty_cache()
    if record:
        torch.cuda.memory._record_memory_history(max_entries=400_000, stacks="python")
    t0 = time.time()
    res = engine.run(job)
    row = dict(tier=tier, size=size, steps=steps, s=round(time.time() - t0, 1))
    if record:
        snap = torch.cuda.memory._snapshot()
        torch.cuda.memory._record_memory_history(enabled=None)
        peak, top = live_at_peak(snap["device_traces"][0])
        row.update(recorded_peak_gb=round(peak / GiB, 3), live_at_peak=top)
    row.update(phases_of(res))
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--runs", default=RUNS)
    ap.add_argument("--out", type=Path, default=Path("bench/probes/denoise_peak.json"))
    a = ap.parse_args(argv)
    engine = probe_engine(a.model)
    head = dict(env=environment(), command="python -m bench.probes.denoise_peak " + " ".join(argv or []))

    def run(spec: str) -> dict:
        tier, size, steps = spec.rstrip("+").split(":")
        return one(engine, tier, int(size), int(steps), record=spec.endswith("+"))

    # written after every run: a command stopped at its limit keeps the rows it finished
    each_run(a.runs, run, after=lambda rows: write(a.out, dict(head, runs=rows)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
