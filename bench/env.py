"""Where a benchmark ran: device, versions, command; and writing JSON + a Markdown table."""

from __future__ import annotations

import json
import platform
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


def write(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1))


def md_table(rows: list[dict], cols: list[str]) -> str:
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        out.append("| " + " | ".join("" if r.get(c) is None else str(r.get(c)) for c in cols) + " |")
    return "\n".join(out)
