"""The training data: captions beside images or in a JSONL, given control pairs, buckets, batch order."""

import json

import pytest
import torch
from PIL import Image

from preprocessors.registry import preprocess
from train.data import Cached, batches, bucket_of, bucket_sizes, control_image, fit, scan


def _img(path, size=(80, 48), color=(200, 30, 30)):
    Image.new("RGB", size, color).save(path)
    return path


def test_captions_beside_images_and_control_pairs(tmp_path):
    (tmp_path / "control").mkdir()
    _img(tmp_path / "b.png"), _img(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text(" a red card \n")
    (tmp_path / "b.txt").write_text("another")
    _img(tmp_path / "control" / "b.png", color=(0, 0, 255))
    a, b = scan(str(tmp_path))
    assert (a.image.name, a.caption, a.control) == ("a.png", "a red card", None)
    assert b.control == tmp_path / "control" / "b.png"
    image = fit(Image.open(b.image), (64, 64))
    assert control_image(b, image, "canny", {}, False).getpixel((0, 0)) == (0, 0, 255)  # given, not computed
    made = control_image(a, fit(Image.open(a.image), (64, 64)), "canny", {"low": 50}, False)
    assert list(made.getdata()) == list(preprocess("canny", fit(Image.open(a.image), (64, 64)), low=50).getdata())


def test_jsonl_and_one_sentence_errors(tmp_path):
    _img(tmp_path / "x.png")
    _img(tmp_path / "x_edges.png")
    rows = [{"file_name": "x.png", "text": "an x", "control": "x_edges.png"}]
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (s,) = scan(str(tmp_path))
    assert (s.caption, s.control.name) == ("an x", "x_edges.png")
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "x.png"}\n')
    with pytest.raises(ValueError, match="line 1 must be JSON with 'file_name' and 'text'"):
        scan(str(tmp_path))
    (tmp_path / "metadata.jsonl").unlink()
    with pytest.raises(ValueError, match="has no caption: add 'x.txt'"):
        scan(str(tmp_path))


def test_buckets_keep_the_pixel_count_and_the_aspect():
    sizes = bucket_sizes(512)
    assert (512, 512) in sizes and all(w % 16 == 0 and h % 16 == 0 for w, h in sizes)
    assert all(abs(w * h / 512**2 - 1) < 0.1 for w, h in sizes)
    assert bucket_of(1920, 1080, 512) == max(sizes, key=lambda s: s[0] / s[1])
    assert fit(Image.new("RGB", (300, 100)), (64, 48)).size == (64, 48)


def test_batch_order_is_a_function_of_seed_and_epoch_and_shards_evenly():
    items = [
        Cached(torch.zeros(16, 8 if i < 5 else 6, 8), torch.zeros(1), torch.zeros(1), torch.zeros(1)) for i in range(9)
    ]
    one = batches(items, 2, seed=3, epoch=1)
    assert one == batches(items, 2, seed=3, epoch=1) and one != batches(items, 2, seed=3, epoch=2)
    assert all(len({items[i].bucket for i in b}) == 1 for b in one)  # a batch never mixes buckets
    r0, r1 = batches(items, 2, 3, 1, rank=0, world=2), batches(items, 2, 3, 1, rank=1, world=2)
    assert len(r0) == len(r1) and not set(map(tuple, r0)) & set(map(tuple, r1))
