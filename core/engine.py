"""Engine: a loaded pipeline placed on the device by a plan, running jobs one at a time.

Data flows one way: Job → Plan → placed pipeline → Result. An out-of-memory at any phase frees
memory, steps down to the next smaller plan and retries; the Result says what happened.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass, field, replace

import torch
from PIL import Image

from . import fast, fp8_compute, graphs
from .device import DeviceInfo, detect
from .generate import JobCancelled, PromptCache, Runtime, control_images, generate_pass
from .job import Job
from .lora import Merger, model_sources
from .memory import MemoryMonitor, free_memory, is_oom
from .models import ModelSpec, load_pipeline, union_net
from .plan import JobShape, Plan, keep_placement, plan_for, step_down
from .residency import Residency
from .sizes import sizes_from_pipeline
from .units import denoiser_units, text_encoder_units
from .upscale import upscale

log = logging.getLogger(__name__)


MODELS = ("transformer", "controlnet", "vae", "text_encoder", "text_encoder_2")  # the pipeline's placed parts


class OutOfMemory(RuntimeError):
    """Even the smallest plan ran out of memory; the message says what to do."""


@dataclass(frozen=True)
class Result:
    image: Image.Image
    job: Job
    plan: Plan
    report: dict  # memory monitor: peaks, seconds per phase, timeline
    events: tuple[str, ...]  # what the engine did that a user should know
    controls: tuple[Image.Image, ...] = field(default=(), repr=False)
    demo: bool = False

    def summary(self) -> dict:
        s = dict(
            size=list(self.image.size),
            tier=self.plan.tier,
            demo=self.demo,
            predicted_peak_gb=self.plan.predicted_peak_gb,
            measured_peak_reserved_gb=self.report["peak_reserved_gb"],
            seconds=self.report["seconds"],
            events=list(self.events),
            plan=self.plan.summary(),
            fast=self.report.get("fast"),
        )
        if self.demo:
            s["note"] = "demo model with random weights: the image is noise"
        return s

    def png_params(self) -> dict:
        """What the PNG's metadata holds: every parameter of the job and the plan."""
        return dict(job=self.job.describe(), plan=self.plan.summary(), demo=self.demo)


class Faults:
    """Test hook: raise an out-of-memory at the start of the named phases, `count` times each."""

    def __init__(self, **counts: int):
        self.counts = dict(counts)

    def _take(self, name: str) -> bool:
        if self.counts.get(name, 0) > 0:
            self.counts[name] -= 1
            return True
        return False

    def check(self, phase: str) -> None:
        if self._take(phase):
            raise torch.OutOfMemoryError(f"CUDA out of memory (injected in {phase})")

    def black(self) -> bool:
        """Injected precision fault: the next result comes out black."""
        return self._take("black")


def is_black_or_nan(image: Image.Image) -> bool:
    """NaN latents decode to black; a result with (almost) no signal is a precision fault."""
    import numpy as np

    a = np.asarray(image)
    return bool(a.max() <= 3)


def _shape(job: Job) -> JobShape:
    return JobShape(job.width, job.height, len(job.controls), job.upscale)


def _placement_key(plan: Plan) -> tuple:
    """What moving the weights depends on; plans that agree on it share one placement."""
    return plan.device, plan.dtype, plan.placement, plan.slots, plan.ring, plan.text_encoders


