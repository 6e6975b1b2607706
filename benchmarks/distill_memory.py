"""Is the two-phase distillation step's memory flat in C·ipc? Peak memory per configuration, each in its own process.

For each number of synthetic images N = C·ipc (C = 10 classes, ipc = N / 10), a fresh subprocess loads a small random
ViT, builds a `Distiller` at a fixed chunk size with the full pyramid (grow_every=0, so the images hold all their
bytes from the first step) and runs a few steps. It reports
  peak        peak memory of the process (CPU: ru_maxrss; CUDA: max_memory_allocated),
  own         bytes of the images' parameters, gradients and Adam state (the memory the issue allows to grow),
  peak - own  what must stay flat (< 15% growth from the smallest to the largest N),
  step        peak - own - the memory after loading the model (CPU: RSS, CUDA: allocated): the step's own working
              set, a stricter view since it excludes the fixed cost of torch and the weights.
`--modes two_phase lagged single` adds the lagged step (memory-flat too) and the single-phase step (all views in
one autograd forward) for contrast: its memory grows with N.

    python benchmarks/distill_memory.py                       # N = 10, 50, 100, 200 on CPU, two-phase
    python benchmarks/distill_memory.py --modes two_phase single --sizes 10 100 200
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import _common as common

ROOT = common.ROOT
MIB = common.MIB


def child(args) -> dict:
    """One configuration, in this (fresh) process: returns the measurements as a dict."""
    import torch

    torch.set_num_threads(args.threads)
    from sfmkern.backbone import load_backbone
    from sfmkern.distillation import DistillConfig, Distiller

    device = torch.device(args.device)
    torch.manual_seed(0)
    backbone = load_backbone(args.model, pretrained=False, img_size=args.crop, device=device)
    if args.checkpointing:
        backbone.set_grad_checkpointing(True)
    classes = 10
    if args.images % classes:
        raise SystemExit(f"--child N must be a multiple of {classes}, got {args.images}")
    real_flow = torch.randn(classes, backbone.feature_dim, device=device)
    real_flow -= real_flow.mean(0)
    cfg = DistillConfig(ipc=args.images // classes, augs=args.augs, syn_res=args.syn_res, crop=args.crop,
                        grow_every=0, chunk_size=args.chunk if args.mode != "single" else None, seed=0)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    else:
        base = common.rss_bytes()
    distiller = Distiller(real_flow, backbone, config=cfg, device=device)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        loss = distiller.step(args.mode)
    final_loss = float(loss)
    seconds = (time.perf_counter() - t0) / args.steps
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    own = distiller.own_bytes()
    return {"images": args.images, "mode": args.mode, "chunk": args.chunk, "peak": peak, "base": base, "own": own,
            "peak_minus_own": peak - own, "step": peak - own - base, "s_per_step": seconds, "loss": final_loss,
            "views": distiller.num_views}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10, 50, 100, 200], help="C·ipc values (×10)")
    parser.add_argument("--modes", nargs="+", default=["two_phase"], choices=["two_phase", "lagged", "single"])
    parser.add_argument("--chunk", type=int, default=8, help="views per chunk of the two-phase step")
    parser.add_argument("--model", default="test_vit", help="timm model (random weights)")
    parser.add_argument("--syn-res", type=int, default=128)
    parser.add_argument("--crop", type=int, default=64)
    parser.add_argument("--augs", type=int, default=1)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--checkpointing", action="store_true", help="timm activation checkpointing")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--limit", type=float, default=0.15, help="allowed growth of peak - own")
    parser.add_argument("--no-append", action="store_true", help="do not append to benchmarks/RESULTS.md")
    parser.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--mode", default="two_phase", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.child is not None:
        args.images = args.child
        print(json.dumps(child(args)))
        return 0

    # MALLOC_MMAP_THRESHOLD_ pins glibc's (otherwise adaptive) mmap threshold, so that large tensors are mapped and
    # unmapped on free and RSS tracks live memory instead of heap fragmentation that depends on allocation history
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), HF_HUB_OFFLINE="1", MALLOC_MMAP_THRESHOLD_="131072")
    env.pop("TRITON_INTERPRET", None)  # the CPU path of the ops: the interpreter would only add Python overhead
    rows = []
    for mode in args.modes:
        for n in args.sizes:
            cmd = [sys.executable, __file__, "--child", str(n), "--mode", mode, "--chunk", str(args.chunk),
                   "--model", args.model, "--syn-res", str(args.syn_res), "--crop", str(args.crop),
                   "--augs", str(args.augs), "--steps", str(args.steps), "--threads", str(args.threads),
                   "--device", args.device] + (["--checkpointing"] if args.checkpointing else [])
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
            if proc.returncode != 0:
                print(proc.stderr[-4000:], file=sys.stderr)
                return proc.returncode
            row = json.loads(proc.stdout.strip().splitlines()[-1])
            rows.append(row)
            print(f"{mode:>9} N={n:4d}: peak {row['peak'] / MIB:8.1f} MiB, own {row['own'] / MIB:7.1f} MiB, "
                  f"peak-own {row['peak_minus_own'] / MIB:8.1f} MiB, step {row['step'] / MIB:7.1f} MiB, "
                  f"{row['s_per_step']:.2f} s/step", flush=True)

    lines = [
        common.stamp("distill_memory: benchmarks/distill_memory.py"),
        "",
        f"Device: {common.describe_machine(args.device)}; {common.versions()}; model {args.model} (random weights), "
        f"syn_res {args.syn_res}, crop {args.crop}, A={args.augs}, chunk {args.chunk} views, C=10, "
        f"{args.threads} thread(s), checkpointing {'on' if args.checkpointing else 'off'}. MiB = 2^20 B.",
        "",
        "| mode | C·ipc | views | peak MiB | images+Adam MiB | peak − own MiB | step working set MiB | s/step |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['mode']} | {r['images']} | {r['views']} | {r['peak'] / MIB:.1f} | {r['own'] / MIB:.1f} | "
                     f"{r['peak_minus_own'] / MIB:.1f} | {r['step'] / MIB:.1f} | {r['s_per_step']:.2f} |")
    verdicts = []
    ok = True
    for mode in args.modes:
        mine = [r for r in rows if r["mode"] == mode]
        if len(mine) < 2:
            continue
        first, last = mine[0], mine[-1]
        growth = last["peak_minus_own"] / first["peak_minus_own"] - 1
        step_growth = last["step"] / max(first["step"], 1) - 1
        verdict = (f"{mode}: peak − own grows {growth:+.1%} from C·ipc={first['images']} to {last['images']} "
                   f"(limit {args.limit:.0%}); step working set {step_growth:+.1%}")
        if mode in ("two_phase", "lagged"):
            ok = ok and growth < args.limit
            verdict += " — PASS" if ok else " — FAIL"
        verdicts.append(verdict)
    lines += [""] + [f"- {v}" for v in verdicts] + [""]
    text = "\n".join(lines)
    common.publish(text, append=not args.no_append)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
