"""The OpenPose body rendering on synthetic keypoints: limbs, colours and places, hidden keypoints,
several people, and the COCO-17 → OpenPose-18 conversion."""

from __future__ import annotations

import numpy as np
import pytest

from preprocessors import coco17_to_openpose18, draw_pose
from preprocessors.openpose import COLORS, KEYPOINTS, LIMBS

SIZE = (400, 400)

# A person standing with arms out, in OpenPose-18 order (x, y); limbs long enough that every limb's
# midpoint lies away from joints and from other limbs.
SKELETON = {
    "nose": (200, 60),
    "neck": (200, 120),
    "right_shoulder": (140, 120),
    "right_elbow": (100, 180),
    "right_wrist": (80, 250),
    "left_shoulder": (260, 120),
    "left_elbow": (300, 180),
    "left_wrist": (320, 250),
    "right_hip": (160, 240),
    "right_knee": (150, 310),
    "right_ankle": (145, 380),
    "left_hip": (240, 240),
    "left_knee": (250, 310),
    "left_ankle": (255, 380),
    "right_eye": (185, 45),
    "left_eye": (215, 45),
    "right_ear": (165, 55),
    "left_ear": (235, 55),
}


def person(dx: float = 0.0, score: float = 0.9, hidden: tuple[str, ...] = ()) -> np.ndarray:
    rows = [(x + dx, y, 0.0 if name in hidden else score) for name, (x, y) in ((n, SKELETON[n]) for n in KEYPOINTS)]
    return np.asarray(rows)


def at(img, x, y) -> tuple[int, int, int]:
    return tuple(int(v) for v in np.asarray(img)[int(y), int(x)])


def limb_color(i: int) -> tuple[int, int, int]:
    """Limbs are drawn at 60 % of their colour, under the joints (DWPose's draw_bodypose)."""
    return tuple(int(c * 0.6) for c in COLORS[i])


def test_the_tables_are_openposes():
    assert len(KEYPOINTS) == 18 and len(COLORS) == 18 and len(LIMBS) == 17
    assert KEYPOINTS[:2] == ("nose", "neck") and COLORS[0] == (255, 0, 0) and COLORS[12] == (0, 0, 255)
    assert LIMBS[0] == (1, 2) and LIMBS[12] == (1, 0)  # neck → right shoulder first; neck → nose blue
    assert limb_color(0) == (153, 0, 0) and limb_color(12) == (0, 0, 153)


def test_a_known_skeleton_gives_every_limb_and_joint_in_its_colour_and_place():
    img = draw_pose(SIZE, [person()])
    assert img.mode == "RGB" and img.size == SIZE
    p = person()
    for i, (a, b) in enumerate(LIMBS):
        mid = (p[a, :2] + p[b, :2]) / 2
        assert at(img, *mid) == limb_color(i), (KEYPOINTS[a], KEYPOINTS[b])
    for i, (x, y, _) in enumerate(p):
        assert at(img, x, y) == COLORS[i], KEYPOINTS[i]
        assert at(img, x + 3, y) == COLORS[i]  # a filled joint of radius 4
    arr = np.asarray(img)
    assert arr[:30].max() == 0 and arr[:, :60].max() == 0 and arr[:, 340:].max() == 0  # nothing else


def test_limbs_are_sticks_four_pixels_wide():
    img = draw_pose(SIZE, [person()])
    # neck → right hip runs mostly down; across it, at its middle, the stick ends near ±4 px
    mid_x, mid_y = 180, 180
    row = np.asarray(img)[mid_y, mid_x - 12 : mid_x + 13].any(axis=1)
    assert 6 <= row.sum() <= 11, row.sum()


def test_hidden_keypoints_drop_their_joint_and_limbs():
    img = draw_pose(SIZE, [person(hidden=("right_wrist",))])
    p = person()
    wrist = KEYPOINTS.index("right_wrist")
    assert at(img, *p[wrist, :2]) == (0, 0, 0)
    elbow_wrist = LIMBS.index((3, 4))
    assert at(img, *((p[3, :2] + p[4, :2]) / 2)) == (0, 0, 0)
    assert at(img, *((p[2, :2] + p[3, :2]) / 2)) == limb_color(LIMBS.index((2, 3)))  # the upper arm stays
    assert elbow_wrist == 3


def test_low_scores_are_hidden_and_the_threshold_is_a_parameter():
    weak = person(score=0.2)
    assert np.asarray(draw_pose(SIZE, [weak])).max() == 0
    assert np.asarray(draw_pose(SIZE, [weak], min_score=0.1)).max() == 255


def test_several_people_are_all_drawn():
    left, right = person(), person(dx=350)
    img = draw_pose((800, 400), [left, right])
    for p in (left, right):
        for i, (x, y, _) in enumerate(p):
            assert at(img, x, y) == COLORS[i]


def test_no_people_is_a_black_map():
    img = draw_pose((64, 48), [])
    assert img.size == (64, 48) and np.asarray(img).max() == 0


@pytest.mark.parametrize("bad", [np.zeros((17, 3)), np.zeros((18, 2)), np.zeros(54)])
def test_bad_keypoint_arrays_are_refused(bad):
    with pytest.raises(ValueError, match="18 OpenPose keypoints"):
        draw_pose(SIZE, [bad])


def test_coco17_to_openpose18():
    coco = [
        "nose",
        "left_eye",
        "right_eye",
        "left_ear",
        "right_ear",
        "left_shoulder",
        "right_shoulder",
        "left_elbow",
        "right_elbow",
        "left_wrist",
        "right_wrist",
        "left_hip",
        "right_hip",
        "left_knee",
        "right_knee",
        "left_ankle",
        "right_ankle",
    ]
    kp = np.array([[10.0 * j, 100.0 + j] for j in range(17)])
    scores = np.linspace(0.5, 0.9, 17)
    out = coco17_to_openpose18(kp, scores)
    assert out.shape == (18, 3)
    for i, name in enumerate(KEYPOINTS):
        if name == "neck":
            continue
        j = coco.index(name)
        assert tuple(out[i]) == (kp[j, 0], kp[j, 1], scores[j]), name
    ls, rs = coco.index("left_shoulder"), coco.index("right_shoulder")
    assert np.allclose(out[1, :2], (kp[ls] + kp[rs]) / 2)  # neck = midpoint of the shoulders
    assert out[1, 2] == min(scores[ls], scores[rs])
