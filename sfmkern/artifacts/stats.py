"""`ClassStats`: each class's mean backbone feature, the artefact of the statistics phase (`sfmkern.stats`).

File: safetensors (centres float32 [C, D], counts int64 [C]) with JSON metadata: format `sfmkern.ClassStats/1`, the
class names, the backbone name and weight fingerprint, the preprocessing, the decoder version, the skipped files,
the feature cache's path and the statistics' own fingerprint (checked on load: a torn or altered file is refused).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from sfmkern._io import save_tensors
from sfmkern.artifacts._files import read_artifact

FORMAT = "sfmkern.ClassStats/1"
RERUN = "re-run `sfmkern stats` (collect_stats) to write it again"


@dataclass
class ClassStats:
    """Per-class feature means of a dataset under one backbone and one preprocessing.

    centres float32 [C, D] (mean feature per class), counts int64 [C] (usable images per class), `classes` (names,
    index order), `class_to_idx`, `backbone_name`, `backbone_fingerprint` (sha256 of the weights),
    `preprocessing` (dict: resize, crop, mean, std, input_size, feature_kind), `decoder_version`, `skipped`
    (list of [index, name, reason] for files that could not be used; index -1: a listing problem such as an
    unreadable folder or a FIFO, which is no item of the source), `features_path` (the fp16 feature cache or
    None), `fingerprint` (sha256 of the centres, counts and everything above but the run info), `run_info` (not part
    of the fingerprint: resumed_from, images_forwarded, seconds, world_size, data).
    """

    centres: torch.Tensor
    counts: torch.Tensor
    classes: list[str]
    class_to_idx: dict[str, int]
    backbone_name: str
    backbone_fingerprint: str
    preprocessing: dict
    decoder_version: str
    skipped: list = field(default_factory=list)
    features_path: str | None = None
    run_info: dict = field(default_factory=dict)

    num_classes = property(lambda self: int(self.centres.shape[0]), doc="C, the rows of `centres`")
    feature_dim = property(lambda self: int(self.centres.shape[1]), doc="D, the columns of `centres`")

    def _meta(self) -> dict:
        return {
            "format": FORMAT,
            "classes": list(self.classes),
            "class_to_idx": dict(self.class_to_idx),
            "backbone_name": self.backbone_name,
            "backbone_fingerprint": self.backbone_fingerprint,
            "preprocessing": dict(self.preprocessing),
            "decoder_version": self.decoder_version,
            "skipped": [list(s) for s in self.skipped],
            "features_path": self.features_path,
        }

    @property
    def fingerprint(self) -> str:
        meta = self._meta()
        meta.pop("features_path")  # where the cache lies is not part of what was measured
        h = hashlib.sha256(json.dumps(meta, sort_keys=True).encode())
        h.update(self.centres.detach().cpu().contiguous().float().numpy().tobytes())
        h.update(self.counts.detach().cpu().contiguous().to(torch.int64).numpy().tobytes())
        return h.hexdigest()

    def save(self, path: str | os.PathLike) -> Path:
        """Atomically write safetensors (centres, counts) with every other field as JSON metadata."""
        meta = self._meta()
        meta["fingerprint"] = self.fingerprint
        meta["run_info"] = dict(self.run_info)
        return save_tensors(path, {"centres": self.centres.float(), "counts": self.counts.to(torch.int64)}, meta)

    @classmethod
    def load(cls, path: str | os.PathLike, *, backbone=None, resize: int | None = None,
             crop: int | None = None) -> ClassStats:
        """Read a file written by `save`. With `backbone` (a Backbone or a name), `resize` or `crop` given, refuse
        (ValueError naming the difference) when the file was computed under anything else."""
        tensors, meta = read_artifact(path, kind="ClassStats", formats=(FORMAT,), tensors=("centres", "counts"),
                                      rerun=RERUN)
        stats = cls(
            centres=tensors["centres"], counts=tensors["counts"], classes=list(meta["classes"]),
            class_to_idx=dict(meta["class_to_idx"]), backbone_name=meta["backbone_name"],
            backbone_fingerprint=meta["backbone_fingerprint"], preprocessing=dict(meta["preprocessing"]),
            decoder_version=meta["decoder_version"], skipped=[list(s) for s in meta["skipped"]],
            features_path=meta.get("features_path"), run_info=dict(meta.get("run_info") or {}),
        )
        if stats.features_path and not Path(stats.features_path).is_file():
            beside = Path(path).with_name(Path(stats.features_path).name)
            if beside.is_file():  # moved together with the statistics file
                stats.features_path = str(beside)
        if meta.get("fingerprint") not in (None, stats.fingerprint):
            raise ValueError(f"{path}: contents do not match the recorded fingerprint (file altered or torn); {RERUN}")
        stats.check_compatible(backbone=backbone, resize=resize, crop=crop, where=str(path))
        return stats

    def check_compatible(self, *, backbone=None, resize=None, crop=None, where: str = "ClassStats") -> None:
        """Raise ValueError naming the difference if these statistics were not computed with these settings."""
        problems = []
        if backbone is not None:
            name = backbone if isinstance(backbone, str) else backbone.name
            if name != self.backbone_name:
                problems.append(f"backbone {self.backbone_name!r} was recorded, {name!r} was given")
            elif not isinstance(backbone, str) and backbone.fingerprint != self.backbone_fingerprint:
                problems.append(
                    f"backbone {name!r} weights differ (recorded fingerprint {self.backbone_fingerprint[:12]}, "
                    f"given {backbone.fingerprint[:12]})"
                )
        for key, value in (("resize", resize), ("crop", crop)):
            if value is not None and value != self.preprocessing.get(key):
                problems.append(f"{key}={self.preprocessing.get(key)} was recorded, {key}={value} was given")
        if problems:
            raise ValueError(f"{where}: statistics computed under different settings: " + "; ".join(problems))

    def load_features(self) -> tuple[np.memmap, np.ndarray]:
        """The feature cache: (features float16 memmap [N, D], labels int64 [N]); label -1 marks skipped items."""
        if not self.features_path:
            raise ValueError("these statistics were collected without cache_features=True: no feature cache")
        feats_path = Path(self.features_path)
        labels_path = labels_path_for(feats_path)
        for p in (feats_path, labels_path):
            if not p.is_file():
                raise FileNotFoundError(f"feature cache file {p} is missing")
        features = np.load(feats_path, mmap_mode="r")
        labels = np.load(labels_path)
        if features.ndim != 2 or labels.shape != (features.shape[0],) or features.shape[1] != self.feature_dim:
            raise ValueError(f"{feats_path}: cache shape {features.shape} / labels {labels.shape} do not match "
                             f"the statistics (D={self.feature_dim})")
        return features, labels.astype(np.int64, copy=False)


# ----------------------------------------------------------------------------------------------------- helpers
def labels_path_for(features_path: Path) -> Path:
    name = features_path.name
    stem = name[: -len(".features.npy")] if name.endswith(".features.npy") else features_path.stem
    return features_path.with_name(stem + ".labels.npy")
