"""Compiled blocks saved ahead of time and loaded by a later process (core.speed.precompile): the key
tells apart what the dropped guards told apart, a fresh process loads instead of compiling and gets
the eager block's output, and every call the artifact cannot serve takes torch.compile's path."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from core.speed import fp8_compute, fused_blocks, precompile
from core.speed.compile_policy import Counters, compiled_event

pytestmark = pytest.mark.skipif(not precompile.available(), reason="this torch has no ahead-of-time compile")


def blocks(n: int = 2, cls: str = "FluxTransformerBlock"):
    from diffusers.models.transformers import transformer_flux as tf

    torch.manual_seed(0)
    if cls == "FluxTransformerBlock":
        return [tf.FluxTransformerBlock(dim=32, num_attention_heads=2, attention_head_dim=16).eval() for _ in range(n)]
    return [
        tf.FluxSingleTransformerBlock(dim=32, num_attention_heads=2, attention_head_dim=16).eval() for _ in range(n)
    ]


class Holder(torch.nn.Module):
    """Blocks where fp8_compute and fused_blocks look for them."""

    def __init__(self, double=(), single=()):
        super().__init__()
        self.transformer_blocks = torch.nn.ModuleList(double)
        self.single_transformer_blocks = torch.nn.ModuleList(single)


def test_one_class_and_form_share_a_signature_and_a_changed_form_does_not():
    a, b = blocks()
    assert precompile.signature(a) == precompile.signature(b)  # other weights, same graph
    assert fp8_compute.quantize_fp8(Holder(double=[b]), scaled_mm=False) > 0
    assert precompile.signature(a) != precompile.signature(b)
    c = blocks(1)[0].to(torch.bfloat16)
    assert precompile.signature(a) != precompile.signature(c)
    s1, s2 = blocks(2, "FluxSingleTransformerBlock")
    before = precompile.signature(s2)
    assert fused_blocks.fuse_blocks(Holder(single=[s2])) == 1
    assert precompile.signature(s1) == before != precompile.signature(s2)  # a fused forward is another graph


def test_a_block_with_hooks_or_a_foreign_forward_keeps_the_compile_path():
    a, b = blocks()
    assert precompile.prepare(a)
    h = b.register_forward_hook(lambda *_: None)
    assert not precompile.prepare(b)  # the artifact runs forward, which would skip the hook
    h.remove()
    b.forward = lambda **kw: None  # set on the instance, by something other than fused_blocks
    assert not precompile.prepare(b) and "_precompile_signature" not in b.__dict__


def test_the_key_follows_the_inputs_dtypes_and_the_grad_mode():
    (a,) = blocks(1)
    precompile.prepare(a)
    x = (torch.randn(1, 8, 32), torch.randn(1, 4, 32), torch.randn(1, 32), (torch.randn(12, 16),) * 2)
    k = precompile.key(a, x)
    assert precompile.key(a, tuple(t.clone() if isinstance(t, torch.Tensor) else t for t in x)) == k
    assert precompile.key(a, (x[0].double(),) + x[1:]) != k
    with torch.no_grad():
        assert precompile.key(a, x) != k


def test_the_event_says_when_saved_graphs_were_loaded_or_saved():
    loaded = Counters(seconds=2.4, loaded=2)
    assert loaded.cache == "hit"
    assert compiled_event(loaded).startswith("compiled the denoiser blocks (cache hit, 2.4 s: 2 graphs compiled ahead")
    saved = Counters(seconds=31.0, graphs=2, misses=6, saved=2)
    assert saved.cache == "miss" and "next process loads them" in compiled_event(saved)
    assert compiled_event(Counters()) is None


CHILD = r"""
import json, sys, time, torch
sys.path.insert(0, sys.argv[1])
from tests.core.test_precompile import blocks
from core.speed import precompile
from core.speed.compile_policy import compile_seconds

a, b = blocks()
torch.manual_seed(int(sys.argv[2]))
b.load_state_dict({k: torch.randn_like(v) * 0.1 for k, v in b.state_dict().items()})  # other weights
eager = lambda blk, **kw: blk.forward(**kw)
fallbacks = []
fallback = lambda **kw: fallbacks.append(1) or eager(b, **kw)
for blk in (a, b):
    precompile.prepare(blk)
out = {}
with torch.no_grad():
    for n in (48, 80):  # the sequence length is symbolic: one artifact for both
        g = torch.Generator().manual_seed(n)
        kw = dict(hidden_states=torch.randn(1, n, 32, generator=g), encoder_hidden_states=torch.randn(1, 8, 32, generator=g),
                  temb=torch.randn(1, 32, generator=g), image_rotary_emb=(torch.randn(n + 8, 16, generator=g),) * 2)
        got = precompile.call(b, fallback, **kw)
        ref = eager(b, **kw)
        out[n] = max(float((x - y).abs().max()) for x, y in zip(got, ref))
    two = {k: torch.cat([v] * 2) if k != "image_rotary_emb" else v for k, v in kw.items()}
    precompile.call(b, fallback, **two)  # a batch of two fails the saved guards: torch.compile's path
print(json.dumps(dict(err=out, stats=precompile.stats().__dict__, dynamo_s=compile_seconds(), fallbacks=len(fallbacks))))
"""


def run_child(cache: Path, seed: int) -> dict:
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(cache), FLUX_ANYVRAM_CACHE=str(cache.parent))
    root = str(Path(__file__).resolve().parents[2])
    p = subprocess.run(
        [sys.executable, "-c", CHILD, root, str(seed)], capture_output=True, text=True, env=env, timeout=600
    )
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(p.stdout.strip().splitlines()[-1])


def test_a_fresh_process_loads_the_saved_block_instead_of_compiling_and_matches_eager(tmp_path):
    cache = tmp_path / "torch-compile"
    first = run_child(cache, 1)
    assert first["stats"]["compiled"] == 1 and first["stats"]["loaded"] == 0
    assert len(list((cache / "precompiled").glob("*.bin"))) == 1
    second = run_child(cache, 2)  # other weights in the block: the same artifact serves
    assert second["stats"]["loaded"] == 1 and second["stats"]["compiled"] == 0
    assert second["dynamo_s"] == 0, "loading traced nothing"
    for got in (first, second):
        assert all(e < 1e-5 for e in got["err"].values()), got["err"]
        assert got["fallbacks"] == 1 and got["stats"]["fallbacks"] == 1  # the batch of two only
