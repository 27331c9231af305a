"""The Gradio app: `create_demo(engine)` builds the Blocks (nothing global, nothing launched).

Layout: prompt and Run at the top, the result large beside them with the job's status (phase,
step k/N, ETA, live preview) drawn over it; the controls, tier, seed and advanced settings below;
the history and the plan under the result. One GPU job at a time (ui/run.py); the helpers
(previews, size line, settings) are private events outside the API, which has one endpoint,
`generate`, with every tier in its choices (the page offers only those this machine can run).
"""

from __future__ import annotations

import shutil
import tempfile
import uuid
import weakref
from pathlib import Path

import gradio as gr

from core.job import MAX_PROMPT_CHARS, TIERS
from core.limits import LIMITS

from . import handlers as H
from . import loras
from .events import example_list, wire
from .run import Runner
from .zerogpu import gpu_wrap

ASSETS = Path(__file__).resolve().parent.parent / "assets"
QUEUE_SIZE = 8
EXAMPLES = (  # file, label, prompt, (control, scale) per row
    (
        "astronaut.png",
        "Astronaut",
        "a portrait of an astronaut in a white suit, studio light, detailed",
        (("canny", 0.7), ("depth", 0.6)),
    ),
    ("coffee.png", "Coffee", "a cup of coffee on a wooden table, morning light, film photo", (("canny", 0.7),)),
    ("chelsea.png", "Cat", "a tabby cat lying on a rug, soft window light", (("depth", 0.8),)),
    ("rocket.png", "Rocket", "a rocket on the launch pad at dusk, dramatic clouds", (("canny", 0.6), ("depth", 0.5))),
)
CSS = """
#status .status {padding: 10px 14px; border-radius: 8px; border: 1px solid var(--border-color-primary);
  background: var(--block-background-fill); font-size: 15px; min-height: 22px}
#status .status-running, #status .status-queued {border-color: var(--color-accent)}
#status .status-cancelling, #status .status-cancelled {border-color: #d9a400; background: #fff8e1; color: #5c4400}
#status .status-error {border-color: #c44e52; background: #fdecec; color: #8a1c1f}
#status .status-done {border-color: #55a868}
#status .bar {height: 6px; background: var(--border-color-primary); border-radius: 3px; margin-top: 8px}
#status .bar div {height: 100%; background: var(--color-accent); border-radius: 3px}
.field-error {color: #b3261e; font-size: 14px; margin-top: -6px}
.field-note {color: var(--body-text-color-subdued); font-size: 13px; margin-top: -6px}
#upscale .wrap {display: grid !important; grid-template-columns: repeat(5, minmax(0, 1fr)); gap: 4px}
#upscale .wrap label {min-width: 0; padding: 6px 4px; justify-content: center}
#run-row button {min-height: 44px}
#live img {image-rendering: auto}
"""
# Ctrl+Enter (⌘+Enter) runs from anywhere; images get alt text (Gradio leaves it empty)
JS = """() => {
  document.addEventListener('keydown', (e) => {
    if ((e.ctrlKey || e.metaKey) && e.key === 'Enter') {
      const run = document.querySelector('#run');
      if (run && !run.disabled) { e.preventDefault(); run.click(); }
    }
  });
  const alts = {'#result': 'input and generated result', '#live': 'live preview of the job',
                '#input-image': 'input photo', '.control-preview': 'control image', '#gallery': 'earlier result'};
  new MutationObserver(() => {
    for (const [sel, alt] of Object.entries(alts))
      document.querySelectorAll(sel + ' img:not([alt]), ' + sel + ' img[alt=""]').forEach((i) => i.alt = alt);
    document.querySelectorAll('#memory-plot img').forEach((i) => {
      if (!i.alt || i.alt.startsWith('undefined')) i.alt = 'memory over time, the phases shaded';
    });
  }).observe(document.body, {childList: true, subtree: true, attributes: true, attributeFilter: ['src']});
}"""
HELP = dict(
    scale="How strongly this control steers the image: 0.3–0.8 is typical (canny 0.7, depth 0.8).",
    end="The control acts until this fraction of the steps, then the model draws detail freely (0.65–0.8).",
    upscale="Progressive tiled upscaling after generation: stages of at most 2×, each refined in tiles.",
    precision="fp8 matmuls: faster on Ada/Hopper GPUs when the whole model fits (48 GB tier); fine detail "
    "changes slightly. Ignored, with a note, elsewhere.",
    seed="The same seed and settings give the same image. Typing a seed turns Randomize off.",
    weights="Auto: bf16/fp8 weights where they fit the GPU and the RAM, 4-bit (GGUF Q4_0) only where they "
    "do not. Exact: never 4-bit. 4-bit: wherever it is faster (small tiers: fewer bytes to stream).",
    compile="torch.compile of the denoiser blocks when the whole model is resident on the GPU: 15-30 s once "
    "per process (kept on disk for the next), then ~1.5 s faster per image. Ignored elsewhere.",
)


