"""Control-image preprocessors for FLUX.1 ControlNet-Union: safe input plus one function per control."""

from .canny import canny
from .depth import DEFAULT_DEPTH_SOURCE, depth, depth_model_is_demo
from .image_io import (
    MAX_ASPECT,
    MAX_INPUT_PIXELS,
    MAX_UPLOAD_BYTES,
    MIN_SIDE,
    ImageInputError,
    fit_size,
    load_image,
    resize_to,
)
from .registry import CONTROLS, ControlKind, get_control, parse_control_arg, preprocess
from .simple import blur, gray, low_quality, tile

__all__ = [
    "CONTROLS",
    "DEFAULT_DEPTH_SOURCE",
    "MAX_ASPECT",
    "MAX_INPUT_PIXELS",
    "MAX_UPLOAD_BYTES",
    "MIN_SIDE",
    "ControlKind",
    "ImageInputError",
    "blur",
    "canny",
    "depth",
    "depth_model_is_demo",
    "fit_size",
    "get_control",
    "gray",
    "load_image",
    "low_quality",
    "parse_control_arg",
    "preprocess",
    "resize_to",
    "tile",
]
