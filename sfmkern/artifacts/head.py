"""`LinearHead`: a linear classifier on frozen features (the full-data head of classifier inheritance, a probe).

File: safetensors (weight float32 [C, D], bias [C]) with JSON metadata: format `sfmkern.LinearHead/1`, the class
names, the backbone whose features it reads (name, fingerprint), the statistics it was fitted beside (fingerprint)
and how it was trained. Its usual place is beside the statistics: `head_path_for(stats_path)`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from sfmkern._io import save_tensors
from sfmkern.artifacts._files import check_backbone, check_stats, read_artifact

FORMAT = "sfmkern.LinearHead/1"
HEAD_KIND = "sfmkern.linear-head"  # what sfmkern 0.1 wrote instead of a format (still read)
RERUN = "delete it, or re-run `sfmkern eval --mode inherit --stats ...` to fit it again"


@dataclass
class LinearHead:
    """A linear classifier on frozen features: logits = features @ weight.T + bias.

    weight: float32 [C, D]; bias: float32 [C]; classes: names (index = label); backbone_name/backbone_fingerprint:
    the backbone whose features it reads (loading or applying it with another backbone raises); stats_fingerprint:
    the statistics it was fitted beside (None when fitted from raw features); config: how it was trained.
    """

    weight: torch.Tensor
    bias: torch.Tensor
    classes: list[str]
    backbone_name: str
    backbone_fingerprint: str
    stats_fingerprint: str | None = None
    config: dict = field(default_factory=dict)

    def __post_init__(self):
        self.weight = self.weight.detach().float()
        self.bias = self.bias.detach().float()
        if self.weight.ndim != 2 or self.bias.shape != (self.weight.shape[0],):
            raise ValueError(f"head weight must be [C, D] and bias [C], got {tuple(self.weight.shape)}, "
                             f"{tuple(self.bias.shape)}")
        if len(self.classes) != self.weight.shape[0]:
            raise ValueError(f"head has {self.weight.shape[0]} outputs but {len(self.classes)} class names")

    num_classes = property(lambda self: int(self.weight.shape[0]), doc="C, the rows of `weight`")
    feature_dim = property(lambda self: int(self.weight.shape[1]), doc="D, the columns of `weight`")

    @property
    def storage_bytes(self) -> int:
        """Bytes of the float32 weight and bias."""
        return 4 * (self.weight.numel() + self.bias.numel())

    def to(self, device) -> LinearHead:
        return LinearHead(self.weight.to(device), self.bias.to(device), self.classes, self.backbone_name,
                          self.backbone_fingerprint, self.stats_fingerprint, self.config)

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """features [N, D] -> logits [N, C] float32 (on the head's device)."""
        return torch.nn.functional.linear(features.float(), self.weight, self.bias)

    def check_backbone(self, backbone) -> None:
        """Raise ValueError unless `backbone` is the one this head was fitted on."""
        check_backbone("this head", self.backbone_name, self.backbone_fingerprint, backbone, how="fitted on")

    def check_stats(self, stats, *, where: str = "head") -> None:
        """Refuse (ValueError, one line) a head fitted beside statistics other than `stats` (a stale head); a head
        fitted from raw features (no statistics fingerprint) is accepted."""
        check_stats(where, self.stats_fingerprint, stats, how="fitted on",
                    then=": refit it (load_or_fit_head, or `sfmkern eval --mode inherit --stats` without --head)")

    def save(self, path: str | os.PathLike) -> Path:
        """Atomically write the head as safetensors with its metadata (see `LinearHead.load`)."""
        meta = {
            "format": FORMAT,
            "kind": HEAD_KIND,
            "classes": list(self.classes),
            "backbone_name": self.backbone_name,
            "backbone_fingerprint": self.backbone_fingerprint,
            "stats_fingerprint": self.stats_fingerprint,
            "config": self.config,
        }
        return save_tensors(path, {"weight": self.weight, "bias": self.bias}, meta)

    @classmethod
    def load(cls, path: str | os.PathLike, *, backbone=None, stats=None) -> LinearHead:
        """Read a head written by `save` (also by sfmkern 0.1's, which recorded only `kind`); with `backbone=` or
        `stats=`, refuse (ValueError, one line naming the file) a head fitted on another backbone or beside other
        statistics."""
        tensors, meta = read_artifact(path, kind="linear head", formats=(FORMAT,), tensors=("weight", "bias"),
                                      rerun=RERUN, legacy={"kind": HEAD_KIND})
        head = cls(tensors["weight"], tensors["bias"], list(meta["classes"]), meta["backbone_name"],
                   meta["backbone_fingerprint"], meta.get("stats_fingerprint"), dict(meta.get("config") or {}))
        try:
            if backbone is not None:
                head.check_backbone(backbone)
            head.check_stats(stats, where="this head")
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from None
        return head


def head_path_for(stats_path: str | os.PathLike) -> Path:
    """Where the full-data head lives beside a statistics file: `<stem>.head.safetensors` in the same folder."""
    p = Path(stats_path)
    stem = p.name[: -len(".safetensors")] if p.name.endswith(".safetensors") else p.stem
    return p.with_name(f"{stem}.head.safetensors")
