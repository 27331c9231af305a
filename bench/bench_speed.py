"""Top speed with the whole model resident: diffusers (eager, regional compile) against ours.

Full-size FLUX.1-dev + Union-Pro architecture, random bf16 weights, built once; 1024², 28 steps,
guidance 3.5, 512 T5 tokens; one control (canny) and two (canny + tile), control_guidance_end 1.0
(diffusers runs the ControlNet at every step whatever the end, so 1.0 is the like-for-like setting).
Every variant runs a short warm-up (compiles, if it compiles), then `--repeats` timed images; s/image
is wall time from inputs to a PIL image, synchronized (ours through core.Engine.run: preprocessing
and decoding included). Each optimized image is compared with eager diffusers' on the same seed.
Variant names: bench/speed_variants.py; the report: bench/speed_report.py.

variants (run in this order; each one's failure is recorded and the rest still run):
  eager              pipe(...) on the resident pipeline
  diffusers_compile  pipe.transformer.compile_repeated_blocks(fullgraph=True) (diffusers' recipe)
  ours_bf16          core.Engine, 48 GB tier: fused QKV + compiled transformer and ControlNet blocks
                     + attention "auto" (cuDNN on Hopper) + idle-ControlNet skip
  ours_fp8           the same with Job(fp8_compute=True)
  ours_bf16_end08    ours_bf16 with control_guidance_end 0.8 (the UI default): the skip's saving
  ours_bf16_flash    ours_bf16 with flash attention forced, against cuDNN
  ours_<bf16|fp8>_<mod>[_<mod>...]  not run by default; each mod changes how ours compiles (and so
                     recompiles from scratch): static (dynamic=False), autotune
                     (mode="max-autotune-no-cudagraphs"), cudagraphs (mode="reduce-overhead": CUDA
                     graphs; fails on regional blocks, see SPEED_PROFILE.md), tuned (Inductor's
                     coordinate-descent tuning), flash (flash attention), nofuse (without
                     core.speed.fused_blocks), graphs (core.speed.graphs: CUDA graphs around whole calls)

--profile: for the first control count of each variant, the GPU time of a denoising step by kernel
kind, the GPU's idle share and the largest kernels (bench/kernels.py), in speed_results.json.

usage: python -m bench.bench_speed [--steps 28] [--size 1024] [--controls 1,2] [--repeats 2]
                                   [--variants eager,...] [--budget-s 380] [--out-dir bench] [--profile]
                                   [--cap-gb 47.5]
       python -m bench.bench_speed --cpu-smoke      # the script's logic on the tiny model, on a CPU
"""

from __future__ import annotations

import argparse
import statistics
import time
import traceback
from dataclasses import replace
from pathlib import Path

import torch
from PIL import Image

from bench.env import environment, fast_path_features
from bench.random_model import PROMPT
from bench.speed_report import mean_abs_diff, report
from bench.speed_variants import DIFFUSERS, MODS, VARIANTS, is_variant, parse_variant, recompiles

T0 = time.perf_counter()
GiB = 2**30
KINDS = ("canny", "tile")


def log(*a):
    print(f"[{time.perf_counter() - T0:6.1f}s]", *a, flush=True)


