"""Between UI values and core: build a Job, turn a Result into outputs, settings ↔ PNG metadata.

Plain functions on plain values (no Gradio objects, no running server), so tests call them directly.
Bad values raise ValueError with the core's own sentence; the UI shows it as gr.Error.
"""

from __future__ import annotations

import functools
import math
import random
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from core.job import TIERS, ControlSpec, Job
from core.limits import SEED_MAX
from core.pngmeta import read_params, save_png
from preprocessors import load_image
from preprocessors.image_io import fit_size
from preprocessors.registry import CONTROLS

ROWS = 3  # control rows in the UI
NONE = "none"
UPSCALES = ("1", "1.5", "2", "3", "4")  # strings: exact choices for API clients
RANDOM_SEED_MAX = 2**32 - 1  # randomized seeds stay exact in JavaScript numbers
PREVIEW_SIDE = 384
DEFAULT_ROWS = (("canny", 0.8), (NONE, 0.8), (NONE, 0.8))
TIER_LABELS = {"cpu": "CPU (slow)", **{t: f"{t} GB" for t in TIERS if t.isdigit()}}


# -- choices and defaults -------------------------------------------------------------------------
def control_choices() -> list[tuple[str, str]]:
    return [("None", NONE)] + [(k.label, name) for name, k in CONTROLS.items()]


def default_scale(kind: str) -> float:
    return CONTROLS[kind].default_scale if kind in CONTROLS else 0.7


def default_end(kind: str) -> float:
    return CONTROLS[kind].default_end if kind in CONTROLS else 0.8


def auto_label(device) -> str:
    """'Auto — NVIDIA RTX 4090, 22.1 GB free' or 'Auto — no GPU: CPU'."""
    if device.kind != "cuda":
        return "Auto — no GPU: CPU"
    return f"Auto — {device.name}, {device.free_gb:.1f} GB free"


def tier_choices(device) -> list[tuple[str, str]]:
    return [(auto_label(device), "auto")] + [(TIER_LABELS[t], t) for t in TIERS if t != "auto"]


def upscale_choices() -> list[tuple[str, str]]:
    return [(f"{u}×", u) for u in UPSCALES]


@dataclass(frozen=True)
class Defaults:
    steps: int = 28
    guidance: float = 3.5
    max_side: int = 1024


def defaults_for(engine) -> Defaults:
    """The demo model is noise anyway: small and quick by default."""
    return Defaults(steps=4, max_side=512) if engine.demo else Defaults()


# -- UI values → Job ------------------------------------------------------------------------------
def _whole(name: str, value, lo: int, hi: int) -> int:
    """Sliders and JSON may send 28.0 for 28; anything else gets a sentence."""
    if isinstance(value, bool) or value is None:
        raise ValueError(f"{name} must be a whole number between {lo} and {hi}, got {value!r}.")
    if isinstance(value, float):
        if not math.isfinite(value) or not value.is_integer():
            raise ValueError(f"{name} must be a whole number between {lo} and {hi}, got {value!r}.")
        value = int(value)
    if not isinstance(value, int) or not lo <= value <= hi:
        raise ValueError(f"{name} must be a whole number between {lo} and {hi}, got {value!r}.")
    return value


def controls_from_rows(rows, canny: tuple | None = None) -> tuple[ControlSpec, ...]:
    """rows: (type, scale, end) per UI row; 'none' rows are skipped.
    canny: (low, high) thresholds for every canny row, or None for the automatic ones."""
    out = []
    for kind, scale, end in rows:
        if kind in (None, "", NONE):
            continue
        params = ()
        if kind == "canny" and canny is not None:
            low, high = canny
            params = (
                ("low", _whole("canny low threshold", low, 0, 255)),
                ("high", _whole("canny high threshold", high, 0, 255)),
            )
            if params[0][1] >= params[1][1]:
                raise ValueError(f"canny low threshold ({params[0][1]}) must be below the high one ({params[1][1]}).")
        out.append(ControlSpec(kind, scale=scale, start=0.0, end=end, params=params))
    return tuple(out)


def open_input(image) -> Image.Image:
    if image is None:
        raise ValueError("Upload an image first: the controls are computed from it.")
    return load_image(image)


@functools.lru_cache(maxsize=16)
def input_size(path: str) -> tuple[int, int]:
    """(width, height) of an upload as open_input sees it (after EXIF rotation), decoded once per
    path: the size line is refreshed on every slider release. Errors are not cached."""
    return open_input(path).size


