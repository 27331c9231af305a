"""Job: the user's request as a frozen dataclass, validated once, at construction.

Every door (UI, CLI, Python, API) builds a Job; a bad value raises ValueError naming the argument
and the allowed values, before anything is loaded or written.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from PIL import Image

from core.limits import (
    COMPILES,
    MAX_CONTROLS,
    MAX_LORAS,
    MAX_PROMPT_CHARS,
    MAX_SIDE,
    MAX_UPSCALE,
    PRECISIONS,
    check,
)
from core.lora import LoraSpec
from preprocessors.registry import CONTROLS, check_params

__all__ = [
    "MAX_CONTROLS",
    "MAX_PROMPT_CHARS",
    "MAX_SIDE",
    "MAX_UPSCALE",
    "TIERS",
    "GPU_TIERS",
    "ControlSpec",
    "LoraSpec",
    "Job",
    "out_size",
]

GPU_TIERS = ("48", "24", "16", "12", "8", "6", "4")  # largest first: the step-down order
TIERS = ("auto", "cpu") + GPU_TIERS[::-1]


def out_size(width: int, height: int, factor: float) -> tuple[int, int]:
    """(width, height) scaled by `factor`, rounded to multiples of 16 (what FLUX's latents need)."""
    return int(round(width * factor / 16)) * 16, int(round(height * factor / 16)) * 16


@dataclass(frozen=True)
class ControlSpec:
    kind: str  # a name in preprocessors.registry.CONTROLS
    scale: float | None = None  # None: the control's default scale
    start: float = 0.0  # control_guidance_start, fraction of the steps
    end: float | None = None  # control_guidance_end; None: the control's default end
    params: tuple = ()  # preprocessor keyword arguments as (key, value) pairs

    def __post_init__(self):
        if self.kind not in CONTROLS:
            raise ValueError(f"Unknown control '{self.kind}'; choose one of: {', '.join(CONTROLS)}.")
        scale = CONTROLS[self.kind].default_scale if self.scale is None else self.scale
        object.__setattr__(self, "scale", check("scale", scale, f"scale of control '{self.kind}'"))
        object.__setattr__(self, "start", check("control_start", self.start, "control start"))
        end = CONTROLS[self.kind].default_end if self.end is None else self.end
        object.__setattr__(self, "end", check("control_end", end, "control end"))
        if self.start >= self.end:
            raise ValueError(f"control start ({self.start}) must be below control end ({self.end}).")
        try:
            keys = [k for k, _ in self.params]
        except (TypeError, ValueError):
            raise ValueError("params must be (name, value) pairs.") from None
        check_params(self.kind, keys)

    @property
    def mode_id(self) -> int:
        return CONTROLS[self.kind].mode_id


@dataclass(frozen=True)
class Job:
    prompt: str
    image: Image.Image = field(repr=False, compare=False)
    controls: tuple[ControlSpec, ...]
    width: int
    height: int
    steps: int = 28
    guidance: float = 3.5
    seed: int = 0
    upscale: float = 1.0
    tier: str = "auto"
    upscale_strength: float = 0.3  # img2img denoise of each upscale stage
    upscale_steps: int | None = None  # steps per upscale stage; None: max(4, min(10, steps // 3))
    fp8_compute: bool = False  # fp8 matmuls when the whole model is resident on an fp8 GPU (core/speed/fast.py)
    loras: tuple[LoraSpec, ...] = ()  # merged into the denoiser's weights, in this order (core/lora.py)
    precision: str = "auto"  # weight formats: auto | exact (bf16/fp8) | 4bit (core/plan/placement.py)
    # torch.compile where the whole model is resident: auto (the engine's policy) | always | never
    # (core/speed/compile_policy.py). How fast, not what is drawn: left out of describe() and the PNG.
    compile: str = "auto"

    def __post_init__(self):
        if not isinstance(self.prompt, str) or not self.prompt.strip():
            raise ValueError("prompt must be a non-empty text.")
        if len(self.prompt) > MAX_PROMPT_CHARS:
            raise ValueError(f"prompt is {len(self.prompt)} characters; the limit is {MAX_PROMPT_CHARS}.")
        if not isinstance(self.image, Image.Image):
            raise ValueError("image must be a PIL image (load it with preprocessors.load_image).")
        if not isinstance(self.controls, (tuple, list)) or not all(isinstance(c, ControlSpec) for c in self.controls):
            raise ValueError("controls must be a list of ControlSpec (e.g. ControlSpec('canny', 0.7)).")
        controls = tuple(self.controls)
        if not 1 <= len(controls) <= MAX_CONTROLS:
            raise ValueError(f"controls: give between 1 and {MAX_CONTROLS} controls, got {len(controls)}.")
        object.__setattr__(self, "controls", controls)
        for name in ("width", "height", "steps", "seed") + (
            ("upscale_steps",) if self.upscale_steps is not None else ()
        ):
            check(name, getattr(self, name))
        for name in ("guidance", "upscale", "upscale_strength"):
            object.__setattr__(self, name, check(name, getattr(self, name)))
        if str(self.tier).lower() not in TIERS:
            raise ValueError(f"tier must be one of {', '.join(TIERS)}, got {self.tier!r}.")
        object.__setattr__(self, "tier", str(self.tier).lower())
        if not isinstance(self.fp8_compute, bool):
            raise ValueError(f"fp8_compute must be true or false, got {self.fp8_compute!r}.")
        if not isinstance(self.loras, (tuple, list)) or not all(isinstance(s, LoraSpec) for s in self.loras):
            raise ValueError("loras must be a list of LoraSpec (e.g. LoraSpec('style.safetensors', 0.8)).")
        if len(self.loras) > MAX_LORAS:
            raise ValueError(f"loras: give at most {MAX_LORAS} LoRAs, got {len(self.loras)}.")
        if len({s.path for s in self.loras}) < len(self.loras):
            raise ValueError("loras: each LoRA file may be given once; set its scale instead.")
        object.__setattr__(self, "loras", tuple(self.loras))
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}.")
        if self.compile not in COMPILES:
            raise ValueError(f"compile must be one of {', '.join(COMPILES)}, got {self.compile!r}.")

    @property
    def out_size(self) -> tuple[int, int]:
        """Final (width, height) after upscaling, multiples of 16."""
        return out_size(self.width, self.height, self.upscale)

    def with_(self, **changes) -> Job:
        return replace(self, **changes)

    def describe(self) -> dict:
        """Everything but the image, JSON-ready (goes into PNG metadata)."""
        return dict(
            prompt=self.prompt,
            width=self.width,
            height=self.height,
            steps=self.steps,
            guidance=self.guidance,
            seed=self.seed,
            upscale=self.upscale,
            tier=self.tier,
            upscale_strength=self.upscale_strength,
            upscale_steps=self.upscale_steps,
            fp8_compute=self.fp8_compute,
            precision=self.precision,
            loras=[s.describe() for s in self.loras],
            controls=[
                dict(kind=c.kind, scale=c.scale, start=c.start, end=c.end, params=dict(c.params)) for c in self.controls
            ],
        )
