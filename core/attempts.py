"""What the engine does when an attempt at a job fails: one policy, one function.

An attempt runs a job under a plan. What can go wrong and what follows:
  black   the image is black (NaN in bf16)     → the same job in float32 (once)
  fast    the fast path failed (compile, kernel) → the same plan without that part of it
  gpu     out of GPU memory, in any phase        → the next smaller plan (tier, then tile)
  host    host RAM could not be had or pinned    → a plan that pins less host RAM
Anything else is not the engine's to retry: it reaches the user as it is.

A GPU failure far under the plan's budget says how much the card gives (a card smaller or busier than
the tier asked, or an allocator capped below it): a DeviceLimit. While it holds, plans over it are not
attempted, in the retries of that job and in later jobs: a failed attempt of a large plan costs its
placing and releasing (a minute at full size), and it would fail the same way again.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from core.plan.planner import Plan


@dataclass(frozen=True)
class Failure:
    cause: str  # "black" | "fast" | "gpu" | "host"
    phase: str = ""  # where it happened (the monitor's phase)
    message: str = ""
    requested_gb: float = 0.0  # the allocation that failed (GPU: "Tried to allocate ..."), GiB

    @classmethod
    def of(cls, cause: str, phase: str, err: BaseException) -> Failure:
        """A memory failure from its error: the events' reason and, on the GPU, the failed allocation."""
        text = str(err)
        return cls(cause, phase, short_reason(text), requested_gb(text) if cause == "gpu" else 0.0)


_UNITS = {"B": 2**-30, "KiB": 2**-20, "MiB": 2**-10, "GiB": 1.0, "TiB": 2**10}


def requested_gb(message: str) -> float:
    """The failed allocation of a CUDA out-of-memory message, in GiB (0 where it names none)."""
    m = re.search(r"Tried to allocate ([0-9.]+) ?(B|KiB|MiB|GiB|TiB)", message)
    return float(m.group(1)) * _UNITS[m.group(2)] if m else 0.0


def short_reason(message: str, width: int = 100) -> str:
    """An error's first line for the events: a CUDA out-of-memory one as the allocation that failed
    (its capacity sentence is long, and cut short it read "... of which )"), others cut at a word."""
    line = message.split("\n")[0].strip()
    m = re.search(r"Tried to allocate [0-9.]+ ?(?:B|KiB|MiB|GiB|TiB)", line)
    if m and "out of memory" in line.lower():
        return f"CUDA out of memory: t{m.group(0)[1:]}"
    return line if len(line) <= width else line[:width].rsplit(" ", 1)[0] + " ..."


SLACK_GB = 0.5  # a failure this close to the plan's budget is the plan's estimate, not the card


@dataclass(frozen=True)
class DeviceLimit:
    """What the GPU gave when a plan ran out of memory well under its budget."""

    usable_gb: float  # allocator memory there was: the peak reserved at the failure + the failed request
    visible_gb: float  # GPU memory free plus our allocator's when that attempt started (Engine._visible_gb)
    tier: str  # the plan that failed


def learned_limit(plan: Plan, failure: Failure, peak_reserved_gb: float, visible_gb: float) -> DeviceLimit | None:
    """The DeviceLimit a GPU failure of `plan` shows, or None where it shows none (not the GPU's, not a
    CUDA plan, or close enough to the plan's budget that the estimate, not the card, was short)."""
    usable = peak_reserved_gb + failure.requested_gb
    if failure.cause != "gpu" or plan.device != "cuda" or usable >= plan.budget_gb - SLACK_GB:
        return None
    return DeviceLimit(round(usable, 2), round(visible_gb, 2), plan.tier)


def limit_holds(limit: DeviceLimit | None, visible_gb: float) -> bool:
    """The limit still holds while the GPU shows no more free memory than when it was learned (an
    allocator cap is invisible to the driver: such a limit holds for the process's life)."""
    return limit is not None and visible_gb <= limit.visible_gb + SLACK_GB


def within(plan: Plan, limit: DeviceLimit, smaller: Callable[[Plan], Plan | None]) -> Plan:
    """`plan`, or the first smaller one whose budget fits in what the GPU gave (the smallest there is
    where none does: its attempt will say what fails)."""
    while plan.budget_gb > limit.usable_gb:
        nxt = smaller(plan)
        if nxt is None:
            break
        plan = nxt
    return plan


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
