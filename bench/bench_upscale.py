"""GPU benchmark of progressive tiled upscaling: 1024² → 2048² and → 4096² under the 8 and 24 GB caps,
full-size random-weight FLUX.1-dev + Union. Reports peak reserved memory, seconds per stage, tiles,
and the seam metric of the output.

usage: python -m bench.bench_upscale [--tiers 8,24] [--factors 2,4] [--steps 4] [--out-dir bench]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from bench.bench_tiers import PROMPT, cap, photo
from bench.env import environment, md_table, write
from bench.random_model import random_engine
from bench.seams import seam_ratio
from core.denoise.runtime import PromptCache
from core.job import ControlSpec, Job
from core.tiling import token_tiles


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiers", default="8,24")
    ap.add_argument("--factors", default="2,4")
    ap.add_argument("--steps", type=int, default=4, help="denoising steps of the base image")
    ap.add_argument("--upscale-steps", type=int, default=4, help="steps per upscale stage")
    ap.add_argument("--out-dir", default="bench")
    a = ap.parse_args()
    engine, build_s = random_engine()
    img = photo(1024)
    rows = []
    for tier in a.tiers.split(","):
        for f in (float(x) for x in a.factors.split(",")):
            engine.release()
            cap(None)
            torch.cuda.empty_cache()
            cap(float(tier) - 0.5)
            engine.cache = PromptCache()
            job = Job(
                prompt=PROMPT,
                image=img,
                controls=(ControlSpec("canny", 0.7, end=0.8),),
                width=1024,
                height=1024,
                steps=a.steps,
                upscale=f,
                upscale_steps=a.upscale_steps,
                tier=tier,
            )
            row = dict(tier=tier, factor=f, out=f"{job.out_size[0]}x{job.out_size[1]}")
            t0 = time.perf_counter()
            try:
                res = engine.run(job)
                rep = res.report
                w, h = res.image.size
                _, _, tiles, _ = token_tiles(w, h, res.plan.upscale_tile, res.plan.overlap)
                row.update(
                    completed=all("out of memory" not in e for e in res.events),
                    peak_reserved_gb=rep["peak_reserved_gb"],
                    predicted_peak_gb=res.plan.predicted_peak_gb,
                    tile=res.plan.upscale_tile,
                    last_stage_tiles=len(tiles),
                    stage_s={k: v for k, v in rep["seconds"].items() if k.startswith("upscale")},
                    decode_s=rep["seconds"].get("decode"),
                    seam_ratio=round(seam_ratio(res.image, tiles, 16), 3) if len(tiles) > 1 else None,
                    events=list(res.events),
                )
            except Exception as e:  # noqa: BLE001
                row.update(completed=False, error=f"{type(e).__name__}: {str(e)[:300]}")
            row["wall_s"] = round(time.perf_counter() - t0, 1)
            cap(None)
            print("UPSCALE", row, flush=True)
            rows.append(row)
    out = Path(a.out_dir)
    data = dict(env=environment(), build_s=build_s, upscale_steps=a.upscale_steps, rows=rows)
    write(out / "upscale_results.json", data)
    (out / "UPSCALE.md").write_text(
        "# Upscale benchmark\n\n"
        + f"- {data['env']}\n\n"
        + md_table(
            rows,
            [
                "tier",
                "factor",
                "out",
                "completed",
                "peak_reserved_gb",
                "predicted_peak_gb",
                "tile",
                "last_stage_tiles",
                "stage_s",
                "decode_s",
                "seam_ratio",
                "wall_s",
            ],
        )
        + "\n"
    )


if __name__ == "__main__":
    main()
