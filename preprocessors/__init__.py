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
from .openpose import coco17_to_openpose18, draw_pose
from .pose import DEFAULT_PERSON_SOURCE, DEFAULT_POSE_SOURCE, pose, pose_model_is_demo
from .registry import CONTROLS, ControlKind, get_control, parse_control_arg, preprocess, random_detector_notes
from .simple import blur, gray, low_quality, tile
from .softedge import DEFAULT_SOFTEDGE_SOURCE, softedge, softedge_model_is_demo

__all__ = [
    "CONTROLS",
    "DEFAULT_DEPTH_SOURCE",
    "DEFAULT_PERSON_SOURCE",
    "DEFAULT_POSE_SOURCE",
    "DEFAULT_SOFTEDGE_SOURCE",
    "MAX_ASPECT",
    "MAX_INPUT_PIXELS",
    "MAX_UPLOAD_BYTES",
    "MIN_SIDE",
    "ControlKind",
    "ImageInputError",
    "blur",
    "canny",
    "coco17_to_openpose18",
    "depth",
    "depth_model_is_demo",
    "draw_pose",
    "fit_size",
    "get_control",
    "gray",
    "load_image",
    "low_quality",
    "parse_control_arg",
    "pose",
    "pose_model_is_demo",
    "preprocess",
    "random_detector_notes",
    "resize_to",
    "softedge",
    "softedge_model_is_demo",
    "tile",
]
