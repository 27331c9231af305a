"""Running jobs from the page and from the API: the Gradio handlers around engine.run.

Two doors, one GPU slot per engine (concurrency_id "gpu"; limit 1, or the pool's engines): the API's
`generate` returns (PNG, summary, seed) and raises gr.Error; the page's `run_page` is a generator that
polls a progress Tracker while the engine works in a thread and draws phase, step, ETA and previews on
the result, then the result, the history and the plan. It never raises: a failure is one message,
next to its field when it has one, and a cancel ends in a "Cancelled" state. Cancel sets the session's flag (armed when Run is
clicked), which engine.run polls between steps; a job still waiting in the queue is dropped from it.
"""

from __future__ import annotations

import asyncio
import logging
import time

import gradio as gr

from core.denoise.runtime import JobCancelled
from core.engine import OutOfMemory
from core.models import ModelUnavailableError

from . import handlers as H
from . import loras
from .plots import memory_figure
from .progress import Tracker, status_html

log = logging.getLogger(__name__)
USER_ERRORS = (ValueError, OutOfMemory, ModelUnavailableError)
POLL_S = 0.4


def _session(request) -> str | None:
    return getattr(request, "session_hash", None)


class Runner:
    """The handlers for one app. `ui` maps names to the page's components (outputs of run_page)."""

    def __init__(self, engine, flags: H.CancelFlags, out_dir, run_gpu, ui: dict):
        self.engine, self.flags, self.out_dir, self.run_gpu, self.ui = engine, flags, out_dir, run_gpu, ui

    def _job(self, values: list):
        image, prompt, *rest = values
        rows = [tuple(rest[i : i + 3]) for i in (0, 3, 6)]
        tier, upscale, seed, randomize, steps, guidance, max_side, canny_auto, low, high, fp8, precision = rest[9:21]
        lora_values = rest[21 : 21 + 2 * loras.ROWS]
        compile_choice = (rest[21 + 2 * loras.ROWS :] or ["auto"])[0]  # the last input (added last to the API)
        return H.build_job(
            image,
            prompt,
            rows,
            tier,
            upscale,
            seed,
            randomize,
            steps,
            guidance,
            max_side,
            None if canny_auto else (low, high),
            fp8_compute=fp8,
            precision=precision,
            loras=loras.specs(lora_values, self.ui.get("lora_dir")),
            compile=compile_choice,
        )

    def _save(self, job, result, started: float):
        path = H.save_result(result, self.out_dir, model=H.model_name(self.engine.spec))
        before = H.save_before(job, path)
        return path, before, H.summary_of(result, started, time.time(), path)

    # -- the API door -----------------------------------------------------------------------------
    async def generate(self, values: list, request=None, progress=None):
        try:  # decoding a large upload takes a while: off the event loop, like every slow step here
            job = await asyncio.to_thread(self._job, values)
        except ValueError as e:
            raise gr.Error(str(e), print_exception=False) from None
        key = _session(request)
        ev = self.flags.start(key)

        def on_progress(label: str, done: int, total: int) -> None:
            if progress is not None:
                progress((min(done, total), total), desc=label, unit="tiles" if ": tile" in label else "steps")

        started = time.time()
        try:
            result = await asyncio.to_thread(self.run_gpu, job, on_progress, ev.is_set)
        except asyncio.CancelledError:  # Gradio cancelled this event: stop the engine too
            ev.set()
            raise
        except JobCancelled:
            raise gr.Error("The job was cancelled.", print_exception=False) from None
        except USER_ERRORS as e:
            raise gr.Error(str(e), print_exception=False) from None
        finally:
            self.flags.finish(key, ev)
        path, _, summary = await asyncio.to_thread(self._save, job, result, started)
        return str(path), summary, job.seed

    # -- the page's door --------------------------------------------------------------------------
    def arm(self, request: gr.Request = None):
        """Run was clicked (not queued): arm the cancel flag, swap the buttons, say we wait."""
        self.flags.start(_session(request))
        u = self.ui
        return {
            u["run"]: gr.update(interactive=False),
            u["stop"]: gr.update(interactive=True),
            u["status"]: status_html("queued", "Waiting for the GPU…"),
        }

    def cancel(self, request: gr.Request = None):
        """Cancel while the job runs: the engine stops after the current step (the page's JS sends a
        job still in the queue to `drop` instead)."""
        ev = self.flags.current(_session(request))
        if ev is None or not getattr(ev, "started", False):
            return gr.skip()
        ev.set()
        return status_html("cancelling", "Cancelling: the job stops after the current step…")

    def drop(self, request: gr.Request = None):
        """Cancel while the job waits in the queue: Gradio removes it (cancels=), this says so."""
        ev = self.flags.current(_session(request))
        if ev is not None:
            ev.set()  # should it start after all, it ends at once
        return self._end("cancelled", "Cancelled before it started.")

    def _end(self, kind: str, text: str, field: str | None = None) -> dict:
        u = self.ui
        out = {
            u["status"]: status_html(kind, text),
            u["run"]: gr.update(interactive=True),
            u["stop"]: gr.update(interactive=False),
            u["live"]: gr.update(visible=False),
            u["slider"]: gr.update(visible=True),
        }
        if field is not None:
            out[u["status"]] = status_html(kind, f"Not started: see the message under {H.FIELD_LABELS[field]}.")
            out[u[f"err_{field}"]] = gr.update(value=f"⚠️ {text}", visible=True)
        return out

    async def run_page(self, values: list, history: list, request=None):
        """values: generate's inputs; history: the session's (a gr.State)."""
        u, key = self.ui, _session(request)
        ev = self.flags.current(key) or self.flags.start(key)
        ev.started = True  # from now on Cancel stops the engine rather than the queued event
        clear = {u[f"err_{f}"]: gr.update(value="", visible=False) for f in H.ERROR_FIELDS}
        try:
            if ev.is_set():
                yield {**clear, **self._end("cancelled", "Cancelled before it started.")}
                return
            try:
                job = await asyncio.to_thread(self._job, list(values))
                plan = await asyncio.to_thread(self.engine.plan, job)
            except ValueError as e:
                field = H.field_of(e)
                yield {**clear, **self._end("error", str(e), field)}
                return
            tracker = Tracker(job, plan.predicted_step_s, plan.upscale_tile)
            started = time.time()
            task = asyncio.ensure_future(asyncio.to_thread(self.run_gpu, job, tracker, ev.is_set))
            seen = 0
            first = {**clear, u["live"]: gr.update(visible=True, value=None), u["slider"]: gr.update(visible=False)}
            while True:
                done, _ = await asyncio.wait({task}, timeout=POLL_S)
                snap = tracker.snapshot()
                note = "Cancelling: stops after the current step…" if ev.is_set() else ""
                upd = {u["status"]: status_html("cancelling" if ev.is_set() else "running", note, snap)}
                if snap.preview_version != seen:
                    seen = snap.preview_version
                    img = H.enlarge(tracker.latest_preview(), job.width, job.height)
                    # a preview before the first update must also make the (hidden) preview visible
                    upd[u["live"]] = gr.update(visible=True, value=img) if first else img
                if done:
                    break
                yield {**first, **upd}
                first = {}
            try:
                result = task.result()
            except JobCancelled:
                step = f" after step {snap.step[0]}/{snap.step[1]}" if snap.step else ""
                yield self._end("cancelled", f"Cancelled{step}; nothing was saved.")
                return
            except USER_ERRORS as e:
                yield self._end("error", str(e), H.field_of(e) if isinstance(e, ValueError) else None)
                return
            except Exception as e:  # the page says what failed; the log has the traceback
                log.exception("job failed")
                yield self._end("error", f"The job failed: {str(e).splitlines()[0][:200]}")
                return
            path, before, summary = await asyncio.to_thread(self._save, job, result, started)
        except asyncio.CancelledError:  # the page went away: stop the engine too
            ev.set()
            raise
        finally:
            self.flags.finish(key, ev)
        history = H.history_add(history, H.history_entry(path, before, summary, values[0]))
        yield {**self._end("done", H.done_line(summary)), **self._shown(job, path, before, summary, history)}

    def _shown(self, job, path, before, summary, history) -> dict:
        u = self.ui
        return {
            u["slider"]: gr.update(value=(str(before), str(path)), visible=True),
            u["png"]: gr.update(value=str(path), visible=True),
            u["summary"]: summary,
            u["seed"]: job.seed,
            u["plan"]: H.plan_markdown(summary),
            u["plot"]: memory_figure(summary),
            u["history"]: history,
            u["gallery"]: H.gallery_items(history),
        }
