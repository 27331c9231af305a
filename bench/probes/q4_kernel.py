"""GPU probe: the Triton Q4_0 kernel against the torch ops, and its speed next to an fp8 cast.

usage: python -m bench.probes.q4_kernel   (prints one JSON line)
"""

import json
import time

import torch

from core.stream import q4


def timed(fn, reps=20):
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / reps


def main():
    n = 75_497_472  # the largest FLUX unit's Linear weights (a single block's MLP, 3072 x 12288 x 2)
    x = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    raw = torch.empty(q4.q4_bytes(n), dtype=torch.uint8, device="cuda")
    t_q = timed(lambda: q4.quantize_into(raw, x), reps=3)
    dst = torch.empty(n, dtype=torch.bfloat16, device="cuda")
    t_dq = timed(lambda: q4.dequantize_into(dst, raw))
    cpu = torch.empty(n, dtype=torch.bfloat16)
    q4.dequantize_into(cpu, raw.cpu())
    f8 = x.to(torch.float8_e4m3fn)
    t_f8 = timed(lambda: dst.copy_(f8))
    q4.dequantize_into(dst, raw)
    rel = ((dst.float() - x.float()).norm() / x.float().norm()).item()
    out = dict(
        numel=n,
        triton_equals_torch=bool(torch.equal(dst.cpu(), cpu)),
        quantize_ms=round(t_q * 1e3, 2),
        dequant_ms=round(t_dq * 1e3, 3),
        dequant_gbps=round(n * 2.5625 / t_dq / 1e9, 1),
        fp8_cast_ms=round(t_f8 * 1e3, 3),
        fp8_cast_gbps=round(n * 3 / t_f8 / 1e9, 1),
        q4_rel_error=round(rel, 4),
    )
    print("Q4PROBE", json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
