"""The page's events: what each control does when it changes (create_demo builds, this wires).

Every helper event is private (not in the API) and answers in the page: a message under its field
or in its panel, never a toast or an error pill over other fields.
"""

from __future__ import annotations

import logging
from pathlib import Path

import gradio as gr

from core.device import detect

from . import handlers as H
from . import loras
from .plan_view import plan_preview
from .progress import status_html

log = logging.getLogger(__name__)
PRIVATE = dict(api_visibility="private")
DROP_JS = "() => { if (document.querySelector('#status .status-queued')) document.querySelector('#drop')?.click(); }"


def inputs_of(u: dict, tier) -> list:
    """generate's inputs, in the API's order (tier: the page's or the API's dropdown)."""
    controls = [x for c, s, e, _ in u["rows"] for x in (c, s, e)]
    names = ("upscale", "seed", "randomize", "steps", "guidance", "max_side", "canny_auto", "canny_low", "canny_high")
    lora = loras.inputs(u)
    advanced = [u["fp8_compute"], u["precision"]]
    return [u["image"], u["prompt"], *controls, tier, *(u[n] for n in names), *advanced, *lora, u["compile"]]


# generate's parameters in the API's order (the order of inputs_of); Gradio needs them spelled out in
# each handler's signature, the handlers collect them by these names
API_PARAMS = (
    "image", "prompt", "control_1", "scale_1", "end_1", "control_2", "scale_2", "end_2", "control_3", "scale_3",
    "end_3", "tier", "upscale", "seed", "randomize_seed", "steps", "guidance", "max_side", "canny_auto", "canny_low",
    "canny_high", "fp8_compute", "precision", "lora_1", "lora_scale_1", "lora_2", "lora_scale_2", "compile",
)  # fmt: skip


def job_values(params: dict) -> list:
    """A handler's parameters (its locals() on entry) as the list ui.run takes."""
    return [params[n] for n in API_PARAMS]


def settings_outputs(u: dict) -> list:
    controls = [x for c, s, e, _ in u["rows"] for x in (c, s, e)]
    names = ("tier", "upscale", "seed", "randomize", "steps", "guidance", "max_side", "canny_auto", "canny_low")
    rest = [u["canny_high"], u["fp8_compute"], u["precision"], *loras.inputs(u)]
    return [u["prompt"], *controls, *(u[n] for n in names), *rest]


def settings_values(s: H.Settings, tiers: list[str]) -> tuple[list, str]:
    """The fields' values for Settings, and what to tell the user about them."""
    rows = [v for r in s.rows for v in r]
    canny = s.canny or (100, 200)
    tier = s.tier if s.tier in tiers else "auto"
    notes = []
    if tier != s.tier:
        notes.append(f"the {s.tier} GB tier does not run on this machine, so the tier is Auto")
    if s.dropped:
        notes.append(f"left out (not available here, or more than {H.ROWS}): {', '.join(s.dropped)}")
    values = [s.prompt, *rows, tier, s.upscale, s.seed, False, s.steps, s.guidance, s.max_side]
    values += [s.canny is None, canny[0], canny[1], s.fp8_compute, s.precision, *s.loras]
    if s.lora_missing:
        notes.append(f"LoRAs not found in the LoRA folder: {', '.join(s.lora_missing)}")
    return values, "; ".join(notes)


def example_list(u: dict, examples: list) -> None:
    """Examples set the photo, the prompt and all three control rows (none left over)."""
    rows = [r for r in examples if r[0].is_file()]
    if not rows:
        return
    by_prompt = {prompt: controls for _, _, prompt, controls in rows}

    def apply(image, prompt):
        controls = list(by_prompt.get(prompt, ()))[: H.ROWS]
        controls += [(H.NONE, 0.7)] * (H.ROWS - len(controls))
        return [v for kind, scale in controls for v in (kind, scale, 0.8)]

    outs = [x for c, s, e, _ in u["rows"] for x in (c, s, e)]
    gr.Examples(
        [[str(f), prompt] for f, _, prompt, _ in rows],
        [u["image"], u["prompt"]],
        outs,
        fn=apply,
        run_on_click=True,
        cache_examples=False,
        example_labels=[label for _, label, _, _ in rows],
        label="Examples (scikit-image photos)",
    )


