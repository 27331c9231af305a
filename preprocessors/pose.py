"""Pose control image: people found by RT-DETR, their body keypoints by ViTPose (both transformers),
drawn in the OpenPose rendering (openpose.py).

ViTPose is the top-down estimator DWPose belongs to (a person box in, COCO-17 keypoints out), and
both ship in transformers, so no detector package with its own torchvision is needed. When the real
weights cannot be had (offline, missing folder) or demo=True, tiny random-weight models of the same
classes stand in; their maps are meaningless and a warning says so. A photo without people gives a
black map and a note in the image's `info["note"]`, not an error.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from . import weights
from .openpose import MIN_SCORE, coco17_to_openpose18, draw_pose

logger = logging.getLogger(__name__)

DEFAULT_POSE_SOURCE = "usyd-community/vitpose-base-simple"  # ViTPose-B, COCO-17 body, Apache-2.0
DEFAULT_PERSON_SOURCE = "PekingU/rtdetr_r50vd_coco_o365"  # RT-DETR R50, COCO labels, Apache-2.0
PERSON_LABEL = 0  # "person" in the COCO label set of RT-DETR
PERSON_SCORE = 0.3  # detections below this are not people
MAX_PEOPLE = 16  # the strongest boxes only: each one is a ViTPose pass
DEMO_SEED = 0
NO_PEOPLE = "No person was found in the image: the pose control is empty (black)."


@dataclass(frozen=True)
class _PoseModels:
    detector: Any
    detector_processor: Any
    estimator: Any
    estimator_processor: Any
    device: str
    dtype: Any
    is_demo: bool


_CACHE = weights.ModelCache()  # (pose source, detector source, device) → _PoseModels


def _load_from(source: str, detector: str, device: str) -> _PoseModels:
    """Both models (safetensors only) and their processors from Hub ids or local folders."""
    import torch
    from transformers import AutoImageProcessor, RTDetrForObjectDetection, VitPoseForPoseEstimation

    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32

    def loader(cls):
        def load(path: str, local_files_only: bool):
            kw = {"local_files_only": local_files_only}
            processor = AutoImageProcessor.from_pretrained(path, **kw)
            return cls.from_pretrained(path, use_safetensors=True, dtype=dtype, **kw), processor

        return load

    det, det_proc = weights.from_source(detector, loader(RTDetrForObjectDetection))
    est, est_proc = weights.from_source(source, loader(VitPoseForPoseEstimation))
    return _PoseModels(det.to(device).eval(), det_proc, est.to(device).eval(), est_proc, device, dtype, False)


def _build_demo(device: str) -> _PoseModels:
    """Tiny random RT-DETR and ViTPose, built in memory from their own classes."""
    import torch
    from transformers import (
        RTDetrConfig,
        RTDetrForObjectDetection,
        RTDetrResNetConfig,
        VitPoseBackboneConfig,
        VitPoseConfig,
        VitPoseForPoseEstimation,
    )
    from transformers.models.rt_detr.image_processing_pil_rt_detr import RTDetrImageProcessorPil
    from transformers.models.vitpose.image_processing_pil_vitpose import VitPoseImageProcessorPil

    backbone = RTDetrResNetConfig(
        embedding_size=8,
        hidden_sizes=[8, 16, 32, 64],
        depths=[1, 1, 1, 1],
        layer_type="basic",
        out_features=["stage2", "stage3", "stage4"],
    )
    detector = RTDetrConfig(
        backbone_config=backbone,
        encoder_hidden_dim=16,
        encoder_in_channels=[16, 32, 64],
        encoder_ffn_dim=32,
        encoder_attention_heads=2,
        d_model=16,
        num_queries=4,
        decoder_in_channels=[16, 16, 16],
        decoder_ffn_dim=32,
        decoder_layers=1,
        decoder_attention_heads=2,
        num_denoising=0,
        num_labels=80,
    )
    estimator = VitPoseConfig(
        backbone_config=VitPoseBackboneConfig(
            image_size=[64, 48],
            patch_size=[16, 16],
            hidden_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            mlp_ratio=2,
            out_indices=[1],
        ),
        num_labels=17,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(DEMO_SEED)
        det = RTDetrForObjectDetection(detector).eval()
        est = VitPoseForPoseEstimation(estimator).eval()
        with torch.no_grad():
            # Random init scores every box ~0.01; a person bias lets the demo draw (random) people.
            det.model.decoder.class_embed[-1].bias[PERSON_LABEL] = 4.0
    # PIL backends with explicit sizes: built offline and usable without torchvision.
    det_proc = RTDetrImageProcessorPil(size={"height": 64, "width": 64})
    est_proc = VitPoseImageProcessorPil(size={"height": 64, "width": 48})
    return _PoseModels(det.to(device), det_proc, est.to(device), est_proc, device, torch.float32, True)


def _get_models(source: str | None, detector: str | None, device: str | None, demo: bool) -> _PoseModels:
    device = device or weights.default_device()
    source, detector = source or DEFAULT_POSE_SOURCE, detector or DEFAULT_PERSON_SOURCE
    return _CACHE.get(
        (source, detector, device),
        ("<demo>", "<demo>", device),
        demo,
        lambda: _load_from(source, detector, device),
        lambda: _build_demo(device),
        f"Pose models '{source}' / '{detector}' are",
    )


def pose_model_is_demo(source: str | None = None, detector: str | None = None, device: str | None = None) -> bool:
    """True when pose maps for these sources come from the random demo models (loads them if needed)."""
    return _get_models(source, detector, device, demo=False).is_demo


def _people_boxes(models: _PoseModels, image: Image.Image) -> np.ndarray:
    """Person boxes as (n, 4) COCO (x, y, width, height), strongest first."""
    import torch

    inputs = models.detector_processor(images=image, return_tensors="pt")
    pixels = inputs["pixel_values"].to(models.device, models.dtype)
    with torch.inference_mode():
        outputs = models.detector(pixel_values=pixels)
    found = models.detector_processor.post_process_object_detection(
        outputs, threshold=PERSON_SCORE, target_sizes=[(image.height, image.width)]
    )[0]
    keep = (found["labels"] == PERSON_LABEL).cpu().numpy()
    boxes = found["boxes"].float().cpu().numpy()[keep]
    scores = found["scores"].float().cpu().numpy()[keep]
    boxes = boxes[np.argsort(-scores, kind="stable")][:MAX_PEOPLE]
    xy = np.clip(boxes[:, :2], 0, [image.width, image.height])
    wh = np.clip(boxes[:, 2:], 0, [image.width, image.height]) - xy
    boxes = np.concatenate([xy, wh], axis=1)
    return boxes[(boxes[:, 2] >= 1) & (boxes[:, 3] >= 1)]


def _keypoints(models: _PoseModels, image: Image.Image, boxes: np.ndarray) -> list[np.ndarray]:
    """OpenPose-18 (x, y, score) rows for the person in each box."""
    import torch

    inputs = models.estimator_processor(images=image, boxes=[boxes.tolist()], return_tensors="pt")
    pixels = inputs["pixel_values"].to(models.device, models.dtype)
    with torch.inference_mode():
        outputs = models.estimator(pixel_values=pixels)
    outputs.heatmaps = outputs.heatmaps.float().cpu()
    people = models.estimator_processor.post_process_pose_estimation(outputs, boxes=[boxes.tolist()])[0]
    return [coco17_to_openpose18(p["keypoints"].numpy(), p["scores"].numpy()) for p in people]


def pose(
    image: Image.Image,
    source: str | None = None,
    detector: str | None = None,
    device: str | None = None,
    demo: bool = False,
) -> Image.Image:
    """The OpenPose body map of every person in the image, RGB of the input's size, black background.

    source: ViTPose weights (Hub id or folder); detector: RT-DETR weights for the person boxes."""
    if not isinstance(image, Image.Image):
        raise TypeError(f"image must be a PIL.Image.Image, got {type(image).__name__}.")
    models = _get_models(source, detector, device, demo)
    if models.is_demo:
        logger.warning("This pose map comes from random-weight demo models, not RT-DETR and ViTPose.")
    rgb = image if image.mode == "RGB" else image.convert("RGB")
    boxes = _people_boxes(models, rgb)
    people = _keypoints(models, rgb, boxes) if len(boxes) else []
    out = draw_pose(rgb.size, people, MIN_SCORE)
    if not people:
        logger.info(NO_PEOPLE)
        out.info["note"] = NO_PEOPLE
    return out
