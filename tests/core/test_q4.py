"""4-bit storage (GGUF Q4_0): the bytes gguf writes, the values it reads back, and 4-bit units in the
tiny denoiser computing exactly what their dequantized weights compute, for every placement."""

import copy

import gguf
import numpy as np
import pytest
import torch
from torch import nn

from core.plan.placement import store
from core.plan.units import denoiser_units, q4_params, stored_bytes, unit_sizes
from core.stream import q4
from core.stream.packs import Pack, file_backed, file_mappings
from core.stream.residency import Residency
from tests.core.test_residency import run, tiny_denoiser


def sample(n_blocks=3000, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_blocks, 32, generator=g) * torch.rand(n_blocks, 1, generator=g) * 3
    x[0] = 0  # an all-zero block: scale 0
    x[1, 5] = -x[1].abs().max() - 1  # a negative extreme
    x[2, :] = 1.0  # a constant block
    return x.reshape(-1).to(torch.bfloat16)


def test_bytes_are_the_gguf_reference_quantizer_s():
    x = sample()
    out = torch.empty(q4.q4_bytes(x.numel()), dtype=torch.uint8)
    q4.quantize_into(out, x)
    ref = gguf.quants.quantize(x.float().numpy(), gguf.GGMLQuantizationType.Q4_0).reshape(-1)
    assert np.array_equal(out.numpy(), ref)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_values_are_what_gguf_reads_back_rounded_once(dtype):
    x = sample(seed=1)
    raw = torch.empty(q4.q4_bytes(x.numel()), dtype=torch.uint8)
    q4.quantize_into(raw, x)
    dst = torch.empty(x.numel(), dtype=dtype)
    q4.dequantize_into(dst, raw)
    ref = torch.from_numpy(gguf.quants.dequantize(raw.numpy(), gguf.GGMLQuantizationType.Q4_0).reshape(-1))
    assert torch.equal(dst, ref.to(dtype))
    rel = ((dst.float() - x.float()).norm() / x.float().norm()).item()
    assert 0.02 < rel < 0.12, rel  # 4-bit: a few percent of error, not zero and not garbage


def test_q4_bytes_needs_whole_blocks():
    assert q4.q4_bytes(64) == 36
    with pytest.raises(ValueError, match="multiple of 32"):
        q4.q4_bytes(33)


def test_pack_holds_linear_rows_of_32_as_4_bit_and_the_rest_exact():
    m = nn.Sequential(nn.Linear(64, 96), nn.LayerNorm(96), nn.Linear(96, 48), nn.Linear(48, 37))
    pack = Pack(m, "q4", torch.float32)
    assert pack.n8 == 64 * 96 + 96 * 48  # rows of 64 and 96 values are whole blocks; rows of 48 are not
    sizes = unit_sizes([("u", m)])[0]
    assert pack.nbytes <= stored_bytes(sizes, store("N"), 4) < sizes.numel * 4 / 3


def dequantized_copy(model, codes):
    """The model with the 4-bit-eligible Linear weights of its 4-bit units replaced by their Q4_0
    round trip."""
    model = copy.deepcopy(model)
    with torch.no_grad():
        for (_, unit), code in zip(denoiser_units(*model), codes):
            ids = q4_params(unit) if store(code).q4 else set()
            for p in unit.parameters():
                if id(p) in ids:
                    raw = torch.empty(q4.q4_bytes(p.numel()), dtype=torch.uint8)
                    q4.quantize_into(raw, p.data.reshape(-1))
                    flat = torch.empty(p.numel(), dtype=p.dtype)
                    q4.dequantize_into(flat, raw)
                    p.copy_(flat.view(p.shape))
    return model


@pytest.mark.parametrize("pattern", ["N", "R", "BRNS", "NQ", "RF", "SNBR"])
def test_4_bit_units_compute_what_their_dequantized_weights_compute(pattern):
    tr, cn = tiny_denoiser()
    units = denoiser_units(tr, cn)
    codes = (pattern * len(units))[: len(units)]
    ref_tr, ref_cn = dequantized_copy((tr, cn), codes)
    exact = "".join("B" if store(c).q4 else c for c in codes)  # the reference streams the same way, exactly
    ref_units = denoiser_units(ref_tr, ref_cn)
    ref_res = Residency(ref_units, exact, torch.device("cpu"), torch.float32, slots=2, ring=6)
    ref = run(ref_tr, ref_cn, "cpu")
    ref_res.remove()
    before = [p.detach().clone() for _, m in units for p in m.parameters()]
    res = Residency(units, codes, torch.device("cpu"), torch.float32, slots=2, ring=6)
    got = run(tr, cn, "cpu")
    if "F" in codes or "Q" in codes:  # fp8 units round differently from the reference's exact ones
        assert (got - ref).norm() / ref.norm() < 0.1
    else:
        assert torch.equal(got, ref)
    res.remove()
    after = [p for _, m in units for p in m.parameters()]
    changed = sum(not torch.equal(a, b) for a, b in zip(before, after))
    assert changed > 0, "weights packed as 4-bit come back rounded when their source was not kept"


def test_file_backed_weights_come_back_exactly_and_unchanged(tmp_path):
    from diffusers import FluxTransformer2DModel

    from core.configs import TINY

    torch.manual_seed(0)
    FluxTransformer2DModel(**TINY["transformer"]).save_pretrained(tmp_path / "tr")
    tr = FluxTransformer2DModel.from_pretrained(tmp_path / "tr")  # memory-mapped safetensors
    units = denoiser_units(tr, None)
    maps = file_mappings()
    keep = [file_backed(m, maps) for _, m in units]
    assert all(keep), "diffusers maps safetensors weights from the file"
    assert not file_backed(nn.Linear(4, 4), maps), "a fresh module lives in anonymous memory"
    ptrs = [p.data_ptr() for _, m in units for p in m.parameters()]
    values = [p.detach().clone() for _, m in units for p in m.parameters()]
    codes = ("NRQFSB" * len(units))[: len(units)]
    res = Residency(units, codes, torch.device("cpu"), torch.float32, slots=2, ring=4, keep=keep)
    assert any(p.data_ptr() not in ptrs for _, m in units for p in m.parameters())
    res.remove()
    params = [p for _, m in units for p in m.parameters()]
    assert [p.data_ptr() for p in params] == ptrs, "the very same file-backed tensors, no copies"
    assert all(torch.equal(p, v) for p, v in zip(params, values)), "nothing rounded"


@pytest.mark.gpu
def test_triton_kernel_writes_what_the_torch_ops_write():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    x = sample(n_blocks=100_003, seed=3).cuda()
    raw = torch.empty(q4.q4_bytes(x.numel()), dtype=torch.uint8, device="cuda")
    q4.quantize_into(raw, x)
    for dtype in (torch.bfloat16, torch.float32):
        fast = torch.empty(x.numel(), dtype=dtype, device="cuda")
        q4.dequantize_into(fast, raw)
        cpu = torch.empty(x.numel(), dtype=dtype)  # the torch ops, on the CPU
        q4.dequantize_into(cpu, raw.cpu())
        assert torch.equal(fast.cpu(), cpu)
