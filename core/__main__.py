"""Command line: `python -m core plan ...` and `python -m core generate ...` (see README.md).

Thin: parses, builds a Job, calls core, prints one JSON object. Bad input → one sentence on
stderr, exit code 2, nothing written.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import replace
from pathlib import Path

from core.configs import FLUX_DEV, UNION_PRO
from core.job import TIERS
from core.limits import PRECISIONS

PRECISION_HELP = (
    "weight formats: auto (bf16/fp8 where they fit the GPU and the RAM, 4-bit GGUF Q4_0 where not), "
    "exact (bf16/fp8 only), 4bit (4-bit wherever it is faster)"
)


def _add_model_args(ap):
    ap.add_argument("--model", default=FLUX_DEV, help="FLUX pipeline: Hub id or local folder")
    ap.add_argument("--controlnet", default=UNION_PRO, help="Union ControlNet: Hub id or local folder")
    ap.add_argument("--demo", action="store_true", help="the tiny random-weight demo model (outputs are noise)")
    ap.add_argument(
        "--transformer", help="the transformer from one file (.safetensors bf16/fp8 or .gguf); the rest from --model"
    )


def cmd_plan(a) -> dict:
    from core.device import DeviceInfo, detect
    from core.plan.planner import JobShape, plan_for
    from core.plan.sizes import sizes_from_config

    dev = detect()
    if a.host_ram_gb is not None:  # plan for a machine of another size
        dev = replace(dev, host_ram_gb=a.host_ram_gb)
    if dev.kind == "cpu" and a.tier not in ("cpu", "auto"):
        # plan a GPU tier on a machine without one: a nominal consumer GPU (PCIe 4.0, ~150 TFLOP/s)
        dev = DeviceInfo("cuda", "nominal GPU", float(a.tier), float(a.tier), True, dev.host_ram_gb)
    sizes = sizes_from_config("tiny" if a.demo else "full")
    plan = plan_for(a.tier, JobShape(a.width, a.height, a.controls, a.upscale), sizes, dev, precision=a.precision)
    return dict(
        plan.summary(),
        device=dev.name,
        host_ram_limit_gb=dev.host_ram_gb,
        model="demo" if a.demo else "full-size FLUX.1-dev + Union",
    )


def cmd_generate(a) -> dict:
    import time
    from dataclasses import replace

    from core.engine import Engine
    from core.job import ControlSpec, Job
    from core.lora import parse_lora_arg, suggest
    from core.models import ModelSpec
    from core.pngmeta import save_png
    from preprocessors import load_image
    from preprocessors.image_io import fit_size
    from preprocessors.registry import parse_control_arg

    t0 = time.perf_counter()
    image = load_image(a.image)
    controls = tuple(ControlSpec(*parse_control_arg(c)) for c in (a.control or ["canny"]))
    if a.width and a.height:
        w, h = a.width, a.height
    else:
        w, h = fit_size(image.width, image.height, max_side=a.max_side)
    loras = tuple(parse_lora_arg(s, a.lora_dir) for s in a.lora or ())
    preset = suggest(loras) or {}  # a few-step LoRA's steps and guidance, unless given
    steps = a.steps if a.steps is not None else preset.get("steps", 28)
    guidance = a.guidance if a.guidance is not None else preset.get("guidance", 3.5)
    job = Job(
        prompt=a.prompt,
        image=image,
        controls=controls,
        width=w,
        height=h,
        steps=steps,
        guidance=guidance,
        seed=a.seed,
        upscale=a.upscale,
        tier=a.tier,
        fp8_compute=a.fp8_compute,
        loras=loras,
        precision=a.precision,
    )
    out = Path(a.out)
    if out.suffix.lower() != ".png" or not out.parent.exists():
        raise ValueError(f"--out must be a .png file in an existing folder, got '{a.out}'.")
    spec = ModelSpec.demo_spec() if a.demo else ModelSpec(a.model, a.controlnet)
    if a.transformer:
        spec = replace(spec, transformer=a.transformer)
    from core.speed.fast import FastConfig

    # one image per process: a compile it cannot earn back is not paid unless asked for
    engine = Engine(spec, fast_config=FastConfig(compile="on" if a.compile else "off"))
    result = engine.run(job)
    summary = result.summary()
    save_png(result.image, out, result.png_params())
    summary.update(out=str(out), total_s=round(time.perf_counter() - t0, 2))
    applied = {k: preset[k] for k in ("steps", "guidance") if k in preset and getattr(a, k) is None}
    if applied:  # what the few-step LoRA's preset set (the user gave the rest)
        summary["preset"] = dict(applied, lora=preset["lora"])
    return summary


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m core", description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("plan", help="print the plan for a tier and job size as JSON")
    p.add_argument("--tier", default="auto", choices=TIERS)
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--height", type=int, default=1024)
    p.add_argument("--controls", type=int, default=1)
    p.add_argument("--upscale", type=float, default=1.0)
    p.add_argument("--demo", action="store_true")
    p.add_argument("--precision", default="auto", choices=PRECISIONS, help=PRECISION_HELP)
    p.add_argument(
        "--host-ram-gb",
        type=float,
        help="plan for a machine with this much host RAM (default: this one's RAM or memory cgroup limit)",
    )
    g = sub.add_parser("generate", help="generate one image; prints a JSON summary")
    g.add_argument("--image", required=True)
    g.add_argument("--control", action="append", help="canny[=SCALE]; repeat for several")
    g.add_argument("--prompt", required=True)
    g.add_argument("--tier", default="auto", choices=TIERS)
    g.add_argument("--precision", default="auto", choices=PRECISIONS, help=PRECISION_HELP)
    g.add_argument("--upscale", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--steps", type=int, help="default 28, or a few-step LoRA's (e.g. 8 for a turbo LoRA)")
    g.add_argument("--guidance", type=float, help="default 3.5, or a few-step LoRA's")
    g.add_argument("--width", type=int)
    g.add_argument("--height", type=int)
    g.add_argument("--max-side", type=int, default=1024, help="fit the input into this size")
    g.add_argument(
        "--fp8-compute",
        action="store_true",
        help="fp8 matmuls when the whole model is resident on an Ada/Hopper GPU: faster, "
        "slightly different fine detail (ignored elsewhere, with a note)",
    )
    g.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="compile the denoiser blocks where the whole model is resident (15-30 s once per process and "
        "image size, kept on disk for the next process): pays off over many images, not one; off by default",
    )
    g.add_argument("--lora", action="append", help="FILE[=SCALE] (default scale 1); repeat for several")
    g.add_argument("--lora-dir", help="where --lora looks for a bare file name (default: <cache>/loras)")
    g.add_argument("--out", required=True)
    _add_model_args(g)
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from core.engine import OutOfMemory
    from core.models import ModelUnavailableError

    try:
        res = cmd_plan(a) if a.cmd == "plan" else cmd_generate(a)
    except (ValueError, ModelUnavailableError, OutOfMemory) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
