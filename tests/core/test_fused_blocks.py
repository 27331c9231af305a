"""core.speed.fused_blocks on the tiny model: the same outputs without the GELU pass and the
concatenation, every module back exactly on undo, and fp8 layers taking the parts."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from core.speed import fp8_compute, fused_blocks
from tests.core.test_fast import parts, rel_err, same_state, state, transformer_inputs  # noqa: F401


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_linear_gelu_op_is_gelu_tanh_of_the_linear(device):
    torch.manual_seed(0)
    x, w, b = (torch.randn(2, 5, 16), torch.randn(24, 16), torch.randn(24))
    ref = F.gelu(F.linear(x, w, b), approximate="tanh")
    out = fused_blocks.linear_gelu(x.to(device), w.to(device), b.to(device)).cpu()
    assert out.shape == (2, 5, 24)
    torch.testing.assert_close(out, ref, rtol=1e-3, atol=1e-4)  # the tanh form (erf differs by ~5e-4)
    if device == "cuda":  # and compiled, in bf16, as the fast path runs it
        xb, wb, bb = (t.to(device, torch.bfloat16) for t in (x, w, b))
        got = torch.compile(lambda *a: fused_blocks.linear_gelu(*a), fullgraph=True, dynamic=True)(xb, wb, bb)
        assert rel_err(got.float().cpu(), ref) < 0.02


def test_project_parts_is_the_linear_of_the_concatenation():
    torch.manual_seed(1)
    lin = nn.Linear(40, 12)
    a, m = torch.randn(3, 7, 8), torch.randn(3, 7, 32)
    torch.testing.assert_close(
        fused_blocks.project_parts(lin, (a, m)), lin(torch.cat([a, m], -1)), rtol=1e-5, atol=1e-5
    )
    f8 = fp8_compute.Fp8Linear(lin, scaled_mm=False, split=(8, 32))
    torch.testing.assert_close(fused_blocks.project_parts(f8, (a, m)), f8(torch.cat([a, m], -1)))
    with pytest.raises(ValueError, match="parts of widths"):
        f8((m, a))


@pytest.mark.parametrize("fp8", [False, True])
def test_fused_blocks_give_the_same_output_and_undo_exactly(parts, fp8):  # noqa: F811
    tr = parts.transformer.to(torch.bfloat16 if fp8 else torch.float32)
    kw = transformer_inputs(dtype=torch.bfloat16 if fp8 else torch.float32)
    before = state(tr)
    with torch.no_grad():
        ref = tr(**kw)[0]
        if fp8:
            fp8_compute.quantize_fp8(tr)
            ref = tr(**kw)[0]
            fp8_compute.dequantize_fp8(tr)
        assert fused_blocks.fuse_blocks(tr) == 2 * 2 + 2 and fused_blocks.fuse_blocks(tr) == 0  # idempotent
        assert fused_blocks.is_fused(tr)
        block = tr.single_transformer_blocks[0]
        assert isinstance(block.proj_mlp, fused_blocks.LinearGELU) and isinstance(block.act_mlp, nn.Identity)
        assert isinstance(tr.transformer_blocks[0].ff.net[0], fused_blocks.LinearGELU)
        if fp8:
            fp8_compute.quantize_fp8(tr)  # the Linear inside LinearGELU takes fp8 too
            assert isinstance(block.proj_mlp.linear, fp8_compute.Fp8Linear)
            assert block.proj_out.split == (32, 128)
        out = tr(**kw)[0]
        if fp8:
            fp8_compute.dequantize_fp8(tr)
    assert rel_err(out, ref) < (0.02 if fp8 else 1e-5), "the same function, computed in other passes"
    assert fused_blocks.unfuse_blocks(tr) == 6 and not fused_blocks.is_fused(tr)
    assert type(tr.transformer_blocks[0].ff.net[0]).__name__ == "GELU"
    assert isinstance(tr.single_transformer_blocks[0].act_mlp, nn.GELU)
    assert same_state(state(tr), before)
    with torch.no_grad():
        torch.testing.assert_close(tr(**kw)[0], ref if not fp8 else tr(**kw)[0])


def test_the_mirrored_forward_is_the_installed_diffusers_one(parts, monkeypatch):  # noqa: F811
    """single_block_forward copies diffusers' FluxSingleTransformerBlock.forward: when diffusers changes
    it, this fails (update the mirror and its hash), and the engine leaves those blocks alone."""
    block = type(parts.transformer.single_transformer_blocks[0])
    assert fused_blocks._mirrors(block), "diffusers' single block forward changed: re-mirror it"
    monkeypatch.setattr(fused_blocks, "MIRRORED_FORWARD", "0" * 16)
    fused_blocks._mirrors.cache_clear()
    try:
        assert fused_blocks.fuse_blocks(parts.transformer) == 2 * 2  # only the feed-forward GELUs
        single = parts.transformer.single_transformer_blocks[0]
        assert fused_blocks.is_fused(parts.transformer) and "forward" not in vars(single)
        assert isinstance(single.act_mlp, nn.GELU)
        assert fused_blocks.unfuse_blocks(parts.transformer) == 2 * 2 and not fused_blocks.is_fused(parts.transformer)
    finally:
        fused_blocks._mirrors.cache_clear()
