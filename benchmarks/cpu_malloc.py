"""CPU distillation steps with and without sfmkern's glibc malloc set-up (sfmkern/_malloc.py), side by side in one
run: each setting in its own fresh process (the set-up is process-wide), interleaved over repeats; wall, user and
system seconds and minor page faults per step from getrusage.

    python benchmarks/cpu_malloc.py                     # EfficientNet-Lite0 at 128 px, C=10, ipc=10 (the demo's shape)
    python benchmarks/cpu_malloc.py --model test_vit --res 32 --steps 2    # seconds
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import _common as common

_CHILD = """
import json, resource, sys, time
sys.path.insert(0, {bench!r})
import torch
from sfmkern import _malloc
import _common as common
result = _malloc.configure()
torch.set_num_threads({threads})
backbone = common.load_model({model!r}, {res}, torch.device("cpu"))
case = common.make_case(backbone, {classes}, {ipc}, 1, syn_res={res}, crop={res}, chunk=10**6)
common.prepare(case, "sfm_single")
common.run_step(case, "sfm_single")  # warm-up
r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
for _ in range({steps}):
    common.run_step(case, "sfm_single")
r1, t1 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
n = {steps}
print(json.dumps({{"malloc": result, "wall": (t1 - t0) / n, "user": (r1.ru_utime - r0.ru_utime) / n,
                  "sys": (r1.ru_stime - r0.ru_stime) / n, "minflt": (r1.ru_minflt - r0.ru_minflt) / n,
                  "maxrss_mib": r1.ru_maxrss / 1024}}))
"""


def run_child(args, enabled: bool) -> dict:
    env = dict(os.environ, OMP_WAIT_POLICY=os.environ.get("OMP_WAIT_POLICY", "PASSIVE"), HF_HUB_OFFLINE="1")
    env.pop("SFMKERN_MALLOC", None)
    if not enabled:
        env["SFMKERN_MALLOC"] = "off"
    code = _CHILD.format(bench=str(Path(__file__).resolve().parent), threads=args.threads, model=args.model,
                         res=args.res, classes=args.classes, ipc=args.ipc, steps=args.steps)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise SystemExit(f"child failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tf_efficientnet_lite0", help="timm model (random weights)")
    parser.add_argument("--res", type=int, default=128, help="image side (synthetic images and crops)")
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--ipc", type=int, default=10)
    parser.add_argument("--steps", type=int, default=4, help="timed steps per process (after one warm-up)")
    parser.add_argument("--repeats", type=int, default=2, help="processes per setting, interleaved")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-append", action="store_true", help="print only, do not append to RESULTS.md")
    args = parser.parse_args()
    load_before = common.load_average()
    runs: dict[bool, list[dict]] = {True: [], False: []}
    for r in range(args.repeats):
        for enabled in ((False, True) if r % 2 == 0 else (True, False)):
            runs[enabled].append(run_child(args, enabled))
            got = runs[enabled][-1]
            print(f"{'sfmkern malloc' if enabled else 'glibc default ':>14}: {got['wall']:.3f} s/step wall, "
                  f"{got['user']:.3f} user, {got['sys']:.3f} sys, {got['minflt']:.0f} page faults/step", flush=True)

    def med(enabled, key):
        return statistics.median(run[key] for run in runs[enabled])

    rows = [f"| {'sfmkern (thresholds 1 GiB)' if e else 'glibc default'} | {med(e, 'wall'):.3f} | {med(e, 'user'):.3f} "
            f"| {med(e, 'sys'):.3f} | {med(e, 'minflt'):,.0f} | {med(e, 'maxrss_mib'):,.0f} |" for e in (False, True)]
    text = "\n".join([
        common.stamp("cpu_malloc: benchmarks/cpu_malloc.py"),
        "",
        f"Machine: {common.describe_machine()}; {common.versions()}. One sfmkern single-phase step of "
        f"`{args.model}` (random weights) at {args.res} px, C = {args.classes}, ipc = {args.ipc}, A = 1, "
        f"{args.threads} threads; medians of {args.repeats} fresh processes per setting (interleaved), {args.steps} "
        f"timed steps each after a warm-up. Load average before: {load_before}; after: {common.load_average()}.",
        "",
        "| malloc | wall s/step | user s/step | sys s/step | minor page faults/step | peak RSS MiB |",
        "|---|---:|---:|---:|---:|---:|",
        *rows,
        "",
        f"- step time, default / sfmkern: **{med(False, 'wall') / med(True, 'wall'):.2f}×**; system time "
        f"{med(False, 'sys'):.2f} s → {med(True, 'sys'):.2f} s per step",
    ])
    common.publish(text, append=not args.no_append)
    return 0


if __name__ == "__main__":
    sys.exit(main())
