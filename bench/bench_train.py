"""GPU benchmark of ControlNet training on one GPU: fresh `python -m train` processes on the full-size
random-weight model read from a local folder, each under an allocator cap, with the driver's figure.

A run is KIND@RESOLUTION: `ft` fine-tunes every weight of the Union-Pro-sized ControlNet (5 double and
10 single blocks, 3.3 B) at the 48 GB tier under a 47.5 GiB cap; `lora` trains a rank-16 LoRA on it at
the 24 GB tier under 23.5 GiB. Each trains `--steps` steps on photos from scikit-image with captions,
validating in the run (one image through the app's engine, on the modules being trained) every
`--validate-every` steps. Recorded: exit code, the run's JSON summary (first and last loss, peak
reserved, placement and predicted peaks, validation), seconds per step, the driver's figure for the
process (NVML by pid, bench.bench_ram.Poller).

usage: python -m bench.bench_train --model /tmp/flux-random [--runs ft@512,lora@512,ft@1024,lora@1024]
                                   [--steps 12] [--validate-every 6] [--budget-s 540] [--out-dir bench/train]
  The model folder is written (bench.bench_recovery.write_model, in a child process) if missing.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from bench.bench_ram import Poller
from bench.env import capped, child_environment, ensure_model, md_table, write

GiB = 2**30
KINDS = {"ft": dict(tier="48", cap=47.5, args=[]), "lora": dict(tier="24", cap=23.5, args=["--lora-rank", "16"])}
CAPPED_TRAIN = capped("train.__main__")  # a training process with its allocator capped


def write_data(folder: Path, n: int = 8) -> Path:
    """Photos from scikit-image, each with a caption beside it."""
    import numpy as np
    from PIL import Image
    from skimage import data

    folder.mkdir(parents=True, exist_ok=True)
    names = ["astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "retina", "cat", "hubble_deep_field"]
    for name in names[:n]:
        img = np.asarray(getattr(data, name)())
        Image.fromarray(img).convert("RGB").resize((1024, 1024)).save(folder / f"{name}.png")
        (folder / f"{name}.txt").write_text(f"a photo: {name.replace('_', ' ')}")
    return folder


def _last_rate(log: str) -> float | None:
    """Seconds per step from the last progress line (`step N/M loss L S s/step ETA ...`)."""
    rates = re.findall(r"([0-9.]+) s/step", log)
    return float(rates[-1]) if rates else None


def predicted_gb(plan: dict) -> float | None:
    """The run's predicted peak: the training step's, or the validation image's (its engine plans
    within the tier's whole budget, so its own plan's peak is the larger one)."""
    val = (plan.get("validation_plan") or {}).get("predicted_peak_gb", 0)
    return max(plan.get("predicted_peak_gb", 0), plan.get("predicted_validation_gb", 0), val) or None


def one_run(spec: str, model: Path, data: Path, out_dir: Path, a) -> dict:
    kind, _, res = spec.partition("@")
    k = KINDS[kind]
    out = out_dir / f"run_{kind}_{res}"
    args = [
        "--data", str(data), "--control", "canny", "--out", str(out), "--model", str(model / "flux"),
        "--controlnet", str(model / "cn"), "--steps", str(a.steps), "--resolution", res, "--tier", k["tier"],
        "--validate-every", str(a.validate_every), "--validation-images", "1", "--validation-steps", "4",
        "--checkpoint-every", str(a.steps), "--log-every", "1", *k["args"],
    ]  # fmt: skip
    t0 = time.time()
    p = subprocess.Popen(
        [sys.executable, "-c", CAPPED_TRAIN, str(k["cap"]), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    poll = Poller([])  # the driver's figure of this process, by pid
    stdout, stderr = p.communicate()
    poll.stop()
    row = dict(spec=spec, kind=kind, resolution=int(res), cap_gb=k["cap"], rc=p.returncode)
    driver_gb = round(poll.pid_peak.get(p.pid, 0) / GiB, 3)
    row.update(wall_s=round(time.time() - t0, 1), driver_gb=driver_gb, traceback="Traceback" in stderr)
    row["stderr_tail"] = stderr.strip().splitlines()[-3:] if p.returncode else []
    row["s_per_step"] = _last_rate(stderr)
    row["not_finite"] = [ln for ln in stderr.splitlines() if "not finite" in ln][:5]
    if p.returncode == 0:
        s = json.loads(stdout.strip().splitlines()[-1])
        row.update({key: s.get(key) for key in ("first_loss", "last_loss", "peak_memory_gb", "trainable_params")})
        row.update(placement=s.get("placement"), validation=s.get("validation"), seconds=s.get("seconds"))
        row.update(skipped_updates=s.get("skipped_updates"), first10_mean=s.get("first10_mean"))
        row["last10_mean"] = s.get("last10_mean")
        row["predicted_gb"] = predicted_gb(s.get("placement") or {})
        row["under_cap"] = row["driver_gb"] <= k["cap"] and (s.get("peak_memory_gb") or 0) <= k["cap"]
    print(json.dumps(row), flush=True)
    if not a.keep:  # a full fine-tune's checkpoint and result are ~20 GB: the next run needs the disk
        shutil.rmtree(out, ignore_errors=True)
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--runs", default="ft@512,lora@512,ft@1024,lora@1024")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--validate-every", type=int, default=6)
    ap.add_argument("--budget-s", type=float, default=540)
    ap.add_argument("--out-dir", type=Path, default=Path("bench/train"))
    ap.add_argument("--keep", action="store_true", help="keep each run's output folder (checkpoints, result)")
    a = ap.parse_args(argv)
    deadline = time.time() + a.budget_s
    a.out_dir.mkdir(parents=True, exist_ok=True)
    data = dict(
        env=child_environment(), runs=[], command="python -m bench.bench_train " + " ".join(argv or sys.argv[1:])
    )
    ensure_model(a.model)
    photos = write_data(a.out_dir / "data")
    for spec in filter(None, a.runs.split(",")):
        if time.time() > deadline:
            print("skipped (time budget):", spec, flush=True)
            continue
        data["runs"].append(one_run(spec, a.model, photos, a.out_dir, a))
        write(a.out_dir / "train.json", data)
    cols = [
        "spec",
        "rc",
        "cap_gb",
        "peak_memory_gb",
        "predicted_gb",
        "driver_gb",
        "under_cap",
        "s_per_step",
        "first_loss",
        "last_loss",
    ]
    cols += ["skipped_updates", "wall_s"]
    md = f"# ControlNet training on one GPU\n\n{data['env'].get('device', '')}; `{data['command']}`\n\n"
    (a.out_dir / "TRAIN.md").write_text(md + md_table(data["runs"], cols) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
