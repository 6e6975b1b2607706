"""The offline demo end to end at its smallest setting (real Fashion-MNIST, real efficientnet-lite0 weights): every
phase runs, report.md's accuracy table parses with the fixed columns, report.json and the files it names exist, and
a second run reuses the statistics, the full-data head, the test features and the distilled sets."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from sfmkern.demo import (
    PRESETS,
    TABLE_COLUMNS,
    acceptance_checks,
    format_table,
    gate_failures,
    parse_report_table,
    settings_for,
)


def run_tiny(out):
    """`python -m sfmkern demo --tiny` in a subprocess, as CI runs it -> (report.json as a dict, seconds)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-m", "sfmkern", "--quiet", "demo", "--tiny", "--device", "cpu",
                          "--out", str(out)], capture_output=True, text=True, env=env, timeout=600)
    seconds = time.perf_counter() - t0
    assert res.returncode == 0, res.stderr[-2000:]
    assert "| method | ipc |" in res.stdout
    return json.loads((out / "report.json").read_text()), seconds


@pytest.fixture(scope="module")
def tiny_demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    result, seconds = run_tiny(out)
    return out, result, seconds


def test_tiny_demo_writes_a_parseable_report(tiny_demo):
    out, result, _ = tiny_demo
    for name in ("report.md", "report.json", "grid.png", "grid-ipc1.png", "grid-ipc2.png",
                 "distilled-ipc1.safetensors", "distilled-ipc2.safetensors", "stats/stats.safetensors",
                 "stats/stats.head.safetensors", "test-features.safetensors"):
        assert (out / name).is_file(), name
    rows = parse_report_table((out / "report.md").read_text())
    assert rows == parse_report_table(str(out / "report.md"))  # a path works too
    keys = {(r["method"], r["ipc"], r["protocol"]) for r in rows}
    assert keys == {("sfm", "1", "probe"), ("random-real", "1", "probe"), ("centroid", "1", "probe"),
                    ("sfm", "2", "probe"), ("random-real", "2", "probe"), ("kmeans", "2", "probe")}
    # the reference rows stand apart: no result of the distilled images
    reference = parse_report_table((out / "report.md").read_text(), table="reference")
    assert {(r["method"], r["ipc"], r["protocol"]) for r in reference} == {
        ("full-data", "all", "full-data"), ("full-data head", "all", "inherit")}
    assert [(r["method"], r["top1_mean"]) for r in reference] == [
        (r["method"], round(r["top1_mean"], 2)) for r in result["reference_rows"]]
    for r in rows + reference:
        assert set(r) == set(TABLE_COLUMNS)
        assert 0.0 <= r["top1_mean"] <= 100.0 and r["top1_mean"] <= r["top5_mean"] + 1e-9
        assert r["runs"] >= 1 and r["storage_bytes"] > 0
    by = {(r["method"], r["ipc"], r["protocol"]): r for r in rows + reference}
    assert by[("sfm", "1", "probe")]["train_images"] == 10 and by[("sfm", "2", "probe")]["train_images"] == 20
    assert by[("full-data", "all", "full-data")]["train_images"] == 120  # 12 per class of the train split
    # classifier inheritance with the distillation backbone is the full-data head itself
    full = by[("full-data", "all", "full-data")]["top1_mean"]
    assert by[("full-data head", "all", "inherit")]["top1_mean"] == pytest.approx(full)

    report = json.loads((out / "report.json").read_text())
    assert report["rows"] == result["rows"] and report["preset"] == "tiny"
    assert [p["phase"] for p in report["phases"]][:5] == ["data", "backbone", "stats", "full-data head",
                                                           "test features"]
    assert all(p["seconds"] >= 0 and p["peak_rss_mib"] > 0 for p in report["phases"])
    assert report["test_images"] == 60 and report["stats"]["images"] == 120
    md = (out / "report.md").read_text()
    assert "Time and memory per phase" in md and "peak RSS" in md


def test_tiny_demo_rerun_reuses_everything(tiny_demo):
    out, first, seconds = tiny_demo
    print(f"tiny demo: {seconds:.1f} s")
    reused = [out / "stats" / "stats.safetensors", out / "stats" / "stats.head.safetensors",
              out / "test-features.safetensors", *sorted(out.glob("sfm-ipc*/checkpoint.safetensors"))]
    assert len(reused) == 5
    stamps = [p.stat().st_mtime_ns for p in reused]
    second, _ = run_tiny(out)
    assert [p.stat().st_mtime_ns for p in reused] == stamps  # nothing recomputed
    assert second["stats"]["fingerprint"] == first["stats"]["fingerprint"]
    assert second["rows"] == first["rows"]  # same seeds, same files: identical numbers


