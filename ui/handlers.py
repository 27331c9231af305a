"""Between UI values and core: build a Job, turn a Result into outputs, settings ↔ PNG metadata.

Plain functions on plain values (no Gradio objects, no running server), so tests call them directly.
Bad values raise ValueError with the core's own sentence; the UI shows it next to its field (field_of).
"""

from __future__ import annotations

import functools
import math
import random
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from core.job import TIERS, ControlSpec, Job, out_size
from core.limits import SEED_MAX
from core.pngmeta import save_png
from core.tiers import runnable_tiers
from preprocessors import load_image
from preprocessors.image_io import fit_size
from preprocessors.registry import CONTROLS

from .feedback import (  # noqa: F401 - re-exported: the UI reads its helpers from one module
    ERROR_FIELDS,
    FIELD_LABELS,
    field_of,
    gallery_items,
    history_add,
    history_entry,
    prompt_note,
    seed_error,
)
from .plan_view import plan_markdown  # noqa: F401 - re-exported
from .settings import (  # noqa: F401 - re-exported
    NONE,
    ROWS,
    UPSCALES,
    Settings,
    default_end,
    default_scale,
    settings_from_png,
)

RANDOM_SEED_MAX = 2**32 - 1  # randomized seeds stay exact in JavaScript numbers
PREVIEW_SIDE = 384
DEFAULT_ROWS = (("canny", 0.8), (NONE, 0.8), (NONE, 0.8))
TIER_LABELS = {"cpu": "CPU (slow)", **{t: f"{t} GB" for t in TIERS if t.isdigit()}}


# -- choices and defaults -------------------------------------------------------------------------
def control_choices() -> list[tuple[str, str]]:
    return [("None", NONE)] + [(k.label, name) for name, k in CONTROLS.items()]


def auto_label(device) -> str:
    """'Auto — NVIDIA RTX 4090, 22.1 GB free' or 'Auto (CPU)' (short: a phone shows ~20 characters)."""
    if device.kind != "cuda":
        return "Auto (CPU)"
    return f"Auto — {device.name}, {device.free_gb:.1f} GB free"


def tier_choices(device, sizes=None) -> list[tuple[str, str]]:
    """The tiers this machine can run (core.tiers); tier_info says why the others are absent."""
    ok = runnable_tiers(device, sizes)
    return [(auto_label(device), "auto")] + [(TIER_LABELS[t], t) for t in TIERS if t != "auto" and ok[t] is None]


def _span(tiers: list[str]) -> str:
    return tiers[0] if len(tiers) == 1 else f"{tiers[0]}–{tiers[-1]}"


def tier_info(device, sizes=None) -> str:
    """The tier's help text: what a tier is, what Auto picks here, and which tiers are left out."""
    auto = (
        f"Auto plans for the free memory of {device.name} ({device.free_gb:.1f} GB)"
        if device.kind == "cuda"
        else "Auto runs on the CPU: no CUDA GPU was found"
    )
    text = f"The GPU memory the job may use; smaller tiers stream weights and run slower. {auto}."
    missing: dict[str, list[str]] = {}
    for t, why in runnable_tiers(device, sizes).items():
        if why:
            missing.setdefault(why, []).append(t)
    for why, ts in missing.items():
        text += f" Not offered: {_span(ts)} GB ({why})."
    return text


def upscale_choices() -> list[tuple[str, str]]:
    return [(f"{u}×", u) for u in UPSCALES]


AUTO_COMPILE = {  # what Auto does under the engine's policy (core.speed.compile_policy)
    "later": "Auto (compile from the second job)",
    "on": "Auto (compile from the first job)",
    "off": "Auto (never compile here)",
}


def compile_choices(policy: str) -> list[tuple[str, str]]:
    """The compile control's choices: Auto names what the engine's policy does."""
    return [(AUTO_COMPILE.get(policy, "Auto"), "auto"), ("Always", "always"), ("Never", "never")]


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
    precision="auto",
    loras=(),
    compile="auto",
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
        precision=precision or "auto",  # an API call leaving it out
        loras=tuple(loras),
        compile=compile or "auto",  # an API call leaving it out
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
def model_name(spec) -> str:
    """What the PNG's `Model:` says: the Hub id or folder name of the FLUX pipeline."""
    if spec is None or spec.demo:
        return "FLUX demo (random weights)"
    name = Path(spec.base).name if Path(spec.base).expanduser().is_dir() else spec.base
    return f"{name}, transformer {Path(spec.transformer).name}" if spec.transformer else name


def save_result(result, folder: Path, keep: int = 32, model: str | None = None) -> Path:
    """The PNG with every parameter, in `folder` (older files beyond `keep` are removed: Gradio has
    copied them into its own cache by then)."""
    folder.mkdir(parents=True, exist_ok=True)
    name = f"flux-{result.job.seed}-{time.strftime('%Y%m%d-%H%M%S')}-{time.monotonic_ns() % 10**6:06d}.png"
    params = result.png_params()
    if model:
        params["model"] = model
    path = save_png(result.image, folder / name, params)
    for pattern in ("flux-*.png", "before-*.jpg"):
        old = sorted(folder.glob(pattern), key=lambda p: p.stat().st_mtime)[:-keep]
        for p in old:
            p.unlink(missing_ok=True)
    return path


def save_before(job: Job, result_path: Path, cap: int = 2048) -> Path:
    """The input as the model saw it, at the result's size (capped), beside the result's PNG: the
    slider's left image, kept for the history."""
    with Image.open(result_path) as im:
        size = im.size
    before, _ = slider_pair(job, Image.new("RGB", size), cap)
    path = Path(result_path).with_name("before-" + Path(result_path).stem + ".jpg")
    before.convert("RGB").save(path, quality=90)
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


def enlarge(preview: Image.Image | None, width: int, height: int, cap: int = 512) -> Image.Image | None:
    """A latent preview (1/8 size) brought up to the job's size, capped: smooth rather than blocky."""
    if preview is None:
        return None
    k = min(1.0, cap / max(width, height))
    return preview.resize((max(1, round(width * k)), max(1, round(height * k))), Image.BILINEAR)


def idle_status(demo: bool) -> str:
    from .progress import status_html

    note = " The demo model's images are noise." if demo else ""
    return status_html("idle", f"Ready: upload a photo, write a prompt, press Run (Ctrl+Enter).{note}")


def size_line(image, max_side, upscale) -> str:
    """'Input 512×512 → generated at 512×512 → output 1024×1024' (ValueError for a bad upload)."""
    iw, ih = input_size(image)
    w, h = fit_size(iw, ih, max_side=int(max_side))
    ow, oh = out_size(w, h, float(upscale))
    return f"Input {iw}×{ih} → generated at **{w}×{h}** → output **{ow}×{oh}**"


def seed_of(entry: dict) -> int:
    from core.pngmeta import read_params

    return int(read_params(entry["png"])["job"]["seed"])


def done_line(summary: dict) -> str:
    w, h = summary["size"]
    secs = summary.get("finished_at", 0) - summary.get("started_at", 0)
    note = " Demo model: the image is noise." if summary.get("demo") else ""
    return f"Done in {secs:.1f} s: {w}×{h}, seed {summary['seed']}.{note}"


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

    def current(self, key: str | None) -> threading.Event | None:
        with self._lock:
            return self._flags.get(key or "")

    def cancel(self, key: str | None) -> bool:
        with self._lock:
            ev = self._flags.get(key or "")
        if ev is not None:
            ev.set()
        return ev is not None
