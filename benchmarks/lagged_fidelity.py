"""Does the opt-in `lagged` step mode distil images as good as the exact step? Demo accuracy, side by side.

The demo's `--quick` settings (Fashion-MNIST, efficientnet_lite0_offline with its real weights, 128 px, statistics of
300 training images per class, 100 test images per class, lr 1e-2, all pyramid levels from the start, the probe on a
bank of augmented views), at 1 image per class for `--steps` steps; for each seed the same statistics, seed and steps
are distilled with the exact step (mode "two_phase", identical to "single") and with mode "lagged", and both are
evaluated with the same probe. Reports the probe accuracy (mean ± std over probe runs) per seed and the per-seed
difference, and appends the table to benchmarks/RESULTS.md.

    python benchmarks/lagged_fidelity.py --out /tmp/lagged-fidelity          # ~15 min on 2 loaded cores
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import _common as common
import torch


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="work folder (statistics and test features are reused)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--steps", type=int, default=None, help="default: the quick preset's steps at 1 IPC")
    parser.add_argument("--ipc", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-append", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from sfmkern.backbone import load_backbone
    from sfmkern.data import fashion_mnist
    from sfmkern.demo import cached_test_features, per_class_subset, settings_for
    from sfmkern.evaluation import evaluate
    from sfmkern.pipeline import distill
    from sfmkern.stats import collect_stats

    s = settings_for("quick", "cpu")
    steps = args.steps if args.steps is not None else s.steps[list(s.ipcs).index(1)]
    size = s.image_size
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    load_before = common.load_average()
    t0 = time.perf_counter()
    train = per_class_subset(fashion_mnist("train", root=s.data_root), s.train_per_class, s.seed)
    test = per_class_subset(fashion_mnist("test", root=s.data_root), s.test_per_class, s.seed)
    backbone = load_backbone(s.backbone, pretrained=True, img_size=None, device="cpu")
    stats = collect_stats(train, backbone, resize=size, crop=size, batch_size=s.batch_size,
                          out=out / "stats.safetensors", resume=True, progress=False)
    test_fs = cached_test_features(out / "test-features.safetensors", test, backbone, size=size,
                                   batch_size=s.batch_size, fresh=False, progress=False)
    ev = dict(epochs=s.epochs, runs=s.runs, seed=0, view_bank=s.view_bank, resize=size, crop=size,
              feature_batch=s.batch_size, progress=False)
    rows = []
    for seed in args.seeds:
        row = {"seed": seed}
        for mode in ("two_phase", "lagged"):
            t = time.perf_counter()
            ds = distill(stats, backbone, ipc=args.ipc, steps=steps, lr=s.lr, syn_res=size, crop=size, seed=seed,
                         grow_every=s.grow_every, mode=mode, progress=False, out_dir=None)
            seconds = time.perf_counter() - t
            report = evaluate(ds, backbone, test_fs, mode="probe", name=f"sfm-{mode}", **ev)
            row[mode] = (report.top1_mean, report.top1_std, seconds)  # percent
            print(f"seed {seed} {mode}: {report.top1_mean:.1f} ± {report.top1_std:.1f} % ({seconds:.0f} s distil)",
                  flush=True)
        rows.append(row)
    elapsed = time.perf_counter() - t0

    def pct(v):
        return f"{v[0]:.1f} ± {v[1]:.1f}"

    diffs = [r["lagged"][0] - r["two_phase"][0] for r in rows]
    lines = [
        common.stamp("lagged fidelity: benchmarks/lagged_fidelity.py"),
        "",
        f"Machine: {common.describe_machine('cpu')}; {common.versions()}; the demo's quick settings: {s.backbone} "
        f"(real weights), Fashion-MNIST, {size} px, statistics of {s.train_per_class} train images per class, "
        f"{s.test_per_class} test images per class, ipc {args.ipc}, {steps} steps, lr {s.lr}, grow_every "
        f"{s.grow_every}; probe: {s.epochs} epochs, {s.runs} runs, view bank {s.view_bank}. Same statistics, seeds, "
        f"steps and probe for both modes. {args.threads} thread(s); load average before {load_before}, after "
        f"{common.load_average()}; run took {elapsed:.0f} s.",
        "",
        "| seed | exact step (two-phase) acc % | lagged acc % | lagged − exact (points) |",
        "|---:|---:|---:|---:|",
    ]
    for r, d in zip(rows, diffs, strict=True):
        lines.append(f"| {r['seed']} | {pct(r['two_phase'])} | {pct(r['lagged'])} | {d:+.1f} |")
    spread = statistics.pstdev([r["two_phase"][0] for r in rows]) if len(rows) > 1 else float("nan")
    lines += ["", f"- mean difference lagged − exact: **{statistics.mean(diffs):+.1f} points** over "
              f"{len(rows)} seed(s); the exact step's spread over seeds: {spread:.1f} points; distillation seconds "
              "(exact, lagged): " + ", ".join(f"{r['two_phase'][2]:.0f}, {r['lagged'][2]:.0f}" for r in rows), ""]
    text = "\n".join(lines)
    common.publish(text, append=not args.no_append)
    return 0


if __name__ == "__main__":
    sys.exit(main())
