"""Where a benchmark ran: device, versions, command, what the fast path finds on the GPU; the
children the GPU benchmarks share; writing JSON + a Markdown table."""

from __future__ import annotations

import json
import platform
import subprocess
import sys
from pathlib import Path


def environment() -> dict:
    import diffusers
    import torch
    import transformers

    env = dict(
        python=platform.python_version(),
        torch=torch.__version__,
        diffusers=diffusers.__version__,
        transformers=transformers.__version__,
        command=" ".join(["python"] + sys.argv),
    )
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        env.update(device=p.name, device_memory_gib=round(p.total_memory / 2**30, 1))
    else:
        env.update(device="cpu")
    return env


def child_environment() -> dict:
    """environment() as a child process sees it: a benchmark that reads the driver's figure for its
    children must hold no CUDA context itself."""
    code = "import json; from bench.env import environment; print(json.dumps(environment()))"
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    return json.loads(p.stdout.strip().splitlines()[-1]) if p.returncode == 0 else {}


def ensure_model(folder: Path) -> None:
    """The full-size random-weight model as diffusers folders (bench.bench_recovery.write_model),
    written in a child process if missing (it builds on the GPU and must not leave a context here)."""
    if not (folder / "flux" / "model_index.json").exists():
        code = f"from pathlib import Path; from bench.bench_recovery import write_model; write_model(Path('{folder}'))"
        subprocess.run([sys.executable, "-c", code], check=True)


def capped(entry: str) -> str:
    """`python -c` code running `entry`'s main(argv) with the allocator capped at argv[1] GiB."""
    return (
        "import sys, torch; cap = float(sys.argv[1]); total = torch.cuda.get_device_properties(0).total_memory; "
        "torch.cuda.set_per_process_memory_fraction(cap * 2**30 / total); "
        f"from {entry} import main; sys.exit(main(sys.argv[2:]))"
    )


def fast_path_features() -> dict:
    """What the fast path finds on this GPU; each item on its own, so one failure costs only itself."""
    import importlib.metadata as md

    import torch

    from core.speed import attention, fast, fp8_compute

    items = dict(
        capability=lambda: ".".join(map(str, torch.cuda.get_device_capability())),
        fp8_supported=fp8_compute.fp8_supported,
        cudnn_attention=lambda: attention.attention_available("cudnn"),
        flash_attention=lambda: attention.attention_available("flash"),
        auto_attention=lambda: attention.resolve_attention("auto", "cuda"),
        can_compile=lambda: fast.can_compile("inductor", "cuda"),
        triton=lambda: next((md.version(n) for n in ("triton", "pytorch-triton") if _installed(md, n)), None),
        cudnn=lambda: torch.backends.cudnn.version(),
    )
    out = {}
    for k, f in items.items():
        try:
            out[k] = f()
        except Exception as e:  # noqa: BLE001
            out[k] = f"error: {type(e).__name__}: {str(e)[:100]}"
    return out


def _installed(md, name: str) -> bool:
    try:
        md.version(name)
        return True
    except md.PackageNotFoundError:
        return False


def write(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1))


def md_table(rows: list[dict], cols: list[str]) -> str:
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        out.append("| " + " | ".join("" if r.get(c) is None else str(r.get(c)) for c in cols) + " |")
    return "\n".join(out)
