"""Command line: `python -m train --data DIR --control KIND --out DIR ...` (see README.md).

Thin: parses, builds a TrainConfig, runs, prints one JSON summary on stdout; progress goes to
stderr. Bad input → one sentence on stderr and exit code 2; a run stopped by a guard (NaN loss,
weights that do not change) → one sentence and exit code 3.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from core.job import TIERS
from preprocessors.registry import CONTROLS

from .config import OPTIMIZERS, PRECISIONS


def _param(text: str) -> tuple[str, object]:
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"a control parameter must be NAME=VALUE, got {text!r}")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return key.strip(), value


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m train", description=__doc__)
    ap.add_argument(
        "--data", required=True, help="folder of images with captions (.txt beside each, or metadata.jsonl)"
    )
    ap.add_argument("--control", required=True, choices=list(CONTROLS), help="the control the ControlNet learns")
    ap.add_argument("--control-param", action="append", type=_param, default=[], help="preprocessor NAME=VALUE")
    ap.add_argument("--out", required=True, help="output folder (checkpoints, validation, log, controlnet/)")
    ap.add_argument("--model", help="FLUX base: Hub id or local folder (default FLUX.1-dev)")
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--controlnet", help="Union ControlNet to fine-tune: Hub id or folder (default Union-Pro)")
    g.add_argument("--new-controlnet", action="store_true", help="a new ControlNet from the base transformer's blocks")
    ap.add_argument("--new-layers", type=int, default=4, help="double blocks of a new ControlNet")
    ap.add_argument("--new-single-layers", type=int, default=0, help="single blocks of a new ControlNet")
    ap.add_argument("--lora-rank", type=int, default=0, help="train a LoRA of this rank (0: all weights)")
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--lr", type=float, help="learning rate (default 1e-5, LoRA 1e-4)")
    ap.add_argument("--resolution", type=int, default=512, help="side of the square bucket (multiple of 16)")
    ap.add_argument("--tier", default="auto", choices=TIERS)
    ap.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --out")
    ap.add_argument("--demo", action="store_true", help="the tiny random-weight demo model")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--optimizer", default="auto", choices=OPTIMIZERS)
    ap.add_argument("--mixed-precision", default="auto", choices=PRECISIONS)
    ap.add_argument("--no-gradient-checkpointing", action="store_true")
    ap.add_argument("--guidance", type=float, default=3.5)
    ap.add_argument("--checkpoint-every", type=int, default=500)
    ap.add_argument("--validate-every", type=int, default=0, help="0: validate at the end only")
    ap.add_argument("--validation-images", type=int, default=2)
    ap.add_argument("--validation-steps", type=int, default=20)
    ap.add_argument("--log-every", type=int, default=10)
    return ap


def config_from(a):
    from .config import TrainConfig

    return TrainConfig(
        data=a.data,
        control=a.control,
        out=a.out,
        model=a.model,
        controlnet=a.controlnet,
        new_controlnet=a.new_controlnet,
        new_layers=a.new_layers,
        new_single_layers=a.new_single_layers,
        lora_rank=a.lora_rank,
        steps=a.steps,
        batch_size=a.batch_size,
        lr=a.lr,
        resolution=a.resolution,
        tier=a.tier,
        resume=a.resume,
        demo=a.demo,
        seed=a.seed,
        optimizer=a.optimizer,
        mixed_precision=a.mixed_precision,
        gradient_checkpointing=not a.no_gradient_checkpointing,
        guidance=a.guidance,
        checkpoint_every=a.checkpoint_every,
        validate_every=a.validate_every,
        validation_images=a.validation_images,
        validation_steps=a.validation_steps,
        control_params=tuple(a.control_param),
        log_every=a.log_every,
    )


def main(argv=None) -> int:
    a = parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    import torch

    from core.models import ModelUnavailableError

    from .precision import TrainingStopped

    try:
        from .run import run

        summary = run(config_from(a))
    except (ValueError, ModelUnavailableError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except TrainingStopped as e:
        print(f"stopped: {e}", file=sys.stderr)
        return 3
    except torch.OutOfMemoryError as e:  # the training plan's prediction was too low for this job
        first = str(e).strip().split("\n")[0].split(". GPU")[0]
        print(
            f"error: the GPU ran out of memory while training at the {a.tier} tier and {a.resolution} px ({first}); "
            "choose a larger tier, a smaller --resolution or a LoRA (--lora-rank).",
            file=sys.stderr,
        )
        return 4
    if summary is not None:
        from accelerate import PartialState

        if PartialState().is_main_process:
            print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
