"""The distillation's hyper-parameters: `DistillConfig`, the one source of their defaults (`distill(**kwargs)` and
the `sfmkern distill` flags are derived from its fields), the paper's schedule and the memory arithmetic of a chunk."""

from __future__ import annotations

import dataclasses
import math
import re
import warnings
from dataclasses import dataclass, field

import numpy as np

from sfmkern.synthetic import PARAMETERISATIONS, level_sizes

MODES = ("auto", "single", "two_phase", "lagged")
CPU_DEFAULT_CHUNK = 256  # views per chunk on CPU when no memory budget is given
MIN_PLAIN_CHUNK = 8  # fewer views per chunk of plain autograd than this: checkpointing (larger chunks) instead
PROBE_TRANSIENT = 1.5  # activation bytes per view = bytes saved for backward × this (transients of the backward)
CHECKPOINT_FORMAT = "sfmkern.distill.checkpoint/1"
# Config fields that change the trajectory: a checkpoint written under other values cannot be resumed.
TRAJECTORY_FIELDS = ("ipc", "augs", "lr", "syn_res", "crop", "seed", "grow_every", "param", "noise_std", "noise_p",
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


def option(default, help: str, *, flag: str | None = "", type=None, choices=None, metavar=None):  # noqa: A002
    """A DistillConfig field with what the `sfmkern distill` flag derived from it needs: `help`, the flag (default
    --<name with dashes>; None: no flag; a bool field's flag turns it off, e.g. --no-subcentres; a tuple field's
    sets its first item), the value `type` (default: the default's type) and `choices`. The default itself is the
    field's: `distill()` and the CLI read it from here, nowhere else."""
    return field(default=default, metadata={"help": help, "flag": flag, "type": type, "choices": choices,
                                            "metavar": metavar})


@dataclass
class DistillConfig:
    """Hyper-parameters of a distillation run (defaults: the code behind the paper's numbers).

    noise_mean: mean of the Gaussian noise added (with probability `noise_p`) to an augmented view: 0.5 in the code
    behind the published SFM numbers, 0.0 in LGM's later fix. chunk_size: views per chunk of the two-phase step
    (None: from `max_memory`, free device memory, or 256 on CPU). max_memory: bytes (int) or a string such as
    "8GiB" bounding this process's device memory. grow_every: pyramid growth interval in steps (0: all levels at once).
    """

    ipc: int = option(1, "images per class")
    steps: int = option(5000, "optimisation steps")
    augs: int = option(1, "augmented views per image per step")
    lr: float | None = option(None, "Adam learning rate (None: 1e-2 from noise, 2e-3 from real images; the paper: "
                                    "2e-3)", type=float)
    syn_res: int = option(256, "synthetic image side")
    crop: int = option(224, "RandomResizedCrop output side")
    seed: int = option(0, "seed of the initial images and the augmentations")
    grow_every: int | None = option(None, "steps between pyramid levels; 0 = all levels from the start (None: 0; "
                                          "the paper: 200)", type=int)
    param: str = option("pyramid", "image parameterisation", choices=PARAMETERISATIONS)
    noise_std: float = option(0.2, "std of the Gaussian noise on a view")
    noise_p: float = option(0.5, "probability of noise on a view")
    noise_mean: float = option(0.5, "mean of the noise: 0.5 as in the code behind the published numbers, 0.0 as in "
                                     "LGM's later fix")
    flip_p: float = option(0.5, "probability of a horizontal flip of a view")
    scale: tuple[float, float] = option((0.08, 1.0), "lower bound of the RandomResizedCrop area scale (the upper "
                                                     "bound stays 1)", flag="--scale-min", type=float)
    ratio: tuple[float, float] = option((3 / 4, 4 / 3), "RandomResizedCrop aspect-ratio range", flag=None)
    chunk_size: int | None = option(None, "views per chunk of the two-phase step (None: from the memory budget)",
                                    type=int)
    max_memory: int | str | None = option(None, "device memory budget, e.g. 8GiB (sets the chunk size)", type=str,
                                          metavar="BYTES")
    checkpoint_every: int = option(100, "steps between checkpoints")
    log_every: int = option(10, "steps between loss checks / progress updates")
    init: str = option("real", "start from the real images nearest the class centre / sub-centres (real; needs "
                               "--data or --init-data) or from noise", choices=INITS)
    objective: str = option("sfm", "sfm: the paper's flow cosine; anchored: flow cosine + the anchoring term",
                            choices=OBJECTIVES)
    anchor_weight: float = option(10.0, "weight of the anchoring term")
    anchor_target: str = option("augmented", "anchor to class means of augmented real views or to the clean "
                                             "centres with their common offset removed", choices=ANCHOR_TARGETS)
    anchor_images: int = option(64, "real images per class for the augmented anchors")
    anchor_views: int = option(4, "augmented views per real image")
    subcentres: bool = option(True, "ipc > 1: match every image to its own k-means sub-centre's flow instead of "
                                    "its class flow", flag="--no-subcentres")

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
        self._check_finite()
        if self.crop > self.syn_res:
            raise ValueError(f"DistillConfig: crop ({self.crop}) must be <= syn_res ({self.syn_res}): views are cut "
                             "from the synthetic images, so they cannot be larger than them")
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

    def _check_finite(self) -> None:
        """Every float hyper-parameter is a real finite number (NaN compares false everywhere and would silently
        disable a check or a feature, e.g. noise_std=nan)."""
        for name in ("lr", "noise_std", "noise_p", "noise_mean", "flip_p", "anchor_weight"):
            value = getattr(self, name)
            if name == "lr" and value is None:  # None: the default for the start (DEFAULT_LR)
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
                raise TypeError(f"DistillConfig.{name} must be a number, got {value!r}")
            if not math.isfinite(float(value)):
                raise ValueError(f"DistillConfig.{name} must be finite, got {value!r}")
        for name in ("scale", "ratio"):
            if not all(math.isfinite(v) for v in getattr(self, name)):
                raise ValueError(f"DistillConfig.{name} must be finite, got {getattr(self, name)!r}")

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


def own_bytes_max(num_images: int, syn_res: int, param: str = "pyramid") -> int:
    """Bytes of `num_images` images at full pyramid with gradients and Adam m and v (4 fp32 copies)."""
    sizes = [syn_res] if param == "pixels" else level_sizes(syn_res)
    return 4 * 4 * num_images * 3 * sum(s * s for s in sizes)


def chunk_for_budget(budget: float, bytes_per_view, num_views: int) -> tuple[int, bool]:
    """(views per chunk, activation checkpointing?) for an activation budget in bytes. `bytes_per_view(checkpointing)`
    gives the activation bytes of one view. Plain autograd when a chunk of min(MIN_PLAIN_CHUNK, num_views) views
    fits (the recomputation of checkpointing costs a forward); else the chunk that checkpointing allows."""
    plain = bytes_per_view(False)
    chunk = int(budget // plain)
    if chunk >= min(MIN_PLAIN_CHUNK, num_views):
        return max(1, chunk), False
    return max(1, int(budget // bytes_per_view(True))), True


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
