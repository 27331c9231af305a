"""GPU benchmark of the VRAM tiers, with diffusers' own recipes beside them.

Full-size FLUX.1-dev + Union-Pro architecture, random bf16 weights, 1024², one canny control,
guidance 3.5, 512 T5 tokens. Each tier runs the whole job (encode, denoise, decode) under
torch.cuda.set_per_process_memory_fraction((N - 0.5) GiB / total), in one process, built once.

Before the tiers, `--sweep tier:ring:cast,...` runs a tier's plan with another copy-ring size or
cast stream for `--sweep-steps` steps (how the streaming knobs were chosen), and `--profile tier`
profiles two steps of a tier: the share of host→device copy time that runs under compute.

usage: python -m bench.bench_tiers [--tiers 48,24,16,12,8,6,4,8:4bit] [--steps 28] [--baselines resident,leaf_fp8]
                                   [--sweep 8:8:side,8:8:compute] [--profile 8] [--out-dir bench]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from PIL import Image

from bench.env import environment, md_table, write
from bench.random_model import PROMPT, photo, random_engine
from core.denoise.runtime import PromptCache
from core.device import detect
from core.engine import Engine
from core.job import ControlSpec, Job
from preprocessors.registry import preprocess

GiB = 2**30


def cap(gib: float | None) -> None:
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(1.0 if gib is None else gib * GiB / total)


def step_timer():
    stamps = []

    def progress(label, i, n):
        if ": tile" in label:
            return
        torch.cuda.synchronize()
        stamps.append(time.perf_counter())

    def step_s():
        d = [b - a for a, b in zip(stamps, stamps[1:])]
        return round(statistics.median(d), 4) if d else None

    return progress, step_s


def run_tier(engine: Engine, spec: str, job: Job) -> dict:
    """One tier, `spec` = TIER[:PRECISION] (e.g. 8:4bit), under a cap of TIER - 0.5 GiB."""
    tier, _, precision = spec.partition(":")
    job = job.with_(precision=precision or "auto")
    engine.release()
    cap(None)
    torch.cuda.empty_cache()
    budget = float(tier) - 0.5
    cap(budget)
    engine.cache = PromptCache()  # every tier encodes its prompt under its own cap
    progress, step_s = step_timer()
    row = dict(tier=spec, cap_gib=budget)
    t0 = time.perf_counter()
    try:
        # warm-up: the plan is applied (load), the prefetch order learned, kernels chosen
        warm = engine.run(job.with_(tier=tier, steps=2))
        engine.cache = PromptCache()
        res = engine.run(job.with_(tier=tier), progress=progress)
        rep = res.report
        row.update(
            completed=all("out of memory" not in e for e in res.events + warm.events),
            peak_reserved_gb=max(rep["peak_reserved_gb"], warm.report["peak_reserved_gb"]),  # load too
            predicted_peak_gb=res.plan.predicted_peak_gb,
            step_s=step_s(),
            predicted_step_s=res.plan.predicted_step_s,
            image_s=round(sum(v for k, v in rep["seconds"].items() if k not in ("load",)), 2),
            load_s=warm.report["seconds"].get("load"),
            seconds=rep["seconds"],
            phases=rep["phases"],
            placement={k: v for k, v in res.plan.summary()["placement"].items() if v},
            formats=res.plan.placement.formats(),
            text_encoders=res.plan.text_encoders,
            vae_tiling=res.plan.vae_tiling,
            host_ram_gb=res.plan.host_ram_gb,
            events=list(res.events),
            stream_stats=dict(engine.residency.stats) if engine.residency else None,
        )
        row["estimate_error_pct"] = round(
            100 * (row["predicted_peak_gb"] - row["peak_reserved_gb"]) / row["peak_reserved_gb"], 1
        )
    except Exception as e:  # noqa: BLE001 - a benchmark records failures
        row.update(completed=False, error=f"{type(e).__name__}: {str(e)[:300]}")
    row["wall_s"] = round(time.perf_counter() - t0, 1)
    cap(None)
    print("TIER", row, flush=True)
    return row


def run_variant(engine: Engine, spec: str, job: Job) -> dict:
    """One tier's plan with the copy ring and cast stream of `spec` ("tier:ring:cast")."""
    from dataclasses import replace

    from core.stream import residency

    tier, ring, cast = spec.split(":")
    plan_fn = engine.plan

    def with_ring(j, t=None):
        p = plan_fn(j, t)
        return replace(p, placement=replace(p.placement, ring=int(ring)))

    engine.plan = with_ring
    residency.DEFAULT_CAST = cast
    try:
        row = run_tier(engine, tier, job)
    finally:
        engine.plan, residency.DEFAULT_CAST = plan_fn, "side"
    engine.release()
    row.update(variant=spec, ring=int(ring), cast=cast)
    print(
        "VARIANT",
        {k: row.get(k) for k in ("variant", "step_s", "peak_reserved_gb", "stream_stats", "error")},
        flush=True,
    )
    return row


