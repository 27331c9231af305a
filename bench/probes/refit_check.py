"""The memory model's calibration (core/plan/memory.py CAL) against runs measured under an older one:
each run's predicted resident bytes (its predicted text phase less that model's text allowance and
margin) plus today's transients, margin and fast-path allowance for its pass, next to its peak.
For a change of the constants only: a run placed otherwise by the new model is not re-planned.

usage: python -m bench.probes.refit_check [--ram bench/ram/ram.json]
  rows: bench/ram/ram.json's runs of the codes in MODELS, bench/probes/transients*.json
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from core.device import GiB
from core.plan.memory import CAL, PassShape, margin_bytes, phase_bytes

HERE = Path(__file__).parent


@dataclass(frozen=True)
class Older:
    """The memory model a run was planned by: its text allowance (GiB, frag included), its margin
    as a function of the resident bytes, and its VAE constants (bytes per pixel)."""

    text_gb: float
    margin: Callable[[float], float]
    vae_dec: float
    vae_enc: float


# 7b66791 (bench/ram/ram.json's rows of that code, transients.json) and 1f586ac (the rows of that
# code, transients_streamed.json)
MODELS = {
    "7b66791": Older(0.15 * 1.02, lambda r: 0.18 * GiB, 2810.0, 1300.0),
    "1f586ac": Older(0.24 * 1.02, lambda r: min(0.18 * GiB, 0.03 * r), 2830.0, 1300.0),
}


def resident_of(text_gb: float, m: Older) -> float:
    """The resident bytes a prediction's text phase was made of (text = resident + text + margin)."""
    r = (text_gb - m.text_gb) * GiB
    for _ in range(20):  # the margin depends on the resident bytes: a fixed point
        r = (text_gb - m.text_gb) * GiB - m.margin(r)
    return r


def predicted(pred: dict, side: int, all_resident: bool, m: Older) -> float:
    """Today's predicted peak (GiB) for a run planned by the older model `m`."""
    resident = resident_of(pred["text"], m)
    old_margin = m.margin(resident)
    ph = phase_bytes(PassShape(side, side), 2, CAL, all_resident)
    if all_resident:
        ph["denoise"] += CAL.fast_path_gb * GiB
    # the VAE phases: the older prediction's own transients (their pass and tiling), rescaled
    ph["decode"] = ((pred["decode"] * GiB - old_margin) - resident) * CAL.vae_dec_per_px / m.vae_dec / CAL.frag
    ph["encode_image"] = ((pred["encode_image"] * GiB - old_margin) - resident) * CAL.vae_enc_per_px / m.vae_enc
    ph["encode_image"] /= CAL.frag
    return max(resident + v * CAL.frag + margin_bytes(resident) for v in ph.values()) / GiB


def rows(ram: Path, probes: list[tuple[Path, str]]) -> list[dict]:
    out = []
    for r in json.loads(ram.read_text())["runs"]:
        code = r.get("code", "")[:7]
        if code in MODELS and r["rc"] == 0:
            side = r["tile"] or 1024
            out.append(
                (
                    f"{r['spec']} ({code})",
                    r["predicted_phase_peaks_gb"],
                    side,
                    r["placement"],
                    r["peak_reserved_gb"],
                    MODELS[code],
                )
            )
    for probe, code in probes:
        for r in json.loads(probe.read_text())["runs"]:
            if "error" in r:
                continue
            peak = max(v for k, v in r["reserved"].items() if k != "load")  # load: the previous tier's weights
            name = f"probe {r['tier']}@{r['size']}x{r['controls']} ({code})"
            out.append((name, r["predicted"], r["tile"] or r["size"], r["placement"], peak, MODELS[code]))
    table = []
    for name, pred, side, placement, peak, m in out:
        new = predicted(pred, side, placement.get("B", 0) == sum(placement.values()), m)
        old = max(pred.values())
        table.append(
            dict(run=name, measured=peak, before=old, now=round(new, 2), over_pct=round(100 * (new / peak - 1), 1))
        )
    return table


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ram", type=Path, default=Path("bench/ram/ram.json"))
    a = ap.parse_args(argv)
    probes = [(HERE / "transients.json", "7b66791"), (HERE / "transients_streamed.json", "1f586ac")]
    for row in rows(a.ram, probes):
        print(json.dumps(row))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
