"""What distillation takes from the real images besides the class centres (issue #11): a real-image start, class
sub-centres and augmented class centres, each computed once and cached beside the statistics file.

- `select_start(stats, ipc)`: per class the real image nearest the class centre (ipc = 1) or nearest each of `ipc`
  k-means sub-centres (ipc > 1), in the backbone's feature space (the statistics' feature cache), with those targets.
- `augmented_centres(...)`: class (or sub-centre) means of real views drawn under the very augmentation the synthetic
  views get, over a capped seeded subset per class: the anchor's targets. Anchoring the means of augmented synthetic
  views to centres of clean centre crops would pull against the augmentation's common shift (the flow cancels it,
  the anchor would not).
The anchoring term itself is fused into `sfmkern.ops.flow_loss_and_grad(..., anchor=, anchor_weight=)`.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch

from sfmkern import augment
from sfmkern._io import load_tensors, save_tensors
from sfmkern.data import load_images
from sfmkern.kmeans import kmeans, nearest_distinct

_CACHE_FORMAT = "sfmkern.realdata/1"


def _cache_file(stats, kind: str, key: dict) -> Path | None:
    """<stats stem>.<kind>-<hash of key>.safetensors beside the feature cache, or None when there is no cache."""
    if not getattr(stats, "features_path", None):
        return None
    feats = Path(stats.features_path)
    stem = feats.name[: -len(".features.npy")] if feats.name.endswith(".features.npy") else feats.stem
    digest = hashlib.sha256(json.dumps({**key, "stats": stats.fingerprint}, sort_keys=True).encode()).hexdigest()
    return feats.with_name(f"{stem}.{kind}-{digest[:16]}.safetensors")


def _cached(path: Path | None, key: dict, stats):
    if path is None or not path.is_file():
        return None
    try:
        tensors, meta = load_tensors(path)
    except ValueError:
        return None
    if meta.get("format") != _CACHE_FORMAT or meta.get("key") != key or meta.get("stats") != stats.fingerprint:
        return None
    return tensors


def _save(path: Path | None, tensors: dict, key: dict, stats) -> None:
    if path is not None:
        save_tensors(path, tensors, {"format": _CACHE_FORMAT, "key": key, "stats": stats.fingerprint})


def class_members(stats) -> tuple[np.memmap, list[np.ndarray]]:
    """(feature cache [N, D] fp16 memmap, per class the source rows that have a feature)."""
    feats, labels = stats.load_features()
    return feats, [np.flatnonzero(labels == c) for c in range(stats.num_classes)]


def select_start(stats, ipc: int, *, seed: int = 0) -> dict:
    """Real starting images and per-image targets from the statistics' feature cache.

    Returns {"rows": int64 [C·ipc] source rows ranked per class (class-major; image j of class c is the member
    nearest target j), "ranking": list per class of every member row by preference (fallbacks for unreadable
    files), "targets": float32 [C·ipc, D] (the class centre at ipc = 1, the k-means sub-centres of the class at
    ipc > 1, k-means++ seeded by `seed`)}. Cached beside the statistics (keyed by their fingerprint, ipc and seed).
    """
    key = {"ipc": int(ipc), "seed": int(seed), "what": "start"}
    path = _cache_file(stats, "start", key)
    feats, members = class_members(stats)
    hit = _cached(path, key, stats)
    if hit is None:
        gen = torch.Generator().manual_seed(int(seed))
        targets, rankings = [], []
        for c, rows in enumerate(members):
            if len(rows) < ipc:
                raise ValueError(f"class {stats.classes[c]!r} has {len(rows)} cached features, fewer than ipc={ipc}")
            x = torch.from_numpy(np.asarray(feats[rows], dtype=np.float32))
            t = torch.as_tensor(stats.centres[c : c + 1]).float() if ipc == 1 else kmeans(x, ipc, generator=gen)
            targets.append(t)
            rankings.append(torch.as_tensor(rows[nearest_distinct(t, x)], dtype=torch.int64))
        hit = {"targets": torch.cat(targets).contiguous(), "ranking": torch.stack(rankings)
               if len({len(r) for r in rankings}) == 1 else torch.cat(rankings),
               "lengths": torch.tensor([len(r) for r in rankings], dtype=torch.int64)}
        _save(path, hit, key, stats)
    lengths = hit["lengths"].tolist()
    ranking = list(hit["ranking"].reshape(-1).split(lengths))
    return {"targets": hit["targets"], "ranking": ranking,
            "rows": torch.cat([r[:ipc] for r in ranking])}


def load_start_images(source, ranking: list[torch.Tensor], ipc: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode the first `ipc` readable rows of each class's ranking at `size` -> (float32 [C·ipc, 3, S, S] in [0, 1],
    int64 [C·ipc] source rows). Raises ValueError naming a class with fewer readable images."""
    images, rows = [], []
    for c, ranked in enumerate(ranking):
        got, got_rows, pos = [], [], 0
        while len(got_rows) < ipc and pos < len(ranked):
            take = ranked[pos : pos + ipc - len(got_rows)].tolist()
            pos += len(take)
            imgs, ok = load_images(source, take, resize=size, crop=size)
            for j in np.flatnonzero(np.asarray(ok)):
                got.append(torch.as_tensor(np.asarray(imgs[j])))
                got_rows.append(take[j])
        if len(got_rows) < ipc:
            raise ValueError(f"class {c}: only {len(got_rows)} readable images to start from, need {ipc}")
        images += got
        rows += got_rows
    x = torch.stack(images).permute(0, 3, 1, 2).float().div_(255.0).contiguous()
    return x, torch.tensor(rows, dtype=torch.int64)


