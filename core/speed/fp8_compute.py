"""fp8 compute: block Linears become `Fp8Linear` (e4m3 weights with one scale per output row,
activations quantized per row on the fly, `torch._scaled_mm`): the row-wise recipe of torchao's
Float8DynamicActivationFloat8WeightConfig(PerRow()). It changes pixels (fine detail), so it is the
user's choice (core.speed.fast applies it). The bf16 originals wait in host memory and come back exactly.
"""

from __future__ import annotations

import functools
import logging

import torch
from torch import nn

log = logging.getLogger(__name__)

FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8).max)  # 448


@functools.lru_cache(maxsize=8)
def fp8_supported(index: int = 0) -> bool:
    """fp8 matmuls run on this CUDA GPU: compute capability 8.9+ (Ada, Hopper, newer) and a row-wise
    scaled `torch._scaled_mm` with a bias works (checked once on a tiny matrix)."""
    if not torch.cuda.is_available() or torch.cuda.get_device_capability(index) < (8, 9):
        return False
    try:
        dev = torch.device("cuda", index)
        a = torch.ones(16, 32, device=dev).to(FP8)
        w = torch.ones(16, 32, device=dev).to(FP8)
        out = torch._scaled_mm(
            a,
            w.t(),
            scale_a=torch.ones(16, 1, device=dev),
            scale_b=torch.ones(1, 16, device=dev),
            bias=torch.ones(16, device=dev, dtype=torch.bfloat16),
            out_dtype=torch.bfloat16,
            use_fast_accum=True,
        )
        return bool((out.float() == 33).all())
    except RuntimeError as e:
        log.info("fp8 matmul unavailable: %s", e)
        return False


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """e4m3 values and float32 scales (one per row, over the last dim) with x ≈ q * scale."""
    amax = x.abs().amax(dim=-1, keepdim=True).float()
    scale = amax.clamp(min=1e-12) / FP8_MAX
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


