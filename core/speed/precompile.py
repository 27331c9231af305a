"""Compiled blocks that are loaded instead of compiled: torch.compile's ahead-of-time artifacts
(`torch.compile(...).aot_compile`), one per block form, kept under the app's cache root.

Why: with Inductor's on-disk caches serving every kernel, a process still spent 16.5 s in torch.compile
(H200, bench/first): Dynamo traces each graph again and AOTAutograd rebuilds it before the cached
kernels load. An artifact holds the traced graph with its kernels; loading it costs a few seconds.

One artifact serves every block of a class: the block is an argument, so its weights are inputs of
the graph, as in regional compilation. The artifact keeps the guards on tensors (dtype, device,
batch size, the symbolic sequence length) and on the global state (grad mode, ...). The guards on the
module and its Python objects cannot be saved; the key stands in for them: the torch and diffusers
versions, the GPU, the block's structure (every submodule's type, forward source, plain attributes,
parameter shapes and dtypes, attention processor and backend) and the dtypes of the inputs. A call
whose tensors fail the saved guards (another batch size, say) runs the block's torch.compile path
instead, and so does every block where saving or loading fails (the reason is logged once).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import inspect
import io
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

log = logging.getLogger(__name__)

FORM = ("hidden_states", "encoder_hidden_states", "temb", "image_rotary_emb")  # how the blocks are called
# guards an artifact keeps (the others cannot be serialized; the key covers what they checked)
KEPT_GUARDS = frozenset(
    {
        "TENSOR_MATCH",
        "SHAPE_ENV",
        "GLOBAL_STATE",
        "GRAD_MODE",
        "DEFAULT_DEVICE",
        "TORCH_FUNCTION_STATE",
        "DETERMINISTIC_ALGORITHMS",
    }
)
_PRIMITIVE = (bool, int, float, str, type(None))

_LOCK = threading.Lock()  # one compile or load at a time (Dynamo's state is process-wide)
_FUNCTIONS: dict[str, Callable | None] = {}  # key → loaded function (None: failed, use torch.compile)
_STATS = {"loaded": 0, "compiled": 0, "seconds": 0.0, "fallbacks": 0, "dynamo_seconds": 0.0}


@dataclass(frozen=True)
class Stats:
    """What this module has done in this process: artifacts loaded from disk, compiled (and saved),
    the seconds both took, and calls that ran torch.compile's path instead (running totals)."""

    loaded: int = 0
    compiled: int = 0
    seconds: float = 0.0
    fallbacks: int = 0
    dynamo_seconds: float = 0.0  # of `seconds`, what Dynamo's own metric counted too (compiling)


def stats() -> Stats:
    return Stats(**_STATS)


def _aot_enabled():
    """torch 2.11 offers torch.compile(...).aot_compile only with this flag set when the wrapper is made."""
    cfg = torch._dynamo.config
    return cfg.patch(enable_aot_compile=True) if hasattr(cfg, "enable_aot_compile") else contextlib.nullcontext()


@functools.lru_cache(maxsize=1)
def available() -> bool:
    """This torch can compile ahead of time and load the result (torch 2.11 and later)."""
    if not hasattr(torch.compiler, "load_compiled_function"):
        return False
    with _aot_enabled():
        return hasattr(torch.compile(_block_forward, fullgraph=True), "aot_compile")  # lazy: compiles nothing


def artifact_dir() -> Path:
    from core.speed.compile_cache import cache_dir

    return cache_dir() / "precompiled"


def has_artifacts() -> bool:
    """An earlier process saved artifacts this torch can load."""
    path = artifact_dir()
    return available() and path.is_dir() and any(path.glob("*.bin"))


# -- the key ----------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=512)
def _source_hash(fn) -> str:
    try:
        return hashlib.sha256(inspect.getsource(fn).encode()).hexdigest()[:16]
    except (OSError, TypeError):
        return getattr(fn, "__qualname__", repr(fn))


