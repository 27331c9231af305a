"""What a denoising pass needs besides the job: the placed pipeline, the plan, the monitor that
times its phases, the events a user should read, the prompt cache, and the user's callbacks."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from core.monitor import MemoryMonitor

Progress = Callable[..., None]
"""Called as (stage label, done, total) at every step end. A callable may opt in to more through
attributes (plain three-argument callables see nothing new):
`phases = True`: also (phase, 0, 1) as "encode" and "decode" start, and (label, 0, total) before a
pass's first step, so a UI can say what runs between steps;
`preview_every = k`: every k-th step end (and the last) comes with a keyword `preview=`, a small
RGB image of the latents (core/preview.py)."""


class JobCancelled(Exception):
    """The user cancelled; raised between denoising steps."""


AS_PLACED = "as placed"  # the encoders' `how` for a caller's pipeline: encoded where they are


class PromptCache:
    """Prompt embeddings kept on the CPU: the text encoders run once per prompt and placement. `how`
    (where T5 runs and how its weights are stored) is part of the key: T5 streamed in fp8 or 4-bit,
    or run on another device, gives other embeddings, and a job must give the pixels a fresh run of
    its own plan gives (also after a failed attempt under another plan)."""

    def __init__(self, size: int = 8):
        self.size, self.data = size, OrderedDict()

    def get(self, pipe, prompt: str, device: torch.device, max_seq: int, how: str = ""):
        key = (prompt, max_seq, pipe.text_encoder_2.dtype, device.type, how)
        if key not in self.data:
            at = pipe.text_encoder_2.device if how == AS_PLACED else device
            with torch.no_grad():
                pe, pooled, _ = pipe.encode_prompt(
                    prompt=prompt, prompt_2=prompt, device=at, max_sequence_length=max_seq
                )
            self.data[key] = (pe.cpu(), pooled.cpu())
            while len(self.data) > self.size:
                self.data.popitem(last=False)
        self.data.move_to_end(key)
        pe, pooled = self.data[key]
        return pe.to(device), pooled.to(device)


@dataclass
class Runtime:
    """One job's run on a placed pipeline. `events` collects what the engine did that a user
    should know; every phase is timed by `monitor`."""

    pipe: object
    device: torch.device
    max_seq: int
    tile: int  # generation tile (px), 0: whole image
    overlap: int
    upscale_tile: int = 1024  # tile of the upscale stages
    residency: object | None = None  # core.stream.residency.Residency, told about step ends
    progress: Progress | None = None
    cancel: Callable[[], bool] | None = None
    img2img: object | None = None  # the img2img pipeline sharing pipe's modules (upscale stages)
    monitor: MemoryMonitor = field(default_factory=MemoryMonitor)
    events: list[str] = field(default_factory=list)
    cache: PromptCache = field(default_factory=PromptCache)
    demo: bool = False
    depth_device: str | None = None  # where the depth preprocessor runs (the plan says)
    encoders: str = ""  # where T5 runs and how it is stored (the plan's T5 format; the prompt cache's key)

    def note(self, event: str) -> None:
        if event not in self.events:
            self.events.append(event)