def profile_tier(engine: Engine, tier: str, job: Job, out: Path) -> dict:
    """Two profiled steps of a tier: copy time, the share of it under a compute kernel, kernel time."""
    from bench.profile_streaming import profile_steps

    engine.release()
    cap(float(tier) - 0.5)
    try:
        res, summary = profile_steps(engine, job.with_(tier=tier), 3, out / f"trace_tier{tier}.json")
    finally:
        cap(None)
    row = dict(tier=tier, seconds=res.report["seconds"], **summary)
    engine.release()
    print("PROFILE", row, flush=True)
    return row


def run_diffusers(pipe, recipe: str, job: Job, control: Image.Image) -> dict:
    """diffusers' own recipes on the same pipeline, for comparison."""
    from diffusers.hooks import apply_group_offloading

    dev = torch.device("cuda")
    cap(None)
    row = dict(recipe=recipe)
    if recipe == "resident":
        pipe.to(dev)
    elif recipe == "leaf_fp8":  # diffusers' best recipe under an 8 GB cap; changes the model: run last
        pipe.transformer.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.bfloat16)
        pipe.controlnet.nets[0].enable_layerwise_casting(
            storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.bfloat16
        )
        for m in (pipe.transformer, pipe.controlnet, pipe.text_encoder_2, pipe.text_encoder):
            apply_group_offloading(m, onload_device=dev, offload_type="leaf_level", use_stream=True)
        pipe.vae.to(dev)
        row["cap_gib"] = 7.5
        cap(7.5)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    progress, step_s = step_timer()
    t0 = time.perf_counter()
    try:
        pipe(
            PROMPT,
            control_image=[control],
            control_mode=[0],
            controlnet_conditioning_scale=[0.7],
            control_guidance_end=[0.8],
            height=job.height,
            width=job.width,
            num_inference_steps=job.steps,
            guidance_scale=3.5,
            generator=torch.Generator("cpu").manual_seed(0),
            max_sequence_length=512,
            callback_on_step_end=lambda p, i, t, kw: (progress("step", i, 0), {})[1],
        )
        torch.cuda.synchronize()
        row.update(completed=True, image_s=round(time.perf_counter() - t0, 2), step_s=step_s())
    except Exception as e:  # noqa: BLE001
        row.update(completed=False, error=f"{type(e).__name__}: {str(e)[:200]}")
    row["peak_reserved_gb"] = round(torch.cuda.max_memory_reserved() / GiB, 2)
    cap(None)
    if recipe == "resident":
        pipe.to("cpu")
        torch.cuda.empty_cache()
    print("DIFFUSERS", row, flush=True)
    return row


