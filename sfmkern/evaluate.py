"""Evaluation of a distilled set: the linear-probe protocol and classifier inheritance, with one report type.

Probe (mode="probe"): a new linear head (weights N(0, 0.01^2), bias 0) is trained on frozen backbone features of the
training images, each step on augmented views (horizontal flip + RandomResizedCrop(crop, scale=(0.08, 1))), batch
min(100, N), Adam at lr 1e-3 * batch / 256 without weight decay, cosine schedule over `epochs` epochs, trained to the
end and tested once on the real test images (Resize `resize`, CenterCrop `crop`, through the data layer). This is
repeated for `runs` seeds; top-1 and top-5 are reported as mean ± std (population std over the runs). Nothing is
ever selected on the test set.

Views: `view_bank=None` forwards freshly augmented views through the backbone at every step, the exact protocol.
`view_bank=K` draws K augmented views per image once, forwards them in large batches, and each step picks one of the
K views of each sampled image at random: the same augmentation distribution with a finite pool of views, and far
fewer backbone forwards. The default, `view_bank="auto"`, is the exact protocol on CUDA and a bank of
`CPU_VIEW_BANK` (10) views per image on the CPU, where fresh views cost ~40x more time (docs/protocol.md).

Reuse: with `cache_dir=`, a finished evaluation is stored there as JSON under a key made of everything that decides
its result (the images' bytes and labels, the backbone fingerprint, the test features' bytes, the head, the protocol
settings and the device type); a later call with the same key returns the stored report and says so in one line,
anything changed is recomputed (`EVAL_CACHE_FORMAT`).

Inheritance (mode="inherit"): the head fitted on all real features of the distillation backbone A
(`fit_full_head`). Evaluated with B == A the head is applied directly; with B != A a linear projector B->A is
learnt on the distilled images only (MSE between projector(phi_B(v)) and phi_A(v) over the same augmented views,
Adam lr 1e-2 * batch / 256, cosine, same epochs) and the prediction is head(projector(phi_B(x))).

Test features are computed once per (test source, backbone, preprocessing) and reused across runs, modes and calls
(an in-memory cache that forgets a source when it is garbage collected).
"""

from __future__ import annotations

import hashlib
import json
import os
import statistics
import sys
import time
import weakref
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from sfmkern import _threads
from sfmkern import probe as _probe
from sfmkern._callable import make_module_callable
from sfmkern._io import atomic_write, load_tensors, save_tensors
from sfmkern._nvtx import nvtx_range
from sfmkern.augment import apply_views, draw_views

MODES = ("probe", "inherit")
HEAD_KIND = "sfmkern.linear-head"
DEFAULT_SCALE = (0.08, 1.0)
CPU_VIEW_BANK = 10  # view_bank="auto" on the CPU: 10 views per image (GPU: fresh views, the exact protocol)
EVAL_CACHE_FORMAT = "sfmkern.eval-cache/1"


# ------------------------------------------------------------------------------------------------ image sets
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
        from sfmkern.distill import DistilledSet

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


# ------------------------------------------------------------------------------------------------ features
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


_FEATURE_CACHE: dict[int, tuple[weakref.ref, dict]] = {}


def clear_feature_cache() -> None:
    """Forget every cached test/train feature set."""
    _FEATURE_CACHE.clear()


def _cache_slot(source) -> dict | None:
    key = id(source)
    hit = _FEATURE_CACHE.get(key)
    if hit is not None and hit[0]() is source:
        return hit[1]
    try:
        ref = weakref.ref(source, lambda _r, k=key: _FEATURE_CACHE.pop(k, None))
    except TypeError:  # not weak-referenceable: no caching
        return None
    slot: dict = {}
    _FEATURE_CACHE[key] = (ref, slot)
    return slot


def extract_features(
    source,
    backbone,
    *,
    resize: int = 256,
    crop: int = 224,
    batch_size: int = 256,
    workers: int | None = None,
    progress: bool = True,
    cache: bool = True,
) -> FeatureSet:
    """phi(x) of every image of a data source (Resize `resize`, CenterCrop `crop`, through `sfmkern.data.stream`).

    Returns a FeatureSet with float32 features [N', D] on the CPU in source order, N' = N minus the images the
    decoder skipped. Cached per (source object, backbone fingerprint, resize, crop) unless cache=False.
    """
    from sfmkern.data import stream

    slot = _cache_slot(source) if cache else None
    key = (backbone.fingerprint, str(backbone.device), int(resize), int(crop), len(source))
    if slot is not None and key in slot:
        return slot[key]
    feats, labels, indices = [], [], []
    with nvtx_range("evaluate/features"), torch.no_grad():
        it = stream(source, batch_size=batch_size, resize=resize, crop=crop, workers=workers)
        bar = tqdm(total=len(source), desc=f"features {backbone.name}", disable=not progress, leave=False,
                   mininterval=1.0)
        for batch in it:
            feats.append(backbone.features_uint8(batch.images).float().cpu())
            labels.append(torch.as_tensor(batch.labels).to(torch.int64).cpu())
            indices.append(torch.as_tensor(batch.indices).to(torch.int64).cpu())
            bar.update(int(labels[-1].numel()))
        bar.close()
    if not feats:
        raise ValueError(f"no image of the source could be read ({len(source)} images)")
    indices_t = torch.cat(indices)
    order = torch.argsort(indices_t)
    report = getattr(it, "report", None)
    skipped = len(report.skipped) if report is not None and getattr(report, "skipped", None) is not None else 0
    result = FeatureSet(
        torch.cat(feats)[order], torch.cat(labels)[order], list(source.classes),
        backbone_name=backbone.name, backbone_fingerprint=backbone.fingerprint, indices=indices_t[order],
        preprocessing={"resize": int(resize), "crop": int(crop)}, skipped=skipped,
    )
    if slot is not None:
        slot[key] = result
    return result


