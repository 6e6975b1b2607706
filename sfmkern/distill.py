"""Statistical flow matching distillation whose memory does not grow with the number of synthetic images.

One step (`Distiller.step`):
  draw the augmentations of every view (CPU generator, identical on every rank) ->
  single-phase: render, augment, forward with autograd, `ops.sfm_loss`, backward (when one chunk holds every view);
  two-phase:    phase 1, per chunk of views without autograd: render only that chunk's images, augment, features,
                `ops.class_sums` (all-reduced across ranks) -> `ops.flow_loss_and_grad` gives L and G = dL/dμ̃;
                phase 2, per chunk: render and augment again with autograd (same stored draws), features, and
                back-propagate `ops.feature_grad(G, counts, labels)` = G[y]/n_y into that chunk's images only ->
  Adam on every pyramid level.
View labels are non-decreasing (class-major images, image-major views), so the ops take their atomic-free,
deterministic segmented path (`sorted_labels=True`). Peak memory is one chunk's activations plus the images'
parameters, gradients and Adam state, whatever C·ipc is: the gradient of a chunk is accumulated into a preallocated
buffer (never through a full-size slice backward), and fused Adam updates in place.

Distributed (torch.distributed initialised): images are sharded contiguously across ranks; the per-class sums (C×D)
are all-reduced, so every rank computes the same L and G and updates its own images: the same images as one process.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from sfmkern import _io, augment
from sfmkern._callable import make_module_callable
from sfmkern._nvtx import nvtx_range
from sfmkern.synthetic import PARAMETERISATIONS, SyntheticImages, decode, level_sizes

MODES = ("auto", "single", "two_phase")
_CPU_DEFAULT_CHUNK = 256  # views per chunk on CPU when no memory budget is given
_CHECKPOINT_FORMAT = "sfmkern.distill.checkpoint/1"
_DISTILLED_FORMAT = "sfmkern.DistilledSet/1"
# Config fields that change the trajectory: a checkpoint written under other values cannot be resumed.
_TRAJECTORY_FIELDS = ("ipc", "augs", "lr", "syn_res", "crop", "seed", "grow_every", "param", "noise_std", "noise_p",
                      "noise_mean", "flip_p", "scale", "ratio", "init", "objective", "anchor_weight", "anchor_target",
                      "anchor_images", "anchor_views", "subcentres")
INITS = ("real", "noise")
OBJECTIVES = ("anchored", "sfm")
ANCHOR_TARGETS = ("augmented", "centred")
# The paper's schedule (Xia et al., 5000-step GPU runs): `paper_schedule()` gives these as distill() keywords.
PAPER_SCHEDULE = {"lr": 2e-3, "grow_every": 200, "steps": 5000, "init": "noise", "objective": "sfm",
                  "subcentres": False}
# Default lr when `lr=None`, by start (calibration in docs/distill.md).
DEFAULT_LR = {"noise": 1e-2, "real": 2e-3}


@dataclass
class DistillConfig:
    """Hyper-parameters of a distillation run (defaults: the code behind the paper's numbers).

    noise_mean: mean of the Gaussian noise added (with probability `noise_p`) to an augmented view: 0.5 in the code
    behind the published SFM numbers, 0.0 in LGM's later fix. chunk_size: views per chunk of the two-phase step
    (None: from `max_memory`, free device memory, or 256 on CPU). max_memory: bytes (int) or a string such as
    "8GiB" bounding this process's device memory. grow_every: pyramid growth interval in steps (0: all levels at once).
    """

    ipc: int = 1
    steps: int = 5000
    augs: int = 1
    lr: float | None = None
    syn_res: int = 256
    crop: int = 224
    seed: int = 0
    grow_every: int | None = None
    param: str = "pyramid"
    noise_std: float = 0.2
    noise_p: float = 0.5
    noise_mean: float = 0.5
    flip_p: float = 0.5
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    chunk_size: int | None = None
    max_memory: int | str | None = None
    checkpoint_every: int = 100
    log_every: int = 10
    init: str = "real"
    objective: str = "sfm"
    anchor_weight: float = 10.0
    anchor_target: str = "augmented"
    anchor_images: int = 64
    anchor_views: int = 4
    subcentres: bool = True

    @property
    def effective_lr(self) -> float:
        """`lr`, or when None the default for the start (`DEFAULT_LR[init]`)."""
        return float(self.lr) if self.lr is not None else DEFAULT_LR[self.init]

    @property
    def effective_grow_every(self) -> int:
        """`grow_every`, or when None the schedule derived from `steps`: every level from step 0 (0)."""
        return int(self.grow_every) if self.grow_every is not None else 0

    def __post_init__(self):
        self.scale = tuple(float(v) for v in self.scale)
        self.ratio = tuple(float(v) for v in self.ratio)
        for name in ("ipc", "steps", "augs", "syn_res", "crop", "checkpoint_every", "log_every", "anchor_images",
                     "anchor_views"):
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < (0 if name == "steps"
                                                                                               else 1):
                raise ValueError(f"DistillConfig.{name} must be a positive int (steps: >= 0), got {value!r}")
        if self.grow_every is not None and not (isinstance(self.grow_every, int) and self.grow_every >= 0):
            raise ValueError(f"DistillConfig.grow_every must be None or an int >= 0, got {self.grow_every!r}")
        for name, allowed in (("init", INITS), ("objective", OBJECTIVES), ("anchor_target", ANCHOR_TARGETS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"DistillConfig.{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if not (math.isfinite(self.anchor_weight) and self.anchor_weight >= 0):
            raise ValueError(f"DistillConfig.anchor_weight must be a finite float >= 0, got {self.anchor_weight!r}")
        if self.param not in PARAMETERISATIONS:
            raise ValueError(f"DistillConfig.param must be one of {PARAMETERISATIONS}, got {self.param!r}")
        if self.lr is not None and not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"DistillConfig.lr must be a positive finite float, got {self.lr!r}")
        for name in ("noise_p", "flip_p"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"DistillConfig.{name} must be in [0, 1], got {getattr(self, name)!r}")
        if self.noise_std < 0:
            raise ValueError(f"DistillConfig.noise_std must be >= 0, got {self.noise_std!r}")
        if len(self.scale) != 2 or not 0 < self.scale[0] <= self.scale[1] <= 1:
            raise ValueError(f"DistillConfig.scale must be (lo, hi) with 0 < lo <= hi <= 1, got {self.scale!r}")
        if len(self.ratio) != 2 or not 0 < self.ratio[0] <= self.ratio[1]:
            raise ValueError(f"DistillConfig.ratio must be (lo, hi) with 0 < lo <= hi, got {self.ratio!r}")
        if self.chunk_size is not None and (not isinstance(self.chunk_size, int) or self.chunk_size < 1):
            raise ValueError(f"DistillConfig.chunk_size must be a positive int or None, got {self.chunk_size!r}")
        if self.max_memory is not None:
            self.max_memory = parse_bytes(self.max_memory)

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["scale"], out["ratio"] = list(self.scale), list(self.ratio)
        return out


def parse_bytes(value: int | str) -> int:
    """8 * 2**30, "8GiB", "8 GB", "512MiB" -> bytes (binary and decimal units)."""
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        if value <= 0:
            raise ValueError(f"max_memory must be positive, got {value}")
        return int(value)
    if isinstance(value, str):
        m = re.fullmatch(r"\s*([0-9.]+)\s*([KMGT]?)(i?)B?\s*", value, flags=re.IGNORECASE)
        if m:
            base = 1024 if m.group(3) or not m.group(2) else 1000
            power = "KMGT".find(m.group(2).upper()) + 1 if m.group(2) else 0
            number = float(m.group(1))
            if number > 0:
                return int(number * base**power)
    raise ValueError(f"max_memory must be a positive number of bytes or a string like '8GiB', got {value!r}")


def _dist_info() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _same_device(a, b) -> bool:
    a, b = torch.device(a), torch.device(b)
    return a.type == b.type and (a.index is None or b.index is None or a.index == b.index)


def _shard(num_images: int, rank: int, world: int) -> tuple[int, int]:
    return rank * num_images // world, (rank + 1) * num_images // world


def _to_uint8(images: torch.Tensor) -> torch.Tensor:
    return (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)


# ------------------------------------------------------------------------------------------------------ DistilledSet
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
        meta = {"format": _DISTILLED_FORMAT, "classes": self.classes, "config": self.config,
                "stats_fingerprint": self.stats_fingerprint}
        return _io.save_tensors(path, {"images": self.images, "labels": self.labels}, meta)

    @classmethod
    def load(cls, path: str | os.PathLike) -> DistilledSet:
        tensors, meta = _io.load_tensors(path)
        if meta.get("format") != _DISTILLED_FORMAT or "images" not in tensors or "labels" not in tensors:
            raise ValueError(f"{path}: not a DistilledSet file (format {meta.get('format')!r})")
        return cls(tensors["images"], tensors["labels"], meta["classes"], meta.get("config", {}),
                   meta.get("stats_fingerprint", ""))

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
            _io.atomic_write(out, lambda tmp, a=array: Image.fromarray(a).save(tmp, format="PNG"))
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
        return _io.atomic_write(path, lambda tmp: canvas.save(tmp, format="PNG"))


# --------------------------------------------------------------------------------------------------------- Distiller
class Distiller:
    """Owns the synthetic images of this rank, their Adam state and the augmentation generator; `step()` runs one
    distillation step.

    real_flow_or_stats: a ClassStats (anything with `.centres` [C, D]; its `classes`, `fingerprint` and
    `backbone_fingerprint` are used) or the real flow F [C, D] itself (`ops.real_flow(centres)`).
    backbone: a frozen `sfmkern.backbone.Backbone` (weights never receive a gradient).
    Images are class-major (image i has label i // ipc); view v of this rank is view v % A of local image v // A.
    """

    def __init__(self, real_flow_or_stats, backbone, *, classes=None, config: DistillConfig | None = None,
                 device=None, init_images: torch.Tensor | None = None, targets: torch.Tensor | None = None,
                 anchor: torch.Tensor | None = None):
        from sfmkern import ops

        self.ops = ops
        self.config = config if config is not None else DistillConfig()
        if not isinstance(self.config, DistillConfig):
            raise TypeError(f"config must be a DistillConfig, got {type(self.config).__name__}")
        cfg = self.config
        self.backbone = backbone
        self.device = torch.device(backbone.device)
        if device is not None and not _same_device(device, self.device):
            raise ValueError(f"device {device} differs from the backbone's device {backbone.device}")
        if any(p.requires_grad for p in backbone.model.parameters()):
            warnings.warn("the backbone's weights required grad; freezing them (sfmkern never computes weight "
                          "gradients)", stacklevel=2)
            backbone.model.requires_grad_(False)

        centres = None
        if isinstance(real_flow_or_stats, torch.Tensor):
            real_flow = real_flow_or_stats
            self.stats_fingerprint = ""
            stats_classes = None
        elif hasattr(real_flow_or_stats, "centres"):
            stats = real_flow_or_stats
            bb_fp = getattr(stats, "backbone_fingerprint", None)
            if bb_fp and getattr(backbone, "fingerprint", None) and bb_fp != backbone.fingerprint:
                raise ValueError("the statistics were collected with another backbone (fingerprint "
                                 f"{bb_fp[:12]}… vs {backbone.fingerprint[:12]}…)")
            centres = torch.as_tensor(stats.centres).to(self.device, torch.float32)
            real_flow = ops.real_flow(centres)
            self.stats_fingerprint = str(getattr(stats, "fingerprint", ""))
            stats_classes = list(getattr(stats, "classes", []) or []) or None
        else:
            raise TypeError("real_flow_or_stats must be a ClassStats or a real-flow tensor [C, D], got "
                            f"{type(real_flow_or_stats).__name__}")
        if real_flow.dim() != 2 or real_flow.shape[0] < 2:
            raise ValueError(f"real flow must be [C, D] with C >= 2, got shape {tuple(real_flow.shape)}")
        feature_dim = getattr(backbone, "feature_dim", None)
        if feature_dim is not None and real_flow.shape[1] != feature_dim:
            raise ValueError(f"real flow has D={real_flow.shape[1]} but the backbone's features have "
                             f"D={feature_dim}")
        num_real_classes = int(real_flow.shape[0])
        classes = classes if classes is not None else stats_classes
        self.classes = [str(c) for c in classes] if classes is not None else [str(c) for c in range(num_real_classes)]
        if len(self.classes) != num_real_classes:
            raise ValueError(f"{len(self.classes)} class names for a real flow of {num_real_classes} classes")
        self.config = cfg = self._effective_config(centres, init_images, targets, anchor, num_real_classes)
        per_image = targets is not None and cfg.ipc > 1 and cfg.subcentres
        if per_image:  # sub-centre flows: image i is matched to target i (its class's sub-centre i % ipc)
            centres = torch.as_tensor(targets).to(self.device, torch.float32)
            real_flow = ops.real_flow(centres)
        self.real_flow = real_flow.detach().to(self.device, torch.float32).contiguous()
        # flow targets the ops reduce over: the classes, or with sub-centres every image's own sub-centre
        self.num_classes = int(self.real_flow.shape[0])
        self.anchor = None
        if cfg.objective == "anchored":
            target = anchor if anchor is not None else centres
            self.anchor = torch.as_tensor(target).detach().to(self.device, torch.float32).contiguous()
            if tuple(self.anchor.shape) != tuple(self.real_flow.shape):
                raise ValueError(f"anchor must be {tuple(self.real_flow.shape)} (one row per flow target), got "
                                 f"{tuple(self.anchor.shape)}")

        self.rank, self.world = _dist_info()
        self.num_images = num_real_classes * cfg.ipc
        if self.num_images < self.world:
            raise ValueError(f"{self.num_images} synthetic images cannot be sharded over {self.world} ranks")
        self.rows = _shard(self.num_images, self.rank, self.world)
        self.images = SyntheticImages(self.num_images, cfg.syn_res, param=cfg.param,
                                      grow_every=cfg.effective_grow_every, seed=cfg.seed, rows=self.rows,
                                      device=self.device)
        if cfg.init == "real":
            if tuple(init_images.shape) != (self.num_images, 3, cfg.syn_res, cfg.syn_res):
                raise ValueError(f"init_images must be [{self.num_images}, 3, {cfg.syn_res}, {cfg.syn_res}], got "
                                 f"{tuple(init_images.shape)}")
            self.images.set_images(init_images[self.rows[0] : self.rows[1]])
        image_labels = torch.arange(*self.rows, dtype=torch.int64) // (1 if per_image else cfg.ipc)
        self.view_labels = image_labels.repeat_interleave(cfg.augs).to(self.device)
        self.num_views = len(self.view_labels)  # views of this rank
        self.aug_generator = torch.Generator().manual_seed(cfg.seed)
        self.step_count = 0
        self.chunk_size: int | None = cfg.chunk_size
        self._nonfinite = torch.zeros((), dtype=torch.bool, device=self.device)
        self._new_optimizer()

    def _effective_config(self, centres, init_images, targets, anchor, num_classes) -> DistillConfig:
        """The config with what cannot apply replaced (each with a warning): init="real" without init_images starts
        from noise; objective="anchored" without class centres (a bare flow tensor) is the flow alone; the
        "augmented" anchor without its targets anchors to the given centres, centred."""
        cfg = self.config
        changes = {}
        if cfg.init == "real" and init_images is None:
            warnings.warn("init='real' but no real images are reachable (pass init_data=, or statistics with a "
                          "feature cache and their source): starting from noise", stacklevel=3)
            changes["init"] = "noise"
        if cfg.objective == "anchored" and centres is None and anchor is None:
            warnings.warn("objective='anchored' needs class centres (statistics), not a bare flow: using the flow "
                          "cosine alone (objective='sfm')", stacklevel=3)
            changes["objective"] = "sfm"
        elif cfg.objective == "anchored" and cfg.anchor_target == "augmented" and anchor is None:
            warnings.warn("anchor_target='augmented' needs real images to compute the augmented centres: anchoring "
                          "to the clean centres with their common offset removed (anchor_target='centred')",
                          stacklevel=3)
            changes["anchor_target"] = "centred"
        if targets is not None and tuple(targets.shape)[0] != num_classes * cfg.ipc:
            raise ValueError(f"targets must have {num_classes * cfg.ipc} rows (class-major, ipc per class), got "
                             f"{tuple(targets.shape)}")
        return dataclasses.replace(cfg, **changes) if changes else cfg

    def _loss_and_grad(self, sums: torch.Tensor, counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The objective on the (all-reduced) per-target feature sums [T, D] and counts [T] -> (loss, G = dL/dμ̃
        [T, D]): the flow cosine, plus with objective="anchored" the anchoring term (fused in
        `ops.flow_loss_and_grad(..., anchor=, anchor_weight=)`). Every step mode computes its loss here."""
        cfg = self.config
        if self.anchor is None or cfg.anchor_weight == 0:
            return self.ops.flow_loss_and_grad(sums, counts, self.real_flow)
        anchor = self.anchor
        if cfg.anchor_target == "centred":  # the targets moved by the common offset of the synthetic means
            mu = sums / counts.clamp_min(1).to(sums.dtype).unsqueeze(1)
            anchor = anchor - anchor.mean(0, keepdim=True) + mu.mean(0, keepdim=True)
        return self.ops.flow_loss_and_grad(sums, counts, self.real_flow, anchor=anchor,
                                           anchor_weight=cfg.anchor_weight)

    # -------------------------------------------------------------------------------------------- state
    def _new_optimizer(self) -> None:
        # fused Adam updates in place without a full-size temporary (the for-loop version allocates one per level,
        # which would make the step's transient memory grow with C·ipc); plain Adam where fused is unsupported
        try:
            self.optimizer = torch.optim.Adam(self.images.levels, lr=self.config.effective_lr, fused=True)
        except (RuntimeError, TypeError, ValueError):
            self.optimizer = torch.optim.Adam(self.images.levels, lr=self.config.effective_lr)

    def parameters(self) -> list[torch.Tensor]:
        """The pyramid levels of this rank (leaf float32 tensors, coarsest first)."""
        return self.images.levels

    def own_bytes(self) -> int:
        """Bytes of the images' parameters, their gradients and Adam state as currently allocated."""
        total = self.images.nbytes()
        for p in self.images.levels:
            if p.grad is not None:
                total += p.grad.numel() * p.grad.element_size()
            for value in self.optimizer.state.get(p, {}).values():
                if isinstance(value, torch.Tensor) and value.device == p.device:
                    total += value.numel() * value.element_size()
        return total

    def _grow_to(self, step: int) -> None:
        grew = False
        while self.images.num_levels < self.images.levels_due(step):
            grew |= self.images.grow()
        if grew:  # Adam state reset on every extension
            self._new_optimizer()

    # -------------------------------------------------------------------------------------------- views
    def draw_views(self) -> augment.Views:
        """Draw the augmentations of every view of every image (all ranks draw the same), keep this rank's:
        image-major order (local view v = view v % A of local image v // A), `source` = local image row."""
        return self._draw_views(self.aug_generator)

    def _draw_views(self, generator: torch.Generator) -> augment.Views:
        cfg = self.config
        res = cfg.syn_res
        views = augment.draw_views(self.num_images, cfg.augs, res, res, generator=generator,
                                   scale=cfg.scale, ratio=cfg.ratio, flip_p=cfg.flip_p, noise_p=cfg.noise_p)
        start, stop = self.rows
        # draw_views is view-major (k-th view of image i at k·N + i); reorder to image-major for this shard
        index = (torch.arange(start, stop)[:, None] + self.num_images * torch.arange(cfg.augs)[None, :]).reshape(-1)
        mine = views.select(index)
        return augment.Views(mine.source - start, mine.theta, mine.noise_on, mine.noise_seed)

    def _chunk_views(self, views: augment.Views, v0: int, v1: int):
        a = self.config.augs
        lo, hi = v0 // a, (v1 - 1) // a + 1
        part = views.select(slice(v0, v1))
        return lo, hi, augment.Views(part.source - lo, part.theta, part.noise_on, part.noise_seed)

    def _augment(self, images: torch.Tensor, views: augment.Views) -> torch.Tensor:
        cfg = self.config
        with nvtx_range("distill/augment"):
            return augment.apply_views(images, views, crop=cfg.crop, noise_std=cfg.noise_std,
                                       noise_mean=cfg.noise_mean)

    def _render_leaves(self, lo: int, hi: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Images [lo, hi) with autograd to fresh leaf views of the levels (their grads go to the levels by hand)."""
        leaves = [level.detach()[lo:hi].requires_grad_(True) for level in self.images.levels]
        with nvtx_range("distill/render"):
            return decode(leaves, self.images.resolution), leaves

    def _accumulate(self, lo: int, hi: int, leaves: list[torch.Tensor]) -> None:
        for level, leaf in zip(self.images.levels, leaves, strict=True):
            if leaf.grad is not None:
                level.grad[lo:hi].add_(leaf.grad)

    # -------------------------------------------------------------------------------------------- chunking
    def resolve_chunk_size(self) -> int:
        """Views per chunk: `config.chunk_size`, else from `max_memory` or free CUDA memory (activation bytes per
        view measured by a probe forward), else 256 on CPU. Never more than this rank's views."""
        cfg = self.config
        if self.chunk_size is not None:
            return min(self.chunk_size, self.num_views)
        budget = None
        sizes = [self.images.resolution] if cfg.param == "pixels" else level_sizes(self.images.resolution)
        own_max = 4 * 4 * len(self.images) * 3 * sum(s * s for s in sizes)  # params, grads, Adam m and v (fp32)
        if cfg.max_memory is not None:
            model_bytes = sum(p.numel() * p.element_size() for p in self.backbone.model.parameters())
            budget = cfg.max_memory - model_bytes - own_max
            if budget <= 0:
                raise ValueError(f"max_memory={cfg.max_memory} bytes does not even hold the backbone "
                                 f"({model_bytes} B) and the images with their Adam state ({own_max} B)")
        elif self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            budget = int(0.85 * free) - (own_max - self.own_bytes())
        if budget is None:
            chunk = _CPU_DEFAULT_CHUNK
        else:
            per_view = self._probe_bytes_per_view()
            chunk = max(1, int(budget // per_view))
        self.chunk_size = max(1, min(chunk, self.num_views))
        return self.chunk_size

    def _probe_bytes_per_view(self) -> float:
        """Activation bytes per view: tensors saved for backward during one forward of a few views (deduplicated
        by storage, weights excluded), times 1.5 for transients (an estimate; pass chunk_size= to override)."""
        k = min(2 * self.config.augs, self.num_views)
        weights = {p.untyped_storage().data_ptr() for p in self.backbone.model.parameters()}
        seen: dict[int, int] = {}

        def pack(t):
            storage = t.untyped_storage()
            ptr = storage.data_ptr()
            if ptr not in weights:
                seen[ptr] = max(seen.get(ptr, 0), storage.nbytes())
            return t

        lo, hi, part = self._chunk_views(self._draw_views(torch.Generator().manual_seed(0)), 0, k)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            images, _ = self._render_leaves(lo, hi)
            feats = self.backbone.features(self._augment(images, part))
        del feats, images
        return 1.5 * max(sum(seen.values()), 1) / k

    def resolve_mode(self, mode: str = "auto") -> str:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if mode != "auto":
            return mode
        return "single" if self.resolve_chunk_size() >= self.num_views else "two_phase"

    # -------------------------------------------------------------------------------------------- the step
    def _all_reduce(self, *tensors: torch.Tensor) -> None:
        if self.world > 1:
            for t in tensors:
                torch.distributed.all_reduce(t)

    def forward_backward(self, mode: str = "auto", views: augment.Views | None = None) -> torch.Tensor:
        """Grow the pyramid if due, draw the views (unless given) and leave dL/dlevel in each level's `.grad`.
        Returns the loss (0-dim float32 on the device, no host sync)."""
        mode = self.resolve_mode(mode)
        self._grow_to(self.step_count)
        if views is None:
            views = self.draw_views()
        for level in self.images.levels:
            if level.grad is None:
                level.grad = torch.zeros_like(level)
            else:
                level.grad.zero_()
        if mode == "single":
            return self._single_phase(views)
        return self._two_phase(views)

    def _single_phase(self, views: augment.Views) -> torch.Tensor:
        ops = self.ops
        images, leaves = self._render_leaves(0, len(self.images))
        feats = self.backbone.features(self._augment(images, views))
        with nvtx_range("distill/loss"):
            sums, counts = ops.class_sums(feats.detach(), self.view_labels, self.num_classes, sorted_labels=True)
            self._all_reduce(sums, counts)
            loss, grad_mu = self._loss_and_grad(sums, counts)
        feats.backward(ops.feature_grad(grad_mu, counts, self.view_labels, dtype=feats.dtype))
        self._accumulate(0, len(self.images), leaves)
        return loss.detach()

    def _two_phase(self, views: augment.Views) -> torch.Tensor:
        ops = self.ops
        chunk = self.resolve_chunk_size()
        bounds = [(v0, min(v0 + chunk, self.num_views)) for v0 in range(0, self.num_views, chunk)]
        sums = torch.zeros(self.num_classes, self.real_flow.shape[1], dtype=torch.float32, device=self.device)
        counts = torch.zeros(self.num_classes, dtype=torch.int64, device=self.device)
        with nvtx_range("distill/phase-1"), torch.no_grad():
            for v0, v1 in bounds:
                lo, hi, part = self._chunk_views(views, v0, v1)
                with nvtx_range("distill/render"):
                    images = self.images.render(lo, hi)
                feats = self.backbone.features(self._augment(images, part))
                chunk_sums, chunk_counts = ops.class_sums(feats, self.view_labels[v0:v1], self.num_classes,
                                                          sorted_labels=True)
                sums += chunk_sums
                counts += chunk_counts
                del images, feats
        with nvtx_range("distill/loss"):
            self._all_reduce(sums, counts)
            loss, grad_mu = self._loss_and_grad(sums, counts)
        with nvtx_range("distill/phase-2"):
            for v0, v1 in bounds:
                lo, hi, part = self._chunk_views(views, v0, v1)
                images, leaves = self._render_leaves(lo, hi)
                feats = self.backbone.features(self._augment(images, part))
                labels = self.view_labels[v0:v1]
                feats.backward(ops.feature_grad(grad_mu, counts, labels, dtype=feats.dtype))
                self._accumulate(lo, hi, leaves)
                del images, feats, leaves
        return loss.detach()

    def step(self, mode: str = "auto") -> torch.Tensor:
        """One distillation step (forward_backward + Adam). Returns the loss (0-dim device tensor, no host sync)."""
        loss = self.forward_backward(mode)
        with nvtx_range("distill/optimiser"):
            self.optimizer.step()
        self._nonfinite |= ~torch.isfinite(loss)
        self.step_count += 1
        return loss

    def check_finite(self) -> None:
        """Host sync: raise FloatingPointError if any loss since construction/resume was non-finite."""
        if bool(self._nonfinite):
            raise FloatingPointError(f"non-finite distillation loss at or before step {self.step_count}")

    # -------------------------------------------------------------------------------------------- results
    @torch.no_grad()
    def render_local(self, batch: int = 64) -> torch.Tensor:
        """This rank's images [n_local, 3, R, R] float32 in (0, 1), on the CPU."""
        parts = [self.images.render(lo, min(lo + batch, len(self.images))).cpu()
                 for lo in range(0, len(self.images), batch)]
        return torch.cat(parts)

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """All ranks' row blocks of `tensor` (this rank's rows first dim), concatenated in rank order, on the CPU."""
        if self.world == 1:
            return tensor
        import torch.distributed as dist

        sizes = [_shard(self.num_images, r, self.world) for r in range(self.world)]
        longest = max(b - a for a, b in sizes)
        backend = dist.get_backend()
        dev = self.device if backend == "nccl" else torch.device("cpu")
        padded = torch.zeros((longest, *tensor.shape[1:]), dtype=tensor.dtype, device=dev)
        padded[: tensor.shape[0]] = tensor.to(dev)
        out = [torch.empty_like(padded) for _ in range(self.world)]
        dist.all_gather(out, padded)
        return torch.cat([o[: b - a].cpu() for o, (a, b) in zip(out, sizes, strict=True)])

    def float_images(self) -> torch.Tensor:
        """Every image of every rank [C·ipc, 3, R, R] float32 in (0, 1) on the CPU (collective when distributed)."""
        return self.gather(self.render_local())

    def distilled_set(self, extra_config: dict | None = None) -> DistilledSet:
        images = _to_uint8(self.float_images())
        labels = torch.arange(self.num_images, dtype=torch.int64) // self.config.ipc
        config = {**self.config.to_dict(), "steps_done": self.step_count, "effective_lr": self.config.effective_lr,
                  "effective_grow_every": self.config.effective_grow_every, **(extra_config or {})}
        return DistilledSet(images, labels, self.classes, config, self.stats_fingerprint)

    # -------------------------------------------------------------------------------------------- checkpoints
    def checkpoint_path(self, out_dir: str | os.PathLike) -> Path:
        if self.world == 1:
            return Path(out_dir) / "checkpoint.safetensors"
        return Path(out_dir) / f"checkpoint-rank{self.rank}-of-{self.world}.safetensors"

    def _identity(self) -> dict:
        cfg = self.config.to_dict()
        return {
            "config": {k: cfg[k] for k in _TRAJECTORY_FIELDS},
            "num_classes": self.num_classes,
            "stats_fingerprint": self.stats_fingerprint,
            "backbone_fingerprint": getattr(self.backbone, "fingerprint", ""),
            "world": self.world,
            "rows": list(self.rows),
        }

    def save_checkpoint(self, path: str | os.PathLike) -> Path:
        """Atomically save levels, Adam state, the augmentation RNG state and the step (this rank's shard)."""
        tensors = {"aug_rng": self.aug_generator.get_state()}
        for k, level in enumerate(self.images.levels):
            tensors[f"level{k}"] = level.detach()
            state = self.optimizer.state.get(level, {})
            for key in ("exp_avg", "exp_avg_sq", "step"):
                if key in state:
                    tensors[f"adam_{key}{k}"] = torch.as_tensor(state[key]).detach()
        meta = {"format": _CHECKPOINT_FORMAT, "step": self.step_count, "num_levels": self.images.num_levels,
                **self._identity()}
        return _io.save_tensors(path, tensors, meta)

    def load_checkpoint(self, path: str | os.PathLike) -> int:
        """Restore a checkpoint written by `save_checkpoint` for the same run; returns its step."""
        tensors, meta = _io.load_tensors(path)
        if meta.get("format") != _CHECKPOINT_FORMAT:
            raise ValueError(f"{path}: not a distillation checkpoint (format {meta.get('format')!r})")
        mine = self._identity()
        for key, value in mine.items():
            theirs = meta.get(key)
            if key == "config":
                diff = [f"{k}: {theirs.get(k)!r} in the checkpoint vs {v!r} now" for k, v in value.items()
                        if theirs is None or theirs.get(k) != v]
                if diff:
                    raise ValueError(f"{path}: written by a run with another configuration ({'; '.join(diff)}); "
                                     "use another out_dir or resume=False")
            elif theirs != value:
                raise ValueError(f"{path}: written by another run ({key}: {theirs!r} vs {value!r}); "
                                 "use another out_dir or resume=False")
        levels = [tensors[f"level{k}"] for k in range(int(meta["num_levels"]))]
        self.images.load_levels(levels)
        self._new_optimizer()
        state = {}
        for k in range(len(levels)):
            if f"adam_step{k}" in tensors:
                state[k] = {"step": tensors[f"adam_step{k}"].clone(), "exp_avg": tensors[f"adam_exp_avg{k}"],
                            "exp_avg_sq": tensors[f"adam_exp_avg_sq{k}"]}
        if state:
            sd = self.optimizer.state_dict()
            sd["state"] = state
            self.optimizer.load_state_dict(sd)
        self.aug_generator.set_state(tensors["aug_rng"])
        self.step_count = int(meta["step"])
        self._nonfinite.zero_()
        return self.step_count


# ----------------------------------------------------------------------------------------------------------- distill
def _resolve_stats(data_or_stats, backbone, *, crop: int, out_dir: Path | None, progress: bool):
    if isinstance(data_or_stats, torch.Tensor) or hasattr(data_or_stats, "centres"):
        return data_or_stats
    from sfmkern import stats as stats_mod

    if isinstance(data_or_stats, (str, os.PathLike)) and str(data_or_stats).endswith(".safetensors"):
        return stats_mod.ClassStats.load(data_or_stats, backbone=backbone)
    resize = max(crop, round(crop * 256 / 224))
    out = out_dir / "stats.safetensors" if out_dir is not None else None
    return stats_mod.collect_stats(data_or_stats, backbone, resize=resize, crop=crop, out=out, resume=True,
                                   cache_features=out is not None, progress=progress)


def warn_incomplete_schedule(config: DistillConfig) -> bool:
    """Warn (and return True) when the run ends before the growth schedule has created every pyramid level."""
    if config.param != "pyramid" or config.init == "real" or config.steps == 0:
        return False
    levels = len(level_sizes(config.syn_res))
    every = config.effective_grow_every
    if every == 0 or 1 + (config.steps - 1) // every >= levels:
        return False
    warnings.warn(f"steps={config.steps} ends before the pyramid has all {levels} levels (one every "
                  f"grow_every={every} steps needs {(levels - 1) * every + 1}): the images stay coarse; use "
                  "grow_every=None (every level from step 0) or more steps", stacklevel=3)
    return True


def paper_schedule() -> dict:
    """The paper's settings (lr 2e-3, a pyramid level every 200 steps, 5000 steps, noise start, flow cosine alone)
    as `distill()` keywords: `sfmkern.distill(stats, backbone, **paper_schedule())`."""
    return dict(PAPER_SCHEDULE)


def distill(data_or_stats, backbone, *, ipc: int = 1, steps: int = 5000, augs: int = 1, lr: float | None = None,
            syn_res: int = 256, crop: int = 224, seed: int = 0, device=None, max_memory=None, out_dir=None,
            resume: bool = True, grow_every: int | None = None, param: str = "pyramid", noise_std: float = 0.2,
            noise_p: float = 0.5, noise_mean: float = 0.5, chunk_size: int | None = None,
            checkpoint_every: int = 100, progress: bool = True, log_every: int = 10, mode: str = "auto",
            classes=None, init: str = "real", objective: str = "sfm", anchor_weight: float = 10.0,
            anchor_target: str = "augmented", anchor_images: int = 64, anchor_views: int = 4,
            subcentres: bool = True, scale: tuple[float, float] = (0.08, 1.0),
            init_data=None) -> DistilledSet:
    """Distil `ipc` images per class whose statistical flow matches the real one; returns a DistilledSet.

    data_or_stats: a ClassStats, a path to a saved one, a real-flow tensor [C, D], or a data source (statistics are
    collected with `crop`, cached as out_dir/stats.safetensors when out_dir is given). With out_dir, checkpoints
    (images, Adam state, RNG state, step) are written atomically every `checkpoint_every` steps and at the end,
    `resume=True` continues from one, and the result is saved as out_dir/distilled.safetensors. A non-finite loss
    (checked every `log_every` steps and before each checkpoint) raises FloatingPointError and keeps the last good
    checkpoint. mode: "auto" (single-phase when one chunk holds every view), "single" or "two_phase".

    Beyond the paper (docs/distill.md has the measurements; `PAPER_SCHEDULE` holds the paper's settings):
    init "real" (default: start from the real images nearest the class centre / k-means sub-centres, found in the
    statistics' feature cache; needs the real images: `init_data=` the source the statistics were collected on, or
    data as the first argument; otherwise noise, with a warning) or "noise"; objective "sfm" (default: the paper's
    flow cosine alone) or "anchored" (flow cosine + anchor_weight x the anchoring term to the class means of
    augmented real views, anchor_target="augmented", over anchor_images per class x anchor_views views; "centred":
    the clean centres with their common offset removed; measured harmful at weight 10); subcentres (ipc > 1):
    each image matches the flow of its own k-means sub-centre. lr None: DEFAULT_LR by start; grow_every None:
    every pyramid level from step 0.
    """
    from tqdm.auto import tqdm

    from sfmkern import realdata

    config = DistillConfig(ipc=ipc, steps=steps, augs=augs, lr=lr, syn_res=syn_res, crop=crop, seed=seed,
                           grow_every=grow_every, param=param, noise_std=noise_std, noise_p=noise_p,
                           noise_mean=noise_mean, chunk_size=chunk_size, max_memory=max_memory,
                           checkpoint_every=checkpoint_every, log_every=log_every, init=init, objective=objective,
                           anchor_weight=anchor_weight, anchor_target=anchor_target, anchor_images=anchor_images,
                           anchor_views=anchor_views, subcentres=subcentres, scale=scale)
    warn_incomplete_schedule(config)
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if device is not None and not _same_device(device, backbone.device):
        raise ValueError(f"device={device} but the backbone lives on {backbone.device}; load it there "
                         "(load_backbone(..., device=...))")
    out_path = Path(out_dir) if out_dir is not None else None
    stats = _resolve_stats(data_or_stats, backbone, crop=crop, out_dir=out_path, progress=progress)
    if init_data is None and not (isinstance(data_or_stats, torch.Tensor) or hasattr(data_or_stats, "centres")
                                  or str(data_or_stats).endswith(".safetensors")):
        init_data = data_or_stats
    if init_data is not None:
        from sfmkern.stats import _as_source

        init_data = _as_source(init_data)
    real = realdata.prepare(stats, init_data, backbone, config)
    distiller = Distiller(stats, backbone, classes=classes, config=config, device=backbone.device, **real)
    ckpt = distiller.checkpoint_path(out_path) if out_path is not None else None
    start = 0
    if ckpt is not None and resume and ckpt.is_file():
        start = distiller.load_checkpoint(ckpt)
    bar = tqdm(total=steps, initial=min(start, steps), disable=not progress or distiller.rank != 0,
               desc="distill", unit="step")
    last_time, last_step = time.perf_counter(), start
    try:
        for s in range(start, steps):
            try:
                loss = distiller.step(mode)
            except ValueError as exc:  # the ops' value checks (CPU) name non-finite features before any launch
                if "finite" not in str(exc).lower():
                    raise
                kept = f"; the last good checkpoint {ckpt} is kept" if ckpt is not None and ckpt.is_file() else ""
                raise FloatingPointError(f"non-finite values at step {s + 1}: {exc}{kept}") from exc
            done = s + 1
            save = ckpt is not None and (done % checkpoint_every == 0 or done == steps)
            if done % log_every == 0 or save or done == steps:
                try:
                    distiller.check_finite()
                except FloatingPointError as exc:
                    kept = f"; the last good checkpoint {ckpt} is kept" if ckpt is not None and ckpt.is_file() else ""
                    raise FloatingPointError(f"{exc} (loss {float(loss)}){kept}") from None
                now = time.perf_counter()
                bar.set_postfix(loss=f"{float(loss):.5f}", s_per_step=f"{(now - last_time) / (done - last_step):.3f}")
                last_time, last_step = now, done
            if save:
                distiller.save_checkpoint(ckpt)
            bar.update(1)
    finally:
        bar.close()
    result = distiller.distilled_set({"backbone": getattr(backbone, "name", ""),
                                      "backbone_fingerprint": getattr(backbone, "fingerprint", "")})
    if out_path is not None and distiller.rank == 0:
        result.save(out_path / "distilled.safetensors")
    return result


make_module_callable(__name__, "distill")
