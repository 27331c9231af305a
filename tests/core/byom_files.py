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
