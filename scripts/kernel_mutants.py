#!/usr/bin/env python3
"""Mutation harness for the Triton kernels and their launchers: does the CPU test suite kill plausible bugs?

Each mutant is one single-line edit (masks, partial indices, per-block accumulation, strides, dtype casts, launcher
mistakes; the first two are the bugs planted in issue 12). For each, the repository's kernels/, sfmkern/ and tests/ are
copied to a temporary directory (the working tree is never modified: an interrupted run, Ctrl-C or SIGTERM, leaves it
as it was, stops the test processes and removes the copies), the edit is applied there, and the kernel tests run
under TRITON_INTERPRET=1 with -x, in the order of TEST_ORDER (the cheapest, most sensitive tests first, so that a
killed mutant stops within seconds). A mutant is killed when a test fails (or the run crashes or hangs). A mutant
marked `equivalent` (with its one-line reason: no input the API accepts can tell it apart) is listed, not run, and
left out of the kill rate, which is taken over the result-changing mutants.

    python scripts/kernel_mutants.py              # all mutants; prints each verdict and the kill rate
    python scripts/kernel_mutants.py -k planted   # mutants whose name contains "planted"
    python scripts/kernel_mutants.py --list
    python scripts/kernel_mutants.py -j 2         # two mutants at a time (one temporary copy each)

Run time: the unmutated kernel test files once (the baseline), then per killed mutant the tests up to its first
failure (a survivor runs them all). Measured 2026-11-30 on a 2-core machine shared with other jobs, -j 2:
baseline (66 tests) 849 s wall at load average 6-7, 102 s at load 1; all 36 mutants (`-j 2 --no-baseline`) 1592 s
wall at load average 2.7-9, 793 s CPU, i.e. ~22 s CPU per mutant (about a third of it importing torch and Triton).
Idle, that is about 100 s + 793 s / 2 cores, ~8-9 min in all (an estimate from the CPU times; no idle run was made).
`-k planted` (the two planted bugs) takes the baseline plus under a minute.
Exit status 1 when a mutant survives or the unmutated tests fail; 2 when the harness itself cannot run.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# The tests every mutant runs, in this order (node-id prefixes; an item runs at the first prefix it matches). pytest
# would otherwise merge a test named on the command line into its file's position, so the order is imposed by a
# small plugin (ORDER_PLUGIN) instead.
TEST_ORDER = (
    "tests/test_kernels_grid.py::test_small_multiblock",
    "tests/test_kernels_strides.py::test_launchers_read_strided_and_expanded_labels_in_place",
    "tests/test_kernels_strides.py::test_loss_launcher_takes_strided_inputs",
    "tests/test_kernels_grid.py::test_gather_rounds_once_to_the_output_dtype",
    "tests/test_kernels_bounds.py",
    "tests/test_kernels_strides.py",
    "tests/test_kernels_anchor.py",
    "tests/test_kernels_grid.py",
)
TEST_FILES = tuple(dict.fromkeys(t.split("::")[0] for t in TEST_ORDER))
ORDER_PLUGIN = """
import os


def pytest_collection_modifyitems(session, config, items):
    order = os.environ["KERNEL_MUTANTS_ORDER"].split("|")

    def rank(item):
        return next((i for i, prefix in enumerate(order) if item.nodeid.startswith(prefix)), len(order))

    items.sort(key=rank)  # stable: pytest's own order within a rank
