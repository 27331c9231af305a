"""Which VRAM tiers this machine can run, and why not: what the UI offers before anyone presses Run.

A tier is a GPU-memory budget, so it needs a CUDA GPU at least that large (cards report a little
under their marketed size: a "24 GB" card has ~23.6 GiB). With the model's sizes the plan itself
decides, for a typical 1024² job with one control: the same refusal the Run would give (host RAM for
streamed weights included).
"""

from __future__ import annotations

from core.device import DeviceInfo
from core.job import GPU_TIERS
from core.plan import JobShape, ModelSizes, plan_for

MARKETING_SLACK_GB = 0.75  # total GiB a card may fall short of its tier's number and still run it
TYPICAL = JobShape(1024, 1024, 1, 1.0)


def runnable_tiers(
    device: DeviceInfo, sizes: ModelSizes | None = None, shape: JobShape = TYPICAL
) -> dict[str, str | None]:
    """Every tier → None when this machine can run it, else the reason in a few words."""
    out: dict[str, str | None] = {"auto": None, "cpu": None}
    for tier in GPU_TIERS[::-1]:
        if device.kind != "cuda":
            out[tier] = "needs a CUDA GPU; none was found"
        elif device.total_gb + MARKETING_SLACK_GB < float(tier):
            out[tier] = f"needs a {tier} GB GPU; this one has {device.total_gb:.0f} GB"
        elif sizes is not None:
            try:
                plan_for(tier, shape, sizes, device)
                out[tier] = None
            except ValueError as e:
                out[tier] = str(e).split(";")[0]
        else:
            out[tier] = None
    return out