def _demo_notice() -> str:
    return (
        "⚠️ **Demo model:** a tiny FLUX with *random weights* runs here (no CUDA GPU, or `--demo`). "
        "Everything works end to end, but **every image is noise** — the depth preview too (its depth "
        "model is random as well). Start `app.py` on a GPU machine (or pass `--model`) for real images."
    )


def safe_image_input(component: gr.Image) -> gr.Image:
    """Make an image input's preprocessing never fail: an upload Pillow cannot open (corrupt, empty,
    a decompression bomb) reaches our sanitizer, preprocessors.load_image, as a raw path and comes
    back to the user as one sentence instead of Gradio's generic error. (Patched on the instance: a
    subclass would need a frontend of its own.)"""
    original = component.preprocess

    def preprocess(payload):
        try:
            return original(payload)
        except Exception:  # noqa: BLE001 - load_image explains what is wrong with the file
            return None if payload is None else str(payload.path)

    component.preprocess = preprocess
    return component


def _error_slot(name: str) -> gr.Markdown:
    return gr.Markdown(visible=False, elem_classes="field-error", elem_id=f"err-{name}")


def _control_row(k: int, kind: str, end: float) -> tuple:
    """A control row's components, unrendered: the examples (rendered first) set them."""
    on = kind != H.NONE
    lim_s, lim_e = LIMITS["scale"], LIMITS["control_end"]
    c = gr.Dropdown(H.control_choices(), value=kind, label=f"Control {k}", elem_id=f"control-{k}", render=False)
    s = gr.Slider(
        lim_s.lo,
        lim_s.hi,
        value=H.default_scale(kind),
        step=lim_s.step,
        label="Scale",
        info=HELP["scale"],
        visible=on,
        elem_id=f"scale-{k}",
        render=False,
    )
    e = gr.Slider(
        lim_e.step,
        lim_e.hi,
        value=end,
        step=lim_e.step,
        label="Guidance end",
        info=HELP["end"],
        visible=on,
        elem_id=f"end-{k}",
        render=False,
    )
    p = gr.Image(
        label=f"Control {k} image",
        interactive=False,
        height=200,
        scale=2,
        min_width=140,
        buttons=["fullscreen"],
        visible=on,
        elem_classes="control-preview",
        render=False,
    )
    return c, s, e, p


def _request(u: dict, examples: bool) -> None:
    """Prompt, Run and Cancel, the photo, the examples."""
    u["prompt"] = gr.Textbox(
        label="Prompt",
        lines=2,
        max_lines=8,
        placeholder=f"What to draw (up to {MAX_PROMPT_CHARS} characters). Ctrl+Enter runs.",
        elem_id="prompt",
    )
    u["err_prompt"] = _error_slot("prompt")
    with gr.Row(elem_id="run-row"):
        u["run"] = gr.Button("Run", variant="primary", elem_id="run", scale=3, min_width=120)
        u["stop"] = gr.Button("Cancel", variant="stop", elem_id="cancel", interactive=False, scale=1, min_width=90)
    # image_mode=None: keep alpha, 16-bit etc. for load_image to handle (white background)
    u["image"] = safe_image_input(
        gr.Image(
            label="Input image (the controls are computed from it)",
            type="filepath",
            image_mode=None,
            sources=["upload", "clipboard"],
            height=260,
            elem_id="input-image",
        )
    )
    u["info"] = gr.Markdown(elem_id="size-info")
    u["err_image"] = _error_slot("image")
    if examples:
        example_list(u, [(ASSETS / f, *rest) for f, *rest in EXAMPLES])


