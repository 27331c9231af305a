"""A single-file transformer stored in float8 (ComfyUI, Forge), read without widening it.

Layouts read: float8_e4m3fn weights with no scale (a plain cast from bf16), or with a per-tensor
scale beside each: `<layer>.scale_weight` (ComfyUI's "scaled fp8", marked by a `scaled_fp8` key)
or `<layer>.weight_scale` (ComfyUI's newer quantized layout, compressed-tensors); the weight's
value is `fp8 × scale`, as ComfyUI computes it. `scale_input` / `input_scale` quantize activations
for fp8 matmuls and leave the weights' values alone: they are ignored, as is `comfy_quant`.
float8_e5m2 weights are read the same way, but fp8 packs round them again to float8_e4m3fn.

diffusers' `from_single_file` would widen every weight to the compute dtype (a 12 GB file becomes
24 GB of host RAM) and drop the scale keys as unexpected (a scaled file would then compute with
unscaled weights). Here the block Linear weights stay the file's memory-mapped fp8 tensors behind
placeholders (core.checkpoints.Fp8Source): fp8 packs take their bytes as they are, other stores
widen them unit by unit when placed. The original (BFL) layout's fused q/k/v rows are row slices
of the file's tensors, views, so nothing is copied; the rest of the model is small and widened here.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from core.checkpoints import PREFIXES, CheckpointError, Fp8Source, placeholder

log = logging.getLogger(__name__)

FP8 = {"F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
PLAIN = ("BF16", "F16", "F32")
SCALES = ("scale_weight", "weight_scale")  # per-tensor weight scales, by layout
IGNORED = ("scale_input", "input_scale", "comfy_quant", "scaled_fp8")  # what the weights' values do not depend on
BLOCKS = ("transformer_blocks.", "single_transformer_blocks.")

Header = dict[str, tuple[str, tuple[int, ...]]]


def _strip(key: str) -> str:
    return next((key[len(p) :] for p in PREFIXES if key.startswith(p)), key)


def _ignored(key: str) -> bool:
    return key.rsplit(".", 1)[-1] in IGNORED


def transformer_keys(keys: Header) -> Header:
    """The transformer's tensors: those under a diffusion-model prefix where there is one (a checkpoint
    bundling the VAE and text encoders holds other formats too), else all."""
    mine = {k: v for k, v in keys.items() if k.startswith(PREFIXES)}
    return mine or keys


def is_fp8(keys: Header) -> bool:
    return any(dtype in FP8 for dtype, _ in keys.values())


def check_dtypes(keys: Header, name: str) -> None:
    """Every tensor is bf16, fp16, fp32 or float8: anything else (int8, 4-bit packed in bytes, MX
    scales) would be read as numbers it is not."""
    for k, (dtype, _) in keys.items():
        if dtype not in PLAIN and dtype not in FP8 and not _ignored(k):
            raise CheckpointError(
                f"The transformer file '{name}' stores {_strip(k)} as {dtype}, a format that is not read; "
                "use a bf16, float8_e4m3fn or GGUF file."
            )


def scale_keys(keys: Header, name: str) -> dict[str, str]:
    """{weight key: its scale key} (the file's own keys), the layout checked from the header: one
    scalar float scale per fp8 weight at most."""
    out: dict[str, str] = {}
    for k, (dtype, shape) in keys.items():
        stem, _, leaf = k.rpartition(".")
        if leaf == "weight_scale_inv" or (leaf in SCALES and math.prod(shape) != 1):
            raise CheckpointError(
                f"The transformer file '{name}' has per-channel or block-wise fp8 scales ({_strip(k)}, shape "
                f"{list(shape)}), which are not read; use a file with one scale per tensor, or none."
            )
        if leaf not in SCALES:
            continue
        weight = f"{stem}.weight"
        what = f"The transformer file '{name}' has a malformed fp8 scale: {_strip(k)}"
        if dtype not in PLAIN:
            raise CheckpointError(f"{what} is stored as {dtype}; scales are read as bf16, fp16 or fp32.")
        if weight not in keys:
            raise CheckpointError(f"{what} belongs to no weight in the file.")
        if keys[weight][0] not in FP8:
            raise CheckpointError(f"{what} scales a {keys[weight][0]} weight, not an fp8 one.")
        if weight in out:
            raise CheckpointError(f"{what} is the second scale of {_strip(weight)}.")
        out[weight] = k
    return out


@dataclass(frozen=True)
class Part:
    """Where a diffusers parameter is in the file: a key, optionally a range of its rows, or its two
    halves swapped (the original layout's final modulation is [shift, scale], diffusers' [scale, shift])."""

    key: str
    rows: tuple[int, int | None] | None = None
    swap: bool = False

    def take(self, t: torch.Tensor) -> torch.Tensor:
        if self.rows is not None:
            t = t[self.rows[0] : self.rows[1]]  # a view: rows of a row-major tensor stay contiguous
        if self.swap:
            shift, scale = t.chunk(2, dim=0)
            t = torch.cat([scale, shift])
        return t


def original_parts(n_double: int, n_single: int, inner: int) -> dict[str, Part]:
    """{diffusers parameter: Part} for the original (BFL / ComfyUI) key layout: the mapping of
    diffusers' convert_flux_transformer_checkpoint_to_diffusers, as views of the file's tensors."""
    parts: dict[str, Part] = {}

    def lin(dst: str, src: str, rows=None, swap=False, bias=True):
        parts[f"{dst}.weight"] = Part(f"{src}.weight", rows, swap)
        if bias:
            parts[f"{dst}.bias"] = Part(f"{src}.bias", rows, swap)

    for emb, src in (("timestep", "time_in"), ("text", "vector_in"), ("guidance", "guidance_in")):
        lin(f"time_text_embed.{emb}_embedder.linear_1", f"{src}.in_layer")
        lin(f"time_text_embed.{emb}_embedder.linear_2", f"{src}.out_layer")
    lin("context_embedder", "txt_in")
    lin("x_embedder", "img_in")
    lin("proj_out", "final_layer.linear")
    lin("norm_out.linear", "final_layer.adaLN_modulation.1", swap=True)
    thirds = [(j * inner, (j + 1) * inner) for j in range(3)]
    for i in range(n_double):
        d, o = f"transformer_blocks.{i}.", f"double_blocks.{i}."
        lin(d + "norm1.linear", o + "img_mod.lin")
        lin(d + "norm1_context.linear", o + "txt_mod.lin")
        for x, rows in zip("qkv", thirds):
            lin(d + f"attn.to_{x}", o + "img_attn.qkv", rows)
            lin(d + f"attn.add_{x}_proj", o + "txt_attn.qkv", rows)
        for dst, src in (("norm_q", "img_attn.norm.query_norm"), ("norm_k", "img_attn.norm.key_norm")):
            parts[d + f"attn.{dst}.weight"] = Part(o + f"{src}.scale")
        for dst, src in (("norm_added_q", "txt_attn.norm.query_norm"), ("norm_added_k", "txt_attn.norm.key_norm")):
            parts[d + f"attn.{dst}.weight"] = Part(o + f"{src}.scale")
        lin(d + "ff.net.0.proj", o + "img_mlp.0")
        lin(d + "ff.net.2", o + "img_mlp.2")
        lin(d + "ff_context.net.0.proj", o + "txt_mlp.0")
        lin(d + "ff_context.net.2", o + "txt_mlp.2")
        lin(d + "attn.to_out.0", o + "img_attn.proj")
        lin(d + "attn.to_add_out", o + "txt_attn.proj")
    for i in range(n_single):
        d, o = f"single_transformer_blocks.{i}.", f"single_blocks.{i}."
        lin(d + "norm.linear", o + "modulation.lin")
        for x, rows in zip(("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"), [*thirds, (3 * inner, None)]):
            lin(d + x, o + "linear1", rows)
        parts[d + "attn.norm_q.weight"] = Part(o + "norm.query_norm.scale")
        parts[d + "attn.norm_k.weight"] = Part(o + "norm.key_norm.scale")
        lin(d + "proj_out", o + "linear2")
    return parts


def _scale(sd: dict, key: str | None, name: str) -> float:
    if key is None:
        return 1.0
    s = float(sd[key].float().reshape(-1)[0])
    if not (math.isfinite(s) and s > 0):
        raise CheckpointError(
            f"The transformer file '{name}' has a malformed fp8 scale: {_strip(key)} is {s}, "
            "not a positive finite number."
        )
    return s


def load(path: Path, keys: Header, base: str, dtype: torch.dtype):
    """FluxTransformer2DModel with `base`'s config from an fp8 single file (header `keys`, already
    checked to be this architecture): block Linear weights deferred to the file's fp8 tensors, the
    rest in `dtype`."""
    from accelerate import init_empty_weights
    from diffusers import FluxTransformer2DModel
    from safetensors.torch import load_file

    name = path.name
    scales = {_strip(w): s for w, s in scale_keys(keys, name).items()}
    config = FluxTransformer2DModel.load_config(base, subfolder="transformer")
    with init_empty_weights():
        model = FluxTransformer2DModel.from_config(config)
    stripped = {_strip(k): k for k in keys}
    if "transformer_blocks.0.attn.to_q.weight" in stripped:
        parts = {n: Part(n) for n, _ in model.named_parameters()}
    else:
        inner = config["num_attention_heads"] * config["attention_head_dim"]
        parts = original_parts(config["num_layers"], config["num_single_layers"], inner)
    params = list(model.named_parameters())
    missing = [n for n, _ in params if n not in parts or parts[n].key not in stripped]
    if missing:
        raise CheckpointError(f"The transformer file '{name}' lacks some of the transformer's weights ({missing[0]}).")
    try:
        sd = load_file(str(path))  # memory-mapped: nothing is read until used
    except Exception as e:  # what the header check could not see (a damaged file)
        raise CheckpointError(f"The transformer file '{name}' could not be loaded ({type(e).__name__}).") from e
    linears = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.startswith(BLOCKS)}
    kept = 0
    for n, p in params:
        part = parts[n]
        t = part.take(sd[stripped[part.key]])
        if t.shape != p.shape:
            raise CheckpointError(
                f"The transformer file '{name}' is not a FLUX transformer matching '{base}' "
                f"({n}: {tuple(t.shape)} instead of {tuple(p.shape)})."
            )
        scale = _scale(sd, scales.get(part.key), name) if t.dtype in FP8.values() else 1.0
        if t.dtype in FP8.values() and n in linears:
            new = nn.Parameter(placeholder(t.shape, dtype), requires_grad=False)
            new.quant_source = Fp8Source(t, scale)
            kept += 1
        elif t.dtype in FP8.values():
            new = nn.Parameter(Fp8Source(t, scale).dequantize("cpu", dtype), requires_grad=False)
        else:  # in the compute dtype already: the memory-mapped tensor itself
            new = nn.Parameter(t.to(dtype), requires_grad=False)
        owner, _, leaf = n.rpartition(".")
        setattr(model.get_submodule(owner), leaf, new)
    log.info(
        "fp8 transformer %s: %d of %d block layers kept as the file's fp8, %d scaled",
        name,
        kept,
        len(linears),
        len(scales),
    )
    return model.eval()
