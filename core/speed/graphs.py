"""CUDA graphs around whole denoiser calls (part of the fast path, core/speed/fast.py; opt-in).

Compiled, a step's kernels take less time than Python needs to launch them: the profile in
bench/SPEED_PROFILE.md shows the GPU idle 9 % of a bf16 step and 20 % of an fp8 step, where eager
diffusers keeps it busy. A CUDA graph replays a whole ControlNet or transformer call with one launch.
torch.compile's own graphs ("reduce-overhead") fail on regionally compiled blocks (one graph replays
for every block of a class while the ControlNet keeps each block's output), so the graphs here are
one level up: one per call of `pipe.controlnet` and of `pipe.transformer`, per input form.

- A call form (the structure of the arguments, tensor shapes/dtypes, other values such as the
  conditioning scale, which the graph bakes in) runs eagerly the first time (compiling, choosing
  kernels), is captured the second time and replayed from then on.
- Inputs are copied into the graph's own tensors before each replay, except tensors that already
  are a graph's outputs (the ControlNet's residuals feed the transformer's graph without a copy).
- Outputs are the graph's tensors, overwritten by the next replay of the same graph: diffusers uses
  each call's outputs before the next call of that model (the residuals in the transformer call of
  the same step, the noise prediction in the scheduler step).
- All graphs share one memory pool; they run one at a time in the order of the denoising loop.
  Graphs point at the weights: `GraphedCalls.clear` (called whenever the fast path changes the
  modules) drops them, and at most `max_forms` forms are kept per model.
- A capture that fails turns graphs off for that model and runs it eagerly; the error is logged
  and the job's events say so.

Measured (H100, full size, bench/SPEED_PROFILE.md run 4): 5.17 → 5.01 s per 1024² image in bf16, the
same pixels, +1.2 GiB reserved. Opt-in (FastConfig.cuda_graphs) until the planner counts the pool.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from core.patch import restore_forward, set_forward

log = logging.getLogger(__name__)


def form_of(leaves: list) -> tuple | None:
    """A hashable description of a call's leaves; None where a leaf cannot be part of a graph's key."""
    out = []
    for x in leaves:
        if isinstance(x, torch.Tensor):
            out.append(("T", tuple(x.shape), x.dtype, x.device, x.stride()))
        elif x is None or isinstance(x, (bool, int, float, str)):
            out.append(("V", type(x).__name__, x))
        else:
            return None
    return tuple(out)


@dataclass
class _Graph:
    graph: Any  # torch.cuda.CUDAGraph
    inputs: list  # the graph's copies of the tensor leaves (None for other leaves)
    out: Any


@dataclass
class GraphedCalls:
    """The graphs of one model's calls. `capture` makes (graph, outputs) from a function and its
    inputs; tests swap in a stand-in to check the bookkeeping without a GPU."""

    max_forms: int = 4
    capture: Callable | None = None
    graphs: dict = field(default_factory=dict)
    seen: set = field(default_factory=set)
    disabled: str | None = None  # why graphs are off for this model
    replays: int = 0

    def clear(self) -> None:
        self.graphs.clear()
        self.seen.clear()

    def call(self, fn: Callable, pool: Pool, *args, **kwargs):
        if self.disabled:
            return fn(*args, **kwargs)
        leaves, spec = tree_flatten((args, kwargs))
        form = form_of(leaves)
        if form is None:
            return fn(*args, **kwargs)
        key = (spec, form)
        g = self.graphs.get(key)
        if g is None:
            if key not in self.seen:  # first time: eager (compiles, picks kernels)
                self.seen.add(key)
                return fn(*args, **kwargs)
            if len(self.graphs) >= self.max_forms:
                self.clear()
            try:
                g = self._capture(fn, pool, leaves, spec)
            except Exception as e:  # noqa: BLE001 - a graph is an optimization: run without it
                self.disabled = f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
                log.warning("CUDA graph capture failed, running eagerly: %s", self.disabled)
                self.clear()
                return fn(*args, **kwargs)
            self.graphs[key] = g
        for dst, x in zip(g.inputs, leaves):
            if dst is not None and dst.data_ptr() != x.data_ptr():
                dst.copy_(x)
        g.graph.replay()
        self.replays += 1
        return g.out

    def _capture(self, fn, pool: Pool, leaves: list, spec) -> _Graph:
        live = pool.outputs()
        inputs = [
            None if not isinstance(x, torch.Tensor) else (x if x.data_ptr() in live else x.clone()) for x in leaves
        ]
        static = [i if i is not None else x for i, x in zip(inputs, leaves)]
        args, kwargs = tree_unflatten(static, spec)
        graph, out = (self.capture or pool.capture)(lambda: fn(*args, **kwargs))
        return _Graph(graph, inputs, out)


@dataclass
class Pool:
    """The memory pool the graphs share, and the models whose graphs use it."""

    handle: Any = None
    members: list = field(default_factory=list)

    def outputs(self) -> set[int]:
        """Data pointers of the outputs of the graphs alive now: an input that is one of them is
        used as it is (it lives as long as its graph, and the graph holding it as an input keeps it)."""
        return {
            t.data_ptr()
            for gc in self.members
            for g in gc.graphs.values()
            for t in tree_flatten(g.out)[0]
            if isinstance(t, torch.Tensor)
        }

    def capture(self, run: Callable):
        """Warm up on a side stream (lazy initialisations must not happen inside a capture), then
        capture `run` into a new graph in the shared pool."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            run()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # thread_local: the UI's threads (previews, status) may call CUDA while this one captures
        with torch.cuda.graph(graph, pool=self.handle, capture_error_mode="thread_local"):
            out = run()
        if self.handle is None:
            self.handle = graph.pool()
        return graph, out


def install(models: dict[str, nn.Module], capture: Callable | None = None) -> dict[str, GraphedCalls]:
    """Graph the calls of each model (its `forward` becomes an instance attribute); returns the
    bookkeeping per name. `uninstall` puts the forwards back."""
    pool = Pool()
    calls = {}
    for name, m in models.items():
        if installed(m) is not None:
            raise RuntimeError(f"the {name}'s calls are graphed already: uninstall first")
        gc = GraphedCalls(capture=capture)
        pool.members.append(gc)
        inner = m.forward  # another hook's forward stays underneath

        def forward(*args, _inner=inner, _gc=gc, **kwargs):
            return _gc.call(_inner, pool, *args, **kwargs)

        forward._graphed = gc
        forward._own = set_forward(m, forward)
        calls[name] = gc
    return calls


def uninstall(models: dict[str, nn.Module]) -> int:
    n = 0
    for m in models.values():
        gc = installed(m)
        if gc is None:
            continue
        gc.clear()
        restore_forward(m, m.forward._own)
        n += 1
    return n


def installed(m: nn.Module) -> GraphedCalls | None:
    return getattr(vars(m).get("forward"), "_graphed", None)
