"""The OpenPose body rendering the pose ControlNets were trained on, drawn from keypoints.

Pure geometry: no model. Keypoints are in the OpenPose-18 body layout; ViTPose (and DWPose's
RTMPose) predict the COCO-17 layout, which `coco17_to_openpose18` converts, adding the neck as the
midpoint of the shoulders as DWPose does. The limb pairs, the colour table, the stick width 4, the
limbs at 60 % brightness under full-colour joints of radius 4 are DWPose's `draw_bodypose`: what
Union-Pro-2.0's card names as its pose detector.
"""

from __future__ import annotations

import math

import cv2
import numpy as np
from PIL import Image

# OpenPose-18 body keypoints, in order.
KEYPOINTS = (
    "nose",
    "neck",
    "right_shoulder",
    "right_elbow",
    "right_wrist",
    "left_shoulder",
    "left_elbow",
    "left_wrist",
    "right_hip",
    "right_knee",
    "right_ankle",
    "left_hip",
    "left_knee",
    "left_ankle",
    "right_eye",
    "left_eye",
    "right_ear",
    "left_ear",
)

# Limbs as (from, to) keypoint indices, 0-based; OpenPose lists 19 but draws the first 17 (the two
# ear-to-shoulder links are not drawn), and limb i takes colour i.
LIMBS = (
    (1, 2),
    (1, 5),
    (2, 3),
    (3, 4),
    (5, 6),
    (6, 7),
    (1, 8),
    (8, 9),
    (9, 10),
    (1, 11),
    (11, 12),
    (12, 13),
    (1, 0),
    (0, 14),
    (14, 16),
    (0, 15),
    (15, 17),
)

# Keypoint i and limb i are drawn in COLORS[i] (RGB).
COLORS = (
    (255, 0, 0),
    (255, 85, 0),
    (255, 170, 0),
    (255, 255, 0),
    (170, 255, 0),
    (85, 255, 0),
    (0, 255, 0),
    (0, 255, 85),
    (0, 255, 170),
    (0, 255, 255),
    (0, 170, 255),
    (0, 85, 255),
    (0, 0, 255),
    (85, 0, 255),
    (170, 0, 255),
    (255, 0, 255),
    (255, 0, 170),
    (255, 0, 85),
)

STICK_WIDTH = 4
JOINT_RADIUS = 4
LIMB_BRIGHTNESS = 0.6
MIN_SCORE = 0.3  # DWPose's visibility threshold

# OpenPose-18 index → COCO-17 index; the neck (1) has no COCO keypoint.
_FROM_COCO = (0, None, 6, 8, 10, 5, 7, 9, 12, 14, 16, 11, 13, 15, 2, 1, 4, 3)
_COCO_SHOULDERS = (5, 6)


def coco17_to_openpose18(keypoints, scores) -> np.ndarray:
    """COCO-17 (x, y) keypoints and scores of one person → (18, 3) OpenPose rows of x, y, score.

    The neck is the midpoint of the shoulders, scored by the weaker shoulder (DWPose marks it
    visible only where both shoulders are)."""
    kp = np.asarray(keypoints, np.float64).reshape(17, 2)
    sc = np.asarray(scores, np.float64).reshape(17)
    out = np.zeros((18, 3))
    for i, j in enumerate(_FROM_COCO):
        if j is not None:
            out[i] = (kp[j, 0], kp[j, 1], sc[j])
    left, right = _COCO_SHOULDERS
    out[1] = (*((kp[left] + kp[right]) / 2), min(sc[left], sc[right]))
    return out


def _check_people(people) -> list[np.ndarray]:
    out = []
    for person in people:
        arr = np.asarray(person, np.float64)
        if arr.shape != (18, 3):
            raise ValueError(f"each person must be 18 OpenPose keypoints as (x, y, score) rows, got shape {arr.shape}.")
        out.append(arr)
    return out


def draw_pose(size: tuple[int, int], people, min_score: float = MIN_SCORE) -> Image.Image:
    """The pose map (RGB, black background) of `size` = (width, height) with every person drawn.

    people: one (18, 3) array of (x, y, score) per person, in pixels of the map; a keypoint with a
    score not above `min_score` is left out, and so is every limb that touches it."""
    width, height = size
    if width < 1 or height < 1:
        raise ValueError(f"size must be a positive (width, height), got {size!r}.")
    people = _check_people(people)
    canvas = np.zeros((height, width, 3), np.uint8)
    # Limb by limb, then person by person (DWPose's order, which decides what overlaps what).
    for (a, b), color in zip(LIMBS, COLORS, strict=False):
        for person in people:
            if not (person[a, 2] > min_score and person[b, 2] > min_score):
                continue
            (xa, ya), (xb, yb) = person[a, :2], person[b, :2]
            length = math.hypot(xa - xb, ya - yb)
            angle = math.degrees(math.atan2(ya - yb, xa - xb))
            center = (int((xa + xb) / 2), int((ya + yb) / 2))
            polygon = cv2.ellipse2Poly(center, (int(length / 2), STICK_WIDTH), int(angle), 0, 360, 1)
            cv2.fillConvexPoly(canvas, polygon, color)
    canvas = (canvas * LIMB_BRIGHTNESS).astype(np.uint8)
    for i, color in enumerate(COLORS):
        for person in people:
            x, y, score = person[i]
            if score > min_score:
                cv2.circle(canvas, (int(x), int(y)), JOINT_RADIUS, color, thickness=-1)
    return Image.fromarray(canvas)
