"""Replacing modules' forwards for the length of a `with` block (ControlNet skipping, tiled denoising).

An instance attribute `forward` shadows the class's; accelerate's and our hooks may have set one
already, so the previous instance attribute (or its absence) is restored exactly."""

from __future__ import annotations

import contextlib

from torch import nn


def set_forward(m: nn.Module, fn) -> object:
    """m.forward becomes fn; returns what restore_forward needs to undo it (the previous instance
    attribute, or None where the class's forward was in use)."""
    had = m.__dict__.get("forward")
    m.forward = fn
    return had


def restore_forward(m: nn.Module, had) -> None:
    if had is None:
        del m.forward
    else:
        m.forward = had


@contextlib.contextmanager
def patched_forwards(*pairs: tuple[nn.Module, object]):
    """`with patched_forwards((module, fn), ...):` module.forward is fn inside the block."""
    own = [(m, set_forward(m, fn)) for m, fn in pairs]
    try:
        yield
    finally:
        for m, had in own:
            restore_forward(m, had)
