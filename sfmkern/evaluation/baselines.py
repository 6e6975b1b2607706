"""Real-image baselines, evaluated under exactly the protocol of `sfmkern.evaluation`.

- `random_real`: `ipc` random real images per class; a different seeded draw for every run (the spread over runs
  includes the choice of images, as usual for this baseline).
- `centroid`: per class the real image(s) whose feature lies nearest the class centre (ipc=1; the centre of the
  statistics when given) or nearest each of `ipc` per-class k-means centres (ipc > 1), in the feature space of the
  distillation backbone; deterministic, so only the probe seed varies over runs.
- `full_data`: the full-data linear probe (the upper bound): `fit_full_head` on every training feature (cached by
  collect_stats, or streamed) and tested once per run.

`select_random` / `select_centroid` return the chosen images as `LabelledImages` (with their source rows), to save,
show or evaluate with other settings.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np
import torch

from sfmkern._nvtx import nvtx_range
from sfmkern.artifacts import EvalReport, FeatureSet, LabelledImages, check_classes
from sfmkern.data import load_images
from sfmkern.evaluation import heads
from sfmkern.evaluation.features import extract_features, stats_features, test_features, train_features
from sfmkern.evaluation.heads import fit_full_head
from sfmkern.evaluation.protocol import evaluate, protocol_dict
from sfmkern.kmeans import kmeans as _kmeans
from sfmkern.kmeans import nearest_distinct


# ------------------------------------------------------------------------------------------------ loading
def _load_first_readable(source, candidates: np.ndarray, k: int, image_size: int, what: str):
    """Decode candidates in order until `k` are readable -> (uint8 [k, 3, S, S] torch, source rows int64 [k])."""
    chosen_imgs, chosen_rows = [], []
    pos = 0
    while len(chosen_rows) < k and pos < len(candidates):
        take = candidates[pos : pos + (k - len(chosen_rows))]
        pos += len(take)
        imgs, ok = load_images(source, [int(i) for i in take], resize=image_size, crop=image_size)
        imgs = torch.as_tensor(np.asarray(imgs))
        ok = np.asarray(ok, dtype=bool)
        for j in np.flatnonzero(ok):
            chosen_imgs.append(imgs[j])
            chosen_rows.append(int(take[j]))
    if len(chosen_rows) < k:
        raise ValueError(f"{what}: only {len(chosen_rows)} readable images, need {k}")
    images = torch.stack(chosen_imgs).permute(0, 3, 1, 2).contiguous()  # [k, S, S, 3] -> [k, 3, S, S]
    return images, torch.tensor(chosen_rows, dtype=torch.int64)


def _source_labels(source) -> np.ndarray:
    labels = np.asarray(source.labels, dtype=np.int64).reshape(-1)
    if labels.shape[0] != len(source):
        raise ValueError(f"source has {len(source)} items but {labels.shape[0]} labels")
    return labels


def _check_ipc(ipc) -> int:
    if not isinstance(ipc, (int, np.integer)) or ipc < 1:
        raise ValueError(f"ipc must be an int >= 1, got {ipc!r}")
    return int(ipc)


def select_random(train_data, ipc: int, *, seed: int = 0, run: int = 0, image_size: int = 256) -> LabelledImages:
    """`ipc` real images per class drawn uniformly without replacement (numpy generator seeded by (seed, run)),
    decoded with Resize/CenterCrop `image_size` -> LabelledImages uint8 [C*ipc, 3, S, S], class-major order.
    Unreadable images are replaced by the next draws; a class with fewer than `ipc` readable images raises."""
    ipc = _check_ipc(ipc)
    labels = _source_labels(train_data)
    classes = list(train_data.classes)
    rng = np.random.default_rng([int(seed), int(run), 0x5EED])
    imgs, rows, ys = [], [], []
    for c, cname in enumerate(classes):
        members = np.flatnonzero(labels == c)
        if len(members) < ipc:
            raise ValueError(f"class {cname!r} has {len(members)} images, fewer than ipc={ipc}")
        x, r = _load_first_readable(train_data, rng.permutation(members), ipc, image_size, f"class {cname!r}")
        imgs.append(x)
        rows.append(r)
        ys.append(torch.full((ipc,), c, dtype=torch.int64))
    return LabelledImages(torch.cat(imgs), torch.cat(ys), classes, name="random-real", indices=torch.cat(rows),
                          meta={"baseline": "random-real", "ipc": ipc, "seed": seed, "run": run})


def select_centroid(
    train_data,
    features: FeatureSet,
    ipc: int = 1,
    *,
    centres: torch.Tensor | None = None,
    seed: int = 0,
    image_size: int = 256,
) -> LabelledImages:
    """Per class the real images nearest (Euclidean) the class centre (ipc=1) or each of `ipc` k-means centres
    (ipc > 1, k-means++ seeded by `seed`), distinct per class, in the feature space of `features` (a FeatureSet of
    `train_data` with its source rows `indices`). `centres` [C, D]: the class centres to use for ipc=1 (e.g. the
    statistics'); default the mean of the class's features. Unreadable picks fall back to the next nearest."""
    ipc = _check_ipc(ipc)
    classes = list(train_data.classes)
    check_classes("train data", classes, "train features", features.classes)
    if features.indices is None:
        raise ValueError("centroid selection needs features with source rows (FeatureSet.indices)")
    feats = features.features.float()
    if centres is not None:
        centres = torch.as_tensor(centres).float().cpu()
        if centres.shape != (len(classes), feats.shape[1]):
            raise ValueError(f"centres must be [{len(classes)}, {feats.shape[1]}], got {tuple(centres.shape)}")
    gen = torch.Generator().manual_seed(int(seed))
    imgs, rows, ys = [], [], []
    for c, cname in enumerate(classes):
        member = torch.nonzero(features.labels == c).flatten()
        if member.numel() < ipc:
            raise ValueError(f"class {cname!r} has {member.numel()} feature rows, fewer than ipc={ipc}")
        x = feats[member]
        if ipc == 1:
            targets = (centres[c : c + 1] if centres is not None else x.mean(dim=0, keepdim=True))
        else:
            targets = _kmeans(x, ipc, generator=gen)
        ranked = nearest_distinct(targets, x)  # nearest not-yet-picked member for each target, then fallbacks
        candidates = features.indices[member[torch.tensor(ranked)]].numpy()
        x_img, r = _load_first_readable(train_data, candidates, ipc, image_size, f"class {cname!r}")
        imgs.append(x_img)
        rows.append(r)
        ys.append(torch.full((ipc,), c, dtype=torch.int64))
    kind = "centroid" if ipc == 1 else "kmeans"
    return LabelledImages(torch.cat(imgs), torch.cat(ys), classes, name=kind, indices=torch.cat(rows),
                          meta={"baseline": kind, "ipc": ipc, "seed": seed,
                                "selection_backbone": features.backbone_name})


def _selection_features(train_data, stats_or_features, feature_backbone, *, resize, crop, feature_batch, progress):
    """-> (FeatureSet with source rows, centres or None) for centroid selection."""
    obj = stats_or_features
    if isinstance(obj, FeatureSet):
        return obj, None
    if obj is not None and hasattr(obj, "centres"):  # ClassStats
        check_classes("statistics", obj.classes, "train data", train_data.classes)
        centres = torch.as_tensor(np.asarray(obj.centres)).float()
        if getattr(obj, "features_path", None):
            fs = stats_features(obj)
            if fs.indices.numel() and int(fs.indices.max()) >= len(train_data):
                raise ValueError(f"the statistics cache features of {int(fs.indices.max()) + 1}+ items but the "
                                 f"source has {len(train_data)}: they were not collected on this source")
            return fs, centres
        if feature_backbone is None:
            raise ValueError("the statistics hold no cached features: pass feature_backbone= (the statistics' "
                             "backbone) to compute them, or collect_stats(..., cache_features=True)")
        if feature_backbone.fingerprint != obj.backbone_fingerprint:
            raise ValueError(f"feature_backbone {feature_backbone.name!r} is not the statistics' backbone "
                             f"{obj.backbone_name!r}")
        fs = extract_features(train_data, feature_backbone, resize=resize, crop=crop, batch_size=feature_batch,
                              progress=progress)
        return fs, centres
    if obj is None:
        if feature_backbone is None:
            raise ValueError("centroid selection needs statistics, a FeatureSet or feature_backbone=")
        return extract_features(train_data, feature_backbone, resize=resize, crop=crop, batch_size=feature_batch,
                                progress=progress), None
    raise TypeError(f"expected ClassStats, a FeatureSet or None, got {type(obj).__name__}")


# ------------------------------------------------------------------------------------------------ baselines
def random_real(
    train_data,
    backbone,
    test_data,
    *,
    ipc: int = 1,
    runs: int = 3,
    seed: int = 0,
    image_size: int = 256,
    **eval_kwargs,
) -> EvalReport:
    """Random-real baseline: run r trains the probe on `select_random(train_data, ipc, seed=seed, run=r)`.
    `eval_kwargs` go to `evaluate` (epochs, view_bank, resize, crop, ...): the identical protocol."""
    check_classes("train data", train_data.classes, "test data", test_data.classes)
    sets = [select_random(train_data, ipc, seed=seed, run=r, image_size=image_size) for r in range(runs)]
    report = evaluate(sets, backbone, test_data, mode="probe", runs=runs, seed=seed, **eval_kwargs)
    report.name = "random-real"
    report.provenance.update(baseline="random-real", ipc=ipc, source_rows=[s.indices.tolist() for s in sets])
    return report


def centroid(
    train_data,
    stats_or_features,
    backbone,
    test_data,
    *,
    ipc: int = 1,
    feature_backbone=None,
    runs: int = 3,
    seed: int = 0,
    image_size: int = 256,
    resize: int = 256,
    crop: int = 224,
    feature_batch: int = 256,
    progress: bool = True,
    **eval_kwargs,
) -> EvalReport:
    """Centroid (ipc=1) / per-class k-means (ipc>1) baseline selected in the feature space of the statistics'
    backbone (cached features of `stats_or_features`, a FeatureSet, or features streamed through
    `feature_backbone`), then evaluated with `backbone` under the probe protocol (`eval_kwargs` to `evaluate`)."""
    check_classes("train data", train_data.classes, "test data", test_data.classes)
    fs, centres = _selection_features(train_data, stats_or_features, feature_backbone, resize=resize, crop=crop,
                                      feature_batch=feature_batch, progress=progress)
    images = select_centroid(train_data, fs, ipc, centres=centres, seed=seed, image_size=image_size)
    report = evaluate(images, backbone, test_data, mode="probe", runs=runs, seed=seed, resize=resize, crop=crop,
                      feature_batch=feature_batch, progress=progress, **eval_kwargs)
    report.name = images.name
    report.provenance.update(baseline=images.name, ipc=ipc, source_rows=images.indices.tolist())
    return report


def full_data(
    stats_or_features,
    backbone,
    test_data,
    *,
    epochs: int = 10,
    runs: int = 1,
    seed: int = 0,
    batch_size: int = 256,
    classes: Sequence[str] | None = None,
    resize: int = 256,
    crop: int = 224,
    feature_batch: int = 256,
    progress: bool = True,
) -> EvalReport:
    """Full-data linear probe: run r fits `fit_full_head(..., seed=seed + r)` on every training feature of
    `backbone` (ClassStats with cached features, a FeatureSet, (features, labels) with classes=, or the training
    source, streamed) and tests it once on `test_data` (a source or FeatureSet). Run 0 is the very head that
    `fit_full_head(..., seed=seed)` returns, so mode="inherit" with that head reproduces its accuracy."""
    if not isinstance(runs, (int, np.integer)) or runs < 1:
        raise ValueError(f"runs must be an int >= 1, got {runs!r}")
    timings = {}
    t0 = time.perf_counter()
    train, stats_fp = train_features(
        stats_or_features, backbone, classes=classes, resize=resize, crop=crop, feature_batch=feature_batch,
        progress=progress)
    timings["train_features_s"] = time.perf_counter() - t0
    classes_ = train.classes
    check_classes("training features", classes_, "test data", test_data.classes)
    t0 = time.perf_counter()
    test = test_features(test_data, backbone, resize=resize, crop=crop, feature_batch=feature_batch,
                          progress=progress)
    timings["test_features_s"] = time.perf_counter() - t0
    device = torch.device(backbone.device)
    top1, top5, fitted = [], [], []
    timings["train_s"] = timings["test_s"] = 0.0
    for run in range(runs):
        t0 = time.perf_counter()
        head = fit_full_head(train, backbone, epochs=epochs, batch_size=batch_size, seed=seed + run, device=device,
                             progress=progress)
        timings["train_s"] += time.perf_counter() - t0
        t0 = time.perf_counter()
        with nvtx_range("evaluate/test"):
            a1, a5 = heads.accuracy(head.to(device).logits, test.features, test.labels, ks=(1, 5), device=device)
        timings["test_s"] += time.perf_counter() - t0
        top1.append(a1)
        top5.append(a5)
        fitted.append(head)
    schedule = heads.ProbeSchedule.create(len(train), epochs, base_lr=heads.PROBE_BASE_LR, max_batch=batch_size)
    protocol = protocol_dict(schedule, epochs=epochs, runs=runs, seed=seed, view_bank=None, resize=resize, crop=crop,
                         scale=(1.0, 1.0), test=test)
    protocol.update(augment="none (fixed centre-crop features)", views="centre crop")
    return EvalReport(
        name="full-data", mode="full-data", backbone=backbone.name, backbone_fingerprint=backbone.fingerprint,
        num_classes=len(classes_), num_train=len(train), top1=top1, top5=top5, protocol=protocol,
        storage={"head_bytes": fitted[0].storage_bytes}, timings={k: round(v, 3) for k, v in timings.items()},
        provenance={"stats_fingerprint": stats_fp},
    )


__all__ = ["centroid", "full_data", "random_real", "select_centroid", "select_random"]
