"""Host RAM while loading: the real loading code (core.models.load_pipeline) keeps the weights in
memory-mapped safetensors pages (file-backed, which the kernel can drop and re-read) instead of
copying them into anonymous memory. That is what lets a 32 GB machine load the 40 GB bf16 FLUX +
ControlNet + T5 set: only the plan's pinned arena (fp8 packs) becomes anonymous RAM.

Measured in a fresh subprocess (/proc/self/status: RssAnon vs RssFile) on a pipeline folder whose
transformer is ~0.4 GB, so the effect is far above allocator noise."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")

CHILD = r"""
import json, sys, torch
from diffusers import FluxControlNetPipeline  # noqa: F401 - imported before measuring
from core.models import ModelSpec, load_pipeline

def rss():
    d = {}
    for line in open("/proc/self/status"):
        if line.startswith(("RssAnon", "RssFile")):
            k, v = line.split(":")
            d[k] = int(v.split()[0]) * 1024
    return d

before = rss()
pipe = load_pipeline(ModelSpec(sys.argv[1], sys.argv[2]), torch.bfloat16)
loaded = rss()
with torch.no_grad():  # read every transformer weight: its pages come in as file pages
    total = sum(float(p.float().sum()) for p in pipe.transformer.parameters())
touched = rss()
nbytes = sum(p.numel() * p.element_size() for p in pipe.transformer.parameters())
print(json.dumps(dict(before=before, loaded=loaded, touched=touched, nbytes=nbytes,
                      dtype=str(pipe.transformer.dtype))))
"""


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """The demo pipeline with a wider transformer (~0.4 GB in bf16) saved as safetensors."""
    from diffusers import FluxTransformer2DModel

    from core.configs import TINY
    from core.demo_model import ensure_demo_model

    root = ensure_demo_model()
    out = tmp_path_factory.mktemp("midsize")
    shutil.copytree(root / "flux", out / "flux", ignore=shutil.ignore_patterns("transformer"))
    shutil.copytree(root / "controlnet-union", out / "controlnet")
    cfg = dict(
        TINY["transformer"],
        attention_head_dim=128,
        num_attention_heads=8,
        axes_dims_rope=[16, 56, 56],
        num_layers=3,
        num_single_layers=6,
    )
    torch.manual_seed(0)
    FluxTransformer2DModel(**cfg).to(torch.bfloat16).save_pretrained(
        out / "flux" / "transformer", safe_serialization=True
    )
    return out


def child(code: str, folder) -> dict:
    """Run `code` in a fresh Python on the folder's pipeline; its last line of output, as JSON."""
    proc = subprocess.run(
        [sys.executable, "-c", code, str(folder / "flux"), str(folder / "controlnet")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
        env={"PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_loaded_weights_stay_in_file_backed_pages(folder):
    r = child(CHILD, folder)
    n = r["nbytes"]
    assert n > 300 * 2**20 and r["dtype"] == "torch.bfloat16"
    anon = r["touched"]["RssAnon"] - r["before"]["RssAnon"]
    file = r["touched"]["RssFile"] - r["before"]["RssFile"]
    assert anon < 0.25 * n, f"loading copied {anon / 2**20:.0f} MiB of {n / 2**20:.0f} MiB into anonymous RAM"
    assert file > 0.8 * n, f"only {file / 2**20:.0f} MiB of {n / 2**20:.0f} MiB came from the files"


PLACE = r"""
import ctypes, gc, json, sys, torch
from core.models import ModelSpec, load_pipeline
from core.plan.units import denoiser_units
from core.stream.packs import file_backed, file_mappings
from core.stream.residency import Residency

def anon():
    gc.collect()
    try:  # freed heap memory back to the OS: what is counted is what is live
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon"):
            return int(line.split()[1]) * 1024

pipe = load_pipeline(ModelSpec(sys.argv[1], sys.argv[2]), torch.bfloat16)
units = denoiser_units(pipe.transformer, None)
nbytes = sum(p.numel() * p.element_size() for _, m in units for p in m.parameters())
maps = file_mappings()
keep = [file_backed(m, maps) for _, m in units]
gc.collect()
before = anon()
res = Residency(units, "N" * len(units), torch.device("cpu"), torch.bfloat16, slots=2, ring=4, keep=keep)
placed = anon()
arena, buffers = res.host_arena.numel(), res.gpu_bytes_buffers  # on the CPU the buffers are host RAM too
res.remove()
del res
gc.collect()
after = anon()
print(json.dumps(dict(before=before, placed=placed, after=after, nbytes=nbytes, kept=sum(keep), units=len(units),
                      arena=arena, buffers=buffers)))
"""


def test_a_4_bit_placement_holds_its_packs_only_and_releases_without_copies(folder):
    """Packing streams file-backed weights into 4-bit packs without a second full copy in anonymous
    RAM, and releasing gives the file-backed tensors back instead of unpacking them."""
    r = child(PLACE, folder)
    n = r["nbytes"]
    assert r["kept"] == r["units"], "every unit of a loaded checkpoint is file-backed"
    assert r["arena"] < 0.3 * n, "4-bit packs: 4.5 bits per Linear weight"
    extra = r["placed"] - r["before"] - r["arena"] - r["buffers"]  # a second copy would be n (or 0.28 n)
    assert extra < 0.2 * n, f"placing copied {extra / 2**20:.0f} MiB more than its packs and buffers"
    # a copy back would be n; what stays is the C allocator's slack from packing's temporaries
    assert r["after"] - r["before"] < 0.25 * n, "releasing copied the weights back into anonymous RAM"
