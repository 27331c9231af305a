"""GPU benchmark of recovery from real out-of-memory: over-large tiers on a capped card.

1. `--write DIR`: the full-size random-weight model written once as a diffusers folder (the CLI
   loads it through the real loading code).
2. `cli`: for each tier N requested on a card whose allocator is capped at the next smaller tier's
   budget M − 0.5 GiB, a fresh `python -m core generate --tier N` process must exit 0 at the largest
   plan that fits, with no traceback, its image equal to a fresh `--tier M` run under the same cap.
3. `longrun`: one engine (as the web app holds it) runs jobs alternating an over-large request with
   a fitting one under one cap; device and pinned memory must not grow between job 2 and the last.
   The engine learns from the first failure what the capped card gives (core.attempts.DeviceLimit)
   and runs later over-large requests under it at once; `--longrun-forget` makes it forget before
   every job, so that every over-large request fails and recovers for real.

usage: python -m bench.bench_recovery --write /tmp/flux-random [--cli 24,16,12,8] [--longrun 20]
                                      [--longrun-cap 7.5 --longrun-over 12 --longrun-fit 8 --longrun-precision auto]
                                      [--longrun-forget]
                                      [--steps 4] [--size 1024] [--budget-s 520] [--out-dir bench]
                                      [--images DIR] [--ref-twice]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from bench.env import capped, environment, md_table, write
from bench.random_model import PROMPT, build_random_pipeline, photo

GiB = 2**30
SMALLER = {"48": "24", "24": "16", "16": "12", "12": "8", "8": "6", "6": "4"}
CAPPED = capped("core.__main__")  # a CLI process with its allocator capped


def write_model(folder: Path) -> float:
    """The random full-size pipeline as a diffusers folder (flux/) and a ControlNet folder (cn/)."""
    from diffusers import FluxPipeline

    t0 = time.time()
    pipe, _ = build_random_pipeline("full", device="cuda", to_cpu=True)
    parts = {k: getattr(pipe, k) for k in ("scheduler", "vae", "text_encoder", "tokenizer", "text_encoder_2")}
    FluxPipeline(**parts, tokenizer_2=pipe.tokenizer_2, transformer=pipe.transformer).save_pretrained(
        folder / "flux", safe_serialization=True
    )
    pipe.controlnet.nets[0].save_pretrained(folder / "cn", safe_serialization=True)
    del pipe
    return round(time.time() - t0, 1)


def cli(model: Path, tier: str, cap_gb: float, out: Path, a) -> dict:
    args = [
        "generate", "--model", str(model / "flux"), "--controlnet", str(model / "cn"), "--image",
        str(out.parent / "input.png"), "--control", "canny", "--prompt", PROMPT, "--tier", tier,
        "--steps", str(a.steps), "--seed", "7", "--max-side", str(a.size), "--out", str(out),
    ]  # fmt: skip
    t0 = time.time()
    p = subprocess.run([sys.executable, "-c", CAPPED, str(cap_gb), *args], capture_output=True, text=True)
    row = dict(tier=tier, cap_gb=cap_gb, rc=p.returncode, wall_s=round(time.time() - t0, 1))
    row["traceback"] = "Traceback" in p.stderr
    row["stderr_tail"] = p.stderr.strip().splitlines()[-1:] if p.returncode else []
    if p.returncode == 0:
        s = json.loads(p.stdout.strip().splitlines()[-1])
        row.update(
            ran_tier=s["plan"]["tier"],
            tile=s["plan"]["tile"],
            peak_reserved_gb=s["measured_peak_reserved_gb"],
            placement=s["plan"].get("placement"),  # two runs of one tier may differ only here
            events=[e for e in s["events"] if "memory" in e or "RAM" in e],
        )
    return row


def same_image(a: Path, b: Path) -> bool:
    x, y = np.asarray(Image.open(a)), np.asarray(Image.open(b))
    return bool(x.shape == y.shape and np.array_equal(x, y))


def run_cli(a, model: Path, out_dir: Path, deadline: float) -> list[dict]:
    out_dir.mkdir(parents=True, exist_ok=True)
    photo(a.size).save(out_dir / "input.png")
    rows = []
    for tier in a.cli.split(","):
        if time.time() > deadline:
            rows.append(dict(tier=tier, skipped="time budget"))
            continue
        m = SMALLER[tier]
        cap_gb = float(m) - 0.5
        over = cli(model, tier, cap_gb, out_dir / f"over_{tier}.png", a)
        ref = cli(model, over.get("ran_tier", m), cap_gb, out_dir / f"ref_{tier}.png", a) if over["rc"] == 0 else {}
        if over["rc"] == 0 and ref.get("rc") == 0:
            over["equal_to_fresh_run"] = same_image(out_dir / f"over_{tier}.png", out_dir / f"ref_{tier}.png")
            if a.ref_twice:  # is a fresh run of the plan itself the same in two processes?
                again = cli(model, over["ran_tier"], cap_gb, out_dir / f"ref2_{tier}.png", a)
                if again["rc"] == 0:
                    over["fresh_runs_equal"] = same_image(out_dir / f"ref_{tier}.png", out_dir / f"ref2_{tier}.png")
        over["reference"] = {k: ref.get(k) for k in ("rc", "ran_tier", "placement", "peak_reserved_gb", "wall_s")}
        print(json.dumps(over), flush=True)
        rows.append(over)
    return rows


def run_longrun(a, deadline: float) -> dict:
    """Over-large and fitting requests alternating on one engine under an 8 GB card's cap."""
    from bench.random_model import random_engine
    from core.job import ControlSpec, Job
    from core.stream.packs import registered_bytes

    engine, build_s = random_engine("full")
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(a.longrun_cap * GiB / total)
    image = photo(a.size)
    jobs = []
    for k in range(a.longrun):
        if time.time() > deadline:
            break
        tier = a.longrun_over if k % 2 == 0 else a.longrun_fit
        job = Job(
            PROMPT, image, (ControlSpec("canny"),), a.size, a.size, steps=a.steps, seed=k, tier=tier,
            precision=a.longrun_precision,
        )  # fmt: skip
        if a.longrun_forget:
            engine.limit = None
        t0 = time.time()
        res = engine.run(job)
        torch.cuda.synchronize()
        jobs.append(
            dict(
                job=k + 1,
                asked=tier,
                ran=res.plan.tier,
                s=round(time.time() - t0, 1),
                allocated_gb=round(torch.cuda.memory_allocated() / GiB, 3),
                reserved_gb=round(torch.cuda.memory_reserved() / GiB, 3),
                pinned_gb=round(registered_bytes() / GiB, 3),
                peak_reserved_gb=res.report["peak_reserved_gb"],
                failed_attempts=sum("stepped down" in e for e in res.events),
                under_limit=any("without trying" in e for e in res.events),
            )
        )
        print(json.dumps(jobs[-1]), flush=True)
    engine.release()
    growth = {}
    if len(jobs) >= 3:
        same = [j for j in jobs[1:] if j["ran"] == jobs[1]["ran"]]
        for key in ("allocated_gb", "reserved_gb", "pinned_gb"):
            growth[key] = round(max(j[key] for j in same) - same[0][key], 3)
    return dict(
        build_s=build_s,
        cap_gb=a.longrun_cap,
        precision=a.longrun_precision,
        forget=a.longrun_forget,
        jobs=jobs,
        growth_from_job_2=growth,
    )


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--write", type=Path, help="model folder (written if it does not exist)")
    ap.add_argument("--cli", default="")
    ap.add_argument("--longrun", type=int, default=0)
    ap.add_argument("--longrun-cap", type=float, default=7.5)
    ap.add_argument("--longrun-over", default="12")
    ap.add_argument("--longrun-fit", default="8")
    ap.add_argument("--longrun-forget", action="store_true", help="forget the learned device limit before every job")
    ap.add_argument("--longrun-precision", default="auto", help="the jobs' precision (exact: no plan rounds weights)")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--budget-s", type=float, default=520)
    ap.add_argument("--out-dir", type=Path, default=Path("bench"))
    ap.add_argument("--images", type=Path, help="where the CLI runs' images go (default: --out-dir)")
    ap.add_argument("--ref-twice", action="store_true", help="run each fresh reference twice and compare the two")
    a = ap.parse_args(argv)
    deadline = time.time() + a.budget_s
    a.out_dir.mkdir(parents=True, exist_ok=True)
    data = dict(env=environment(), command="python -m bench.bench_recovery " + " ".join(argv or sys.argv[1:]))
    if a.cli:
        if not (a.write / "flux" / "model_index.json").exists():
            data["write_s"] = write_model(a.write)
        data["cli"] = run_cli(a, a.write, a.images or a.out_dir, deadline)
    if a.longrun:
        data["longrun"] = run_longrun(a, deadline)
    cols = ["tier", "cap_gb", "rc", "ran_tier", "tile", "equal_to_fresh_run", "fresh_runs_equal", "traceback"]
    cols += ["peak_reserved_gb", "wall_s"]
    md = "# Recovery from real out-of-memory\n\n" + data["env"].get("device", "") + ", " + data["command"] + "\n\n"
    md += md_table(data.get("cli", []), cols)
    if "longrun" in data:
        lr = data["longrun"]
        md += f"\n\nLong-lived engine under {lr['cap_gb']} GiB, growth from job 2: {lr['growth_from_job_2']}\n\n"
        md += md_table(
            lr["jobs"],
            ["job", "asked", "ran", "failed_attempts", "under_limit", "s", "allocated_gb", "reserved_gb", "pinned_gb"],
        )
    write(a.out_dir / "recovery.json", data)
    (a.out_dir / "RECOVERY.md").write_text(md + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
