"""Linear heads: the trainer of every linear model of the protocol (the probe head on a set, the full-data head of
classifier inheritance, the B->A projector), the full-data head (`fit_full_head`) and the one rule for reusing a
saved one (`load_or_fit_head`).

One loop serves the three trainings. Each step takes a batch of sample indices from a per-epoch random permutation
(the last batch of an epoch may be short), asks `batch_fn` for (inputs, targets), and takes one Adam step; the
learning rate follows a cosine curve over all steps and the model is trained to the end (never selected on
anything). Learning rates scale with the batch: lr = base_lr * batch / 256.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from sfmkern._nvtx import nvtx_range
from sfmkern.artifacts import LinearHead, check_classes
from sfmkern.artifacts._files import short
from sfmkern.evaluation.features import derived_generator, train_features

PROBE_BASE_LR = 1e-3  # linear heads (probe and full-data head): lr = 1e-3 * batch / 256
PROJECTOR_BASE_LR = 1e-2  # B->A projector of classifier inheritance: lr = 1e-2 * batch / 256
PROBE_MAX_BATCH = 100  # batch = min(100, N) for the probe on distilled images
HEAD_INIT_STD = 0.01  # head weights ~ N(0, 0.01^2), bias 0
FULL_HEAD_EPOCHS = 10  # epochs of the full-data head (the paper's code): fit_full_head, load_or_fit_head, the CLI


@dataclass(frozen=True)
class ProbeSchedule:
    """The step/learning-rate arithmetic of one training: batch = min(max_batch, N), lr = base_lr * batch / 256,
    steps_per_epoch = ceil(N / batch), total_steps = epochs * steps_per_epoch (the cosine period)."""

    num_samples: int
    epochs: int
    batch_size: int
    lr: float
    steps_per_epoch: int
    total_steps: int

    @classmethod
    def create(
        cls, num_samples: int, epochs: int, *, base_lr: float = PROBE_BASE_LR, max_batch: int = PROBE_MAX_BATCH
    ) -> ProbeSchedule:
        if num_samples < 1:
            raise ValueError(f"need at least one training sample, got num_samples={num_samples}")
        if epochs < 0:
            raise ValueError(f"epochs must be >= 0, got {epochs}")
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if not base_lr > 0:
            raise ValueError(f"base_lr must be > 0, got {base_lr}")
        batch = min(max_batch, num_samples)
        steps = math.ceil(num_samples / batch)
        return cls(num_samples, epochs, batch, base_lr * batch / 256, steps, epochs * steps)

    def to_dict(self) -> dict:
        return asdict(self)


def make_optimizer(params, schedule: ProbeSchedule) -> torch.optim.Adam:
    """Adam at the schedule's learning rate, no weight decay."""
    return torch.optim.Adam(params, lr=schedule.lr, weight_decay=0.0)


def make_scheduler(optimizer: torch.optim.Optimizer, schedule: ProbeSchedule) -> torch.optim.lr_scheduler.LRScheduler:
    """Cosine annealing from the initial lr to 0 over all `total_steps` (stepped once per optimiser step)."""
    return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, schedule.total_steps), eta_min=0.0)


def linear_head(in_dim: int, num_classes: int, *, generator: torch.Generator, device=None) -> torch.nn.Linear:
    """A new linear head [num_classes x in_dim] with weights ~ N(0, 0.01^2) drawn from `generator`, bias 0."""
    head = torch.nn.Linear(in_dim, num_classes, device=device)
    with torch.no_grad():
        head.weight.copy_(torch.randn(num_classes, in_dim, generator=generator) * HEAD_INIT_STD)
        head.bias.zero_()
    return head


def linear_projector(in_dim: int, out_dim: int, *, generator: torch.Generator, device=None) -> torch.nn.Linear:
    """A linear map [out_dim x in_dim] with PyTorch's default init, U(-1/sqrt(in), 1/sqrt(in)), drawn from
    `generator` so that the projector (trained or not) is reproducible."""
    proj = torch.nn.Linear(in_dim, out_dim, device=device)
    bound = 1.0 / math.sqrt(in_dim)
    with torch.no_grad():
        proj.weight.copy_(torch.rand(out_dim, in_dim, generator=generator) * (2 * bound) - bound)
        proj.bias.copy_(torch.rand(out_dim, generator=generator) * (2 * bound) - bound)
    return proj


@dataclass
class TrainResult:
    """What a training left behind: the optimiser and scheduler actually used, steps taken and the last loss."""

    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    steps: int
    last_loss: float


