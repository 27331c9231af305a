"""What 4-bit (GGUF Q4_0) and fp8 storage cost in accuracy, on random weights (CPU).

1. Full-size FLUX blocks (one double-stream, one single-stream block, random weights as
   bench.random_model draws them, bf16): every Linear's output with its weight stored as fp8 or
   4-bit, fed the same (exact) input, against bf16: relative error ||y' - y|| / ||y||; and each
   block's output error with all its Linears stored so.
2. The tiny demo pipeline, the whole job (28 steps, one canny control, same seed) with every
   denoiser unit stored as fp8 (Q) or 4-bit (N) through core.stream.residency: mean absolute
   pixel difference against exact weights.

Random weights understate real-weight error: trained weights have outliers that a block's
shared scale (Q4_0: one per 32 values) represents worse than Gaussian noise.

usage: python -m bench.quality_q4 [--tokens 1024] [--out-dir bench/ram]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from bench.env import environment, md_table, write
from core.stream import q4

FORMATS = ("fp8", "q4")


def stored(w: torch.Tensor, fmt: str) -> torch.Tensor:
    """A weight as the residency gives it back after storing it in `fmt`."""
    if fmt == "fp8":
        return w.to(torch.float8_e4m3fn).to(w.dtype)
    if w.shape[1] % q4.BLOCK:
        return w
    raw = torch.empty(q4.q4_bytes(w.numel()), dtype=torch.uint8)
    q4.quantize_into(raw, w.reshape(-1))
    out = torch.empty(w.numel(), dtype=w.dtype)
    q4.dequantize_into(out, raw)
    return out.view(w.shape)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return round(((a.float() - b.float()).norm() / b.float().norm()).item(), 4)


def layer_errors(block: nn.Module, run) -> list[dict]:
    """Each Linear's output error with only its weight stored compressed (inputs recorded exactly)."""
    inputs = {}

    def keep(name):
        def hook(module, args, output):  # returns None: the output is left alone
            inputs.setdefault(name, args[0].detach())

        return hook

    hooks = [m.register_forward_hook(keep(n)) for n, m in block.named_modules() if isinstance(m, nn.Linear)]
    with torch.no_grad():
        ref = run(block)
    for h in hooks:
        h.remove()
    rows = []
    with torch.no_grad():
        for n, m in block.named_modules():
            if n not in inputs:
                continue
            y = m(inputs[n])
            row = dict(layer=n, shape=list(m.weight.shape))
            for fmt in FORMATS:
                y2 = nn.functional.linear(inputs[n], stored(m.weight, fmt), m.bias)
                row[fmt] = rel(y2, y)
            rows.append(row)
        for fmt in FORMATS:  # the whole block with every Linear stored so
            saved = {n: m.weight.data for n, m in block.named_modules() if isinstance(m, nn.Linear)}
            for n, m in block.named_modules():
                if isinstance(m, nn.Linear):
                    m.weight.data = stored(saved[n], fmt)
            rows.append(dict(layer=f"whole block ({fmt})", **{fmt: rel(run(block), ref)}))
            for n, m in block.named_modules():
                if isinstance(m, nn.Linear):
                    m.weight.data = saved[n]
    return rows


def full_size_blocks(tokens: int) -> dict:
    from diffusers.models.transformers.transformer_flux import FluxSingleTransformerBlock, FluxTransformerBlock

    torch.manual_seed(0)
    dim, heads, head_dim, n_txt = 3072, 24, 128, 128
    out = {}
    for name, make in (
        ("double", lambda: FluxTransformerBlock(dim, heads, head_dim)),
        ("single", lambda: FluxSingleTransformerBlock(dim, heads, head_dim)),
    ):
        block = make().to(torch.bfloat16)
        with torch.no_grad():
            for p in block.parameters():  # Kaiming-like scale, as bench.random_model draws them
                p.normal_(0, 1 / max(p.shape[-1], 1) ** 0.5)
        g = torch.Generator().manual_seed(1)
        img = torch.randn(1, tokens, dim, generator=g).to(torch.bfloat16)
        txt = torch.randn(1, n_txt, dim, generator=g).to(torch.bfloat16)
        temb = torch.randn(1, dim, generator=g).to(torch.bfloat16)

        def run(b, img=img, txt=txt, temb=temb):
            return torch.cat(b(hidden_states=img, encoder_hidden_states=txt, temb=temb), 1)  # (text, image) states

        t0 = time.time()
        out[name] = layer_errors(block, run)
        print(name, "block", round(time.time() - t0, 1), "s", flush=True)
    return out


def demo_pixels(steps: int) -> dict:
    from PIL import Image
    from skimage import data as skdata

    from core.models import ModelSpec, load_pipeline, union_net
    from core.plan.units import denoiser_units
    from core.stream.residency import Residency
    from preprocessors.registry import preprocess

    photo = Image.fromarray(skdata.astronaut()).resize((256, 256))
    control = preprocess("canny", photo)
    images = {}
    for code in ("B", "Q", "N"):
        pipe = load_pipeline(ModelSpec.demo_spec(), torch.float32)  # fresh weights for every format
        pipe.set_progress_bar_config(disable=True)
        units = denoiser_units(pipe.transformer, union_net(pipe))
        res = Residency(units, code * len(units), torch.device("cpu"), torch.float32, slots=2, ring=4)
        img = pipe(
            "a photo",
            control_image=[control],
            control_mode=[0],
            controlnet_conditioning_scale=[0.7],
            height=256,
            width=256,
            num_inference_steps=steps,
            generator=torch.Generator().manual_seed(5),
            max_sequence_length=64,
        ).images[0]
        res.remove()
        images[code] = np.asarray(img, dtype=np.float32)
    return {fmt: round(float(np.abs(images[c] - images["B"]).mean()), 3) for fmt, c in (("fp8", "Q"), ("q4", "N"))}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=28)
    ap.add_argument("--out-dir", type=Path, default=Path("bench/ram"))
    a = ap.parse_args(argv)
    data = dict(env=environment(), blocks=full_size_blocks(a.tokens), demo_pixel_mae=demo_pixels(a.steps))
    write(a.out_dir / "quality.json", data)
    md = ["# 4-bit and fp8 storage: error on random weights\n", f"`{data['env']['command']}`\n"]
    md.append("Random weights understate real-weight error (trained weights have outliers).\n")
    for name, rows in data["blocks"].items():
        md += [f"\n## Full-size {name}-stream block, relative output error\n", md_table(rows, ["layer", "fp8", "q4"])]
    mae = data["demo_pixel_mae"]
    md.append(
        f"\n\nDemo pipeline (tiny, random weights), 256², {a.steps} steps, same seed: mean |pixel difference| "
        f"(0-255) against exact weights: fp8 {mae['fp8']}, 4-bit {mae['q4']}\n"
    )
    (a.out_dir / "QUALITY.md").write_text("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
