"""GPU benchmark of the time to a first image, and of the compile cache, each run in a fresh process.

Full-size FLUX.1-dev + Union architecture with random bf16 weights, read from a local folder (written
by bench.env.ensure_model if missing), 1024², one canny control, 28 steps, seed 7; every child's
allocator capped at 47.5 GiB. Wall times run from the child's start to its image on disk (the PNG's
mtime), so imports, reading the checkpoints and placing them count; the weight files are read once
before the parts, so that every part reads them from the page cache.

  diffusers  FluxControlNetPipeline.from_pretrained(...).to("cuda") and one image: load and image seconds
  cli        `python -m core generate --tier 48` (compile off, the CLI's default); bar: not slower than diffusers
  direct     the same with FLUX_ANYVRAM_DIRECT_READ=1: the weights read straight onto the GPU (core.placed.read_onto)
  cache      `generate --tier 48 --compile` twice with one fresh FLUX_ANYVRAM_CACHE, cold then warm:
             compile seconds, cache hit or miss, s/step, peak vs predicted; bar: the warm compile ≤ 5 s
  app        one process holding the web app's engine (app.build_engine, compile policy "later"), 4 jobs
             with seeds 7..10 (ui.handlers.build_job, PNGs saved as the app saves them); bars: the jobs
             after the one that compiled ≤ 5 s each, peak reserved ≤ predicted ≤ peak + 8 %, ≤ 47.5 GiB
             (its cache root is the cache part's, warm when that part ran)

usage: python -m bench.bench_first --model /tmp/flux-random [--parts diffusers,cli,direct,cache,app]
                                   [--budget-s 560] [--out-dir bench/first]
       python -m bench.bench_first --cpu-smoke --out-dir /tmp/first   (tiny model, 64², 2 steps, no cap)
  Parts not started within --budget-s are recorded as skipped; a child still running at its end is
  killed. A failed child records its exit code and stderr tail (whole logs in OUT/runs/*.log).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from bench.env import capped, child_environment, ensure_model, md_table, write
from bench.random_model import PROMPT, photo

PARTS = ("diffusers", "cli", "direct", "cache", "app")
BAR_IMAGE_S = 5.0  # the app's steady state, per image
BAR_WARM_COMPILE_S = 5.0
OVER = 1.08  # the predicted peak may exceed the measured one by at most 8 %
COMPILED = re.compile(r"compiled the denoiser blocks (?:\(cache hit, |in )([\d.]+) s")


def prelude(entry: str, cap_gb: float) -> str:
    """`python -c` code running `entry`'s main(argv[2:]): capped (bench.env.capped) unless cap_gb is 0."""
    return capped(entry) if cap_gb else f"import sys; from {entry} import main; sys.exit(main(sys.argv[2:]))"


def spawn(name: str, entry: str, args: list[str], a, deadline: float, env=None, image=None, echo=False):
    """A fresh child: (row, the JSON lines it printed, its start); its summary is the last of them. stderr
    goes to a log file (a full pipe would block the child); a child running at the deadline is killed."""
    if image is not None:
        image.unlink(missing_ok=True)  # a stale image would give a false time to image
    log = a.runs / f"{name}.log"
    cmd = [sys.executable, "-c", prelude(entry, a.cap_gb), str(a.cap_gb), *args]
    t0 = time.time()
    with open(log, "w") as err:
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True, env=env)
        timer = threading.Timer(max(1.0, deadline - t0), p.kill)
        timer.start()
        objs = []
        for line in (x for x in p.stdout if x.startswith("{")):  # JSON objects: a library may print too
            try:
                objs.append(json.loads(line))
            except ValueError:
                continue
            if echo and "job" in objs[-1]:
                print(line.rstrip(), flush=True)
        p.wait()
        timer.cancel()
    row = dict(part=name, rc=p.returncode, wall_s=round(time.time() - t0, 1))
    if image is not None and image.exists():
        row["to_image_s"] = round(image.stat().st_mtime - t0, 1)
    if p.returncode != 0 or not objs:
        row.update(timed_out=time.time() >= deadline, stdout_json=bool(objs))
        row["stderr_tail"] = log.read_text(errors="replace").strip().splitlines()[-8:]
    return row, objs, t0


def child_args(a, kind: str) -> list[str]:
    return ["--child", kind, "--model", str(a.model), "--size", str(a.size), "--steps", str(a.steps),
            "--tier", a.tier, "--jobs", str(a.jobs), "--out-dir", str(a.runs)]  # fmt: skip


