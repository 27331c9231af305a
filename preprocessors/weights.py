"""Where detector weights come from: a Hub id or a local folder, the Hub cache tried first.

Shared by the pose and soft-edge detectors (depth.py keeps its own copy of the same rules). A random
stand-in is built where the real weights cannot be had; callers log that and report it.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def looks_local(source: str) -> bool:
    """A path rather than a Hub id: it exists, or it is spelled like a path."""
    return (
        Path(source).expanduser().exists()
        or source.startswith(("/", "./", "../", "~", "\\"))
        or os.path.isabs(source)
        or source.count("/") > 1
    )


def unavailable_errors() -> tuple[type[BaseException], ...]:
    """Errors meaning "these weights cannot be had here", as opposed to bugs."""
    from huggingface_hub import errors as hf_errors

    # OSError covers offline mode, connection failures, missing files and HTTP errors;
    # ValueError covers malformed repo ids.
    return (OSError, ValueError, hf_errors.EntryNotFoundError)


def from_source(source: str, load: Callable[[str, bool], T]) -> T:
    """`load(path, local_files_only)` on a local folder, or on a Hub id: the cache first, since
    without a network online lookups retry for a minute or more, then the Hub."""
    if looks_local(source):
        folder = Path(source).expanduser()
        if not folder.is_dir():
            raise FileNotFoundError(f"no model folder at '{source}'")
        return load(str(folder), True)
    try:
        return load(source, True)
    except OSError:
        return load(source, False)


def short(exc: BaseException) -> str:
    """An exception as one short line for a log message."""
    return " ".join(str(exc).split())[:200]
