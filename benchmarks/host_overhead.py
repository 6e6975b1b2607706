"""How much host time does each op's Python layer cost per call, before and after the eager fast path?

    python benchmarks/host_overhead.py [--baseline REV] [--repeats 3] [--calls 100] [--no-append]

On tiny tensors (N = 64, D = 16, C = 8, CPU) the arithmetic is negligible and a call's time is its host overhead:
argument checks, dispatch, autograd bookkeeping. Three variants of each op, measured side by side in one run:
  baseline   the public function at git revision REV (default 61fa156: every call through the registered torch
             custom op, and on the torch backend the reference's autograd on a new thread per call)
  op         the registered op of this tree, called directly (torch.ops.sfmkern.*: the path torch.compile, tracing
             and dispatch modes take; no thread any more)
  eager      the public function of this tree (sfmkern.ops.*: plain eager mode takes the fast path)
Two backends: "torch" (the reference, as CPU runs do) and "triton, launchers stubbed" (TRITON_INTERPRET=1 with
SFMKERN_VALIDATE=0, as on CUDA, and the four Triton launchers replaced by stubs that only allocate their outputs):
the latter is everything a GPU call pays on the host except the kernel launches themselves, which are the same
for every variant.

Each variant runs in its own child process (the baseline from `git archive REV`, since both trees register the same
op names); the parent alternates the children `--repeats` times and reports, per op, the median over all timed
batches of wall time and of process CPU time (all threads) per call, and the ratios baseline / eager and
op / eager. Ops: sfm_loss forward + backward (torch.autograd.grad, sorted labels), class_sums (forward),
flow_loss_and_grad, feature_grad. Appends a table to benchmarks/RESULTS.md unless --no-append.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from io import BytesIO
from pathlib import Path

import _common as common

OPS = ("sfm_loss fwd+bwd", "class_sums", "flow_loss_and_grad", "feature_grad")
BACKENDS = ("torch", "triton-stubbed")
N, D, C = 64, 16, 8


# ------------------------------------------------------------------------------------------------ child
def _stub_launchers() -> None:
    """Replace the Triton launchers by functions that allocate what they return (no launch, no interpreter)."""
    import sfmkern.kernels as kernels
    import torch

    def class_sums_triton(features, labels, num_classes, **_):
        return (torch.zeros(num_classes, features.shape[1]), torch.ones(num_classes, dtype=torch.int64))

    def flow_loss_and_grad_triton(sums, counts, real_flow, **_):
        return torch.zeros(()), torch.zeros_like(sums)

    def feature_grad_triton(grad, counts, labels, *, scale=None, dtype=torch.float32):
        return torch.zeros(labels.shape[0], grad.shape[1], dtype=dtype)

    kernels.class_sums_triton = class_sums_triton
    kernels.flow_loss_and_grad_triton = flow_loss_and_grad_triton
    kernels.feature_grad_triton = feature_grad_triton


def _calls(path: str):
    """{op name: zero-argument callable} for one variant ("public" or "op")."""
    import torch

    from sfmkern import ops, reference

    gen = torch.Generator().manual_seed(0)
    labels = torch.cat([torch.arange(C), torch.randint(0, C, (N - C,), generator=gen)]).sort().values
    flow = reference.real_flow(torch.randn(C, D, generator=gen))
    x = torch.randn(N, D, generator=gen).requires_grad_(True)
    features = x.detach().clone()
    sums, counts = reference.class_sums(features, labels, C)
    grad = torch.randn(C, D, generator=gen)
    if path == "public":
        return {
            "sfm_loss fwd+bwd": lambda: torch.autograd.grad(ops.sfm_loss(x, labels, flow, sorted_labels=True), x),
            "class_sums": lambda: ops.class_sums(features, labels, C, sorted_labels=True),
            "flow_loss_and_grad": lambda: ops.flow_loss_and_grad(sums, counts, flow),
            "feature_grad": lambda: ops.feature_grad(grad, counts, labels),
        }
    op = torch.ops.sfmkern
    return {
        "sfm_loss fwd+bwd": lambda: torch.autograd.grad(op.sfm_loss(x, labels, flow, None, 0.0, False, True, True)[0],
                                                        x),
        "class_sums": lambda: op.class_sums(features, labels, C, False, True),
        "flow_loss_and_grad": lambda: op.flow_loss_and_grad(sums, counts, flow, None, 0.0),
        "feature_grad": lambda: op.feature_grad(grad, counts, labels, None, torch.float32),
    }


def child(path: str, backend: str, calls: int, batches: int) -> None:
    import torch

    torch.set_num_threads(1)
    if backend == "triton-stubbed":
        _stub_launchers()
    fns = _calls(path)
    out = {}
    for name, fn in fns.items():
        for _ in range(max(10, calls // 10)):  # warm-up: first-call caches
            fn()
        walls, cpus = [], []
        for _ in range(batches):
            w0, c0 = time.perf_counter(), time.process_time()
            for _ in range(calls):
                fn()
            walls.append((time.perf_counter() - w0) / calls * 1e6)
            cpus.append((time.process_time() - c0) / calls * 1e6)
        out[name] = {"wall": walls, "cpu": cpus}
    print(json.dumps(out))


# ------------------------------------------------------------------------------------------------ parent
def _export(rev: str, dest: Path) -> Path:
    """The package at `rev` (sfmkern/ and kernels/, with the sfmkern/kernels link the editable install has)."""
    data = subprocess.run(["git", "archive", "--format=tar", rev, "sfmkern", "kernels"], cwd=common.ROOT,
                          capture_output=True, check=True).stdout
    with tarfile.open(fileobj=BytesIO(data)) as tar:
        tar.extractall(dest, filter="data")
    link = dest / "sfmkern" / "kernels"
    if not link.exists():
        link.symlink_to(Path("..") / "kernels")
    return dest


def _run_child(tree: Path, path: str, backend: str, args) -> dict:
    env = dict(os.environ, **common.CPU_CHILD_ENV, PYTHONPATH=str(tree))
    for key in ("SFMKERN_BACKEND", "TRITON_INTERPRET", "SFMKERN_VALIDATE", "SFMKERN_GPU_LAUNCH"):
        env.pop(key, None)
    if backend == "triton-stubbed":
        env.update(TRITON_INTERPRET="1", SFMKERN_VALIDATE="0")
    cmd = [sys.executable, __file__, "--child", path, "--backend", backend, "--calls", str(args.calls),
           "--batches", str(args.batches)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=tree)
    if done.returncode != 0:
        raise RuntimeError(f"child {path}/{backend} in {tree} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", default="61fa156", help="git revision of the 'before' tree")
    parser.add_argument("--repeats", type=int, default=3, help="alternations of the three children")
    parser.add_argument("--calls", type=int, default=100, help="calls per timed batch")
    parser.add_argument("--batches", type=int, default=3, help="timed batches per child and op")
    parser.add_argument("--no-append", action="store_true")
    parser.add_argument("--child", choices=("public", "op"), help=argparse.SUPPRESS)
    parser.add_argument("--backend", choices=BACKENDS, default="torch", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.backend, args.calls, args.batches)
        return 0

    load_before = common.load_average()
    variants = {}  # (variant, backend) -> {op: {"wall": [...], "cpu": [...]}}
    with tempfile.TemporaryDirectory() as tmp:
        baseline = _export(args.baseline, Path(tmp))
        plan = [("baseline", baseline, "public"), ("op", common.ROOT, "op"), ("eager", common.ROOT, "public")]
        for rep in range(args.repeats):
            for backend in BACKENDS:
                for variant, tree, path in plan:
                    result = _run_child(tree, path, backend, args)
                    bucket = variants.setdefault((variant, backend), {})
                    for op_name, times in result.items():
                        for kind, values in times.items():
                            bucket.setdefault(op_name, {}).setdefault(kind, []).extend(values)
                    print(f"repeat {rep + 1}/{args.repeats} {backend:15s} {variant:8s} " + "  ".join(
                        f"{k}: {statistics.median(v['wall']):.0f} us" for k, v in result.items()), flush=True)
    load_after = common.load_average()

    def med(variant, backend, op_name, kind):
        return statistics.median(variants[(variant, backend)][op_name][kind])

    rows = []
    for backend in BACKENDS:
        for op_name in OPS:
            cells = []
            for kind in ("wall", "cpu"):
                b, o, e = (med(v, backend, op_name, kind) for v in ("baseline", "op", "eager"))
                cells.append(f"{b:.0f} / {o:.0f} / {e:.0f} | **{b / e:.2f}×** / {o / e:.2f}×")
            rows.append(f"| {backend} | {op_name} | " + " | ".join(cells) + " |")
    text = (
        common.stamp("host_overhead: per-call host time of the ops, before and after the eager fast path") + "\n\n"
        f"Machine: {common.describe_machine('cpu')}. {common.versions()}. CPU only: no GPU was available, so the GPU "
        "effect is not measured here (the triton-stubbed rows are the host work a CUDA call does besides its "
        "launches).\n"
        f"`python benchmarks/host_overhead.py --baseline {args.baseline} --repeats {args.repeats} --calls "
        f"{args.calls} --batches {args.batches}`: N={N}, D={D}, C={C} fp32, one torch thread, each variant in its own "
        f"process, alternated {args.repeats}×; medians over {args.repeats * args.batches} batches of {args.calls} "
        "calls. baseline = public function at the baseline revision (registered op; thread per call on the torch "
        "backend), op = this tree's registered op called directly, eager = this tree's public function (fast "
        "path). Wall time is sensitive to the machine's load; process CPU time (all threads) less so.\n\n"
        "| backend | op | wall µs: baseline / op / eager | wall ratio: baseline/eager / op/eager "
        "| CPU µs: baseline / op / eager | CPU ratio: baseline/eager / op/eager |\n"
        "|---|---|---:|---:|---:|---:|\n" + "\n".join(rows) + "\n\n"
        f"Load average (1/5/15 min) before: {load_before}, after: {load_after} on {common.usable_cores()} usable "
        "cores.\n"
    )
    common.publish(text, append=not args.no_append)
    return 0


if __name__ == "__main__":
    sys.exit(main())
