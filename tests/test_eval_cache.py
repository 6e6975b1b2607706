"""Evaluation defaults and the result cache: a view bank by default on the CPU (fresh views one flag away and on
CUDA), a finished evaluation reused when nothing changed (with one line saying so), and recomputed whenever any input
that decides the result changed: images, backbone, test set, head, epochs, seed, runs, views, sizes."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import balanced_subset, fmnist_pair, seeded_backbone

from sfmkern.evaluation import (
    CPU_VIEW_BANK,
    LabelledImages,
    default_view_bank,
    evaluate,
    extract_features,
    fit_full_head,
    heads,
)
from sfmkern.evaluation.baselines import select_random

RES = dict(resize=36, crop=32)
BASE = dict(epochs=2, runs=1, seed=0, view_bank=2, **RES)


@pytest.fixture(scope="module")
def fmnist():
    return fmnist_pair(20, 10)


@pytest.fixture(scope="module")
def backbone():
    return seeded_backbone("test_convnext", 1)


@pytest.fixture(scope="module")
def other_backbone():
    return seeded_backbone("test_convnext", 2)  # same architecture, other weights


@pytest.fixture(scope="module")
def images(fmnist):
    return select_random(fmnist[0], 2, seed=3, image_size=32)


@pytest.fixture
def trainings(monkeypatch):
    """Counts the probe/projector trainings actually run."""
    calls = []
    real = heads.train_linear

    def spy(*args, **kwargs):
        calls.append(kwargs.get("desc"))
        return real(*args, **kwargs)

    monkeypatch.setattr(heads, "train_linear", spy)
    return calls


def test_default_views_by_device(fmnist, backbone, images):
    assert default_view_bank("cpu") == CPU_VIEW_BANK == 10
    assert default_view_bank(torch.device("cuda", 0)) is None  # the exact protocol on GPU
    rep = evaluate(images, backbone, fmnist[1], epochs=1, runs=1, progress=False, **RES)
    assert rep.protocol["views"] == f"bank of {CPU_VIEW_BANK} per image"
    exact = evaluate(images, backbone, fmnist[1], epochs=1, runs=1, view_bank=None, progress=False, **RES)
    assert exact.protocol["views"] == "fresh each step"
    with pytest.raises(ValueError, match="view_bank must be 'auto', None or an int >= 1"):
        evaluate(images, backbone, fmnist[1], view_bank="many", progress=False, **RES)


def test_finished_evaluation_is_reused(fmnist, backbone, images, tmp_path, trainings, capsys):
    test = fmnist[1]
    first = evaluate(images, backbone, test, cache_dir=tmp_path, progress=True, **BASE)
    assert len(trainings) == 1
    files = list(tmp_path.glob("eval-*.json"))
    assert len(files) == 1
    capsys.readouterr()
    again = evaluate(images, backbone, test, cache_dir=tmp_path, progress=True, name="renamed", **BASE)
    err = capsys.readouterr().err
    assert len(trainings) == 1  # nothing trained
    assert [ln for ln in err.splitlines() if "reused the finished evaluation" in ln] == [
        f"sfmkern.evaluate: reused the finished evaluation {files[0]} (images, backbone, test set and protocol "
        "unchanged)"]
    assert again.top1 == first.top1 and again.top5 == first.top5 and again.protocol == first.protocol
    assert again.name == "renamed" and again.provenance["reused_from"] == str(files[0])
    # an equal copy of the images (another object) is the same input
    copy = LabelledImages(images.images.clone(), images.labels.clone(), list(images.classes), name="copy")
    assert evaluate(copy, backbone, test, cache_dir=tmp_path, progress=False, **BASE).top1 == first.top1
    assert len(trainings) == 1


def _changed_images(images):
    pixels = images.images.clone()
    pixels[0, 0, 0, 0] ^= 1  # one pixel, one bit
    return LabelledImages(pixels, images.labels, images.classes, name=images.name)


def _relabelled(images):
    labels = images.labels.clone()
    labels[[0, -1]] = labels[[-1, 0]]
    return LabelledImages(images.images, labels, images.classes, name=images.name)


CHANGES = {
    "images": lambda c: dict(c, images=_changed_images(c["images"])),
    "labels": lambda c: dict(c, images=_relabelled(c["images"])),
    "backbone": lambda c: dict(c, backbone=c["other_backbone"]),
    "test set": lambda c: dict(c, test=balanced_subset(c["fmnist"][1].parent if hasattr(c["fmnist"][1], "parent")
                                                       else c["fmnist"][1], 9, 2)),
    "epochs": lambda c: dict(c, kw=dict(c["kw"], epochs=3)),
    "seed": lambda c: dict(c, kw=dict(c["kw"], seed=1)),
    "runs": lambda c: dict(c, kw=dict(c["kw"], runs=2)),
    "view bank": lambda c: dict(c, kw=dict(c["kw"], view_bank=3)),
    "fresh views": lambda c: dict(c, kw=dict(c["kw"], view_bank=None)),
    "crop": lambda c: dict(c, kw=dict(c["kw"], crop=36)),
    "resize": lambda c: dict(c, kw=dict(c["kw"], resize=40)),
    "batch": lambda c: dict(c, kw=dict(c["kw"], max_batch=3)),
}


@pytest.mark.parametrize("change", sorted(CHANGES))
def test_changed_inputs_are_recomputed(fmnist, backbone, other_backbone, images, tmp_path, trainings, change):
    base = dict(images=images, backbone=backbone, test=fmnist[1], kw=BASE, fmnist=fmnist,
                other_backbone=other_backbone)

    def run(c):
        return evaluate(c["images"], c["backbone"], c["test"], cache_dir=tmp_path, progress=False, **c["kw"])

    run(base)
    assert len(trainings) == 1
    changed = CHANGES[change](base)
    report = run(changed)
    assert len(trainings) == 1 + changed["kw"]["runs"]  # recomputed, never reused
    assert "reused_from" not in report.provenance
    assert len(list(tmp_path.glob("eval-*.json"))) == 2
    run(changed)  # and the changed evaluation is itself reused next time
    assert len(trainings) == 1 + changed["kw"]["runs"]


def test_changed_head_is_recomputed(fmnist, backbone, other_backbone, images, tmp_path, trainings):
    train, test = fmnist
    feats = extract_features(train, other_backbone, **RES)
    head_a = fit_full_head(feats, other_backbone, epochs=1, seed=0, progress=False)
    head_b = fit_full_head(feats, other_backbone, epochs=1, seed=1, progress=False)
    trainings.clear()  # count the projector trainings only
    kw = dict(mode="inherit", head_backbone=other_backbone, cache_dir=tmp_path, progress=False, **BASE)
    first = evaluate(images, backbone, test, head=head_a, **kw)
    assert len(trainings) == 1
    assert evaluate(images, backbone, test, head=head_a, **kw).top1 == first.top1 and len(trainings) == 1
    evaluate(images, backbone, test, head=head_b, **kw)
    assert len(trainings) == 2


def test_damaged_or_foreign_cache_file_is_recomputed(fmnist, backbone, images, tmp_path, trainings):
    test = fmnist[1]
    evaluate(images, backbone, test, cache_dir=tmp_path, progress=False, **BASE)
    (path,) = tmp_path.glob("eval-*.json")
    doc = json.loads(path.read_text())
    doc["key"]["protocol"]["epochs"] = 999  # a file under this name whose recorded inputs differ
    path.write_text(json.dumps(doc))
    evaluate(images, backbone, test, cache_dir=tmp_path, progress=False, **BASE)
    assert len(trainings) == 2
    path.write_text("{not json")
    evaluate(images, backbone, test, cache_dir=tmp_path, progress=False, **BASE)
    assert len(trainings) == 3
    assert json.loads(path.read_text())["key"]["protocol"]["epochs"] == BASE["epochs"]  # rewritten, valid again


def test_no_cache_dir_means_no_reuse(fmnist, backbone, images, trainings):
    evaluate(images, backbone, fmnist[1], progress=False, **BASE)
    evaluate(images, backbone, fmnist[1], progress=False, **BASE)
    assert len(trainings) == 2


def test_cli_eval_reuses_and_flags(photo_folder, tmp_path, capsys):
    """`sfmkern eval` stores beside the distilled set by default, says when it reuses; --no-cache and
    --fresh-views / --view-bank behave as documented."""
    from sfmkern.cli import main
    from sfmkern.data import ImageFolder
    from sfmkern.distillation import DistilledSet

    picked = select_random(ImageFolder(photo_folder), 1, seed=0, image_size=32)
    run_dir = tmp_path / "run"
    DistilledSet(picked.images, picked.labels, picked.classes, config={}, stats_fingerprint="x").save(
        run_dir / "distilled.safetensors")
    args = ["eval", "--distilled", str(run_dir), "--test", str(photo_folder), "--backbone", "test_convnext",
            "--no-pretrained", "--device", "cpu", "--epochs", "2", "--runs", "1", "--resize", "36", "--crop", "32"]
    assert main(args) == 0
    first = capsys.readouterr()
    assert "reused" not in first.err and len(list((run_dir / "eval-cache").glob("eval-*.json"))) == 1
    assert main(args) == 0
    second = capsys.readouterr()
    assert "reused the finished evaluation" in second.err and second.out == first.out
    assert main([*args, "--no-cache", "--quiet"]) == 0
    assert "reused" not in capsys.readouterr().err
    assert main([*args, "--fresh-views", "--quiet"]) == 0
    assert len(list((run_dir / "eval-cache").glob("eval-*.json"))) == 2  # another protocol, another entry
    capsys.readouterr()
    assert main([*args, "--fresh-views", "--view-bank", "3"]) == 2
    assert "at most one of --view-bank K and --fresh-views" in capsys.readouterr().err
