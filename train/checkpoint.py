"""Resumable state: the trained weights (by name), the optimiser's state, the step, the losses so far
and the RNG states, in `OUT/checkpoints/step-NNNNNN/`. The data order and the noise of every step
are functions of (seed, step), so a resumed run replays the uninterrupted run exactly.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

KEEP = 2  # checkpoints kept: the last good one and the one before


def folder(out: Path, step: int) -> Path:
    return out / "checkpoints" / f"step-{step:06d}"


def latest(out: Path) -> Path | None:
    done = sorted(p for p in (out / "checkpoints").glob("step-*") if (p / "state.json").is_file())
    return done[-1] if done else None


SAME = ("control", "seed", "batch_size", "resolution", "lora_rank", "new_controlnet", "model", "controlnet")


def check_same(path: Path, config: dict) -> None:
    """A resumed run must be the same run: ValueError naming the first setting that differs."""
    saved = json.loads((path / "state.json").read_text())["config"]
    for k in SAME:
        if saved.get(k) != config.get(k):
            raise ValueError(
                f"The checkpoint '{path.name}' was made with {k}={saved.get(k)!r}, not {config.get(k)!r}; "
                f"resume with the same settings, or choose another --out."
            )


def save(out: Path, step: int, named: dict[str, torch.Tensor], optimizer, losses: list[float], meta: dict) -> Path:
    """Write the checkpoint under a temporary name and rename it: a run killed while saving leaves
    the previous checkpoint intact."""
    from safetensors.torch import save_file

    target = folder(out, step)
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in named.items()}, str(tmp / "trainable.safetensors"))
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save({"cpu": torch.get_rng_state()}, tmp / "rng.pt")
    (tmp / "state.json").write_text(json.dumps(dict(meta, step=step, losses=losses)))
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    for old in sorted(p for p in (out / "checkpoints").glob("step-*") if not p.name.endswith(".tmp"))[:-KEEP]:
        shutil.rmtree(old, ignore_errors=True)
    return target


def load(path: Path, named: dict[str, torch.nn.Parameter], optimizer) -> dict:
    """Restore weights and optimiser state in place; returns the saved state (step, losses, ...)."""
    from safetensors.torch import load_file

    saved = load_file(str(path / "trainable.safetensors"))
    missing = sorted(set(named) - set(saved))
    if missing:
        raise ValueError(f"The checkpoint '{path}' does not hold '{missing[0]}'; it was made by another configuration.")
    with torch.no_grad():
        for name, p in named.items():
            p.copy_(saved[name].to(p.device, p.dtype))
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True))
    torch.set_rng_state(torch.load(path / "rng.pt", weights_only=True)["cpu"])
    return json.loads((path / "state.json").read_text())
