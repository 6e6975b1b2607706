"""sfmkern.evaluate: the probe protocol (formulas, reproducibility), classifier inheritance and the mismatch errors.

Real data: a class-balanced Fashion-MNIST subset at 32 px; backbones: tiny timm models with random weights.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from conftest import balanced_subset

from sfmkern.backbone import load_backbone
from sfmkern.evaluation import (
    REFERENCE_CAPTION,
    EvalReport,
    FeatureSet,
    LabelledImages,
    LinearHead,
    clear_feature_cache,
    evaluate,
    extract_features,
    fit_full_head,
    head_path_for,
    markdown_table,
)
from sfmkern.evaluation import heads as probe
from sfmkern.evaluation.baselines import full_data, select_random

RES = dict(resize=36, crop=32, progress=False)


@pytest.fixture(scope="module")
def fmnist():
    from sfmkern.data import fashion_mnist

    return balanced_subset(fashion_mnist("train"), 40, 0), balanced_subset(fashion_mnist("test"), 30, 1)


@pytest.fixture(scope="module")
def backbone_a():
    torch.manual_seed(1)
    return load_backbone("test_convnext", pretrained=False, device="cpu")


@pytest.fixture(scope="module")
def backbone_b():
    torch.manual_seed(2)
    return load_backbone("test_efficientnet_ln", pretrained=False, device="cpu")


@pytest.fixture(scope="module")
def train_features(fmnist, backbone_a):
    return extract_features(fmnist[0], backbone_a, **RES)


@pytest.fixture(scope="module")
def full_head(train_features, backbone_a):
    return fit_full_head(train_features, backbone_a, epochs=20, seed=0, progress=False)


@pytest.fixture(scope="module")
def distilled(fmnist):
    """A stand-in distilled set: real images, 4 per class, as a DistilledSet (what distill() returns)."""
    from sfmkern.distillation import DistilledSet

    picked = select_random(fmnist[0], 4, seed=3, image_size=40)
    return DistilledSet(picked.images, picked.labels, picked.classes, config={"ipc": 4}, stats_fingerprint="x")


# ------------------------------------------------------------------------------------------------ formulas
@pytest.mark.parametrize("n,epochs", [(10, 7), (100, 3), (250, 4), (1, 5)])
def test_schedule_formulas_read_from_optimizer_and_scheduler(n, epochs):
    gen = torch.Generator().manual_seed(0)
    feats, labels = torch.randn(n, 13), torch.randint(0, 3, (n,))
    schedule = probe.ProbeSchedule.create(n, epochs)
    batch = min(100, n)
    assert schedule.batch_size == batch
    seen = []
    head = probe.linear_head(13, 3, generator=gen)

    def batch_fn(idx):
        seen.append(idx.numel())
        return feats[idx], labels[idx]

    result = probe.train_linear(head, batch_fn, schedule, generator=gen, progress=False)
    opt, sched = result.optimizer, result.scheduler
    assert isinstance(opt, torch.optim.Adam)
    group = opt.param_groups[0]
    assert group["weight_decay"] == 0.0
    assert group["initial_lr"] == pytest.approx(1e-3 * batch / 256, rel=0, abs=1e-15)
    assert isinstance(sched, torch.optim.lr_scheduler.CosineAnnealingLR)
    steps = epochs * math.ceil(n / batch)
    assert sched.T_max == steps and sched.eta_min == 0.0
    assert result.steps == steps and sched.last_epoch == steps  # trained to the end
    assert group["lr"] == pytest.approx(0.0, abs=1e-12)  # the cosine reached zero at the last step
    assert sum(seen) == epochs * n and max(seen) == batch  # every sample once per epoch


def test_cosine_midpoint_and_projector_lr():
    schedule = probe.ProbeSchedule.create(40, 10, base_lr=probe.PROJECTOR_BASE_LR)
    assert schedule.lr == pytest.approx(1e-2 * 40 / 256)
    opt = probe.make_optimizer([torch.nn.Parameter(torch.zeros(2))], schedule)
    sched = probe.make_scheduler(opt, schedule)
    for _ in range(schedule.total_steps // 2):
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(schedule.lr / 2, rel=1e-6)


def test_head_init_distribution():
    head = probe.linear_head(4000, 50, generator=torch.Generator().manual_seed(0))
    assert float(head.bias.detach().abs().max()) == 0.0
    assert float(head.weight.detach().std()) == pytest.approx(0.01, rel=0.02)
    assert float(head.weight.detach().mean()) == pytest.approx(0.0, abs=2e-4)


def test_accuracy_against_float64_reference():
    g = torch.Generator().manual_seed(5)
    feats, labels = torch.randn(1003, 17, generator=g), torch.randint(0, 7, (1003,), generator=g)
    w = torch.randn(7, 17, generator=g)
    a1, a5 = probe.accuracy(lambda x: x @ w.T, feats, labels, chunk=97)
    logits = feats.double() @ w.double().T
    ref1 = (logits.argmax(1) == labels).double().mean().item() * 100
    ref5 = (logits.topk(5, 1).indices == labels[:, None]).any(1).double().mean().item() * 100
    assert a1 == pytest.approx(ref1) and a5 == pytest.approx(ref5)


# ------------------------------------------------------------------------------------------------ probe
def test_probe_end_to_end_reproducible(fmnist, backbone_a, distilled):
    _, test = fmnist
    kw = dict(epochs=3, runs=2, seed=0, view_bank=None, **RES)  # the exact protocol: fresh views every step
    first = evaluate(distilled, backbone_a, test, **kw)
    again = evaluate(distilled, backbone_a, test, **kw)
    assert first.top1 == again.top1 and first.top5 == again.top5
    assert len(first.top1) == 2 and all(0.0 <= a <= 100.0 for a in first.top1 + first.top5)
    p = first.protocol
    assert p["batch_size"] == 40 and p["lr"] == pytest.approx(1e-3 * 40 / 256) and p["total_steps"] == 3
    assert p["test_images"] == len(test) and p["views"] == "fresh each step"
    assert first.storage["images_bytes"] == distilled.images.numel()
    assert first.num_train == 40 and first.images_per_class == 4
    round_trip = EvalReport.from_json(first.to_json())
    assert round_trip.top1 == first.top1 and json.loads(first.to_json())["top1_mean"] == pytest.approx(
        np.mean(first.top1))
    md = first.to_markdown()
    assert "| top-1 (%) |" in md and f"{np.mean(first.top1):.1f} ± {np.std(first.top1):.1f}" in md


def test_probe_view_bank_reproducible_and_learns(fmnist, backbone_a):
    train, test = fmnist
    images = select_random(train, 10, seed=0, image_size=32)
    kw = dict(epochs=60, runs=2, seed=4, view_bank=4, **RES)
    rep = evaluate(images, backbone_a, test, **kw)
    assert rep.top1 == evaluate(images, backbone_a, test, **kw).top1
    assert rep.protocol["views"] == "bank of 4 per image"
    assert rep.top1_mean > 20.0  # well above chance (10 %): the probe learns from the bank
    other_seed = evaluate(images, backbone_a, test, **{**kw, "seed": 5})
    assert other_seed.top1 != rep.top1


def test_cross_backbone_probe(fmnist, backbone_b, distilled):
    """Distilled with A (the config says so), evaluated with B: the report names B and keeps the provenance."""
    _, test = fmnist
    rep = evaluate(distilled, backbone_b, test, epochs=2, runs=1, view_bank=2, name="sfm", **RES)
    assert rep.name == "sfm" and rep.backbone == "test_efficientnet_ln"
    assert rep.backbone_fingerprint == backbone_b.fingerprint
    assert rep.provenance["config"] == {"ipc": 4} and rep.provenance["stats_fingerprint"] == "x"


def test_test_features_are_reused(fmnist, backbone_a, distilled, monkeypatch):
    _, test = fmnist
    first = extract_features(test, backbone_a, **RES)
    calls = []
    monkeypatch.setattr(backbone_a, "features_uint8", lambda x: calls.append(1) or None)
    again = extract_features(test, backbone_a, **RES)
    assert again is first and not calls
    ref = torch.cat([backbone_a.features(x.permute(0, 3, 1, 2).float() / 255) for x in _decoded(test)])
    torch.testing.assert_close(first.features, ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(first.labels, torch.as_tensor(test.labels))


def _decoded(source):
    from sfmkern.data import load_images

    imgs, ok = load_images(source, np.arange(len(source)), resize=36, crop=32)
    assert bool(ok.all())
    return [imgs[i : i + 64] for i in range(0, len(source), 64)]


# ------------------------------------------------------------------------------------------------ inheritance
def test_inherited_head_equals_full_data_probe(fmnist, backbone_a, train_features, tmp_path):
    _, test = fmnist
    stats_file = tmp_path / "stats.safetensors"
    path = head_path_for(stats_file)
    assert path == tmp_path / "stats.head.safetensors"
    fit_full_head(train_features, backbone_a, epochs=20, seed=7, out=path, progress=False)
    clear_feature_cache()  # recompute the test features, so equality is not one tensor compared with itself
    baseline = full_data(train_features, backbone_a, test, epochs=20, runs=1, seed=7, **RES)
    clear_feature_cache()
    inherited = evaluate(None, backbone_a, test, mode="inherit", head=path, **RES)
    assert inherited.top1 == baseline.top1 and inherited.top5 == baseline.top5
    # both are reference rows (upper bounds), never listed as a result of the images
    assert inherited.kind == "reference" and baseline.kind == "reference"
    assert inherited.top1[0] > 25.0  # the full-data head of this random backbone does learn
    assert inherited.storage["head_bytes"] == 4 * (10 * backbone_a.feature_dim + 10)
    loaded = LinearHead.load(path, backbone=backbone_a)
    assert loaded.backbone_fingerprint == backbone_a.fingerprint and loaded.config["epochs"] == 20


def test_projector_beats_random_projector(fmnist, backbone_a, backbone_b, full_head):
    train, test = fmnist
    images = select_random(train, 5, seed=1, image_size=32)
    kw = dict(mode="inherit", head=full_head, head_backbone=backbone_a, runs=2, seed=0, view_bank=8, **RES)
    trained = evaluate(images, backbone_b, test, epochs=150, **kw)
    untrained = evaluate(images, backbone_b, test, epochs=0, **kw)  # the projector at its random initialisation
    assert trained.top1_mean > untrained.top1_mean + 8.0
    assert trained.top1 == evaluate(images, backbone_b, test, epochs=150, **kw).top1
    d_a, d_b = backbone_a.feature_dim, backbone_b.feature_dim
    assert trained.storage == {"head_bytes": 4 * (10 * d_a + 10), "projector_bytes": 4 * (d_b * d_a + d_a),
                               "images_bytes": images.storage_bytes}
    assert trained.protocol["lr"] == pytest.approx(1e-2 * 50 / 256)
    faithful = evaluate(images, backbone_b, test, epochs=4, **{**kw, "view_bank": None, "runs": 1})
    assert faithful.protocol["total_steps"] == 4 and len(faithful.top1) == 1
    table = markdown_table([trained, faithful]).splitlines()
    assert len(table) == 4 and table[2].startswith("| inherit | inherit | test_efficientnet_ln | 5 | 2 |")
    assert trained.kind == "result"  # cross-backbone inheritance is a result of the images (the projector)
    same = evaluate(None, backbone_a, test, mode="inherit", head=full_head, **RES)
    mixed = markdown_table([same, trained]).splitlines()  # the reference row goes below, in its own table
    assert mixed[2].startswith("| inherit | inherit | test_efficientnet_ln |") and mixed[4] == REFERENCE_CAPTION
    assert mixed[8].startswith("| inherit | inherit | test_convnext | 0 | 1 |") and len(mixed) == 9


# ------------------------------------------------------------------------------------------------ mismatches
def test_class_count_mismatch_raises(fmnist, backbone_a, distilled, photo_folder):
    from sfmkern.data import ImageFolder

    photos = ImageFolder(photo_folder)
    with pytest.raises(ValueError, match="class count mismatch.*10 classes.*3"):
        evaluate(distilled, backbone_a, photos, epochs=1, runs=1, **RES)


def test_class_name_mismatch_raises(fmnist, backbone_a, distilled):
    _, test = fmnist
    renamed = LabelledImages(distilled.images, distilled.labels, [*distilled.classes[:-1], "boot"], name="sfm")
    with pytest.raises(ValueError, match="class names differ at label 9"):
        evaluate(renamed, backbone_a, test, epochs=1, runs=1, **RES)


def test_stats_class_mismatch_raises(fmnist, backbone_a, distilled):
    _, test = fmnist

    class Stats:
        classes = [str(i) for i in range(10)]

    with pytest.raises(ValueError, match="class names differ at label 0: statistics"):
        evaluate(distilled, backbone_a, test, epochs=1, runs=1, stats=Stats(), **RES)


def test_head_class_mismatch_raises(fmnist, backbone_a, full_head):
    _, test = fmnist
    bad = LinearHead(full_head.weight[:9], full_head.bias[:9], full_head.classes[:9], full_head.backbone_name,
                     full_head.backbone_fingerprint)
    with pytest.raises(ValueError, match="class count mismatch: inherited head has 9"):
        evaluate(None, backbone_a, test, mode="inherit", head=bad, **RES)


def test_head_of_another_backbone_raises(fmnist, backbone_a, backbone_b, full_head, distilled, tmp_path):
    _, test = fmnist
    with pytest.raises(ValueError, match="fitted on backbone 'test_convnext'.*pass head_backbone="):
        evaluate(distilled, backbone_b, test, mode="inherit", head=full_head, epochs=1, runs=1, **RES)
    with pytest.raises(ValueError, match="not on 'test_efficientnet_ln'"):
        evaluate(distilled, backbone_b, test, mode="inherit", head=full_head, head_backbone=backbone_b, epochs=1,
                 runs=1, **RES)
    path = full_head.save(tmp_path / "head.safetensors")
    with pytest.raises(ValueError, match="head.safetensors: this head was fitted on backbone 'test_convnext'"):
        LinearHead.load(path, backbone=backbone_b)
    b_features = FeatureSet(torch.randn(5, backbone_b.feature_dim), torch.arange(5), [str(i) for i in range(5)],
                            backbone_b.name, backbone_b.fingerprint)
    with pytest.raises(ValueError, match="features were computed with backbone 'test_efficientnet_ln'"):
        fit_full_head(b_features, backbone_a, progress=False)


def test_foreign_test_features_and_bad_arguments_raise(fmnist, backbone_a, backbone_b, distilled):
    _, test = fmnist
    b_test = extract_features(test, backbone_b, **RES)
    with pytest.raises(ValueError, match="test features were computed with backbone 'test_efficientnet_ln'"):
        evaluate(distilled, backbone_a, b_test, epochs=1, runs=1, **RES)
    with pytest.raises(ValueError, match="mode must be one of"):
        evaluate(distilled, backbone_a, test, mode="linear", **RES)
    with pytest.raises(ValueError, match="runs must be an int >= 1"):
        evaluate(distilled, backbone_a, test, runs=0, **RES)
    with pytest.raises(ValueError, match="view_bank must be 'auto', None or an int >= 1"):
        evaluate(distilled, backbone_a, test, view_bank=0, **RES)
    with pytest.raises(ValueError, match="needs head="):
        evaluate(distilled, backbone_a, test, mode="inherit", **RES)
    with pytest.raises(ValueError, match="labels must lie in"):
        LabelledImages(torch.zeros(2, 3, 8, 8, dtype=torch.uint8), torch.tensor([0, 3]), ["a", "b"])
    with pytest.raises(TypeError, match="expected a DistilledSet"):
        evaluate(torch.zeros(2, 3, 8, 8), backbone_a, test, **RES)