class Engine:
    def __init__(
        self, spec: ModelSpec | None = None, device: DeviceInfo | None = None, pipe=None, max_seq: int | None = None
    ):
        self.spec = spec or ModelSpec.demo_spec()
        self.device = device or detect()
        self.pipe, self.img2img = pipe, None
        self.max_seq = max_seq
        self.sizes = None
        self.cache = PromptCache()
        self.residency: Residency | None = None
        self._placed: Plan | None = None  # the plan whose placement is on the device now
        self._lock = threading.Lock()
        self.faults = Faults()
        self._owns_pipe = pipe is None  # a pipeline we loaded can be reloaded from its source
        # all-resident plans: fused QKV, compiled blocks, attention kernel (core/fast.py). On ZeroGPU
        # a call may run in a fresh process, where compiling would be paid by every job.
        self.fast = fast.FastConfig(compile=not os.environ.get("SPACES_ZERO_GPU"))
        self._fast: fast.Fast | None = None  # what is applied now
        self._fast_dirty = False  # modules may differ from diffusers' (even half-way)
        self._fast_want: tuple | None = None  # what _fast was applied for
        self._lora: Merger | None = None  # the LoRAs merged into the pipeline's CPU weights
        if pipe is not None:
            self._init_pipe(pipe)

    @property
    def demo(self) -> bool:
        return self.spec.demo

    @property
    def busy(self) -> bool:
        """A job is running (jobs run one at a time)."""
        return self._lock.locked()

    # -- loading and placement ----------------------------------------------------------------
    def _init_pipe(self, pipe) -> None:
        from diffusers import FluxControlNetImg2ImgPipeline

        self.pipe = pipe
        names = (
            "scheduler",
            "vae",
            "text_encoder",
            "tokenizer",
            "text_encoder_2",
            "tokenizer_2",
            "transformer",
            "controlnet",
        )
        self.img2img = FluxControlNetImg2ImgPipeline(**{n: getattr(pipe, n) for n in names})
        self.img2img.set_progress_bar_config(disable=True)
        if self.max_seq is None:
            self.max_seq = min(512, pipe.tokenizer_2.model_max_length)
        self.sizes = sizes_from_pipeline(pipe, self.max_seq)

    def load(self) -> None:
        if self.pipe is None:
            if self.device.kind == "cuda":
                dtype = torch.bfloat16 if self.device.bf16 else torch.float32
            else:  # the tiny demo model computes in fp32 on the CPU; the real one in bf16 (RAM)
                dtype = torch.float32 if self.spec.demo else torch.bfloat16
            self._init_pipe(load_pipeline(self.spec, dtype))

    def plan(self, job: Job, tier: str | None = None) -> Plan:
        return self._plan(job, tier)

    def _plan(self, job: Job, tier: str | None = None, dtype: str | None = None) -> Plan:
        self.load()
        shape = _shape(job)
        new = plan_for(tier or job.tier, shape, self.sizes, self.device, dtype=dtype)
        return keep_placement(self._placed, new, shape, self.sizes, self.device)

    def check_fits(self, plan: Plan) -> None:
        """A tier the machine cannot hold is refused before anything moves."""
        if plan.device == "cuda" and self.device.kind != "cuda":
            raise ValueError(f"No CUDA GPU was found, so the {plan.tier} GB tier cannot run; choose 'auto' or 'cpu'.")
        if plan.device == "cuda":
            held = (self.residency.gpu_bytes / 2**30) if self.residency else 0.0
            if self._fast is not None and self._fast.fp8:  # fp8 weights are buffers, not parameters
                held += sum(fp8_compute.fp8_bytes(m) for m in fast.denoisers(self.pipe)) / 2**30
            free = torch.cuda.mem_get_info()[0] / 2**30 + held
            if plan.budget_gb > free + 0.25 and plan.tier != "auto":
                raise ValueError(
                    f"The {plan.tier} GB tier needs {plan.budget_gb:.1f} GiB of free GPU memory; "
                    f"this GPU has {free:.1f} GiB free. Choose 'auto' or a smaller tier."
                )

    def _undo(self) -> None:
        self._undo_fast()
        if self.residency is not None:
            self.residency.remove()
            self.residency = None
        for name in MODELS:
            getattr(self.pipe, name).to("cpu")
        self._placed = None
        free_memory()

    def apply(self, plan: Plan, loras: tuple = ()) -> None:
        """Place the pipeline as the plan says, with `loras` merged (a no-op if it already is)."""
        pipe = self.pipe
        key_changed = self._placed is None or _placement_key(plan) != _placement_key(self._placed)
        if key_changed or not self._loras_merged(loras):
            t5_code = "B" if plan.text_encoders == "gpu" else "S"
            full = t5_code * len(text_encoder_units(pipe.text_encoder_2)) + plan.placement
            old = self.residency.placement if self.residency else ""
            # fp8 storage rounds weights; a unit going back to bf16 must come from the source again
            lossy = any(o in "FQ" and n in "BS" for o, n in zip(old, full))
            self._undo()
            if lossy and self._owns_pipe:
                log.info("reloading the weights: the previous plan stored some in fp8")
                pipe = self.pipe = self.img2img = self._lora = None  # every reference: the old weights go first
                free_memory()
                self.load()
                pipe = self.pipe
            elif lossy:
                log.warning("units return to bf16 from fp8-rounded weights (pipeline given by the caller)")
            self._apply_loras(loras)  # into the CPU weights: every placement packs the merged ones
            dtype = getattr(torch, plan.dtype)
            if pipe.transformer.dtype != dtype:
                from diffusers.utils import logging as dlogging

                level = dlogging.get_verbosity()
                dlogging.set_verbosity_error()  # "modules that should be kept in float32: []"
                for name in MODELS:
                    getattr(pipe, name).to(dtype)
                dlogging.set_verbosity(level)
            if plan.device == "cuda":
                dev = torch.device("cuda")
                for model in (pipe.transformer, union_net(pipe)):
                    for name, child in model.named_children():
                        if name not in ("transformer_blocks", "single_transformer_blocks"):
                            child.to(dev)
                pipe.vae.to(dev)
                pipe.text_encoder.to(dev)  # CLIP-L: 0.25 GB, always resident
                t5 = pipe.text_encoder_2
                t5_units = text_encoder_units(t5)
                in_units = {id(p) for _, m in t5_units for p in m.parameters()}
                for p in t5.parameters():  # embedding, norms, position bias: resident
                    if id(p) not in in_units:
                        p.data = p.data.to(dev)
                units = t5_units + denoiser_units(pipe.transformer, union_net(pipe))
                self.residency = Residency(units, full, dev, dtype, plan.slots, plan.ring)
                free_memory()
            self._placed = plan
        if plan.vae_tiling:
            pipe.vae.enable_tiling()
            pipe.vae.tile_sample_min_size, pipe.vae.tile_latent_min_size = 512, 64
        else:
            pipe.vae.disable_tiling()

    # -- running ------------------------------------------------------------------------------
    def run(self, job: Job, progress=None, cancel=None, source: Image.Image | None = None) -> Result:
        """Run a job to its final image, stepping down on out-of-memory."""
        with self._lock:
            plan = self.plan(job)
            self.check_fits(plan)
            events: list[str] = []
            while True:
                err = None
                try:
                    mon = MemoryMonitor(plan.device, hook=self.faults.check)
                    result = self._run_once(job, plan, mon, events, progress, cancel, source)
                    if not is_black_or_nan(result.image):
                        return result
                    if plan.dtype == "float32":
                        events.append("the result is black even in float32: check the model weights")
                        return replace(result, events=tuple(events))
                    events.append(f"the result was black (NaN) in {plan.dtype}: rerun in float32")
                    log.warning(events[-1])
                    plan = self._plan(job, dtype="float32")
                    continue
                except JobCancelled:
                    free_memory()
                    raise
                except Exception as e:
                    if not is_oom(e) and self._fast_failed(e, events):
                        continue
                    if not is_oom(e):
                        free_memory()
                        raise
                    where = mon.phases[-1].name if mon.phases else "?"
                    err = f"in {where}: " + str(e).split("\n")[0][:100]
                # outside the except block, so the traceback's tensors can be freed
                free_memory()
                nxt = step_down(plan, _shape(job), self.sizes, self.device)
                if nxt is None and plan.device == "cpu":
                    raise OutOfMemory(
                        "Out of memory on the CPU even with the smallest tiles; close other "
                        "programs or lower the size or upscale factor."
                    )
                if nxt is None:
                    raise OutOfMemory(
                        "Out of GPU memory even with the smallest plan; close other programs "
                        "using the GPU, lower the size or upscale factor, or choose the CPU tier."
                    )
                events.append(
                    f"out of memory ({err}) with the {plan.tier} plan (tile {plan.tile}): "
                    f"stepped down to the {nxt.tier} plan (tile {nxt.tile}) and retried"
                )
                log.warning(events[-1])
                plan = nxt

    def _run_once(self, job, plan, mon, events, progress, cancel, source) -> Result:
        with mon.phase("load"):
            self.apply(plan, job.loras)
            speed = self._apply_fast(job, plan, events, progress)
        compiled_before = fast.compile_seconds()
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
        )
        image = job.image.resize((job.width, job.height), Image.LANCZOS)
        # the depth model (~0.1 GB) runs on the GPU only where the plan leaves room
        depth_device = "cuda" if plan.device == "cuda" and plan.budget_gb >= 40 else "cpu"
        with mon.phase("preprocess"):
            controls = control_images(job, image, self.demo, depth_device)
        if not self.demo and any(c.kind == "depth" for c in job.controls):
            from preprocessors.depth import depth_model_is_demo

            if depth_model_is_demo(device=depth_device):
                events.append(
                    "Depth Anything could not be loaded (offline?): the depth control came from a "
                    "random demo model; download depth-anything/Depth-Anything-V2-Small-hf"
                )
        out = generate_pass(job, image, controls, rt, mon, events, self.cache)
        if job.upscale > 1:
            out = upscale(
                job, source or job.image, out, rt, self.img2img, mon, events, self.cache, self.demo, depth_device
            )
        if self.faults.black():
            out = Image.new("RGB", out.size)
        if speed is not None and speed.cuda_graphs:
            for name, m in fast.graphed_models(self.pipe).items():
                gc = graphs.installed(m)
                msg = (
                    gc
                    and gc.disabled
                    and f"CUDA graphs off for the {name} (capture failed: {gc.disabled}): ran it without"
                )
                if msg and msg not in events:
                    events.append(msg)
        report = mon.report()
        if speed is not None:
            compile_s = round(max(0.0, fast.compile_seconds() - compiled_before), 1)
            report["fast"] = dict(speed.describe(), compile_s=compile_s)
            if compile_s >= 0.5:
                events.append(
                    f"compiled the denoiser blocks in {compile_s:.0f} s (once per process, dtype and "
                    f"image size; included in the denoise time)"
                )
        return Result(out, job, plan, report, tuple(events), tuple(controls), self.demo)

    # -- LoRAs (core/lora.py): merged into the CPU weights while nothing is placed -----------------
    def _merger(self) -> Merger:
        pipe = self.pipe
        if self._lora is None or self._lora.models["transformer"] is not pipe.transformer:  # new or reloaded
            spec = self.spec  # a caller's pipeline may not be the spec's: restore from copies then
            sources = model_sources(spec.base, spec.controlnet, spec.transformer) if self._owns_pipe else {}
            self._lora = Merger(dict(transformer=pipe.transformer, controlnet=union_net(pipe)), sources)
        return self._lora

    def _loras_merged(self, loras) -> bool:
        """`loras` are what the pipeline holds merged. False: they will be, and they were read and
        checked here, so a LoRA that cannot be merged raises before anything moves."""
        loras, m = tuple(loras), self._lora
        fresh = m is None or m.models["transformer"] is not self.pipe.transformer  # nothing merged yet
        if (() if fresh else m.loras) == loras:
            return True
        self._merger().prepare(loras)
        return False

    def _apply_loras(self, loras) -> frozenset[str]:
        """Merge exactly `loras` (unmerging the previous ones exactly); call with nothing placed.
        Returns the names of the parameters whose weights changed."""
        changed = self._merger().set(loras)
        log.info("LoRAs %s: %d parameters changed", [s.name for s in loras] or "none", len(changed))
        return changed

    # -- the fast path (core/fast.py): only while the whole denoiser is resident ------------------
    def _apply_fast(self, job: Job, plan: Plan, events: list[str], progress=None) -> fast.Fast | None:
        use_fp8, why = fast.fp8_decision(plan, self.fast, job.fp8_compute)
        if why:
            events.append(why)
        cfg = self.fast
        if not fast.eligible(plan, cfg):
            self._undo_fast()
            return None
        compile_ = cfg.compile and fast.can_compile(cfg.backend, plan.device)
        if cfg.compile and not compile_:
            events.append("torch.compile needs Triton on the GPU (pip install triton): ran without compiling")
        want = (use_fp8, compile_, cfg)
        if want != self._fast_want:  # walking the modules costs ~70 ms: once
            before, self._fast_dirty = self._fast, True
            self._fast = fast.apply_fast(self.pipe, fp8=use_fp8, compile=compile_, cfg=cfg)
            self._fast_want = want
            if progress is not None and compile_ and self._fast != before:
                progress("compiling for this GPU (first job only)", 0, job.steps)
        if use_fp8:
            events.append(f"fp8 compute: {self._fast.fp8_layers} block matmuls in fp8 (row-wise scales)")
        return self._fast

    def _undo_fast(self) -> None:
        """Plain diffusers modules again (exactly): Residency hooks the children of the blocks."""
        if self._fast_dirty:
            fast.undo_fast(self.pipe)
            self._fast, self._fast_want, self._fast_dirty = None, None, False

    def _fast_failed(self, err: Exception, events: list[str]) -> bool:
        """An error from the fast path (a torch.compile error, or a kernel this GPU refuses): note it,
        run this job (and the next ones) without that part of it. False: not ours, raise it."""
        if self._fast is None or isinstance(err, ValueError) or not isinstance(err, RuntimeError):
            return False
        what = str(err).strip().split("\n")[0][:120]
        if self._fast.compiled and fast.is_compile_error(err):
            events.append(f"torch.compile failed ({what}): ran without compiling")
            self.fast = replace(self.fast, compile=False)
        else:
            events.append(f"the fast path failed ({what}): ran without it")
            self.fast = replace(self.fast, enabled=False)
        log.warning(events[-1])
        return True
