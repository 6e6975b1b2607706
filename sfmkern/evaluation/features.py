"""Frozen-backbone features for the evaluation: of a data source (`extract_features`, cached in memory per source
object), of the statistics' feature cache (`stats_features`), of augmented views of labelled images (`build_view_bank`,
`augmented_views`), and the seeded generators every training of the protocol draws from."""

from __future__ import annotations

import hashlib
import weakref
from collections.abc import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from sfmkern._nvtx import nvtx_range
from sfmkern.artifacts import FeatureSet, LabelledImages
from sfmkern.artifacts._files import short
from sfmkern.augment import apply_views, draw_views
from sfmkern.data import stream

DEFAULT_SCALE = (0.08, 1.0)


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


def test_features(test_data, backbone, *, resize, crop, feature_batch, progress) -> FeatureSet:
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


def derived_generator(seed: int, stream: str) -> torch.Generator:
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


def train_features(stats_or_features, backbone, *, classes, resize, crop, feature_batch,
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
                f"statistics were collected with backbone {obj.backbone_name!r} ({short(obj.backbone_fingerprint)}),"
                f" not {backbone.name!r} ({short(backbone.fingerprint)})"
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


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def augmented_views(images: LabelledImages, rows: torch.Tensor, device, *, crop: int, scale, generator) -> torch.Tensor:
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
                x = augmented_views(images, rows, backbones[0].device, crop=crop, scale=scale, generator=generator)
                for bank, bb in zip(banks, backbones, strict=True):
                    bank.append(bb.features(x.to(bb.device)).float())
                bar.update(len(rows))
    return [torch.cat(b) for b in banks]