def cli_row(name: str, a, deadline: float, compile_: bool = False, env=None) -> dict:
    """One `python -m core generate` process and what its JSON summary says."""
    out = a.runs / f"{name}.png"
    args = [
        "generate", "--model", str(a.model / "flux"), "--controlnet", str(a.model / "cn"), "--control", "canny",
        "--image", str(a.runs / "input.png"), "--prompt", PROMPT, "--steps", str(a.steps), "--seed", "7",
        "--max-side", str(a.size), "--tier", a.tier, "--out", str(out), *(["--compile"] if compile_ else []),
    ]  # fmt: skip
    row, objs, _ = spawn(name, "core.__main__", args, a, deadline, env=env, image=out)
    if row["rc"] != 0 or not objs:
        return row
    s = objs[-1]
    secs, fast, plan = s["seconds"], s.get("fast") or {}, s["plan"]
    parsed = [float(m.group(1)) for e in s["events"] if (m := COMPILED.search(e))]
    compile_s = fast.get("compile_s", parsed[0] if parsed else 0.0)
    image_s = sum(v for k, v in secs.items() if k != "load")
    # total_s: from cmd_generate's start (startup_s before it); load_s: its imports, reading, placing, saving
    row.update(total_s=s["total_s"], load_s=round(s["total_s"] - image_s, 2), image_s=round(image_s, 2))
    row.update(
        startup_s=round(row["to_image_s"] - s["total_s"], 1) if "to_image_s" in row else None,
        step_s=round((secs.get("denoise", 0.0) - compile_s) / a.steps, 3),  # the compile is in the denoise
        compiled=fast.get("compiled"),
        compile_s=compile_s,
        compile_event_s=parsed[0] if parsed else None,
        compile_cache=fast.get("compile_cache"),
        peak_reserved_gb=s["measured_peak_reserved_gb"],
        predicted_peak_gb=s["predicted_peak_gb"],
        predicted_first_job_s=plan.get("predicted_first_job_s"),
        first_job_parts=plan.get("first_job_parts"),
    )
    return dict(row, seconds=secs, events=s["events"])


def part_diffusers(a, deadline: float, _cache: Path) -> list[dict]:
    row, objs, t0 = spawn("diffusers", "bench.bench_first", child_args(a, "diffusers"), a, deadline,
                          image=a.runs / "diffusers.png")  # fmt: skip
    if row["rc"] == 0 and objs:
        s = dict(objs[-1])
        row.update(startup_s=round(s.pop("imported_at") - t0, 1), **s)  # the interpreter and the imports
    return [row]