def _plain(obj) -> list:
    """An object's plain attributes (numbers, strings, flags): what Dynamo's constant guards checked."""
    out = []
    for k, v in sorted(vars(obj).items()):
        if isinstance(v, _PRIMITIVE) or (isinstance(v, tuple) and all(isinstance(x, _PRIMITIVE) for x in v)):
            out.append((k, v if not isinstance(v, float) else repr(v)))
    return out


def signature(block: nn.Module) -> str:
    """The block's structure, as a hash: two blocks with one signature trace to the same graph."""
    parts = []
    for name, m in block.named_modules():
        fwd = m.forward
        parts.append((name, type(m).__qualname__, _source_hash(getattr(fwd, "__func__", fwd)), _plain(m)))
        parts += [(name, p, tuple(t.shape), str(t.dtype), t.device.type, t.requires_grad) for p, t in _tensors(m)]
        proc = getattr(m, "processor", None)
        if proc is not None:
            parts.append((name, "processor", type(proc).__qualname__, _source_hash(type(proc).__call__), _plain(proc)))
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:24]


def _tensors(m: nn.Module):
    yield from m.named_parameters(recurse=False)
    yield from m.named_buffers(recurse=False)


@functools.lru_cache(maxsize=8)
def _environment(device: str) -> str:
    import diffusers

    dev = torch.device(device)
    gpu = f"{torch.cuda.get_device_name(dev)}:{torch.cuda.get_device_capability(dev)}" if dev.type == "cuda" else "cpu"
    return f"torch {torch.__version__}, diffusers {diffusers.__version__}, {gpu}, {device}"


def _inputs(args: tuple) -> tuple:
    """What the key holds of the inputs (cheap: it is taken on every call)."""
    out = [torch.is_grad_enabled()]
    for a in args:
        for t in a if isinstance(a, tuple) else (a,):
            out.append((t.dtype, t.device, t.dim(), t.requires_grad) if isinstance(t, torch.Tensor) else t)
    return tuple(out)


def key(block: nn.Module, args: tuple) -> str:
    """The artifact's name for this block called with these inputs (see the module's docstring)."""
    tag = _inputs(args)
    keys = block.__dict__.setdefault("_precompile_keys", {})
    if tag not in keys:
        sig = block.__dict__.get("_precompile_signature") or signature(block)
        text = repr((_environment(str(args[0].device)), type(block).__qualname__, sig, tag))
        keys[tag] = f"{type(block).__name__}-{hashlib.sha256(text.encode()).hexdigest()[:24]}"
    return keys[tag]


# -- compile, save, load ----------------------------------------------------------------------------
def _block_forward(block, hidden_states, encoder_hidden_states, temb, image_rotary_emb):
    """A block's own class forward: the function an artifact is traced from. Not `block(...)`, which
    would enter the compiled call this artifact stands behind."""
    return block.forward(
        hidden_states=hidden_states,
        encoder_hidden_states=encoder_hidden_states,
        temb=temb,
        image_rotary_emb=image_rotary_emb,
    )


def _fused_single_forward(block, hidden_states, encoder_hidden_states, temb, image_rotary_emb):
    """The same for a single block whose forward core.speed.fused_blocks replaced (called by its
    module-level name: the saved graph could not find a bound method set on the instance again)."""
    from core.speed.fused_blocks import single_block_forward

    return single_block_forward(
        block,
        hidden_states=hidden_states,
        encoder_hidden_states=encoder_hidden_states,
        temb=temb,
        image_rotary_emb=image_rotary_emb,
    )


def _traced(block: nn.Module) -> Callable | None:
    """The function an artifact of this block is traced from; None where the block's forward is one
    set on the instance that none of them runs."""
    own = block.__dict__.get("forward")
    if own is None:
        return _block_forward
    from core.speed.fused_blocks import single_block_forward

    return _fused_single_forward if getattr(own, "__func__", None) is single_block_forward else None


def _kept(guards) -> list[bool]:
    return [g.guard_type in KEPT_GUARDS for g in guards]


