"""4-bit weights in GGUF's Q4_0 layout: blocks of 32 values, one fp16 scale and 16 bytes of nibbles.

The layout is GGUF's (the `gguf` package's reference quantizer writes the same bytes and its
dequantizer reads them back to the same values; tests/core/test_q4.py checks both), so a GGUF
file's Q4_0 tensors are what a 4-bit pack carries. The kernels are written here for two reasons:
packing quantizes on the device in bounded chunks (the gguf package quantizes in numpy, minutes for
12 B parameters), and dequantizing must write straight into the work slot a streamed unit is used
from in one pass: diffusers' GGUF dequantizer allocates its result and four temporaries of the
unit's size, five kernels, on every use.

4.5 bits per weight: a streamed unit moves 0.28x the bytes of bf16 and 0.56x those of fp8.
"""

from __future__ import annotations

import torch

BLOCK = 32  # values per block
BLOCK_BYTES = 18  # fp16 scale + 16 bytes of nibbles
CHUNK_BLOCKS = 1 << 17  # blocks quantized at once: bounds the float32 temporaries to 16 MiB


def q4_bytes(numel: int) -> int:
    """Bytes of `numel` values (a multiple of 32) in Q4_0."""
    if numel % BLOCK:
        raise ValueError(f"Q4_0 needs a multiple of {BLOCK} values, got {numel}.")
    return numel // BLOCK * BLOCK_BYTES


def quantize_into(out: torch.Tensor, x: torch.Tensor) -> None:
    """Quantize flat `x` (any float dtype, numel a multiple of 32) into the uint8 tensor `out`
    (q4_bytes(numel) bytes, same device), as gguf.quants.quantize(x, Q4_0) does: the value of
    largest magnitude maps to -8, the scale is stored in fp16."""
    blocks, raw = x.view(-1, BLOCK), out.view(-1, BLOCK_BYTES)
    for s in range(0, blocks.shape[0], CHUNK_BLOCKS):
        b = blocks[s : s + CHUNK_BLOCKS].float()
        peak = b.gather(1, b.abs().argmax(1, keepdim=True))
        d = peak / -8
        inv = torch.where(d == 0, torch.zeros_like(d), 1 / d)
        q = torch.trunc(b * inv + 8.5).clamp_(0, 15).to(torch.uint8)
        r = raw[s : s + CHUNK_BLOCKS]
        r[:, :2].copy_(d.to(torch.float16).view(torch.uint8))
        r[:, 2:].copy_(q[:, :16] | (q[:, 16:] << 4))


def dequantize_into(dst: torch.Tensor, src: torch.Tensor) -> None:
    """Write the values of Q4_0 bytes `src` into flat `dst` (the compute dtype): value j of a block
    is the low nibble of byte j, value j + 16 its high nibble, (q - 8) * scale computed in float32
    and rounded once (what gguf.quants.dequantize gives, rounded to dst's dtype). On a CUDA GPU with
    Triton it is one kernel that reads 0.56 and writes 2 bytes per value; elsewhere torch ops over
    chunks of blocks."""
    if dst.is_cuda and _triton() is not None:
        _dequantize_triton(dst, src)
        return
    raw, out = src.view(-1, BLOCK_BYTES), dst.view(-1, 2, BLOCK // 2)
    for s in range(0, raw.shape[0], CHUNK_BLOCKS):
        r = raw[s : s + CHUNK_BLOCKS]
        scale = r[:, :2].contiguous().view(torch.float16).float().unsqueeze(1)  # (blocks, 1, 1)
        q = torch.stack((r[:, 2:] & 15, r[:, 2:] >> 4), 1).float()  # (blocks, 2, 16)
        out[s : s + CHUNK_BLOCKS].copy_((q - 8) * scale, non_blocking=True)


_KERNEL: list = []  # [kernel or None], filled on first use


def _triton():
    """The Triton kernel, or None where Triton is missing (then the torch ops run)."""
    if not _KERNEL:
        try:
            import triton
            import triton.language as tl
        except ImportError:
            _KERNEL.append(None)
            return None

        @triton.jit
        def dq4(src, dst, n_blocks, BLOCKS: tl.constexpr):
            b = tl.program_id(0) * BLOCKS + tl.arange(0, BLOCKS)
            ok = b < n_blocks
            base = b.to(tl.int64) * 18
            lo = tl.load(src + base, mask=ok, other=0).to(tl.uint16)
            hi = tl.load(src + base + 1, mask=ok, other=0).to(tl.uint16)
            d = (lo | (hi << 8)).to(tl.float16, bitcast=True).to(tl.float32)[:, None]
            j = tl.arange(0, 16)[None, :]
            q = tl.load(src + base[:, None] + 2 + j, mask=ok[:, None], other=0)
            out = dst + b.to(tl.int64)[:, None] * 32 + j
            ty = dst.dtype.element_ty
            tl.store(out, (((q & 15).to(tl.float32) - 8) * d).to(ty), mask=ok[:, None])
            tl.store(out + 16, (((q >> 4).to(tl.float32) - 8) * d).to(ty), mask=ok[:, None])

        _KERNEL.append(dq4)
    return _KERNEL[0]


def _dequantize_triton(dst: torch.Tensor, src: torch.Tensor) -> None:
    n_blocks = src.numel() // BLOCK_BYTES
    blocks = 64
    _triton()[((n_blocks + blocks - 1) // blocks,)](src, dst, n_blocks, BLOCKS=blocks)
