"""The memory model's calibration (core/plan/memory.py CAL) against runs measured under an older one:
each run's predicted resident bytes (its predicted text phase less that model's text allowance and
margin) plus today's transients, margin and fast-path allowance for its pass, next to its peak.
For a change of the constants only: a run placed otherwise by the new model is not re-planned.

usage: python -m bench.probes.refit_check [--ram bench/ram/ram.json --code "7b66791"]
                                          [--probe bench/probes/transients.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from core.device import GiB
from core.plan.memory import CAL, PassShape, margin_bytes, phase_bytes

OLD_TEXT_GB, OLD_MARGIN_GB, OLD_VAE_DEC = 0.15 * 1.02, 0.18, 2810.0  # the model the runs were planned by


def predicted(pred: dict, side: int, all_resident: bool) -> float:
    """Today's predicted peak (GiB) for a run planned by the older model."""
    resident = (pred["text"] - OLD_TEXT_GB - OLD_MARGIN_GB) * GiB
    margin = margin_bytes(resident)
    ph = phase_bytes(PassShape(side, side), 2, CAL, all_resident)
    if all_resident:
        ph["denoise"] += CAL.fast_path_gb * GiB
    # the VAE phases: the older prediction's own transients (their pass and tiling), decode rescaled
    ph["decode"] = (pred["decode"] - OLD_MARGIN_GB) * GiB - resident
    ph["decode"] *= CAL.vae_dec_per_px / OLD_VAE_DEC / CAL.frag
    ph["encode_image"] = ((pred["encode_image"] - OLD_MARGIN_GB) * GiB - resident) / CAL.frag
    return max(resident + v * CAL.frag + margin for v in ph.values()) / GiB


def rows(ram: Path, code: str, probe: Path) -> list[dict]:
    out = []
    for r in json.loads(ram.read_text())["runs"]:
        if r.get("code", "").startswith(code) and r["rc"] == 0:
            side = r["tile"] or 1024
            out.append((r["spec"], r["predicted_phase_peaks_gb"], side, r["placement"], r["peak_reserved_gb"]))
    for r in json.loads(probe.read_text())["runs"]:
        peak = max(v for k, v in r["reserved"].items() if k != "load")  # load: the previous tier's weights
        name = f"probe {r['tier']}@{r['size']}x{r['controls']}"
        out.append((name, r["predicted"], r["tile"] or r["size"], r["placement"], peak))
    table = []
    for name, pred, side, placement, peak in out:
        new = predicted(pred, side, placement.get("B", 0) == sum(placement.values()))
        old = max(pred.values())
        table.append(
            dict(run=name, measured=peak, before=old, now=round(new, 2), over_pct=round(100 * (new / peak - 1), 1))
        )
    return table


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ram", type=Path, default=Path("bench/ram/ram.json"))
    ap.add_argument("--code", default="7b66791")
    ap.add_argument("--probe", type=Path, default=Path("bench/probes/transients.json"))
    a = ap.parse_args(argv)
    for row in rows(a.ram, a.code, a.probe):
        print(json.dumps(row))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
