"""Where one distillation step spends its time: torch.profiler over one step per (C, ipc, A) and method, after one
untimed warm-up step, listing the kernels (CUDA) or operators (CPU) that take the most self time, with the step's
wall time, its FLOP rate and the allocator's retry count (a step that makes the caching allocator free and re-map
memory is slow for reasons no kernel table shows). For the GPU, where Nsight Systems is not at hand:

    python benchmarks/profile_step.py --model vit_base_patch14_dinov2 --crop 224 --syn-res 256 --grid 1000x1x1
    python benchmarks/profile_step.py --quick --grid 10x1x1        # CPU smoke run, seconds
    python benchmarks/profile_step.py --loss 1000 --no-steps        # only the fused loss's host overhead

--loss N adds a profile of the fused loss alone (ops.sfm_loss forward + backward at N rows, D = 768, C = 1000, the
shape of benchmarks/kernels.py's goal row): cProfile's Python functions by own time over 100 calls (--loss-calls; at
these sizes the host, not the kernels, sets the time) and torch.profiler's table of one call.

Prints only; nothing is appended to RESULTS.md (a profile is a diagnosis, not a figure).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import time

import _common as common
import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils.flop_counter import FlopCounterMode


def profile_case(backbone, c: int, ipc: int, augs: int, method: str, args, device: torch.device) -> None:
    case = common.make_case(backbone, c, ipc, augs, syn_res=args.syn_res, crop=args.crop, chunk=args.chunk)
    common.prepare(case, method)
    common.run_step(case, method)  # warm-up: compilation, workspaces, allocator pools
    common.sync(device)
    retries0 = torch.cuda.memory_stats(device).get("num_alloc_retries", 0) if device.type == "cuda" else 0
    t0 = time.perf_counter()
    float(common.run_step(case, method))
    common.sync(device)
    wall = time.perf_counter() - t0
    retries = (torch.cuda.memory_stats(device).get("num_alloc_retries", 0) - retries0) if device.type == "cuda" else 0
    with FlopCounterMode(display=False) as counter:
        common.run_step(case, method)
    flops = counter.get_total_flops()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        float(common.run_step(case, method))
        common.sync(device)
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(f"\n=== {method} {case.key()} ({case.views} views): {wall:.3f} s/step, {flops / 1e9:.1f} GFLOP, "
          f"{flops / wall / 1e12:.1f} TFLOP/s, allocator retries in the timed step: {retries}", flush=True)
    print(prof.key_averages().table(sort_by=key, row_limit=args.rows, max_name_column_width=70), flush=True)
    del case
    common.prepare_free(backbone)
    if device.type == "cuda":
        torch.cuda.empty_cache()


def profile_loss(n: int, args, device: torch.device, c: int = 1000, d: int = 768) -> None:
    from sfmkern import ops

    gen = torch.Generator(device=device).manual_seed(0)
    labels = torch.cat([torch.arange(c, device=device),
                        torch.randint(0, c, (n - c,), generator=gen, device=device)]).sort().values
    flow = ops.real_flow(torch.randn(c, d, generator=gen, device=device))
    x = torch.randn(n, d, generator=gen, device=device).requires_grad_(True)

    def call():
        return torch.autograd.grad(ops.sfm_loss(x, labels, flow, sorted_labels=True), x)

    for _ in range(3):  # compilation, caches
        call()
    common.sync(device)
    calls = args.loss_calls
    t0 = time.perf_counter()
    for _ in range(calls):
        call()
    common.sync(device)
    per_call = (time.perf_counter() - t0) / calls
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(calls):
        call()
    common.sync(device)
    prof.disable()
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(args.rows)
    print(f"\n=== ops.sfm_loss forward + backward, N={n} D={d} C={c} fp32 on {device}: {per_call * 1e3:.3f} ms per "
          f"call ({calls} calls); cProfile over {calls} calls, by own time:", flush=True)
    print(out.getvalue(), flush=True)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as tp:
        call()
        common.sync(device)
    print(tp.key_averages().table(sort_by="cpu_time_total", row_limit=args.rows, max_name_column_width=70), flush=True)


def main() -> int:
    parser = common.add_step_arguments(argparse.ArgumentParser(description=__doc__.split("\n\n")[0]))
    parser.add_argument("--rows", type=int, default=25, help="rows of the kernel table")
    parser.add_argument("--loss", type=int, default=0, metavar="N", help="also profile the fused loss alone at N rows")
    parser.add_argument("--loss-calls", type=int, default=100, metavar="K",
                        help="calls timed and profiled with --loss (fewer for a smoke run)")
    parser.add_argument("--no-steps", action="store_true", help="skip the distillation steps (with --loss)")
    args = common.apply_preset(parser.parse_args())
    if args.methods == list(common.METHODS):
        args.methods = ["sfm_single"]
    device = torch.device(args.device)
    torch.set_num_threads(max(1, args.threads))
    print(f"profile_step: {args.model} at {args.crop} px, images {args.syn_res} px, on "
          f"{common.device_name(args.device)} ({common.versions()})", flush=True)
    if args.loss:
        profile_loss(args.loss, args, device)
    if args.no_steps:
        return 0
    backbone = common.load_model(args.model, args.crop, device)
    for c, ipc, augs in common.parse_grid(args.grid):
        for method in args.methods:
            profile_case(backbone, c, ipc, augs, method, args, device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
