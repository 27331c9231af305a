"""Gradio web UI: `create_demo(engine)` builds the app (see ui/blocks.py); ui/handlers.py holds the
plain functions between UI values and core."""

from .blocks import create_demo

__all__ = ["create_demo"]
