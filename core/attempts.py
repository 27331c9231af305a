"""What the engine does when an attempt at a job fails: one policy, one function.

An attempt runs a job under a plan. What can go wrong and what follows:
  black   the image is black (NaN in bf16)     → the same job in float32 (once)
  fast    the fast path failed (compile, kernel) → the same plan without that part of it
  gpu     out of GPU memory, in any phase        → the next smaller plan (tier, then tile)
  host    host RAM could not be had or pinned    → a plan that pins less host RAM
Anything else is not the engine's to retry: it reaches the user as it is.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from core.plan.planner import Plan


@dataclass(frozen=True)
class Failure:
    cause: str  # "black" | "fast" | "gpu" | "host"
    phase: str = ""  # where it happened (the monitor's phase)
    message: str = ""


@dataclass(frozen=True)
class Retry:
    plan: Plan
    event: str  # the sentence the user reads


def next_attempt(
    failure: Failure,
    plan: Plan,
    smaller: Callable[[Plan], Plan | None],
    less_host: Callable[[Plan], Plan | None],
    in_float32: Callable[[], Plan],
) -> Retry | str:
    """The next attempt after `failure` under `plan`, or the sentence that ends the job."""
    where = f"in {failure.phase}: {failure.message}" if failure.phase else failure.message
    if failure.cause == "black":
        if plan.dtype == "float32":
            return "the result is black even in float32: check the model weights"
        return Retry(in_float32(), f"the result was black (NaN) in {plan.dtype}: rerun in float32")
    if failure.cause == "fast":
        return Retry(plan, failure.message)
    if failure.cause == "host":
        nxt = less_host(plan)
        if nxt is None:
            return (
                f"Not enough host RAM for the {plan.tier} plan ({where}); it pins {plan.host_ram_gb:.1f} GiB. "
                "Close other programs, or choose a larger tier (it streams less from host RAM)."
            )
        return Retry(
            nxt,
            f"host RAM ran out ({where}) with the {plan.tier} plan ({plan.host_ram_gb:.1f} GiB pinned): "
            f"retried with the {nxt.tier} plan pinning {nxt.host_ram_gb:.1f} GiB",
        )
    nxt = smaller(plan)
    if nxt is None and plan.device == "cpu":
        return (
            "Out of memory on the CPU even with the smallest tiles; close other "
            "programs or lower the size or upscale factor."
        )
    if nxt is None:
        return (
            "Out of GPU memory even with the smallest plan; close other programs "
            "using the GPU, lower the size or upscale factor, or choose the CPU tier."
        )
    return Retry(
        nxt,
        f"out of memory ({where}) with the {plan.tier} plan (tile {plan.tile}): "
        f"stepped down to the {nxt.tier} plan (tile {nxt.tile}) and retried",
    )
