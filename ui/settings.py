"""PNG metadata → the UI's fields: this app's JSON, or the A1111/Forge `parameters` text."""

from __future__ import annotations

from dataclasses import dataclass, field

from core.job import TIERS
from core.limits import LIMITS, PRECISIONS, SEED_MAX, clamp
from core.pngmeta import read_a1111, read_params
from preprocessors.registry import CONTROLS

from .loras import from_settings

ROWS = 3  # control rows in the UI
NONE = "none"
UPSCALES = ("1", "1.5", "2", "3", "4")  # strings: exact choices for API clients


def default_scale(kind: str) -> float:
    return CONTROLS[kind].default_scale if kind in CONTROLS else 0.7


def default_end(kind: str) -> float:
    return CONTROLS[kind].default_end if kind in CONTROLS else 0.8


# -- PNG metadata → settings ------------------------------------------------------------------------
@dataclass
class Settings:
    prompt: str
    rows: list[tuple[str, float, float]]
    tier: str
    upscale: str
    seed: int
    steps: int
    guidance: float
    max_side: int
    canny: tuple[int, int] | None = None
    dropped: list[str] = field(default_factory=list)
    fp8_compute: bool = False
    precision: str = "auto"
    loras: list = field(default_factory=list)  # the LoRA rows' values: name, scale, name, scale, ...
    lora_missing: list[str] = field(default_factory=list)  # LoRAs of the PNG the folder does not have
    source: str = "this app"  # or "A1111/Forge": where the settings came from


def _seed(value) -> int:
    """Seeds stay exact (up to 2**63 - 1: float clamping would round them)."""
    return value if isinstance(value, int) and 0 <= value <= SEED_MAX else int(clamp("seed", value))


def settings_from_png(source, lora_dir=None) -> Settings:
    """The settings in a PNG's metadata, for the UI's fields: this app's JSON, else an A1111/Forge
    `parameters` text (ValueError, one sentence, if neither is there). Numbers are clamped to
    core.limits; controls the UI does not know are listed in `dropped`."""
    try:
        params = read_params(source)
        job = params.get("job") if isinstance(params, dict) else None
        source_name = "this app"
        if not isinstance(job, dict):
            job, source_name = read_a1111(source), "A1111/Forge"
    except Exception:  # noqa: BLE001 - not an image, broken metadata: the same answer for the user
        job = None
    if not isinstance(job, dict):
        raise ValueError(
            "This PNG holds no generation settings (neither this app's nor A1111/Forge 'parameters'); "
            "nothing was changed."
        )
    rows, canny, dropped = [], None, []
    for c in job.get("controls") or []:
        kind = c.get("kind")
        if kind not in CONTROLS or len(rows) == ROWS:
            dropped.append(str(kind))
            continue
        rows.append(
            (
                kind,
                clamp("scale", c.get("scale", default_scale(kind))),
                clamp("control_end", c.get("end", default_end(kind))),
            )
        )
        p = c.get("params") or {}
        if kind == "canny" and "low" in p and "high" in p:
            canny = (min(max(int(p["low"]), 0), 254), min(max(int(p["high"]), 1), 255))
    rows += [(NONE, 0.7, 0.8)] * (ROWS - len(rows))
    up = clamp("upscale", job.get("upscale", 1.0))
    upscale = min(UPSCALES, key=lambda u: abs(float(u) - up))
    tier = str(job.get("tier", "auto"))
    lora_values, lora_missing = from_settings(job.get("loras"), lora_dir)
    return Settings(
        prompt=str(job.get("prompt", "")),
        rows=rows,
        tier=tier if tier in TIERS else "auto",
        upscale=upscale,
        seed=_seed(job.get("seed", 0)),
        steps=int(clamp("steps", job.get("steps", LIMITS["steps"].default))),
        guidance=clamp("guidance", job.get("guidance", LIMITS["guidance"].default)),
        max_side=int(clamp("width", max(job.get("width", 1024), job.get("height", 1024)))),
        canny=canny,
        dropped=dropped,
        fp8_compute=job.get("fp8_compute") is True,
        precision=job.get("precision") if job.get("precision") in PRECISIONS else "auto",
        loras=lora_values,
        lora_missing=lora_missing,
        source=source_name,
    )
