"""Compiled kernels that outlive the process: Inductor's caches under the app's cache root.

torch.compile's FX-graph and AOTAutograd caches are keyed by the graph, the torch version, the
device and the compile options, so a new torch, diffusers forward or GPU misses the cache instead
of reusing something stale. Kept under `<cache root>/torch-compile` (FLUX_ANYVRAM_CACHE moves it)
unless TORCHINDUCTOR_CACHE_DIR says otherwise."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """Where Inductor's on-disk caches are (or will be, once use_persistent_cache has run)."""
    from core.demo_model import cache_root

    return Path(os.environ.get("TORCHINDUCTOR_CACHE_DIR") or cache_root() / "torch-compile")


def use_persistent_cache() -> Path:
    """Point Inductor's on-disk caches at the cache root (once; an explicit setting wins)."""
    path = Path(os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache_dir())))
    os.environ.setdefault("TORCHINDUCTOR_FX_GRAPH_CACHE", "1")
    os.environ.setdefault("TORCHINDUCTOR_AUTOGRAD_CACHE", "1")
    return path


def has_kernels(path: Path | None = None) -> bool:
    """Inductor has stored compiled graphs there before: a guess that compiling will mostly hit the
    cache (graphs of another torch, GPU or block code still miss)."""
    try:
        return any(((path or cache_dir()) / "fxgraph").iterdir())
    except OSError:
        return False


def state(precompile: bool = True) -> str:
    """What an earlier process left for compiling (core.plan.first_job.CompileCache): "artifacts"
    (ahead-of-time graphs, core.speed.precompile, where this process uses them), "kernels" (Inductor's
    cache) or "cold"."""
    from core.speed import precompile as pre

    if precompile and pre.has_artifacts():
        return "artifacts"
    return "kernels" if has_kernels() else "cold"
