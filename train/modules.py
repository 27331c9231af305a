"""The modules of a run: the FLUX base loaded by core.models, the ControlNet to train (a Union one to
fine-tune, all weights or a LoRA, or a new one from the base transformer's blocks), what is frozen,
and the trained ControlNet written as a diffusers folder the app loads.
"""

from __future__ import annotations

from pathlib import Path

import torch

from core.configs import FLUX_DEV, UNION_PRO
from core.models import ModelSpec, load_controlnet, load_pipeline, union_net

from .config import TrainConfig
from .precision import refuse_fp16

# Linear layers of the ControlNet's blocks that a LoRA adapts (attention and feed-forward)
LORA_TARGETS = [
    "to_q",
    "to_k",
    "to_v",
    "to_out.0",
    "add_q_proj",
    "add_k_proj",
    "add_v_proj",
    "to_add_out",
    "proj_mlp",
    "proj_out",
    "ff.net.0.proj",
    "ff.net.2",
    "ff_context.net.0.proj",
    "ff_context.net.2",
]


def model_spec(cfg: TrainConfig) -> ModelSpec:
    if cfg.demo:
        demo = ModelSpec.demo_spec()
        return ModelSpec(cfg.model or demo.base, cfg.controlnet or demo.controlnet, demo=True)
    return ModelSpec(cfg.model or FLUX_DEV, cfg.controlnet or UNION_PRO)


def load(cfg: TrainConfig, dtype: torch.dtype):
    """The pipeline (on the CPU, in `dtype`) with the ControlNet to train inside it, after refusing
    fp16-stored weights. A new ControlNet is built from the transformer (its first blocks' weights)."""
    from diffusers import FluxControlNetModel, FluxMultiControlNetModel

    spec = model_spec(cfg)
    refuse_fp16(spec.base, "base transformer", "transformer")
    if not cfg.new_controlnet:
        refuse_fp16(spec.controlnet, "ControlNet")
        return spec, load_pipeline(spec, dtype)
    # the pipeline needs a ControlNet to load: a new one's config, never a downloaded one
    pipe = load_pipeline_without_controlnet(spec, dtype)
    t = pipe.transformer
    cn = FluxControlNetModel.from_transformer(
        t,
        num_layers=min(cfg.new_layers, t.config.num_layers),
        num_single_layers=min(cfg.new_single_layers, t.config.num_single_layers),
        attention_head_dim=t.config.attention_head_dim,
        num_attention_heads=t.config.num_attention_heads,
    ).to(dtype)
    pipe.controlnet = FluxMultiControlNetModel([cn])
    return spec, pipe


def load_pipeline_without_controlnet(spec: ModelSpec, dtype: torch.dtype):
    from diffusers import FluxControlNetPipeline

    from core.models import load_or_explain  # one sentence for a missing or gated model

    pipe = load_or_explain(
        spec.base,
        "model",
        lambda: FluxControlNetPipeline.from_pretrained(spec.base, controlnet=None, dtype=dtype, use_safetensors=True),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def make_trainable(pipe, lora_rank: int, seed: int) -> list[torch.nn.Parameter]:
    """Freeze the base; the ControlNet's weights (or a LoRA added to it) are trained. Returns the
    trained parameters in a fixed order (the optimiser's and the checkpoints')."""
    for name in ("transformer", "vae", "text_encoder", "text_encoder_2"):
        m = getattr(pipe, name)
        if m is not None:
            m.requires_grad_(False).eval()
    cn = union_net(pipe)
    cn.train()
    if not lora_rank:
        cn.requires_grad_(True)
        return list(cn.parameters())
    from peft import LoraConfig

    cn.requires_grad_(False)
    torch.manual_seed(seed)  # the LoRA's initial weights follow the run's seed
    cn.add_adapter(
        LoraConfig(r=lora_rank, lora_alpha=lora_rank, init_lora_weights="gaussian", target_modules=LORA_TARGETS)
    )
    params = [p for n, p in cn.named_parameters() if "lora_" in n]
    for p in params:
        p.requires_grad_(True)
    return params


def trainable_names(cn) -> list[str]:
    return [n for n, p in cn.named_parameters() if p.requires_grad]


def merged_state_dict(cn) -> dict[str, torch.Tensor]:
    """The ControlNet's weights with any LoRA merged in (W + B·A·scale), under the plain names a
    FluxControlNetModel loads."""
    from peft.tuners.lora import LoraLayer

    sd, done = {}, set()
    for name, m in cn.named_modules():
        if isinstance(m, LoraLayer):
            base = m.get_base_layer()
            sd[f"{name}.weight"] = (base.weight + m.get_delta_weight("default").to(base.weight.dtype)).detach()
            if base.bias is not None:
                sd[f"{name}.bias"] = base.bias.detach()
            done.add(name)
    for n, p in cn.state_dict().items():
        if "lora_" in n or any(n.startswith(f"{d}.base_layer.") for d in done):
            continue
        sd[n] = p.detach()
    return {k: v.contiguous().cpu() for k, v in sd.items()}


def export(cn, folder: Path, lora: bool) -> Path:
    """The trained ControlNet as a diffusers folder in safetensors (`python app.py --controlnet`
    loads it); a LoRA is also written alone as `lora.safetensors` beside the folder."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    cn.save_config(folder)
    save_file(merged_state_dict(cn), str(folder / "diffusion_pytorch_model.safetensors"))
    if lora:
        from peft.utils import get_peft_model_state_dict

        lora_sd = {k: v.detach().contiguous().cpu() for k, v in get_peft_model_state_dict(cn).items()}
        save_file(lora_sd, str(folder.parent / "lora.safetensors"))
    return folder


def load_trained(folder: str, dtype: torch.dtype = torch.float32):
    """The exported ControlNet through core's loader (what the app runs)."""
    return load_controlnet(folder, dtype)
