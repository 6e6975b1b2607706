"""Is the Python API as fast as the command line on a loaded CPU? Per-step distillation time, side by side.

Each variant runs as a fresh process (so that OpenMP starts from scratch) with OMP_WAIT_POLICY, OMP_NUM_THREADS and
SFMKERN_THREADS removed from its environment, while `--busy` busy-loop processes load the CPUs beside it:
  cli             `python -m sfmkern distill ...` (the CLI exports OMP_WAIT_POLICY=PASSIVE itself)
  api             `import sfmkern` first, then `sfmkern.distill(...)` (sfmkern exports PASSIVE before torch loads)
  api_torch_first `import torch` first, then sfmkern (OpenMP already spins: sfmkern caps its threads at idle CPUs)
  api_untouched   `import torch` first with SFMKERN_THREADS=off: the API as it was before sfmkern set threads up
Each child runs the distillation three times (a warm-up of LO steps, LO steps, HI steps; the CLI variant calls
`sfmkern.cli.main([...])` with the same flags as `sfmkern distill`); per-step time = (T(HI) - T(LO)) / (HI - LO),
which cancels model building and set-up. The median over `--repeats` interleaved rounds is reported, with ratios to
the CLI.

    nice -n 10 python benchmarks/api_vs_cli.py --busy 1            # appends a section to benchmarks/RESULTS.md
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

VARIANTS = ("cli", "api", "api_torch_first", "api_untouched")
_CLEARED = ("OMP_WAIT_POLICY", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "SFMKERN_THREADS", "GOMP_SPINCOUNT")

# one child process per variant and round: warm-up run, then LO and HI steps, each timed in the process
_CHILD = """
import sys, time
{first}
import sfmkern
import torch

def run(steps, out):
    if {cli}:
        from sfmkern.cli import main
        rc = main(["--quiet", "distill", "--stats", {stats!r}, "--backbone", {backbone!r}, "--no-pretrained",
                   "--device", "cpu", "--ipc", "{ipc}", "--steps", str(steps), "--syn-res", "{res}", "--crop", "{res}",
                   "--out-dir", out, "--no-resume", "--checkpoint-every", "1000000", "--log-every", str(steps),
                   "--grow-every", "0"])
        assert rc == 0, rc
        return
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        backbone = sfmkern.load_backbone({backbone!r}, pretrained=False, device="cpu")
    stats = sfmkern.ClassStats.load({stats!r}, backbone=backbone)
    sfmkern.distill(stats, backbone, ipc={ipc}, steps=steps, syn_res={res}, crop={res}, out_dir=out, resume=False,
                    checkpoint_every=10**6, log_every=steps, progress=False, grow_every=0)

times = []
for i, steps in enumerate(({lo}, {lo}, {hi})):
    t0 = time.perf_counter()
    run(steps, {out!r} + f"/{{i}}")
    times.append(time.perf_counter() - t0)
print("PER_STEP", (times[2] - times[1]) / ({hi} - {lo}), sfmkern._threads.describe())
"""

_MAKE_STATS = """
import torch, sfmkern
from sfmkern.stats import ClassStats
with torch.random.fork_rng(devices=[]):
    torch.manual_seed(0)
    backbone = sfmkern.load_backbone({backbone!r}, pretrained=False, device="cpu")
g = torch.Generator().manual_seed(1)
centres = torch.randn({classes}, backbone.feature_dim, generator=g)
ClassStats(centres=centres, counts=torch.full(({classes},), 100, dtype=torch.int64),
           classes=[f"c{{i}}" for i in range({classes})], class_to_idx={{f"c{{i}}": i for i in range({classes})}},
           backbone_name=backbone.name, backbone_fingerprint=backbone.fingerprint,
           preprocessing={{"resize": {res}, "crop": {res}, "mean": list(backbone.mean), "std": list(backbone.std),
                          "input_size": backbone.input_size, "feature_kind": backbone.feature_kind}},
           decoder_version="synthetic", skipped=[], features_path=None, run_info={{}}).save({out!r})
