"""The memory model's transients against the pass size: one-step jobs at several sizes, controls and
tiers in one process, each phase's measured peak (allocated and reserved) next to the plan's
prediction. The re-fit of core/plan/memory.py had 1024² only; the 4 GB tier's 512 px tiles came out
20 % under the linear model's denoising transients (bench/ram/ANY_RAM.md).

usage: python -m bench.probes.transients --model /tmp/flux-random [--runs 48:512:1,48:1024:2,4:1024:1]
                                         [--out bench/probes/transients.json]
  a run is TIER:SIZE:CONTROLS; the allocator is capped at TIER - 0.5 GiB while it runs.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from bench.env import environment, write

GiB = 2**30
RUNS = (
    "48:512:1,48:768:1,48:1024:1,48:1280:1,48:1536:1,48:1024:2,48:1536:2,"
    "16:512:1,16:1024:1,16:1024:2,16:1536:1,4:512:1,4:768:1,4:1024:1"
)


def one(engine, tier: str, size: int, controls: int) -> dict:
    from bench.random_model import PROMPT, photo
    from core.job import ControlSpec, Job

    total = torch.cuda.get_device_properties(0).total_memory
    if tier != "cpu":  # (a smoke run on the CPU)
        torch.cuda.set_per_process_memory_fraction((float(tier) - 0.5) * GiB / total)
    kinds = ("canny", "blur")[:controls]  # preprocessors that need no model of their own
    specs = tuple(ControlSpec(k) for k in kinds)
    job = Job(PROMPT, photo(size), specs, size, size, steps=1, seed=7, tier=tier)
    torch.cuda.empty_cache()  # a larger earlier job's cached blocks would count as this one's reserve
    t0 = time.time()
    res = engine.run(job)
    return dict(tier=tier, size=size, controls=controls, **phases_of(res), s=round(time.time() - t0, 1))


def phases_of(res) -> dict:
    """A job's plan (tiles, placement, predicted phase peaks) beside its measured phase peaks."""
    plan = res.plan.summary()
    return dict(
        tile=plan["tile"],
        vae_tile=plan["vae_tile"],
        placement=plan["placement"],
        predicted=plan["phase_peaks_gb"],
        reserved={p["name"]: p["peak_reserved_gb"] for p in res.report["phases"]},
        allocated={p["name"]: p["peak_alloc_gb"] for p in res.report["phases"]},
    )


def probe_engine(model: Path):
    """One engine over the model's folders (flux/, cn/), compile off: the probes measure the eager path."""
    from core.engine import Engine
    from core.models import ModelSpec
    from core.speed.fast import FastConfig

    return Engine(ModelSpec(str(model / "flux"), str(model / "cn")), fast_config=FastConfig(compile="off"))


def each_run(specs: str, run, after=None) -> list[dict]:
    """`run(spec)` for each comma-separated spec, printed as it ends (then `after(rows)`, where
    given); a failure is its row's error."""
    rows = []
    for spec in specs.split(","):
        try:
            rows.append(run(spec))
        except Exception as e:  # noqa: BLE001 - one failed run must not lose the others
            rows.append(dict(spec=spec, error=f"{type(e).__name__}: {str(e)[:200]}"))
        print(json.dumps(rows[-1]), flush=True)
        if after is not None:
            after(rows)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--runs", default=RUNS)
    ap.add_argument("--out", type=Path, default=Path("bench/probes/transients.json"))
    a = ap.parse_args(argv)
    engine = probe_engine(a.model)

    def run(spec: str) -> dict:
        tier, size, controls = spec.split(":")
        return one(engine, tier, int(size), int(controls))

    rows = each_run(a.runs, run)
    data = dict(env=environment(), command="python -m bench.probes.transients " + " ".join(argv or []), runs=rows)
    write(a.out, data)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
