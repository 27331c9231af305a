"""The attention modules of a denoiser: q, k, v projections fused into one matmul (and exactly
unfused), and the SDPA kernel each attention processor is forced to (cuDNN, flash, or PyTorch's own
choice), per processor so that diffusers' process-wide backend stays as it was. Used by core.speed.fast.
"""

from __future__ import annotations

import functools
import logging

import torch
from torch import nn

log = logging.getLogger(__name__)

ATTENTION = {"sdpa": None, "cudnn": "_native_cudnn", "flash": "_native_flash"}  # name → diffusers backend
ATTENTION_CHOICES = ("auto",) + tuple(ATTENTION)
_UNFUSED = {"to_qkv": ("to_q", "to_k", "to_v"), "to_added_qkv": ("add_q_proj", "add_k_proj", "add_v_proj")}


def attentions(model: nn.Module) -> list[nn.Module]:
    from diffusers.models.attention import AttentionModuleMixin

    return [m for m in model.modules() if isinstance(m, AttentionModuleMixin) and hasattr(m, "processor")]


# -- fused QKV ------------------------------------------------------------------------------------
@torch.no_grad()
def fuse_qkv(model: nn.Module) -> int:
    """Fuse q, k, v (and the context stream's) projections of every attention; returns how many.
    diffusers' fuse_projections keeps the unfused Linears: deleting them keeps the memory the plan
    counted (the transformer alone would grow by 4.3 GB)."""
    n = 0
    for attn in attentions(model):
        if getattr(attn, "fused_projections", False) or not getattr(attn, "_supports_qkv_fusion", False):
            continue
        attn.fuse_projections()
        for fused, parts in _UNFUSED.items():
            if hasattr(attn, fused):
                for name in parts:  # set aside, emptied: unfusing gives these very Parameters back
                    lin = attn.__dict__.setdefault("_unfused", {})[name] = getattr(attn, name)
                    for p in lin.parameters():
                        p.data = p.data.new_empty(0)
                    delattr(attn, name)
        n += 1
    return n


@torch.no_grad()
def unfuse_qkv(model: nn.Module) -> int:
    """Exact inverse of fuse_qkv: the fused weights split back into the very Parameters set aside."""
    n = 0
    for attn in attentions(model):
        if not getattr(attn, "fused_projections", False):
            continue
        for fused, parts in _UNFUSED.items():
            lin = getattr(attn, fused, None)
            if lin is None:
                continue
            if not isinstance(lin, nn.Linear):
                raise RuntimeError(f"{fused} is a {type(lin).__name__}: dequantize before unfusing")
            ws = lin.weight.chunk(3, dim=0)
            bs = lin.bias.chunk(3) if lin.bias is not None else (None,) * 3
            kept = attn.__dict__.get("_unfused", {})
            for name, w, b in zip(parts, ws, bs):
                new = kept.pop(name, None) or nn.Linear(w.shape[1], w.shape[0], bias=b is not None, device="cpu")
                new.weight.data = w.clone()
                if b is not None:
                    new.bias.data = b.clone()
                setattr(attn, name, new)
        attn.unfuse_projections()  # deletes the fused Linears, clears the flag
        n += 1
    return n


# -- attention kernel -----------------------------------------------------------------------------
@functools.lru_cache(maxsize=8)
def attention_available(name: str, index: int = 0) -> bool:
    """The forced SDPA kernel runs on this GPU (bf16, head dim 128) and agrees with the math kernel."""
    if name == "sdpa":
        return True
    if name not in ATTENTION or not torch.cuda.is_available():
        return False
    from torch.nn.attention import SDPBackend, sdpa_kernel

    kernel = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION}[name]
    try:
        g = torch.Generator("cuda").manual_seed(0)
        q, k, v = (
            torch.randn(1, 4, 333, 128, device=f"cuda:{index}", generator=g).to(torch.bfloat16) for _ in range(3)
        )  # an odd length, like the ControlNet's 4096 + 513 tokens
        with sdpa_kernel(kernel):
            out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        ref = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float())
        return bool((out.float() - ref).abs().max() < 0.03)
    except RuntimeError as e:
        log.info("%s attention unavailable: %s", name, e)
        return False


def resolve_attention(name: str, device: torch.device | str = "cuda") -> str:
    """'auto': cuDNN attention on Hopper and newer where it works (the fastest PyTorch-native kernel
    there for FLUX's head dim 128; bench/bench_speed.py compares it with flash), else PyTorch's choice."""
    if name not in ATTENTION_CHOICES:
        raise ValueError(f"attention must be one of {', '.join(ATTENTION_CHOICES)}, got {name!r}.")
    dev = torch.device(device)
    if dev.type != "cuda":
        return "sdpa"
    if name == "auto":
        ok = torch.cuda.get_device_capability(dev.index or 0) >= (9, 0) and attention_available("cudnn", dev.index or 0)
        return "cudnn" if ok else "sdpa"
    return name if attention_available(name, dev.index or 0) else "sdpa"


def set_attention(model: nn.Module, name: str) -> None:
    """Per processor, so diffusers' process-wide active backend stays as it was."""
    from diffusers.models.attention_dispatch import AttentionBackendName

    value = ATTENTION[name]
    backend = AttentionBackendName(value) if value else None
    for attn in attentions(model):
        if hasattr(attn.processor, "_attention_backend"):
            attn.processor._attention_backend = backend
