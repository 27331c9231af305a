"""Files a user brings, made small: LoRAs (peft on the demo transformer, in diffusers' and kohya's
layouts) and single-file / GGUF transformers written from the demo transformer's weights."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from core.demo_model import ensure_demo_model

TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_mlp", "proj_out", "ff.net.2")


def demo_transformer():
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel.from_pretrained(ensure_demo_model() / "flux", subfolder="transformer")


def peft_lora(path: Path, seed: int = 0, rank: int = 4, alpha: float = 8.0, std: float = 0.2) -> Path:
    """A LoRA trained by nobody: peft's adapter on the demo transformer with random A and B,
    saved the way diffusers' trainers save one (prefixed keys, adapter metadata)."""
    from diffusers import FluxControlNetPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    tr = demo_transformer()
    cfg = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(TARGETS), init_lora_weights=False)
    tr.add_adapter(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in tr.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * std)
    sd = get_peft_model_state_dict(tr)
    FluxControlNetPipeline.save_lora_weights(
        path.parent, transformer_lora_layers=sd, transformer_lora_adapter_metadata=cfg.to_dict(), weight_name=path.name
    )
    return path


def kohya_lora(path: Path, seed: int = 0, rank: int = 4, alpha: float = 4.0, std: float = 0.6) -> Path:
    """The kohya / ComfyUI layout (original FLUX module names, lora_down/lora_up, an alpha each) for
    the double blocks' fused qkv and output projections."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for i in range(2):
        for name, (out, inp) in dict(img_attn_qkv=(96, 32), img_attn_proj=(32, 32), txt_mlp_2=(32, 128)).items():
            k = f"lora_unet_double_blocks_{i}_{name}"
            sd[f"{k}.lora_down.weight"] = torch.randn(rank, inp, generator=g) * std
            sd[f"{k}.lora_up.weight"] = torch.randn(out, rank, generator=g) * std
            sd[f"{k}.alpha"] = torch.tensor(alpha)
    save_file(sd, str(path))
    return path


def single_file(path: Path, dtype: torch.dtype) -> Path:
    save_file({k: v.to(dtype).contiguous() for k, v in demo_transformer().state_dict().items()}, str(path))
    return path


def gguf_file(path: Path, qtype: str) -> Path:
    from core.checkpoints import write_gguf

    return write_gguf(demo_transformer().state_dict(), path, qtype)


def fp8_state_dict(sd: dict, scales: str = "", dtype: torch.dtype = torch.float8_e4m3fn) -> dict:
    """`sd` as ComfyUI / Forge write an fp8 checkpoint: 2-D Linear weights in `dtype`, unscaled (a plain
    cast) or with a per-tensor scale (absmax / 448) under the key `scales` ("scale_weight": ComfyUI's
    scaled fp8, its marker and unused input scales; "weight_scale": the newer layout); the rest bf16."""
    out = {}
    for k, v in sd.items():
        stem = k[: -len("weight")]
        if not (v.dim() == 2 and k.endswith(".weight")):
            out[k] = v.to(torch.bfloat16).contiguous()
        elif not scales:
            out[k] = v.to(dtype).contiguous()
        else:
            s = v.float().abs().max() / 448
            out[k] = (v.float() / s).to(dtype).contiguous()
            out[stem + scales] = s.reshape(()) if scales == "scale_weight" else s.reshape(1)
            if scales == "scale_weight":
                out[stem + "scale_input"] = torch.ones(())
    if scales == "scale_weight":
        out["scaled_fp8"] = torch.empty(0, dtype=dtype)
    return out


def original_layout(sd: dict, prefix: str = "model.diffusion_model.") -> dict:
    """The demo transformer's diffusers state dict in the original (BFL / ComfyUI) key layout: fused
    q/k/v rows, [shift, scale] final modulation."""
    from core.fp8_file import original_parts

    by_key: dict[str, list] = {}
    for dst, part in original_parts(2, 2, 32).items():
        if dst in sd:
            by_key.setdefault(part.key, []).append((part.rows[0] if part.rows else 0, dst, part.swap))
    out = {}
    for key, items in by_key.items():
        t = torch.cat([sd[dst] for _, dst, _ in sorted(items)])
        if items[0][2]:
            t = torch.cat(t.chunk(2)[::-1])
        out[prefix + key] = t.contiguous()
    return out


def fp8_file(path: Path, layout: str = "diffusers", scales: str = "", dtype: torch.dtype = torch.float8_e4m3fn) -> Path:
    sd = demo_transformer().state_dict()
    if layout == "original":
        sd = original_layout(sd)
    save_file(fp8_state_dict(sd, scales, dtype), str(path))
    return path
