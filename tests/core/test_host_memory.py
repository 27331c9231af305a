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


def child(code: str, folder, *args) -> dict:
    """Run `code` in a fresh Python on the folder's pipeline; its last line of output, as JSON."""
    proc = subprocess.run(
        [sys.executable, "-c", code, str(folder / "flux"), str(folder / "controlnet"), *map(str, args)],
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


# what the child scripts count: live anonymous memory (malloc_trim first: freed heap back to the OS)
ANON = r"""
import ctypes, gc

def anon():
    gc.collect()
    try:  # freed heap memory back to the OS: what is counted is what is live
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon"):
            return int(line.split()[1]) * 1024
"""

PLACE = (
    r"""
import ctypes, gc, json, sys, torch
from core.models import ModelSpec, load_pipeline
from core.plan.units import denoiser_units
from core.stream.packs import file_backed, file_mappings
from core.stream.residency import Residency

"""
    + ANON
    + r"""

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
)


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


FP8 = (
    r"""
import ctypes, gc, json, sys, torch
from diffusers import FluxControlNetPipeline  # noqa: F401 - imported before measuring
from core.checkpoints import deferred, native_fp8
from core.models import ModelSpec, load_pipeline
from core.plan.units import denoiser_units
from core.stream.packs import _mapped, file_backed, file_mappings
from core.stream.residency import Residency

"""
    + ANON
    + r"""

start = anon()
pipe = load_pipeline(ModelSpec(sys.argv[1], sys.argv[2], transformer=sys.argv[3]), torch.bfloat16)
loaded = anon()
tr = pipe.transformer
maps = file_mappings()
weights = [p for p in tr.parameters() if deferred(p) is not None]
fp8 = sum(p.numel() for p in weights)
file_fp8 = all(native_fp8(p) is not None and _mapped(native_fp8(p).data, maps) for p in weights)
widened = sum(p.numel() for p in tr.parameters() if deferred(p) is None and p.dtype == torch.bfloat16)
units = denoiser_units(tr, None)
keep = [file_backed(m, maps) for _, m in units]
before = anon()
res = Residency(units, "Q" * len(units), torch.device("cpu"), torch.bfloat16, slots=2, ring=4, keep=keep)
placed = anon()
same = all(
    torch.equal(pack.buf[: pack.n8], torch.cat([p.quant_source.data.view(torch.uint8).reshape(-1)
                                                for p in pack.params[: pack._n_comp()]]))
    for pack in res.packs.values()
)
arena, buffers = res.host_arena.numel(), res.gpu_bytes_buffers
res.remove()
del res
after = anon()
print(json.dumps(dict(start=start, loaded=loaded, before=before, placed=placed, after=after, fp8=fp8,
                      file_fp8=file_fp8, widened=widened, kept=sum(keep), units=len(units), same=same,
                      arena=arena, buffers=buffers, deferred=all(deferred(p) is not None for p in weights))))
"""
)


def test_an_fp8_file_is_loaded_and_streamed_as_its_own_bytes_without_a_bf16_copy(folder):
    """A float8 single file: its block weights stay the file's memory-mapped fp8 tensors, the fp8
    packs are their bytes, and neither loading, placing nor releasing makes a bf16 copy of them."""
    from safetensors.torch import load_file, save_file

    from tests.core.byom_files import fp8_state_dict

    path = folder / "transformer-fp8.safetensors"
    if not path.exists():
        sd = load_file(str(next((folder / "flux" / "transformer").glob("*.safetensors"))))
        save_file(fp8_state_dict(sd, "scale_weight"), str(path))
    r = child(FP8, folder, path)
    bf16 = 2 * r["fp8"]  # what a widened copy of the block weights would take
    assert r["fp8"] > 150 * 2**20 and r["file_fp8"] and r["kept"] == r["units"]
    assert r["widened"] < 0.05 * r["fp8"], "only the few layers outside the blocks are widened at load"
    load = r["loaded"] - r["start"]
    assert load < 0.1 * bf16, f"loading took {load / 2**20:.0f} MiB of anonymous RAM ({bf16 / 2**20:.0f} MiB in bf16)"
    assert r["same"], "the fp8 packs are the file's bytes"
    assert r["arena"] < 0.6 * bf16, "fp8 packs: one byte per Linear weight"
    extra = r["placed"] - r["before"] - r["arena"] - r["buffers"]
    assert extra < 0.1 * bf16, f"placing copied {extra / 2**20:.0f} MiB more than its packs and buffers"
    assert r["deferred"] and r["after"] - r["before"] < 0.1 * bf16, "releasing copied the weights back"
