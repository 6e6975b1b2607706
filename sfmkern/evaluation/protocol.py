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

import functools
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from sfmkern import _threads
from sfmkern._nvtx import nvtx_range
from sfmkern.artifacts import EvalReport, FeatureSet, LabelledImages, LinearHead, as_labelled_images, check_classes
from sfmkern.artifacts._files import short
from sfmkern.evaluation import cache, heads
from sfmkern.evaluation.features import (
    DEFAULT_SCALE,
    augmented_views,
    build_view_bank,
    derived_generator,
    sync,
    test_features,
)

MODES = ("probe", "inherit")
CPU_VIEW_BANK = 10  # view_bank="auto" on the CPU: 10 views per image (GPU: fresh views, the exact protocol)


def _as_image_sets(distilled_or_images, runs: int) -> list[LabelledImages]:
    if isinstance(distilled_or_images, list):
        sets = [as_labelled_images(s) for s in distilled_or_images]
        if len(sets) != runs:
            raise ValueError(f"got {len(sets)} image sets for {runs} runs: pass one set, or one per run")
        for s in sets[1:]:
            check_classes(sets[0].name, sets[0].classes, s.name, s.classes)
        return sets
    return [as_labelled_images(distilled_or_images)]


def protocol_dict(schedule: heads.ProbeSchedule | None, *, epochs, runs, seed, view_bank, resize, crop, scale,
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
    max_batch: int = heads.PROBE_MAX_BATCH,
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
            head.check_stats(stats, where=where)

    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    test = test_features(test_data, backbone, resize=resize, crop=crop, feature_batch=feature_batch,
                          progress=progress)
    timings["test_features_s"] = time.perf_counter() - t0
    check_classes("test data", test_classes, "test features", test.classes)
    cache_file = cache_key = None
    if cache_dir is not None:
        cache_key = cache.cache_key(sets, backbone, test, mode=mode, head=head, head_backbone=head_backbone,
                                    stats=stats, epochs=epochs, runs=runs, seed=seed, view_bank=view_bank,
                                    resize=resize, crop=crop, scale=scale, max_batch=max_batch,
                                    feature_batch=feature_batch)
        cache_file = Path(cache_dir) / f"eval-{cache.digest(cache_key)[:24]}.json"
        cached = cache.load_cached(cache_file, cache_key)
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
        cache.store_cached(cache_file, cache_key, report)
    if name is not None:
        report.name = name
    return report


def default_view_bank(device) -> int | None:
    """view_bank="auto": None (fresh views, the exact protocol) on CUDA, CPU_VIEW_BANK views per image elsewhere."""
    return None if torch.device(device).type == "cuda" else CPU_VIEW_BANK


def _run_probe(sets, backbone, test: FeatureSet, *, epochs, runs, seed, view_bank, resize, crop, scale, max_batch,
               feature_batch, progress, timings) -> EvalReport:
    device = torch.device(backbone.device)
    classes = sets[0].classes
    n_classes = len(classes)
    schedule = heads.ProbeSchedule.create(len(sets[0]), epochs, base_lr=heads.PROBE_BASE_LR, max_batch=max_batch)
    banks: dict[int, list[torch.Tensor]] = {}
    bank_kw = dict(view_bank=view_bank, crop=crop, scale=scale, seed=seed, feature_batch=feature_batch,
                   progress=progress, device=device, timings=timings)
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
        gen = derived_generator(seed, f"run{run}")
        if view_bank is not None and schedule.total_steps:
            bank = _bank(banks, images, [backbone], run=run if len(sets) > 1 else 0, **bank_kw)[0]
            n = len(images)

            def batch_fn(idx, bank=bank, n=n, gen=gen, labels_dev=labels_dev):
                k = torch.randint(0, view_bank, (idx.numel(),), generator=gen)
                return bank.index_select(0, (k * n + idx).to(bank.device)), labels_dev[idx.to(device)]
        else:
            if id(images) not in on_device:
                on_device = {id(images): images.to(device)}  # one set on the device at a time
            images_dev = on_device[id(images)]

            def batch_fn(idx, images=images_dev, gen=gen, labels_dev=labels_dev):
                x = augmented_views(images, idx, device, crop=crop, scale=scale, generator=gen)
                with torch.no_grad():
                    feats = backbone.features(x)
                return feats, labels_dev[idx.to(device)]

        head = heads.linear_head(backbone.feature_dim, n_classes, generator=gen, device=device)
        fit = functools.partial(heads.train_linear, head, batch_fn, schedule, loss="ce", generator=gen,
                                progress=progress, desc=f"probe run {run + 1}/{runs}")
        score = functools.partial(heads.accuracy, head, test.features, test.labels, ks=(1, 5), device=device)
        a1, a5 = _fit_and_test(fit, score, device, timings)
        top1.append(a1)
        top5.append(a5)
    first = sets[0]
    return EvalReport(
        name=first.name, mode="probe", backbone=backbone.name, backbone_fingerprint=backbone.fingerprint,
        num_classes=n_classes, num_train=len(first), top1=top1, top5=top5,
        protocol=protocol_dict(schedule, epochs=epochs, runs=runs, seed=seed, view_bank=view_bank, resize=resize,
                           crop=crop, scale=scale, test=test),
        storage={"images_bytes": first.storage_bytes}, timings={k: round(v, 3) for k, v in timings.items()},
        provenance={"image_shape": list(first.images.shape[1:]), **_jsonable(first.meta)},
    )


def _fit_and_test(fit, score, device, timings: dict) -> tuple[float, float]:
    """Train a head (`fit()`; None: nothing to train), then score it on the test features (`score()` -> (top-1,
    top-5)); each part timed into `timings` ("train_s", "test_s") inside its NVTX range."""
    t0 = time.perf_counter()
    if fit is not None:
        with nvtx_range("evaluate/train"):
            fit()
    sync(device)
    timings["train_s"] += time.perf_counter() - t0
    t0 = time.perf_counter()
    with nvtx_range("evaluate/test"):
        result = score()
    timings["test_s"] += time.perf_counter() - t0
    return result


def _bank(banks: dict, images: LabelledImages, backbones, *, run: int, view_bank, crop, scale, seed, feature_batch,
          progress, device, timings) -> list[torch.Tensor]:
    """The view bank of `images` through `backbones` (built once per image set, timed as bank_s)."""
    key = id(images)
    if key not in banks:
        t0 = time.perf_counter()
        with nvtx_range("evaluate/features"):
            banks[key] = build_view_bank(images, backbones, view_bank, crop=crop, scale=scale,
                                         generator=derived_generator(seed, f"bank{run}"), batch_size=feature_batch,
                                         progress=progress)
        sync(device)
        timings["bank_s"] += time.perf_counter() - t0
    return banks[key]


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
            a1, a5 = heads.accuracy(on_device.logits, test.features, test.labels, ks=(1, 5), device=device)
        timings["test_s"] += time.perf_counter() - t0
        protocol = protocol_dict(None, epochs=0, runs=1, seed=seed, view_bank=None, resize=resize, crop=crop,
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
            f"the head was fitted on backbone {head.backbone_name!r} ({short(head.backbone_fingerprint)}) but the "
            f"evaluation backbone is {backbone.name!r} ({short(backbone.fingerprint)}): pass head_backbone= (the "
            f"head's backbone) to learn a projector, or a head fitted on {backbone.name!r}"
        )
    head.check_backbone(head_backbone)
    if head.feature_dim != head_backbone.feature_dim:
        raise ValueError(f"head reads {head.feature_dim}-d features, head_backbone gives {head_backbone.feature_dim}")
    if sets is None:
        raise ValueError("a cross-backbone inherited head needs the distilled images to learn the projector")
    schedule = heads.ProbeSchedule.create(len(sets[0]), epochs, base_lr=heads.PROJECTOR_BASE_LR,
                                           max_batch=max_batch)
    d_b, d_a = backbone.feature_dim, head_backbone.feature_dim
    storage["projector_bytes"] = 4 * (d_b * d_a + d_a)
    banks: dict[int, list[torch.Tensor]] = {}
    bank_kw = dict(view_bank=view_bank, crop=crop, scale=scale, seed=seed, feature_batch=feature_batch,
                   progress=progress, device=device, timings=timings)
    timings.setdefault("bank_s", 0.0)
    top1, top5 = [], []
    for run in range(runs):
        images = sets[run] if len(sets) > 1 else sets[0]
        gen = derived_generator(seed, f"run{run}")
        if view_bank is not None and schedule.total_steps:
            bank_b, bank_a = _bank(banks, images, [backbone, head_backbone], run=run if len(sets) > 1 else 0,
                                   **bank_kw)
            n = len(images)

            def batch_fn(idx, bank_b=bank_b, bank_a=bank_a, n=n, gen=gen):
                k = torch.randint(0, view_bank, (idx.numel(),), generator=gen)
                rows = k * n + idx
                return (bank_b.index_select(0, rows.to(bank_b.device)),
                        bank_a.index_select(0, rows.to(bank_a.device)).to(device))
        else:
            images_dev = images.to(device)

            def batch_fn(idx, images=images_dev, gen=gen):
                x = augmented_views(images, idx, device, crop=crop, scale=scale, generator=gen)
                with torch.no_grad():
                    return backbone.features(x), head_backbone.features(x.to(head_backbone.device)).to(device)

        projector = heads.linear_projector(d_b, d_a, generator=gen, device=device)
        fit = functools.partial(heads.train_linear, projector, batch_fn, schedule, loss="mse", generator=gen,
                                progress=progress, desc=f"projector run {run + 1}/{runs}")
        score = functools.partial(heads.accuracy, lambda f, p=projector: on_device.logits(p(f)), test.features,
                                  test.labels, ks=(1, 5), device=device)
        a1, a5 = _fit_and_test(fit if schedule.total_steps else None, score, device, timings)
        top1.append(a1)
        top5.append(a5)
    protocol = protocol_dict(schedule, epochs=epochs, runs=runs, seed=seed, view_bank=view_bank, resize=resize,
                         crop=crop, scale=scale, test=test)
    protocol.update(projector="linear B->A, MSE", projector_base_lr=heads.PROJECTOR_BASE_LR)
    provenance.update(image_shape=list(sets[0].images.shape[1:]), **_jsonable(sets[0].meta))
    return EvalReport(
        name="inherit", mode="inherit", backbone=backbone.name, backbone_fingerprint=backbone.fingerprint,
        num_classes=head.num_classes, num_train=len(sets[0]), top1=top1, top5=top5, protocol=protocol,
        storage=storage, timings={k: round(v, 3) for k, v in timings.items()}, provenance=provenance,
    )
