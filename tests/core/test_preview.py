"""Live previews: the packed-latent projection, and the opt-in progress protocol that carries it."""

import pytest
import torch
from diffusers import FluxPipeline

from core.job import ControlSpec, Job
from core.preview import FLUX_RGB, FLUX_RGB_BIAS, latent_rgb, unpack


def test_unpack_inverts_diffusers_packing():
    x = torch.randn(1, 16, 12, 20)
    packed = FluxPipeline._pack_latents(x, 1, 16, 12, 20)
    assert torch.equal(unpack(packed, width=160, height=96), x)


def test_latent_rgb_is_the_linear_map():
    lat = torch.zeros(1, 16, 4, 6)
    lat[:, 4] = 5.0  # channel 4 alone: its row times 5, plus the bias
    img = latent_rgb(FluxPipeline._pack_latents(lat, 1, 16, 4, 6), width=48, height=32)
    assert img.size == (6, 4) and img.mode == "RGB"
    want = [round((min(max(5 * FLUX_RGB[4][c] + FLUX_RGB_BIAS[c], -1), 1) + 1) * 127.5) for c in range(3)]
    assert list(img.getpixel((2, 1))) == want
    with pytest.raises(ValueError, match="16 latent channels"):
        latent_rgb(torch.zeros(1, 6, 4 * 8), width=48, height=32)


def test_progress_opts_in_to_phases_and_previews(demo_engine, astronaut):
    calls = []

    def progress(label, done, total, preview=None):
        calls.append((label, done, total, None if preview is None else preview.size))

    progress.phases, progress.preview_every = True, 2
    job = Job("an astronaut", astronaut, (ControlSpec("canny"),), 128, 96, steps=3, seed=1, tier="cpu")
    demo_engine.run(job, progress=progress)
    assert calls == [
        ("encode", 0, 1, None),
        ("generate", 0, 3, None),
        ("generate", 1, 3, None),
        ("generate", 2, 3, (16, 12)),
        ("generate", 3, 3, (16, 12)),  # the last step always has one
        ("decode", 0, 1, None),
    ]