def report(out_dir: Path, data: dict) -> None:
    rows = data["tiers"]
    base = next((r["step_s"] for r in data.get("diffusers", []) if r["recipe"] == "resident" and r.get("step_s")), None)
    ours48 = next((r["step_s"] for r in rows if r["tier"] == "48" and r.get("step_s")), None)
    ref = base or ours48
    for r in rows + data.get("diffusers", []) + data.get("sweep", []):
        if r.get("step_s") and ref:
            r["vs_resident"] = round(r["step_s"] / ref, 2)
    write(out_dir / "results.json", data)
    env = data["env"]
    md = [
        "# Tier benchmark\n",
        f"- device: {env.get('device')} ({env.get('device_memory_gib')} GiB); "
        f"torch {env['torch']}, diffusers {env['diffusers']}, transformers {env['transformers']}",
        f"- host→device {data['device']['h2d_gbps']} GiB/s pinned, matmul {data['device']['tflops']} TFLOP/s",
        f"- job: {data['job']}",
        f"- command: `{env['command']}`",
        f"- ratios are s/step over diffusers' all-resident bf16 run in the same process ({ref} s/step)\n",
        md_table(
            rows,
            [
                "tier",
                "cap_gib",
                "completed",
                "peak_reserved_gb",
                "predicted_peak_gb",
                "estimate_error_pct",
                "step_s",
                "vs_resident",
                "image_s",
                "load_s",
                "placement",
                "text_encoders",
                "host_ram_gb",
            ],
        ),
        "\n## diffusers recipes, same model and job\n",
        md_table(
            data.get("diffusers", []),
            ["recipe", "cap_gib", "completed", "peak_reserved_gb", "step_s", "vs_resident", "image_s", "error"],
        ),
    ]
    if data.get("sweep"):
        md += [
            "\n## Streaming knobs (copy ring in largest units, cast stream)\n",
            md_table(data["sweep"], ["variant", "step_s", "vs_resident", "peak_reserved_gb", "stream_stats"]),
        ]
    if data.get("profile"):
        md += ["\n## Profile\n", f"`{data['profile']}`"]
    (out_dir / "RESULTS.md").write_text("\n".join(md) + "\n")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiers", default="48,24,16,12,8,6,4")
    ap.add_argument("--steps", type=int, default=28)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--baselines", default="resident,leaf_fp8")
    ap.add_argument("--sweep", default="")
    ap.add_argument("--sweep-steps", type=int, default=6)
    ap.add_argument("--profile", default="")
    ap.add_argument("--compile", action="store_true", help="let the 48 GB plan compile its blocks")
    ap.add_argument("--out-dir", default="bench")
    a = ap.parse_args()
    dev = detect()
    engine, build_s = random_engine(info=dev)
    pipe = engine.pipe
    print("built in", build_s, "s;", dev, flush=True)
    img = photo(a.size)
    control = preprocess("canny", img)
    job = Job(
        prompt=PROMPT,
        image=img,
        controls=(ControlSpec("canny", 0.7, end=0.8),),
        width=a.size,
        height=a.size,
        steps=a.steps,
        seed=0,
    )
    data = dict(
        env=environment(),
        device=dict(h2d_gbps=dev.h2d_gbps, tflops=dev.tflops, name=dev.name),
        job=dict(size=a.size, steps=a.steps, controls=1, guidance=3.5, t5_tokens=512),
        build_s=build_s,
        tiers=[],
        diffusers=[],
    )
    out = Path(a.out_dir)
    baselines = [b for b in a.baselines.split(",") if b]
    if "resident" in baselines:
        data["diffusers"].append(run_diffusers(pipe, "resident", job, control))
    from dataclasses import replace

    # the 48 GB row runs eager unless --compile (then from its warm-up on); bench_speed measures the compiled path
    engine.fast = replace(engine.fast, compile="on" if a.compile else "off")
    out.mkdir(parents=True, exist_ok=True)
    for spec in filter(None, a.sweep.split(",")):
        data.setdefault("sweep", []).append(run_variant(engine, spec, job.with_(steps=a.sweep_steps)))
        write(out / "results.json", data)
    if a.profile:
        data["profile"] = profile_tier(engine, a.profile, job, out)
    for tier in filter(None, a.tiers.split(",")):
        data["tiers"].append(run_tier(engine, tier, job))
        report(out, data)
    engine.release()
    if "leaf_fp8" in baselines:
        data["diffusers"].append(run_diffusers(pipe, "leaf_fp8", job, control))
    report(out, data)
    print((out / "RESULTS.md").read_text())


if __name__ == "__main__":
    main()