def _test_features(test_data, backbone, *, resize, crop, feature_batch, progress) -> FeatureSet:
    if isinstance(test_data, FeatureSet):
        if test_data.backbone_fingerprint and test_data.backbone_fingerprint != backbone.fingerprint:
            raise ValueError(
                f"test features were computed with backbone {test_data.backbone_name!r} "
                f"({test_data.backbone_fingerprint[:12]}), evaluating with {backbone.name!r} "
                f"({backbone.fingerprint[:12]})"
            )
        if test_data.features.shape[1] != backbone.feature_dim:
            raise ValueError(
                f"test features have dimension {test_data.features.shape[1]}, backbone {backbone.name!r} "
                f"has {backbone.feature_dim}"
            )
        return test_data
    if not (hasattr(test_data, "classes") and hasattr(test_data, "labels")):
        raise TypeError(f"test_data must be a data source or a FeatureSet, got {type(test_data).__name__}")
    return extract_features(test_data, backbone, resize=resize, crop=crop, batch_size=feature_batch,
                            progress=progress)


# ------------------------------------------------------------------------------------------------ checks
def check_classes(what_a: str, classes_a: Sequence[str], what_b: str, classes_b: Sequence[str]) -> None:
    """Raise ValueError if two class lists differ in count or in any name (order matters: labels index them)."""
    a, b = [str(c) for c in classes_a], [str(c) for c in classes_b]
    if len(a) != len(b):
        raise ValueError(f"class count mismatch: {what_a} has {len(a)} classes, {what_b} has {len(b)}")
    for i, (x, y) in enumerate(zip(a, b, strict=True)):
        if x != y:
            raise ValueError(f"class names differ at label {i}: {what_a} has {x!r}, {what_b} has {y!r}")


def _short(fingerprint: str | None) -> str:
    return (fingerprint or "?")[:12]


# ------------------------------------------------------------------------------------------------ heads
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

    @property
    def num_classes(self) -> int:
        return int(self.weight.shape[0])

    @property
    def feature_dim(self) -> int:
        return int(self.weight.shape[1])

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
        if backbone.fingerprint != self.backbone_fingerprint:
            raise ValueError(
                f"this head was fitted on backbone {self.backbone_name!r} ({_short(self.backbone_fingerprint)}), "
                f"not on {backbone.name!r} ({_short(backbone.fingerprint)})"
            )

    def save(self, path: str | os.PathLike) -> Path:
        """Atomically write the head as safetensors with its metadata (see `LinearHead.load`)."""
        meta = {
            "kind": HEAD_KIND,
            "classes": list(self.classes),
            "backbone_name": self.backbone_name,
            "backbone_fingerprint": self.backbone_fingerprint,
            "stats_fingerprint": self.stats_fingerprint,
            "config": self.config,
        }
        return save_tensors(path, {"weight": self.weight, "bias": self.bias}, meta)

    @classmethod
    def load(cls, path: str | os.PathLike, *, backbone=None) -> LinearHead:
        """Read a head written by `save`; with `backbone=`, refuse (ValueError) a head fitted on another one."""
        tensors, meta = load_tensors(path)
        if meta.get("kind") != HEAD_KIND or "weight" not in tensors or "bias" not in tensors:
            raise ValueError(f"{path}: not an sfmkern linear head file (kind {meta.get('kind')!r})")
        head = cls(tensors["weight"], tensors["bias"], list(meta["classes"]), meta["backbone_name"],
                   meta["backbone_fingerprint"], meta.get("stats_fingerprint"), dict(meta.get("config") or {}))
        if backbone is not None:
            try:
                head.check_backbone(backbone)
            except ValueError as exc:
                raise ValueError(f"{path}: {exc}") from None
        return head


def head_path_for(stats_path: str | os.PathLike) -> Path:
    """Where the full-data head lives beside a statistics file: `<stem>.head.safetensors` in the same folder."""
    p = Path(stats_path)
    stem = p.name[: -len(".safetensors")] if p.name.endswith(".safetensors") else p.stem
    return p.with_name(f"{stem}.head.safetensors")


def head_reuse_problem(head: LinearHead, stats, *, epochs: int, seed: int) -> str:
    """Why a saved full-data head cannot stand for `fit_full_head(stats, epochs=epochs, seed=seed)` ('' when it
    can): fitted on other statistics (fingerprint), for another number of epochs or with another seed."""
    problems = []
    if head.stats_fingerprint != getattr(stats, "fingerprint", None):
        problems.append(f"it was fitted on other statistics ({_short(head.stats_fingerprint)}, these are "
                        f"{_short(getattr(stats, 'fingerprint', None))})")
    for key, value in (("epochs", epochs), ("seed", seed)):
        if head.config.get(key) != value:
            problems.append(f"{key}={head.config.get(key)!r} was used, {key}={value!r} is asked")
    return "; ".join(problems)


def load_or_fit_head(stats, backbone, path: str | os.PathLike | None = None, *, epochs: int = 10, seed: int = 0,
                     fresh: bool = False, progress: bool = True, log=None) -> LinearHead:
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


