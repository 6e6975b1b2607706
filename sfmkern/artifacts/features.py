"""Labelled images and their features: `LabelledImages` (what a probe trains on: a distilled set or real images)
and `FeatureSet` (frozen-backbone features of a labelled set, saved as `sfmkern.FeatureSet/1`)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from sfmkern._io import save_tensors
from sfmkern.artifacts._files import check_backbone, read_artifact
from sfmkern.artifacts.distilled import DistilledSet

FORMAT = "sfmkern.FeatureSet/1"


@dataclass
class LabelledImages:
    """A labelled training set for the probe: distilled images or a real-image baseline.

    images: uint8 [N, 3, H, W] (0..255) or float [N, 3, H, W] in [0, 1]; labels: int64 [N] in [0, len(classes));
    classes: class names (index = label); indices: source rows of real images (None for synthetic ones);
    meta: provenance recorded in the report (e.g. the distillation config).
    """

    images: torch.Tensor
    labels: torch.Tensor
    classes: list[str]
    name: str = "images"
    indices: torch.Tensor | None = None
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        if not isinstance(self.images, torch.Tensor):
            self.images = torch.as_tensor(np.asarray(self.images))
        self.labels = torch.as_tensor(np.asarray(self.labels) if not isinstance(self.labels, torch.Tensor)
                                      else self.labels).to(torch.int64).reshape(-1)
        self.classes = [str(c) for c in self.classes]
        if self.images.ndim != 4 or self.images.shape[1] != 3:
            raise ValueError(f"{self.name}: images must be [N, 3, H, W], got shape {tuple(self.images.shape)}")
        if self.images.dtype != torch.uint8 and not self.images.is_floating_point():
            raise TypeError(f"{self.name}: images must be uint8 or float in [0, 1], got {self.images.dtype}")
        if self.images.shape[0] == 0:
            raise ValueError(f"{self.name}: no images")
        if self.labels.shape[0] != self.images.shape[0]:
            raise ValueError(f"{self.name}: {self.images.shape[0]} images but {self.labels.shape[0]} labels")
        if not self.classes:
            raise ValueError(f"{self.name}: empty class list")
        lo, hi = int(self.labels.min()), int(self.labels.max())
        if lo < 0 or hi >= len(self.classes):
            raise ValueError(f"{self.name}: labels must lie in [0, {len(self.classes)}), got range [{lo}, {hi}]")

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def storage_bytes(self) -> int:
        """Bytes to store the images as 8-bit pixels (N * 3 * H * W)."""
        return int(self.images[0].numel() * len(self))

    def float_rows(self, rows: torch.Tensor, device) -> torch.Tensor:
        """Images `rows` as float32 [b, 3, H, W] in [0, 1] on `device`."""
        return _float_rows(self.images, rows, device)

    def to(self, device) -> LabelledImages:
        """The same set with images and labels on `device` (the faithful probe keeps them there)."""
        return LabelledImages(self.images.to(device), self.labels.to(device), self.classes, self.name, self.indices,
                              self.meta)


def _float_rows(images: torch.Tensor, rows: torch.Tensor, device) -> torch.Tensor:
    x = images.index_select(0, rows.to(images.device)).to(device)
    return x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()


def as_labelled_images(obj, *, name: str | None = None) -> LabelledImages:
    """Accepts a LabelledImages, a DistilledSet (or a path to a saved one), or a tuple (images, labels, classes)."""
    if isinstance(obj, LabelledImages):
        return obj
    if isinstance(obj, (str, os.PathLike)):
        obj = DistilledSet.load(obj)
    if isinstance(obj, tuple):
        if len(obj) != 3:
            raise ValueError(f"an image tuple must be (images, labels, classes), got {len(obj)} items")
        return LabelledImages(obj[0], obj[1], list(obj[2]), name=name or "images")
    if all(hasattr(obj, a) for a in ("images", "labels", "classes")):  # DistilledSet
        images = obj.images
        if not (isinstance(images, torch.Tensor) and images.dtype == torch.uint8):
            images = obj.float_images()
        config = dict(getattr(obj, "config", None) or {})
        meta = {"config": config, "stats_fingerprint": getattr(obj, "stats_fingerprint", None)}
        return LabelledImages(images, obj.labels, list(obj.classes), name=name or "distilled", meta=meta)
    raise TypeError(
        f"expected a DistilledSet, LabelledImages or (images, labels, classes), got {type(obj).__name__}"
    )


@dataclass
class FeatureSet:
    """Frozen-backbone features of a labelled set.

    features: [N, D] float32 or float16 (CPU); labels: int64 [N]; indices: int64 [N] source row of each feature
    (None if unknown); preprocessing: how the images were prepared; skipped: images the decoder could not read.
    """

    features: torch.Tensor
    labels: torch.Tensor
    classes: list[str]
    backbone_name: str = ""
    backbone_fingerprint: str = ""
    indices: torch.Tensor | None = None
    preprocessing: dict = field(default_factory=dict)
    skipped: int = 0
    extra: dict = field(default_factory=dict)  # saved with the features, e.g. the demo's cache key

    def __post_init__(self):
        self.features = torch.as_tensor(self.features)
        self.labels = torch.as_tensor(self.labels).to(torch.int64).reshape(-1)
        self.classes = [str(c) for c in self.classes]
        if self.features.ndim != 2:
            raise ValueError(f"features must be [N, D], got shape {tuple(self.features.shape)}")
        if self.features.shape[0] != self.labels.shape[0]:
            raise ValueError(f"{self.features.shape[0]} features but {self.labels.shape[0]} labels")
        if self.labels.numel() and (int(self.labels.min()) < 0 or int(self.labels.max()) >= len(self.classes)):
            raise ValueError(f"labels must lie in [0, {len(self.classes)})")

    def __len__(self) -> int:
        return int(self.features.shape[0])

    def save(self, path: str | os.PathLike, *, extra: dict | None = None) -> Path:
        """Atomically write the features (float16/float32 as they are), labels and source rows as safetensors, with
        the classes, backbone, preprocessing and `extra` (default: self.extra) as JSON metadata."""
        tensors = {"features": self.features, "labels": self.labels}
        if self.indices is not None:
            tensors["indices"] = self.indices
        meta = {"format": FORMAT, "classes": list(self.classes), "backbone_name": self.backbone_name,
                "backbone_fingerprint": self.backbone_fingerprint, "preprocessing": dict(self.preprocessing),
                "skipped": int(self.skipped), "extra": dict(self.extra if extra is None else extra)}
        return save_tensors(path, tensors, meta)

    @classmethod
    def load(cls, path: str | os.PathLike, *, backbone=None) -> FeatureSet:
        """Read a file written by `save`; with `backbone=`, refuse (ValueError, one line) another backbone's."""
        tensors, meta = read_artifact(path, kind="FeatureSet", formats=(FORMAT,), tensors=("features", "labels"),
                                      rerun="delete it: features are recomputed from the images")
        result = cls(tensors["features"], tensors["labels"], list(meta["classes"]), meta["backbone_name"],
                     meta["backbone_fingerprint"], tensors.get("indices"), dict(meta.get("preprocessing") or {}),
                     int(meta.get("skipped", 0)), dict(meta.get("extra") or {}))
        try:
            check_backbone("these features", result.backbone_name, result.backbone_fingerprint, backbone)
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from None
        return result
