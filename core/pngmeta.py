"""PNG metadata: every parameter and the plan travel inside the image, and can be read back.

Two keys: ours (`flux-anyvram`, JSON, everything) and `parameters`, the A1111 text that Forge's and
A1111's "PNG Info" read: the prompt, then one line `Steps: 28, Sampler: Euler, ..., Seed: 5, Size:
1024x768, Model: ...` with the controls as `ControlNet 0: "Module: canny, Weight: 0.7, ..."`. FLUX.1-dev
has no classifier-free guidance: its guidance is what Forge calls "Distilled CFG Scale" (CFG scale 1).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from PIL import Image, PngImagePlugin

KEY = "flux-anyvram"
SAMPLER = "Euler"  # diffusers' FlowMatchEulerDiscreteScheduler
# A1111's own pattern for "key: value" pairs (a value may be a quoted string holding commas)
PAIR = re.compile(r'\s*([\w ][\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
# A1111 / sd-webui-controlnet module names → our control kinds (first match wins)
MODULES = (("canny", "canny"), ("depth", "depth"), ("tile", "tile"), ("blur", "blur"), ("gray", "gray"))


def _num(x) -> str:
    return f"{x:g}" if isinstance(x, float) else str(x)


def a1111_text(params: dict) -> str:
    """The `parameters` text of a job (params as save_png gets them)."""
    job = params.get("job")
    if not isinstance(job, dict):
        return ""
    fields = [
        ("Steps", job.get("steps")),
        ("Sampler", SAMPLER),
        ("CFG scale", 1),
        ("Distilled CFG Scale", job.get("guidance")),
        ("Seed", job.get("seed")),
        ("Size", f"{job.get('width')}x{job.get('height')}"),
        ("Model", params.get("model") or ("FLUX demo (random weights)" if params.get("demo") else "FLUX.1-dev")),
    ]
    for k, c in enumerate(job.get("controls") or []):
        p = dict(c.get("params") or {})
        unit = [("Module", c["kind"]), ("Model", "ControlNet-Union"), ("Weight", c["scale"])]
        if "low" in p and "high" in p:
            unit += [("Threshold A", p.pop("low")), ("Threshold B", p.pop("high"))]
        unit += [("Guidance Start", c["start"]), ("Guidance End", c["end"])] + sorted(p.items())
        fields.append((f"ControlNet {k}", '"' + ", ".join(f"{a}: {_num(b)}" for a, b in unit) + '"'))
    if float(job.get("upscale") or 1) > 1:
        fields += [("Hires upscale", job["upscale"]), ("Denoising strength", job.get("upscale_strength"))]
        if job.get("upscale_steps"):
            fields.append(("Hires steps", job["upscale_steps"]))
    fields.append(("VRAM tier", job.get("tier")))
    line = ", ".join(f"{k}: {_num(v)}" for k, v in fields if v is not None)
    return f"{job.get('prompt', '')}\n{line}"


def _kind(module: str) -> str:
    m = module.strip().lower()
    return next((kind for key, kind in MODULES if key in m), m)


def parse_a1111(text: str) -> dict | None:
    """An A1111/Forge `parameters` text as a job dict like Job.describe() (only the keys it holds;
    `controls` kinds as our names where known, else the module's name), or None without a `Steps:`
    line (a bare prompt, or no settings at all)."""
    if not isinstance(text, str) or not text.strip():
        return None
    *lines, last = text.strip().split("\n")
    pairs = dict((k.strip(), v.strip()) for k, v in PAIR.findall(last))
    if "Steps" not in pairs:
        return None
    prompt = "\n".join(lines).split("\nNegative prompt:")[0]
    prompt = "" if prompt.startswith("Negative prompt:") else prompt
    job: dict = {"prompt": prompt.strip()}
    for key, name, cast in (
        ("Steps", "steps", int),
        ("Seed", "seed", int),
        ("Hires upscale", "upscale", float),
        ("Denoising strength", "upscale_strength", float),
        ("Hires steps", "upscale_steps", int),
        ("VRAM tier", "tier", str),
    ):
        if key in pairs:
            try:
                job[name] = cast(pairs[key])
            except ValueError:
                pass
    guidance = pairs.get("Distilled CFG Scale", pairs.get("CFG scale"))
    try:
        job["guidance"] = float(guidance)
    except (TypeError, ValueError):
        pass
    size = re.fullmatch(r"(\d+)\s*x\s*(\d+)", pairs.get("Size", ""))
    if size:
        job["width"], job["height"] = int(size[1]), int(size[2])
    controls = []
    for k in sorted((k for k in pairs if re.fullmatch(r"ControlNet \d+", k)), key=lambda k: int(k.split()[1])):
        unit = dict((a.strip(), b.strip()) for a, b in PAIR.findall(pairs[k].strip('"')))
        if unit.get("Module", "none").lower() == "none":
            continue
        c = dict(kind=_kind(unit["Module"]), params={})
        for key, name in (("Weight", "scale"), ("Guidance Start", "start"), ("Guidance End", "end")):
            try:
                c[name] = float(unit[key])
            except (KeyError, ValueError):
                pass
        if c["kind"] == "canny" and "Threshold A" in unit and "Threshold B" in unit:
            try:
                c["params"] = dict(low=int(float(unit["Threshold A"])), high=int(float(unit["Threshold B"])))
            except ValueError:
                pass
        controls.append(c)
    job["controls"] = controls
    return job


def save_png(image: Image.Image, path: str | Path, params: dict) -> Path:
    info = PngImagePlugin.PngInfo()
    info.add_text(KEY, json.dumps(params, sort_keys=True))
    info.add_text("parameters", a1111_text(params))  # PIL switches to UTF-8 iTXt for non-Latin-1 text
    path = Path(path)
    image.save(path, format="PNG", pnginfo=info)
    return path


def read_params(source) -> dict | None:
    """The parameters saved by save_png, or None for a PNG without them."""
    img = source if isinstance(source, Image.Image) else Image.open(source)
    text = getattr(img, "text", {}) or img.info
    raw = text.get(KEY)
    try:
        params = json.loads(raw) if raw else None
    except ValueError:  # written by something else, or damaged: no settings to read
        return None
    return params if isinstance(params, dict) else None


def read_a1111(source) -> dict | None:
    """The job dict from a PNG's `parameters` text (ours, A1111's or Forge's), or None."""
    img = source if isinstance(source, Image.Image) else Image.open(source)
    text = getattr(img, "text", {}) or img.info
    return parse_a1111(text.get("parameters", ""))
