"""Gradio web UI: `create_demo(engine)` builds the app (see ui/blocks.py); ui/handlers.py holds the
plain functions between UI values and core, importable without Gradio (a benchmark or a script
that builds jobs the way the app does)."""

__all__ = ["create_demo"]


def __getattr__(name: str):
    if name == "create_demo":
        from .blocks import create_demo

        return create_demo
    raise AttributeError(f"module 'ui' has no attribute {name!r}")
