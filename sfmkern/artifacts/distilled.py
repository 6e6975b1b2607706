"""`DistilledSet`: the distilled images, the artefact of the distillation phase (`sfmkern.distillation`).

File: safetensors (images uint8 [C·ipc, 3, H, W], labels int64) with JSON metadata: format `sfmkern.DistilledSet/1`,
the class names, the run's configuration (with the backbone name and fingerprint) and the fingerprint of the
statistics the images were matched to. Also written as PNG files (`to_image_folder`) and one grid image (`grid`).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from sfmkern._io import atomic_write, save_tensors
from sfmkern.artifacts._files import check_backbone, check_stats, read_artifact

FORMAT = "sfmkern.DistilledSet/1"
RERUN = "re-run `sfmkern distill` (distill) to write it again"


@dataclass
class DistilledSet:
    """The distilled images: `images` uint8 [C·ipc, 3, H, W] (class-major: image i has label i // ipc), `labels`
    int64 [C·ipc], `classes` (names), `config` (the run's DistillConfig as a dict plus backbone details) and
    `stats_fingerprint` (the real statistics the images were matched to)."""

    images: torch.Tensor
    labels: torch.Tensor
    classes: list[str]
    config: dict = field(default_factory=dict)
    stats_fingerprint: str = ""

    def __post_init__(self):
        if not isinstance(self.images, torch.Tensor) or self.images.dtype != torch.uint8:
            raise TypeError(f"DistilledSet.images must be a uint8 tensor, got {getattr(self.images, 'dtype', None)}")
        if self.images.dim() != 4 or self.images.shape[1] != 3:
            raise ValueError(f"DistilledSet.images must be [N, 3, H, W], got {tuple(self.images.shape)}")
        self.labels = torch.as_tensor(self.labels, dtype=torch.int64).cpu()
        if tuple(self.labels.shape) != (self.images.shape[0],):
            raise ValueError(f"DistilledSet.labels must be [{self.images.shape[0]}], got {tuple(self.labels.shape)}")
        self.classes = [str(c) for c in self.classes]
        if len(self.labels) and (int(self.labels.min()) < 0 or int(self.labels.max()) >= len(self.classes)):
            raise ValueError(f"DistilledSet.labels must lie in [0, {len(self.classes)}), got "
                             f"[{int(self.labels.min())}, {int(self.labels.max())}]")
        self.images = self.images.cpu().contiguous()

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def float_images(self) -> torch.Tensor:
        """[N, 3, H, W] float32 in [0, 1]."""
        return self.images.float() / 255.0

    def save(self, path: str | os.PathLike) -> Path:
        """Atomically write safetensors (images, labels) with JSON metadata (classes, config, fingerprint)."""
        meta = {"format": FORMAT, "classes": self.classes, "config": self.config,
                "stats_fingerprint": self.stats_fingerprint}
        return save_tensors(path, {"images": self.images, "labels": self.labels}, meta)

    @classmethod
    def load(cls, path: str | os.PathLike, *, stats=None, backbone=None) -> DistilledSet:
        """Read a file written by `save`. With `stats=` (ClassStats) or `backbone=`, refuse (ValueError, one line
        naming the file) a set distilled from other statistics or through another backbone."""
        tensors, meta = read_artifact(path, kind="DistilledSet", formats=(FORMAT,), tensors=("images", "labels"),
                                      rerun=RERUN)
        result = cls(tensors["images"], tensors["labels"], meta["classes"], meta.get("config", {}),
                     meta.get("stats_fingerprint", ""))
        try:
            result.check_compatible(stats=stats, backbone=backbone)
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}; {RERUN}") from None
        return result

    def check_compatible(self, *, stats=None, backbone=None) -> None:
        """Raise ValueError (one line) if the set was distilled from statistics other than `stats`, or through a
        backbone other than `backbone` (sets that record neither are accepted)."""
        check_stats("this distilled set", self.stats_fingerprint, stats)
        check_backbone("this distilled set", self.config.get("backbone", ""), self.config.get("backbone_fingerprint"),
                       backbone)

    def _file_stem(self, label: int) -> str:
        name = re.sub(r"[^A-Za-z0-9._-]+", "_", self.classes[label]).strip("._") or f"class{label}"
        return name

    def to_image_folder(self, path: str | os.PathLike) -> Path:
        """Write one PNG per image as `path/<class name>/<class name>_<k>.png` (an ImageFolder other tools read)."""
        from PIL import Image

        root = Path(path)
        seen: dict[int, int] = {}
        for i in range(len(self)):
            label = int(self.labels[i])
            k = seen.get(label, 0)
            seen[label] = k + 1
            folder = root / self._file_stem(label)
            folder.mkdir(parents=True, exist_ok=True)
            array = self.images[i].permute(1, 2, 0).numpy()
            out = folder / f"{self._file_stem(label)}_{k:04d}.png"
            atomic_write(out, lambda tmp, a=array: Image.fromarray(a).save(tmp, format="PNG"))
        return root

    def grid(self, path: str | os.PathLike, *, max_side: int = 8192) -> Path:
        """One PNG of every image: a row per class (its name on the left), its images side by side."""
        from PIL import Image, ImageDraw

        num_classes = len(self.classes)
        per_class = [torch.nonzero(self.labels == c).flatten().tolist() for c in range(num_classes)]
        cols = max(1, max(len(p) for p in per_class))
        height, width = self.images.shape[2], self.images.shape[3]
        cell = max(8, min(height, max_side // max(cols, num_classes, 1)))
        cell_w = max(8, round(cell * width / height))
        label_w = 8 + 6 * min(24, max(len(c) for c in self.classes))
        canvas = Image.new("RGB", (label_w + cols * (cell_w + 2), num_classes * (cell + 2)), (255, 255, 255))
        draw = ImageDraw.Draw(canvas)
        for c, rows in enumerate(per_class):
            y = c * (cell + 2)
            draw.text((4, y + max(0, cell // 2 - 5)), self.classes[c][:24], fill=(0, 0, 0))
            for j, i in enumerate(rows):
                tile = Image.fromarray(self.images[i].permute(1, 2, 0).numpy())
                if tile.size != (cell_w, cell):
                    tile = tile.resize((cell_w, cell), Image.BILINEAR)
                canvas.paste(tile, (label_w + j * (cell_w + 2), y))
        return atomic_write(path, lambda tmp: canvas.save(tmp, format="PNG"))
