"""Where detector weights come from: a Hub id or a local folder, the Hub cache tried first.

Shared by the depth, pose and soft-edge detectors. A random stand-in is built where the real weights
cannot be had (ModelCache logs it; callers report it).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")
logger = logging.getLogger(__name__)


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


class ModelCache:
    """Loaded detectors by key, each loaded once even when requests arrive together; where the real
    weights cannot be had, the random demo stand-in (one per device, shared by every such key)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._models: dict[tuple, object] = {}

    def get(
        self, key: tuple, demo_key: tuple, demo: bool, load: Callable[[], T], build_demo: Callable[[], T], what: str
    ):
        """The model for `key` (demo: the stand-in for `demo_key`). `what` names the weights in the
        warning logged when they are unavailable. Returned models have an `is_demo` flag."""
        key = demo_key if demo else key
        with self._lock:
            if key in self._models:
                return self._models[key]
            if demo:
                loaded = build_demo()
            else:
                try:
                    loaded = load()
                except unavailable_errors() as exc:
                    logger.warning("%s unavailable (%s); using random-weight demo weights.", what, short(exc))
                    loaded = self._models.get(demo_key) or build_demo()
            self._models[key] = loaded
            if loaded.is_demo:
                self._models.setdefault(demo_key, loaded)
            return loaded

    def clear(self) -> None:
        with self._lock:
            self._models.clear()