"""


def _env(variant: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in _CLEARED}
    env.update(PYTHONPATH=str(ROOT) + os.pathsep + env.get("PYTHONPATH", ""), HF_HUB_OFFLINE="1")
    env.pop("TRITON_INTERPRET", None)  # the torch path on CPU, as users run it
    if variant == "api_untouched":
        env["SFMKERN_THREADS"] = "off"
    return env


def _per_step(variant: str, args, stats: str, out: str) -> tuple[float, str]:
    """(seconds per step, the child's threading description) from one child process."""
    lo, hi = args.steps
    first = "import torch" if variant in ("api_torch_first", "api_untouched") else "import sfmkern"
    code = _CHILD.format(first=first, cli=variant == "cli", backbone=args.backbone, stats=stats, ipc=args.ipc,
                         res=args.res, lo=lo, hi=hi, out=out)
    proc = subprocess.run([sys.executable, "-c", code], env=_env(variant), cwd=ROOT, capture_output=True, text=True)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("PER_STEP ")), None)
    if proc.returncode != 0 or line is None:
        raise RuntimeError(f"{variant} failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
    _, value, how = line.split(" ", 2)
    return float(value), how


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", default="efficientnet_lite0_offline", help="model (random weights)")
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--ipc", type=int, default=1)
    p.add_argument("--res", type=int, default=64, help="synthetic side = crop (px)")
    p.add_argument("--steps", type=int, nargs=2, default=(2, 12), metavar=("LO", "HI"))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--busy", type=int, default=1, help="busy-loop processes started beside the runs")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--no-write", action="store_true", help="do not append to benchmarks/RESULTS.md")
    args = p.parse_args(argv)

    import _common as common

    lo, hi = args.steps
    if not 0 < lo < hi:
        raise SystemExit(f"--steps LO HI must satisfy 0 < LO < HI, got {lo} {hi}")
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.busy)]
    try:
        with tempfile.TemporaryDirectory(prefix="sfmkern-api-vs-cli-") as tmp:
            stats = str(Path(tmp) / "stats.safetensors")
            subprocess.run([sys.executable, "-c", _MAKE_STATS.format(backbone=args.backbone, classes=args.classes,
                                                                     res=args.res, out=stats)],
                           env=_env("api"), cwd=ROOT, check=True)
            load_before = common.load_average()
            per_step: dict[str, list[float]] = {v: [] for v in args.variants}
            how: dict[str, str] = {}
            for r in range(args.repeats):
                for v in args.variants:
                    value, how[v] = _per_step(v, args, stats, str(Path(tmp) / f"{v}-{r}"))
                    per_step[v].append(value)
                    print(f"round {r + 1} {v:>16}: {value:.3f} s/step ({how[v]})", flush=True)
            load_after = common.load_average()
    finally:
        for proc in busy:
            proc.kill()
            proc.wait()

    med = {v: statistics.median(xs) for v, xs in per_step.items()}
    base = med.get("cli")
    lines = [common.stamp("API vs CLI: distillation time per step on a loaded CPU"), "",
             f"{common.describe_machine('cpu')}; {common.versions()}; {args.busy} busy-loop process(es) beside the "
             f"runs; load average {load_before} before, {load_after} after (other jobs included).",
             f"{args.backbone} (random weights), C={args.classes}, ipc={args.ipc}, {args.res} px, per-step time = "
             f"(T({hi} steps) - T({lo} steps)) / {hi - lo} timed inside each child after a warm-up run, median of "
             f"{args.repeats} interleaved rounds (one fresh process per variant and round); OMP_* variables "
             "cleared in every child.", "",
             "| variant | s/step (median) | all rounds | / CLI | threading (sfmkern._threads.describe) |",
             "|---|---:|---|---:|---|"]
    for v in args.variants:
        ratio = f"{med[v] / base:.2f}x" if base else "-"
        lines.append(f"| {v} | {med[v]:.3f} | {', '.join(f'{x:.3f}' for x in per_step[v])} | {ratio} | "
                     f"{how[v]} |")
    text = "\n".join(lines)
    print(text)
    if not args.no_write:
        print(f"appended to {common.append_results(text)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
