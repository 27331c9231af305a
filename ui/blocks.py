"""The Gradio app: `create_demo(engine)` builds the Blocks (nothing global, nothing launched).

One GPU job at a time: the generating event has concurrency_limit=1 in the shared "gpu" group and the
queue is bounded. Cancel works twice over: Gradio's `cancels=[...]` cancels the event's task, which
sets the job's threading.Event (polled by engine.run between steps), and the Cancel button's own
handler sets the session's Event too.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import tempfile
import time
import uuid
import weakref
from pathlib import Path

import gradio as gr

from core.denoise.runtime import JobCancelled
from core.device import detect
from core.engine import OutOfMemory
from core.job import MAX_PROMPT_CHARS, TIERS, out_size
from core.limits import LIMITS
from core.models import ModelUnavailableError

from . import handlers as H
from .plots import memory_figure
from .zerogpu import gpu_wrap

log = logging.getLogger(__name__)
ASSETS = Path(__file__).resolve().parent.parent / "assets"
QUEUE_SIZE = 8
EXAMPLES = (  # file, prompt, control 1, scale 1, control 2, scale 2
    ("astronaut.png", "a portrait of an astronaut in a white suit, studio light, detailed", "canny", 0.7, "depth", 0.6),
    ("coffee.png", "a cup of coffee on a wooden table, morning light, film photo", "canny", 0.7, "none", 0.7),
    ("chelsea.png", "a tabby cat lying on a rug, soft window light", "depth", 0.8, "none", 0.7),
    ("rocket.png", "a rocket on the launch pad at dusk, dramatic clouds", "canny", 0.6, "depth", 0.5),
)
USER_ERRORS = (ValueError, OutOfMemory, ModelUnavailableError)


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


def _error(e: Exception) -> gr.Error:
    return gr.Error(str(e), print_exception=False)


def _demo_notice() -> str:
    return (
        "> ⚠️ **Demo model:** a tiny FLUX with *random weights* is running (no CUDA GPU found, or "
        "`--demo`). Everything works end to end, but the images are noise. Start `app.py` on a "
        "machine with a GPU (or pass `--model`) for real images."
    )


def create_demo(engine, *, examples: bool = True, default_tier: str = "auto") -> gr.Blocks:
    """The app for an Engine (loaded or not). Call `.launch()` on the result; `.queue()` is set."""
    if default_tier not in TIERS:
        raise ValueError(f"tier must be one of {', '.join(TIERS)}, got {default_tier!r}.")
    d = H.defaults_for(engine)
    flags = H.CancelFlags()
    out_dir = Path(tempfile.gettempdir()) / "flux-anyvram-ui" / uuid.uuid4().hex[:12]

    def run_job(job, progress, cancel):
        return engine.run(job, progress=progress, cancel=cancel)

    run_gpu = gpu_wrap(run_job, engine)

    # -- handlers ---------------------------------------------------------------------------------
    async def generate(
        image,
        prompt,
        control_1,
        scale_1,
        end_1,
        control_2,
        scale_2,
        end_2,
        control_3,
        scale_3,
        end_3,
        tier,
        upscale,
        seed,
        randomize_seed,
        steps,
        guidance,
        max_side,
        canny_auto=True,
        canny_low=100,
        canny_high=200,
        fp8_compute=False,
        request: gr.Request = None,
        progress=gr.Progress(),  # noqa: B008 - Gradio injects progress through this default
    ):
        rows = [(control_1, scale_1, end_1), (control_2, scale_2, end_2), (control_3, scale_3, end_3)]
        try:  # decoding a large upload takes a while: off the event loop, like every slow step here
            job = await asyncio.to_thread(
                H.build_job,
                image,
                prompt,
                rows,
                tier,
                upscale,
                seed,
                randomize_seed,
                steps,
                guidance,
                max_side,
                None if canny_auto else (canny_low, canny_high),
                fp8_compute=fp8_compute,
            )
        except ValueError as e:
            raise _error(e) from None
        key = getattr(request, "session_hash", None)
        ev = flags.start(key)
        progress(0, desc="Loading the model and planning")

        def on_progress(label: str, done: int, total: int) -> None:
            progress((min(done, total), total), desc=label, unit="tiles" if ": tile" in label else "steps")

        started = time.time()
        try:
            result = await asyncio.to_thread(run_gpu, job, on_progress, ev.is_set)
        except asyncio.CancelledError:  # Gradio cancelled this event: stop the engine too
            ev.set()
            raise
        except JobCancelled:
            raise gr.Error("The job was cancelled.", print_exception=False) from None
        except USER_ERRORS as e:
            raise _error(e) from None
        finally:
            flags.finish(key, ev)
        finished = time.time()
        path, pair = await asyncio.to_thread(lambda: (H.save_result(result, out_dir), H.slider_pair(job, result.image)))
        summary = H.summary_of(result, started, finished, path)
        last = dict(pair=pair, path=str(path), summary=summary)
        return str(path), summary, job.seed, last

    def show(last, gallery):
        if not last:
            return gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip()
        s = last["summary"]
        caption = f"seed {s['seed']} · {s['size'][0]}×{s['size'][1]} · {s['job']['prompt'][:40]}"
        gallery = H.gallery_add(gallery, last["path"], caption)
        return last["pair"], gallery, gallery, H.plan_markdown(s), memory_figure(s)

    def cancel(request: gr.Request = None):
        if flags.cancel(getattr(request, "session_hash", None)):
            gr.Info("Cancelling: the job stops after the current step.")

    def preview(image, kind, canny_auto, low, high):
        try:
            return H.preview_control(image, kind, None if canny_auto else (low, high), engine.demo)
        except Exception as e:  # noqa: BLE001 - a preview never blocks the UI; the run says why
            log.info("no preview for %s: %s", kind, e)
            return None

    def canny_preview(image, kind, canny_auto, low, high):
        """The canny thresholds changed: only a canny row's preview depends on them."""
        return preview(image, kind, canny_auto, low, high) if kind == "canny" else gr.skip()

    def size_info(image, max_side, upscale):
        if image is None:
            return ""
        try:
            iw, ih = H.input_size(image)
            w, h = H.fit_size(iw, ih, max_side=int(max_side))
        except ValueError as e:
            raise _error(e) from None
        ow, oh = out_size(w, h, float(upscale))
        return f"Input {iw}×{ih} → generated at **{w}×{h}** → output **{ow}×{oh}**"

    def load_settings(path):
        try:
            s = H.settings_from_png(path)
        except ValueError as e:
            raise _error(e) from None
        if s.dropped:
            gr.Warning(f"Only {H.ROWS} controls fit in the UI; left out: {', '.join(s.dropped)}.")
        rows = [v for r in s.rows for v in r]
        canny = s.canny or (100, 200)
        gr.Info("Settings loaded from the PNG (seed fixed: randomize is off).")
        return (
            s.prompt,
            *rows,
            s.tier,
            s.upscale,
            s.seed,
            False,
            min(max(s.steps, 1), 100),
            min(max(s.guidance, 0.0), 20.0),
            min(max(s.max_side, 64), 2048),
            s.canny is None,
            canny[0],
            canny[1],
            s.fp8_compute,
        )

    def refresh_tier(tier):
        return gr.update(choices=H.tier_choices(detect()), value=tier)

    # -- layout -----------------------------------------------------------------------------------
    with gr.Blocks(title="FLUX ControlNet on any GPU", delete_cache=(3600, 7200)) as demo:
        gr.Markdown(
            "# FLUX.1-dev + ControlNet-Union on any GPU\nUpload a photo, pick up to three "
            "controls, write a prompt, pick a VRAM tier and an upscale factor."
        )
        if engine.demo:
            gr.Markdown(_demo_notice(), elem_id="demo-notice")
        last = gr.State(None)
        gallery_state = gr.State([])
        with gr.Row():
            with gr.Column(scale=5):
                # image_mode=None: keep alpha, 16-bit etc. for load_image to handle (white background)
                image = safe_image_input(
                    gr.Image(
                        label="Input image",
                        type="filepath",
                        image_mode=None,
                        sources=["upload", "clipboard"],
                        height=300,
                        elem_id="input-image",
                    )
                )
                info = gr.Markdown(elem_id="size-info")
                prompt = gr.Textbox(
                    label="Prompt",
                    lines=2,
                    placeholder=f"What to draw (up to {MAX_PROMPT_CHARS} characters)",
                    elem_id="prompt",
                )
                rows = []
                for k, (kind, end) in enumerate(H.DEFAULT_ROWS, 1):
                    with gr.Group(), gr.Row(equal_height=True):
                        with gr.Column(scale=3, min_width=220):
                            c = gr.Dropdown(
                                H.control_choices(), value=kind, label=f"Control {k}", elem_id=f"control-{k}"
                            )
                            with gr.Row():
                                s = gr.Slider(
                                    0.0,
                                    2.0,
                                    value=H.default_scale(kind),
                                    step=0.05,
                                    label=f"scale {k}",
                                    elem_id=f"scale-{k}",
                                )
                                e = gr.Slider(
                                    0.05, 1.0, value=end, step=0.05, label=f"guidance end {k}", elem_id=f"end-{k}"
                                )
                        p = gr.Image(
                            label=f"Control {k} preview",
                            interactive=False,
                            height=150,
                            scale=1,
                            min_width=120,
                            buttons=[],
                            elem_classes="control-preview",
                        )
                    rows.append((c, s, e, p))
                with gr.Accordion("Canny thresholds", open=False):
                    canny_auto = gr.Checkbox(True, label="automatic (from the image's median brightness)")
                    with gr.Row():
                        canny_low = gr.Slider(0, 254, value=100, step=1, label="low")
                        canny_high = gr.Slider(1, 255, value=200, step=1, label="high")
                with gr.Row():
                    tier = gr.Dropdown(
                        H.tier_choices(engine.device), value=default_tier, label="VRAM tier", elem_id="tier"
                    )
                    upscale = gr.Radio(H.upscale_choices(), value="1", label="Upscale", elem_id="upscale")
                with gr.Row():
                    seed = gr.Number(0, label="Seed", precision=0, minimum=0, maximum=H.SEED_MAX, elem_id="seed")
                    randomize = gr.Checkbox(True, label="Randomize seed", elem_id="randomize")
                with gr.Accordion("Advanced", open=False):
                    lim = LIMITS["steps"]
                    steps = gr.Slider(
                        lim.lo, lim.hi, value=d.steps, step=1, precision=0, label="Steps", elem_id="steps"
                    )
                    lim = LIMITS["guidance"]
                    guidance = gr.Slider(lim.lo, lim.hi, value=d.guidance, step=lim.step, label="Guidance")
                    max_side = gr.Slider(
                        64,
                        2048,
                        value=d.max_side,
                        step=16,
                        precision=0,
                        label="Max side (generation size before upscaling)",
                        elem_id="max-side",
                    )
                    fp8_compute = gr.Checkbox(
                        False,
                        label="fp8 compute: faster on Ada/Hopper GPUs when the whole model is on the "
                        "GPU (48 GB tier); fine detail changes slightly. Ignored on other tiers and GPUs, "
                        "with a note.",
                        elem_id="fp8-compute",
                    )
                with gr.Row():
                    run = gr.Button("Run", variant="primary", elem_id="run")
                    stop = gr.Button("Cancel", variant="stop", elem_id="cancel")
                with gr.Accordion("Load settings from a PNG", open=False):
                    settings_png = gr.File(
                        label="A PNG made by this app", file_types=[".png"], type="filepath", elem_id="settings-png"
                    )
            with gr.Column(scale=6):
                slider = gr.ImageSlider(label="Input (resized) ↔ result", type="pil", elem_id="result")
                png = gr.File(label="PNG with all parameters", elem_id="png")
                with gr.Tab("Plan and memory"):
                    plan_md = gr.Markdown(elem_id="plan")
                    plot = gr.Plot(label="Memory timeline", elem_id="memory-plot")
                with gr.Tab("Summary (JSON)"):
                    summary = gr.JSON(label="Summary")
                gallery = gr.Gallery(
                    label="This session's results",
                    columns=4,
                    height=260,
                    fit_columns=False,
                    object_fit="cover",
                    interactive=False,
                    elem_id="gallery",
                )

        controls = [x for c, s, e, _ in rows for x in (c, s, e)]
        inputs = [
            image,
            prompt,
            *controls,
            tier,
            upscale,
            seed,
            randomize,
            steps,
            guidance,
            max_side,
            canny_auto,
            canny_low,
            canny_high,
            fp8_compute,
        ]

        # -- events ---------------------------------------------------------------------------------
        run_evt = run.click(
            generate,
            inputs,
            [png, summary, seed, last],
            api_name="generate",
            api_description="Generate an image; returns the PNG (parameters in its metadata) and a JSON summary.",
            concurrency_limit=1,
            concurrency_id="gpu",
        )
        run_evt.success(
            show,
            [last, gallery_state],
            [slider, gallery, gallery_state, plan_md, plot],
            api_visibility="private",
            concurrency_limit=4,
            show_progress="hidden",
        )
        stop.click(cancel, None, None, cancels=[run_evt], queue=False, api_visibility="private")
        for c, s, e, p in rows:
            c.input(
                lambda kind: (H.default_scale(kind), H.default_end(kind)),
                c,
                [s, e],
                api_visibility="private",
                queue=False,
            )
            gr.on(
                [image.change, c.change],
                preview,
                [image, c, canny_auto, canny_low, canny_high],
                p,
                api_visibility="private",
                show_progress="minimal",
                trigger_mode="always_last",
            )
            gr.on(
                [canny_auto.change, canny_low.release, canny_high.release],
                canny_preview,  # other rows keep theirs
                [image, c, canny_auto, canny_low, canny_high],
                p,
                api_visibility="private",
                show_progress="minimal",
                trigger_mode="always_last",
            )
        gr.on(
            [image.change, max_side.release, upscale.change],
            size_info,
            [image, max_side, upscale],
            info,
            api_visibility="private",
            show_progress="hidden",
            trigger_mode="always_last",
        )
        settings_png.upload(
            load_settings,
            settings_png,
            [
                prompt,
                *controls,
                tier,
                upscale,
                seed,
                randomize,
                steps,
                guidance,
                max_side,
                canny_auto,
                canny_low,
                canny_high,
                fp8_compute,
            ],
            api_visibility="private",
        )
        demo.load(refresh_tier, tier, tier, api_visibility="private", queue=False)

        if examples:
            rows_ex = [
                [str(ASSETS / f), p, c1, s1, c2, s2] for f, p, c1, s1, c2, s2 in EXAMPLES if (ASSETS / f).is_file()
            ]
            if rows_ex:
                gr.Examples(
                    rows_ex,
                    [image, prompt, rows[0][0], rows[0][1], rows[1][0], rows[1][1]],
                    cache_examples=False,
                    label="Examples (scikit-image photos)",
                )
    demo.queue(max_size=QUEUE_SIZE)
    weakref.finalize(demo, shutil.rmtree, out_dir, True)  # the PNGs Gradio has copied to its cache
    return demo
