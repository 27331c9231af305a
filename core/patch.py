"""Replacing modules' forwards for the length of a `with` block (ControlNet skipping, tiled denoising).

An instance attribute `forward` shadows the class's; accelerate's and our hooks may have set one
already, so the previous instance attribute (or its absence) is restored exactly."""
from __future__ import annotations

import contextlib

from torch import nn


@contextlib.contextmanager
def patched_forwards(*pairs: tuple[nn.Module, object]):
    """`with patched_forwards((module, fn), ...):` module.forward is fn inside the block."""
    own = [(m, m.__dict__.get("forward")) for m, _ in pairs]
    for m, fn in pairs:
        m.forward = fn
    try:
        yield
    finally:
        for m, had in own:
            if had is None:
                del m.forward
            else:
                m.forward = had
