"""Engine: a pipeline placed on the device by a plan, running jobs one at a time.

Data flows one way: Job → Plan → placed pipeline (core.placed) → Result (core.result). A failed
attempt (out of GPU or host memory, a black result, a fast-path error) is followed by the attempt
core.attempts.next_attempt chooses, from a clean device; the Result says what happened. What a GPU
failure showed of the card (core.attempts.DeviceLimit) keeps later attempts and jobs under it.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import replace

import torch
from PIL import Image

from core.attempts import DeviceLimit, Failure, Retry, learned_limit, limit_holds, next_attempt, within
from core.denoise.generate import control_images, generate_pass
from core.denoise.runtime import AS_PLACED, JobCancelled, PromptCache, Runtime
from core.denoise.upscale import upscale
from core.device import DeviceInfo, detect
from core.faults import Faults
from core.job import Job
from core.models import ModelSpec, has_mode_ids
from core.monitor import MemoryMonitor, faults_active, free_memory, is_host_oom, is_oom
from core.placed import PlacedPipeline, direct_read, read_onto, without_failed_part
from core.plan.planner import JobShape, Plan, keep_placement, plan_for, step_down
from core.plan.sizes import sizes_from_folders
from core.result import Result, is_black_or_nan
from core.speed import compile_cache, compile_policy, fast, graphs

log = logging.getLogger(__name__)

__all__ = ["Engine", "Faults", "OutOfMemory", "Result", "is_black_or_nan"]


class OutOfMemory(RuntimeError):
    """Even the smallest plan ran out of memory; the message says what to do."""


def shape_of(job: Job) -> JobShape:
    return JobShape(job.width, job.height, len(job.controls), job.upscale, job.steps, job.upscale_steps)


class Engine:
    def __init__(
        self,
        spec: ModelSpec | None = None,
        device: DeviceInfo | None = None,
        pipe=None,
        max_seq: int | None = None,
        fast_config: fast.FastConfig | None = None,
        as_placed: bool = False,
    ):
        """`as_placed`: run `pipe` where its caller keeps its modules (a training run validating the
        modules it trains, core.placed.PlacedPipeline); the caller's plan holds the memory."""
        self.spec = spec or ModelSpec.demo_spec()
        self.device = device or detect()
        self.state = PlacedPipeline(self.spec, self.device, pipe, max_seq, as_placed)
        self.cache = PromptCache()
        self._lock = threading.Lock()
        self.faults = Faults()
        # all-resident plans: fused QKV, compiled blocks, attention kernel (core.speed). A long-lived
        # engine compiles from its second fast job ("later": the first image does not wait for it);
        # on ZeroGPU a call may run in a fresh process, where every job would pay the compile. `fast`
        # is the caller's setting; what failed in this process is taken out of it in `fast_in_use`.
        self.fast = fast_config or fast.FastConfig(compile="off" if os.environ.get("SPACES_ZERO_GPU") else "later")
        self._fast_failed: fast.FastConfig | None = None  # `fast` less what failed, while `fast` is unchanged
        self._fast_failed_for: fast.FastConfig | None = None
        self.fast_jobs = 0  # jobs that ran to their image on the fast path (compile_policy counts them)
        self.limit: DeviceLimit | None = None  # what the GPU gave when a plan last failed far under its budget

    # -- views of the placed pipeline -----------------------------------------------------------
    @property
    def demo(self) -> bool:
        return self.spec.demo

    @property
    def busy(self) -> bool:
        """A job is running (jobs run one at a time)."""
        return self._lock.locked()

    @property
    def pipe(self):
        return self.state.pipe

    @property
    def img2img(self):
        return self.state.img2img

    @property
    def sizes(self):
        return self.state.sizes

    @property
    def max_seq(self) -> int | None:
        return self.state.max_seq

    @property
    def residency(self):
        return self.state.residency

    @property
    def fast_in_use(self) -> fast.FastConfig:
        """The fast path as configured, less what failed in this process (for the same config)."""
        if self._fast_failed is not None and self._fast_failed_for == self.fast:
            return self._fast_failed
        return self.fast

    # -- planning and placing -------------------------------------------------------------------
    def load(self) -> None:
        self.state.load()

    def plan(self, job: Job, tier: str | None = None, dtype: str | None = None) -> Plan:
        """The plan this job runs under (a placement already on the GPU is kept where it serves);
        `dtype` forces the compute dtype (float32 after a black result)."""
        self.load()
        shape = shape_of(job)
        new = plan_for(
            tier or job.tier,
            shape,
            self.sizes,
            self.device,
            dtype=dtype,
            precision=self.precision(job),
            **self.compile_args(job.compile),
        )
        return keep_placement(self.state.placed, new, shape, self.sizes, self.device)

    def compile_args(self, choice: str = "auto") -> dict:
        """plan_for's compile arguments for a first job of this process with this compile choice
        (Job.compile): the plan's predicted_first_job_s counts the compile where that job would pay it."""
        cfg = self.fast_in_use
        compiles = cfg.enabled and "cuda" in cfg.devices and compile_policy.compiles(cfg.compile, choice, 0)
        return dict(compiles=compiles, compile_cache=compile_cache.state(cfg.precompile) if compiles else "cold")

    def precision(self, job: Job) -> str:
        """The precision the job runs at (PlacedPipeline.precision)."""
        return self.state.precision(job.precision)

    def check_fits(self, plan: Plan) -> None:
        """A tier the machine cannot hold is refused before anything moves."""
        if plan.device == "cuda" and self.device.kind != "cuda":
            raise ValueError(f"No CUDA GPU was found, so the {plan.tier} GB tier cannot run; choose 'auto' or 'cpu'.")
        if plan.device == "cuda" and not self.state.as_placed:
            free = torch.cuda.mem_get_info()[0] / 2**30 + self.state.held_gb()
            if plan.budget_gb > free + 0.25 and plan.tier != "auto":
                raise ValueError(
                    f"The {plan.tier} GB tier needs {plan.budget_gb:.1f} GiB of free GPU memory; "
                    f"this GPU has {free:.1f} GiB free. Choose 'auto' or a smaller tier."
                )

    def apply(self, plan: Plan) -> None:
        """Place the pipeline as the plan says (a no-op if it already is)."""
        self.state.place(plan)

    def release(self) -> None:
        """Everything back on the CPU and every device buffer freed (the next job places again)."""
        self.state.release()

    # -- running ------------------------------------------------------------------------------
    def run(self, job: Job, progress=None, cancel=None, source: Image.Image | None = None) -> Result:
        """Run a job to its final image; failed attempts are followed as core.attempts says."""
        with self._lock:
            self.load_for(job.tier, shape_of(job), job.precision, job.compile, job.loras)
            plan = self.plan(job)
            self.check_fits(plan)
            events: list[str] = []
            plan = self._within_limit(plan, job, events)
            while True:
                visible = self._visible_gb(plan)
                mon = MemoryMonitor(plan.device, hook=self.faults.check)
                result = None
                try:
                    with faults_active(self.faults.check):
                        result = self._attempt(job, plan, mon, events, progress, cancel, source)
                    if not is_black_or_nan(result.image):
                        return self._done(result)
                    failure = Failure("black")
                except JobCancelled:
                    free_memory()
                    raise
                except Exception as e:
                    failure = self._classify(e, mon)
                    if failure is None:
                        free_memory()
                        raise
                # outside the except block, so the traceback's tensors can be freed
                if (limit := learned_limit(plan, failure, mon.peak_reserved_gb, visible)) is not None:
                    self.limit = limit
                if failure.cause in ("gpu", "host"):
                    self.state.release()  # the next attempt starts from a clean device
                else:
                    free_memory()
                decision = next_attempt(
                    failure,
                    plan,
                    smaller=lambda p: self._smaller(p, job),
                    less_host=lambda p: self._less_host(job, p),
                    in_float32=lambda: self.plan(job, dtype="float32"),
                )
                if isinstance(decision, str):
                    if failure.cause == "black":
                        events.append(decision)
                        return self._done(replace(result, events=tuple(events)))
                    raise OutOfMemory(decision)
                assert isinstance(decision, Retry)
                events.append(decision.event)
                log.warning(decision.event)
                plan = decision.plan

    def load_for(
        self, tier: str, shape: JobShape, precision: str = "auto", compile_choice: str = "auto", loras: tuple = ()
    ) -> None:
        """Read the weights for a first job of this tier and shape where its plan keeps them (with
        direct_read() on): a plan that keeps every weight on the GPU as stored has them read straight
        there (one pass over the files, no copy in host RAM; core.placed.read_onto). That plan is made
        from the model's configs. Out of GPU memory while reading, they are read onto the CPU by the
        usual path, and the failure tells the engine what the GPU gives (core.attempts.DeviceLimit).
        Does nothing once they are read."""
        st = self.state
        if st.pipe is not None or st.as_placed or self.device.kind != "cuda" or not direct_read():
            return
        if loras or self.spec.transformer or self.spec.demo:
            return  # LoRAs merge into CPU weights, a transformer file is converted there
        try:
            sizes = sizes_from_folders(self.spec.base, self.spec.controlnet)
            plan = plan_for(tier, shape, sizes, self.device, precision=precision, **self.compile_args(compile_choice))
            self.check_fits(plan)
        except Exception as e:  # noqa: BLE001 - configs not at hand, a tier that does not fit: the usual path says it
            log.info("the weights are read onto the CPU (%s)", str(e).split("\n")[0][:120])
            return
        if read_onto(plan) != "cuda" or st.load_dtype() != torch.bfloat16:
            return
        visible, failed = self._visible_gb(plan), None
        try:
            st.load(onto="cuda")
        except Exception as e:
            if not is_oom(e):
                raise
            failed = Failure.of("gpu", "load", e)
        if failed is not None:  # outside the except block: what was read goes with the traceback
            st.pipe = None
            free_memory()
            peak = torch.cuda.max_memory_reserved() / 2**30
            self.limit = learned_limit(plan, failed, peak, visible) or self.limit
            log.warning(
                "out of GPU memory reading the weights onto the GPU (%s): reading them onto the CPU", failed.message
            )

    def _step_down(self, plan: Plan, job: Job) -> Plan | None:
        return step_down(plan, shape_of(job), self.sizes, self.device, self.precision(job))

    def _smaller(self, plan: Plan, job: Job) -> Plan | None:
        """The plan after a GPU failure of `plan`: the next smaller one, and smaller still while it is
        over what the GPU gave (a retry that would fail the same way is not made)."""
        nxt = self._step_down(plan, job)
        if nxt is not None and self.limit is not None:
            nxt = within(nxt, self.limit, lambda p: self._step_down(p, job))
        return nxt

    def _visible_gb(self, plan: Plan) -> float:
        """GPU memory the driver shows this process could have: free, plus what our allocator holds
        (so that our own cache does not move it)."""
        if plan.device != "cuda" or not torch.cuda.is_available():
            return 0.0
        return (torch.cuda.mem_get_info()[0] + torch.cuda.memory_reserved()) / 2**30

    def _within_limit(self, plan: Plan, job: Job, events: list[str]) -> Plan:
        """`plan`, or the largest smaller plan that fits in what the GPU gave when a plan last failed
        far under its budget (the limit is forgotten once the GPU shows more free memory)."""
        if plan.device != "cuda" or self.limit is None:
            return plan
        if not limit_holds(self.limit, self._visible_gb(plan)):
            log.info(
                "the GPU shows more free memory than when the %s plan failed: trying larger plans", self.limit.tier
            )
            self.limit = None
            return plan
        fitted = within(plan, self.limit, lambda p: self._step_down(p, job))
        if fitted is not plan:
            events.append(
                f"the {self.limit.tier} plan ran out of GPU memory earlier with {self.limit.usable_gb:.1f} GiB to "
                f"use: ran the {fitted.tier} plan (tile {fitted.tile}) without trying the {plan.tier} one; "
                "larger plans are tried again once the GPU shows more free memory"
            )
        return fitted

    def _done(self, result: Result) -> Result:
        if "fast" in result.report:
            self.fast_jobs += 1
        return result

    def _classify(self, err: Exception, mon: MemoryMonitor) -> Failure | None:
        where = mon.phases[-1].name if mon.phases else "?"
        if is_oom(err):
            return Failure.of("gpu", where, err)
        if is_host_oom(err):
            return Failure.of("host", where, err)
        degraded = without_failed_part(self.fast_in_use, self.state.fast, err)
        if degraded is None:
            return None
        self._fast_failed, self._fast_failed_for = degraded[0], self.fast
        return Failure("fast", where, degraded[1])

    def _less_host(self, job: Job, plan: Plan) -> Plan | None:
        """The same tier with less pinned host RAM than `plan` (fp8 or 4-bit instead of exact
        streamed weights, as the job's precision allows), or None where no such plan exists."""
        if plan.device != "cuda" or plan.host_ram_gb <= 0:
            return None
        try:
            nxt = plan_for(
                plan.tier,
                shape_of(job),
                self.sizes,
                self.device,
                dtype=plan.dtype,
                host_cap_gb=0.9 * plan.host_ram_gb,
                precision=self.precision(job),
            )
        except ValueError:
            return None
        return nxt if nxt.host_ram_gb < plan.host_ram_gb else None

    def _attempt(self, job, plan, mon, events, progress, cancel, source) -> Result:
        with mon.phase("load"):
            self.state.place(plan, job.loras)
            if self.state.last_repack:
                events.append("LoRAs changed: {} of {} units packed again in {} s".format(*self.state.last_repack))
            cfg = self.fast_in_use
            compile_ = compile_policy.compiles(cfg.compile, job.compile, self.fast_jobs)
            speed = self.state.apply_fast(cfg, job, plan, events, progress, compile_)
            if speed is not None and compile_policy.deferred(cfg.compile, job.compile, self.fast_jobs):
                events.append(compile_policy.DEFERRED)
        compiled_before = compile_policy.Counters.now()
        rt = Runtime(
            self.pipe,
            torch.device(plan.device),
            self.max_seq,
            plan.tile,
            plan.overlap,
            plan.upscale_tile,
            self.residency,
            progress,
            cancel,
            img2img=self.img2img,
            monitor=mon,
            events=events,
            cache=self.cache,
            demo=self.demo,
            depth_device=plan.depth_device,
            encoders=AS_PLACED if self.state.as_placed else plan.placement.formats()["t5"],
        )
        image = job.image.resize((job.width, job.height), Image.LANCZOS)
        with mon.phase("preprocess"):
            controls = control_images(job, image, self.demo, plan.depth_device)
        if not self.demo and any(c.kind == "depth" for c in job.controls):
            from preprocessors.depth import depth_model_is_demo

            if depth_model_is_demo(device=plan.depth_device):
                rt.note(
                    "Depth Anything could not be loaded (offline?): the depth control came from a "
                    "random demo model; download depth-anything/Depth-Anything-V2-Small-hf"
                )
        if not self.demo:  # pose and soft edge: the same sentence where a detector was random
            from preprocessors.registry import random_detector_notes

            for note in random_detector_notes([c.kind for c in job.controls], plan.depth_device):
                rt.note(note)
        if any(c.kind == "softedge" for c in job.controls) and has_mode_ids(self.pipe):
            rt.note(
                "soft edge ran as the canny mode (0): this Union ControlNet's card lists no soft-edge mode "
                "(Union-Pro-2.0 takes soft edge as it is)"
            )
        for c in controls:  # e.g. no person found for a pose control
            if c.info.get("note"):
                rt.note(c.info["note"])
        out = generate_pass(job, image, controls, rt)
        if job.upscale > 1:
            out = upscale(job, source or job.image, out, rt)
        if self.faults.black():
            out = Image.new("RGB", out.size)
        if speed is not None and speed.cuda_graphs:
            for name, m in fast.graphed_models(self.pipe).items():
                gc = graphs.installed(m)
                if gc and gc.disabled:
                    rt.note(f"CUDA graphs off for the {name} (capture failed: {gc.disabled}): ran it without")
        report = mon.report()
        if speed is not None:
            done = compile_policy.Counters.now() - compiled_before
            report["fast"] = dict(speed.describe(), compile_s=round(done.seconds, 1), compile_cache=done.cache)
            if speed.compiled and (event := compile_policy.compiled_event(done)):
                events.append(event)
        return Result(out, job, plan, report, tuple(events), tuple(controls), self.demo)
