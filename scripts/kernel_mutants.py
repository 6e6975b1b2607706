#!/usr/bin/env python3
"""Mutation harness for the Triton kernels and their launchers: does the CPU test suite kill plausible bugs?

Each mutant is one single-line edit (masks, partial indices, per-block accumulation, strides, dtype casts, launcher
mistakes; the first two are the bugs planted in issue 12). For each, the repository's kernels/, sfmkern/ and tests/ are
copied to a temporary directory (the working tree is never modified: an interrupted run, Ctrl-C included, leaves it
as it was and removes the copy), the edit is applied there, and the kernel tests run under TRITON_INTERPRET=1 with -x
(the cheapest, most sensitive tests first, so a killed mutant stops early). A mutant is killed when the tests fail.

    python scripts/kernel_mutants.py              # all mutants; prints each verdict and the kill rate
    python scripts/kernel_mutants.py -k planted   # mutants whose name contains "planted"
    python scripts/kernel_mutants.py --list
    python scripts/kernel_mutants.py -j 4         # four mutants at a time (one temporary copy each)

Exit status 1 when a mutant survives or the unmutated tests fail.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import queue
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

SMALL = "tests/test_kernels_grid.py::test_small_multiblock"
GRID = "tests/test_kernels_grid.py"
STRIDES = "tests/test_kernels_strides.py"
ANCHOR = "tests/test_kernels_anchor.py"
DEFAULT_TESTS = (SMALL, STRIDES, ANCHOR, GRID)


@dataclass(frozen=True)
class Mutant:
    name: str
    path: str  # relative to the repository root
    find: str  # must occur exactly once in the file
    replace: str
    tests: tuple[str, ...] = DEFAULT_TESTS


MUTANTS = [
    # ---- kernels/class_sums.py
    Mutant("planted: counts added once per column block", "kernels/class_sums.py",
           "    if pid_d == 0:  # each row is counted once", "    if pid_d >= 0:  # each row is counted once"),
    Mutant("atomic: column mask dropped", "kernels/class_sums.py",
           "    mask = valid[:, None] & col_ok[None, :]\n    x = tl.load(X_ptr",
           "    mask = valid[:, None] & (cols < n_cols + 1)[None, :]\n    x = tl.load(X_ptr"),
    Mutant("atomic: labels read as contiguous", "kernels/class_sums.py",
           "tl.load(Y_ptr + rows * stride_y, mask=row_ok, other=-1)", "tl.load(Y_ptr + rows, mask=row_ok, other=-1)"),
    Mutant("atomic: feature row stride taken as D", "kernels/class_sums.py",
           "x = tl.load(X_ptr + rows[:, None] * stride_x_row + cols[None, :], mask=mask, other=0.0)",
           "x = tl.load(X_ptr + rows[:, None] * n_cols + cols[None, :], mask=mask, other=0.0)"),
    Mutant("atomic: shift (centring) dropped", "kernels/class_sums.py",
           "        x = x - tl.load(SH_ptr + cols, mask=col_ok, other=0.0)[None, :]", "        x = x"),
    Mutant("atomic: last column block not launched", "kernels/class_sums.py",
           "        grid = (triton.cdiv(n_rows, block_n), triton.cdiv(n_cols, block_d))\n        _class_sums_atomic",
           "        grid = (triton.cdiv(n_rows, block_n), max(n_cols // block_d, 1))\n        _class_sums_atomic"),
    Mutant("segmented: off-by-one segment end", "kernels/class_sums.py",
           "        row_ok = j < sizes", "        row_ok = j <= sizes"),
    Mutant("segmented: one row per class only (loop bound)", "kernels/class_sums.py",
           "        j += 1", "        j += longest"),
    Mutant("segmented: feature row stride taken as D", "kernels/class_sums.py",
           "x = tl.load(X_ptr + rows[:, None] * stride_x_row + cols[None, :], mask=ok, other=0.0)",
           "x = tl.load(X_ptr + rows[:, None] * n_cols + cols[None, :], mask=ok, other=0.0)"),
    Mutant("segmented: sums stored with the feature row stride", "kernels/class_sums.py",
           "tl.store(S_ptr + classes.to(tl.int64)[:, None] * n_cols + cols[None, :], acc, mask=mask)",
           "tl.store(S_ptr + classes.to(tl.int64)[:, None] * stride_x_row + cols[None, :], acc, mask=mask)"),
    Mutant("segmented: class mask dropped at the store", "kernels/class_sums.py",
           "    mask = cls_ok[:, None] & col_ok[None, :]\n    tl.store(S_ptr",
           "    mask = (classes <= num_classes)[:, None] & col_ok[None, :]\n    tl.store(S_ptr"),
    Mutant("launcher: column-strided features not copied", "kernels/class_sums.py",
           "    if features.stride(1) != 1 and features.shape[1] > 1:", "    if False:"),
    Mutant("launcher: segment offsets from unsorted labels", "kernels/class_sums.py",
           "        ordered, perm = torch.sort(labels, stable=True)",
           "        ordered, perm = labels.contiguous(), torch.sort(labels, stable=True)[1]"),
    # ---- kernels/sfm_loss.py
    Mutant("planted: loss norms read from the first partial only", "kernels/sfm_loss.py",
           "    ok = parts < num_parts\n    peaks", "    ok = parts < 1\n    peaks"),
    Mutant("stats: column mask off by one", "kernels/sfm_loss.py",
           "    pid = tl.program_id(0)\n    acc_ty = FT_ptr.dtype.element_ty\n    cols = pid * BLOCK_D + tl.arange(0, "
           "BLOCK_D)\n    col_ok = cols < n_cols",
           "    pid = tl.program_id(0)\n    acc_ty = FT_ptr.dtype.element_ty\n    cols = pid * BLOCK_D + tl.arange(0, "
           "BLOCK_D)\n    col_ok = cols <= n_cols"),
    Mutant("stats: <F, F~> kept from the last class block only", "kernels/sfm_loss.py",
           "        dot += tl.sum(real_s * syn_s, axis=0)", "        dot = tl.sum(real_s * syn_s, axis=0)"),
    Mutant("stats: class sum of means per block", "kernels/sfm_loss.py",
           "        mean_sum += tl.sum(centred, axis=0)", "        mean_sum = tl.sum(centred, axis=0)"),
    Mutant("stats: wrong peak stored for F", "kernels/sfm_loss.py",
           "    tl.store(row + 3, mr)", "    tl.store(row + 3, ms)"),
    Mutant("stats: synthetic flow divided by C", "kernels/sfm_loss.py",
           "num_classes * (mean - ref[None, :])) / (num_classes - 1), 0.0)",
           "num_classes * (mean - ref[None, :])) / num_classes, 0.0)"),
    Mutant("stats: column mean of F over C - 1", "kernels/sfm_loss.py",
           "    tl.store(FBAR_ptr + cols, flow_sum / num_classes, mask=col_ok)",
           "    tl.store(FBAR_ptr + cols, flow_sum / (num_classes - 1), mask=col_ok)"),
    Mutant("stats: anchor spread around A_0, not its mean", "kernels/sfm_loss.py",
           "(a - a_ref[None, :]) - anchor_mean[None, :], 0.0)", "(a - a_ref[None, :]), 0.0)"),
    Mutant("norms: cross-program dot not rescaled", "kernels/sfm_loss.py",
           "    dot = tl.sum(part_dot * (part_mr / mr) * (part_ms / ms), axis=0)",
           "    dot = tl.sum(part_dot, axis=0)"),
    Mutant("grad: loss partial index collides across column blocks", "kernels/sfm_loss.py",
           "tl.store(LP_ptr + pid_c * tl.num_programs(1) + pid_d,", "tl.store(LP_ptr + pid_c + pid_d,"),
    Mutant("grad: class mask off by one", "kernels/sfm_loss.py",
           "    cls_ok = cls < num_classes\n    mask = cls_ok[:, None] & col_ok[None, :]\n    offs = cls.to(tl.int64)"
           "[:, None] * n_cols + cols[None, :]\n    real = tl.load(F_ptr + offs, mask=mask, other=0.0).to(acc_ty)\n"
           "    syn = tl.load(FT_ptr",
           "    cls_ok = cls <= num_classes\n    mask = cls_ok[:, None] & col_ok[None, :]\n    offs = cls.to(tl.int64)"
           "[:, None] * n_cols + cols[None, :]\n    real = tl.load(F_ptr + offs, mask=mask, other=0.0).to(acc_ty)\n"
           "    syn = tl.load(FT_ptr"),
    Mutant("grad: column mean of F dropped", "kernels/sfm_loss.py",
           "((unit_real - unit_mean[None, :]) - tl.load(SC_ptr + 4) * unit_syn)",
           "(unit_real - tl.load(SC_ptr + 4) * unit_syn)"),
    Mutant("grad: anchor gradient scaled once by the peak", "kernels/sfm_loss.py",
           "grad += tl.load(SC_ptr + 6) * (((mean - a) * inv_ma) * inv_ma)",
           "grad += tl.load(SC_ptr + 6) * ((mean - a) * inv_ma)"),
    Mutant("finalize: loop skips every other block of loss parts", "kernels/sfm_loss.py",
           "        first += BLOCK_L\n", "        first += 2 * BLOCK_L\n"),
    Mutant("gather: labels read as contiguous", "kernels/sfm_loss.py",
           "    labels = tl.load(Y_ptr + rows * stride_y, mask=row_ok, other=0)",
           "    labels = tl.load(Y_ptr + rows, mask=row_ok, other=0)"),
    Mutant("gather: G cast to the output dtype before the division", "kernels/sfm_loss.py",
           "    grad = tl.load(G_ptr + labels[:, None] * n_cols + cols[None, :], mask=valid[:, None] & col_ok[None, :],"
           " other=0.0)",
           "    grad = tl.load(G_ptr + labels[:, None] * n_cols + cols[None, :], mask=valid[:, None] & col_ok[None, :],"
           " other=0.0).to(OUT_ptr.dtype.element_ty)"),
    Mutant("gather: grad_output scale ignored", "kernels/sfm_loss.py",
           "        grad = grad * tl.load(SCALE_ptr).to(grad.dtype)", "        grad = grad"),
    Mutant("launcher: strided counts not made contiguous (loss)", "kernels/sfm_loss.py",
           "    counts = counts.contiguous()\n    acc = sums.dtype", "    acc = sums.dtype"),
    Mutant("launcher: strided counts not made contiguous (gather)", "kernels/sfm_loss.py",
           "    counts = counts.contiguous() if counts is not None else None\n", ""),
    Mutant("launcher: anchor weight passed as zero", "kernels/sfm_loss.py",
           "    weight = torch.full((), float(anchor_weight) if has_anchor else 0.0,",
           "    weight = torch.full((), 0.0,"),
]


def _copy_tree(dest: Path) -> None:
    for name in ("kernels", "sfmkern", "tests"):
        shutil.copytree(ROOT / name, dest / name, symlinks=True,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc", ".pytest_cache"))
    for name in ("pyproject.toml",):
        if (ROOT / name).exists():
            shutil.copy2(ROOT / name, dest / name)
    link = dest / "sfmkern" / "kernels"
    if not link.exists():  # the package reaches the kernels through sfmkern/kernels -> ../kernels
        link.symlink_to("../kernels")


def _run_tests(workdir: Path, tests: tuple[str, ...], timeout: float) -> tuple[str, float, str]:
    env = dict(os.environ, PYTHONPATH=str(workdir), TRITON_INTERPRET="1", HF_HUB_OFFLINE="1",
               OMP_WAIT_POLICY="PASSIVE", PYTHONDONTWRITEBYTECODE="1")
    env.pop("SFMKERN_BACKEND", None)
    env.pop("SFMKERN_GPU_LAUNCH", None)
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-o", "addopts=", *tests]
    start = time.monotonic()
    try:
        proc = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return "timeout", time.monotonic() - start, ""
    elapsed = time.monotonic() - start
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(("FAILED", "ERROR"))]
    return ("pass" if proc.returncode == 0 else "fail"), elapsed, (lines[0] if lines else proc.stdout[-300:])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-k", default="", help="only mutants whose name contains this text")
    parser.add_argument("--list", action="store_true", help="list the mutants and exit")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per mutant (a hang counts as killed)")
    parser.add_argument("--no-baseline", action="store_true", help="skip the unmutated run")
    parser.add_argument("-j", "--jobs", type=int, default=1, help="mutants tested in parallel (one copy each)")
    args = parser.parse_args(argv)
    mutants = [m for m in MUTANTS if args.k in m.name]
    if args.list:
        for m in mutants:
            print(f"{m.path}: {m.name}")
        return 0
    for m in mutants:  # every edit must apply to the current sources exactly once
        count = (ROOT / m.path).read_text().count(m.find)
        if count != 1:
            print(f"mutant {m.name!r}: its line occurs {count} times in {m.path}; update the harness")
            return 2
    tmp = Path(tempfile.mkdtemp(prefix="sfmkern-mutants-"))
    try:
        workers = max(1, args.jobs)
        copies = [tmp / f"copy{i}" for i in range(workers)]
        for copy in copies:
            _copy_tree(copy)
        if not args.no_baseline:
            verdict, elapsed, detail = _run_tests(copies[0], DEFAULT_TESTS, args.timeout)
            print(f"baseline (unmutated): {verdict} in {elapsed:.0f} s", flush=True)
            if verdict != "pass":
                print(detail)
                return 1
        free = queue.Queue()
        for copy in copies:
            free.put(copy)

        def run_one(m: Mutant):
            copy = free.get()
            target = copy / m.path
            original = target.read_text()
            try:
                target.write_text(original.replace(m.find, m.replace, 1))
                return _run_tests(copy, m.tests, args.timeout)
            finally:
                target.write_text(original)
                free.put(copy)

        survivors, killed = [], 0
        with concurrent.futures.ThreadPoolExecutor(workers) as pool:
            results = zip(mutants, pool.map(run_one, mutants), strict=True)
            for i, (m, (verdict, elapsed, detail)) in enumerate(results, 1):
                dead = verdict != "pass"
                killed += dead
                if not dead:
                    survivors.append(m)
                state = {"fail": "killed", "timeout": "killed (timeout)", "pass": "SURVIVED"}[verdict]
                print(f"[{i:2d}/{len(mutants)}] {state:16s} {elapsed:6.1f} s  {m.path}: {m.name}"
                      + (f"\n       by {detail}" if dead and detail else ""), flush=True)
        rate = 100.0 * killed / max(len(mutants), 1)
        print(f"kill rate: {killed}/{len(mutants)} = {rate:.1f}%")
        for m in survivors:
            print(f"  survivor: {m.path}: {m.name}")
        return 0 if not survivors else 1
    except KeyboardInterrupt:
        print("interrupted: the working tree was never modified; removing the copies")
        return 130
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
