"""sfmkern.artifacts: each artefact saves and loads itself with its format version and the fingerprints it depends
on, reads the files sfmkern 0.1 wrote, and refuses a foreign, damaged or newer file, another backbone or other
statistics in one line naming the file (and what to re-run)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from sfmkern._io import save_tensors
from sfmkern.artifacts import ClassStats, DistilledSet, EvalReport, FeatureSet, LinearHead

BACKBONE = SimpleNamespace(name="net", fingerprint="a" * 64)
OTHER_BACKBONE = SimpleNamespace(name="net", fingerprint="b" * 64)


def _stats(shift: float = 0.0) -> ClassStats:
    return ClassStats(torch.arange(6.0).reshape(2, 3) + shift, torch.tensor([4, 5]), ["cat", "dog"],
                      {"cat": 0, "dog": 1}, BACKBONE.name, BACKBONE.fingerprint, {"resize": 40, "crop": 32}, "d1")


def _one_line(exc: pytest.ExceptionInfo, *parts: str) -> None:
    text = str(exc.value)
    assert "\n" not in text and all(p in text for p in parts), text


def _refused(call, *parts: str) -> None:
    """`call()` raises a one-line ValueError that contains every part."""
    with pytest.raises(ValueError) as exc:
        call()
    _one_line(exc, *parts)


def test_stats_round_trip_and_refusals(tmp_path):
    stats = _stats()
    path = stats.save(tmp_path / "s.safetensors")
    loaded = ClassStats.load(path, backbone=BACKBONE, crop=32)
    assert loaded.fingerprint == stats.fingerprint and torch.equal(loaded.centres, stats.centres)
    _refused(lambda: ClassStats.load(path, backbone=OTHER_BACKBONE), str(path), "weights differ")
    newer = tmp_path / "newer.safetensors"
    save_tensors(newer, {"centres": stats.centres, "counts": stats.counts}, {"format": "sfmkern.ClassStats/2"})
    _refused(lambda: ClassStats.load(newer), str(newer), "'sfmkern.ClassStats/2' is not one this sfmkern reads",
             "re-run `sfmkern stats`")


def test_distilled_set_refuses_other_statistics_and_backbone(tmp_path):
    stats, other = _stats(), _stats(1.0)
    images = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8)
    ds = DistilledSet(images, torch.tensor([0, 1]), stats.classes,
                      {"backbone": "net", "backbone_fingerprint": BACKBONE.fingerprint}, stats.fingerprint)
    path = ds.save(tmp_path / "distilled.safetensors")
    assert torch.equal(DistilledSet.load(path, stats=stats, backbone=BACKBONE).images, images)
    _refused(lambda: DistilledSet.load(path, stats=other), str(path), "statistics", "re-run `sfmkern distill`")
    _refused(lambda: DistilledSet.load(path, backbone=OTHER_BACKBONE), str(path), "backbone 'net'")
    stats_file = stats.save(tmp_path / "s.safetensors")  # a statistics file is no distilled set
    _refused(lambda: DistilledSet.load(stats_file), "s.safetensors", "not a DistilledSet file",
             "re-run `sfmkern distill`")


def test_head_reads_the_old_format_and_refuses_stale_statistics(tmp_path):
    stats, other = _stats(), _stats(1.0)
    weight, bias = torch.randn(2, 3), torch.randn(2)
    old = tmp_path / "old.head.safetensors"  # what sfmkern 0.1 wrote: `kind`, no format version
    save_tensors(old, {"weight": weight, "bias": bias},
                 {"kind": "sfmkern.linear-head", "classes": ["cat", "dog"], "backbone_name": "net",
                  "backbone_fingerprint": BACKBONE.fingerprint, "stats_fingerprint": stats.fingerprint,
                  "config": {"epochs": 10, "seed": 0}})
    head = LinearHead.load(old, backbone=BACKBONE, stats=stats)
    assert torch.equal(head.weight, weight) and head.config["epochs"] == 10
    new = head.save(tmp_path / "new.head.safetensors")
    assert torch.equal(LinearHead.load(new, stats=stats).bias, bias)
    _refused(lambda: LinearHead.load(new, stats=other), str(new), "fitted on statistics", "refit it")
    _refused(lambda: LinearHead.load(new, backbone=OTHER_BACKBONE), str(new), "fitted on backbone 'net'")
    torn = tmp_path / "torn.head.safetensors"
    torn.write_bytes(new.read_bytes()[:50])
    _refused(lambda: LinearHead.load(torn), str(torn), "not a readable safetensors file")


def test_feature_set_and_report_round_trip(tmp_path):
    fs = FeatureSet(torch.randn(4, 3).half(), torch.tensor([0, 1, 1, 0]), ["cat", "dog"], "net",
                    BACKBONE.fingerprint, torch.arange(4), {"resize": 40, "crop": 32}, 1)
    path = fs.save(tmp_path / "f.safetensors", extra={"key": {"size": 32}})
    back = FeatureSet.load(path, backbone=BACKBONE)
    assert torch.equal(back.features, fs.features) and back.extra == {"key": {"size": 32}} and back.skipped == 1
    _refused(lambda: FeatureSet.load(path, backbone=OTHER_BACKBONE), str(path), "backbone 'net'")
    report = EvalReport("sfm", "probe", "net", BACKBONE.fingerprint, 2, 4, [50.0, 60.0], [100.0, 100.0])
    saved = report.save(tmp_path / "r.json")
    assert EvalReport.load(saved).top1_mean == pytest.approx(55.0) and report.kind == "result"
    (tmp_path / "bad.json").write_text("{not json")
    _refused(lambda: EvalReport.load(tmp_path / "bad.json"), "bad.json", "re-run `sfmkern eval --out`")
