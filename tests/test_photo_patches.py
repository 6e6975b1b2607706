"""sfmkern.data.photo_patches: the second real data set (patches of scikit-image's bundled photos), its disjoint
train/test regions, determinism, and the CLI spec."""

from __future__ import annotations

import numpy as np
import pytest

from sfmkern.data import ArraySource, load_images, photo_patches
from sfmkern.data.photo_patches import CLASSES, GRID, MIN_SCALE, _cut, _photos, split_cells


def _inside(box, cell) -> bool:
    return cell[0] <= box[0] and cell[1] <= box[1] and box[2] <= cell[2] and box[3] <= cell[3]


def _overlap(a, b) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def test_cells_are_disjoint_and_cover_every_photo():
    for photo in _photos():
        h, w = photo.shape[:2]
        train, test = split_cells(h, w, "train"), split_cells(h, w, "test")
        assert len(train) == len(test) == GRID * GRID // 2
        assert not any(_overlap(a, b) for a in train for b in test)
        cover = np.zeros((h, w), dtype=np.int64)
        for top, left, bottom, right in train + test:
            cover[top:bottom, left:right] += 1
        assert (cover == 1).all()


def test_test_patches_share_no_pixel_with_training_patches():
    photo = _photos()[CLASSES.index("coffee")]
    boxes = {"train": [], "test": []}
    for split in boxes:
        _cut(photo, split, 200, 16, np.random.default_rng(7), boxes=boxes[split])
        cells = split_cells(*photo.shape[:2], split)
        short = min(c[2] - c[0] for c in cells), min(c[3] - c[1] for c in cells)
        for box in boxes[split]:
            assert any(_inside(box, c) for c in cells)
            assert box[2] - box[0] == box[3] - box[1] >= int(MIN_SCALE * min(short))
    assert not any(_overlap(a, b) for a in boxes["train"] for b in boxes["test"])
    sides = [b[2] - b[0] for b in boxes["train"]]
    assert max(sides) > 2 * min(sides)  # random scales, not one size


def test_splits_shapes_labels_and_determinism():
    train = photo_patches("train", per_class=6, size=24, seed=3)
    test = photo_patches("test", per_class=4, size=24, seed=3)
    assert isinstance(train, ArraySource) and train.classes == CLASSES and len(CLASSES) == 10
    assert train.images.shape == (60, 24, 24, 3) and train.images.dtype == np.uint8
    np.testing.assert_array_equal(train.labels, np.repeat(np.arange(10), 6))
    assert test.images.shape == (40, 24, 24, 3)
    again = photo_patches("train", per_class=6, size=24, seed=3)
    np.testing.assert_array_equal(again.images, train.images)
    other = photo_patches("train", per_class=6, size=24, seed=4)
    assert (other.images != train.images).any()
    # no test patch equals a training patch, and no patch is flat
    assert not any((t == x).all() for t in test.images for x in train.images)
    assert train.images.reshape(60, -1).std(axis=1).min() > 3
    # the gray photos are replicated to RGB, the colour ones are not
    gray = train.images[train.labels == CLASSES.index("gravel")]
    assert (gray[..., 0] == gray[..., 1]).all()
    colour = train.images[train.labels == CLASSES.index("coffee")]
    assert (colour[..., 0] != colour[..., 2]).any()


def test_default_sizes_and_decoder_path():
    train = photo_patches("train")
    assert train.images.shape == (3000, 64, 64, 3) and len(photo_patches("test")) == 1000
    imgs, ok = load_images(train, [0, 2999], resize=64, crop=64)
    assert np.asarray(ok).all()
    np.testing.assert_array_equal(np.asarray(imgs), train.images[[0, 2999]])


@pytest.mark.parametrize("kwargs, match", [
    (dict(split="val"), "split must be 'train' or 'test'"),
    (dict(split="train", per_class=0), "per_class must be an int >= 1"),
    (dict(split="train", size=4), "size must be an int >= 8"),
    (dict(split="train", seed=-1), "seed must be an int >= 0"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        photo_patches(**kwargs)


def test_cli_spec():
    from sfmkern.cli import UsageError, open_data

    src = open_data("photo-patches:test")
    assert len(src) == 1000 and src.classes == CLASSES
    with pytest.raises(UsageError, match="photo-patches split must be train or test"):
        open_data("photo-patches:validation")
