"""Parameter counts the planner needs, from a loaded pipeline or from configs on the meta device."""

from __future__ import annotations

import functools
from dataclasses import dataclass

from torch import nn

from core.models import union_net
from core.plan.units import UnitSize, denoiser_units, text_encoder_units, unit_sizes


@dataclass(frozen=True)
class ModelSizes:
    units: tuple[UnitSize, ...]  # denoiser units in execution order (ControlNet first)
    n_cn_units: int  # the first n units belong to the ControlNet (they run once per control)
    fixed_params: int  # non-unit denoiser params (embedders, norms, zero-convs): always resident
    t5_params: int
    t5_unit_params: int  # T5 Linear layers: resident ("gpu") or streamed with the denoiser's slots
    t5_max_unit: int
    clip_params: int  # CLIP (and T5's embedding and norms) stay on the GPU
    vae_params: int
    hidden: int = 3072
    max_seq: int = 512
    t5_layers: tuple[UnitSize, ...] = ()  # T5's streamable Linear layers (t5_unit_params in all)


def _count(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def sizes_of(transformer, controlnet, t5, clip, vae, max_seq: int) -> ModelSizes:
    units = denoiser_units(transformer, controlnet)
    us = unit_sizes(units)
    n_cn = sum(1 for name, _ in units if name.startswith("controlnet."))
    in_units = sum(u.numel for u in us)
    t5u = unit_sizes(text_encoder_units(t5))
    t5_units, t5_max = sum(u.numel for u in t5u), max(u.numel for u in t5u)
    return ModelSizes(
        units=tuple(us),
        n_cn_units=n_cn,
        fixed_params=_count(transformer) + _count(controlnet) - in_units,
        t5_params=_count(t5),
        t5_unit_params=t5_units,
        t5_max_unit=t5_max,
        clip_params=_count(clip),
        vae_params=_count(vae),
        hidden=transformer.config.num_attention_heads * transformer.config.attention_head_dim,
        max_seq=max_seq,
        t5_layers=tuple(t5u),
    )


def sizes_from_pipeline(pipe, max_seq: int) -> ModelSizes:
    return sizes_of(pipe.transformer, union_net(pipe), pipe.text_encoder_2, pipe.text_encoder, pipe.vae, max_seq)


@functools.lru_cache(maxsize=4)
def sizes_from_config(name: str = "full") -> ModelSizes:
    """Sizes of the full-size (or tiny) architecture without weights: built on the meta device."""
    from accelerate import init_empty_weights

    from core.configs import FULL, TINY, constructors

    cfg = FULL if name == "full" else TINY
    with init_empty_weights():
        m = {name: make() for name, make in constructors(cfg).items()}
    m["text_encoder_2"].tie_weights()  # T5's embedding is shared once loaded (not so inside init_empty_weights)
    return sizes_of(
        m["transformer"], m["controlnet"], m["text_encoder_2"], m["text_encoder"], m["vae"], cfg["max_sequence_length"]
    )


def sizes_from_folders(base: str, controlnet: str, max_seq: int = 512) -> ModelSizes:
    """Sizes of a model from its configs alone (a local folder or the Hub cache; built on the meta
    device): what the planner needs to decide where to load the weights before reading them."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, FluxControlNetModel, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    def config(cls, source, sub=None):
        return cls.from_config(cls.load_config(source, **({"subfolder": sub} if sub else {})))

    with init_empty_weights():
        transformer = config(FluxTransformer2DModel, base, "transformer")
        cn = config(FluxControlNetModel, controlnet)
        t5 = T5EncoderModel(T5Config.from_pretrained(base, subfolder="text_encoder_2"))
        clip = CLIPTextModel(CLIPTextConfig.from_pretrained(base, subfolder="text_encoder"))
        vae = config(AutoencoderKL, base, "vae")
    t5.tie_weights()  # its embedding is shared, as loading ties it (not so inside init_empty_weights)
    return sizes_of(transformer, cn, t5, clip, vae, max_seq)
