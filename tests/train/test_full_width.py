"""The training plan's byte counts at full size."""

import torch
from diffusers import FluxTransformer2DModel

from core.configs import TINY
from core.device import DeviceInfo
from core.plan.sizes import sizes_from_config
from train.placement import frozen_base_bytes, place
from train.run import place_frozen

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
