"""The pyramid's upsampling, forward + backward: F.interpolate (bilinear, align_corners=False) against the two matrix
products of `sfmkern.synthetic.upsample_sum`, side by side in one run, on every level of a pyramid of side R.

On CUDA, F.interpolate's backward adds each output pixel's gradient into the level with atomics, which serialise on
the coarse levels (a 1×1 level gets R² adds per channel at one address): 86% of a distillation step at C = 1000 on an
H200 (benchmarks/RESULTS.md). The matrix form has no atomics. This script times both on whatever device it is given
(process CPU time on the CPU, CUDA events' wall time on a GPU) and checks they agree.

    python benchmarks/upsample.py                       # CPU, one thread, a few seconds
    python benchmarks/upsample.py --device cuda --cases 1000x256 100x256
"""

from __future__ import annotations

import argparse
import sys
import time

import _common as common
import torch
import torch.nn.functional as F

from sfmkern.synthetic import level_sizes, upsample_sum


def interpolate_sum(levels: list[torch.Tensor], resolution: int) -> torch.Tensor:
    """What upsample_sum computed before: one F.interpolate per level."""
    out = None
    for level in levels:
        up = level if level.shape[-1] == resolution else F.interpolate(
            level, size=(resolution, resolution), mode="bilinear", align_corners=False)
        out = up if out is None else out + up
    return out


def seconds_per_call(fn, levels, upstream, device: torch.device, repeats: int) -> float:
    def once():
        for level in levels:
            level.grad = None
        fn(levels, upstream.shape[-1]).backward(upstream)

    once()  # warm-up (and the cached resampling matrices)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        for _ in range(repeats):
            once()
        torch.cuda.synchronize(device)
        return (time.perf_counter() - t0) / repeats
    t0 = time.process_time()
    for _ in range(repeats):
        once()
    return (time.process_time() - t0) / repeats


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", default=["10x32", "100x32", "100x64", "20x128", "10x256"],
                        help="NxR: N images of side R (every pyramid level 1, 2, 4, ... R)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--no-append", action="store_true", help="print only, do not append to RESULTS.md")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    load_before = common.load_average()
    rows = []
    for case in args.cases:
        n, r = (int(v) for v in case.lower().split("x"))
        gen = torch.Generator().manual_seed(n * 7 + r)
        levels = [torch.randn(n, 3, s, s, generator=gen).to(device).requires_grad_(True) for s in level_sizes(r)]
        upstream = torch.randn(n, 3, r, r, generator=gen).to(device)
        old = seconds_per_call(interpolate_sum, levels, upstream, device, args.repeats)
        new = seconds_per_call(upsample_sum, levels, upstream, device, args.repeats)
        grads_new = [level.grad.clone() for level in levels]
        for level in levels:
            level.grad = None
        interpolate_sum(levels, r).backward(upstream)
        err = max(float((a - b.grad).norm() / b.grad.norm()) for a, b in zip(grads_new, levels, strict=True))
        rows.append(f"| {n} | {r} | {len(levels)} | {old * 1e3:.2f} | {new * 1e3:.2f} | {new / old:.2f}× | {err:.1e} |")
        print(rows[-1], flush=True)
    clock = "CUDA wall time" if device.type == "cuda" else f"process CPU time, {args.threads} thread(s)"
    text = "\n".join([
        common.stamp("upsample: benchmarks/upsample.py"),
        "",
        f"Device: {common.device_name(args.device)}; {common.versions()}. Forward + backward of the pyramid's "
        f"upsampling, ms per call ({clock}, mean of {args.repeats} after one warm-up); relative error of the "
        f"levels' gradients, matrix form vs F.interpolate. Load average before: {load_before}; after: "
        f"{common.load_average()}.",
        "",
        "| images | side R | levels | F.interpolate ms | matrix products ms | ratio | grad rel. err |",
        "|---:|---:|---:|---:|---:|---:|---:|",
        *rows,
    ])
    common.publish(text, append=not args.no_append)
    return 0


if __name__ == "__main__":
    sys.exit(main())
