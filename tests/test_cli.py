"""The `sfmkern` command line: help everywhere, config files, the stats -> distill -> eval chain on real photos with a
tiny random-weight timm CNN, and every error path (missing data, unknown backbone, mismatched statistics file,
unwritable output, bad options) exiting non-zero with one line and no traceback (a traceback only with --debug)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sfmkern.cli import build_parser, main

TINY = ["--backbone", "test_efficientnet", "--no-pretrained", "--device", "cpu"]
OTHER = ["--backbone", "test_resnet", "--no-pretrained", "--device", "cpu"]
SIZE = ["--resize", "40", "--crop", "32"]


def run_cli(capsys, *argv):
    """main(argv) -> (exit status, stdout, stderr)."""
    try:
        rc = main([str(a) for a in argv])
    except SystemExit as exc:  # argparse: --help, --version and usage errors
        rc = exc.code if isinstance(exc.code, int) else 1
    out, err = capsys.readouterr()
    return rc, out, err


def assert_one_line_error(rc, err, *needles, status=None):
    assert rc != 0
    if status is not None:
        assert rc == status
    lines = [ln for ln in err.splitlines() if ln.strip() and "it/s" not in ln and "img/s" not in ln]
    assert len(lines) == 1, f"expected one error line, got {lines}"
    assert "Traceback" not in err
    assert "error:" in lines[0]
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"


@pytest.fixture(scope="module")
def stats_file(photo_folder, tmp_path_factory):
    """Statistics of the photo folder with the tiny CNN, written by `sfmkern stats` (feature cache on)."""
    out = tmp_path_factory.mktemp("cli-stats") / "stats.safetensors"
    rc = main(["stats", "--data", str(photo_folder), *TINY, *SIZE, "--out", str(out), "--cache-features",
               "--batch-size", "4", "--quiet"])
    assert rc == 0
    return out


# ------------------------------------------------------------------------------------------------ help
@pytest.mark.parametrize("cmd", [[], ["stats"], ["distill"], ["eval"], ["demo"]])
def test_help_everywhere(capsys, cmd):
    rc, out, _ = run_cli(capsys, *cmd, "--help")
    assert rc == 0
    assert "usage: sfmkern" in out
    assert "--config" in out


def test_every_option_has_help():
    parser = build_parser()
    subs = next(a for a in parser._actions if a.dest == "command").choices
    missing = [f"{name} {a.option_strings}" for name, sub in subs.items() for a in sub._actions
               if a.option_strings and not a.help]
    assert not missing


def test_no_subcommand_prints_help_and_fails(capsys):
    rc, _, err = run_cli(capsys)
    assert rc == 2
    assert "stats" in err and "demo" in err


def test_python_dash_m_and_console_script(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    res = subprocess.run([sys.executable, "-m", "sfmkern", "--version"], capture_output=True, text=True, env=env,
                         timeout=120)
    assert res.returncode == 0 and "sfmkern" in res.stdout
    res = subprocess.run([sys.executable, "-m", "sfmkern", "stats", "--data", str(tmp_path / "nope"), *TINY,
                          "--out", str(tmp_path / "s.safetensors")], capture_output=True, text=True, env=env,
                         timeout=120)
    assert res.returncode == 1
    assert "Traceback" not in res.stderr and len(res.stderr.strip().splitlines()) == 1


# ------------------------------------------------------------------------------------------------ the happy path
def test_stats_distill_eval_chain(capsys, photo_folder, stats_file, tmp_path):
    from sfmkern.distillation import DistilledSet
    from sfmkern.stats import ClassStats

    stats = ClassStats.load(stats_file)
    assert stats.preprocessing["crop"] == 32 and stats.backbone_name == "test_efficientnet"
    assert int(stats.counts.sum()) == 10 and stats.features_path

    run = tmp_path / "run"
    rc, out, err = run_cli(capsys, "distill", "--stats", stats_file, *TINY, "--out-dir", run, "--ipc", "2",
                           "--steps", "3", "--syn-res", "32", "--crop", "24", "--grow-every", "0",
                           "--image-folder", tmp_path / "png", "--quiet")
    assert rc == 0, err
    ds = DistilledSet.load(run / "distilled.safetensors")
    assert tuple(ds.images.shape) == (6, 3, 32, 32) and ds.config["steps"] == 3
    assert (run / "grid.png").is_file()
    assert len(list((tmp_path / "png").rglob("*.png"))) == 6
    assert "distilled 6 images" in out

    common = ["--test", photo_folder, *TINY, *SIZE, "--epochs", "3", "--runs", "2", "--view-bank", "2", "--quiet"]
    rc, out, err = run_cli(capsys, "eval", "--distilled", run, *common, "--out", tmp_path / "probe.json",
                           "--markdown", tmp_path / "probe.md")
    assert rc == 0, err
    report = json.loads((tmp_path / "probe.json").read_text())
    assert report["mode"] == "probe" and len(report["top1"]) == 2 and report["num_train"] == 6
    assert "| set | mode |" in out and (tmp_path / "probe.md").read_text().startswith("| set |")

    # classifier inheritance: the full-data head is fitted beside the statistics on first use, then reused
    rc, out, err = run_cli(capsys, "eval", "--distilled", run, *common, "--mode", "inherit", "--stats", stats_file,
                           "--out", tmp_path / "inherit.json")
    assert rc == 0, err
    head = stats_file.with_name("stats.head.safetensors")
    assert head.is_file()
    inherit = json.loads((tmp_path / "inherit.json").read_text())
    rc, _, err = run_cli(capsys, "eval", "--baseline", "full-data", *common, "--stats", stats_file,
                         "--out", tmp_path / "full.json")
    assert rc == 0, err
    full = json.loads((tmp_path / "full.json").read_text())
    assert inherit["top1"][0] == pytest.approx(full["top1"][0])  # B = A: the inherited head is the full-data head

    for baseline in ("random-real", "centroid"):
        rc, out, err = run_cli(capsys, "eval", "--baseline", baseline, "--train-data", photo_folder, *common,
                               "--stats", stats_file, "--out", tmp_path / f"{baseline}.json")
        assert rc == 0, err
        assert json.loads((tmp_path / f"{baseline}.json").read_text())["name"] == baseline


def test_config_file_yaml_and_json_flags_win(capsys, photo_folder, tmp_path):
    from sfmkern.stats import ClassStats

    cfg = tmp_path / "stats.yaml"
    cfg.write_text(f"data: {photo_folder}\nbackbone: test_efficientnet\nno-pretrained: true\ndevice: cpu\n"
                   f"resize: 40\ncrop: 32\nbatch_size: 4\nquiet: true\n"
                   f"distill:\n  ipc: 7\nstats:\n  out: {tmp_path / 'from-config.safetensors'}\n")
    rc, _, err = run_cli(capsys, "stats", "--config", cfg, "--crop", "24")
    assert rc == 0, err
    stats = ClassStats.load(tmp_path / "from-config.safetensors")
    assert stats.preprocessing["resize"] == 40 and stats.preprocessing["crop"] == 24  # the flag beat the file

    js = tmp_path / "stats.json"
    js.write_text(json.dumps({"stats": {"data": str(photo_folder), "backbone": "test_efficientnet",
                                        "no_pretrained": True, "device": "cpu", "resize": 36, "crop": 32,
                                        "out": str(tmp_path / "json.safetensors")}}))
    rc, out, err = run_cli(capsys, "stats", "--config", js, "--quiet")
    assert rc == 0, err
    assert ClassStats.load(tmp_path / "json.safetensors").preprocessing["resize"] == 36


# ------------------------------------------------------------------------------------------------ error paths
def test_missing_data(capsys, tmp_path):
    rc, _, err = run_cli(capsys, "stats", "--data", tmp_path / "no-such-folder", *TINY,
                         "--out", tmp_path / "s.safetensors")
    assert_one_line_error(rc, err, "no-such-folder", status=1)


def test_missing_fashion_mnist_root(capsys, tmp_path):
    rc, _, err = run_cli(capsys, "stats", "--data", f"fashion-mnist:train:{tmp_path}", *TINY,
                         "--out", tmp_path / "s.safetensors")
    assert_one_line_error(rc, err, "Fashion-MNIST", status=1)


def test_missing_distilled_set_and_stats_file(capsys, photo_folder, tmp_path):
    rc, _, err = run_cli(capsys, "eval", "--distilled", tmp_path / "missing.safetensors", "--test", photo_folder,
                         *TINY)
    assert_one_line_error(rc, err, "missing.safetensors", status=1)
    rc, _, err = run_cli(capsys, "distill", "--stats", tmp_path / "nostats.safetensors", *TINY,
                         "--out-dir", tmp_path / "run")
    assert_one_line_error(rc, err, "nostats.safetensors", status=1)


def test_unknown_backbone(capsys, photo_folder, tmp_path):
    rc, _, err = run_cli(capsys, "stats", "--data", photo_folder, "--backbone", "no_such_model_xyz",
                         "--out", tmp_path / "s.safetensors")
    assert_one_line_error(rc, err, "no_such_model_xyz", status=1)


def test_mismatched_statistics_file(capsys, photo_folder, stats_file, tmp_path):
    # statistics of test_efficientnet used to distil with test_resnet
    rc, _, err = run_cli(capsys, "distill", "--stats", stats_file, *OTHER, "--out-dir", tmp_path / "run",
                         "--steps", "1", "--syn-res", "16", "--crop", "32")
    assert_one_line_error(rc, err, "statistics", "test_efficientnet", "test_resnet", status=1)
    assert not (tmp_path / "run" / "distilled.safetensors").exists()
    # ... and as the centroid baseline's statistics when evaluating with another backbone
    rc, _, err = run_cli(capsys, "eval", "--baseline", "centroid", "--train-data", photo_folder, "--test",
                         photo_folder, *OTHER, *SIZE, "--stats", stats_file, "--epochs", "1", "--runs", "1")
    assert_one_line_error(rc, err, "test_efficientnet", status=1)


def test_not_a_statistics_file(capsys, tmp_path):
    bogus = tmp_path / "bogus.safetensors"
    bogus.write_bytes(b"not safetensors at all")
    rc, _, err = run_cli(capsys, "distill", "--stats", bogus, *TINY, "--out-dir", tmp_path / "run")
    assert_one_line_error(rc, err, "bogus.safetensors", status=1)


def test_unwritable_output(capsys, photo_folder, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    rc, _, err = run_cli(capsys, "stats", "--data", photo_folder, *TINY, "--out", blocker / "s.safetensors")
    assert_one_line_error(rc, err, "cannot write", "a-file", status=1)
    rc, _, err = run_cli(capsys, "stats", "--data", photo_folder, *TINY, "--out", tmp_path)  # a folder
    assert_one_line_error(rc, err, "is a folder", status=2)
    rc, _, err = run_cli(capsys, "distill", "--data", photo_folder, *TINY, "--out-dir", blocker)
    assert_one_line_error(rc, err, "a-file", status=2)
    rc, _, err = run_cli(capsys, "demo", "--out", blocker / "demo", "--tiny")
    assert_one_line_error(rc, err, "cannot write", status=1)
    rc, _, err = run_cli(capsys, "eval", "--distilled", tmp_path, "--test", photo_folder, *TINY,
                         "--out", blocker / "r.json")
    assert_one_line_error(rc, err, "cannot write", status=1)


@pytest.mark.parametrize("argv, needle", [
    (["stats", "--backbone", "x"], "--data is required"),
    (["stats", "--data", "d", "--backbone", "x", "--crop", "abc"], "invalid int value"),
    (["distill", "--backbone", "x", "--out-dir", "o"], "exactly one of --stats"),
    (["eval", "--backbone", "x", "--test", "t"], "exactly one of --distilled"),
    (["eval", "--baseline", "random-real", "--backbone", "x", "--test", "t"], "--train-data is required"),
    (["eval", "--baseline", "nope", "--backbone", "x", "--test", "t"], "invalid choice"),
    (["demo"], "--out is required"),
    (["demo", "--out", "o", "--quick", "--tiny"], "not allowed with"),
    (["frobnicate"], "invalid choice"),
])
def test_usage_errors_are_one_line(capsys, argv, needle):
    rc, _, err = run_cli(capsys, *argv)
    assert_one_line_error(rc, err, needle, status=2)


def test_bad_config_files(capsys, tmp_path):
    rc, _, err = run_cli(capsys, "stats", "--config", tmp_path / "none.yaml")
    assert_one_line_error(rc, err, "none.yaml", status=1)
    bad_key = tmp_path / "bad.yaml"
    bad_key.write_text("dat: x\n")
    rc, _, err = run_cli(capsys, "stats", "--config", bad_key)
    assert_one_line_error(rc, err, "unknown option 'dat'", status=2)
    bad_value = tmp_path / "bad.json"
    bad_value.write_text('{"crop": "big"}')
    rc, _, err = run_cli(capsys, "stats", "--config", bad_value)
    assert_one_line_error(rc, err, "'crop' must be int", status=2)
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    rc, _, err = run_cli(capsys, "stats", "--config", broken)
    assert_one_line_error(rc, err, "broken.json", status=1)
    not_mapping = tmp_path / "list.yaml"
    not_mapping.write_text("- a\n- b\n")
    rc, _, err = run_cli(capsys, "stats", "--config", not_mapping)
    assert_one_line_error(rc, err, "mapping", status=1)


def test_debug_shows_the_traceback(tmp_path):
    with pytest.raises(FileNotFoundError, match="no-such-folder"):
        main(["stats", "--data", str(tmp_path / "no-such-folder"), *TINY, "--out", str(tmp_path / "s.safetensors"),
              "--debug"])
    with pytest.raises(FileNotFoundError):
        main(["--debug", "stats", "--data", str(tmp_path / "no-such-folder"), *TINY,
              "--out", str(tmp_path / "s.safetensors")])


def test_open_data_kinds(photo_folder, tmp_path):
    from sfmkern.cli import UsageError, open_data

    assert len(open_data(str(photo_folder))) == 10
    assert len(open_data("fashion-mnist:test")) == 10000
    with pytest.raises(UsageError, match="split"):
        open_data("fashion-mnist:validation")
    f = tmp_path / "x.txt"
    f.write_text("x")
    with pytest.raises(UsageError, match="not a .tar"):
        open_data(str(f))
    with pytest.raises(FileNotFoundError, match="matches no file"):
        open_data(str(tmp_path / "*.tar"))
    assert Path(photo_folder).is_dir()