def test_table_round_trip_and_checks():
    rows = [
        {"method": "sfm", "ipc": "1", "protocol": "probe", "backbone": "b", "runs": 3, "top1_mean": 74.0,
         "top1_std": 0.4, "top5_mean": 97.0, "top5_std": 0.1, "train_images": 10, "storage_bytes": 491520},
        {"method": "random-real", "ipc": "1", "protocol": "probe", "backbone": "b", "runs": 3, "top1_mean": 56.5,
         "top1_std": 4.0, "top5_mean": 90.0, "top5_std": 1.0, "train_images": 10, "storage_bytes": 491520},
        {"method": "centroid", "ipc": "1", "protocol": "probe", "backbone": "b", "runs": 3, "top1_mean": 72.0,
         "top1_std": 0.2, "top5_mean": 95.0, "top5_std": 0.3, "train_images": 10, "storage_bytes": 491520},
    ]
    text = "intro\n\n<!-- sfmkern:accuracy-table -->\n" + format_table(rows) + "\n\nmore text\n"
    assert parse_report_table(text) == rows
    checks = acceptance_checks(rows)
    assert [c["pass"] for c in checks] == [True, False]  # +17.5 >= 12; +2.0 < 3
    assert not any(c["gate"] for c in checks)
    gated = acceptance_checks(rows, gate=True)  # the quick preset: SFM below random real fails the command
    assert [(c["gate"], c["pass"]) for c in gated] == [(False, True), (False, False), (True, True)]
    low = [dict(r, top1_mean=50.0) if r["method"] == "sfm" else r for r in rows]
    assert gate_failures({"checks": acceptance_checks(low, gate=True)}) == [
        "sfm 1-IPC - random-real 1-IPC >= 0 points (gate)"]
    with pytest.raises(ValueError, match="no accuracy table"):
        parse_report_table("| a | b |\n|---|---|\n| 1 | 2 |\n")
    with pytest.raises(ValueError, match="not a number"):
        parse_report_table(text.replace("74.00", "n/a"))
    with pytest.raises(ValueError, match="no accuracy table .reference"):
        parse_report_table(text, table="reference")
    both = text + "\n<!-- sfmkern:reference-table -->\n" + format_table(rows[:1]) + "\n"
    assert parse_report_table(both) == rows and parse_report_table(both, table="reference") == rows[:1]


def test_settings_presets_and_validation():
    assert set(PRESETS) == {"full", "quick", "tiny"}
    full = settings_for("full")
    assert full.image_size == 128 and full.ipcs == (1, 10) and full.steps == PRESETS["full"]["steps"]
    assert full.lr is None and full.grow_every is None  # the library's defaults
    assert full.epochs == 1000 and full.test_per_class is None
    assert full.train_per_class == 2000 and full.cross_backbone is None  # the 2-core CPU budget
    gpu = settings_for("full", "cuda")
    assert gpu.train_per_class is None and gpu.steps == (1000, 1000) and gpu.cross_backbone
    assert settings_for("full", "cuda", cross_backbone="").cross_backbone is None
    assert settings_for("quick", ipcs=(1,)).steps == (PRESETS["quick"]["steps"][0],)
    with pytest.raises(ValueError, match="unknown demo preset"):
        settings_for("huge")
    with pytest.raises(ValueError, match="unknown demo setting"):
        settings_for("tiny", colour=True)
    with pytest.raises(ValueError, match="one step count per ipc"):
        settings_for("tiny", ipcs=(1, 2, 3), steps=(1, 2))
    with pytest.raises(ValueError, match="fewer than ipc"):
        settings_for("tiny", train_per_class=1)


def test_failed_gate_fails_the_command(monkeypatch, tmp_path, capsys):
    import sfmkern.demo
    from sfmkern.cli import main

    assert PRESETS["quick"]["gate"] and not PRESETS["full"].get("gate", False)
    result = {"table": "t", "total_s": 1.0, "checks": [
        {"check": "sfm 1-IPC - random-real 1-IPC >= 0 points (gate)", "difference": -3.0, "pass": False,
         "gate": True}]}
    monkeypatch.setattr(sfmkern.demo, "run_demo", lambda *a, **k: result)
    assert main(["--quiet", "demo", "--quick", "--out", str(tmp_path)]) == 3
    assert "gate FAILED" in capsys.readouterr().err
    result["checks"][0]["pass"] = True
    assert main(["--quiet", "demo", "--quick", "--out", str(tmp_path)]) == 0
