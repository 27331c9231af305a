"""What the page tells the user beside the result: which field an error belongs to, checks as one
types, and the session's history (what a click on an earlier result restores)."""

from __future__ import annotations

from pathlib import Path

from core.limits import MAX_PROMPT_CHARS, check

# -- errors next to their field ---------------------------------------------------------------------
ERROR_FIELDS = ("image", "prompt", "controls", "tier", "seed", "advanced")
FIELD_LABELS = dict(
    image="Input image", prompt="Prompt", controls="the controls", tier="VRAM tier", seed="Seed", advanced="Advanced"
)


def field_of(error) -> str | None:
    """The UI field an error (or its sentence) is about (None: the job as a whole, e.g. out of memory)."""
    from preprocessors.image_io import ImageInputError

    m = str(error).lower()
    if isinstance(error, ImageInputError) or m.startswith("upload an image"):
        return "image"
    if m.startswith("prompt"):
        return "prompt"
    if m.startswith("seed"):
        return "seed"
    if m.startswith(("steps", "guidance", "max side", "fp8_compute", "compile")):
        return "advanced"
    if "tier" in m:
        return "tier"
    if "control" in m or "canny" in m:
        return "controls"
    return None


def prompt_note(prompt) -> tuple[str, bool]:
    """(text under the prompt box, is it an error): the character count, checked as one types."""
    n = len(prompt or "")
    if n > MAX_PROMPT_CHARS:
        return f"{n} / {MAX_PROMPT_CHARS} characters: {n - MAX_PROMPT_CHARS} over the limit.", True
    return (f"{n} / {MAX_PROMPT_CHARS} characters" if n else ""), False


def seed_error(seed) -> str:
    """'' when the seed is usable, else the sentence Job would give."""
    try:
        check("seed", int(seed) if isinstance(seed, float) and seed.is_integer() else seed)
    except ValueError as e:
        return str(e)
    return ""


# -- history: every result of this session, clickable ------------------------------------------------
def history_entry(path, before, summary: dict, photo) -> dict:
    """What a click on a history item restores: the settings (read back from the PNG), the
    before/after pair, and the uploaded photo while its file still exists."""
    s = summary
    caption = f"seed {s['seed']} · {s['size'][0]}×{s['size'][1]} · {s['job']['prompt'][:40]}"
    return dict(png=str(path), before=str(before), photo=str(photo) if photo else None, caption=caption)


def history_add(history: list | None, entry: dict, limit: int = 24) -> list:
    """Newest first; entries whose files are gone (the folder keeps 32) drop out."""
    return ([entry] + [e for e in history or [] if Path(e["png"]).is_file()])[:limit]


def gallery_items(history: list) -> list[tuple[str, str]]:
    return [(e["png"], e["caption"]) for e in history]
