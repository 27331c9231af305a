"""TrainConfig: a training run's request as a frozen dataclass, validated once, at construction.

The same rule as core.job.Job: a bad value raises ValueError with one sentence naming the argument
and what is allowed, before any model is loaded or anything is written.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from core.job import TIERS
from core.limits import check
from preprocessors.registry import CONTROLS, check_params

OPTIMIZERS = ("auto", "adamw", "adamw8bit", "adafactor")
PRECISIONS = ("auto", "bf16", "fp16")  # fp16 is listed only to be refused with a reason
MAX_STEPS = 1_000_000
MAX_LORA_RANK = 256


def _whole(name: str, value, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ValueError(f"{name} must be a whole number between {lo} and {hi}, got {value!r}.")
    return value


def _positive(name: str, value, hi: float) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        v = math.nan
    if isinstance(value, bool) or not math.isfinite(v) or not 0 < v <= hi:
        raise ValueError(f"{name} must be a number above 0 and at most {hi:g}, got {value!r}.")
    return v


@dataclass(frozen=True)
class TrainConfig:
    data: str  # folder of images with captions (.txt beside each image, or metadata.jsonl)
    control: str  # a name in preprocessors.registry.CONTROLS
    out: str  # output folder: checkpoints, validation images, log, the trained ControlNet
    model: str | None = None  # FLUX base: Hub id or folder (None: FLUX.1-dev, or the demo model)
    controlnet: str | None = None  # Union ControlNet to fine-tune (None: Union-Pro, or the demo one)
    new_controlnet: bool = False  # initialise a new ControlNet from the base transformer's blocks
    new_layers: int = 4  # double blocks of a new ControlNet
    new_single_layers: int = 0  # single blocks of a new ControlNet
    lora_rank: int = 0  # 0: train all weights; r > 0: a LoRA of rank r (peft)
    steps: int = 1000
    batch_size: int = 1
    lr: float | None = None  # None: 1e-5 for all weights, 1e-4 for a LoRA
    resolution: int = 512  # the square bucket's side; other buckets keep about the same pixel count
    tier: str = "auto"
    resume: bool = False
    demo: bool = False
    seed: int = 0
    optimizer: str = "auto"
    mixed_precision: str = "auto"  # bf16 on the GPU (fp32 without bf16); the CPU: core's CPU dtype
    gradient_checkpointing: bool = True
    guidance: float = 3.5  # FLUX.1-dev's guidance embedding during training
    max_grad_norm: float = 1.0
    checkpoint_every: int = 500
    validate_every: int = 0  # 0: validate at the end only when validation_images > 0
    validation_images: int = 2
    validation_steps: int = 20
    control_params: tuple = field(default=())  # preprocessor keyword arguments as (key, value) pairs
    log_every: int = 10

    def __post_init__(self):
        data = Path(str(self.data)).expanduser()
        if not data.is_dir():
            raise ValueError(f"data must be a folder of images with captions, got '{self.data}'.")
        if self.control not in CONTROLS:
            raise ValueError(f"Unknown control '{self.control}'; choose one of: {', '.join(CONTROLS)}.")
        try:
            keys = [k for k, _ in self.control_params]
        except (TypeError, ValueError):
            raise ValueError("control_params must be (name, value) pairs.") from None
        check_params(self.control, keys)
        if not str(self.out).strip():
            raise ValueError("out must name an output folder.")
        if Path(self.out).expanduser().exists() and not Path(self.out).expanduser().is_dir():
            raise ValueError(f"out must be a folder, but '{self.out}' is a file.")
        if self.new_controlnet and self.controlnet:
            raise ValueError("Give either --controlnet (fine-tune it) or --new-controlnet (start a new one), not both.")
        _whole("lora_rank", self.lora_rank, 0, MAX_LORA_RANK)
        if self.lora_rank and self.new_controlnet:
            raise ValueError("A LoRA adapts a trained ControlNet; drop --lora-rank to train a new ControlNet.")
        _whole("new_layers", self.new_layers, 1, 19)
        _whole("new_single_layers", self.new_single_layers, 0, 38)
        _whole("steps", self.steps, 1, MAX_STEPS)
        _whole("batch_size", self.batch_size, 1, 64)
        if self.lr is not None:
            object.__setattr__(self, "lr", _positive("lr", self.lr, 1.0))
        check("width", self.resolution, "resolution")
        if str(self.tier).lower() not in TIERS:
            raise ValueError(f"tier must be one of {', '.join(TIERS)}, got {self.tier!r}.")
        object.__setattr__(self, "tier", str(self.tier).lower())
        check("seed", self.seed)
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}.")
        if self.mixed_precision == "fp16":
            raise ValueError(
                "fp16 mixed precision is refused: FLUX's activations overflow fp16 (NaN losses); use bf16 "
                "(a GPU without bf16 trains in fp32 by itself)."
            )
        if self.mixed_precision not in PRECISIONS:
            raise ValueError(f"mixed_precision must be auto or bf16, got {self.mixed_precision!r}.")
        object.__setattr__(self, "guidance", check("guidance", self.guidance))
        object.__setattr__(self, "max_grad_norm", _positive("max_grad_norm", self.max_grad_norm, 1e6))
        for name in ("checkpoint_every", "validate_every", "log_every"):
            _whole(name, getattr(self, name), 0, MAX_STEPS)
        _whole("validation_images", self.validation_images, 0, 16)
        check("steps", self.validation_steps, "validation_steps")
        for name in ("new_controlnet", "resume", "demo", "gradient_checkpointing"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}.")

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else (1e-4 if self.lora_rank else 1e-5)

    @property
    def union_mode(self) -> int:
        return CONTROLS[self.control].mode_id

    def describe(self) -> dict:
        d = asdict(self)
        d["control_params"] = dict(self.control_params)
        d["learning_rate"] = self.learning_rate
        return d
