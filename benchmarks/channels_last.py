"""A convolutional backbone on channels-last vs the plain (NCHW) layout, side by side in one process, interleaved
over rounds: forward + backward to the input (one distillation step's backbone work) and forward alone (statistics,
test features), on the same inputs; the relative difference (norm) of the features of the two layouts is printed too.

    python benchmarks/channels_last.py                           # efficientnet-lite0 at 128 px, 100 images (the demo)
    python benchmarks/channels_last.py --model resnet10t --res 64 --batch 16 --rounds 2 --no-append   # seconds
"""

from __future__ import annotations

import argparse
import statistics
import time

import _common as common
import torch


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="efficientnet_lite0_offline")
    p.add_argument("--res", type=int, default=128)
    p.add_argument("--batch", type=int, default=100)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--no-append", action="store_true", help="do not append to benchmarks/RESULTS.md")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from sfmkern.backbone import load_backbone

    load0 = common.load_average()
    pretrained = args.model.endswith("_offline")
    models = {}
    for cl in (False, True):
        torch.manual_seed(0)
        models[cl] = load_backbone(args.model, pretrained=pretrained, img_size=None if pretrained else args.res,
                                   device="cpu", channels_last=cl)
    x = torch.rand(args.batch, 3, args.res, args.res, generator=torch.Generator().manual_seed(0))

    def fwd_bwd(bb):
        xi = x.clone().requires_grad_(True)
        bb.features(xi).sum().backward()

    def fwd(bb):
        with torch.no_grad():
            bb.features(x)

    with torch.no_grad():
        f0, f1 = models[False].features(x).double(), models[True].features(x).double()
    diff = float((f1 - f0).norm() / f0.norm())
    times = {(cl, what): [] for cl in (False, True) for what in ("fb", "f")}
    for bb in models.values():  # warm-up
        fwd_bwd(bb)
        fwd(bb)
    for _ in range(args.rounds):
        for cl, bb in models.items():
            times[(cl, "fb")].append(_timed(lambda bb=bb: fwd_bwd(bb)))
            times[(cl, "f")].append(_timed(lambda bb=bb: fwd(bb)))
    med = {k: statistics.median(v) for k, v in times.items()}
    rows = [
        "| pass | NCHW s | channels-last s | speed-up |",
        "|---|---:|---:|---:|",
        f"| forward + backward to the input | {med[(False, 'fb')]:.3f} | {med[(True, 'fb')]:.3f} | "
        f"{med[(False, 'fb')] / med[(True, 'fb')]:.2f}x |",
        f"| forward (no grad) | {med[(False, 'f')]:.3f} | {med[(True, 'f')]:.3f} | "
        f"{med[(False, 'f')] / med[(True, 'f')]:.2f}x |",
    ]
    text = "\n".join([
        common.stamp("channels-last backbone: benchmarks/channels_last.py"),
        "",
        f"Model {args.model} ({'pretrained' if pretrained else 'random weights'}), {args.batch} images of "
        f"{args.res} px, {torch.get_num_threads()} thread(s); median of {args.rounds} interleaved rounds after a "
        f"warm-up. Relative feature difference between the layouts: {diff:.1e}. Machine: "
        f"{common.describe_machine()}; {common.versions()}. Load average before: {load0}, after: "
        f"{common.load_average()}.",
        "",
        *rows,
    ])
    common.publish(text, append=not args.no_append)


if __name__ == "__main__":
    main()
