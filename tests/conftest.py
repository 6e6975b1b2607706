"""Shared test set-up: offline hub, Triton interpreter on CPU, seeded RNGs, and small real image folders.

TRITON_INTERPRET must be set before any module defining @triton.jit kernels is imported; README's test command
exports it, and this file sets it too (before any sfmkern import) for runs started without it.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRITON_INTERPRET", "1")
# Idle OpenMP threads sleep instead of spinning: with subprocess tests (gloo ranks, SIGKILL/resume) sharing 2 cores,
# spinning workers slowed a forward+backward 5-13x.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import random  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

# Real photos bundled with scikit-image, grouped into classes for the image-folder tests.
PHOTO_CLASSES = {
    "animals": ["chelsea.png", "astronaut.png", "horse.png"],
    "objects": ["coffee.png", "rocket.jpg", "motorcycle_left.png"],
    "textures": ["brick.png", "grass.png", "gravel.png", "retina.jpg"],
}


@pytest.fixture(autouse=True)
def _seed_everything():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    yield


def skimage_photo(name: str) -> np.ndarray:
    """A bundled scikit-image photo as uint8 RGB [H, W, 3] (grayscale replicated)."""
    import skimage.data
    from PIL import Image

    path = Path(skimage.data.__file__).parent / name
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def write_photo_folder(root: Path, *, fmt_cycle=("jpg", "png"), quality: int = 90) -> Path:
    """Write PHOTO_CLASSES as an ImageFolder (class = sub-folder), alternating JPEG and PNG files."""
    from PIL import Image

    k = 0
    for cls, names in PHOTO_CLASSES.items():
        (root / cls).mkdir(parents=True, exist_ok=True)
        for name in names:
            fmt = fmt_cycle[k % len(fmt_cycle)]
            k += 1
            img = Image.fromarray(skimage_photo(name))
            out = root / cls / f"{Path(name).stem}.{fmt}"
            if fmt == "jpg":
                img.save(out, quality=quality)
            else:
                img.save(out)
    return root


def balanced_subset(source, per_class: int, seed: int):
    """`per_class` items of every class of `source`, drawn without replacement (seeded): `source.subset(...)`."""
    rng = np.random.default_rng(seed)
    labels = np.asarray(source.labels)
    rows = [rng.choice(np.flatnonzero(labels == c), per_class, replace=False) for c in range(len(source.classes))]
    return source.subset(np.concatenate(rows))


@pytest.fixture(scope="session")
def photo_folder(tmp_path_factory) -> Path:
    """A small real ImageFolder: 3 classes of scikit-image photos, JPEG and PNG mixed."""
    return write_photo_folder(tmp_path_factory.mktemp("photos"))


@pytest.fixture
def one_thread():
    """One torch thread for the test: two cores shared with other jobs, where OpenMP spin-waiting with 2 threads ran
    a forward+backward ~100x slower than 1 thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def backbone():
    """The tiny backbone (test modules with other needs define their own `backbone`)."""
    return tiny_backbone()


def tiny_backbone(name: str = "test_vit"):
    """A small timm ViT with random weights (seeded) at 32 px on the CPU."""
    from sfmkern.backbone import load_backbone

    torch.manual_seed(0)
    return load_backbone(name, pretrained=False, img_size=32, device="cpu")


def rel_err(x: torch.Tensor, ref: torch.Tensor, floor: float = 0.0) -> float:
    """Normwise relative error ||x - ref|| / max(||ref||, floor), in float64."""
    diff = torch.linalg.vector_norm(x.detach().double() - ref.detach().double()).item()
    return diff / max(torch.linalg.vector_norm(ref.detach().double()).item(), floor)


def fmnist_pair(train_per_class: int, test_per_class: int, seeds: tuple[int, int] = (0, 1)):
    """Seeded balanced subsets of Fashion-MNIST's train and test splits (Debian's dataset-fashion-mnist)."""
    from sfmkern.data import fashion_mnist

    return (balanced_subset(fashion_mnist("train"), train_per_class, seeds[0]),
            balanced_subset(fashion_mnist("test"), test_per_class, seeds[1]))


def seeded_backbone(name: str, seed: int):
    """A timm test model with random weights drawn from `seed`, on the CPU."""
    from sfmkern.backbone import load_backbone

    torch.manual_seed(seed)
    return load_backbone(name, pretrained=False, device="cpu")
