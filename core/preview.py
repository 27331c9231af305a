"""Live previews: FLUX's packed latents → a small RGB image, without the VAE.

A fixed 16→3 linear map per latent pixel, the approximation ComfyUI and Forge draw their "latent2rgb"
previews with (coefficients: ComfyUI's `comfy/latent_formats.py`, class Flux, fitted to FLUX's VAE).
It costs one small matmul, so a preview every few steps adds nothing measurable; the picture is
1/8 of the output size and blurry by design. At a step end the latents are the noisy x_t, so the
preview sharpens as denoising goes.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

# rows: the 16 latent channels (in the diffusion space, scaled and shifted); columns: R, G, B
FLUX_RGB = (
    (-0.0346, 0.0244, 0.0681),
    (0.0034, 0.0210, 0.0687),
    (0.0275, -0.0668, -0.0433),
    (-0.0174, 0.0160, 0.0617),
    (0.0859, 0.0721, 0.0329),
    (0.0004, 0.0383, 0.0115),
    (0.0405, 0.0861, 0.0915),
    (-0.0236, -0.0185, -0.0259),
    (-0.0245, 0.0250, 0.1180),
    (0.1008, 0.0755, -0.0421),
    (-0.0515, 0.0201, 0.0011),
    (0.0428, -0.0012, -0.0036),
    (0.0817, 0.0765, 0.0749),
    (-0.1264, -0.0522, -0.1103),
    (-0.0280, -0.0881, -0.0499),
    (-0.1262, -0.0982, -0.0778),
)
FLUX_RGB_BIAS = (-0.0329, -0.0718, -0.0851)


def unpack(latents: torch.Tensor, width: int, height: int, vae_scale: int = 8) -> torch.Tensor:
    """(B, tokens, C·4) packed 2×2 patches → (B, C, h, w), as diffusers' FluxPipeline._unpack_latents."""
    b, _, c = latents.shape
    h, w = 2 * (height // (vae_scale * 2)), 2 * (width // (vae_scale * 2))
    x = latents.reshape(b, h // 2, w // 2, c // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c // 4, h, w)


def latent_rgb(latents: torch.Tensor, width: int, height: int) -> Image.Image:
    """The first image of a batch of packed FLUX latents as RGB (1/8 of width × height)."""
    x = unpack(latents.detach()[:1].float().cpu(), width, height)[0]  # (16, h, w)
    if x.shape[0] != len(FLUX_RGB):
        raise ValueError(f"latent previews need {len(FLUX_RGB)} latent channels, got {x.shape[0]}.")
    m = torch.tensor(FLUX_RGB, dtype=torch.float32)
    rgb = torch.einsum("chw,cr->hwr", x, m) + torch.tensor(FLUX_RGB_BIAS)
    a = ((rgb.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()
    return Image.fromarray(np.ascontiguousarray(a), "RGB")
