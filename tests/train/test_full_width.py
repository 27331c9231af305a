"""The training plan's byte counts at full size, and one training step of a full-width model (the real
FLUX widths: 3072 hidden, 24 heads, 4096 T5, 768 pooled; one double and one single block) with random
weights initialised as the GPU benchmark's full-size model is, in bf16, on the CPU."""

import torch
from diffusers import FluxControlNetModel, FluxTransformer2DModel

from bench.random_model import _random
from core.configs import FULL, TINY
from core.device import DeviceInfo
from core.plan.sizes import sizes_from_config
from train.loss import flow_matching_loss, sample_noise
from train.placement import frozen_base_bytes, place
from train.run import _optimizer, place_frozen

GiB = 2**30
BASE, CN, LORA16 = 11_901_408_320, 3_301_956_608, 17_203_200  # full-size transformer, Union-Pro, rank-16 LoRA
H200 = DeviceInfo("cuda", "NVIDIA H200", 139.8, 139.0, True, 200.0, context_gb=0.82)  # its measured context


def test_an_fp8_base_stores_every_block_linear_in_fp8_and_the_plan_counts_those_bytes():
    """diffusers' default pattern skips modules named "norm": the blocks' adaLN modulation Linears stayed
    bf16 (3.25 B parameters at full size), which the plan counted as fp8 (the LoRA's 3 GiB shortfall)."""
    tr = FluxTransformer2DModel(**TINY["transformer"]).to(torch.bfloat16)
    place_frozen(tr, "cpu", torch.bfloat16, "float8_e4m3fn")
    fp8 = torch.float8_e4m3fn
    assert tr.transformer_blocks[0].norm1.linear.weight.dtype == fp8
    assert tr.transformer_blocks[0].norm1_context.linear.weight.dtype == fp8
    assert tr.single_transformer_blocks[0].norm.linear.weight.dtype == fp8
    assert tr.x_embedder.weight.dtype == tr.norm_out.linear.weight.dtype == tr.proj_out.weight.dtype == torch.bfloat16
    sizes = sizes_from_config("tiny")
    n = sum(p.numel() for p in tr.parameters())
    stored = sum(p.numel() * p.element_size() for p in tr.parameters())
    largest_block = max(
        sum(p.numel() for p in b.parameters()) for b in [*tr.transformer_blocks, *tr.single_transformer_blocks]
    )
    counted = frozen_base_bytes(sizes, n, 1, 2) - 2 * largest_block  # less its bf16 copies in backward
    assert 0 <= stored - counted <= 0.002 * stored  # the q/k RMSNorm weights (not Linears) stay bf16
    full = sizes_from_config("full")
    assert frozen_base_bytes(full, BASE, 2, 2) == 2 * BASE
    fp8_bytes = frozen_base_bytes(full, BASE, 1, 2)
    assert 11.7 < fp8_bytes / GiB < 11.8  # 11.84 B in 1 byte, 64 M in 2, one double block (340 M) in 2


def test_a_lora_on_union_pro_fits_the_24_gb_tier_at_512_and_1024():
    sizes = sizes_from_config("full")
    for px, lo in ((512, 19.5), (1024, 22.0)):
        p = place("24", sizes, H200, LORA16, BASE, px, px, frozen_exact=CN)
        assert p.base_storage == "float8_e4m3fn" and p.optimizer == "adamw"
        assert p.budget_gb == 22.68 and lo < p.predicted_peak_gb <= p.budget_gb
        assert p.predicted_validation_gb <= p.budget_gb
    # the 512 px run measured on the H200 with the bf16 modulation Linears reserved 22.47 GiB: with those
    # 3.25 B parameters in 2 bytes, the model is over it, as it should be
    p512 = place("24", sizes, H200, LORA16, BASE, 512, 512, frozen_exact=CN)
    assert p512.predicted_peak_gb + 3_247_448_064 / GiB > 22.47
    # the fine-tune's plans stay over what its runs held (35.7 and 36.0 GiB reserved at 512 and 1024 px)
    for px, held in ((512, 35.7), (1024, 36.0)):
        assert place("48", sizes, H200, CN, BASE, px, px).predicted_peak_gb > held


def _full_width(gen):
    t = dict(FULL["transformer"], num_layers=1, num_single_layers=1)
    c = dict(FULL["controlnet"], num_layers=1, num_single_layers=1)
    tr = _random(lambda: FluxTransformer2DModel(**t), "cpu", torch.bfloat16, gen).requires_grad_(False)
    cn = _random(lambda: FluxControlNetModel(**c), "cpu", torch.bfloat16, gen)
    return tr, cn.train().requires_grad_(True)


def test_a_full_width_random_model_trains_in_bf16_with_finite_gradients():
    """The first GPU runs' loss was NaN after the first update (bench/train/TRAIN.md). At full width
    with the benchmark's initialisation (every weight N(0, 0.02), the ControlNet's output layers too),
    bf16, Adafactor at the fine-tune's lr and clipping at 1: the loss, the gradient and the updated
    weights stay finite, and the weights move."""
    gen = torch.Generator().manual_seed(0)
    tr, cn = _full_width(gen)
    batch = dict(
        latents=torch.randn(1, 16, 8, 8, generator=gen) * 0.27,  # the random VAE's latents: std 0.27
        control=torch.randn(1, 16, 8, 8, generator=gen) * 0.27,
        prompt_embeds=torch.nn.functional.normalize(torch.randn(1, 64, 4096, generator=gen), dim=-1) * 64,
        pooled=torch.randn(1, 768, generator=gen) * 0.55,
    )
    params = list(cn.parameters())
    opt = _optimizer("adafactor", params, 1e-5)
    before = [p.detach().clone() for p in params]
    losses = []
    for step in range(2):
        sig, noise = sample_noise(batch["latents"], torch.Generator().manual_seed(step))
        loss = flow_matching_loss(tr, cn, batch, sig, noise, 3.5, 0, torch.bfloat16)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(params, 1.0)
        assert torch.isfinite(loss) and torch.isfinite(norm), (loss, norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert all(torch.isfinite(p).all() for p in params)
    assert any(not torch.equal(p, b) for p, b in zip(params, before))
    assert 0.5 < losses[0] < 20 and 0.5 < losses[1] < 20, losses
