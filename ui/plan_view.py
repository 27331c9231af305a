"""The "Plan and memory" panel: a finished job's plan, memory and speed as a Markdown table."""

from __future__ import annotations


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
    demo = " (demo model)" if summary.get("demo") else ""
    tier = (
        "CPU"
        if cpu
        else ("Auto" if p["tier"] == "auto" else f"{p['tier']} GB")
        + (f" on the GPU ({p['budget_gb']:.1f} GiB)" if p.get("budget_gb") else " on the GPU")
    )
    if cpu:
        peak = f"measured {_gb(summary.get('measured_peak_reserved_gb'))} of process RAM (the CPU has no memory budget to predict)"
        step = f"measured {step_s:.2f} (the time model covers GPUs only)"
    else:
        peak = f"predicted {_gb(p['predicted_peak_gb'])}, measured {_gb(summary.get('measured_peak_reserved_gb'))} reserved"
        step = f"predicted {p['predicted_step_s']:.2f}, measured {step_s:.2f}"
    rows = [
        ("Tier", tier + demo),
        ("Compute dtype", p["dtype"]),
        (
            "Denoiser units",
            _units_label(pl) + (f"; copy ring of {p['ring']} units" if p.get("ring") else ""),
        ),
        ("Weights", _formats_label(p)),
        ("Text encoders", p["text_encoders"]),
        ("VAE tiling", "on" if p["vae_tiling"] else "off"),
        ("Generation tile", f"{p['tile']} px (overlap {p['overlap']})" if p["tile"] else "whole image"),
        ("Peak memory", peak),
        ("Seconds per step", step),
        ("Pinned host RAM", "—" if cpu else _gb(p["host_ram_gb"])),
        ("Speed-ups", _fast_label(summary.get("fast"))),
        ("Seconds per phase", ", ".join(f"{k} {v:.1f}" for k, v in seconds.items()) or "—"),
        ("Size", "×".join(map(str, summary.get("size", []))) + f", seed {summary.get('seed')}"),
    ]
    md = "| Plan | |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in rows)
    lines = [f"- {n}" for n in p.get("notes", [])] + [f"- {e}" for e in summary.get("events", [])]
    if lines:
        md += "\n\n**Notes and events**\n" + "\n".join(lines)
    return md


UNIT_LABELS = dict(
    B="resident", F="resident fp8", S="streamed", Q="streamed fp8", R="resident 4-bit", N="streamed 4-bit"
)


def _units_label(counts: dict) -> str:
    """'12 resident, 300 streamed 4-bit': the storage codes in use, in words."""
    return ", ".join(f"{counts[c]} {label}" for c, label in UNIT_LABELS.items() if counts.get(c)) or "none"


FORMAT_WORDS = {"exact": "bf16", "fp8": "fp8", "q4": "4-bit"}


def _words(formats: str) -> str:
    """A plan's format string ("exact+q4", or T5's "fp8 (streamed)") in words: "bf16 + 4-bit"."""
    fmts, _, where = formats.partition(" ")
    return " + ".join(FORMAT_WORDS.get(x, x) for x in fmts.split("+")) + (f" {where}" if where else "")


def _formats_label(p: dict) -> str:
    f = p.get("formats") or {}
    denoiser = _words(str(f.get("denoiser", "exact")))
    gguf = " (GGUF Q4_0)" if "q4" in str(f.get("denoiser", "")) else ""
    lossy = " (4-bit: lossy)" if p.get("precision") == "4bit" else ""
    return f"denoiser {denoiser}{gguf}; T5 {_words(str(f.get('t5', 'exact')))}{lossy}"


def _fast_label(fast: dict | None) -> str:
    """'fused QKV, compiled blocks, cuDNN attention' for all-resident GPU plans, else '—'."""
    if not fast:
        return "—"
    from core.speed.fast import Fast

    known = {k: v for k, v in fast.items() if k in Fast.__dataclass_fields__}
    return Fast(**known).label()


def plan_preview(engine, tier, precision, size: tuple[int, int], controls: int, upscale, steps, compile="auto") -> str:
    """One line under the tier, before any run: what the plan for these settings will use (formats,
    GPU peak, pinned host RAM against what this machine allows, seconds; while nothing is placed, the
    first image's seconds with the compile where it pays it), or the planner's sentence."""
    from core.plan import JobShape, plan_for
    from core.plan.search import host_cap_bytes

    sizes = engine.sizes
    if sizes is None:
        return ""
    prec = engine.state.precision(precision or "auto")
    try:
        shape = JobShape(size[0], size[1], max(int(controls), 1), float(upscale or 1), int(steps or 28))
        p = plan_for(tier or "auto", shape, sizes, engine.device, precision=prec, **engine.compile_args(compile))
    except ValueError as e:
        return f"⚠️ {e}"
    if p.device == "cpu":
        return "**Plan:** everything on the CPU (no GPU memory budget); expect minutes per image at full size."
    f = p.placement.formats()
    cap = host_cap_bytes(engine.device) / 2**30
    tile = f", {p.tile} px tiles" if p.tile else ""
    return (
        f"**Plan:** denoiser {_words(f['denoiser'])}, T5 {_words(f['t5'].partition(' ')[0])}"
        f"{tile} · GPU peak {p.predicted_peak_gb:.1f} of {p.budget_gb:.1f} GiB · pinned RAM "
        f"{p.host_ram_gb:.1f} of {cap:.1f} GiB allowed · ~{p.predicted_step_s:.2f} s/step, "
        f"~{p.predicted_job_s:.0f} s denoising{_first_image(p) if engine.state.placed is None else ''}"
    )


def _first_image(p) -> str:
    """' · first image ~34 s (weights read and placed ~20 s, compiling ~20 s)': what the first job adds."""
    parts = dict(p.first_job_parts)
    if not parts:
        return ""
    why = f"weights read and placed ~{parts['read'] + parts['place']:.0f} s"
    if parts["compile"]:
        why += f", compiling ~{parts['compile']:.0f} s"
    return f" · first image ~{p.predicted_first_job_s:.0f} s ({why})"