class Fp8Linear(nn.Module):
    """A Linear computing in fp8. The weight is stored (out, in) row-major as e4m3 with one scale per
    output row, so `.t()` is the column-major operand `_scaled_mm` needs; activations are quantized
    per row (token) at every call. Output in bf16, like torchao's row-wise float8 inference.

    `split`: input column blocks computed as separate matmuls and summed, each with its own scales.
    A FLUX single block's proj_out reads cat(attention output, GELU(MLP)); core.speed.fused_blocks passes
    the two parts as a tuple, so the concatenation is never made and each part's quantization fuses
    into the kernel that produces it (H100: 15.6 → 9.0 ms a step for those kernels).

    `scaled_mm=False` emulates the same arithmetic (dequantize, float32 matmul, bf16 rounding) for
    devices without fp8 matmuls; it exists for tests, it is not fast."""

    def __init__(
        self, linear: nn.Linear, scaled_mm: bool, fast_accum: bool = True, split: tuple[int, ...] | None = None
    ):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.split = tuple(split) if split and len(split) > 1 else (linear.in_features,)
        if sum(self.split) != linear.in_features:
            raise ValueError(f"split {self.split} does not add up to {linear.in_features} input features")
        for i, w_part in enumerate(linear.weight.detach().split(self.split, dim=1)):
            w, s = quantize_rows(w_part)
            self.register_buffer(f"weight{i or ''}", w)  # (out, in_i) e4m3
            self.register_buffer(f"weight{i or ''}_scale", s.reshape(1, -1).contiguous())  # (1, out) float32
        b = linear.bias
        self.register_buffer("bias", None if b is None else b.detach().to(torch.bfloat16 if scaled_mm else b.dtype))
        self.scaled_mm, self.fast_accum = scaled_mm, fast_accum
        self._original = (linear,)  # in a tuple: not a submodule, so model.to() never moves it

    def _part(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return getattr(self, f"weight{i or ''}"), getattr(self, f"weight{i or ''}_scale")

    def forward(self, x: torch.Tensor | tuple[torch.Tensor, ...]) -> torch.Tensor:
        """x: the input, or its column blocks as separate tensors (core.speed.fused_blocks passes the parts
        of a concatenation that never gets made)."""
        if isinstance(x, (tuple, list)):
            if tuple(p.shape[-1] for p in x) != self.split:
                raise ValueError(f"parts of widths {[p.shape[-1] for p in x]} for split {self.split}")
            lead, parts = x[0].shape[:-1], [p.reshape(-1, p.shape[-1]) for p in x]
            x = x[0]
        else:
            lead = x.shape[:-1]
            x2 = x.reshape(-1, x.shape[-1])
            parts = x2.split(self.split, dim=-1) if len(self.split) > 1 else (x2,)
        out = None
        for i, xs in enumerate(parts):
            q, s = quantize_rows(xs)  # (M, in_i), (M, 1)
            w, ws = self._part(i)
            bias = self.bias if i == 0 else None
            if self.scaled_mm:
                y = torch._scaled_mm(
                    q, w.t(), scale_a=s, scale_b=ws, bias=bias, out_dtype=torch.bfloat16, use_fast_accum=self.fast_accum
                )
            else:
                y = (q.float() * s) @ (w.float() * ws.t()).t()
                y = (y if bias is None else y + bias.float()).to(torch.bfloat16)
            out = y if out is None else out.float() + y  # parts summed in float32, rounded once
        return out.reshape(*lead, self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, scaled_mm={self.scaled_mm}, split={self.split}"
        )


def _fp8_targets(model: nn.Module) -> list[tuple[nn.Module, str, nn.Linear]]:
    """(parent, name, Linear) of the block Linears that take fp8: attention, feed-forward and the
    single blocks' MLP/output. Not the modulation Linears (norm*.linear): they see one row per image,
    so they are memory-bound (fp8 saves nothing there) and they scale every activation. Embedders and
    the final layers are outside the blocks and stay bf16."""
    out = []
    for attr in ("transformer_blocks", "single_transformer_blocks"):
        for block in getattr(model, attr, None) or ():
            for name, m in block.named_modules():
                if not isinstance(m, nn.Linear) or name.split(".")[0].startswith("norm"):
                    continue
                if m.in_features % 16 or m.out_features % 16:  # _scaled_mm's shape rule
                    continue
                parent, _, leaf = name.rpartition(".")
                out.append((block.get_submodule(parent) if parent else block, leaf, m))
    return out


@torch.no_grad()
def quantize_fp8(model: nn.Module, scaled_mm: bool | None = None, backup: str | torch.device = "cpu") -> int:
    """Swap the block Linears for Fp8Linear; returns how many. The bf16 originals move to `backup`
    (host memory: the GPU keeps only the fp8 copy) and come back with dequantize_fp8.
    scaled_mm: None uses `_scaled_mm` where the GPU supports it, else the emulation."""
    n = 0
    for parent, name, lin in _fp8_targets(model):
        dev = lin.weight.device
        use = scaled_mm if scaled_mm is not None else (dev.type == "cuda" and fp8_supported(dev.index or 0))
        # diffusers marks the concatenated input of a single block's proj_out with its column blocks
        setattr(parent, name, Fp8Linear(lin, use, split=getattr(lin, "_tp_packed_row_blocks", None)))
        lin.to(backup)
        n += 1
    return n


@torch.no_grad()
def dequantize_fp8(model: nn.Module) -> int:
    """Put the original Linears back, on the device the fp8 ones were on; returns how many."""
    n = 0
    for name, m in list(model.named_modules()):
        if not isinstance(m, Fp8Linear):
            continue
        parent_name, _, leaf = name.rpartition(".")
        lin = m._original[0].to(m.weight.device)
        setattr(model.get_submodule(parent_name) if parent_name else model, leaf, lin)
        n += 1
    return n


def fp8_layers(model: nn.Module) -> int:
    return sum(isinstance(m, Fp8Linear) for m in model.modules())


def fp8_bytes(model: nn.Module) -> int:
    """GPU bytes of the Fp8Linear buffers (weights, scales, biases)."""
    return sum(b.numel() * b.element_size() for m in model.modules() if isinstance(m, Fp8Linear) for b in m.buffers())
