"""Web UI: `python app.py` (the demo model when there is no CUDA GPU), see `python app.py --help`."""

from __future__ import annotations

import argparse
import logging
import sys


def parse_args(argv=None) -> argparse.Namespace:
    from core.configs import FLUX_DEV, UNION_PRO
    from core.job import TIERS

    ap = argparse.ArgumentParser(description="FLUX.1-dev + ControlNet-Union on any GPU: the Gradio app")
    ap.add_argument("--model", default=FLUX_DEV, metavar="ID|DIR", help="FLUX pipeline: Hub id or local folder")
    ap.add_argument(
        "--controlnet",
        metavar="ID|DIR",
        help=f"Union ControlNet: Hub id or local folder (default {UNION_PRO}; with --demo, the demo one)",
    )
    ap.add_argument(
        "--transformer",
        metavar="FILE",
        help="the transformer from one file (.safetensors bf16/fp8 or .gguf: Q8_0 ... Q4_K); the rest from --model",
    )
    ap.add_argument("--tier", default="auto", choices=TIERS, help="the VRAM tier selected in the UI")
    ap.add_argument(
        "--gpus",
        default="1",
        metavar="N|all",
        help="engines, one per GPU, running jobs side by side (default 1; with --demo, CPU replicas); "
        "with --ray, the most replicas",
    )
    ap.add_argument(
        "--ray", action="store_true", help="run the engines as Ray Serve replicas (pip install 'ray[serve]')"
    )
    ap.add_argument("--ray-address", help="a running Ray cluster (default: start one on this machine)")
    ap.add_argument("--min-replicas", type=int, help="with --ray: the fewest replicas (default: --gpus)")
    ap.add_argument(
        "--demo",
        action="store_true",
        help="the tiny random-weight demo model (images are noise); the default without a CUDA GPU",
    )
    ap.add_argument(
        "--lora-dir",
        metavar="DIR",
        help="the folder of LoRA .safetensors files the page lists (default: <cache>/loras)",
    )
    ap.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    ap.add_argument("--port", type=int, default=7860)
    ap.add_argument("--share", action="store_true", help="also open a public gradio.live link")
    return ap.parse_args(argv)


def build_engine(args):
    import torch

    from core.configs import UNION_PRO
    from core.engine import Engine
    from core.models import ModelSpec
    from core.plan.planner import JobShape
    from core.pool import build_pool

    if args.ray:  # the replicas hold the GPUs, maybe on other machines: this one only serves the page
        from core.remote import start

        spec = ModelSpec.demo_spec() if args.demo else ModelSpec(args.model, args.controlnet or UNION_PRO)
        if args.transformer:
            from dataclasses import replace

            spec = replace(spec, transformer=args.transformer)
        n = gpu_count(args.gpus, None if args.gpus != "all" else 0)
        return start(spec, n, args.min_replicas, args.ray_address, 0.0 if args.demo else 1.0)
    demo = args.demo or not torch.cuda.is_available()
    spec = ModelSpec.demo_spec() if demo else ModelSpec(args.model, args.controlnet or UNION_PRO)
    if demo and args.controlnet:  # a ControlNet trained on the demo model (python -m train --demo)
        spec = ModelSpec(spec.base, args.controlnet, demo=True)
    if args.transformer:
        from dataclasses import replace

        spec = replace(spec, transformer=args.transformer)
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else None  # None: CPU replicas
    n = gpu_count(args.gpus, gpus)
    engine = Engine(spec) if n == 1 else build_pool(spec, list(range(n)) if gpus else None, replicas=n)
    engine.load_for(args.tier, JobShape(1024, 1024))  # the page's default job: straight onto a GPU that keeps it all
    engine.load()  # (a no-op if it did)
    return engine


def gpu_count(asked: str, available: int | None) -> int:
    """Engines for `--gpus` ("all" or a count); `available` GPUs (None: CPU replicas of the demo model)."""
    if asked == "all":
        if available == 0:
            raise ValueError("--gpus all needs GPUs on this machine; give the number of replicas instead.")
        return max(1, available or 1)
    if not asked.isdigit() or int(asked) < 1:
        raise ValueError(f"--gpus must be a positive number or 'all', got {asked!r}.")
    if available is not None and int(asked) > available:
        raise ValueError(f"--gpus {asked}: this machine has {available} GPU(s).")
    return int(asked)


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from core.models import ModelUnavailableError

    try:
        engine = build_engine(args)
    except (ModelUnavailableError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if engine.demo:
        why = "--demo" if args.demo else "no CUDA GPU found"
        print(f"Demo model in use ({why}): tiny FLUX with random weights, the images are noise.", flush=True)
    from preprocessors.image_io import MAX_UPLOAD_BYTES
    from ui import create_demo

    demo = create_demo(engine, default_tier=args.tier, lora_dir=args.lora_dir)
    demo.launch(server_name=args.host, server_port=args.port, share=args.share, max_file_size=MAX_UPLOAD_BYTES)
    return 0


if __name__ == "__main__":
    sys.exit(main())
