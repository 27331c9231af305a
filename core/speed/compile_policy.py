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

from dataclasses import dataclass
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


@dataclass(frozen=True)
class Counters:
    """What torch.compile has done in this process, from torch's own counters: seconds, graphs
    compiled, and entries of Inductor's on-disk caches (FX graphs, AOTAutograd) found or not found.
    `Counters.now() - before` is what happened in between."""

    seconds: float = 0.0
    graphs: int = 0
    hits: int = 0
    misses: int = 0
    loaded: int = 0  # ahead-of-time artifacts loaded (core.speed.precompile)
    saved: int = 0  # ... compiled and saved for the next process

    @classmethod
    def now(cls) -> Counters:
        from core.speed import precompile

        pre = precompile.stats()
        seconds = compile_seconds() - pre.dynamo_seconds + pre.seconds  # loading counts, nothing twice
        try:
            from torch._dynamo.utils import counters
        except Exception:  # noqa: BLE001 - private counters: never let them break a job
            return cls(seconds, loaded=pre.loaded, saved=pre.compiled)
        ind, aot = counters["inductor"], counters["aot_autograd"]
        return cls(
            seconds,
            counters["stats"]["unique_graphs"],
            ind["fxgraph_cache_hit"] + aot["autograd_cache_hit"],
            ind["fxgraph_cache_miss"] + aot["autograd_cache_miss"],
            pre.loaded,
            pre.compiled,
        )

    def __sub__(self, before: Counters) -> Counters:
        return Counters(
            max(0.0, self.seconds - before.seconds),
            self.graphs - before.graphs,
            self.hits - before.hits,
            self.misses - before.misses,
            self.loaded - before.loaded,
            self.saved - before.saved,
        )

    @property
    def cache(self) -> str | None:
        """The on-disk caches over these counts: "hit" (Inductor's cache or a saved artifact served every
        graph), "miss" (some were compiled afresh) or None (not asked: nothing compiled, another backend)."""
        if self.misses > 0 or self.saved > 0:
            return "miss"
        return "hit" if self.hits > 0 or self.loaded > 0 else None


def compiled_event(done: Counters) -> str | None:
    """The job's sentence about what it compiled (`done`: the counters' change over the job), or
    None where it compiled nothing."""
    if done.graphs <= 0 and done.loaded <= 0 and done.saved <= 0 and done.seconds < 0.5:
        return None
    if done.loaded > 0 and done.cache == "hit":
        return (
            f"compiled the denoiser blocks (cache hit, {done.seconds:.1f} s: {done.loaded} graphs compiled ahead of "
            f"time by an earlier process, loaded from the cache root; included in the denoise time)"
        )
    if done.saved > 0:
        return (
            f"compiled the denoiser blocks in {done.seconds:.1f} s (saved ahead of time under the cache root: the "
            f"next process loads them; included in the denoise time)"
        )
    if done.cache == "hit":
        return (
            f"compiled the denoiser blocks (cache hit, {done.seconds:.1f} s: Inductor's on-disk cache had the "
            f"kernels; included in the denoise time)"
        )
    return (
        f"compiled the denoiser blocks in {done.seconds:.1f} s (once per process and dtype, kept on disk for "
        f"the next process; included in the denoise time)"
    )