def train_linear(
    model: torch.nn.Module,
    batch_fn: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
    schedule: ProbeSchedule,
    *,
    loss: str = "ce",
    generator: torch.Generator,
    progress: bool = True,
    desc: str = "probe",
) -> TrainResult:
    """Train `model` in place for `schedule.total_steps` Adam steps with a cosine learning rate.

    batch_fn(idx int64 [b] on CPU) -> (inputs [b, D_in] float32, targets): int64 class labels [b] for loss="ce"
    (cross-entropy), float32 [b, D_out] for loss="mse" (mean squared error over all elements). `generator` (CPU)
    drives the per-epoch permutations; batch_fn may draw from it too (augmented views), which keeps a run
    reproducible for a fixed seed.
    """
    if loss not in ("ce", "mse"):
        raise ValueError(f"loss must be 'ce' or 'mse', got {loss!r}")
    optimizer = make_optimizer(model.parameters(), schedule)
    scheduler = make_scheduler(optimizer, schedule)
    n, b = schedule.num_samples, schedule.batch_size
    last = float("nan")
    steps = 0
    model.train()
    with tqdm(total=schedule.total_steps, desc=desc, disable=not progress, leave=False, mininterval=1.0) as bar:
        for _ in range(schedule.epochs):
            perm = torch.randperm(n, generator=generator)
            for s in range(schedule.steps_per_epoch):
                inputs, targets = batch_fn(perm[s * b : (s + 1) * b])
                out = model(inputs)
                value = F.cross_entropy(out, targets) if loss == "ce" else F.mse_loss(out, targets)
                optimizer.zero_grad(set_to_none=True)
                value.backward()
                optimizer.step()
                scheduler.step()
                steps += 1
                bar.update(1)
                if steps == schedule.total_steps:
                    last = float(value.detach())
    model.eval()
    return TrainResult(optimizer, scheduler, steps, last)


@torch.no_grad()
def topk_correct(logits: torch.Tensor, labels: torch.Tensor, k: int) -> int:
    """Number of rows whose label is among the `k` largest logits. logits [N, C], labels int64 [N]."""
    k = min(k, logits.shape[1])
    top = logits.topk(k, dim=1).indices
    return int((top == labels.view(-1, 1)).any(dim=1).sum())


@torch.no_grad()
def accuracy(
    predict: Callable[[torch.Tensor], torch.Tensor],
    features: torch.Tensor,
    labels: torch.Tensor,
    *,
    ks: tuple[int, ...] = (1, 5),
    chunk: int = 8192,
    device=None,
) -> tuple[float, ...]:
    """Top-k accuracies in percent of `predict` (features [b, D] -> logits [b, C]) over features [N, D] and
    labels int64 [N], evaluated in chunks on `device`. k larger than C counts as C (always correct)."""
    if features.shape[0] != labels.shape[0]:
        raise ValueError(f"features have {features.shape[0]} rows but labels {labels.shape[0]}")
    if features.shape[0] == 0:
        raise ValueError("no test samples to evaluate")
    correct = [0] * len(ks)
    for start in range(0, features.shape[0], chunk):
        x = features[start : start + chunk].to(device=device, dtype=torch.float32)
        y = labels[start : start + chunk].to(device=device)
        logits = predict(x)
        for i, k in enumerate(ks):
            correct[i] += topk_correct(logits, y, k)
    return tuple(100.0 * c / features.shape[0] for c in correct)