def check_head_stats(head: LinearHead, stats, *, where: str = "head") -> None:
    """Refuse (ValueError, one line) a head fitted beside statistics other than `stats` (a stale head)."""
    fp = getattr(stats, "fingerprint", None)
    if stats is not None and head.stats_fingerprint is not None and head.stats_fingerprint != fp:
        raise ValueError(
            f"{where} was fitted on statistics {_short(head.stats_fingerprint)}, not on these ({_short(fp)}): "
            f"refit it (load_or_fit_head, or `sfmkern eval --mode inherit --stats` without --head)"
        )


def _derived_generator(seed: int, stream: str) -> torch.Generator:
    """A CPU generator seeded from (seed, stream) so that runs and the view bank draw independent numbers."""
    digest = hashlib.sha256(f"sfmkern.evaluate/{int(seed)}/{stream}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def stats_features(stats) -> FeatureSet:
    """The feature cache of ClassStats (collect_stats(cache_features=True)) as a FeatureSet: float16 [N', D] on
    the CPU with the source row of every feature (row i of the cache is source item i; skipped items, label -1,
    are dropped)."""
    if not getattr(stats, "features_path", None):
        raise ValueError(
            "these statistics hold no cached features: collect them with collect_stats(..., cache_features=True),"
            " or pass the training source and its backbone to stream the features"
        )
    feats, labels = stats.load_features()
    labels = np.asarray(labels, dtype=np.int64)
    keep = np.flatnonzero(labels >= 0)
    rows = np.ascontiguousarray(feats[keep]) if len(keep) < len(labels) else np.array(feats, copy=True)
    return FeatureSet(
        torch.from_numpy(rows), torch.from_numpy(labels[keep]), list(stats.classes), stats.backbone_name,
        stats.backbone_fingerprint, indices=torch.from_numpy(keep.astype(np.int64)),
        preprocessing=dict(getattr(stats, "preprocessing", None) or {}), skipped=len(labels) - len(keep),
    )


def _train_features(stats_or_features, backbone, *, classes, resize, crop, feature_batch,
                    progress) -> tuple[FeatureSet, str | None]:
    """-> (FeatureSet of the training data, stats fingerprint or None) from any accepted input of fit_full_head."""
    obj = stats_or_features
    if isinstance(obj, FeatureSet):
        if backbone is not None and obj.backbone_fingerprint and obj.backbone_fingerprint != backbone.fingerprint:
            raise ValueError(f"features were computed with backbone {obj.backbone_name!r}, not {backbone.name!r}")
        if not obj.backbone_fingerprint:
            if backbone is None:
                raise ValueError("these features record no backbone: pass backbone=")
            obj = FeatureSet(obj.features, obj.labels, obj.classes, backbone.name, backbone.fingerprint, obj.indices,
                             obj.preprocessing, obj.skipped)
        return obj, None
    if hasattr(obj, "centres") and hasattr(obj, "backbone_fingerprint"):  # ClassStats
        if backbone is not None and obj.backbone_fingerprint != backbone.fingerprint:
            raise ValueError(
                f"statistics were collected with backbone {obj.backbone_name!r} ({_short(obj.backbone_fingerprint)}),"
                f" not {backbone.name!r} ({_short(backbone.fingerprint)})"
            )
        return stats_features(obj), obj.fingerprint
    if isinstance(obj, tuple):
        if len(obj) != 2:
            raise ValueError(f"a feature tuple must be (features [N, D], labels [N]), got {len(obj)} items")
        if backbone is None or classes is None:
            raise ValueError("fitting from a (features, labels) tuple needs backbone= and classes=")
        return FeatureSet(obj[0], obj[1], list(classes), backbone.name, backbone.fingerprint), None
    if hasattr(obj, "classes") and hasattr(obj, "labels"):  # a data source: stream its features
        if backbone is None:
            raise ValueError("streaming the features of a data source needs backbone=")
        return extract_features(obj, backbone, resize=resize, crop=crop, batch_size=feature_batch,
                                progress=progress), None
    raise TypeError(
        f"expected ClassStats with cached features, a FeatureSet, (features, labels) or a data source, "
        f"got {type(obj).__name__}"
    )


def fit_full_head(
    stats_or_features,
    backbone=None,
    *,
    classes: Sequence[str] | None = None,
    epochs: int = 10,
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
    train, stats_fp = _train_features(
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
    schedule = _probe.ProbeSchedule.create(len(labels), epochs, base_lr=_probe.PROBE_BASE_LR, max_batch=batch_size)
    gen = _derived_generator(seed, "full-head")
    head = _probe.linear_head(feats.shape[1], len(classes_), generator=gen, device=device)

    def batch_fn(idx):
        return feats.index_select(0, idx).to(device, torch.float32), labels.index_select(0, idx).to(device)

    t0 = time.perf_counter()
    with nvtx_range("evaluate/train"):
        result = _probe.train_linear(head, batch_fn, schedule, loss="ce", generator=gen, progress=progress,
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


# ------------------------------------------------------------------------------------------------ report
def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    if not values:
        return float("nan"), float("nan")
    return float(statistics.fmean(values)), float(statistics.pstdev(values)) if len(values) > 1 else 0.0


@dataclass
class EvalReport:
    """Result of one evaluation: per-run top-1/top-5 (percent) with the protocol, storage and timings.

    name: what was evaluated ("sfm", "random-real", "centroid", "full-data", ...); mode: "probe" | "inherit" |
    "full-data"; top5 uses k = min(5, num_classes); std is the population std over runs.
    """

    name: str
    mode: str
    backbone: str
    backbone_fingerprint: str
    num_classes: int
    num_train: int
    top1: list[float]
    top5: list[float]
    protocol: dict = field(default_factory=dict)
    storage: dict = field(default_factory=dict)
    timings: dict = field(default_factory=dict)
    provenance: dict = field(default_factory=dict)

    @property
    def kind(self) -> str:
        """"reference" for a row that is no result of the evaluated images: the full-data probe, and inheritance
        with the distillation backbone (the full-data head itself, their upper bound); "result" otherwise (the
        probe of a set, cross-backbone inheritance through a projector learnt on the images)."""
        if self.mode == "full-data":
            return "reference"
        if self.mode == "inherit" and self.provenance.get("head_backbone_fingerprint") == self.backbone_fingerprint:
            return "reference"
        return "result"

    @property
    def images_per_class(self) -> float:
        return self.num_train / max(1, self.num_classes)

    @property
    def top1_mean(self) -> float:
        return _mean_std(self.top1)[0]

    @property
    def top1_std(self) -> float:
        return _mean_std(self.top1)[1]

    @property
    def top5_mean(self) -> float:
        return _mean_std(self.top5)[0]

    @property
    def top5_std(self) -> float:
        return _mean_std(self.top5)[1]

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(top1_mean=self.top1_mean, top1_std=self.top1_std, top5_mean=self.top5_mean,
                 top5_std=self.top5_std, images_per_class=self.images_per_class)
        return d

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> EvalReport:
        d = json.loads(text)
        keys = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in d.items() if k in keys})

    def save(self, path: str | os.PathLike) -> Path:
        """Atomically write `to_json()` to `path`."""
        text = self.to_json()
        return atomic_write(path, lambda tmp: Path(tmp).write_text(text + "\n"))

    def to_markdown(self) -> str:
        """A one-row accuracy table and the protocol, storage and timings as bullet points."""
        lines = [markdown_table([self]), ""]
        p = self.protocol
        proto = ", ".join(f"{k}={v}" for k, v in sorted(p.items()))
        lines.append(f"- protocol: {proto}")
        if self.storage:
            lines.append("- storage: " + ", ".join(f"{k}={_fmt_bytes(v)}" for k, v in sorted(self.storage.items())))
        if self.timings:
            lines.append("- time: " + ", ".join(f"{k}={v:.2f}s" for k, v in sorted(self.timings.items())))
        return "\n".join(lines) + "\n"


def _fmt_bytes(n) -> str:
    n = int(n)
    if n < 1024:
        return f"{n} B"
    if n < 1024**2:
        return f"{n / 1024:.1f} KiB"
    return f"{n / 1024**2:.2f} MiB"


def _fmt_acc(values: Sequence[float]) -> str:
    mean, std = _mean_std(values)
    return f"{mean:.1f}" if len(values) <= 1 else f"{mean:.1f} ± {std:.1f}"


REFERENCE_CAPTION = ("Reference rows (upper bounds, not results of the evaluated images: the full-data probe, and "
                     "inheritance with the distillation backbone, which is the full-data head itself):")


def markdown_table(reports: Sequence[EvalReport]) -> str:
    """A Markdown table with one row per report: set, mode, backbone, images/class, runs, top-1, top-5, storage.
    Reference rows (`EvalReport.kind == "reference"`) follow in a second table under `REFERENCE_CAPTION`."""
    results = [r for r in reports if r.kind == "result"]
    references = [r for r in reports if r.kind == "reference"]
    if results and references:
        return "\n".join([_table(results), "", REFERENCE_CAPTION, "", _table(references)])
    return _table(results or references)


def _table(reports: Sequence[EvalReport]) -> str:
    head = "| set | mode | backbone | img/class | runs | top-1 (%) | top-5 (%) | storage |"
    rows = [head, "|---|---|---|---:|---:|---:|---:|---:|"]
    for r in reports:
        ipc = r.images_per_class
        ipc_s = f"{ipc:.0f}" if float(ipc).is_integer() else f"{ipc:.1f}"
        if r.mode == "full-data":
            ipc_s = f"all ({r.num_train})"
        rows.append(
            f"| {r.name} | {r.mode} | {r.backbone} | {ipc_s} | {len(r.top1)} | {_fmt_acc(r.top1)} | "
            f"{_fmt_acc(r.top5)} | {_fmt_bytes(sum(int(v) for v in r.storage.values()))} |"
        )
    return "\n".join(rows)


# ------------------------------------------------------------------------------------------------ views
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _augmented(images: LabelledImages, rows: torch.Tensor, device, *, crop: int, scale, generator) -> torch.Tensor:
    """Fresh views of images[rows]: flip + RandomResizedCrop(crop, scale) -> float [b, 3, crop, crop] in [0, 1]."""
    src = images.float_rows(rows, device)
    views = draw_views(src.shape[0], 1, src.shape[2], src.shape[3], generator=generator, scale=scale)
    return apply_views(src, views, crop=crop)


@torch.no_grad()
def build_view_bank(
    images: LabelledImages,
    backbones: Sequence,
    views_per_image: int,
    *,
    crop: int = 224,
    scale=DEFAULT_SCALE,
    generator: torch.Generator,
    batch_size: int = 256,
    progress: bool = True,
) -> list[torch.Tensor]:
    """Features of `views_per_image` augmented views of every image, one tensor per backbone: [K * N, D_b] float32
    on that backbone's device, view-major (row k * N + i is view k of image i). Each view is forwarded through
    every backbone (the projector of classifier inheritance pairs phi_B and phi_A of the same view)."""
    if views_per_image < 1:
        raise ValueError(f"view_bank must be >= 1, got {views_per_image}")
    n = len(images)
    banks = [[] for _ in backbones]
    chunk = max(1, batch_size)
    with tqdm(total=n * views_per_image, desc="view bank", disable=not progress, leave=False,
              mininterval=1.0) as bar:
        for _ in range(views_per_image):
            for start in range(0, n, chunk):
                rows = torch.arange(start, min(n, start + chunk))
                x = _augmented(images, rows, backbones[0].device, crop=crop, scale=scale, generator=generator)
                for bank, bb in zip(banks, backbones, strict=True):
                    bank.append(bb.features(x.to(bb.device)).float())
                bar.update(len(rows))
    return [torch.cat(b) for b in banks]


# ------------------------------------------------------------------------------------------------ evaluate
def _as_image_sets(distilled_or_images, runs: int) -> list[LabelledImages]:
    if isinstance(distilled_or_images, list):
        sets = [as_labelled_images(s) for s in distilled_or_images]
        if len(sets) != runs:
            raise ValueError(f"got {len(sets)} image sets for {runs} runs: pass one set, or one per run")
        for s in sets[1:]:
            check_classes(sets[0].name, sets[0].classes, s.name, s.classes)
        return sets
    return [as_labelled_images(distilled_or_images)]


def _protocol(schedule: _probe.ProbeSchedule | None, *, epochs, runs, seed, view_bank, resize, crop, scale,
              test: FeatureSet) -> dict:
    p = {
        "epochs": epochs, "runs": runs, "seed": seed,
        "augment": f"flip + RandomResizedCrop({crop}, scale={tuple(scale)})",
        "views": "fresh each step" if view_bank is None else f"bank of {view_bank} per image",
        "test": f"Resize {resize} / CenterCrop {crop}", "test_images": len(test), "test_skipped": test.skipped,
        "optimizer": "Adam(weight_decay=0)", "schedule": "cosine",
    }
    if schedule is not None:
        p.update(batch_size=schedule.batch_size, lr=schedule.lr, steps_per_epoch=schedule.steps_per_epoch,
                 total_steps=schedule.total_steps)
    return p


@_threads.cpu_phase
def evaluate(
    distilled_or_images,
    backbone,
    test_data,
    *,
    mode: str = "probe",
    epochs: int = 1000,
    runs: int = 3,
    seed: int = 0,
    view_bank: int | str | None = "auto",
    head: LinearHead | str | os.PathLike | None = None,
    head_backbone=None,
    stats=None,
    resize: int = 256,
    crop: int = 224,
    scale: tuple[float, float] = DEFAULT_SCALE,
    max_batch: int = _probe.PROBE_MAX_BATCH,
    feature_batch: int = 256,
    name: str | None = None,
    progress: bool = True,
    cache_dir: str | os.PathLike | None = None,
) -> EvalReport:
    """Evaluate distilled (or any labelled) images with a frozen `backbone` on real test images.

    distilled_or_images: a DistilledSet (or its path), LabelledImages, (images [N,3,H,W] uint8 or float in [0, 1],
    labels [N], classes), or a list of `runs` such sets (one per run: the random-real baseline). May be None for
    mode="inherit" when the head's backbone is `backbone` (nothing is trained then).
    test_data: a data source (its features are computed once with Resize `resize` / CenterCrop `crop` and cached)
    or a FeatureSet of this backbone.
    mode="probe": the linear-probe protocol (module docstring) for `runs` seeds. mode="inherit": `head` (a
    LinearHead or its file, from `fit_full_head`) of backbone A; if `backbone` is A it is applied directly (one
    deterministic run), otherwise `head_backbone` must be A and a B->A projector is trained per run (epochs=0 leaves
    it at its random initialisation).
    view_bank: None for fresh views at every step (the exact protocol); K to sample from K precomputed views per
    image; "auto" (default): None on CUDA, CPU_VIEW_BANK on the CPU.
    cache_dir: a folder where the finished report is stored and from which an evaluation with identical inputs
    (images, backbone, test features, head, protocol, device type) is returned instead of being recomputed.
    stats: optional ClassStats whose class names must match. Mismatched class counts/names between the images,
    stats, head and test data raise ValueError, and so does a head of another backbone.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    for label, value, low in (("epochs", epochs, 0), ("runs", runs, 1), ("crop", crop, 1), ("resize", resize, 1),
                              ("max_batch", max_batch, 1), ("feature_batch", feature_batch, 1)):
        if not isinstance(value, (int, np.integer)) or value < low:
            raise ValueError(f"{label} must be an int >= {low}, got {value!r}")
    if view_bank == "auto":
        view_bank = default_view_bank(getattr(backbone, "device", "cpu"))
    if view_bank is not None and (not isinstance(view_bank, (int, np.integer)) or isinstance(view_bank, bool)
                                  or view_bank < 1):
        raise ValueError(f"view_bank must be 'auto', None or an int >= 1, got {view_bank!r}")
    if not (0 < scale[0] <= scale[1] <= 1):
        raise ValueError(f"scale must satisfy 0 < lo <= hi <= 1, got {scale}")
    if not (hasattr(backbone, "features") and hasattr(backbone, "fingerprint")):
        raise TypeError(f"backbone must be an sfmkern Backbone, got {type(backbone).__name__}")

    sets = None
    if distilled_or_images is not None:
        sets = _as_image_sets(distilled_or_images, runs)
    elif mode == "probe":
        raise ValueError("mode='probe' needs images to train on")
    test_classes = list(test_data.classes)
    if sets is not None:
        check_classes(f"{sets[0].name} set", sets[0].classes, "test data", test_classes)
    if stats is not None:
        check_classes("statistics", stats.classes, "test data", test_classes)
    if mode == "inherit" and head is not None:  # a stale head is refused before any work
        where = f"head {head}" if isinstance(head, (str, os.PathLike)) else "the inherited head"
        if isinstance(head, (str, os.PathLike)):
            head = LinearHead.load(head)
        if isinstance(head, LinearHead):
            check_head_stats(head, stats, where=where)

    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    test = _test_features(test_data, backbone, resize=resize, crop=crop, feature_batch=feature_batch,
                          progress=progress)
    timings["test_features_s"] = time.perf_counter() - t0
    check_classes("test data", test_classes, "test features", test.classes)
    cache_file = cache_key = None
    if cache_dir is not None:
        cache_key = _cache_key(sets, backbone, test, mode=mode, head=head, head_backbone=head_backbone, stats=stats,
                               epochs=epochs, runs=runs, seed=seed, view_bank=view_bank, resize=resize, crop=crop,
                               scale=scale, max_batch=max_batch, feature_batch=feature_batch)
        cache_file = Path(cache_dir) / f"eval-{_digest(cache_key)[:24]}.json"
        cached = _load_cached(cache_file, cache_key)
        if cached is not None:
            if name is not None:
                cached.name = name
            if progress:
                print(f"sfmkern.evaluate: reused the finished evaluation {cache_file} (images, backbone, test set "
                      "and protocol unchanged)", file=sys.stderr, flush=True)
            return cached
    kw = dict(epochs=epochs, runs=runs, seed=seed, view_bank=view_bank, resize=resize, crop=crop, scale=scale,
              max_batch=max_batch, feature_batch=feature_batch, progress=progress, timings=timings)
    if mode == "probe":
        report = _run_probe(sets, backbone, test, **kw)
    else:
        report = _run_inherit(sets, backbone, test, head=head, head_backbone=head_backbone, **kw)
    if cache_file is not None:
        _store_cached(cache_file, cache_key, report)
    if name is not None:
        report.name = name
    return report


def default_view_bank(device) -> int | None:
    """view_bank="auto": None (fresh views, the exact protocol) on CUDA, CPU_VIEW_BANK views per image elsewhere."""
    return None if torch.device(device).type == "cuda" else CPU_VIEW_BANK


# ------------------------------------------------------------------------------------------------ result cache
def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def _tensor_sha(*tensors: torch.Tensor | None) -> str:
    h = hashlib.sha256()
    for t in tensors:
        if t is None:
            h.update(b"none|")
            continue
        t = t.detach().cpu().contiguous()
        h.update(f"{t.dtype}|{tuple(t.shape)}|".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def _cache_key(sets, backbone, test: FeatureSet, *, mode, head, head_backbone, stats, epochs, runs, seed, view_bank,
               resize, crop, scale, max_batch, feature_batch) -> dict:
    """Everything that decides an evaluation's result (the report's name and timings excepted)."""
    if isinstance(head, (str, os.PathLike)):
        head = LinearHead.load(head)
    head_id = None
    if isinstance(head, LinearHead):
        head_id = {"weights": _tensor_sha(head.weight, head.bias), "classes": list(head.classes),
                   "backbone": head.backbone_fingerprint, "stats": head.stats_fingerprint}
    return {
        "format": EVAL_CACHE_FORMAT, "mode": mode, "device": torch.device(backbone.device).type,
        "images": None if sets is None else [
            {"pixels": _tensor_sha(s.images, s.labels), "classes": list(s.classes)} for s in sets],
        "backbone": {"name": backbone.name, "fingerprint": backbone.fingerprint},
        "test": {"features": _tensor_sha(test.features, test.labels), "classes": list(test.classes),
                 "backbone": test.backbone_fingerprint, "preprocessing": test.preprocessing,
                 "skipped": test.skipped},
        "head": head_id, "head_backbone": getattr(head_backbone, "fingerprint", None),
        "stats": getattr(stats, "fingerprint", None),
        "protocol": {"epochs": int(epochs), "runs": int(runs), "seed": int(seed),
                     "view_bank": None if view_bank is None else int(view_bank), "resize": int(resize),
                     "crop": int(crop), "scale": [float(v) for v in scale], "max_batch": int(max_batch),
                     "feature_batch": int(feature_batch)},
    }


def _load_cached(path: Path, key: dict) -> EvalReport | None:
    """The report stored at `path` if its recorded key equals `key` (anything else, or a damaged file: None)."""
    try:
        doc = json.loads(path.read_text())
        if doc.get("key") != json.loads(json.dumps(key, default=str)):
            return None
        report = EvalReport.from_json(json.dumps(doc["report"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None
    report.provenance = {**report.provenance, "reused_from": str(path)}
    return report


def _store_cached(path: Path, key: dict, report: EvalReport) -> None:
    text = json.dumps({"key": key, "report": report.to_dict()}, indent=1, sort_keys=True, default=str)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text + "\n"))


def _run_probe(sets, backbone, test: FeatureSet, *, epochs, runs, seed, view_bank, resize, crop, scale, max_batch,
               feature_batch, progress, timings) -> EvalReport:
    device = torch.device(backbone.device)
    classes = sets[0].classes
    n_classes = len(classes)
    schedule = _probe.ProbeSchedule.create(len(sets[0]), epochs, base_lr=_probe.PROBE_BASE_LR, max_batch=max_batch)
    banks: dict[int, torch.Tensor] = {}
    top1, top5 = [], []
    timings.setdefault("bank_s", 0.0)
    timings.setdefault("train_s", 0.0)
    timings.setdefault("test_s", 0.0)
    on_device: dict[int, LabelledImages] = {}
    for run in range(runs):
        images = sets[run] if len(sets) > 1 else sets[0]
        if len(images) != schedule.num_samples:
            raise ValueError(f"run {run}: {len(images)} images, but run 0 had {schedule.num_samples}")
        labels_dev = images.labels.to(device)
        gen = _derived_generator(seed, f"run{run}")
        if view_bank is not None and schedule.total_steps:
            key = id(images)
            if key not in banks:
                t0 = time.perf_counter()
                with nvtx_range("evaluate/features"):
                    banks[key] = build_view_bank(
                        images, [backbone], view_bank, crop=crop, scale=scale,
                        generator=_derived_generator(seed, f"bank{run if len(sets) > 1 else 0}"),
                        batch_size=feature_batch, progress=progress)[0]
                _sync(device)
                timings["bank_s"] += time.perf_counter() - t0
            bank, n = banks[key], len(images)

            def batch_fn(idx, bank=bank, n=n, gen=gen, labels_dev=labels_dev):
                k = torch.randint(0, view_bank, (idx.numel(),), generator=gen)
                return bank.index_select(0, (k * n + idx).to(bank.device)), labels_dev[idx.to(device)]
        else:
            if id(images) not in on_device:
                on_device = {id(images): images.to(device)}  # one set on the device at a time
            images_dev = on_device[id(images)]

            def batch_fn(idx, images=images_dev, gen=gen, labels_dev=labels_dev):
                x = _augmented(images, idx, device, crop=crop, scale=scale, generator=gen)
                with torch.no_grad():
                    feats = backbone.features(x)
                return feats, labels_dev[idx.to(device)]

        head = _probe.linear_head(backbone.feature_dim, n_classes, generator=gen, device=device)
        t0 = time.perf_counter()
        with nvtx_range("evaluate/train"):
            _probe.train_linear(head, batch_fn, schedule, loss="ce", generator=gen, progress=progress,
                                desc=f"probe run {run + 1}/{runs}")
        _sync(device)
        timings["train_s"] += time.perf_counter() - t0
        t0 = time.perf_counter()
        with nvtx_range("evaluate/test"):
            a1, a5 = _probe.accuracy(head, test.features, test.labels, ks=(1, 5), device=device)
        timings["test_s"] += time.perf_counter() - t0
        top1.append(a1)
        top5.append(a5)
    first = sets[0]
    return EvalReport(
        name=first.name, mode="probe", backbone=backbone.name, backbone_fingerprint=backbone.fingerprint,
        num_classes=n_classes, num_train=len(first), top1=top1, top5=top5,
        protocol=_protocol(schedule, epochs=epochs, runs=runs, seed=seed, view_bank=view_bank, resize=resize,
                           crop=crop, scale=scale, test=test),
        storage={"images_bytes": first.storage_bytes}, timings={k: round(v, 3) for k, v in timings.items()},
        provenance={"image_shape": list(first.images.shape[1:]), **_jsonable(first.meta)},
    )


def _jsonable(meta: dict) -> dict:
    return json.loads(json.dumps(meta, default=str))


def _run_inherit(sets, backbone, test: FeatureSet, *, head, head_backbone, epochs, runs, seed, view_bank, resize,
                 crop, scale, max_batch, feature_batch, progress, timings) -> EvalReport:
    if head is None:
        raise ValueError("mode='inherit' needs head= (a LinearHead or the file written by fit_full_head)")
    if not isinstance(head, LinearHead):
        raise TypeError(f"head must be a LinearHead or a path, got {type(head).__name__}")
    check_classes("inherited head", head.classes, "test data", test.classes)
    if sets is not None:
        check_classes(f"{sets[0].name} set", sets[0].classes, "inherited head", head.classes)
    device = torch.device(backbone.device)
    on_device = head.to(device)
    timings.setdefault("train_s", 0.0)
    timings.setdefault("test_s", 0.0)
    storage = {"head_bytes": head.storage_bytes}
    if sets is not None:
        storage["images_bytes"] = sets[0].storage_bytes
    provenance = {"head_backbone": head.backbone_name, "head_backbone_fingerprint": head.backbone_fingerprint,
                  "head_stats_fingerprint": head.stats_fingerprint, "head_config": head.config}

    if head.backbone_fingerprint == backbone.fingerprint:  # B == A: the head itself
        if head_backbone is not None and head_backbone.fingerprint != head.backbone_fingerprint:
            head.check_backbone(head_backbone)
        if head.feature_dim != backbone.feature_dim:
            raise ValueError(f"head reads {head.feature_dim}-d features, backbone {backbone.name!r} gives "
                             f"{backbone.feature_dim}")
        t0 = time.perf_counter()
        with nvtx_range("evaluate/test"):
            a1, a5 = _probe.accuracy(on_device.logits, test.features, test.labels, ks=(1, 5), device=device)
        timings["test_s"] += time.perf_counter() - t0
        protocol = _protocol(None, epochs=0, runs=1, seed=seed, view_bank=None, resize=resize, crop=crop,
                             scale=scale, test=test)
        protocol.update(views="none (head applied directly)", augment="none", optimizer="none", schedule="none")
        provenance["reference"] = ("the full-data head itself (inheritance with the distillation backbone): an upper "
                                   "bound, not a result of the images")
        return EvalReport(
            name="inherit", mode="inherit", backbone=backbone.name, backbone_fingerprint=backbone.fingerprint,
            num_classes=head.num_classes, num_train=len(sets[0]) if sets is not None else 0, top1=[a1], top5=[a5],
            protocol=protocol, storage=storage, timings={k: round(v, 3) for k, v in timings.items()},
            provenance=provenance,
        )

    if head_backbone is None:
        raise ValueError(
            f"the head was fitted on backbone {head.backbone_name!r} ({_short(head.backbone_fingerprint)}) but the "
            f"evaluation backbone is {backbone.name!r} ({_short(backbone.fingerprint)}): pass head_backbone= (the "
            f"head's backbone) to learn a projector, or a head fitted on {backbone.name!r}"
        )
    head.check_backbone(head_backbone)
    if head.feature_dim != head_backbone.feature_dim:
        raise ValueError(f"head reads {head.feature_dim}-d features, head_backbone gives {head_backbone.feature_dim}")
    if sets is None:
        raise ValueError("a cross-backbone inherited head needs the distilled images to learn the projector")
    schedule = _probe.ProbeSchedule.create(len(sets[0]), epochs, base_lr=_probe.PROJECTOR_BASE_LR,
                                           max_batch=max_batch)
    d_b, d_a = backbone.feature_dim, head_backbone.feature_dim
    storage["projector_bytes"] = 4 * (d_b * d_a + d_a)
    banks: dict[int, list[torch.Tensor]] = {}
    timings.setdefault("bank_s", 0.0)
    top1, top5 = [], []
    for run in range(runs):
        images = sets[run] if len(sets) > 1 else sets[0]
        gen = _derived_generator(seed, f"run{run}")
        if view_bank is not None and schedule.total_steps:
            key = id(images)
            if key not in banks:
                t0 = time.perf_counter()
                with nvtx_range("evaluate/features"):
                    banks[key] = build_view_bank(
                        images, [backbone, head_backbone], view_bank, crop=crop, scale=scale,
                        generator=_derived_generator(seed, f"bank{run if len(sets) > 1 else 0}"),
                        batch_size=feature_batch, progress=progress)
                _sync(device)
                timings["bank_s"] += time.perf_counter() - t0
            bank_b, bank_a = banks[key]
            n = len(images)

            def batch_fn(idx, bank_b=bank_b, bank_a=bank_a, n=n, gen=gen):
                k = torch.randint(0, view_bank, (idx.numel(),), generator=gen)
                rows = k * n + idx
                return (bank_b.index_select(0, rows.to(bank_b.device)),
                        bank_a.index_select(0, rows.to(bank_a.device)).to(device))
        else:
            images_dev = images.to(device)

            def batch_fn(idx, images=images_dev, gen=gen):
                x = _augmented(images, idx, device, crop=crop, scale=scale, generator=gen)
                with torch.no_grad():
                    return backbone.features(x), head_backbone.features(x.to(head_backbone.device)).to(device)

        projector = _probe.linear_projector(d_b, d_a, generator=gen, device=device)
        t0 = time.perf_counter()
        if schedule.total_steps:
            with nvtx_range("evaluate/train"):
                _probe.train_linear(projector, batch_fn, schedule, loss="mse", generator=gen, progress=progress,
                                    desc=f"projector run {run + 1}/{runs}")
        _sync(device)
        timings["train_s"] += time.perf_counter() - t0
        t0 = time.perf_counter()
        with nvtx_range("evaluate/test"):
            a1, a5 = _probe.accuracy(lambda f, p=projector: on_device.logits(p(f)), test.features, test.labels,
                                     ks=(1, 5), device=device)
        timings["test_s"] += time.perf_counter() - t0
        top1.append(a1)
        top5.append(a5)
    protocol = _protocol(schedule, epochs=epochs, runs=runs, seed=seed, view_bank=view_bank, resize=resize,
                         crop=crop, scale=scale, test=test)
    protocol.update(projector="linear B->A, MSE", projector_base_lr=_probe.PROJECTOR_BASE_LR)
    provenance.update(image_shape=list(sets[0].images.shape[1:]), **_jsonable(sets[0].meta))
    return EvalReport(
        name="inherit", mode="inherit", backbone=backbone.name, backbone_fingerprint=backbone.fingerprint,
        num_classes=head.num_classes, num_train=len(sets[0]), top1=top1, top5=top5, protocol=protocol,
        storage=storage, timings={k: round(v, 3) for k, v in timings.items()}, provenance=provenance,
    )


__all__ = [
    "CPU_VIEW_BANK", "EvalReport", "FeatureSet", "LabelledImages", "LinearHead", "MODES", "REFERENCE_CAPTION",
    "as_labelled_images",
    "build_view_bank", "check_classes", "check_head_stats", "clear_feature_cache", "default_view_bank", "evaluate",
    "extract_features", "fit_full_head", "head_path_for", "head_reuse_problem", "load_or_fit_head", "markdown_table",
    "stats_features",
]

make_module_callable(__name__, "evaluate")
