"""Top speed when the whole denoiser is resident in the compute dtype on a CUDA GPU: fused QKV and the
attention kernel (core.speed.attention), regional compilation, and (opt-in) fp8 compute (the residency hooks the
children of the blocks, which fused or compiled blocks would hide). Every change has an exact
inverse (`undo_fast`), so the engine can return to a streamed plan without reloading.

- fused QKV: one matmul instead of three per attention input (q, k, v concatenated); the unfused
  Linears are set aside emptied, so that fusing costs no memory, and filled again exactly on undo.
- regional compilation: torch.compile on each repeated block (FluxTransformerBlock,
  FluxSingleTransformerBlock) of the transformer *and* the ControlNet, with a symbolic sequence
  length: blocks of one class share one graph (the ControlNet's text is one token longer), so this
  compiles two graphs, not 72, and a new image size compiles nothing; cached for the process and on
  disk (core.speed.compile_cache).
- attention: PyTorch picks its SDPA kernel itself ("sdpa"), or cuDNN / flash attention is forced per
  attention processor (not diffusers' global backend, so other pipelines in the process are untouched).
- fp8 compute (core.speed.fp8_compute): block Linears in fp8 with row-wise scales (user's choice: pixels change).
- fused blocks (core.speed.fused_blocks): GELU in the matmul epilogue, no concatenation before a single
  block's output projection.
- CUDA graphs (core.speed.graphs, opt-in): whole ControlNet and transformer calls replayed with one launch.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace

import torch
from torch import nn

from core.speed import fp8_compute, fused_blocks, graphs
from core.speed import precompile as precompiled
from core.speed.attention import attentions, fuse_qkv, resolve_attention, set_attention, unfuse_qkv
from core.speed.compile_cache import use_persistent_cache
from core.speed.compile_policy import CompilePolicy, as_policy
from core.speed.fp8_compute import dequantize_fp8, fp8_layers, quantize_fp8

log = logging.getLogger(__name__)

BLOCK_CLASSES = ("FluxTransformerBlock", "FluxSingleTransformerBlock")


# -- which modules --------------------------------------------------------------------------------
def denoisers(pipe) -> tuple[nn.Module, ...]:
    """The transformer and the ControlNet (the pipeline wraps it in a FluxMultiControlNetModel)."""
    cn = pipe.controlnet
    nets = tuple(getattr(cn, "nets", None) or (cn,))
    return (pipe.transformer,) + nets


def repeated_blocks(model: nn.Module) -> list[nn.Module]:
    """The blocks torch.compile compiles. FluxControlNetModel does not declare `_repeated_blocks`
    (diffusers' compile_repeated_blocks would refuse it), but its blocks are the same classes."""
    names = tuple(getattr(model, "_repeated_blocks", None) or BLOCK_CLASSES)
    return [m for m in model.modules() if type(m).__name__ in names]


# -- regional compilation -------------------------------------------------------------------------
def compile_blocks(
    model: nn.Module,
    *,
    backend: str = "inductor",
    mode: str | None = None,
    fullgraph: bool = True,
    dynamic: bool | None = True,
    options: tuple = (),
    precompile: bool = False,
) -> int:
    """torch.compile each repeated block in place (what nn.Module.compile does, plus _same_form);
    returns how many were newly compiled. Compilation happens on the first call. dynamic=True: the
    sequence length is symbolic, so the ControlNet (one extra mode token) and the transformer share
    one graph per block class, and a new image size does not recompile. options: Inductor settings
    as (name, value) pairs (torch.compile takes them or a mode, not both). precompile: each block runs
    through an ahead-of-time artifact loaded from the cache root (core.speed.precompile), compiled and
    saved by the first process, with torch.compile's path behind it (Inductor, default options only)."""
    _raise_recompile_limit()
    use_persistent_cache()
    n, how = 0, dict(backend=backend, mode=mode, fullgraph=fullgraph, dynamic=dynamic, options=dict(options) or None)
    ahead = precompile and backend == "inductor" and mode is None and not options and dynamic is True
    ahead = ahead and precompiled.available()
    for block in repeated_blocks(model):
        if not is_compiled(block):
            call = functools.partial(_same_form, torch.compile(block._call_impl, **how))
            if ahead and precompiled.prepare(block):
                call = functools.partial(precompiled.call, block, call)
            block._compiled_call_impl = call
            n += 1
        elif ahead and "_precompile_signature" in block.__dict__:
            precompiled.prepare(block)  # its weights may have changed form (fp8, fused): a new key
    return n


def _same_form(compiled, *args, **kwargs):
    """Call a compiled block with its arguments in one form. Guards tell apart arguments that are the
    same to the block, and each difference is one more graph to compile (~10-20 s each at full size)
    and more of the recompile limit: the ControlNet passes no joint_attention_kwargs where the
    transformer passes {}; after the first single block the inputs are slices of one tensor (views
    that alias each other) unless a ControlNet residual was just added. Views are copied (≤ 25 MB,
    ~15 µs on an H100, ~1 ms per step), so every block of a class runs one graph."""
    if not kwargs.get("joint_attention_kwargs", True):
        del kwargs["joint_attention_kwargs"]
    for name in ("hidden_states", "encoder_hidden_states"):
        x = kwargs.get(name)
        if isinstance(x, torch.Tensor) and x._base is not None:
            kwargs[name] = x.clone(memory_format=torch.contiguous_format)
    return compiled(*args, **kwargs)


def _raise_recompile_limit(limit: int = 64) -> None:
    """Every dtype, fp8 on/off and attention kernel is a graph per block class; with fullgraph=True
    going past dynamo's limit (8) is an error, not a fallback."""
    cfg = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(cfg, name):
            setattr(cfg, name, max(getattr(cfg, name), limit))
            break


def uncompile_blocks(model: nn.Module) -> int:
    n = 0
    for block in repeated_blocks(model):
        if is_compiled(block):
            block._compiled_call_impl = None
            n += 1
    return n


def is_compiled(module: nn.Module) -> bool:
    return getattr(module, "_compiled_call_impl", None) is not None


def can_compile(backend: str, device: torch.device | str) -> bool:
    """Inductor on a GPU needs Triton."""
    if backend != "inductor" or torch.device(device).type != "cuda":
        return True
    try:
        from torch.utils._triton import has_triton

        return has_triton()
    except Exception:  # noqa: BLE001
        return False


def is_compile_error(err: BaseException) -> bool:
    try:
        from torch._dynamo.exc import TorchDynamoException
    except Exception:  # noqa: BLE001
        return False
    return isinstance(err, TorchDynamoException)


# -- all together ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class FastConfig:
    """How the engine runs all-resident plans. `compile`: when the blocks are compiled
    (core.speed.compile_policy; True and False read as "on" and "off"); `devices`: where the fast
    path applies (the CPU only in tests); `backend`: torch.compile's ("eager" in tests)."""

    enabled: bool = True
    compile: CompilePolicy = "on"
    attention: str = "auto"
    backend: str | Callable = "inductor"
    mode: str | None = None
    dynamic: bool | None = True
    options: tuple[tuple[str, object], ...] = ()
    fuse_blocks: bool = True  # core.speed.fused_blocks: GELU in the matmul, no concatenation before proj_out
    cuda_graphs: bool = False  # core.speed.graphs: replay whole denoiser calls (opt-in until measured at full size)
    precompile: bool = True  # core.speed.precompile: load compiled blocks saved by an earlier process
    devices: tuple[str, ...] = ("cuda",)

    def __post_init__(self):
        object.__setattr__(self, "compile", as_policy(self.compile))


@dataclass(frozen=True)
class Fast:
    """What apply_fast applied."""

    fused: bool
    compiled: bool
    fp8: bool
    attention: str
    fp8_layers: int = 0
    compiled_blocks: int = 0
    fused_blocks: bool = False
    cuda_graphs: bool = False

    def describe(self) -> dict:
        return asdict(self)

    def label(self) -> str:
        parts = (
            (["fused QKV"] if self.fused else [])
            + (["GELU in the matmul"] if self.fused_blocks else [])
            + (["compiled blocks"] if self.compiled else [])
        )
        parts.append({"cudnn": "cuDNN attention", "flash": "flash attention"}.get(self.attention, "SDPA attention"))
        if self.fp8:
            parts.append(f"fp8 compute ({self.fp8_layers} layers)")
        if self.cuda_graphs:
            parts.append("CUDA graphs")
        return ", ".join(parts)


def apply_fast(pipe, fp8: bool = False, compile: bool = True, cfg: FastConfig | None = None, **changes) -> Fast:
    """Bring the transformer and ControlNet of a resident pipeline to the state `cfg` (with `changes`
    to its fields) describes. Idempotent: every step looks at the modules, so a second call changes
    only what differs (fp8 on or off, the attention kernel); compiled blocks stay compiled and keep
    their cache. `compile`: whether the blocks are compiled (the engine decides it by cfg.compile)."""
    cfg = replace(cfg or FastConfig(), **changes)
    fuse = cfg.fuse_blocks
    models = denoisers(pipe)
    device = next(pipe.transformer.parameters()).device
    for m in models:  # fuse before quantizing: the fused Linears are the ones that take fp8
        fused = all(getattr(a, "fused_projections", False) for a in attentions(m))
        if not fp8 or not fused or fuse != fused_blocks.is_fused(m):
            dequantize_fp8(m)
        fuse_qkv(m)
        if fuse:
            fused_blocks.fuse_blocks(m)
        else:
            fused_blocks.unfuse_blocks(m)
        if fp8 and not fp8_layers(m):
            quantize_fp8(m)
    att = resolve_attention(cfg.attention, device)
    for m in models:
        set_attention(m, att)
        if compile:
            compile_blocks(
                m,
                backend=cfg.backend,
                mode=cfg.mode,
                dynamic=cfg.dynamic,
                options=cfg.options,
                precompile=cfg.precompile,
            )
        else:
            uncompile_blocks(m)
    calls = graphed_models(pipe)
    graphs.uninstall(calls)  # graphs point at the weights that may just have changed
    if cfg.cuda_graphs:
        graphs.install(calls)
    fused = all(getattr(a, "fused_projections", False) for m in models for a in attentions(m))
    return Fast(
        fused=fused,
        compiled=compile,
        fp8=fp8,
        attention=att,
        fused_blocks=fuse,
        cuda_graphs=cfg.cuda_graphs,
        fp8_layers=sum(fp8_layers(m) for m in models),
        compiled_blocks=sum(is_compiled(b) for m in models for b in repeated_blocks(m)),
    )


def graphed_models(pipe) -> dict[str, nn.Module]:
    """The models core.speed.graphs wraps: one graph per call of each."""
    return {"controlnet": pipe.controlnet, "transformer": pipe.transformer}


def undo_fast(pipe) -> None:
    """Back to the plain diffusers modules, bit for bit (the inverse of apply_fast)."""
    graphs.uninstall(graphed_models(pipe))
    for m in denoisers(pipe):
        uncompile_blocks(m)
        set_attention(m, "sdpa")
        dequantize_fp8(m)
        fused_blocks.unfuse_blocks(m)
        unfuse_qkv(m)


def eligible(plan, cfg: FastConfig) -> bool:
    """The fast path applies to plans that keep every denoiser unit resident in the compute dtype."""
    return cfg.enabled and plan.device in cfg.devices and plan.placement.all_resident


def fp8_decision(plan, cfg: FastConfig, wanted: bool) -> tuple[bool, str | None]:
    """(use fp8 compute, a sentence for the user when it was asked for but not used)."""
    if not wanted:
        return False, None
    if not eligible(plan, cfg):
        tier = f"{plan.tier} GB" if plan.tier.isdigit() else f"'{plan.tier}'"
        why = (
            "this job ran on the CPU"
            if plan.device == "cpu"
            else "the fast path is turned off"
            if not cfg.enabled
            else f"the {tier} plan streams part of the model"
        )
        return False, (
            f"fp8 compute was ignored: it applies only when the whole model is resident on a CUDA GPU "
            f"({why}; computed in {plan.dtype})"
        )
    if plan.dtype != "bfloat16":
        return False, f"fp8 compute was ignored: this job computes in {plan.dtype} for precision"
    cuda = plan.device == "cuda" and torch.cuda.is_available()
    if not fp8_compute.fp8_supported(torch.cuda.current_device() if cuda else 0):
        cap = "compute capability " + ".".join(map(str, torch.cuda.get_device_capability())) if cuda else "no fp8"
        return False, (
            f"fp8 compute was ignored: it needs fp8 matmuls (compute capability 8.9+: Ada, Hopper "
            f"or newer); this device has {cap}: ran in {plan.dtype}"
        )
    return True, None
