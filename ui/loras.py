"""LoRAs on the page: a few rows, each a file from the LoRA folder and its scale.

The folder is `--lora-dir` (default: the cache root's loras/, core.lora.default_lora_dir); files are
listed by their path relative to it, rescanned on demand. A few-step LoRA (turbo, hyper) sets its
steps and guidance when chosen (still editable). The rows are inputs of the page's run and of the
API's `generate`, and settings loaded from a PNG bring them back (core.lora.loras_from_params).
"""

from __future__ import annotations

from pathlib import Path

from core.limits import LIMITS
from core.lora import LoraSpec, default_lora_dir, list_loras, loras_from_params, suggest

NONE = "None"
ROWS = 2
PRIVATE = dict(api_visibility="private")


def folder(lora_dir) -> Path:
    return Path(lora_dir).expanduser() if lora_dir else default_lora_dir()


def choices(lora_dir) -> list[str]:
    return [NONE, *list_loras(folder(lora_dir))]


def build(u: dict, lora_dir) -> None:
    """The LoRA accordion (inside the settings column)."""
    import gradio as gr  # here: ui.settings imports this module, and handlers work without Gradio

    root = folder(lora_dir)
    u["lora_dir"] = str(root)
    lim = LIMITS["lora_scale"]
    u["lora_rows"] = []
    with gr.Accordion("LoRAs", open=False):
        u["lora_info"] = gr.Markdown(_info(root), elem_id="lora-info")
        for k in range(1, ROWS + 1):
            with gr.Row(equal_height=True):
                name = gr.Dropdown(choices(root), value=NONE, label=f"LoRA {k}", elem_id=f"lora-{k}", scale=3)
                scale = gr.Slider(
                    lim.lo, lim.hi, value=lim.default, step=lim.step, label="scale", elem_id=f"lora-scale-{k}", scale=2
                )
            u["lora_rows"].append((name, scale))
        u["lora_rescan"] = gr.Button("Rescan the folder", size="sm", elem_id="lora-rescan")


def _info(root: Path) -> str:
    n = len(list_loras(root))
    found = f"{n} LoRA file{'s' * (n != 1)}" if n else "no LoRA files yet"
    return (
        f"From `{root}` ({found}; `--lora-dir` picks another folder). Merged into the weights before the "
        "plan places them: every tier, no time per step. A turbo/hyper LoRA sets its steps and guidance."
    )


def inputs(u: dict) -> list:
    return [x for row in u["lora_rows"] for x in row]


def specs(values, lora_dir) -> tuple[LoraSpec, ...]:
    """(name, scale, name, scale, ...) from the rows → LoraSpecs (a bad file: ValueError, one sentence)."""
    root, out = folder(lora_dir), []
    for name, scale in zip(values[::2], values[1::2]):
        if name in (None, "", NONE):
            continue
        path = (root / str(name)).resolve()
        if not path.is_relative_to(root.resolve()):  # an API call naming a file elsewhere on the server
            raise ValueError(f"LoRA '{name}' is not a file in the LoRA folder.")
        out.append(LoraSpec(str(path), LIMITS["lora_scale"].default if scale is None else scale))
    return tuple(out)


def from_settings(items, lora_dir) -> tuple[list, list[str]]:
    """The rows' values for a PNG's `job.loras`, and the names that are not in the folder."""
    root = folder(lora_dir)
    found, missing = loras_from_params(items, root)
    root, values = root.resolve(), []
    for s in found:
        p = Path(s.path).resolve()
        if p.is_relative_to(root):
            values += [str(p.relative_to(root)), s.scale]
        else:  # still on disk, but the rows offer the folder's files only
            missing += (p.name + " (outside the LoRA folder)",)
    missing = list(missing) + [v for v in values[2 * ROWS :: 2]]  # more than the rows hold
    values = values[: 2 * ROWS]
    values += [NONE, LIMITS["lora_scale"].default] * (ROWS - len(values) // 2)
    return values, missing


def preset_for(name, lora_dir) -> dict | None:
    """A few-step LoRA's {"steps", "guidance"} (core.lora.suggest), None for any other choice."""
    if name in (None, "", NONE):
        return None
    try:
        return suggest((LoraSpec(str(folder(lora_dir) / name)),))
    except ValueError:  # a file gone since the listing: the run will say so
        return None


def wire(u: dict) -> None:
    """Rescan the folder; a few-step LoRA's preset when one is chosen."""
    import gradio as gr

    rows = u["lora_rows"]

    def rescan():
        c = choices(u["lora_dir"])
        return [_info(folder(u["lora_dir"]))] + [gr.update(choices=c) for _ in rows]

    u["lora_rescan"].click(rescan, None, [u["lora_info"], *(n for n, _ in rows)], queue=False, **PRIVATE)

    def preset(name):
        s = preset_for(name, u["lora_dir"])
        return (s["steps"], s["guidance"]) if s else (gr.skip(), gr.skip())

    for name, _ in rows:
        name.input(preset, name, [u["steps"], u["guidance"]], queue=False, **PRIVATE)
