"""Precision guards: refuse fp16-stored weights before loading, and notice a run that learns nothing.

FLUX trained from fp16-stored weights learns nothing (X-Flux users saw the saved ControlNet keep the
same sha256 for 30k steps) and fp16 activations overflow: both are refused before anything runs.
Training attention never runs on cuDNN's fused kernel: its backward is reported to return NaN
gradients for some shapes and inputs on Hopper (pytorch#196678, cudnn-frontend#160 and #1072, trl#7181);
inference only runs its forward.
"""

from __future__ import annotations

import json
import struct
from collections import Counter
from pathlib import Path

import torch

TRAINING_ATTENTION = ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "MATH")  # SDPA backends, best first


def training_attention():
    """The SDPA backends a training step may use: every one but cuDNN's. Its backward is the
    reported source of NaN gradients on H100/H200 (the loss of our first GPU runs became NaN after
    the first update, with finite gradients on the CPU); forward and backward both run inside."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([getattr(SDPBackend, name) for name in TRAINING_ATTENTION], set_priority=True)


class TrainingStopped(RuntimeError):
    """The run stopped on purpose (a NaN loss, weights that do not change); one sentence."""


def stored_dtypes(folder: Path) -> Counter:
    """Bytes per stored dtype ("BF16", "F16", "F32", ...) over the folder's safetensors files, read
    from their headers only."""
    counts: Counter = Counter()
    for f in sorted(Path(folder).rglob("*.safetensors")):
        with open(f, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        for name, t in header.items():
            if name != "__metadata__":
                a, b = t["data_offsets"]
                counts[t["dtype"]] += b - a
    return counts


def local_folder(source: str) -> Path | None:
    """The folder holding `source`'s weights: a local folder, or the Hub cache's snapshot (never a
    download: loading says what is missing if it is not there)."""
    p = Path(source).expanduser()
    if p.is_dir():
        return p
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(source, local_files_only=True))
    except Exception:  # noqa: BLE001 - not cached, or not a Hub id: core.models explains it when loading
        return None


def refuse_fp16(source: str, what: str, sub: str = "") -> None:
    """ValueError if most floating-point weights of `source` (its `sub` folder) are stored in fp16."""
    root = local_folder(source)
    if root is None or not (root / sub).is_dir():
        return
    counts = stored_dtypes(root / sub)
    floats = {k: v for k, v in counts.items() if k in ("F16", "BF16", "F32", "F64")}
    if floats and max(floats, key=floats.get) == "F16":
        raise ValueError(
            f"The {what} weights in '{source}' are stored in float16, which FLUX cannot train from (the "
            f"ControlNet learns nothing, or the loss overflows); convert them to bfloat16 or float32 first."
        )


def fingerprint(params) -> list[int]:
    """An exact, cheap fingerprint of tensors: the sum of their raw bytes (any changed bit moves it)."""
    return [int(p.detach().contiguous().view(torch.uint8).sum(dtype=torch.int64)) for p in params]


def check_finite(loss: torch.Tensor, step: int, checkpoint: str | None) -> None:
    if not torch.isfinite(loss).all():
        kept = f"the last good checkpoint is {checkpoint}" if checkpoint else "no checkpoint was written yet"
        raise TrainingStopped(
            f"The loss became {loss.item()} at step {step}, so the run stopped before updating the weights; {kept}."
        )


MAX_SKIPPED = 3  # updates skipped in a row (gradient not finite) before the run stops


def check_skips(in_a_row: int, step: int, checkpoint: str | None) -> None:
    if in_a_row >= MAX_SKIPPED:
        kept = f"the last good checkpoint is {checkpoint}" if checkpoint else "no checkpoint was written yet"
        raise TrainingStopped(
            f"The gradient was not finite for {in_a_row} steps in a row (up to step {step}), so the run stopped; "
            f"lower --lr or check the data; {kept}."
        )


def check_changed(before: list[int], params, steps: int) -> None:
    if before == fingerprint(params):
        raise TrainingStopped(
            f"The ControlNet's weights did not change in the first {steps} optimiser steps (no gradient reaches "
            f"them, or the learning rate is too small for their dtype); stopped."
        )
