"""Nothing silently wrong (issue 16): full disks, stale artefacts, concurrent writers, hostile folders, the decoder
binding's error paths, and what users see (skipped files, config values, hyper-parameters, stray temporary files).

Each test names the case of the issue it reproduces. Disk-full cases: the feature cache used to be a sparse memmap,
so a full disk surfaced as SIGBUS on some later write; it is now preallocated (posix_fallocate) after a free-space
check, so the only places a full disk can show are those two calls. The portable tests make exactly those calls
fail (ENOSPC) and check the one-line error and the intact checkpoint; `test_full_tmpfs_*` runs the real thing on a
1 MiB tmpfs where the test may mount one (root), and is skipped elsewhere.
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from sfmkern.backbone import load_backbone
from sfmkern.data import ArraySource, ImageFolder, stream
from sfmkern.stats import ClassStats, collect_stats, data_fingerprint

RESIZE, CROP = 40, 32
TINY = ["--backbone", "test_efficientnet", "--no-pretrained", "--device", "cpu"]
SIZE = ["--resize", "40", "--crop", "32"]
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def backbone():
    torch.manual_seed(0)
    return load_backbone("test_efficientnet", pretrained=False, device="cpu")


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    return env


def run_cli(capsys, *argv):
    from sfmkern.cli import main

    try:
        rc = main([str(a) for a in argv])
    except SystemExit as exc:
        rc = exc.code if isinstance(exc.code, int) else 1
    out, err = capsys.readouterr()
    return rc, out, err


def _copy_folder(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


class _FailingForward:
    """Wraps backbone.features_uint8: raises after `after` calls (a run that dies mid-pass), counts calls."""

    def __init__(self, backbone, after=None):
        self.backbone, self.after, self.calls = backbone, after, 0
        self.forward = backbone.features_uint8

    def __enter__(self):
        def forward(x):
            self.calls += 1
            if self.after is not None and self.calls > self.after:
                raise KeyboardInterrupt("killed mid-pass")
            return self.forward(x)

        self.backbone.features_uint8 = forward
        return self

    def __exit__(self, *exc):
        self.backbone.features_uint8 = self.forward


# ============================================================================ case 2: a full disk during the cache
def test_case2_full_disk_on_resume_is_one_line_error_and_keeps_checkpoint(photo_folder, backbone, tmp_path,
                                                                         monkeypatch):
    out = tmp_path / "s.safetensors"
    kw = dict(resize=RESIZE, crop=CROP, batch_size=2, out=out, cache_features=True, checkpoint_every=1, workers=1,
              progress=False)
    with _FailingForward(backbone, after=2), pytest.raises(KeyboardInterrupt):
        collect_stats(photo_folder, backbone, **kw)
    ckpt = out.with_name(out.name + ".partial-0of1")
    before = ckpt.read_bytes()

    def no_space(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", no_space)
    with pytest.raises(OSError) as info:
        collect_stats(photo_folder, backbone, **kw)
    message = str(info.value)
    assert info.value.errno == errno.ENOSPC
    assert "s.features.npy" in message and "No space left" in message and "\n" not in message
    assert ckpt.read_bytes() == before  # the last checkpoint is intact
    monkeypatch.undo()
    stats = collect_stats(photo_folder, backbone, **kw)  # space again: resumes from it
    assert stats.run_info["resumed_from"] == 4 and int(stats.counts.sum()) == 10


def test_case2_not_enough_space_for_the_cache_fails_before_the_pass(photo_folder, backbone, tmp_path, monkeypatch):
    real = os.statvfs

    def tiny(path):
        st = real(path)
        return os.statvfs_result((st.f_bsize, st.f_frsize, st.f_blocks, 1, 1, st.f_files, st.f_ffree, st.f_favail,
                                  st.f_flag, st.f_namemax))

    monkeypatch.setattr(os, "statvfs", tiny)
    out = tmp_path / "s.safetensors"
    with _FailingForward(backbone) as fwd, pytest.raises(OSError) as info:
        collect_stats(photo_folder, backbone, resize=RESIZE, crop=CROP, out=out, cache_features=True, workers=1,
                      progress=False)
    assert info.value.errno == errno.ENOSPC and "s.features.npy" in str(info.value)
    assert fwd.calls == 0  # refused before any forward


_FILL_CHILD = textwrap.dedent(
    """
    import sys, numpy as np, torch
    from sfmkern.backbone import load_backbone
    from sfmkern.data import ArraySource
    from sfmkern.stats import collect_stats
    torch.set_num_threads(1)
    bb = load_backbone("test_efficientnet", pretrained=False, device="cpu")
    n = 3000  # fp16 features: n * feature_dim * 2 bytes, more than the 1 MiB file system holds
    images = np.random.default_rng(0).integers(0, 256, (n, 8, 8, 3), dtype=np.uint8)
    src = ArraySource(images, np.arange(n) % 2)
    try:
        collect_stats(src, bb, resize=8, crop=8, batch_size=500, out=sys.argv[1], cache_features=True,
                      checkpoint_every=1, workers=1, progress=False)
    except OSError as exc:
        print(f"error: {exc}")
        sys.exit(1)
    print("finished")
    """
)


def test_case2_full_tmpfs_no_sigbus(tmp_path, backbone):
    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("mounting a small tmpfs needs root")
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        assert backbone.feature_dim * 3000 * 2 > 2**20
        res = subprocess.run([sys.executable, "-c", _FILL_CHILD, str(mnt / "s.safetensors")], capture_output=True,
                             text=True, env=_env(), timeout=600)
        assert res.returncode == 1, (res.returncode, res.stderr[-2000:])  # -7 was SIGBUS
        line = res.stdout.strip().splitlines()[-1]
        assert "s.features.npy" in line and "disk space" in line
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


# ============================================================================ case 3: stale artefacts
def test_case3_eval_inherit_refits_a_head_of_other_statistics_or_settings(capsys, photo_folder, tmp_path):
    from sfmkern.distillation import DistilledSet
    from sfmkern.evaluation import LinearHead, head_path_for

    stats_file = tmp_path / "stats.safetensors"
    common_stats = ["--data", photo_folder, *TINY, *SIZE, "--out", stats_file, "--cache-features", "--quiet"]
    assert run_cli(capsys, "stats", *common_stats)[0] == 0
    stats = ClassStats.load(stats_file)
    images = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    DistilledSet(images, torch.arange(3), stats.classes, {}, stats.fingerprint).save(tmp_path / "d.safetensors")
    evaluate = ["eval", "--distilled", tmp_path / "d.safetensors", "--test", photo_folder, *TINY, *SIZE, "--stats",
                stats_file, "--mode", "inherit", "--runs", "1", "--head-epochs", "2"]
    head_file = head_path_for(stats_file)
    rc, _, err = run_cli(capsys, *evaluate)
    assert rc == 0, err
    first = LinearHead.load(head_file)
    assert first.stats_fingerprint == stats.fingerprint and first.config["epochs"] == 2

    rc, _, err = run_cli(capsys, *evaluate)  # same statistics and settings: reused, and said
    assert rc == 0 and "reusing the full-data head" in err
    rc, _, err = run_cli(capsys, *evaluate[:-1], "3")  # other --head-epochs: refitted
    assert rc == 0 and "refitting the full-data head" in err and "epochs=2 was used" in err
    assert LinearHead.load(head_file).config["epochs"] == 3
    rc, _, err = run_cli(capsys, *evaluate[:-1], "3", "--seed", "5")  # other --seed: refitted
    assert rc == 0 and "seed=0 was used" in err

    # statistics re-collected on a class-permuted folder (same names, other images per class)
    permuted = tmp_path / "permuted"
    names = sorted(p.name for p in photo_folder.iterdir())
    for a, b in zip(names, names[1:] + names[:1], strict=True):
        shutil.copytree(photo_folder / a, permuted / b)
    assert run_cli(capsys, "stats", *[permuted if a == photo_folder else a for a in common_stats])[0] == 0
    new_stats = ClassStats.load(stats_file)
    assert new_stats.fingerprint != stats.fingerprint
    stale = tmp_path / "stale.head.safetensors"
    shutil.copy(head_file, stale)  # the head of the old statistics, kept under another name
    rc, _, err = run_cli(capsys, *evaluate[:-1], "3", "--seed", "5")
    assert rc == 0 and "fitted on other statistics" in err
    assert LinearHead.load(head_file).stats_fingerprint == new_stats.fingerprint
    # an explicit --head of the old statistics is refused, in one line naming the file, never scored
    rc, out, err = run_cli(capsys, *evaluate[:-1], "3", "--seed", "5", "--head", stale)
    assert rc == 1 and not out, (rc, out, err)
    assert str(stale) in err and "fitted on statistics" in err and len(err.strip().splitlines()) == 1, err


def test_case3_distill_refuses_a_checkpoint_past_steps_and_says_reuse(backbone, capsys, tmp_path):
    from sfmkern.distillation import DistilledSet
    from sfmkern.pipeline import distill

    torch.manual_seed(0)
    flow_stats = ClassStats(torch.randn(3, backbone.feature_dim), torch.tensor([4, 4, 4]), ["a", "b", "c"],
                            {"a": 0, "b": 1, "c": 2}, backbone.name, backbone.fingerprint, {}, "test")
    kw = dict(ipc=1, syn_res=16, crop=16, grow_every=0, out_dir=tmp_path / "run", checkpoint_every=1, log_every=1)
    three = distill(flow_stats, backbone, steps=3, progress=False, **kw)
    with pytest.raises(ValueError, match=r"step 3, past steps=1") as info:
        distill(flow_stats, backbone, steps=1, progress=False, **kw)
    assert "\n" not in str(info.value)
    capsys.readouterr()
    again = distill(flow_stats, backbone, steps=3, progress=True, **kw)  # finished: reused, and said in one line
    err = [ln for ln in capsys.readouterr().err.splitlines() if "reusing the finished run" in ln]
    assert len(err) == 1 and "3 steps" in err[0]
    assert torch.equal(again.images, three.images)
    one = distill(flow_stats, backbone, steps=1, progress=False, resume=False, **kw)  # explicit restart works
    assert one.config["steps_done"] == 1
    assert DistilledSet.load(tmp_path / "run" / "distilled.safetensors").config["steps_done"] == 1


def test_case3_resume_after_the_feature_cache_was_deleted_recomputes(photo_folder, backbone, tmp_path, capsys):
    out = tmp_path / "s.safetensors"
    kw = dict(resize=RESIZE, crop=CROP, batch_size=2, out=out, cache_features=True, checkpoint_every=1, workers=1)
    reference = collect_stats(photo_folder, backbone, **{**kw, "out": tmp_path / "ref.safetensors"}, progress=False)
    with _FailingForward(backbone, after=3), pytest.raises(KeyboardInterrupt):
        collect_stats(photo_folder, backbone, progress=False, **kw)
    for p in (tmp_path / "s.features.npy", tmp_path / "s.labels.npy"):
        p.unlink()
    capsys.readouterr()
    stats = collect_stats(photo_folder, backbone, progress=True, **kw)
    assert "feature cache" in capsys.readouterr().err
    feats, labels = stats.load_features()
    ref_feats, ref_labels = reference.load_features()
    assert (labels >= 0).all() and stats.skipped == []
    np.testing.assert_array_equal(labels, ref_labels)
    np.testing.assert_array_equal(np.asarray(feats), np.asarray(ref_feats))
    torch.testing.assert_close(stats.centres, reference.centres, rtol=0, atol=0)


# ============================================================================ case 4: concurrent writers
def test_case4_second_writer_of_the_same_out_gets_one_line_error(photo_folder, backbone, tmp_path, capsys):
    from sfmkern.cli import main

    out = tmp_path / "s.safetensors"
    entered, release = threading.Event(), threading.Event()
    forward = backbone.features_uint8
    result = {}

    def blocking(x):
        entered.set()
        release.wait(timeout=120)
        return forward(x)

    def first():
        result["stats"] = collect_stats(photo_folder, backbone, resize=RESIZE, crop=CROP, out=out, workers=1,
                                        progress=False)

    backbone.features_uint8 = blocking
    thread = threading.Thread(target=first)
    thread.start()
    try:
        assert entered.wait(timeout=120)
        backbone.features_uint8 = forward  # the second writer's own forward would run freely
        with pytest.raises(RuntimeError, match="being written by another process") as info:  # OutputBusyError
            collect_stats(photo_folder, backbone, resize=RESIZE, crop=CROP, out=out, workers=1, progress=False)
        assert "s.safetensors" in str(info.value) and "\n" not in str(info.value)
        rc = main(["stats", "--data", str(photo_folder), *TINY, *SIZE, "--out", str(out), "--quiet"])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 1 and len(err) == 1 and "being written by another process" in err[0]
    finally:
        release.set()
        thread.join()
        backbone.features_uint8 = forward
    assert int(result["stats"].counts.sum()) == 10  # the first writer was not disturbed


def test_case4_second_distill_into_the_same_folder_gets_one_line_error(backbone, tmp_path):
    import fcntl

    from sfmkern.pipeline import distill

    flow = torch.randn(3, backbone.feature_dim)
    run = tmp_path / "run"
    run.mkdir()
    fd = os.open(run / ".lock", os.O_RDWR | os.O_CREAT)  # another run holds the folder's lock
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(RuntimeError, match="being written by another process"):
            distill(flow, backbone, steps=1, syn_res=16, crop=16, grow_every=0, out_dir=run, progress=False)
    finally:
        os.close(fd)
    assert not (run / "distilled.safetensors").exists()


# ============================================================================ case 5: hostile folders
def _jpeg(photo_folder: Path) -> bytes:
    return (photo_folder / "objects" / "rocket.jpg").read_bytes()


def test_case5_non_utf8_file_name_is_listed_fingerprinted_decoded_and_named(photo_folder, backbone, tmp_path):
    root = _copy_folder(photo_folder, tmp_path / "data")
    bad_name = os.fsencode(str(root / "objects")) + b"/\xff\xfe.jpg"
    with open(bad_name, "wb") as fh:
        fh.write(_jpeg(photo_folder))
    broken = os.fsencode(str(root / "objects")) + b"/\xfa-broken.jpg"
    with open(broken, "wb") as fh:
        fh.write(b"\xff\xd8\xff not a jpeg")
    src = ImageFolder(root)
    names = [src.name(i) for i in range(len(src))]
    assert "objects/\\xff\\xfe.jpg" in names and "objects/\\xfa-broken.jpg" in names
    for name in names:
        name.encode("utf-8")  # printable everywhere
    assert len(data_fingerprint(src)) == 64
    it = stream(src, batch_size=4, resize=RESIZE, crop=CROP, workers=1)
    got = sum(len(b.indices) for b in it)
    assert got == len(src) - 1
    assert [(n, r) for _, n, r in it.report.skipped if "broken" in n][0][0] == "objects/\\xfa-broken.jpg"
    stats = collect_stats(src, backbone, resize=RESIZE, crop=CROP, workers=1, progress=False)
    assert int(stats.counts.sum()) == len(src) - 1 and stats.skipped[0][1] == "objects/\\xfa-broken.jpg"


def test_case5_dangling_symlink_and_special_files_are_skipped_with_a_reason(photo_folder, tmp_path):
    root = _copy_folder(photo_folder, tmp_path / "data")
    (root / "animals" / "gone.jpg").symlink_to(tmp_path / "nowhere.jpg")
    os.mkfifo(root / "animals" / "pipe.jpg")
    src = ImageFolder(root)
    problems = dict(getattr(src, "problems", []))
    assert "dangling symlink" in problems.get("animals/gone.jpg", "")
    assert "FIFO" in problems.get("animals/pipe.jpg", "")
    assert len(src) == 10 and len(data_fingerprint(src)) == 64


_FIFO_CHILD = textwrap.dedent(
    """
    import sys
    from sfmkern.data import ImageFolder, stream
    from sfmkern.data._ext import make_decoder
    import numpy as np
    src = ImageFolder(sys.argv[1])
    it = stream(src, batch_size=4, resize=40, crop=32, workers=1)
    print("yielded", sum(len(b.indices) for b in it))
    out = np.zeros((1, 32, 32, 3), np.uint8)
    print("reason", make_decoder(1).decode_batch([sys.argv[2]], out, 40, 32)[0])
    """
)


def test_case5_fifo_named_jpg_does_not_hang_the_pass(photo_folder, tmp_path):
    root = _copy_folder(photo_folder, tmp_path / "data")
    os.mkfifo(root / "textures" / "pipe.jpg")
    try:
        res = subprocess.run([sys.executable, "-c", _FIFO_CHILD, str(root), str(root / "textures" / "pipe.jpg")],
                             capture_output=True, text=True, env=_env(), timeout=400)  # a loaded CI machine
    except subprocess.TimeoutExpired:
        pytest.fail("the pass hangs on a FIFO named .jpg")
    assert res.returncode == 0, res.stderr
    assert "yielded 10" in res.stdout
    assert "not a regular file" in res.stdout  # the decoder itself refuses it without blocking


def test_case5_symlink_loop_is_reported_not_followed(photo_folder, tmp_path):
    root = _copy_folder(photo_folder, tmp_path / "data")
    (root / "animals" / "loop").symlink_to(root)
    (root / "objects" / "self").symlink_to(root / "objects")
    src = ImageFolder(root)
    assert src.classes == ["animals", "objects", "textures"]
    np.testing.assert_array_equal(np.bincount(src.labels), [3, 3, 4])
    problems = dict(getattr(src, "problems", []))
    assert "symlink loop" in problems.get("animals/loop", "") and "symlink loop" in problems.get("objects/self", "")


def test_case5_unreadable_folder_is_reported(photo_folder, tmp_path, monkeypatch):
    root = _copy_folder(photo_folder, tmp_path / "data")
    (root / "animals" / "more").mkdir()
    (root / "animals" / "more" / "x.jpg").write_bytes(_jpeg(photo_folder))
    real = os.scandir
    denied = str(root / "animals" / "more")

    def scandir(path="."):
        if os.fspath(path) == denied:  # root ignores permission bits, so the denial is simulated
            raise PermissionError(errno.EACCES, "Permission denied", denied)
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)
    src = ImageFolder(root)
    assert dict(getattr(src, "problems", [])).get("animals/more") == "cannot read folder: Permission denied"
    assert len(src) == 10


def test_case5_empty_class_fails_before_decoding_anything(photo_folder, backbone, tmp_path):
    root = _copy_folder(photo_folder, tmp_path / "data")
    (root / "zebra").mkdir()
    (root / "zebra" / "notes.txt").write_text("no images here")
    with _FailingForward(backbone) as fwd, pytest.raises(ValueError, match="image in class 'zebra'"):
        collect_stats(root, backbone, resize=RESIZE, crop=CROP, workers=1, progress=False)
    assert fwd.calls == 0  # said before decoding or forwarding anything


# ============================================================================ case 6: the decoder binding
def test_case6_exception_in_the_pool_is_an_internal_error_reason():
    from sfmkern import _decode

    reasons = _decode._pool_throw_test(2, 16, 5, "runtime")
    assert reasons[5] == "internal error: boom at item 5"
    assert all(r == "" for i, r in enumerate(reasons) if i != 5)
    assert _decode._pool_throw_test(2, 4, 0, "other")[0].startswith("internal error")
    assert _decode._pool_throw_test(1, 4, 3, "bad_alloc")[3] == "out of memory"


class _LazyItems:
    """A sequence that makes a fresh bytes object on every access (nothing else references it)."""

    def __init__(self, blobs):
        self.blobs = blobs

    def __len__(self):
        return len(self.blobs)

    def __getitem__(self, i):
        if not 0 <= i < len(self.blobs):
            raise IndexError(i)
        return bytes(bytearray(self.blobs[i]))


def test_case6_lazy_sequence_items_stay_alive_while_decoding():
    from decode_corpus import encode_png

    from sfmkern.data._ext import make_decoder

    rng = np.random.default_rng(0)
    pictures = [rng.integers(0, 256, (48, 48, 3), dtype=np.uint8) for _ in range(6)]
    blobs = [encode_png(p, 2, level=0) for p in pictures]
    assert len({len(b) for b in blobs}) == 1  # equal sizes: a freed block is reused by the next item at once
    decoder = make_decoder(2)
    expected = np.zeros((6, 48, 48, 3), np.uint8)
    assert decoder.decode_batch(list(blobs), expected, 48, 48) == [""] * 6
    np.testing.assert_array_equal(expected, np.stack(pictures))
    got = np.zeros_like(expected)
    assert decoder.decode_batch(_LazyItems(blobs), got, 48, 48) == [""] * 6
    np.testing.assert_array_equal(got, expected)


def test_case6_scratch_shrinks_after_a_huge_image():
    from decode_corpus import encode_png

    from sfmkern import _decode

    big = encode_png(np.zeros((1024, 1024, 3), np.uint16), 2)  # 16-bit: 8 MiB of RGBA16 scratch
    out = np.zeros((1, 32, 32, 3), np.uint8)
    keeping = _decode.Decoder(1, max_scratch_bytes=1 << 40)
    assert keeping.decode_batch([big], out, 32, 32) == [""]
    assert keeping.scratch_bytes() >= 8 << 20
    trimming = _decode.Decoder(1, max_scratch_bytes=1 << 20)
    assert trimming.decode_batch([big], out, 32, 32) == [""]
    assert trimming.scratch_bytes() <= 10 << 20 and trimming.scratch_bytes() < keeping.scratch_bytes() // 4
    assert _decode.Decoder(1).max_scratch_bytes == 64 << 20


# ============================================================================ case 7: what users see
def test_case7_cli_prints_skipped_files_with_reasons_and_writes_the_list(capsys, photo_folder, tmp_path):
    from sfmkern.cli import skipped_list_path

    root = _copy_folder(photo_folder, tmp_path / "data")
    (root / "animals" / "broken.jpg").write_bytes(b"\xff\xd8\xff\x00 truncated")
    (root / "objects" / "gone.png").symlink_to(tmp_path / "nowhere.png")
    out = tmp_path / "s.safetensors"
    rc, stdout, err = run_cli(capsys, "stats", "--data", root, *TINY, *SIZE, "--out", out, "--quiet")
    assert rc == 0 and "(2 skipped)" in stdout
    listed = skipped_list_path(out)
    assert f"the full list is in {listed}" in err
    assert "animals/broken.jpg: jpeg" in err and "objects/gone.png: dangling symlink" in err
    rows = listed.read_text().splitlines()
    assert rows[0] == "index\tname\treason" and len(rows) == 3


def test_case7_config_stats_key_is_an_option_not_a_swallowed_section(capsys, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"stats: {tmp_path / 'missing.safetensors'}\nout-dir: {tmp_path / 'run'}\n"
                   "backbone: test_efficientnet\n")
    rc, _, err = run_cli(capsys, "distill", "--config", cfg)
    assert rc == 1 and "missing.safetensors" in err and "does not exist" in err


def test_case7_config_float_for_an_int_option_is_an_error(capsys, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"batch-size: 8.5\ndata: {tmp_path}\nbackbone: test_efficientnet\nout: {tmp_path / 's'}\n")
    rc, _, err = run_cli(capsys, "stats", "--config", cfg)
    assert rc == 2 and "'batch-size' must be an integer, got 8.5" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("field,value", [("noise_std", float("nan")), ("noise_mean", float("inf")),
                                         ("noise_p", float("nan")), ("lr", float("nan")),
                                         ("ratio", (0.75, float("inf")))])
def test_case7_nan_and_inf_hyper_parameters_are_rejected(field, value):
    from sfmkern.distillation import DistillConfig

    with pytest.raises(ValueError, match=field):
        DistillConfig(**{field: value})


def test_case7_syn_res_smaller_than_crop_is_rejected():
    from sfmkern.distillation import DistillConfig

    with pytest.raises(ValueError, match=r"crop \(224\) must be <= syn_res \(128\)"):
        DistillConfig(syn_res=128, crop=224)


_KILLED_WRITE_CHILD = textwrap.dedent(
    """
    import os, signal, sys
    import safetensors.torch
    import torch
    from sfmkern.backbone import load_backbone
    from sfmkern.stats import collect_stats

    real = safetensors.torch.save_file

    def dying_save(tensors, path, metadata=None):
        with open(path, "wb") as fh:
            fh.write(b"half a checkpoint")
        os.kill(os.getpid(), signal.SIGKILL)  # killed in the middle of the checkpoint write

    safetensors.torch.save_file = dying_save
    torch.set_num_threads(1)
    bb = load_backbone("test_efficientnet", pretrained=False, device="cpu")
    collect_stats(sys.argv[1], bb, resize=40, crop=32, batch_size=2, checkpoint_every=1, out=sys.argv[2],
                  workers=1, progress=False)
    """
)


def test_case7_stray_temporary_files_of_a_killed_write_are_cleaned(photo_folder, backbone, tmp_path):
    out = tmp_path / "s.safetensors"
    res = subprocess.run([sys.executable, "-c", _KILLED_WRITE_CHILD, str(photo_folder), str(out)],
                         capture_output=True, text=True, env=_env(), timeout=600)
    assert res.returncode == -signal.SIGKILL, res.stderr[-2000:]
    stray = [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert stray and all(n.startswith(".s.safetensors.partial-0of1.") for n in stray)
    stats = collect_stats(photo_folder, backbone, resize=RESIZE, crop=CROP, batch_size=2, out=out, workers=1,
                          progress=False)
    assert int(stats.counts.sum()) == 10
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []
    # a killed distillation checkpoint write: cleaned when the next run takes the folder
    from sfmkern.pipeline import distill

    run = tmp_path / "run"
    run.mkdir()
    (run / ".checkpoint.safetensors.abcd1234.tmp").write_bytes(b"half")
    (run / "unrelated.tmp").write_bytes(b"not ours")
    distill(torch.randn(3, backbone.feature_dim), backbone, steps=1, syn_res=16, crop=16, grow_every=0, out_dir=run,
            progress=False)
    assert sorted(p.name for p in run.iterdir() if p.name.endswith(".tmp")) == ["unrelated.tmp"]


def test_array_source_unaffected(backbone):
    """The checks above are about files: in-memory sources keep working as before."""
    images = np.random.default_rng(0).integers(0, 256, (6, 8, 8, 3), dtype=np.uint8)
    stats = collect_stats(ArraySource(images, [0, 1, 2, 0, 1, 2]), backbone, resize=8, crop=8, workers=1,
                          progress=False)
    assert stats.counts.tolist() == [2, 2, 2] and stats.skipped == []
