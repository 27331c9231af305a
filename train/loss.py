"""FLUX's flow-matching loss with a ControlNet in the loop (as diffusers' train_controlnet_flux.py).

Latents x, noise n, sigma s from a logit-normal density: the transformer sees (1 - s)·x + s·n and
must predict n - x. The ControlNet's residuals feed the frozen transformer, so the gradient reaches
the ControlNet through the transformer's blocks.
"""

from __future__ import annotations

import torch
from diffusers import FluxControlNetPipeline


def sample_noise(latents: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(sigmas (B,), noise like latents), drawn on the CPU from `generator`: the same numbers on
    every device and after a resume."""
    bsz = latents.shape[0]
    sigmas = torch.sigmoid(torch.randn(bsz, generator=generator))  # logit-normal(0, 1)
    noise = torch.randn(latents.shape, generator=generator)
    return sigmas, noise


def _pack(x: torch.Tensor) -> torch.Tensor:
    b, c, h, w = x.shape
    return FluxControlNetPipeline._pack_latents(x, b, c, h, w)


def flow_matching_loss(
    transformer,
    controlnet,
    batch: dict[str, torch.Tensor],
    sigmas: torch.Tensor,
    noise: torch.Tensor,
    guidance: float,
    mode: int | None,
    dtype: torch.dtype,
) -> torch.Tensor:
    """The mean squared error of the velocity prediction, in float32. Tensors in `batch` are on the
    device already; `mode` is the Union control mode (None for a ControlNet without modes)."""
    x = batch["latents"]
    dev = x.device
    b, _, h, w = x.shape
    s = sigmas.to(dev, x.dtype).view(b, 1, 1, 1)
    noisy = _pack(((1.0 - s) * x + s * noise.to(dev, x.dtype)).to(dtype))
    cond = _pack(batch["control"].to(dtype))
    pe, pooled = batch["prompt_embeds"].to(dtype), batch["pooled"].to(dtype)
    img_ids = FluxControlNetPipeline._prepare_latent_image_ids(b, h // 2, w // 2, dev, dtype)
    txt_ids = torch.zeros(pe.shape[1], 3, device=dev, dtype=dtype)
    t = sigmas.to(dev, dtype)  # the transformer multiplies timesteps by 1000 itself
    g = torch.full((b,), guidance, device=dev, dtype=dtype)
    cn_mode = None if mode is None else torch.full((b, 1), mode, device=dev, dtype=torch.long)
    block, single = controlnet(
        hidden_states=noisy,
        controlnet_cond=cond,
        controlnet_mode=cn_mode,
        timestep=t,
        guidance=g if _cfg(controlnet).guidance_embeds else None,
        pooled_projections=pooled,
        encoder_hidden_states=pe,
        txt_ids=txt_ids,
        img_ids=img_ids,
        return_dict=False,
    )
    pred = transformer(
        hidden_states=noisy,
        timestep=t,
        guidance=g if transformer.config.guidance_embeds else None,
        pooled_projections=pooled,
        encoder_hidden_states=pe,
        controlnet_block_samples=[r.to(dtype) for r in block] if block is not None else None,
        controlnet_single_block_samples=[r.to(dtype) for r in single] if single is not None else None,
        txt_ids=txt_ids,
        img_ids=img_ids,
        return_dict=False,
    )[0]
    pred = FluxControlNetPipeline._unpack_latents(pred, h * 8, w * 8, 8)  # FLUX VAEs downsample 8x
    target = noise.to(dev, torch.float32) - x.float()
    return ((pred.float() - target) ** 2).mean()


def _cfg(controlnet):
    """The config of a ControlNet, also when wrapped by DistributedDataParallel."""
    return getattr(controlnet, "module", controlnet).config