def build_job(
    image,
    prompt,
    rows,
    tier="auto",
    upscale=1.0,
    seed=0,
    randomize=False,
    steps=28,
    guidance=3.5,
    max_side=1024,
    canny=None,
    rng: random.Random | None = None,
    fp8_compute=False,
) -> Job:
    """A validated Job from the UI's values (image: path, PIL or array). The seed is drawn here when
    `randomize` is set, so the Job (and the PNG) hold the seed that was used."""
    img = open_input(image)
    controls = controls_from_rows(rows, canny)
    side = _whole("max side", max_side, 64, 2048)
    width, height = fit_size(img.width, img.height, max_side=side)
    if randomize:
        seed = (rng or random).randint(0, RANDOM_SEED_MAX)
    seed = _whole("seed", seed, 0, SEED_MAX)
    return Job(
        prompt=prompt if isinstance(prompt, str) else "",
        image=img,
        controls=controls,
        width=width,
        height=height,
        steps=_whole("steps", steps, 1, 100),
        guidance=guidance,
        seed=seed,
        upscale=upscale,
        tier=tier or "auto",
        fp8_compute=bool(fp8_compute) if fp8_compute in (None, False, True) else fp8_compute,
    )


def preview_control(image, kind, canny=None, demo: bool = False, side: int = PREVIEW_SIDE):
    """The control image for one row, on a small copy of the input (None without image or type)."""
    if image is None or kind in (None, "", NONE):
        return None
    from core.denoise.generate import control_params
    from preprocessors.registry import preprocess

    img = open_input(image)
    img.thumbnail((side, side), Image.LANCZOS)
    spec = controls_from_rows([(kind, None, 0.8)], canny)[0]
    # previews stay off the GPU (depth on the CPU): a job may be using all of its budget
    return preprocess(kind, img, **control_params(spec, demo, "cpu"))


# -- Result → outputs ------------------------------------------------------------------------------
def save_result(result, folder: Path, keep: int = 32) -> Path:
    """The PNG with every parameter, in `folder` (older files beyond `keep` are removed: Gradio has
    copied them into its own cache by then)."""
    folder.mkdir(parents=True, exist_ok=True)
    name = f"flux-{result.job.seed}-{time.strftime('%Y%m%d-%H%M%S')}-{time.monotonic_ns() % 10**6:06d}.png"
    path = save_png(result.image, folder / name, result.png_params())
    old = sorted(folder.glob("flux-*.png"), key=lambda p: p.stat().st_mtime)[:-keep]
    for p in old:
        p.unlink(missing_ok=True)
    return path


def summary_of(result, started: float, finished: float, path: Path | None = None) -> dict:
    s = result.summary()
    s.update(
        seed=result.job.seed,
        job=result.job.describe(),
        started_at=round(started, 3),
        finished_at=round(finished, 3),
        phases=result.report.get("phases", []),
        timeline=[list(t) for t in result.report.get("timeline", [])],
        peak_alloc_gb=result.report.get("peak_alloc_gb"),
        memory=result.report.get("device"),
    )
    if path is not None:
        s["file"] = Path(path).name
    return s


def slider_pair(job: Job, result: Image.Image, cap: int = 2048) -> tuple[Image.Image, Image.Image]:
    """(input as the model saw it, result), both at the result's size capped to `cap` on the long
    side: the slider is for looking, the PNG download keeps every pixel."""
    w, h = result.size
    k = min(1.0, cap / max(w, h))
    size = (max(1, round(w * k)), max(1, round(h * k)))
    before = job.image.resize((job.width, job.height), Image.LANCZOS).resize(size, Image.LANCZOS)
    after = result if size == result.size else result.resize(size, Image.LANCZOS)
    return before, after


def _gb(x) -> str:
    return "—" if x is None else f"{x:.2f} GB"