def wire(demo: gr.Blocks, engine, runner, u: dict, js: str) -> None:
    slots = getattr(engine, "replicas", 1)  # jobs at once: one per engine (core.pool.EnginePool)
    page_inputs = inputs_of(u, u["tier"])
    err = [u[f"err_{f}"] for f in H.ERROR_FIELDS]
    outputs = [u[n] for n in ("status", "live", "slider", "png", "summary", "seed", "run", "stop")]
    outputs += [u[n] for n in ("plan", "plot", "history", "gallery")] + err

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
        precision="auto",
        lora_1=loras.NONE,
        lora_scale_1=1.0,
        lora_2=loras.NONE,
        lora_scale_2=1.0,
        compile="auto",
        request: gr.Request = None,
        progress=gr.Progress(),  # noqa: B008 - Gradio injects progress through this default
    ):
        values = job_values(locals())
        return await runner.generate(values, request, progress)

    u["api_run"].click(
        generate,
        inputs_of(u, u["api_tier"]),
        [u["png"], u["summary"], u["seed"]],
        api_name="generate",
        api_description="Generate an image; returns the PNG (parameters in its metadata), a JSON summary and the seed.",
        concurrency_limit=slots,
        concurrency_id="gpu",
    )
    # arm and cancel go through the queue (no concurrency limit): only queued events know the session
    armed = u["run"].click(
        runner.arm, None, [u["run"], u["stop"], u["status"]], concurrency_limit=None, show_progress="hidden", **PRIVATE
    )

    async def run_page(
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
        canny_auto,
        canny_low,
        canny_high,
        fp8_compute,
        precision,
        lora_1,
        lora_scale_1,
        lora_2,
        lora_scale_2,
        compile,
        history,
        request: gr.Request = None,
    ):
        values = job_values(locals())
        async for out in runner.run_page(values, history, request):
            yield out

    page_evt = armed.then(
        run_page,
        [*page_inputs, u["history"]],
        outputs,
        concurrency_limit=slots,
        concurrency_id="gpu",
        show_progress="minimal",  # Gradio's queue position, on the status bar only
        show_progress_on=[u["status"]],
        **PRIVATE,
    )
    u["stop"].click(runner.cancel, None, u["status"], concurrency_limit=None, show_progress="hidden", **PRIVATE)
    # a job still in the queue (status "queued"): the page's JS presses the hidden drop button
    u["stop"].click(None, js=DROP_JS, **PRIVATE)
    u["drop"].click(
        runner.drop,
        None,
        [u[n] for n in ("status", "run", "stop", "live", "slider")],
        cancels=[page_evt],
        concurrency_limit=None,
        show_progress="hidden",
        **PRIVATE,
    )

    # -- the result's history ------------------------------------------------------------------
    def restore(history, evt: gr.SelectData):
        n = len(settings_outputs(u))
        if not history or evt.index is None or evt.index >= len(history):
            return [gr.skip()] * (n + 4)
        e = history[evt.index]
        try:
            values, note = settings_values(H.settings_from_png(e["png"], u["lora_dir"]), tier_values)
        except ValueError as err:
            return [gr.skip()] * (n + 3) + [status_html("error", str(err))]
        photo = e["photo"] if e["photo"] and Path(e["photo"]).is_file() else gr.skip()
        text = "Restored the settings, photo and before/after of this result." + (f" Note: {note}." if note else "")
        slider = gr.update(value=(e["before"], e["png"]), visible=True)
        return values + [slider, gr.update(value=e["png"], visible=True), photo, status_html("done", text)]

    tier_values = [v for _, v in u["tier"].choices]
    u["gallery"].select(
        restore,
        u["history"],
        settings_outputs(u) + [u["slider"], u["png"], u["image"], u["status"]],
        **PRIVATE,
    )

    def reuse(history):
        if not history:
            return gr.skip(), gr.skip(), gr.update(value="No result yet: run once, then reuse its seed.", visible=True)
        return H.seed_of(history[0]), False, gr.update(value="", visible=False)

    u["reuse"].click(reuse, u["history"], [u["seed"], u["randomize"], u["err_seed"]], queue=False, **PRIVATE)

    # -- checks as you type ------------------------------------------------------------------------
    def check_prompt(prompt):
        text, bad = H.prompt_note(prompt)
        return gr.update(
            value=("⚠️ " if bad else "") + text,
            visible=bool(text),
            elem_classes=["field-error" if bad else "field-note"],
        )

    u["prompt"].input(check_prompt, u["prompt"], u["err_prompt"], queue=False, show_progress="hidden", **PRIVATE)

    def check_seed(seed):
        msg = H.seed_error(seed)
        return False, gr.update(value=f"⚠️ {msg}" if msg else "", visible=bool(msg))

    u["seed"].input(
        check_seed, u["seed"], [u["randomize"], u["err_seed"]], queue=False, show_progress="hidden", **PRIVATE
    )

    # -- control rows ------------------------------------------------------------------------------
    canny = [u["canny_auto"], u["canny_low"], u["canny_high"]]

    def preview(image, kind, canny_auto, low, high):
        try:
            return H.preview_control(image, kind, None if canny_auto else (low, high), engine.demo)
        except Exception as e:  # noqa: BLE001 - a preview never blocks the UI; the run says why
            log.info("no preview for %s: %s", kind, e)
            return None

    def canny_preview(image, kind, canny_auto, low, high):
        """The canny thresholds changed: only a canny row's preview depends on them."""
        return preview(image, kind, canny_auto, low, high) if kind == "canny" else gr.skip()

    def row_visibility(kind):
        on = kind not in (None, "", H.NONE)
        return gr.update(visible=on), gr.update(visible=on), gr.update(visible=on)

    for c, s, e, p in u["rows"]:
        c.input(lambda kind: (H.default_scale(kind), H.default_end(kind)), c, [s, e], queue=False, **PRIVATE)
        c.change(row_visibility, c, [s, e, p], queue=False, show_progress="hidden", **PRIVATE)
        gr.on(
            [u["image"].change, c.change],
            preview,
            [u["image"], c, *canny],
            p,
            show_progress="minimal",
            trigger_mode="always_last",
            **PRIVATE,
        )
        gr.on(
            [u["canny_auto"].change, u["canny_low"].release, u["canny_high"].release],
            canny_preview,  # other rows keep theirs
            [u["image"], c, *canny],
            p,
            show_progress="minimal",
            trigger_mode="always_last",
            **PRIVATE,
        )

    def canny_sliders(auto):
        return gr.update(interactive=not auto), gr.update(interactive=not auto)

    u["canny_auto"].change(canny_sliders, u["canny_auto"], canny[1:], queue=False, **PRIVATE)

    def size_info(image, max_side, upscale):
        if image is None:
            return "", gr.update(value="", visible=False)
        try:
            return H.size_line(image, max_side, upscale), gr.update(value="", visible=False)
        except ValueError as e:
            return "", gr.update(value=f"⚠️ {e}", visible=True)

    gr.on(
        [u["image"].change, u["max_side"].release, u["upscale"].change],
        size_info,
        [u["image"], u["max_side"], u["upscale"]],
        [u["info"], u["err_image"]],
        show_progress="hidden",
        trigger_mode="always_last",
        **PRIVATE,
    )

    # -- settings from a PNG -----------------------------------------------------------------------
    def load_settings(path, image):
        skip = [gr.skip()] * len(settings_outputs(u))
        if not path:
            return [*skip, ""]
        try:
            s = H.settings_from_png(path, u["lora_dir"])
        except ValueError as e:
            return [*skip, f"⚠️ {e}"]
        values, note = settings_values(s, tier_values)
        text = f"Loaded the settings of {s.source}'s PNG; Randomize is off so the seed is kept."
        if note:
            text += f" Note: {note}."
        if image is None:
            text += " The photo is not stored in a PNG: upload it before Run."
        return [*values, text]

    u["settings_png"].upload(
        load_settings,
        [u["settings_png"], u["image"]],
        settings_outputs(u) + [u["settings_msg"]],
        show_progress="hidden",
        **PRIVATE,
    )

    def preview_plan(image, tier, precision, upscale, max_side, steps, compile, *kinds):
        size = (1024, 1024)
        if image is not None:
            try:
                w, h = H.input_size(image)
                size = H.fit_size(w, h, max_side=int(max_side))
            except (ValueError, OSError):
                return ""  # the image's own error is shown under it
        n = sum(k not in (None, "", H.NONE) for k in kinds)
        return plan_preview(engine, tier, precision, size, n, upscale, steps, compile)

    kinds = [c for c, _, _, _ in u["rows"]]
    preview_inputs = [u[n] for n in ("image", "tier", "precision", "upscale", "max_side", "steps", "compile")] + kinds
    gr.on(
        [demo.load, u["image"].change, u["tier"].change, u["precision"].change, u["upscale"].change]
        + [u["compile"].change, u["max_side"].release, u["steps"].release]
        + [c.change for c in kinds],
        preview_plan,
        preview_inputs,
        u["plan_preview"],
        show_progress="hidden",
        trigger_mode="always_last",
        **PRIVATE,
    )

    def refresh_tier(tier):  # the Auto label shows the free GPU memory of now
        return gr.update(choices=H.tier_choices(detect(), engine.sizes), value=tier)

    demo.load(refresh_tier, u["tier"], u["tier"], queue=False, **PRIVATE)
    loras.wire(u)
    demo.load(None, None, None, js=js, **PRIVATE)