"""


@dataclass(frozen=True)
class Mutant:
    name: str
    path: str  # relative to the repository root
    find: str  # must occur exactly once in the file
    replace: str
    equivalent: str = ""  # why no accepted input tells the mutant apart (then it is listed, not run)


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
    Mutant("segmented: features not upcast before the sum", "kernels/class_sums.py",
           "x = tl.load(X_ptr + rows[:, None] * stride_x_row + cols[None, :], mask=ok, other=0.0).to(acc.dtype)",
           "x = tl.load(X_ptr + rows[:, None] * stride_x_row + cols[None, :], mask=ok, other=0.0)",
           equivalent="fp16/bf16 x meets the fp32 shift or accumulator first, and Triton promotes it exactly"),
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
    Mutant("grad: column mask off by one", "kernels/sfm_loss.py",
           "    col_ok = cols < n_cols\n    cls_ok = cls < num_classes\n",
           "    col_ok = cols <= n_cols\n    cls_ok = cls < num_classes\n"),
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
    Mutant("gather: row mask dropped at the store", "kernels/sfm_loss.py",
           "    out_mask = row_ok[:, None] & col_ok[None, :]",
           "    out_mask = (rows <= n_rows)[:, None] & col_ok[None, :]"),
    Mutant("gather: bf16 ties rounded away from zero", "kernels/sfm_loss.py",
           "        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16", "        rounded = (bits + 0x8000) >> 16"),
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
    (dest / "_kernel_mutants_order.py").write_text(ORDER_PLUGIN)


class Runner:
    """Runs the ordered kernel tests in a copy; `stop()` ends every running test process (Ctrl-C, SIGTERM)."""

    def __init__(self, timeout: float):
        self.timeout = timeout
        self.stopping = threading.Event()
        self._procs: set[subprocess.Popen] = set()
        self._lock = threading.Lock()

    def stop(self) -> None:
        self.stopping.set()
        with self._lock:
            for proc in self._procs:
                if proc.poll() is None:
                    proc.kill()

    def run(self, workdir: Path) -> tuple[str, float, str]:
        """(verdict, seconds, first failure): verdict "pass", "fail" (a test failed), "crash" (killed by a signal
        or a collection error), "timeout", or "error" (pytest could not run the tests: usage error, no tests)."""
        env = dict(os.environ, PYTHONPATH=str(workdir), TRITON_INTERPRET="1", HF_HUB_OFFLINE="1",
                   OMP_WAIT_POLICY="PASSIVE", PYTHONDONTWRITEBYTECODE="1", KERNEL_MUTANTS_ORDER="|".join(TEST_ORDER))
        env.pop("SFMKERN_BACKEND", None)
        env.pop("SFMKERN_GPU_LAUNCH", None)
        cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-p", "_kernel_mutants_order",
               "-o", "addopts=", *TEST_FILES]
        start = time.monotonic()
        with self._lock:
            if self.stopping.is_set():
                return "error", 0.0, "interrupted"
            proc = subprocess.Popen(cmd, cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    text=True)
            self._procs.add(proc)
        try:
            out, _ = proc.communicate(timeout=self.timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            return "timeout", time.monotonic() - start, ""
        finally:
            with self._lock:
                self._procs.discard(proc)
        elapsed = time.monotonic() - start
        if self.stopping.is_set():
            return "error", elapsed, "interrupted"
        lines = [ln for ln in out.splitlines() if ln.startswith(("FAILED", "ERROR", "Fatal Python error"))]
        detail = lines[0] if lines else out[-300:].strip()
        if proc.returncode == 0:
            return "pass", elapsed, ""
        if proc.returncode == 1:
            return "fail", elapsed, detail
        if proc.returncode < 0 or "during collection" in out:
            return "crash", elapsed, detail or f"exit status {proc.returncode}"
        return "error", elapsed, f"pytest exit status {proc.returncode}: {detail}"


STATES = {"fail": "killed", "crash": "killed (crash)", "timeout": "killed (timeout)", "pass": "SURVIVED",
          "error": "ERROR"}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-k", default="", help="only mutants whose name contains this text")
    parser.add_argument("--list", action="store_true", help="list the mutants and exit")
    parser.add_argument("--timeout", type=float, default=None,
                        help="seconds per mutant; a hang counts as killed (default: 3x the baseline, else 3600)")
    parser.add_argument("--no-baseline", action="store_true", help="skip the unmutated run")
    parser.add_argument("-j", "--jobs", type=int, default=1, help="mutants tested in parallel (one copy each)")
    args = parser.parse_args(argv)
    selected = [m for m in MUTANTS if args.k in m.name]
    if args.list:
        for m in selected:
            print(f"{m.path}: {m.name}" + (f"  [equivalent: {m.equivalent}]" if m.equivalent else ""))
        return 0
    for m in selected:  # every edit must apply to the current sources exactly once
        count = (ROOT / m.path).read_text().count(m.find)
        if count != 1:
            print(f"mutant {m.name!r}: its line occurs {count} times in {m.path}; update the harness")
            return 2
    equivalent = [m for m in selected if m.equivalent]
    mutants = [m for m in selected if not m.equivalent]
    for m in equivalent:
        print(f"[ -/{len(mutants)}] equivalent                {m.path}: {m.name}\n       ({m.equivalent})")
    tmp = Path(tempfile.mkdtemp(prefix="sfmkern-mutants-"))
    runner = Runner(args.timeout if args.timeout is not None else 3600.0)
    previous = signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    began = time.monotonic()
    try:
        workers = max(1, args.jobs)
        copies = [tmp / f"copy{i}" for i in range(workers)]
        for copy in copies:
            _copy_tree(copy)
        if not args.no_baseline:
            verdict, elapsed, detail = runner.run(copies[0])
            print(f"baseline (unmutated): {verdict} in {elapsed:.0f} s", flush=True)
            if verdict != "pass":
                print(detail)
                return 1
            if args.timeout is None:  # a survivor runs the whole suite: leave room for a slower, loaded run
                runner.timeout = 3 * elapsed
        free = queue.Queue()
        for copy in copies:
            free.put(copy)

        def run_one(m: Mutant):
            copy = free.get()
            target = copy / m.path
            original = target.read_text()
            try:
                target.write_text(original.replace(m.find, m.replace, 1))
                return runner.run(copy)
            finally:
                target.write_text(original)
                free.put(copy)

        survivors, errors, killed = [], [], 0
        pool = concurrent.futures.ThreadPoolExecutor(workers)
        try:
            results = zip(mutants, pool.map(run_one, mutants), strict=True)
            for i, (m, (verdict, elapsed, detail)) in enumerate(results, 1):
                killed += verdict in ("fail", "crash", "timeout")
                if verdict == "pass":
                    survivors.append(m)
                elif verdict == "error":
                    errors.append(m)
                print(f"[{i:2d}/{len(mutants)}] {STATES[verdict]:16s} {elapsed:6.1f} s  {m.path}: {m.name}"
                      + (f"\n       by {detail}" if verdict != "pass" and detail else ""), flush=True)
        finally:  # on Ctrl-C / SIGTERM: end the running tests, drop the mutants not started yet
            runner.stop()
            pool.shutdown(wait=True, cancel_futures=True)
        rate = 100.0 * killed / max(len(mutants), 1)
        print(f"kill rate: {killed}/{len(mutants)} = {rate:.1f}% of the result-changing mutants "
              f"({len(equivalent)} equivalent, not run) in {time.monotonic() - began:.0f} s with -j {workers}")
        for m in survivors:
            print(f"  survivor: {m.path}: {m.name}")
        for m in errors:
            print(f"  not tested (harness error): {m.path}: {m.name}")
        if errors:
            return 2
        return 0 if not survivors else 1
    except KeyboardInterrupt:
        runner.stop()
        print("interrupted: the working tree was never modified; removing the copies")
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
