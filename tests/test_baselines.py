"""sfmkern.baselines: seeded random-real selection, centroid / k-means selection against a brute-force float64
reference, the full-data probe from cached, given or streamed features, and their errors."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from conftest import balanced_subset

from sfmkern.backbone import load_backbone
from sfmkern.data import ImageFolder, load_images
from sfmkern.evaluation import extract_features, fit_full_head, load_or_fit_head, stats_features
from sfmkern.evaluation.baselines import centroid, full_data, random_real, select_centroid, select_random

RES = dict(resize=36, crop=32, progress=False)


@pytest.fixture(scope="module")
def fmnist():
    from sfmkern.data import fashion_mnist

    return balanced_subset(fashion_mnist("train"), 24, 10), balanced_subset(fashion_mnist("test"), 20, 11)


@pytest.fixture(scope="module")
def backbone():
    torch.manual_seed(1)
    return load_backbone("test_convnext", pretrained=False, device="cpu")


@pytest.fixture(scope="module")
def stats(fmnist, backbone, tmp_path_factory):
    from sfmkern.stats import collect_stats

    out = tmp_path_factory.mktemp("stats") / "stats.safetensors"
    return collect_stats(fmnist[0], backbone, resize=36, crop=32, batch_size=64, out=out, cache_features=True,
                         progress=False)


# ------------------------------------------------------------------------------------------------ selection
def test_select_random_is_seeded_and_class_major(fmnist):
    train, _ = fmnist
    a = select_random(train, 3, seed=5, image_size=32)
    assert a.images.shape == (30, 3, 32, 32) and a.images.dtype == torch.uint8
    assert a.labels.tolist() == [c for c in range(10) for _ in range(3)]
    assert np.array_equal(np.asarray(train.labels)[a.indices.numpy()], a.labels.numpy())
    assert len(set(a.indices.tolist())) == 30
    assert torch.equal(select_random(train, 3, seed=5, image_size=32).indices, a.indices)
    assert not torch.equal(select_random(train, 3, seed=5, run=1, image_size=32).indices, a.indices)
    decoded, ok = load_images(train, a.indices.numpy(), resize=32, crop=32)
    assert bool(ok.all()) and torch.equal(a.images, decoded.permute(0, 3, 1, 2))


def test_select_random_replaces_unreadable_images(photo_folder, tmp_path):
    import shutil

    root = tmp_path / "photos"
    shutil.copytree(photo_folder, root)
    (root / "animals" / "zz_corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    photos = ImageFolder(root)
    bad = photos.paths.index(str(root / "animals" / "zz_corrupt.jpg"))
    for seed in range(6):
        picked = select_random(photos, 3, seed=seed, image_size=24)
        assert bad not in picked.indices.tolist() and picked.labels.tolist().count(0) == 3
    with pytest.raises(ValueError, match="class 'animals': only 3 readable images, need 4"):
        select_random(photos, 4, seed=0, image_size=24)
    with pytest.raises(ValueError, match="class 'animals' has 3 images, fewer than ipc=4"):
        select_random(ImageFolder(photo_folder), 4, image_size=24)
    with pytest.raises(ValueError, match="ipc must be an int >= 1"):
        select_random(photos, 0)


def test_select_centroid_matches_bruteforce(fmnist, backbone):
    train, _ = fmnist
    fs = extract_features(train, backbone, **RES)
    picked = select_centroid(train, fs, 1, image_size=32)
    feats = fs.features.double().numpy()
    labels = fs.labels.numpy()
    for c in range(10):
        rows = np.flatnonzero(labels == c)
        centre = feats[rows].mean(axis=0)
        best = rows[np.argmin(((feats[rows] - centre) ** 2).sum(axis=1))]
        assert int(picked.indices[c]) == int(fs.indices[best])
    centres = torch.randn(10, fs.features.shape[1])
    given = select_centroid(train, fs, 1, centres=centres, image_size=32)
    for c in range(10):
        rows = np.flatnonzero(labels == c)
        best = rows[np.argmin(((feats[rows] - centres[c].double().numpy()) ** 2).sum(axis=1))]
        assert int(given.indices[c]) == int(fs.indices[best])
    km = select_centroid(train, fs, 3, seed=2, image_size=32)
    assert km.name == "kmeans" and km.labels.tolist() == [c for c in range(10) for _ in range(3)]
    assert len(set(km.indices.tolist())) == 30
    assert np.array_equal(np.asarray(train.labels)[km.indices.numpy()], km.labels.numpy())
    assert torch.equal(select_centroid(train, fs, 3, seed=2, image_size=32).indices, km.indices)
    with pytest.raises(ValueError, match=r"centres must be \[10, "):
        select_centroid(train, fs, 1, centres=torch.zeros(3, 4))


def test_centroid_from_statistics_cache(fmnist, backbone, stats):
    train, test = fmnist
    cache = stats_features(stats)
    assert cache.features.dtype == torch.float16 and torch.equal(cache.indices, torch.arange(len(train)))
    report = centroid(train, stats, backbone, test, epochs=3, runs=2, image_size=32, **RES)
    assert report.name == "centroid" and len(report.top1) == 2 and report.num_train == 10
    feats = cache.features.double().numpy()
    centres = stats.centres.double().numpy()
    for c, row in enumerate(report.provenance["source_rows"]):
        rows = np.flatnonzero(cache.labels.numpy() == c)
        assert row == rows[np.argmin(((feats[rows] - centres[c]) ** 2).sum(axis=1))]
    kmeans = centroid(train, stats, backbone, test, ipc=2, epochs=2, runs=1, view_bank=2, image_size=32, **RES)
    assert kmeans.name == "kmeans" and kmeans.num_train == 20
    with pytest.raises(ValueError, match="not collected on this source"):
        centroid(train.subset(np.arange(100)), stats, backbone, test, epochs=1, runs=1, image_size=32, **RES)


def test_full_data_from_cache_features_and_stream_agree(fmnist, backbone, stats):
    train, test = fmnist
    from_stats = full_data(stats, backbone, test, epochs=15, runs=2, seed=3, **RES)
    assert len(from_stats.top1) == 2 and from_stats.mode == "full-data" and from_stats.num_train == len(train)
    assert from_stats.provenance["stats_fingerprint"] == stats.fingerprint
    head = fit_full_head(stats, epochs=15, seed=3, progress=False)
    assert head.stats_fingerprint == stats.fingerprint and head.backbone_fingerprint == backbone.fingerprint
    streamed = full_data(train, backbone, test, epochs=15, runs=1, seed=3, **RES)
    given = full_data(extract_features(train, backbone, **RES), backbone, test, epochs=15, runs=1, seed=3, **RES)
    assert streamed.top1 == given.top1
    fs = extract_features(train, backbone, **RES)
    as_tuple = full_data((fs.features, fs.labels), backbone, test, classes=train.classes, epochs=15, runs=1, seed=3,
                         **RES)
    assert as_tuple.top1 == given.top1
    # the fp16 cache and the fp32 streamed features train nearly the same head
    assert abs(streamed.top1[0] - from_stats.top1[0]) <= 3.0
    assert from_stats.top1[0] > 25.0  # well above chance (10 %)


def test_load_or_fit_head_reuses_only_the_head_of_these_stats_backbone_and_settings(fmnist, backbone, stats,
                                                                                      tmp_path):
    import dataclasses as dc

    from sfmkern.evaluation import evaluate

    path, said = tmp_path / "stats.head.safetensors", []
    first = load_or_fit_head(stats, backbone, path, epochs=3, seed=0, progress=False, log=said.append)
    assert path.is_file() and first.stats_fingerprint == stats.fingerprint and "fitted" in said[-1]
    again = load_or_fit_head(stats, backbone, path, epochs=3, seed=0, progress=False, log=said.append)
    assert "reusing" in said[-1] and torch.equal(again.weight, first.weight)
    load_or_fit_head(stats, backbone, path, epochs=4, seed=0, progress=False, log=said.append)
    assert "refitting" in said[-2] and "epochs=3 was used" in said[-2]
    # statistics of other data (same classes, other centres): the saved head is stale, refitted, never reused
    other = dc.replace(stats, centres=stats.centres + 1.0)
    assert other.fingerprint != stats.fingerprint
    refit = load_or_fit_head(other, backbone, path, epochs=4, seed=0, progress=False, log=said.append)
    assert "fitted on other statistics" in said[-2] and refit.stats_fingerprint == other.fingerprint
    # the API refuses a stale head given explicitly: it never scores with it
    _, test = fmnist
    with pytest.raises(ValueError, match="was fitted on statistics .* not on these"):
        evaluate(None, backbone, test, mode="inherit", head=first, stats=other, **RES)
    torn = tmp_path / "torn.head.safetensors"
    torn.write_bytes(path.read_bytes()[:100])
    load_or_fit_head(stats, backbone, torn, epochs=3, seed=0, progress=False, log=said.append)
    assert "refitting" in said[-2] and str(torn) in said[-2]


def test_random_real_on_photo_folder(photo_folder, backbone):
    photos = ImageFolder(photo_folder)
    kw = dict(epochs=2, runs=2, seed=1, image_size=40, resize=40, crop=32, progress=False)
    report = random_real(photos, backbone, photos, ipc=1, **kw)
    assert report.name == "random-real" and report.num_classes == 3 and len(report.top1) == 2
    assert report.top5 == [100.0, 100.0]  # top-5 counts as top-3 with 3 classes
    for run, rows in enumerate(report.provenance["source_rows"]):
        assert rows == select_random(photos, 1, seed=1, run=run, image_size=40).indices.tolist()
    assert random_real(photos, backbone, photos, ipc=1, **kw).top1 == report.top1


def test_baseline_class_mismatches_raise(fmnist, backbone, stats, photo_folder):
    train, test = fmnist
    photos = ImageFolder(photo_folder)
    with pytest.raises(ValueError, match="class count mismatch: train data has 3 classes, test data has 10"):
        random_real(photos, backbone, test, epochs=1, runs=1, image_size=32, **RES)
    with pytest.raises(ValueError, match="class count mismatch: training features has 10 classes, test data has 3"):
        full_data(stats, backbone, photos, **RES)
    with pytest.raises(ValueError, match="class count mismatch: statistics has 10 classes, train data has 3"):
        centroid(photos, stats, backbone, photos, epochs=1, runs=1, image_size=32, **RES)
    torch.manual_seed(3)
    other = load_backbone("test_vit", pretrained=False, device="cpu")
    with pytest.raises(ValueError, match="statistics were collected with backbone 'test_convnext'"):
        full_data(stats, other, test, **RES)
    bare = dataclasses.replace(stats, features_path=None)
    with pytest.raises(ValueError, match="no cached features"):
        fit_full_head(bare, progress=False)
    with pytest.raises(ValueError, match="no cached features: pass feature_backbone="):
        centroid(train, bare, backbone, test, epochs=1, runs=1, image_size=32, **RES)
