"""The table of plans tests/core/test_plan_table.py checks: `python -m tests.core.plan_table OUT` writes it."""

import json
import sys

from core.device import DeviceInfo
from core.plan import JobShape, plan_for
from core.plan.sizes import sizes_from_config

DEVICES = {
    "h100": DeviceInfo("cuda", "H100", 79.2, 78.0, True, 120.0, 51.0, 700.0),
    "consumer": DeviceInfo("cuda", "nominal GPU", 24.0, 24.0, True, 30.0),
    "consumer_nobf16": DeviceInfo("cuda", "old GPU", 12.0, 11.5, False, 30.0),
    # the H200 of bench/ram in a 16 GiB memory cgroup, with its measured context: 4-bit plans
    "h200_16gb_ram": DeviceInfo("cuda", "H200", 139.8, 139.0, True, 16.0, 50.9, 780.0, context_gb=0.82),
}
JOBS = [
    (1024, 1024, 1, 1.0),
    (1024, 1024, 2, 1.0),
    (768, 1344, 1, 1.0),
    (1024, 1024, 1, 2.0),
    (2048, 2048, 1, 1.0),
    (512, 512, 3, 4.0),
    (1536, 1024, 1, 1.5),
]
TIERS = ("auto", "cpu", "48", "24", "16", "12", "8", "6", "4")
KEYS = (
    "tier",
    "device",
    "budget_gb",
    "dtype",
    "placement",
    "slots",
    "text_encoders",
    "vae_tiling",
    "tile",
    "overlap",
    "predicted_peak_gb",
    "predicted_step_s",
    "host_ram_gb",
    "notes",
    "upscale_tile",
    "ring",
)


def table() -> dict:
    out = {}
    for dname, dev in DEVICES.items():
        for model in ("full", "tiny"):
            sizes = sizes_from_config(model)
            for tier in TIERS:
                for w, h, c, up in JOBS:
                    key = f"{dname}/{model}/{tier}/{w}x{h}/c{c}/u{up}"
                    try:
                        p = plan_for(tier, JobShape(w, h, c, up), sizes, dev)
                    except ValueError as e:
                        out[key] = {"error": str(e)}
                        continue
                    d = {k: v for k, v in p.summary().items() if k in KEYS}
                    out[key] = dict(d, placement_codes=p.placement.units)
    return out


if __name__ == "__main__":
    json.dump(table(), open(sys.argv[1], "w"), indent=0, sort_keys=True)
