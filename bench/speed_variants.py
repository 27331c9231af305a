"""The variants bench/bench_speed.py measures, by name: diffusers' two, and ours with modifiers.

ours_<bf16|fp8>[_<mod>...]: each mod is a change to core.speed.fast.FastConfig (or, end08, to the job).
"""

from __future__ import annotations

VARIANTS = ("eager", "diffusers_compile", "ours_bf16", "ours_fp8", "ours_bf16_end08", "ours_bf16_flash")
DIFFUSERS = ("eager", "diffusers_compile")
TUNED = (("coordinate_descent_tuning", True), ("coordinate_descent_check_all_directions", True))
MODS = dict(
    static=dict(dynamic=False),
    autotune=dict(mode="max-autotune-no-cudagraphs"),
    cudagraphs=dict(mode="reduce-overhead"),
    tuned=dict(options=TUNED),
    flash=dict(attention="flash"),
    nofuse=dict(fuse_blocks=False),
    graphs=dict(cuda_graphs=True),
)
RECOMPILE = {"static", "autotune", "cudagraphs", "tuned"}  # mods whose compiled blocks differ from the default


def parse_variant(v: str) -> tuple[bool, float, dict] | None:
    """ours_<bf16|fp8>[_mod...] → (fp8, control end, FastConfig changes); None if not one of ours."""
    parts = v.split("_")
    if parts[0] != "ours" or len(parts) < 2 or parts[1] not in ("bf16", "fp8"):
        return None
    cfg, end = {}, 1.0
    for mod in parts[2:]:
        if mod == "end08":
            end = 0.8
        elif mod in MODS:
            cfg.update(MODS[mod])
        else:
            raise ValueError(f"unknown modifier {mod!r} in {v!r}; choose from end08, {', '.join(MODS)}")
    return parts[1] == "fp8", end, cfg


def recompiles(v: str) -> bool:
    return bool(RECOMPILE & set(v.split("_")[2:]))


def is_variant(v: str) -> bool:
    if v in VARIANTS:
        return True
    try:
        return parse_variant(v) is not None
    except ValueError:
        return False