@torch.no_grad()
def augmented_centres(stats, source, backbone, config, *, targets: torch.Tensor | None = None,
                      batch: int = 64) -> torch.Tensor:
    """Means of real views under the distillation's augmentation -> float32 [T, D] on the CPU.

    `config` (a DistillConfig) gives the augmentation (syn_res, crop, scale, ratio, flip_p, noise_*), the cap
    `anchor_images` (images per class, a seeded subset) and `anchor_views` (views per image). T = C (class means) or,
    with `targets` [C·k, D] (sub-centres, class-major), C·k: each real image counts for the sub-centre of its class
    nearest its clean cached feature (anchor_images // k images of each sub-centre's members). Cached beside the
    statistics."""
    aug = {k: config.to_dict()[k] for k in ("syn_res", "crop", "scale", "ratio", "flip_p", "noise_p", "noise_std",
                                            "noise_mean", "anchor_images", "anchor_views", "seed")}
    num_targets = stats.num_classes if targets is None else int(targets.shape[0])
    key = {"what": "augmented-centres", "aug": aug, "targets": num_targets, "backbone": backbone.fingerprint,
           "targets_hash": hashlib.sha256(targets.float().numpy().tobytes()).hexdigest() if targets is not None
           else None}
    path = _cache_file(stats, "augmented", key)
    hit = _cached(path, key, stats)
    if hit is not None:
        return hit["centres"]
    feats, members = class_members(stats)
    per_target = num_targets // stats.num_classes
    rng = np.random.default_rng([int(config.seed), 0xA9])
    rows, owner = [], []
    for c, m in enumerate(members):
        if per_target == 1:
            pick = np.sort(rng.permutation(m)[: config.anchor_images])
            owner.append(np.full(len(pick), c))
        else:  # members by nearest sub-centre (clean cached features), then a seeded share of each
            clean = torch.from_numpy(np.asarray(feats[m], dtype=np.float32))
            near = torch.cdist(clean, targets[c * per_target : (c + 1) * per_target].float()).argmin(1).numpy()
            share = max(1, config.anchor_images // per_target)
            pick = [rng.permutation(np.flatnonzero(near == j))[:share] for j in range(per_target)]
            owner.append(np.concatenate([np.full(len(p), c * per_target + j) for j, p in enumerate(pick)]))
            pick = m[np.concatenate(pick)]
        rows.append(pick)
    rows, owner = np.concatenate(rows), np.concatenate(owner)
    sums = torch.zeros(num_targets, backbone.feature_dim, dtype=torch.float64)
    counts = torch.zeros(num_targets, dtype=torch.float64)
    gen = torch.Generator().manual_seed(int(config.seed) + 0xA9)
    res = config.syn_res
    for lo in range(0, len(rows), batch):
        imgs, ok = load_images(source, rows[lo : lo + batch].tolist(), resize=res, crop=res)
        ok = np.asarray(ok, dtype=bool)
        x = torch.as_tensor(np.asarray(imgs))[ok].permute(0, 3, 1, 2).float().div_(255.0).to(backbone.device)
        who = torch.as_tensor(owner[lo : lo + batch][ok]).repeat(config.anchor_views)
        if x.shape[0] == 0:
            continue
        views = augment.draw_views(x.shape[0], config.anchor_views, res, res, generator=gen, scale=config.scale,
                                   ratio=config.ratio, flip_p=config.flip_p, noise_p=config.noise_p)
        f = backbone.features(augment.apply_views(x, views, crop=config.crop, noise_std=config.noise_std,
                                                  noise_mean=config.noise_mean)).double().cpu()
        sums.index_add_(0, who, f)
        counts.index_add_(0, who, torch.ones(len(who), dtype=torch.float64))
    if bool((counts == 0).any()):
        raise ValueError(f"augmented centres: no readable real image for target(s) "
                         f"{torch.nonzero(counts == 0).flatten().tolist()}")
    centres = (sums / counts[:, None]).float()
    _save(path, {"centres": centres}, key, stats)
    return centres


def prepare(stats, source, backbone, config) -> dict:
    """The Distiller's real-data inputs for `config` -> {"init_images", "targets", "anchor"} (each None when not
    needed or not reachable; the Distiller then warns and falls back). Needs ClassStats with a feature cache and
    `source`, the data they were collected on (its item i is row i of the cache)."""
    out = {"init_images": None, "targets": None, "anchor": None}
    wants_real = config.init == "real" or (config.objective == "anchored" and config.anchor_target == "augmented")
    wants_targets = config.ipc > 1 and config.subcentres
    if not hasattr(stats, "centres") or not getattr(stats, "features_path", None):
        return out
    if wants_targets or config.init == "real":
        start = select_start(stats, config.ipc, seed=config.seed)
        if wants_targets:
            out["targets"] = start["targets"]
    if source is None or not wants_real:
        return out
    _, labels = stats.load_features()
    source_labels = np.asarray(source.labels, dtype=np.int64)
    known = labels >= 0
    if len(labels) != len(source) or not np.array_equal(labels[known], source_labels[known]):
        raise ValueError(f"init_data ({len(source)} items) is not the source the statistics were collected on "
                         f"({len(labels)} cached rows)")
    if config.init == "real":
        out["init_images"], _ = load_start_images(source, start["ranking"], config.ipc, config.syn_res)
    if config.objective == "anchored" and config.anchor_target == "augmented":
        out["anchor"] = augmented_centres(stats, source, backbone, config, targets=out["targets"])
    return out