def plan_markdown(summary: dict) -> str:
    """The plan/memory panel: what was planned, what was measured, what happened."""
    p = summary["plan"]
    pl = p["placement"]
    cpu = p["device"] == "cpu"
    seconds = summary.get("seconds", {})
    steps = summary.get("job", {}).get("steps") or 1
    step_s = seconds.get("denoise", 0.0) / steps
    rows = [
        ("Tier", f"{p['tier']} on {p['device'].upper()}" + (" (demo model)" if summary.get("demo") else "")),
        ("Compute dtype", p["dtype"]),
        (
            "Denoiser units",
            f"{pl['B']} resident, {pl['F']} resident fp8, {pl['S']} streamed, "
            f"{pl['Q']} streamed fp8" + (f"; copy ring of {p['ring']} units" if p.get("ring") else ""),
        ),
        ("Text encoders", p["text_encoders"]),
        ("VAE tiling", "on" if p["vae_tiling"] else "off"),
        ("Generation tile", f"{p['tile']} px (overlap {p['overlap']})" if p["tile"] else "whole image"),
        (
            "Peak memory",
            f"predicted {_gb(p['predicted_peak_gb'])}, measured "
            f"{_gb(summary.get('measured_peak_reserved_gb'))}" + (" (process RAM on the CPU)" if cpu else " reserved"),
        ),
        ("Seconds per step", f"predicted {p['predicted_step_s']:.2f}, measured {step_s:.2f}"),
        ("Pinned host RAM", _gb(p["host_ram_gb"])),
        ("Speed-ups", _fast_label(summary.get("fast"))),
        ("Seconds per phase", ", ".join(f"{k} {v:.1f}" for k, v in seconds.items()) or "—"),
        ("Size", "×".join(map(str, summary.get("size", []))) + f", seed {summary.get('seed')}"),
    ]
    md = "| Plan | |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in rows)
    lines = [f"- {n}" for n in p.get("notes", [])] + [f"- {e}" for e in summary.get("events", [])]
    if lines:
        md += "\n\n**Notes and events**\n" + "\n".join(lines)
    return md


def _fast_label(fast: dict | None) -> str:
    """'fused QKV, compiled blocks, cuDNN attention' for all-resident GPU plans, else '—'."""
    if not fast:
        return "—"
    from core.speed.fast import Fast

    known = {k: v for k, v in fast.items() if k in Fast.__dataclass_fields__}
    return Fast(**known).label()


def gallery_add(gallery: list | None, path, caption: str, limit: int = 24) -> list:
    """This session's results, newest first (kept in a gr.State, never global)."""
    items = [(str(path), caption)] + [g for g in (gallery or []) if Path(g[0]).is_file()]
    return items[:limit]


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


def settings_from_png(source) -> Settings:
    """The settings saved in a PNG's metadata, for the UI's fields (ValueError if there are none)."""
    try:
        params = read_params(source)
    except Exception:  # noqa: BLE001 - not an image, broken metadata: the same answer for the user
        params = None
    if not params or not isinstance(params.get("job"), dict):
        raise ValueError("This PNG holds no settings from this app (its metadata has no job).")
    job = params["job"]
    controls = list(job.get("controls") or [])
    rows, canny = [], None
    for c in controls[:ROWS]:
        rows.append((c["kind"], float(c["scale"]), float(c["end"])))
        p = c.get("params") or {}
        if c["kind"] == "canny" and "low" in p and "high" in p:
            canny = (int(p["low"]), int(p["high"]))
    dropped = [c["kind"] for c in controls[ROWS:]]
    rows += [(NONE, 0.7, 0.8)] * (ROWS - len(rows))
    up = float(job.get("upscale", 1.0))
    upscale = min(UPSCALES, key=lambda u: abs(float(u) - up))
    return Settings(
        prompt=job.get("prompt", ""),
        rows=rows,
        tier=str(job.get("tier", "auto")),
        upscale=upscale,
        seed=int(job.get("seed", 0)),
        steps=int(job.get("steps", 28)),
        guidance=float(job.get("guidance", 3.5)),
        max_side=max(int(job.get("width", 1024)), int(job.get("height", 1024))),
        canny=canny,
        dropped=dropped,
        fp8_compute=job.get("fp8_compute") is True,
    )


# -- cancelling -------------------------------------------------------------------------------------
class CancelFlags:
    """One threading.Event per browser session, polled by engine.run(cancel=...)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._flags: dict[str, threading.Event] = {}

    def start(self, key: str | None) -> threading.Event:
        ev = threading.Event()
        with self._lock:
            self._flags[key or ""] = ev
        return ev

    def finish(self, key: str | None, ev: threading.Event) -> None:
        with self._lock:
            if self._flags.get(key or "") is ev:
                del self._flags[key or ""]

    def cancel(self, key: str | None) -> bool:
        with self._lock:
            ev = self._flags.get(key or "")
        if ev is not None:
            ev.set()
        return ev is not None