def _compile(block: nn.Module, inputs: tuple) -> Callable:
    opts = {"guard_filter_fn": _kept}
    with _aot_enabled():
        compiled = torch.compile(_traced(block), fullgraph=True, dynamic=True, options=opts)
    # floats (the blocks' scales) as constants: a symbolic float makes Dynamo restart its analysis,
    # which ahead-of-time compilation does not do
    # the saved guards pickle the block; a forward set on the instance pickles as a lookup of its
    # function's name on the block, which fails: set aside while tracing (the traced function does
    # not call it)
    own = block.__dict__.pop("forward", None)
    try:
        with torch._dynamo.config.patch(specialize_float=True):
            return compiled.aot_compile(((block, *inputs), {}))
    finally:
        if own is not None:
            block.__dict__["forward"] = own


def _function(k: str, block: nn.Module, inputs: tuple) -> Callable | None:
    """The loaded (or newly compiled and saved) function for key `k`, or None where that failed."""
    if k in _FUNCTIONS:
        return _FUNCTIONS[k]
    with _LOCK:
        if k in _FUNCTIONS:
            return _FUNCTIONS[k]
        from core.speed.compile_policy import compile_seconds

        path = artifact_dir() / f"{k}.bin"
        t0, d0 = time.perf_counter(), compile_seconds()
        fn = None
        try:
            if path.is_file():
                fn = torch.compiler.load_compiled_function(io.BytesIO(path.read_bytes()))
                _STATS["loaded"] += 1
            else:
                fn = _compile(block, inputs)
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_suffix(".tmp")
                fn.save_compiled_function(str(tmp))
                tmp.replace(path)  # whole or not at all: another process may be loading it
                _STATS["compiled"] += 1
        except Exception as e:  # noqa: BLE001 - an experimental torch API: torch.compile's path instead
            log.warning("precompiled %s unavailable (%s: %s); torch.compile runs it", k, type(e).__name__, e)
            fn = None
        _STATS["seconds"] += time.perf_counter() - t0
        _STATS["dynamo_seconds"] += compile_seconds() - d0
        _FUNCTIONS[k] = fn
        return fn


def _is_guard_failure(err: RuntimeError) -> bool:
    return "GuardManager check failed" in str(err)


_PACKED = ("hidden_states", "encoder_hidden_states")  # a view or a strided copy is packed before the call


def _packed(x: torch.Tensor) -> torch.Tensor:
    """`x` with the strides of a fresh tensor: an artifact's guards hold the strides of its first call,
    the size-1 batch's too, and a view of the previous block's output has others."""
    step, packed = 1, True
    for n, st in zip(reversed(x.shape), reversed(x.stride())):
        packed, step = packed and st == step, step * n
    if x._base is None and packed:
        return x
    return torch.empty(x.shape, dtype=x.dtype, device=x.device).copy_(x)


def call(block: nn.Module, fallback: Callable, *args, **kwargs):
    """Run `block` through its artifact where the call has the blocks' form (keyword arguments, no
    joint_attention_kwargs), else through `fallback` (the block's torch.compile path). The fast path
    calls this as the block's compiled call."""
    if args or set(kwargs) - {"joint_attention_kwargs"} != set(FORM) or kwargs.get("joint_attention_kwargs"):
        return fallback(*args, **kwargs)
    inputs = tuple(_packed(kwargs[n]) if n in _PACKED else kwargs[n] for n in FORM)
    fn = _function(key(block, inputs), block, inputs) if "_precompile_signature" in block.__dict__ else None
    if fn is not None:
        try:
            return fn(block, *inputs)
        except RuntimeError as e:
            if not _is_guard_failure(e):
                raise
            log.debug("precompiled %s: %s", type(block).__name__, e)
    _STATS["fallbacks"] += 1
    return fallback(*args, **kwargs)


def prepare(block: nn.Module) -> bool:
    """Fix the block's signature for its calls (apply_fast calls this after every change of the
    blocks); False where the block cannot use an artifact (hooks on it, which forward would skip)."""
    if block._forward_hooks or block._forward_pre_hooks or block._backward_hooks or _traced(block) is None:
        block.__dict__.pop("_precompile_signature", None)  # its calls take torch.compile's path
        return False
    block.__dict__["_precompile_signature"] = signature(block)
    block.__dict__["_precompile_keys"] = {}
    return True
