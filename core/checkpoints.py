"""A FLUX transformer from one file: a single .safetensors (bf16, or float8 as ComfyUI and Forge
write them) or a GGUF quantization (Q8_0 … Q2_K), while the rest of the pipeline comes from the base model.

diffusers' `from_single_file` reads bf16 files and GGUF (converting the original BFL key layout, or
taking diffusers' own), with the base model's config so nothing is fetched; fp8 files are read by
core.fp8_file. The file is looked at first (its header only) so that a truncated file, another
architecture or an unsupported quant type is one sentence instead of a traceback from deep inside
the loader.

Quantized Linear weights inside the transformer blocks stay as the file has them: each becomes a
plain Linear whose weight is a placeholder (one NaN, broadcast to the weight's shape: right shape,
no memory, poison if ever computed with) with its source beside it (`QuantSource`: GGUF blocks;
`Fp8Source`: the file's float8 values, memory-mapped), and the placement dequantizes them unit by
unit on the device (core.stream.packs.weight_of), so the 24 GB of bf16 are never made on the host.
A Q4_0 weight whose unit the plan stores as 4-bit is packed as the file's own bytes, a float8_e4m3fn
weight whose unit it stores as fp8 likewise. The few Linears outside the blocks are dequantized at load.
"""

from __future__ import annotations

import json
import logging
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

log = logging.getLogger(__name__)

PREFIXES = ("model.diffusion_model.", "diffusion_model.")  # ComfyUI / original checkpoints


class CheckpointError(ValueError):
    """The file cannot be this model's transformer; the message is one sentence."""


