"""Photo patches: a 10-class colour natural-image set cut from the photos bundled with scikit-image, as an ArraySource.

A second real data set from a domain far from Fashion-MNIST (centred gray garments): each class is one photograph
(an astronaut, a cat, a cup of coffee, the Hubble deep field, a stained tissue slide, a motorcycle, a retina, a
rocket, grass, gravel) and an item is a square patch of it at a random position and a random scale, resampled to
`size` px. The task is "which photo is this patch from", which mixes colour, texture and object parts.

Split: each photo is cut into a 4 x 4 grid of cells; cells with (row + col) even give the training patches, the
others the test patches, and a patch always lies inside one cell, so no test patch shares a pixel with any training
patch (test images are never crops of training pixels). Patch sides are drawn uniformly in [0.1, 0.4] x the cell's
shorter side (random scale), positions uniformly inside the chosen cell. Nearly flat patches (pixel std < 6 on the
0-255 scale, e.g. the black sky of the Hubble field or the border of the retina) are redrawn.

Deterministic: the same (split, per_class, size, seed) gives the same uint8 array on every machine (numpy's PCG64
stream seeded by (seed, split, class); Pillow's box-filter resampling). The photos ship inside scikit-image's wheel
(no download). The gray photos (grass, gravel) are replicated to RGB.
"""

from __future__ import annotations

import functools

import numpy as np

from sfmkern.data.sources import ArraySource

# (class name, skimage.data loader); all of them are bundled with the scikit-image package (no network).
PHOTOS = (
    ("astronaut", "astronaut"),
    ("cat", "chelsea"),
    ("coffee", "coffee"),
    ("hubble", "hubble_deep_field"),
    ("tissue", "immunohistochemistry"),
    ("motorcycle", "stereo_motorcycle"),
    ("retina", "retina"),
    ("rocket", "rocket"),
    ("grass", "grass"),
    ("gravel", "gravel"),
)
CLASSES = [name for name, _ in PHOTOS]
GRID = 4  # cells per side of every photo
MIN_SCALE = 0.1  # smallest patch side, as a fraction of the cell's shorter side
MAX_SCALE = 0.4  # largest patch side, as a fraction of the cell's shorter side
MIN_STD = 6.0  # patches flatter than this (0-255 pixel std) are redrawn
DEFAULT_PER_CLASS = {"train": 300, "test": 100}
_SPLIT_CODE = {"train": 0, "test": 1}
_MAX_TRIES = 1000  # draws per patch before giving up on finding one that is not flat


@functools.lru_cache(maxsize=1)
def _photos() -> tuple[np.ndarray, ...]:
    """The 10 photos as uint8 [H, W, 3] arrays (read-only)."""
    try:
        import skimage.data as skdata
    except ImportError as exc:  # pragma: no cover - scikit-image is in requirements.txt
        raise ImportError("photo_patches needs scikit-image (`pip install scikit-image`), whose wheel bundles the "
                          "photos") from exc
    out = []
    for name, loader in PHOTOS:
        img = getattr(skdata, loader)()
        if isinstance(img, tuple):  # stereo_motorcycle -> (left, right, disparity): the left view only
            img = img[0]
        img = np.asarray(img)
        if img.dtype != np.uint8:
            raise ValueError(f"photo_patches: scikit-image photo {loader!r} is {img.dtype}, expected uint8")
        if img.ndim == 2:
            img = np.repeat(img[:, :, None], 3, axis=2)
        img = np.ascontiguousarray(img[:, :, :3])
        img.flags.writeable = False
        if min(img.shape[:2]) < 4 * GRID:
            raise ValueError(f"photo_patches: photo {name!r} of shape {img.shape} is too small to cut")
        out.append(img)
    return tuple(out)


def split_cells(height: int, width: int, split: str) -> list[tuple[int, int, int, int]]:
    """The (top, left, bottom, right) pixel boxes of a photo's `split` cells (4 x 4 grid; train = (row + col) even).
    The train and test boxes of one photo are disjoint and cover it."""
    if split not in _SPLIT_CODE:
        raise ValueError(f"photo_patches: split must be 'train' or 'test', got {split!r}")
    rows = np.linspace(0, height, GRID + 1).round().astype(int)
    cols = np.linspace(0, width, GRID + 1).round().astype(int)
    parity = _SPLIT_CODE[split]
    return [(int(rows[i]), int(cols[j]), int(rows[i + 1]), int(cols[j + 1]))
            for i in range(GRID) for j in range(GRID) if (i + j) % 2 == parity]


def _cut(photo: np.ndarray, split: str, count: int, size: int, rng: np.random.Generator,
         boxes: list | None = None) -> np.ndarray:
    from PIL import Image

    cells = split_cells(photo.shape[0], photo.shape[1], split)
    out = np.empty((count, size, size, 3), dtype=np.uint8)
    for k in range(count):
        for _ in range(_MAX_TRIES):
            top, left, bottom, right = cells[int(rng.integers(len(cells)))]
            short = min(bottom - top, right - left)
            side = int(round(rng.uniform(MIN_SCALE, MAX_SCALE) * short))
            y = top + int(rng.integers(bottom - top - side + 1))
            x = left + int(rng.integers(right - left - side + 1))
            patch = photo[y: y + side, x: x + side]
            if float(patch.std()) >= MIN_STD:
                break
        else:  # pragma: no cover - every bundled photo has plenty of textured cells
            raise RuntimeError(f"photo_patches: no textured {split} patch found after {_MAX_TRIES} draws")
        if boxes is not None:
            boxes.append((y, x, y + side, x + side))
        out[k] = np.asarray(Image.fromarray(patch).resize((size, size), Image.Resampling.BOX))
    return out


@functools.lru_cache(maxsize=8)
def _build(split: str, per_class: int, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    photos = _photos()
    images = np.empty((per_class * len(photos), size, size, 3), dtype=np.uint8)
    for c, photo in enumerate(photos):
        rng = np.random.default_rng([int(seed), _SPLIT_CODE[split], c, 0x9A7C])
        images[c * per_class: (c + 1) * per_class] = _cut(photo, split, per_class, size, rng)
    labels = np.repeat(np.arange(len(photos), dtype=np.int64), per_class)
    images.flags.writeable = False
    labels.flags.writeable = False
    return images, labels


def photo_patches(split: str = "train", *, per_class: int | None = None, size: int = 64, seed: int = 0) -> ArraySource:
    """The photo-patch set's `split` ("train": 300, "test": 100 patches per class by default) as an ArraySource of
    uint8 [10 * per_class, size, size, 3] RGB patches with int64 labels (class-major) and the 10 class names of
    CLASSES. Deterministic given (split, per_class, size, seed); arrays are cached and read-only."""
    if split not in _SPLIT_CODE:
        raise ValueError(f"photo_patches: split must be 'train' or 'test', got {split!r}")
    per_class = DEFAULT_PER_CLASS[split] if per_class is None else per_class
    for name, value, low in (("per_class", per_class, 1), ("size", size, 8)):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < low:
            raise ValueError(f"photo_patches: {name} must be an int >= {low}, got {value!r}")
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"photo_patches: seed must be an int >= 0, got {seed!r}")
    images, labels = _build(split, int(per_class), int(size), int(seed))
    return ArraySource(images, labels, CLASSES)


__all__ = ["CLASSES", "PHOTOS", "photo_patches", "split_cells"]
