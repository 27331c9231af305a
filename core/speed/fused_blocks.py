"""Fewer passes over the activations in FLUX's blocks (part of the fast path, core/speed/fast.py).

A profile of a compiled step (bench/SPEED_PROFILE.md) showed element-wise kernels that exist only
because of how the blocks are written, not because the math needs them; without them the step's
Triton time went from 17.4 to 9.7 ms (H100, bf16), pixels unchanged beyond rounding:

- GELU after a Linear: Inductor cannot fuse into cuBLAS, so the 4608 × 12288 output is written,
  read back, activated and written again. `LinearGELU` asks cuBLASLt for its GELU epilogue
  (`torch._addmm_activation`, the same tanh approximation FLUX uses), behind a custom op so that
  Inductor keeps the fused call instead of decomposing it.
- a single block's proj_out reads cat(attention output, GELU(MLP)), a 4608 × 15360 copy per block.
  `single_block_forward` is FluxSingleTransformerBlock.forward (diffusers 0.42) with proj_out
  computed per part and summed; fp8 layers (core.speed.fp8_compute) take the parts as they are.

Every change is undone exactly by `unfuse_blocks`; tests compare both forms on the tiny model.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import logging
import types

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)


@torch.library.custom_op("fluxcn::linear_gelu", mutates_args=())
def linear_gelu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """gelu_tanh(x @ weight.T + bias) as one cuBLASLt matmul with a bias+GELU epilogue on CUDA (whose
    GELU is the tanh form; the CPU's `_addmm_activation` is the erf form, so the CPU computes it plainly)."""
    if not x.is_cuda:
        return F.gelu(F.linear(x, weight, bias), approximate="tanh")
    out = torch._addmm_activation(bias, x.reshape(-1, x.shape[-1]), weight.t(), use_gelu=True)
    return out.reshape(*x.shape[:-1], weight.shape[0])


@linear_gelu.register_fake
def _(x, weight, bias):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


class LinearGELU(nn.Module):
    """`linear` then GELU (tanh) in one call; `original` is the module it replaced (put back on undo)."""

    def __init__(self, linear: nn.Module, original: nn.Module):
        super().__init__()
        self.linear = linear
        self._original = (original,)  # in a tuple: not a submodule (its Linear is `linear`)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lin = self.linear
        if type(lin) is nn.Linear and lin.bias is not None and x.dtype == lin.weight.dtype:
            return linear_gelu(x, lin.weight, lin.bias)  # the op computes plainly off CUDA
        return F.gelu(lin(x), approximate="tanh")  # fp8 layers, no bias: the plain form


def project_parts(proj: nn.Module, parts: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """proj(cat(parts, -1)) without the concatenation."""
    from core.speed.fp8_compute import Fp8Linear

    if isinstance(proj, Fp8Linear):
        return proj(parts)
    w, lead = proj.weight, parts[0].shape[:-1]
    out, start = None, 0
    for x in parts:  # each matmul adds the previous result in its epilogue: one rounding per part
        k = x.shape[-1]
        x2, w2 = x.reshape(-1, k), w[:, start : start + k].t()
        if out is None:
            out = x2 @ w2 if proj.bias is None else torch.addmm(proj.bias, x2, w2)
        else:
            out = torch.addmm(out, x2, w2)
        start += k
    return out.reshape(*lead, w.shape[0])


def single_block_forward(
    self,
    hidden_states: torch.Tensor,
    encoder_hidden_states: torch.Tensor,
    temb: torch.Tensor,
    image_rotary_emb=None,
    joint_attention_kwargs=None,
):
    """FluxSingleTransformerBlock.forward of diffusers 0.42 without the concatenation before proj_out."""
    text_seq_len = encoder_hidden_states.shape[1]
    hidden_states = torch.cat([encoder_hidden_states, hidden_states], dim=1)
    residual = hidden_states
    norm_hidden_states, gate = self.norm(hidden_states, emb=temb)
    mlp_hidden_states = self.act_mlp(self.proj_mlp(norm_hidden_states))
    attn_output = self.attn(
        hidden_states=norm_hidden_states, image_rotary_emb=image_rotary_emb, **(joint_attention_kwargs or {})
    )
    hidden_states = residual + gate.unsqueeze(1) * project_parts(self.proj_out, (attn_output, mlp_hidden_states))
    if hidden_states.dtype == torch.float16:
        hidden_states = hidden_states.clip(-65504, 65504)
    return hidden_states[:, :text_seq_len], hidden_states[:, text_seq_len:]


# sha256 (first 16 hex digits) of the FluxSingleTransformerBlock.forward source that single_block_forward
# mirrors (diffusers 0.42). Another version's forward may differ: its blocks then keep their own forward
# and only get the GELU fusion.
MIRRORED_FORWARD = "57350a6dab842b40"


@functools.lru_cache(maxsize=4)
def _mirrors(cls: type) -> bool:
    try:
        src = inspect.getsource(cls.forward)
    except (OSError, TypeError):
        return False
    same = hashlib.sha256(src.encode()).hexdigest()[:16] == MIRRORED_FORWARD
    if not same:
        log.info("%s.forward is not the one core.speed.fused_blocks mirrors: its concatenation stays", cls.__name__)
    return same


def _is_gelu_tanh(m: nn.Module) -> bool:
    return type(m).__name__ == "GELU" and getattr(m, "approximate", None) == "tanh" and hasattr(m, "proj")


@torch.no_grad()
def fuse_blocks(model: nn.Module) -> int:
    """Apply both changes to every block of `model`; returns how many blocks changed (0: already)."""
    n = 0
    for block in getattr(model, "transformer_blocks", None) or ():
        for ff in (getattr(block, "ff", None), getattr(block, "ff_context", None)):
            if ff is not None and _is_gelu_tanh(ff.net[0]):
                ff.net[0] = LinearGELU(ff.net[0].proj, ff.net[0])
                n += 1
    for block in getattr(model, "single_transformer_blocks", None) or ():
        if (
            "forward" in vars(block)
            or type(block).__name__ != "FluxSingleTransformerBlock"
            or not _mirrors(type(block))
        ):
            continue
        act = block.act_mlp
        if isinstance(act, nn.GELU) and act.approximate == "tanh":
            block.proj_mlp = LinearGELU(block.proj_mlp, act)
            block.act_mlp = nn.Identity()
        block.forward = types.MethodType(single_block_forward, block)
        n += 1
    return n


def is_fused(model: nn.Module) -> bool:
    return any("forward" in vars(b) for b in getattr(model, "single_transformer_blocks", None) or ()) or any(
        isinstance(m, LinearGELU) for m in model.modules()
    )


@torch.no_grad()
def unfuse_blocks(model: nn.Module) -> int:
    """Exact inverse of fuse_blocks (the same Linear objects go back where they were)."""
    n = 0
    for block in getattr(model, "transformer_blocks", None) or ():
        for ff in (getattr(block, "ff", None), getattr(block, "ff_context", None)):
            if ff is not None and isinstance(ff.net[0], LinearGELU):
                original = ff.net[0]._original[0]
                original.proj = ff.net[0].linear
                ff.net[0] = original
                n += 1
    for block in getattr(model, "single_transformer_blocks", None) or ():
        if "forward" not in vars(block):
            continue
        del block.forward
        if isinstance(block.proj_mlp, LinearGELU):
            block.act_mlp = block.proj_mlp._original[0]
            block.proj_mlp = block.proj_mlp.linear
        n += 1
    return n
