"""bench/bench_speed.py's output: speed_results.json, SPEED.md and the side-by-side image."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from bench.env import md_table, write

BARS = dict(eager=6.88, diffusers_compile=5.16, ours_bf16=4.4, ours_fp8=3.5)  # s/image, one control


def mean_abs_diff(a: Image.Image, b: Image.Image) -> float:
    """Mean |Δ| of the RGB pixels (0..255)."""
    a8, b8 = (np.asarray(im.convert("RGB"), dtype=np.int16) for im in (a, b))
    return round(float(np.abs(a8 - b8).mean()), 3)


def side_by_side(images: list[Image.Image | None], labels: list[str], side: int = 512) -> Image.Image:
    from PIL import ImageDraw

    out = Image.new("RGB", (side * len(images), side + 24), "white")
    draw = ImageDraw.Draw(out)
    for i, (im, label) in enumerate(zip(images, labels)):
        if im is not None:
            out.paste(im.convert("RGB").resize((side, side), Image.LANCZOS), (i * side, 24))
        draw.text((i * side + 6, 5), label if im is not None else f"{label}: missing", fill="black")
    return out


def report(out: Path, data: dict, images: dict) -> None:
    """images: (variant, controls) → the last image of that row."""
    rows = data["rows"]
    ref = {(r["controls"]): r["image_s"] for r in rows if r["variant"] == "eager" and r.get("image_s")}
    dc = {(r["controls"]): r["image_s"] for r in rows if r["variant"] == "diffusers_compile" and r.get("image_s")}
    for r in rows:
        if r.get("image_s"):
            if r["controls"] in ref:
                r["speedup_vs_eager"] = round(ref[r["controls"]] / r["image_s"], 2)
            if r["controls"] in dc:
                r["speedup_vs_diffusers_compile"] = round(dc[r["controls"]] / r["image_s"], 2)
            bar = BARS.get(r["variant"]) if r["controls"] == 1 and data["job"]["steps"] == 28 else None
            if bar and r["variant"].startswith("ours"):
                r["bar_s"], r["meets_bar"] = bar, r["image_s"] <= bar
        if r.get("fast"):
            r["fast_label"] = f"{r['fast']['attention']}, fp8={r['fast']['fp8']}, compiled={r['fast']['compiled']}"
    write(out / "speed_results.json", data)
    env = data["env"]
    md = [
        "# Speed with the whole model resident\n",
        f"- device: {env.get('device')} ({env.get('device_memory_gib')} GiB), capability "
        f"{data['device'].get('capability')}, fp8 matmul: {data['device'].get('fp8_supported')}, "
        f"cuDNN attention: {data['device'].get('cudnn_attention')}; torch {env['torch']}, diffusers "
        f"{env['diffusers']}, transformers {env['transformers']}, triton {data['device'].get('triton')}",
        f"- job: {data['job']}",
        f"- command: `{env['command']}`",
        f"- our plan: {data.get('plan')}",
        f"- bars (one control, 28 steps): diffusers eager {BARS['eager']} s, diffusers regional compile "
        f"{BARS['diffusers_compile']} s; ours ≤ {BARS['ours_bf16']} s bf16, ≤ {BARS['ours_fp8']} s fp8",
        f"- build {data.get('build_s')} s, total wall {data.get('wall_s')} s\n",
        md_table(
            rows,
            [
                "variant",
                "controls",
                "image_s",
                "speedup_vs_eager",
                "speedup_vs_diffusers_compile",
                "bar_s",
                "meets_bar",
                "denoise_s",
                "compile_s",
                "warmup_s",
                "mean_abs_diff_vs_eager",
                "peak_reserved_gb",
                "fast_label",
                "error",
            ],
        ),
        "\nmean_abs_diff_vs_eager: mean |Δ| of the RGB pixels (0..255) against eager diffusers on the same "
        "seed and inputs (random weights: a numerical-noise measure, not an image-quality one). "
        "ours_bf16_end08 changes the job (control end 0.8), so it has no such number.",
        "\n`speed_side_by_side.png`: eager | ours bf16 | ours fp8, one control, downscaled.",
    ]
    (out / "SPEED.md").write_text("\n".join(md) + "\n")
    n = data["job"]["controls"][0]
    ims = [images.get((v, n)) for v in ("eager", "ours_bf16", "ours_fp8")]
    if any(im is not None for im in ims):
        side_by_side(ims, ["diffusers eager", "ours bf16", "ours fp8"]).save(out / "speed_side_by_side.png")
