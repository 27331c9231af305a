"""The pipeline and what of it is on the device now: one object, placed by a plan, released whole.

`place(plan)` brings the weights where the plan says (a no-op when they already are), `release()`
puts everything back on the CPU and frees what any placement allocated or registered (GPU arenas,
copy ring, work slots, pinned host memory, hooks, the fast path's compiled blocks and graph
pools), so that after a release the process holds what a fresh start holds. The engine calls it
between failed attempts; benchmarks call it between tiers.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import replace

import torch

from core.checkpoints import QuantSource, deferred, materialize, retype_deferred
from core.device import DeviceInfo
from core.job import Job
from core.lora import Merger, model_sources
from core.models import ModelSpec, load_pipeline, union_net
from core.monitor import free_memory
from core.plan.placement import RESIDENT, needs_reload, rounded
from core.plan.planner import Plan
from core.plan.sizes import sizes_from_pipeline
from core.plan.units import denoiser_units, text_encoder_units
from core.speed import fast, fp8_compute
from core.stream.packs import file_backed, file_mappings
from core.stream.residency import Residency

log = logging.getLogger(__name__)

# Loading is not thread-safe: accelerate's init_empty_weights, which diffusers and transformers load
# under, patches nn.Module for the whole process, so two engines loading at once (core.pool) would
# build each other's modules on the meta device.
_LOADING = threading.Lock()
MODELS = ("transformer", "controlnet", "vae", "text_encoder", "text_encoder_2")  # the pipeline's placed parts


class PlacedPipeline:
    """The pipeline and where its weights are. `as_placed`: a caller's pipeline (a training run's)
    runs where the caller keeps its modules; placing only sets the VAE's tiling, releasing moves
    nothing, and the prompt is encoded where the text encoders are."""

    def __init__(
        self, spec: ModelSpec, device: DeviceInfo, pipe=None, max_seq: int | None = None, as_placed: bool = False
    ):
        if as_placed and pipe is None:
            raise ValueError("as_placed needs the caller's pipeline.")
        self.spec, self.device, self.as_placed = spec, device, as_placed
        self.pipe = self.img2img = self.sizes = None
        self.max_seq = max_seq
        self.residency: Residency | None = None
        self.stored = ""  # codes the CPU weights were last stored under: fp8-stored units stay rounded
        self.lora: Merger | None = None  # the LoRAs merged into the pipeline's CPU weights
        self.placed: Plan | None = None  # the plan whose placement is on the device now
        self.loaded_on = "cpu"  # where the weights were read to, while nothing has moved them since
        self.loaded_dtype = self.narrowest = None  # the dtype read, and the narrowest one cast to since
        self.owns_pipe = pipe is None  # a pipeline we loaded can be reloaded from its source
        self.q4_file = False  # the transformer is a Q4_0 GGUF (set when the pipeline is known)
        self.last_repack: tuple | None = None  # (units packed again, units, seconds) if the last place() did
        self.fast: fast.Fast | None = None  # what the fast path applied
        self._fast_want: tuple | None = None  # what `fast` was applied for
        self._fast_dirty = False  # modules may differ from diffusers' (even half-way)
        if pipe is not None:
            self._init_pipe(pipe)

    # -- loading --------------------------------------------------------------------------------
    def _init_pipe(self, pipe) -> None:
        from diffusers import FluxControlNetImg2ImgPipeline

        self.pipe = pipe
        self.loaded_dtype = self.narrowest = pipe.transformer.dtype
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
        # a Q4_0 GGUF transformer: its own 4-bit blocks are the most exact storage there is
        self.q4_file = any((s := deferred(p)) is not None and s.is_q4_0 for p in pipe.transformer.parameters())

    def load_dtype(self) -> torch.dtype:
        if self.device.kind == "cuda":
            return torch.bfloat16 if self.device.bf16 else torch.float32
        return torch.float32 if self.spec.demo else torch.bfloat16  # the tiny demo model: fp32 on the CPU

    def load(self, onto: str = "cpu") -> None:
        """Read the weights (once): onto the CPU, or straight onto the GPU (`onto="cuda"`) for a first
        plan that keeps every weight there as it is read (core.engine decides)."""
        with _LOADING:
            if self.pipe is None:
                self._init_pipe(load_pipeline(self.spec, self.load_dtype(), onto))
                self.loaded_on = onto

    def precision(self, asked: str) -> str:
        """The precision a job asking `asked` runs at: "auto" on a Q4_0 GGUF transformer is 4-bit (its
        own blocks, streamed as they are, beat widening them to bf16 or rounding them again to fp8).
        An fp8 file needs no rule here: "exact" allows fp8 stores, and the planner counts them as exact
        for the file's units (UnitSize.fp8_file: no premium for bf16, never streamed widened), while the
        ControlNet and T5 from the base keep the usual preference for bf16."""
        return "4bit" if asked == "auto" and self.q4_file else asked

    # -- what is held ---------------------------------------------------------------------------
    def held_gb(self) -> float:
        """GPU memory the current placement holds (weights and buffers), in GiB."""
        held = (self.residency.gpu_bytes / 2**30) if self.residency else 0.0
        if self.residency is None and self.loaded_on == "cuda":  # read onto the GPU, not placed yet
            tensors = [t for n in MODELS for m in (getattr(self.pipe, n),) for t in (*m.parameters(), *m.buffers())]
            held = sum(t.numel() * t.element_size() for t in tensors if t.is_cuda) / 2**30
        if self.fast is not None and self.fast.fp8:  # fp8 weights are buffers, not parameters
            held += sum(fp8_compute.fp8_bytes(m) for m in fast.denoisers(self.pipe)) / 2**30
        return held

    # -- placing and releasing ------------------------------------------------------------------
    def release(self) -> None:
        """Everything back on the CPU; every buffer, registration, hook and fast-path change undone.
        Needs no GPU memory: it runs right after the GPU ran out of it."""
        try:
            self.undo_fast()
        except torch.OutOfMemoryError:  # unfusing copies weights: do it on the CPU instead
            for name in MODELS:
                getattr(self.pipe, name).to("cpu")
            free_memory()
            self.undo_fast()
        if self.residency is not None:
            res, self.residency = self.residency, None
            res.remove()
        if self.pipe is not None and not self.as_placed:
            for name in MODELS:
                getattr(self.pipe, name).to("cpu")
            self.loaded_on = "cpu"
        self.placed = None
        free_memory()

    def place(self, plan: Plan, loras: tuple = ()) -> None:
        """Place the pipeline as the plan says, with `loras` merged (a no-op if it already is). A
        failure half-way releases what it placed before it propagates."""
        key = (plan.device, plan.placement)
        self.last_repack = None
        if self.as_placed:
            if loras:
                raise ValueError("LoRAs cannot be merged into a pipeline placed by its caller.")
            self._vae_tiling(plan)
            self.placed = plan
            return
        same = self.placed is not None and key == (self.placed.device, self.placed.placement)
        if not same or not self._loras_merged(loras):
            try:
                if not (same and self._repack_loras(tuple(loras))):
                    self._place(plan, loras)
            except BaseException:
                self.release()
                raise
            self.placed = plan
        self._vae_tiling(plan)

    def _vae_tiling(self, plan: Plan) -> None:
        vae = self.pipe.vae
        if plan.vae_tiling:
            vae.enable_tiling()
            vae.tile_sample_min_size, vae.tile_latent_min_size = plan.vae_tile_px, plan.vae_tile_px // 8
        else:
            vae.disable_tiling()

    def _place(self, plan: Plan, loras: tuple) -> None:
        pipe = self.pipe
        full = plan.placement.with_text_encoders(len(text_encoder_units(pipe.text_encoder_2)))
        old = self.stored  # not the residency's: a failed attempt released it, its rounding stays
        dtype = getattr(torch, plan.dtype)
        if not (self.placed is None and self.residency is None and self.loaded_on == read_onto(plan)):
            self.release()  # (weights read straight to where this plan keeps them stay there)
        narrowed = self.narrowest != self.loaded_dtype and _bits(dtype) > _bits(self.narrowest)
        if (needs_reload(old, full) or narrowed) and self.owns_pipe:
            log.info(
                "reloading the weights: a previous plan stored some in fp8 or 4-bit, or computed in %s", self.narrowest
            )
            self.pipe = self.img2img = self.lora = pipe = None  # every reference: the old weights go first
            free_memory()
            self.load()
            pipe, old = self.pipe, ""
        elif needs_reload(old, full) or narrowed:
            log.warning("weights return from a rounded storage or dtype (pipeline given by the caller)")
        self._apply_loras(loras, plan.device)  # into the CPU weights: every placement packs the merged ones
        retype_deferred(pipe.transformer, dtype)  # before .to(dtype), which would fill placeholders with NaN
        if pipe.transformer.dtype != dtype:
            if _bits(dtype) < _bits(self.narrowest):  # casting down rounds the weights: a wider plan reloads
                self.narrowest = dtype
            from diffusers.utils import logging as dlogging

            level = dlogging.get_verbosity()
            dlogging.set_verbosity_error()  # "modules that should be kept in float32: []"
            for name in MODELS:
                getattr(pipe, name).to(dtype)
            dlogging.set_verbosity(level)
        if plan.device != "cuda" and plan.placement.all_resident:
            materialize(pipe.transformer, "cpu", dtype)  # a GGUF's deferred weights, for good on the CPU
            return
        dev = torch.device(plan.device)  # the planner streams only on CUDA; tests stream on the CPU too
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
        p = plan.placement
        maps = file_mappings()  # file-backed weights are kept and given back: they are never rounded
        keep = [file_backed(m, maps) for _, m in units]
        rounds = "".join(RESIDENT.code if k else c for k, c in zip(keep, full))
        self.stored = rounded(old, rounds)  # before placing: a placement that fails half-way rounds too
        self.residency = Residency(units, full, dev, dtype, p.slots, p.ring, keep=keep)
        free_memory()

    # -- LoRAs (core.lora): merged into the CPU weights while nothing is placed -------------------
    def _merger(self) -> Merger:
        pipe = self.pipe
        if self.lora is None or self.lora.models["transformer"] is not pipe.transformer:  # new or reloaded
            spec = self.spec  # a caller's pipeline may not be the spec's: restore from copies then
            sources = model_sources(spec.base, spec.controlnet, spec.transformer) if self.owns_pipe else {}
            self.lora = Merger(dict(transformer=pipe.transformer, controlnet=union_net(pipe)), sources)
        return self.lora

    def _loras_merged(self, loras) -> bool:
        """`loras` are what the pipeline holds merged. False: they will be, and they were read and
        checked here, so a LoRA that cannot be merged raises before anything moves."""
        loras, m = tuple(loras), self.lora
        fresh = m is None or m.models["transformer"] is not self.pipe.transformer  # nothing merged yet
        if (() if fresh else m.loras) == loras:
            return True
        self._merger().prepare(loras)
        return False

    def _repack_loras(self, loras: tuple) -> bool:
        """Change the merged LoRAs with the placement kept: only the units whose weights the old or
        the new LoRAs touch change. A plain resident unit takes the new merge where it is, on the
        device; the others go back to the CPU, take it there (its deltas computed on the device) and
        are packed again into their places. A lossy (fp8, 4-bit) unit whose pack rounded its weights
        takes its exact weights from the model's files first. Touched weights outside the units (such
        as proj_out) are plain resident tensors: merged in place too. False, with nothing changed,
        where a lossy unit has nothing to be packed again from (a pipeline given by the caller)."""
        res = self.residency
        if res is None:
            return False
        merger = self._merger()
        names = {name for matches in merger.prepare(loras) for name, _, _ in matches} | set(merger.touched)
        units = [f"{n}." for n, _ in res.units]
        idx = sorted({i for name in names for i, u in enumerate(units) if name.startswith(u)})
        exact = {}
        for i in idx:
            if res.stores[i].lossy() and not res.keep[i]:
                w = self._source_weights(merger, i)
                if w is None:
                    return False
                exact[i] = w
        if not res.can_repack(idx, exact):
            return False
        t0 = time.perf_counter()
        self.undo_fast()  # fused or compiled blocks: plain modules again (apply_fast follows the place)
        here = [i for i in idx if res.in_place(i)]
        back = [i for i in idx if i not in here]
        for i in here:
            res.changed_in_place(i, [n.removeprefix(units[i]) for n in names if n.startswith(units[i])])
        res.take_back(back, exact)
        restored = {f"{units[i]}{local}" for i, w in exact.items() for local in w}
        try:
            self._apply_loras(loras, res.device, restored)
        finally:  # merged or not, every unit is placed again
            res.put_back(back)
        self.last_repack = (len(idx), len(units), round(time.perf_counter() - t0, 2))
        log.info(
            "LoRAs changed: %d of %d units packed again in %.2f s (%d changed in place, %d from the files)",
            *self.last_repack,
            len(here),
            len(exact),
        )
        return True

    def _source_weights(self, merger: Merger, i: int) -> dict[str, torch.Tensor] | None:
        """Unit i's exact weights by parameter name, read (memory-mapped) from its model's files;
        None where any of them is not there."""
        name, module = self.residency.units[i]
        target, _, prefix = name.partition(".")
        src = merger.sources.get(target)
        if src is None:
            return None
        out = {}
        for local, p in module.named_parameters():
            w = src(f"{prefix}.{local}")
            if w is None or w.shape != p.shape:
                return None
            out[local] = w
        return out

    def _apply_loras(self, loras, device=None, restored=frozenset()) -> frozenset[str]:
        """Merge exactly `loras` (unmerging the previous ones exactly), the deltas computed on
        `device` (the placement's); call with nothing placed, or from _repack_loras. Returns the
        names of the parameters whose weights changed."""
        if loras and any(isinstance(deferred(p), QuantSource) for p in self.pipe.transformer.parameters()):
            raise ValueError(
                "LoRAs cannot be merged into a GGUF transformer yet (its blocks stay quantized until placed); "
                "use a .safetensors transformer with LoRAs."
            )
        changed = self._merger().set(tuple(loras), device, restored)
        log.info("LoRAs %s: %d parameters changed", [s.name for s in loras] or "none", len(changed))
        return changed

    # -- the fast path (core.speed): only while the whole denoiser is resident --------------------
    def apply_fast(
        self, cfg: fast.FastConfig, job: Job, plan: Plan, events: list[str], progress=None, compile_: bool = True
    ):
        """Bring the modules to the fast path `cfg` allows for this plan, the blocks compiled if
        `compile_` (the engine's decision, core.speed.compile_policy); returns what is applied
        (None: plain diffusers modules; always for a pipeline placed by its caller, whose modules may
        be in training)."""
        if self.as_placed:
            return None
        use_fp8, why = fast.fp8_decision(plan, cfg, job.fp8_compute)
        if why:
            events.append(why)
        if not fast.eligible(plan, cfg):
            self.undo_fast()
            return None
        wanted, compile_ = compile_, compile_ and fast.can_compile(cfg.backend, plan.device)
        if wanted and not compile_:
            events.append("torch.compile needs Triton on the GPU (pip install triton): ran without compiling")
        want = (use_fp8, compile_, cfg)
        if want != self._fast_want:  # walking the modules costs ~70 ms: once
            before, self._fast_dirty = self.fast, True
            self.fast = fast.apply_fast(self.pipe, fp8=use_fp8, compile=compile_, cfg=cfg)
            self._fast_want = want
            if progress is not None and compile_ and self.fast != before:
                progress("compiling for this GPU (once per process)", 0, job.steps)
        if use_fp8:
            events.append(f"fp8 compute: {self.fast.fp8_layers} block matmuls in fp8 (row-wise scales)")
        return self.fast

    def undo_fast(self) -> None:
        """Plain diffusers modules again (exactly): Residency hooks the children of the blocks."""
        if self._fast_dirty:
            fast.undo_fast(self.pipe)
            self.fast, self._fast_want, self._fast_dirty = None, None, False


def _bits(dtype: torch.dtype) -> int:
    return torch.finfo(dtype).bits


def direct_read() -> bool:
    """Whether a first all-resident plan may read the weights straight onto the GPU (core.engine.Engine.load_for).
    Off until measured on a GPU (FLUX_ANYVRAM_DIRECT_READ=1 turns it on): the tier promise was
    measured with weights read onto the CPU and copied over."""
    return os.environ.get("FLUX_ANYVRAM_DIRECT_READ", "0").lower() in ("1", "true", "yes")


def read_onto(plan: Plan) -> str:
    """Where a first plan wants the weights read: "cuda" where it keeps every one of them on the GPU as
    it is stored (bf16, T5 included), so that nothing is copied twice; else "cpu", where placing
    packs, streams or converts them."""
    p = plan.placement
    on_gpu = plan.device == "cuda" and p.all_resident and p.text_encoders == "gpu" and plan.dtype == "bfloat16"
    return "cuda" if on_gpu else "cpu"


def without_failed_part(cfg: fast.FastConfig, applied: fast.Fast | None, err: BaseException):
    """(config for the next attempts, event) after an error from the fast path, or None when the
    error is not the fast path's (a ValueError is the user's; anything but a RuntimeError is a bug)."""
    if applied is None or isinstance(err, ValueError) or not isinstance(err, RuntimeError):
        return None
    what = str(err).strip().split("\n")[0][:120]
    if applied.compiled and fast.is_compile_error(err):
        return replace(cfg, compile="off"), f"torch.compile failed ({what}): ran without compiling"
    return replace(cfg, enabled=False), f"the fast path failed ({what}): ran without it"