def _result(u: dict, engine) -> None:
    """The status bar, the live preview while a job runs, the before/after slider, the PNG."""
    u["status"] = gr.HTML(H.idle_status(engine.demo), elem_id="status", padding=False)
    u["live"] = gr.Image(
        label="Live preview (latents projected to RGB)",
        interactive=False,
        visible=False,
        height=512,
        buttons=[],
        elem_id="live",
    )
    u["slider"] = gr.ImageSlider(
        label="Input (resized) ↔ result",
        type="filepath",
        format="png",
        max_height=640,
        buttons=["download", "fullscreen"],
        elem_id="result",
    )
    u["png"] = gr.File(label="PNG with all parameters", visible=False, elem_id="png")  # shown with a result


def _settings(u: dict, engine, d, tiers, default_tier: str, lora_dir=None) -> None:
    """Controls, tier and upscale, seed, advanced, settings from a PNG."""
    for c, s, e, p in u["rows"]:
        with gr.Group(), gr.Row(equal_height=True):
            with gr.Column(scale=3, min_width=200):
                c.render()
                s.render()
                e.render()
            p.render()
    u["err_controls"] = _error_slot("controls")
    with gr.Accordion("Canny thresholds", open=False):
        u["canny_auto"] = gr.Checkbox(True, label="automatic (from the image's median brightness)")
        with gr.Row():
            u["canny_low"] = gr.Slider(0, 254, value=100, step=1, label="low", interactive=False)
            u["canny_high"] = gr.Slider(1, 255, value=200, step=1, label="high", interactive=False)
    with gr.Row():
        u["tier"] = gr.Dropdown(
            tiers,
            value=default_tier,
            label="VRAM tier",
            info=H.tier_info(engine.device, engine.sizes),
            elem_id="tier",
            min_width=200,
        )
        u["upscale"] = gr.Radio(
            H.upscale_choices(), value="1", label="Upscale", info=HELP["upscale"], elem_id="upscale"
        )
    u["plan_preview"] = gr.Markdown(elem_id="plan-preview")
    u["err_tier"] = _error_slot("tier")
    with gr.Row(equal_height=True):
        u["seed"] = gr.Number(0, label="Seed", precision=0, info=HELP["seed"], elem_id="seed", scale=2)
        with gr.Column(scale=1, min_width=150):
            u["randomize"] = gr.Checkbox(True, label="Randomize seed", elem_id="randomize")
            u["reuse"] = gr.Button("Reuse last seed", size="sm", elem_id="reuse-seed")
    u["err_seed"] = _error_slot("seed")
    with gr.Accordion("Advanced", open=False):
        lim = LIMITS["steps"]
        u["steps"] = gr.Slider(lim.lo, lim.hi, value=d.steps, step=1, precision=0, label="Steps", elem_id="steps")
        lim = LIMITS["guidance"]
        u["guidance"] = gr.Slider(
            lim.lo,
            lim.hi,
            value=d.guidance,
            step=lim.step,
            label="Guidance",
            info="FLUX.1-dev's distilled guidance (Forge: 'Distilled CFG Scale'); 3.5 is typical.",
        )
        lim = LIMITS["width"]
        u["max_side"] = gr.Slider(
            lim.lo,
            lim.hi,
            value=d.max_side,
            step=lim.step,
            precision=0,
            label="Max side (generation size before upscaling)",
            elem_id="max-side",
        )
        u["fp8_compute"] = gr.Checkbox(
            False, label="Precision: fp8 compute", info=HELP["precision"], elem_id="fp8-compute"
        )
        u["precision"] = gr.Radio(
            [("Auto", "auto"), ("Exact (bf16/fp8)", "exact"), ("4-bit", "4bit")],
            value="auto",
            label="Weights",
            info=HELP["weights"],
            elem_id="precision",
        )
        u["compile"] = gr.Radio(
            H.compile_choices(engine.fast.compile),
            value="auto",
            label="Compile",
            info=HELP["compile"],
            elem_id="compile",
        )
        u["err_advanced"] = _error_slot("advanced")
    loras.build(u, lora_dir)
    with gr.Accordion("Load settings from a PNG", open=False):
        u["settings_png"] = gr.File(
            label="A PNG from this app, A1111 or Forge", file_types=[".png"], type="filepath", elem_id="settings-png"
        )
        u["settings_msg"] = gr.Markdown(elem_id="settings-msg")