def cache_env(cache: Path) -> dict:
    """The environment with `cache` as the cache root (Inductor's and Triton's variables would bypass it)."""
    env = {k: v for k, v in os.environ.items() if k not in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR")}
    return dict(env, FLUX_ANYVRAM_CACHE=str(cache), PYTHONUNBUFFERED="1")


def part_cache(a, deadline: float, cache: Path) -> list[dict]:
    env = cache_env(cache)
    rows = [cli_row("cache_cold", a, deadline, True, env)]
    if time.time() > deadline:
        return rows + [dict(part="cache_warm", skipped="time budget")]
    return rows + [cli_row("cache_warm", a, deadline, True, env)]


def part_app(a, deadline: float, cache: Path) -> list[dict]:
    warm = any((cache / "torch-compile" / "fxgraph").glob("*"))
    env = cache_env(cache)
    row, objs, t0 = spawn("app", "bench.bench_first", child_args(a, "app"), a, deadline, env=env, echo=True)
    row.update(cache_warm_at_start=warm, app_jobs=[o for o in objs if "job" in o])  # kept if it died half-way
    if row["rc"] == 0 and objs:
        s = objs[-1]
        row.update(startup_s=round(s["imported_at"] - t0, 1), load_s=s["load_s"], policy=s["policy"])
        row.update(to_image_s=round(s["first_image_at"] - t0, 1), app_jobs=s["jobs"])
    return [row]


def child_diffusers(a) -> dict:
    """The baseline: plain diffusers, as its model card writes it, with the CLI's job."""
    import torch
    from diffusers import FluxControlNetModel, FluxControlNetPipeline
    from PIL import Image

    from core.job import ControlSpec
    from preprocessors import load_image
    from preprocessors.registry import preprocess

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    sync = torch.cuda.synchronize if dev == "cuda" else lambda: None
    t0 = time.time()  # the imports are done
    cn = FluxControlNetModel.from_pretrained(a.model / "cn", torch_dtype=torch.bfloat16)
    pipe = FluxControlNetPipeline.from_pretrained(a.model / "flux", controlnet=cn, torch_dtype=torch.bfloat16).to(dev)
    pipe.set_progress_bar_config(disable=True)
    sync()
    t1 = time.time()
    c = ControlSpec("canny")  # the CLI's `--control canny`: scale 0.7, end 0.8
    img = load_image(a.out_dir / "input.png").resize((a.size, a.size), Image.LANCZOS)
    stamps = []

    def on_step(p, i, t, kw):
        sync()
        stamps.append(time.time())
        return {}

    image = pipe(
        PROMPT, control_image=preprocess("canny", img), height=a.size, width=a.size, num_inference_steps=a.steps,
        control_mode=c.mode_id if cn.config.num_mode is not None else None,  # Union-Pro-2.0 has no mode ids
        controlnet_conditioning_scale=c.scale, control_guidance_start=c.start, control_guidance_end=c.end,
        guidance_scale=3.5, generator=torch.Generator("cpu").manual_seed(7), callback_on_step_end=on_step,
        max_sequence_length=min(512, pipe.tokenizer_2.model_max_length),
    ).images[0]  # fmt: skip
    image.save(a.out_dir / "diffusers.png")
    steps = sorted(b - x for x, b in zip(stamps, stamps[1:]))
    peak = round(torch.cuda.max_memory_reserved() / 2**30, 2) if dev == "cuda" else None
    step_s = round(steps[len(steps) // 2], 3) if steps else None
    return dict(imported_at=t0, load_s=round(t1 - t0, 2), image_s=round(time.time() - t1, 2), step_s=step_s,
                peak_reserved_gb=peak)  # fmt: skip


def child_app(a) -> dict:
    """The web app's engine held across jobs, built and fed as app.py and ui/ do."""
    import app
    from ui.handlers import build_job, model_name, save_result

    t0 = time.time()  # the imports are done
    engine = app.build_engine(app.parse_args(["--model", str(a.model / "flux"), "--controlnet", str(a.model / "cn")]))
    load_s, jobs, first = round(time.time() - t0, 2), [], None
    for k in range(a.jobs):
        job = build_job(str(a.out_dir / "input.png"), PROMPT, [("canny", None, None)], tier=a.tier, seed=7 + k,
                        steps=a.steps, max_side=a.size)  # fmt: skip
        t = time.time()
        res = engine.run(job)
        t1 = time.time()
        save_result(res, a.out_dir / "app", model=model_name(engine.spec))
        first = first or time.time()
        fast = res.report.get("fast") or {}
        row = dict(job=k + 1, seed=7 + k, image_s=round(t1 - t, 2), save_s=round(time.time() - t1, 2))
        row.update({key: fast.get(key) for key in ("compiled", "compile_s", "compile_cache")})
        row.update(peak_reserved_gb=res.report["peak_reserved_gb"], predicted_peak_gb=res.plan.predicted_peak_gb)
        row["seconds"] = res.report.get("seconds")  # the phases: where a slow job spends it
        jobs.append(dict(row, events=list(res.events)))
        print(json.dumps(jobs[-1]), flush=True)  # the parent echoes it: a row as it goes
    return dict(imported_at=t0, load_s=load_s, policy=engine.fast.compile, first_image_at=first, jobs=jobs)


def steady(jobs: list[dict]) -> list[dict]:
    """The jobs after the first that compiled (all after the first where none did)."""
    k = next((i for i, j in enumerate(jobs) if j.get("compiled")), 0)
    return jobs[k + 1 :]


def judge(rows: list[dict], cap_gb: float) -> dict:
    """Each bar: its figure and whether it holds (None where the runs it needs did not complete)."""
    by = {r["part"]: r for r in rows if r.get("rc") == 0}
    bars = {}
    if "cli" in by and "diffusers" in by:
        x, y = by["cli"].get("to_image_s"), by["diffusers"].get("to_image_s")
        bars["cli_first_image_le_diffusers"] = dict(value=[x, y], ok=None if None in (x, y) else x <= y)
    if "cache_warm" in by:
        w = by["cache_warm"]["compile_s"]
        bars["warm_compile_le_5s"] = dict(value=w, ok=bool(by["cache_warm"]["compiled"]) and w <= BAR_WARM_COMPILE_S)
    jobs = by.get("app", {}).get("app_jobs") or []
    if jobs:
        late = [j["image_s"] for j in steady(jobs)]
        bars["app_steady_le_5s"] = dict(value=late, ok=bool(late) and max(late) <= BAR_IMAGE_S)
        peaks = [(j["job"], j["peak_reserved_gb"], j["predicted_peak_gb"]) for j in jobs]
        ok = all(m <= p <= m * OVER and m <= cap_gb for _, m, p in peaks)
        bars["app_peak_le_predicted_le_8pct_over"] = dict(value=peaks, ok=ok)
    return bars


def read_through(folder: Path) -> float:
    """Every weight file read once before the parts: the first part must not pay the disk while the
    others read the page cache."""
    t0 = time.time()
    for f in sorted(folder.rglob("*.safetensors")):
        with open(f, "rb") as fh:
            while fh.read(1 << 26):
                pass
    return round(time.time() - t0, 1)


def tiny_model(folder: Path) -> None:
    """The demo model's folders under the names ensure_model writes (flux/, cn/)."""
    from core.demo_model import ensure_demo_model

    root = ensure_demo_model()
    folder.mkdir(parents=True, exist_ok=True)
    for name, src in (("flux", "flux"), ("cn", "controlnet-union")):
        (folder / name).unlink(missing_ok=True)
        (folder / name).symlink_to(root / src, target_is_directory=True)


def report(data: dict, out_dir: Path) -> None:
    write(out_dir / "first.json", data)
    env = data["env"]
    cols = ["part", "rc", "wall_s", "to_image_s", "startup_s", "load_s", "image_s", "step_s", "compiled"]
    cols += ["compile_s", "compile_cache", "peak_reserved_gb", "predicted_peak_gb", "predicted_first_job_s", "skipped"]
    md = "# Time to the first image, and the compile cache\n\n"
    md += f"- {env.get('device', '?')}; torch {env.get('torch')}, diffusers {env.get('diffusers')}, "
    md += f"transformers {env.get('transformers')}, python {env.get('python')}\n- job: {data['job']}\n"
    md += f"- command: `{data['command']}`\n\n" + md_table(data["rows"], cols) + "\n"
    jobs = next((r["app_jobs"] for r in data["rows"] if r.get("app_jobs")), [])
    if jobs:
        jcols = ["job", "seed", "image_s", "save_s", "compiled", "compile_s", "compile_cache", "peak_reserved_gb"]
        md += "\nApp engine, one process:\n\n" + md_table(jobs, jcols + ["predicted_peak_gb"]) + "\n"
    if data.get("bars") is not None:
        md += "\nBars:\n\n" + "\n".join(f"- {k}: {v['value']} → {v['ok']}" for k, v in data["bars"].items()) + "\n"
    (out_dir / "FIRST.md").write_text(md)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=Path("/tmp/flux-random"), help="written if missing")
    ap.add_argument("--parts", default=",".join(PARTS))
    ap.add_argument("--budget-s", type=float, default=560)
    ap.add_argument("--out-dir", type=Path, default=Path("bench/first"))
    ap.add_argument("--cap-gb", type=float, default=47.5, help="every child's allocator cap (0: none)")
    ap.add_argument("--jobs", type=int, default=4, help="jobs of the app part")
    ap.add_argument("--cpu-smoke", action="store_true", help="the tiny model on the CPU: runs, not speed")
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=28)
    ap.add_argument("--tier", default="48")
    ap.add_argument("--child", choices=("diffusers", "app"), help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:  # inside a fresh process: its result is the last line on stdout
        print(json.dumps((child_diffusers if a.child == "diffusers" else child_app)(a)), flush=True)
        return 0
    deadline = time.time() + a.budget_s
    if a.cpu_smoke:
        a.size, a.steps, a.tier, a.cap_gb = 64, 2, "cpu", 0.0
    a.out_dir.mkdir(parents=True, exist_ok=True)
    a.runs = (a.out_dir / "runs").resolve()
    a.runs.mkdir(exist_ok=True)
    data = dict(env=child_environment(), command="python -m bench.bench_first " + " ".join(argv or sys.argv[1:]))
    data.update(smoke=a.cpu_smoke, job=dict(size=a.size, steps=a.steps, tier=a.tier, cap_gb=a.cap_gb), rows=[])
    if a.cpu_smoke:
        a.model = a.out_dir.resolve() / "model"
        tiny_model(a.model)
    else:
        ensure_model(a.model)
    a.model = a.model.resolve()
    data["read_through_s"] = read_through(a.model)
    photo(a.size).save(a.runs / "input.png")
    cache = Path(tempfile.mkdtemp(prefix="bench-first-cache-"))  # fresh: the cold run starts empty
    chosen = set(a.parts.split(","))
    try:
        direct = dict(os.environ, FLUX_ANYVRAM_DIRECT_READ="1")
        parts = (
            part_diffusers,
            lambda *x: [cli_row("cli", *x[:2])],
            lambda *x: [cli_row("direct", *x[:2], env=direct)],
        )
        for name, part in zip(PARTS, parts + (part_cache, part_app)):
            if name not in chosen:
                continue
            if time.time() > deadline:
                rows = [dict(part=name, skipped="time budget")]
            else:
                try:
                    rows = part(a, deadline, cache)
                except Exception as e:  # noqa: BLE001 - one part's fault must not lose the others
                    rows = [dict(part=name, rc="error", error=f"{type(e).__name__}: {str(e)[:300]}")]
            for r in rows:
                print(json.dumps(r), flush=True)
            data["rows"] += rows
            write(a.out_dir / "first.json", data)
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    data["bars"] = None if a.cpu_smoke else judge(data["rows"], a.cap_gb)
    report(data, a.out_dir)
    print(json.dumps(dict(bars=data["bars"])), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
