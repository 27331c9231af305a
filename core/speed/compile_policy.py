"""When the fast path compiles its blocks: where the compile pays back.

torch.compile of the denoiser blocks costs 15-30 s once per process (fewer with Inductor's on-disk
cache warm, core.speed.compile_cache) and then saves ~1.5 s per 1024² image on an H100. One image
never earns that back, and a user waiting for the first image of a session should not wait for it.

The process's policy (FastConfig.compile):
- "off": never (the CLI's one image unless --compile; ZeroGPU, where a call may start a fresh process)
- "on": from the first job that reaches the fast path
- "later": from the second such job (the web app): the first image comes without the wait
A job's own choice (Job.compile, core.limits.COMPILES) overrides it: "auto" follows the policy,
"always" and "never" do what they say.
"""

from __future__ import annotations

from typing import Literal

from core.limits import COMPILES

CompilePolicy = Literal["off", "on", "later"]
POLICIES: tuple[CompilePolicy, ...] = ("off", "on", "later")

DEFERRED = (
    "ran without compiling: the first job does not wait 15-30 s for torch.compile; later jobs at this plan "
    "compile (once per process, cached on disk)"
)


def as_policy(value) -> CompilePolicy:
    """A policy from its name, or from a bool (True: "on", False: "off"), as FastConfig took before."""
    if value is True or value is False:
        return "on" if value else "off"
    if value not in POLICIES:
        raise ValueError(f"compile must be one of {', '.join(POLICIES)} (or true/false), got {value!r}.")
    return value


def compiles(policy: CompilePolicy, choice: str, fast_jobs: int) -> bool:
    """Whether a job compiles the blocks, if it reaches the fast path. `choice`: the job's
    (core.limits.COMPILES); `fast_jobs`: jobs of this process that reached the fast path before it."""
    if choice not in COMPILES:
        raise ValueError(f"compile must be one of {', '.join(COMPILES)}, got {choice!r}.")
    if choice != "auto":
        return choice == "always"
    return policy == "on" or (policy == "later" and fast_jobs >= 1)


def deferred(policy: CompilePolicy, choice: str, fast_jobs: int) -> bool:
    """The job runs eager only because it is the first under "later" (its events say so)."""
    return policy == "later" and choice == "auto" and fast_jobs == 0


def compile_seconds() -> float:
    """Seconds torch.compile has spent in this process so far (dynamo's own metric; 0 if absent)."""
    try:
        from torch._dynamo.utils import compilation_time_metrics

        return float(sum(compilation_time_metrics.get("_compile.compile_inner", ())))
    except Exception:  # noqa: BLE001 - a private metric: never let it break a job
        return 0.0