# ------------------------------------------------------------------------------------------------ full-data head
def fit_full_head(
    stats_or_features,
    backbone=None,
    *,
    classes: Sequence[str] | None = None,
    epochs: int = FULL_HEAD_EPOCHS,
    batch_size: int = 256,
    seed: int = 0,
    device=None,
    out: str | os.PathLike | None = None,
    resize: int = 256,
    crop: int = 224,
    feature_batch: int = 256,
    progress: bool = True,
) -> LinearHead:
    """Fit the full-data linear head of classifier inheritance (also the full-data probe baseline).

    stats_or_features: ClassStats collected with cache_features=True (its cached features), a FeatureSet,
    a (features [N, D], labels [N]) tuple (then backbone= and classes= are required), or a data source (streamed
    through backbone= with Resize `resize` / CenterCrop `crop`). Training: head N(0, 0.01^2) / bias 0, batch
    min(batch_size, N), Adam lr 1e-3 * batch / 256 without weight decay, cosine over `epochs` epochs (10 by default,
    as the paper's code), no augmentation (the features are fixed). The head records the backbone fingerprint;
    `out` (e.g. `head_path_for(stats_path)`, beside the statistics) saves it atomically.
    """
    train, stats_fp = train_features(
        stats_or_features, backbone, classes=classes, resize=resize, crop=crop, feature_batch=feature_batch,
        progress=progress,
    )
    feats, labels, classes_ = train.features, train.labels, train.classes
    bname, bfp = train.backbone_name, train.backbone_fingerprint
    if classes is not None:
        check_classes("classes=", classes, "training features", classes_)
    if device is None:
        device = backbone.device if backbone is not None else torch.device("cpu")
    device = torch.device(device)
    schedule = ProbeSchedule.create(len(labels), epochs, base_lr=PROBE_BASE_LR, max_batch=batch_size)
    gen = derived_generator(seed, "full-head")
    head = linear_head(feats.shape[1], len(classes_), generator=gen, device=device)

    def batch_fn(idx):
        return feats.index_select(0, idx).to(device, torch.float32), labels.index_select(0, idx).to(device)

    t0 = time.perf_counter()
    with nvtx_range("evaluate/train"):
        result = train_linear(head, batch_fn, schedule, loss="ce", generator=gen, progress=progress,
                              desc="full-data head")
    config = {
        "epochs": epochs, "seed": seed, "train_samples": len(labels), "optimizer": "Adam(weight_decay=0)",
        "schedule": "cosine", **{k: v for k, v in schedule.to_dict().items() if k not in ("epochs", "num_samples")},
        "last_loss": result.last_loss, "train_s": round(time.perf_counter() - t0, 3),
    }
    fitted = LinearHead(head.weight.detach().cpu(), head.bias.detach().cpu(), classes_, bname, bfp, stats_fp,
                        config)
    if out is not None:
        fitted.save(out)
    return fitted


def head_reuse_problem(head: LinearHead, stats, *, epochs: int, seed: int) -> str:
    """Why a saved full-data head cannot stand for `fit_full_head(stats, epochs=epochs, seed=seed)` ('' when it
    can): fitted on other statistics (fingerprint), for another number of epochs or with another seed."""
    problems = []
    if head.stats_fingerprint != getattr(stats, "fingerprint", None):
        problems.append(f"it was fitted on other statistics ({short(head.stats_fingerprint)}, these are "
                        f"{short(getattr(stats, 'fingerprint', None))})")
    for key, value in (("epochs", epochs), ("seed", seed)):
        if head.config.get(key) != value:
            problems.append(f"{key}={head.config.get(key)!r} was used, {key}={value!r} is asked")
    return "; ".join(problems)


def load_or_fit_head(stats, backbone, path: str | os.PathLike | None = None, *, epochs: int = FULL_HEAD_EPOCHS,
                     seed: int = 0, fresh: bool = False, progress: bool = True, log=None) -> LinearHead:
    """The full-data head of `stats` (ClassStats collected with cache_features=True) on `backbone`, the one rule for
    the CLI, the demo and the API: the head saved at `path` is reused only if it was fitted on this backbone, on
    these statistics (fingerprint), with these `epochs` and this `seed`; anything else (or `fresh=True`, or a
    missing or unreadable file) fits it anew with `fit_full_head` and saves it at `path` (None: not saved).
    `log(message)`, if given, hears one line saying which and why."""
    say = log or (lambda _message: None)
    if stats is None or not hasattr(stats, "fingerprint"):
        raise TypeError(f"load_or_fit_head needs ClassStats, got {type(stats).__name__}")
    stats.check_compatible(backbone=backbone)
    path = None if path is None else Path(path)
    if path is not None and path.is_file() and not fresh:
        try:
            head = LinearHead.load(path, backbone=backbone)
            problem = head_reuse_problem(head, stats, epochs=epochs, seed=seed)
        except ValueError as exc:  # another backbone's or a torn head: refitted
            problem = " ".join(str(exc).split())
        if not problem:
            say(f"reusing the full-data head {path} (fitted on these statistics, {epochs} epochs, seed {seed})")
            return head
        say(f"refitting the full-data head {path}: {problem}")
    head = fit_full_head(stats, backbone, epochs=epochs, seed=seed, out=path, progress=progress)
    if path is not None:
        say(f"full-data head fitted ({epochs} epochs) -> {path}")
    return head