class Bench:
    def __init__(self, a):
        from bench.random_model import photo, random_engine
        from core.job import ControlSpec, Job
        from core.speed import fast, fp8_compute

        self.a, self.fast = a, fast
        self.cuda = not a.cpu_smoke
        dev = "cuda" if self.cuda else "cpu"
        self.engine, self.build_s = random_engine("tiny" if a.cpu_smoke else "full", device=dev)
        self.pipe = self.engine.pipe
        log("built the random model in", self.build_s, "s")
        self.base_fast = replace(self.engine.fast, compile="on")  # the warm-up compiles, the timed runs do not
        if a.cpu_smoke:  # logic check only: compile with the eager backend, fp8 emulated, bf16 on the CPU
            self.base_fast = fast.FastConfig(devices=("cuda", "cpu"), backend="eager")
            fp8_compute.fp8_supported = lambda index=0: True
            plan = self.engine.plan
            self.engine.plan = lambda job, tier=None: plan(job, tier, dtype="bfloat16")
        self.engine.fast = self.base_fast
        img = photo(a.size)
        self.jobs = {
            n: Job(
                PROMPT,
                img,
                tuple(ControlSpec(k, 0.7, end=1.0) for k in KINDS[:n]),
                a.size,
                a.size,
                steps=a.steps,
                seed=0,
                tier="cpu" if a.cpu_smoke else a.tier,
            )
            for n in a.controls
        }
        first = self.jobs[a.controls[0]]
        self.plan = self.engine.plan(first)
        self.engine.check_fits(self.plan)
        self.engine.apply(self.plan)  # resident: the diffusers variants run on the same placement
        log("placed:", self.plan.summary()["placement"], "text encoders", self.plan.text_encoders)
        self.images: dict[tuple[str, int], Image.Image] = {}
        self.last_image_s = None

    # -- helpers --------------------------------------------------------------------------------
    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def reset_peak(self):
        if self.cuda:  # cached blocks of the previous variant would count as this one's reserved peak
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()

    def peak_gb(self):
        return round(torch.cuda.max_memory_reserved() / GiB, 2) if self.cuda else None

    def diffusers_call(self, job):
        """Eager diffusers with exactly the engine's inputs (resized photo, control images, lists)."""
        from core.denoise.generate import control_args, control_images

        image = job.image.resize((job.width, job.height), Image.LANCZOS)
        controls = control_images(job, image)

        def call(steps):
            return self.pipe(
                PROMPT,
                control_image=controls,
                height=job.height,
                width=job.width,
                num_inference_steps=steps,
                guidance_scale=job.guidance,
                generator=torch.Generator("cpu").manual_seed(job.seed),
                max_sequence_length=512,
                output_type="pil",
                **control_args(self.pipe, job.controls),
            ).images[0]

        return call

    def timed(self, fn):
        self.sync()
        t = time.perf_counter()
        out = fn()
        self.sync()
        return out, time.perf_counter() - t

    # -- one variant, one control count ----------------------------------------------------------
    def run(self, variant: str, n: int) -> dict:
        from core.speed.compile_policy import compile_seconds

        a = self.a
        job = self.jobs[n]
        row = dict(variant=variant, controls=n, steps=a.steps, size=a.size)
        self.reset_peak()
        c0 = compile_seconds()
        if variant in DIFFUSERS:
            call = self.diffusers_call(job)
            warm = lambda: call(a.warmup_steps)
            image = lambda: call(a.steps)
        else:
            fp8, end, changes = parse_variant(variant)
            job = job.with_(controls=tuple(replace(c, end=end) for c in job.controls), fp8_compute=fp8)
            self.engine.fast = replace(self.base_fast, **changes)
            results = []

            def warm():
                return self.engine.run(job.with_(steps=a.warmup_steps))

            def image():
                r = self.engine.run(job)
                results.append(r)
                return r.image

        _, warm_s = self.timed(warm)
        row["warmup_s"] = round(warm_s, 2)
        row["compile_s"] = round(max(0.0, compile_seconds() - c0), 1)
        times, img = [], None
        for _ in range(a.repeats):
            img, dt = self.timed(image)
            times.append(dt)
        row["image_s"] = round(statistics.median(times), 3)
        row["image_s_all"] = [round(t, 3) for t in times]
        row["peak_reserved_gb"] = self.peak_gb()
        row["compile_s_timed"] = round(max(0.0, compile_seconds() - c0 - row["compile_s"]), 1)  # should be 0
        if variant.startswith("ours"):
            r = results[-1]
            row.update(
                fast=r.report.get("fast"),
                seconds=r.report["seconds"],
                events=list(r.events),
                placement=r.plan.summary()["placement"],
                tier=r.plan.tier,
                denoise_s=r.report["seconds"].get("denoise"),
                decode_s=r.report["seconds"].get("decode"),
            )
            from core.speed import graphs

            row["cuda_graphs"] = {
                name: dict(forms=len(gc.graphs), replays=gc.replays, disabled=gc.disabled)
                for name in ("controlnet", "transformer")
                if (gc := graphs.installed(getattr(self.pipe, name))) is not None
            } or None
        if a.profile and n == a.controls[0] and self.cuda:
            from bench.kernels import kernel_breakdown

            steps = (lambda k: call(k)) if variant in DIFFUSERS else (lambda k: self.engine.run(job.with_(steps=k)))
            row["profile"] = kernel_breakdown(steps)
            log("PROFILE", variant, row["profile"])
        self.images[(variant, n)] = img
        if variant != "eager" and ("eager", n) in self.images and "end08" not in variant:
            row["mean_abs_diff_vs_eager"] = mean_abs_diff(img, self.images[("eager", n)])
        base = variant.replace("_graphs", "")
        if base != variant and (base, n) in self.images:  # graphs replay the same kernels: same pixels
            row[f"mean_abs_diff_vs_{base}"] = mean_abs_diff(img, self.images[(base, n)])
        self.last_image_s = row["image_s"]
        return row

    def setup(self, variant: str) -> None:
        """Between variants: diffusers' variants run on plain diffusers modules (our fused, fp8 and
        compiled blocks undone: once they were not, and 'diffusers_compile' measured our fp8 path);
        diffusers' compiled blocks off, dynamo's caches cleared before ours."""
        if variant in DIFFUSERS:
            from core.speed import attention
            from core.speed.fp8_compute import Fp8Linear

            self.engine.state.undo_fast()
            plain = attention.attentions(self.pipe.transformer)
            if any(getattr(x, "fused_projections", False) for x in plain) or any(
                isinstance(m, Fp8Linear) for m in self.pipe.transformer.modules()
            ):
                raise RuntimeError("our fast path is still applied: a diffusers variant would not measure diffusers")
        if variant == "diffusers_compile":
            kw = dict(fullgraph=True) if self.cuda else dict(fullgraph=True, backend="eager")
            self.pipe.transformer.compile_repeated_blocks(**kw)
        if recompiles(variant):  # compiled blocks are kept as they are: other settings need new ones
            self.engine.state.undo_fast()
            torch._dynamo.reset()

    def teardown(self, variant: str) -> None:
        if variant == "diffusers_compile":
            self.fast.uncompile_blocks(self.pipe.transformer)
            torch._dynamo.reset()
        if recompiles(variant):
            self.engine.state.undo_fast()
            torch._dynamo.reset()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=28)
    ap.add_argument("--warmup-steps", type=int, default=2)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--controls", default="1,2")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--tier", default="48")
    ap.add_argument(
        "--variants",
        default=",".join(VARIANTS),
        help=f"any of {', '.join(VARIANTS)}, or ours_<bf16|fp8>_<mod> with mods end08, {', '.join(MODS)}",
    )
    ap.add_argument(
        "--cap-gb",
        type=float,
        default=None,
        help="cap the process's GPU memory (GiB; the 48 GB tier's cap is 47.5): proves the tier's peak",
    )
    ap.add_argument("--profile", action="store_true", help="kernel-time breakdown of a denoising step per variant")
    ap.add_argument(
        "--budget-s",
        type=float,
        default=380.0,
        help="skip what would start after this many seconds of wall time (recorded as skipped)",
    )
    ap.add_argument("--out-dir", default="bench")
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny model on the CPU: checks the script, not speed")
    a = ap.parse_args(argv)
    if a.cpu_smoke:
        a.size, a.steps, a.warmup_steps, a.repeats = min(a.size, 128), min(a.steps, 2), 1, 1
    a.controls = [int(c) for c in a.controls.split(",") if c]
    variants = [v for v in a.variants.split(",") if v]
    bad = [v for v in variants if not is_variant(v)]
    if bad:
        ap.error(
            f"unknown variants {bad}; choose from {VARIANTS} or ours_<bf16|fp8>_<mod> (mods: end08, {', '.join(MODS)})"
        )
    if not a.cpu_smoke and not torch.cuda.is_available():
        ap.error("needs a CUDA GPU (or --cpu-smoke)")
    out = Path(a.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = dict(
        env=environment(),
        job=dict(
            size=a.size,
            steps=a.steps,
            controls=a.controls,
            kinds=KINDS,
            guidance=3.5,
            t5_tokens=512,
            control_end=1.0,
            repeats=a.repeats,
            warmup_steps=a.warmup_steps,
            tier=a.tier,
        ),
        device={},
        rows=[],
    )
    bench = None
    try:
        if torch.cuda.is_available() and not a.cpu_smoke:
            data["device"] = fast_path_features()
        log("device", data["device"])
        if a.cap_gb and not a.cpu_smoke:
            from bench.bench_tiers import cap

            cap(a.cap_gb)
            data["job"]["cap_gb"] = a.cap_gb
        bench = Bench(a)
        data["build_s"], data["plan"] = bench.build_s, dict(tier=bench.plan.tier, **bench.plan.summary()["placement"])
        for v in variants:
            for n in a.controls:
                first = n == a.controls[0]
                est = 90 if first and (v in ("diffusers_compile", "ours_bf16", "ours_fp8") or recompiles(v)) else 5
                est += 15 if first and a.profile else 0
                est += a.repeats * (bench.last_image_s or 10)
                if time.perf_counter() - T0 + est > a.budget_s:
                    data["rows"].append(dict(variant=v, controls=n, error=f"skipped: the {a.budget_s:.0f} s budget"))
                    log("SKIP", v, n)
                    continue
                log("RUN", v, f"{n} control(s)")
                try:
                    if n == a.controls[0]:
                        bench.setup(v)
                    row = bench.run(v, n)
                except Exception as e:  # noqa: BLE001 - a benchmark records failures
                    row = dict(variant=v, controls=n, error=f"{type(e).__name__}: {str(e)[:300]}")
                    traceback.print_exc()
                    bench.engine.fast = bench.base_fast
                    if bench.cuda:
                        torch.cuda.empty_cache()
                data["rows"].append(row)
                log(
                    "ROW",
                    {
                        k: row.get(k)
                        for k in (
                            "variant",
                            "controls",
                            "image_s",
                            "compile_s",
                            "mean_abs_diff_vs_eager",
                            "peak_reserved_gb",
                            "error",
                        )
                    },
                )
                data["wall_s"] = round(time.perf_counter() - T0, 1)
                report(out, data, bench.images)
            try:
                bench.teardown(v)
            except Exception as e:  # noqa: BLE001
                log("teardown failed", v, e)
    except Exception as e:  # noqa: BLE001 - building or placing failed: still write what we have
        data["error"] = f"{type(e).__name__}: {str(e)[:500]}"
        traceback.print_exc()
    data["wall_s"] = round(time.perf_counter() - T0, 1)
    report(out, data, bench.images if bench is not None else {})
    print((out / "SPEED.md").read_text(), flush=True)


if __name__ == "__main__":
    main()