def _history(u: dict) -> None:
    u["gallery"] = gr.Gallery(
        label="History: click a result to restore its settings and before/after",
        columns=4,
        height=240,
        fit_columns=False,
        object_fit="cover",
        interactive=False,
        allow_preview=False,
        elem_id="gallery",
    )
    with gr.Tab("Plan and memory"):
        u["plan"] = gr.Markdown(elem_id="plan")
        u["plot"] = gr.Plot(label="Memory over time, phases shaded", elem_id="memory-plot")
    with gr.Tab("Summary (JSON)"):
        u["summary"] = gr.JSON(label="Summary")


def create_demo(engine, *, examples: bool = True, default_tier: str = "auto", lora_dir=None) -> gr.Blocks:
    """The app for an Engine (loaded or not). Call `.launch()` on the result; `.queue()` is set.
    `lora_dir`: the folder whose LoRAs the page lists (default: the cache root's loras/)."""
    if default_tier not in TIERS:
        raise ValueError(f"tier must be one of {', '.join(TIERS)}, got {default_tier!r}.")
    d = H.defaults_for(engine)
    out_dir = Path(tempfile.gettempdir()) / "flux-anyvram-ui" / uuid.uuid4().hex[:12]
    run_gpu = gpu_wrap(lambda job, progress, cancel: engine.run(job, progress=progress, cancel=cancel), engine)
    tiers = H.tier_choices(engine.device, engine.sizes)
    if default_tier not in [v for _, v in tiers]:
        default_tier = "auto"
    u: dict = {}  # the components, by name, for the handlers

    with gr.Blocks(title="FLUX ControlNet on any GPU", delete_cache=(3600, 7200)) as demo:
        gr.HTML(f"<style>{CSS}</style>", padding=False, elem_id="style")
        gr.Markdown("## FLUX.1-dev + ControlNet-Union on any GPU", elem_id="title")
        if engine.demo:
            gr.Markdown(_demo_notice(), elem_id="demo-notice")
        u["history"] = gr.State([])
        u["rows"] = [_control_row(k, kind, end) for k, (kind, end) in enumerate(H.DEFAULT_ROWS, 1)]
        # two rows, so that a phone (one column) shows prompt, Run, photo, then the result
        with gr.Row(equal_height=False):
            with gr.Column(scale=5, min_width=320):
                _request(u, examples)
            with gr.Column(scale=6, min_width=320):
                _result(u, engine)
        with gr.Row(equal_height=False):
            with gr.Column(scale=5, min_width=320):
                _settings(u, engine, d, tiers, default_tier, lora_dir)
            with gr.Column(scale=6, min_width=320):
                _history(u)
        # the API's own tier input: every tier, so a client gets the core's sentence for one this
        # machine cannot run (the page's dropdown offers only the runnable ones)
        u["api_tier"] = gr.Dropdown(list(TIERS), value="auto", label="tier", visible=False)
        u["api_run"] = gr.Button(visible=False)
        u["drop"] = gr.Button("Drop the queued job", visible="hidden", elem_id="drop")
        runner = Runner(engine, H.CancelFlags(), out_dir, run_gpu, u)
        wire(demo, engine, runner, u, JS)
    demo.queue(max_size=QUEUE_SIZE)
    weakref.finalize(demo, shutil.rmtree, out_dir, True)  # the PNGs Gradio has copied to its cache
    return demo