def _safetensors_header(path: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """{key: (dtype, shape)} from a safetensors header, checking that the file holds all its data."""
    size = path.stat().st_size
    try:
        with path.open("rb") as f:
            n = struct.unpack("<Q", f.read(8))[0]
            if n > size - 8:
                raise ValueError
            header = json.loads(f.read(n))
    except (ValueError, struct.error, UnicodeDecodeError):
        raise CheckpointError(f"The transformer file '{path.name}' is not a readable safetensors file.") from None
    header.pop("__metadata__", None)
    end = max((v["data_offsets"][1] for v in header.values()), default=0)
    if 8 + n + end > size:
        raise CheckpointError(
            f"The transformer file '{path.name}' is truncated ({size / 2**20:.1f} MiB of "
            f"{(8 + n + end) / 2**20:.1f} MiB); download it again."
        )
    return {k: (v["dtype"], tuple(v["shape"])) for k, v in header.items()}


def _gguf_header(path: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """{key: (quant type, torch-order shape)} from a GGUF file; an unsupported quant type is refused."""
    import gguf
    from diffusers.quantizers.gguf.utils import SUPPORTED_GGUF_QUANT_TYPES

    size = path.stat().st_size
    try:
        reader = gguf.GGUFReader(str(path))
        tensors = list(reader.tensors)
    except Exception:  # noqa: BLE001 - the reader's errors for a cut-off or foreign file are many
        raise CheckpointError(
            f"The transformer file '{path.name}' is truncated or not a GGUF file; download it again."
        ) from None
    if any(t.data_offset + t.n_bytes > size for t in tensors):
        raise CheckpointError(f"The transformer file '{path.name}' is truncated; download it again.")
    plain = (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16)
    for t in tensors:
        if t.tensor_type not in plain and t.tensor_type not in SUPPORTED_GGUF_QUANT_TYPES:
            ok = ", ".join(q.name for q in SUPPORTED_GGUF_QUANT_TYPES)
            raise CheckpointError(
                f"The GGUF file '{path.name}' uses the quant type {t.tensor_type.name}, which cannot be read; "
                f"use one of {ok}."
            )
    return {t.name: (t.tensor_type.name, tuple(int(d) for d in reversed(t.shape))) for t in tensors}


def header(path: str | Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    p = Path(path).expanduser()
    if not p.is_file():
        raise CheckpointError(f"The transformer file '{path}' does not exist.")
    if p.suffix.lower() == ".safetensors":
        return _safetensors_header(p)
    if p.suffix.lower() == ".gguf":
        return _gguf_header(p)
    raise CheckpointError(f"The transformer file '{p.name}' must be a .safetensors or a .gguf file.")


def _expected(base: str) -> tuple[dict, dict[str, tuple[int, ...]]]:
    """The base model's transformer config and its parameters' shapes (built on the meta device)."""
    from accelerate import init_empty_weights
    from diffusers import FluxTransformer2DModel

    config = FluxTransformer2DModel.load_config(base, subfolder="transformer")
    with init_empty_weights():
        model = FluxTransformer2DModel.from_config(config)
    return config, {k: tuple(v.shape) for k, v in model.state_dict().items()}


def check_architecture(keys: dict[str, tuple[str, tuple[int, ...]]], base: str, name: str) -> None:
    """The file must be this base model's transformer: diffusers' names with the same shapes, or the
    original layout with as many blocks of the same width."""
    config, want = _expected(base)
    keys = {next((k[len(p) :] for p in PREFIXES if k.startswith(p)), k): v for k, v in keys.items()}
    what = f"The transformer file '{name}' is not a FLUX transformer matching '{base}'"
    if "transformer_blocks.0.attn.to_q.weight" in keys:  # diffusers' layout
        missing = [k for k in want if k not in keys]
        wrong = [k for k in want if k in keys and keys[k][1] != want[k]]
        if missing or wrong:
            k = (missing or wrong)[0]
            got = "missing" if missing else f"{keys[k][1]} instead of {want[k]}"
            raise CheckpointError(f"{what} ({len(missing) + len(wrong)} tensors differ; the first, {k}: {got}).")
        return
    if "double_blocks.0.img_attn.qkv.weight" not in keys:
        raise CheckpointError(f"{what}: it has none of its layers (another architecture, or a LoRA?).")

    def count(prefix):
        return len({k.split(".")[1] for k in keys if k.startswith(prefix)})

    width = config["num_attention_heads"] * config["attention_head_dim"]
    got = (count("double_blocks."), count("single_blocks."), keys["double_blocks.0.img_attn.qkv.weight"][1][-1])
    if got != (config["num_layers"], config["num_single_layers"], width):
        raise CheckpointError(
            f"{what}: it has {got[0]} double and {got[1]} single blocks of width {got[2]}, the model "
            f"{config['num_layers']} and {config['num_single_layers']} of width {width}."
        )


@dataclass(frozen=True)
class QuantSource:
    """A Linear weight kept as its GGUF blocks until a placement needs its values."""

    data: torch.Tensor  # uint8, the file's blocks in their byte shape
    quant_type: object  # gguf.GGMLQuantizationType

    def dequantize(self, device, dtype: torch.dtype) -> torch.Tensor:
        """The weight's values on `device`. Q4_0 through core.stream.q4 (float32 arithmetic, as the gguf
        package's reference: diffusers' Q4_0 rounds the products to fp16), the rest through diffusers."""
        from diffusers.quantizers.gguf.utils import GGUFParameter, dequantize_gguf_tensor

        if self.is_q4_0:
            from core.stream import q4

            data = self.data.to(device)
            out = torch.empty(
                data.shape[:-1] + (data.shape[-1] // q4.BLOCK_BYTES * q4.BLOCK,), dtype=dtype, device=device
            )
            q4.dequantize_into(out.view(-1), data.reshape(-1))
            return out
        blocks = GGUFParameter(self.data.to(device), quant_type=self.quant_type)
        return dequantize_gguf_tensor(blocks).to(dtype)

    @property
    def is_q4_0(self) -> bool:
        return getattr(self.quant_type, "name", "") == "Q4_0"


@dataclass(frozen=True)
class Fp8Source:
    """A Linear weight kept as a file's float8 values until a placement needs them: `data × scale`."""

    data: torch.Tensor  # float8_e4m3fn (or e5m2) in the weight's shape: a view of the memory-mapped file
    scale: float = 1.0  # the file's per-tensor scale (1: it has none)
    is_q4_0 = False  # as QuantSource answers it

    def dequantize(self, device, dtype: torch.dtype) -> torch.Tensor:
        return scaled(self.data.to(device).to(dtype), self.scale)

    @property
    def native(self) -> bool:
        """fp8 packs hold its bytes as they are (float8_e4m3fn is their format): no second rounding."""
        return self.data.dtype == torch.float8_e4m3fn


def scaled(values: torch.Tensor, scale: float) -> torch.Tensor:
    """fp8 values (already widened, exactly) times their scale, in place: the one way both a pack's
    cast and a dequantized reference apply it, so that the two agree bit for bit."""
    return values if scale == 1.0 else values.mul_(scale)


def placeholder(shape, dtype: torch.dtype) -> torch.Tensor:
    """A weight's stand-in until it is dequantized: its shape, one element of memory, NaN."""
    return torch.full((1,) * len(shape), float("nan"), dtype=dtype).expand(*shape)


def deferred(p: torch.Tensor) -> QuantSource | Fp8Source | None:
    """The source (GGUF blocks, a file's fp8 values) behind a weight that still holds its placeholder."""
    src = getattr(p, "quant_source", None)
    return src if src is not None and p.dim() and all(s == 0 for s in p.stride()) else None


def retype_deferred(model: nn.Module, dtype: torch.dtype) -> None:
    """Placeholders in `dtype` before `model.to(dtype)`: converting one would make it a full tensor
    of NaN (strided, so no longer deferred) and drop its source."""
    for p in model.parameters():
        if deferred(p) is not None and p.dtype != dtype:
            p.data = placeholder(p.shape, dtype)


def native_fp8(p: torch.Tensor) -> Fp8Source | None:
    """A deferred float8_e4m3fn file weight: fp8 stores take its bytes as they are, exactly."""
    src = deferred(p)
    return src if isinstance(src, Fp8Source) and src.native else None


def has_deferred(model: nn.Module) -> bool:
    return any(deferred(p) is not None for p in model.parameters())


def defer_blocks(model: nn.Module, dtype: torch.dtype) -> int:
    """Every quantized GGUF Linear inside the transformer blocks becomes a plain Linear whose weight is
    a placeholder, its blocks kept beside it; returns how many."""
    from diffusers.quantizers.gguf.utils import GGUFLinear

    n = 0
    for attr in ("transformer_blocks", "single_transformer_blocks"):
        for parent in [m for block in getattr(model, attr) for m in block.modules()]:
            for name, child in list(parent.named_children()):
                qtype = getattr(child.weight, "quant_type", None) if isinstance(child, GGUFLinear) else None
                if qtype is None or qtype.name in ("F32", "F16", "BF16"):
                    continue
                lin = nn.Linear(
                    child.in_features, child.out_features, child.bias is not None, device="meta", dtype=dtype
                )
                lin.weight = nn.Parameter(placeholder(lin.weight.shape, dtype), requires_grad=False)
                lin.weight.quant_source = QuantSource(child.weight.as_tensor().view(torch.uint8), qtype)
                if child.bias is not None:
                    lin.bias = nn.Parameter(child.bias.data.to(dtype), requires_grad=False)
                setattr(parent, name, lin)
                n += 1
    return n


def materialize(model: nn.Module, device, dtype: torch.dtype) -> int:
    """Dequantize every deferred weight of `model` onto `device` (for good); returns how many."""
    n = 0
    for p in model.parameters():
        src = deferred(p)
        if src is not None:
            p.data = src.dequantize(device, dtype)
            n += 1
    return n


def dequantize(model: nn.Module, dtype: torch.dtype) -> int:
    """Replace every GGUF Linear by a plain Linear in `dtype`, one layer at a time (the host never
    holds more than one dequantized copy beyond the model); returns how many were replaced."""
    from diffusers.quantizers.gguf.utils import GGUFLinear, GGUFParameter, dequantize_gguf_tensor

    n = 0
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if not isinstance(child, GGUFLinear):
                continue
            lin = nn.Linear(child.in_features, child.out_features, child.bias is not None, device="meta")
            lin.weight = nn.Parameter(dequantize_gguf_tensor(child.weight).to(dtype), requires_grad=False)
            if child.bias is not None:
                lin.bias = nn.Parameter(child.bias.data.to(dtype), requires_grad=False)
            setattr(parent, child_name, lin)
            n += 1
    for p in model.parameters():  # anything else stored quantized
        if deferred(p) is not None:
            continue  # a deferred weight (defer_blocks)
        if isinstance(p, GGUFParameter) or p.dtype != dtype:
            p.data = dequantize_gguf_tensor(p.data).to(dtype) if hasattr(p.data, "quant_type") else p.data.to(dtype)
    model.hf_quantizer, model.is_quantized = None, False  # plain modules now: `.to(dtype)` is allowed again
    return n


def load_transformer(path: str, base: str, dtype: torch.dtype):
    """FluxTransformer2DModel from `path` (.safetensors or .gguf) with `base`'s config, on the CPU in
    `dtype` (quantized block weights deferred). Raises CheckpointError (one sentence) for a file
    that cannot be this transformer."""
    from diffusers import FluxTransformer2DModel, GGUFQuantizationConfig

    p = Path(path).expanduser()
    keys = header(p)
    check_architecture(keys, base, p.name)
    gguf_file = p.suffix.lower() == ".gguf"
    if not gguf_file:
        from core import fp8_file

        keys = fp8_file.transformer_keys(keys)
        fp8_file.check_dtypes(keys, p.name)
        if fp8_file.is_fp8(keys):  # kept as the file's bytes: diffusers would widen it (and drop its scales)
            return fp8_file.load(p, keys, base, dtype)
    kwargs = dict(config=base, subfolder="transformer", torch_dtype=dtype, local_files_only=True)
    if gguf_file:
        kwargs["quantization_config"] = GGUFQuantizationConfig(compute_dtype=dtype)
    from diffusers.utils import logging as dlogging

    level = dlogging.get_verbosity()
    dlogging.set_verbosity_error()  # "modules that should be kept in float32: []"
    try:
        model = FluxTransformer2DModel.from_single_file(str(p), **kwargs)
    except Exception as e:  # what the header check could not see (a damaged tensor)
        raise CheckpointError(
            f"The transformer file '{p.name}' could not be loaded ({type(e).__name__}: {str(e).splitlines()[0][:100]})."
        ) from e
    finally:
        dlogging.set_verbosity(level)
    if any(t.is_meta for t in model.parameters()):
        raise CheckpointError(f"The transformer file '{p.name}' lacks some of the transformer's weights.")
    if gguf_file:
        kept = defer_blocks(model, dtype)
        n = dequantize(model, dtype)  # the rest: embedders, norms, the output layer
        log.info("GGUF transformer %s: %d block layers kept quantized, %d dequantized", p.name, kept, n)
    return model.eval()


# -- writing (tests and benchmarks: a GGUF of any FLUX transformer's state dict) -----------------
def write_gguf(state_dict: dict[str, torch.Tensor], path: str | Path, qtype: str = "Q8_0", device=None) -> Path:
    """Write `state_dict` (diffusers' names) as GGUF: 2-D Linear weights in `qtype` (a type the
    gguf package can quantize: Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, …), the rest as F32. With `device`
    (Q8_0 and Q4_0 only) the weights are quantized there with torch, to the same bytes, and written one
    tensor at a time: the gguf package's numpy quantizer takes many minutes for 12 B parameters."""
    import gguf
    import numpy as np

    from core.stream import q4

    q = gguf.GGMLQuantizationType[qtype]
    block, block_bytes = gguf.GGML_QUANT_SIZES[q]
    quantize = None if device is None else {"Q8_0": q8_quantize_into, "Q4_0": q4.quantize_into}[qtype]
    w = gguf.GGUFWriter(str(path), arch="flux")
    items = []
    for k, v in state_dict.items():
        quant = v.ndim == 2 and k.endswith(".weight") and v.shape[-1] % block == 0
        if quantize is None:
            a = v.detach().float().cpu().numpy()
            w.add_tensor(
                k, gguf.quants.quantize(a, q) if quant else np.ascontiguousarray(a), raw_dtype=q if quant else None
            )
        elif quant:  # the byte shape: GGUFWriter derives the values' shape from it
            shape = (v.shape[0], v.shape[1] // block * block_bytes)
            w.add_tensor_info(k, shape, np.dtype(np.uint8), shape[0] * shape[1], raw_dtype=q)
        else:
            w.add_tensor_info(k, tuple(v.shape), np.dtype(np.float32), v.numel() * 4)
        items.append((v, quant))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    if quantize is None:
        w.write_tensors_to_file()
    else:
        w.write_ti_data_to_file()
        for v, quant in items:  # in the order of the tensor infos, as the writer requires
            if quant:
                out = torch.empty(v.numel() // block * block_bytes, dtype=torch.uint8, device=device)
                quantize(out, v.detach().to(device).reshape(-1))
                w.write_tensor_data(out.cpu().numpy().reshape(v.shape[0], -1))
            else:
                w.write_tensor_data(np.ascontiguousarray(v.detach().float().cpu().numpy()))
    w.close()
    return Path(path)


def q8_quantize_into(out: torch.Tensor, x: torch.Tensor) -> None:
    """Quantize flat `x` (numel a multiple of 32) into uint8 `out` as gguf.quants.quantize(x, Q8_0)
    does, on x's device: per block of 32 an fp16 scale d = max|x| / 127, then round(x / d) as int8,
    rounded half away from zero in float32 the way gguf's np_roundf computes it (34 bytes a block)."""
    from core.stream import q4

    blocks, raw, n = x.reshape(-1, q4.BLOCK), out.view(-1, q4.BLOCK + 2), q4.CHUNK_BLOCKS
    for s in range(0, blocks.shape[0], n):
        b = blocks[s : s + n].float()
        d = b.abs().amax(1, keepdim=True) / 127
        v = b * torch.where(d == 0, torch.zeros_like(d), 1 / d)
        a = v.abs()
        f = a.floor()
        q = (torch.sign(v) * (f + torch.floor(2 * (a - f)))).to(torch.int8)
        r = raw[s : s + n]
        r[:, :2].copy_(d.to(torch.float16).view(torch.uint8))
        r[:, 2:].copy_(q.view(torch.uint8))
