"""Long run on the GPU: many consecutive jobs through one Engine with a full-size streamed plan, and
no growth of process, pinned or GPU memory.

Full-size random-weight FLUX.1-dev + Union, one tier's plan (default 8 GB, the plan with the most
moving parts: fp8 packs, a pinned host arena, the copy ring, T5 streamed), jobs that change seed,
prompt (three prompts: the prompt cache fills and evicts), controls and control_end. After each job:
process RSS, GPU memory allocated and reserved. Writes longrun.json and LONGRUN.md.

usage: python -m bench.bench_longrun [--jobs 50] [--tier 8] [--steps 2] [--size 1024] [--out-dir bench]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import psutil
import torch

from bench.bench_tiers import cap
from bench.env import environment, md_table, write
from bench.random_model import photo, random_engine
from core.job import ControlSpec, Job

GiB, MiB = 2**30, 2**20
PROMPTS = (
    "a photo of an astronaut on the moon",
    "a red fox in the snow, golden hour",
    "an old lighthouse on a cliff, storm",
)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--jobs", type=int, default=50)
    ap.add_argument("--tier", default="8")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--out-dir", default="bench")
    a = ap.parse_args()
    engine, build_s = random_engine()
    img = photo(a.size)
    cap(float(a.tier) - 0.5)
    controls = ((ControlSpec("canny", 0.7),), (ControlSpec("canny", 0.6, end=0.5),), (ControlSpec("gray", 0.5),))
    rows = []
    t0 = time.perf_counter()
    for k in range(a.jobs):
        job = Job(
            prompt=PROMPTS[k % 3],
            image=img,
            controls=controls[k % 3],
            width=a.size,
            height=a.size,
            steps=a.steps,
            seed=k,
            tier=a.tier,
        )
        res = engine.run(job)
        torch.cuda.synchronize()
        rows.append(
            dict(
                job=k,
                rss_mib=round(psutil.Process().memory_info().rss / MiB),
                allocated_mib=round(torch.cuda.memory_allocated() / MiB),
                reserved_mib=round(torch.cuda.memory_reserved() / MiB),
                peak_reserved_gb=res.report["peak_reserved_gb"],
                events=len(res.events),
            )
        )
        print("JOB", rows[-1], flush=True)
    cap(None)
    first = rows[min(2, len(rows) - 1)]  # after the first jobs: plan applied, caches warm
    growth = {k: rows[-1][k] - first[k] for k in ("rss_mib", "allocated_mib", "reserved_mib")}
    data = dict(
        env=environment(),
        build_s=build_s,
        tier=a.tier,
        jobs=a.jobs,
        steps=a.steps,
        size=a.size,
        seconds=round(time.perf_counter() - t0, 1),
        growth_after_job_2=growth,
        max_peak_reserved_gb=max(r["peak_reserved_gb"] for r in rows),
        cap_gib=float(a.tier) - 0.5,
        rows=rows,
    )
    out = Path(a.out_dir)
    write(out / "longrun.json", data)
    env = data["env"]
    md = [
        "# Long run\n",
        f"- device: {env.get('device')}; torch {env['torch']}, diffusers {env['diffusers']}",
        f"- command: `{env['command']}`",
        f"- {a.jobs} jobs, tier {a.tier} (cap {float(a.tier) - 0.5} GiB), {a.size}², {a.steps} steps, prompts, "
        f"seeds and controls changing; {data['seconds']} s",
        f"- growth from job 2 to job {a.jobs - 1}: {growth} (MiB); highest peak reserved "
        f"{data['max_peak_reserved_gb']} GiB\n",
        md_table(rows[:3] + rows[-3:], ["job", "rss_mib", "allocated_mib", "reserved_mib", "peak_reserved_gb"]),
    ]
    (out / "LONGRUN.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
