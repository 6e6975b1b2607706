"""Seconds per distillation step: sfmkern vs LGM (as coded) vs the public SFM step, with FLOPs and (GPU) MFU.

One process, one backbone with random weights; for each (C, ipc, A) of the grid, the four methods of
benchmarks/_common.py run on the same Distiller, interleaved over repeats (the order rotates each repeat, after one
untimed warm-up round), so load changes hit every method alike; the median is reported and ratios are taken within
the run. FLOPs per step are counted once per (method, configuration) with torch.utils.flop_counter.FlopCounterMode
(matmuls/convolutions/attention, forward and backward, recomputation included). On a GPU the MFU of each step is
FLOPs / (seconds × peak), with the peak a measured bf16 8192² matmul rate. Appends a table to benchmarks/RESULTS.md.

Recipes section (after the equal-A table): each method as its users run it. LGM at A = 10 and A = 3 (ipc·A·C real
images per step) against sfmkern at A = 1 for each C×ipc of --recipes; per step (LGM's real batch a random tensor)
and end to end, where LGM's real batch is decoded every step from JPEG files on disk (written to a temp folder from
scikit-image's photos) by its kind of loader (torchvision ImageFolder: PIL + Resize + CenterCrop + ToTensor, a
DataLoader with --loader-workers workers) and sfmkern's statistics are already collected (its end to end is its step).

    python benchmarks/runtime.py --quick          # CPU, ViT-S/16 at 32 px, < 5 min on 2 cores
    python benchmarks/runtime.py                  # GPU: ViT-B/16 at 224 px, C up to 1000, MFU at C=1000
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import _common as common
import torch
from torch.utils.flop_counter import FlopCounterMode


def matmul_peak(device: torch.device, n: int = 8192, iters: int = 20) -> float:
    """Measured dense bf16 matmul rate in FLOP/s (n×n @ n×n, best of 3 timings of `iters` products)."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    best = float("inf")
    for _ in range(3):
        common.sync(device)
        t0 = time.perf_counter()
        for _ in range(iters):
            a @ b
        common.sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 * iters / best


def count_flops(case, method: str) -> int:
    common.prepare(case, method)
    with FlopCounterMode(display=False) as counter:
        common.run_step(case, method)
    return int(counter.get_total_flops())


def _timed_step(case, method: str, device, real_batch=None) -> tuple[float, float] | None:
    """(wall seconds, this process's CPU seconds) of one step (None on CUDA out-of-memory)."""
    common.prepare(case, method)
    try:
        common.sync(device)
        t0, c0 = time.perf_counter(), time.process_time()
        float(common.run_step(case, method, real_batch))
        common.sync(device)
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        return None
    return time.perf_counter() - t0, time.process_time() - c0


def _auto_mode(case) -> str:
    """The mode `mode="auto"` picks for this case with the chunk from the default budget of its device."""
    d = case.distiller
    fixed = d.chunk_size
    d.chunk_size = None
    try:
        return d.resolve_mode("auto")
    finally:
        d.chunk_size = fixed


def run_recipes(args, backbone, device) -> list[str]:
    """The recipe section's lines: per-step and end-to-end seconds and FLOPs of LGM (A=10, 3) vs sfmkern (A=1)."""
    recipes = common.parse_recipes(args.recipes)
    folder = Path(tempfile.mkdtemp(prefix="sfmkern-lgm-jpegs-"))
    t0 = time.perf_counter()
    try:
        common.write_jpeg_folder(folder, max(c for c, _ in recipes))
        files = sorted(folder.rglob("*.jpg"))
        write_s = time.perf_counter() - t0
        mean_kib = sum(f.stat().st_size for f in files) / len(files) / 1024
        out = []
        for c, ipc in recipes:
            out.append(_one_recipe(args, backbone, device, folder, c, ipc))
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    lines = [
        "### Recipes: each method as its users run it (LGM at A=10 and A=3 with its real loader; sfmkern at A=1)",
        "",
        f"LGM's real batch per step: ipc·A·C JPEGs ({len(files)} files, {mean_kib:.0f} KiB on average, longer side "
        f"300-600 px, written in {write_s:.0f} s to a temp folder and read back through the page cache) decoded by "
        f"torchvision ImageFolder (PIL) + Resize({args.syn_res}) + CenterCrop({args.syn_res}) + ToTensor in a "
        f"DataLoader with {args.loader_workers} worker process(es), prefetch_factor 1; end to end = the steady-state "
        f"seconds per step of a loop that takes its batch from the loader (2 untimed steps fill the queue, then "
        f"{args.repeats} timed). sfmkern end to end = its step (statistics already collected; no image in the loop). "
        "Per step: LGM's batch is a random tensor (as in the equal-A table). GFLOP per step (forward + backward, "
        "recomputation included; decoding not counted) beside every time. Speed-up = LGM s/step ÷ sfmkern s/step "
        "(sfmkern at the mode `auto` picks under the default budget of the device; memory-flat modes beside it).",
        "",
        "| C | ipc | method | A | views | per step s (GFLOP) | end to end s/step | loader alone img/s |",
        "|---:|---:|---|---:|---:|---:|---:|---:|",
    ]
    verdicts = []
    for rows, verdict in out:
        lines += rows
        verdicts += verdict
    return lines + [""] + verdicts + [""]


def _one_recipe(args, backbone, device, folder: Path, c: int, ipc: int):
    cells = [("lgm", a) for a in common.RECIPE_LGM_AUGS] + [(m, 1) for m in common.RECIPE_SFM_METHODS]
    cases = {a: common.make_case(backbone, c, ipc, a, syn_res=args.syn_res, crop=args.crop, chunk=args.chunk)
             for a in common.RECIPE_LGM_AUGS}
    sfm_case = common.make_case(backbone, c, ipc, 1, syn_res=args.syn_res, crop=args.crop, chunk=args.chunk)
    auto = {"single": "sfm_single", "two_phase": "sfm_two_phase"}[_auto_mode(sfm_case)]

    def case_of(method, a):
        return cases[a] if method == "lgm" else sfm_case

    times = {cell: [] for cell in cells}
    for r in range(args.repeats + 1):  # interleaved, rotating order, first round untimed
        order = cells[r % len(cells):] + cells[: r % len(cells)]
        for cell in order:
            t = _timed_step(case_of(*cell), cell[0], device) if times[cell] is not None else None
            if t is None:
                times[cell] = None
            elif r > 0:
                times[cell].append(t)
    flops = {cell: count_flops(case_of(*cell), cell[0]) if times[cell] and not args.no_flops else None
             for cell in cells}
    e2e, loader_rate = {}, {}
    for a in common.RECIPE_LGM_AUGS:
        if not times[("lgm", a)]:
            continue
        loader = common.lgm_loader(folder, c, ipc * a, args.syn_res, args.loader_workers)
        t0 = time.perf_counter()
        for _ in range(2):
            next(loader)
        # the loader alone (its workers start and prefetch when the iterator is made, so a slight overestimate)
        loader_rate[a] = 2 * c * ipc * a / (time.perf_counter() - t0)
        steps = []
        for k in range(args.repeats + 2):
            common.sync(device)
            t0 = time.perf_counter()
            batch = next(loader)
            _timed_step(cases[a], "lgm", device, batch)  # LGM's step: forward, backward, Adam
            if k >= 2:
                steps.append(time.perf_counter() - t0)
        e2e[a] = statistics.median(steps)
        del loader
    common.prepare_free(backbone)
    med = {cell: statistics.median(t[0] for t in ts) if ts else None for cell, ts in times.items()}
    cpu = {cell: statistics.median(t[1] for t in ts) if ts else None for cell, ts in times.items()}
    rows = []
    for cell in cells:
        method, a = cell
        name = f"LGM (A={a})" if method == "lgm" else common.LABELS[method] + (" ← auto" if method == auto else "")
        t = med[cell]
        per = "OOM" if t is None else f"{t:.3f}" + (f" ({flops[cell] / 1e9:.1f})" if flops[cell] else "")
        end = (f"{e2e[a]:.3f}" if a in e2e else "–") if method == "lgm" else per.split(" ")[0]
        rate = f"{loader_rate[a]:.0f}" if method == "lgm" and a in loader_rate else "–"
        rows.append(f"| {c} | {ipc} | {name} | {a} | {c * ipc * a} | {per} | {end} | {rate} |")
    verdicts = []
    for a in common.RECIPE_LGM_AUGS:  # is the loading hidden behind LGM's step on this device?
        if a in loader_rate and med.get(("lgm", a)):
            load_s, step_s = c * ipc * a / loader_rate[a], med[("lgm", a)]
            verdicts.append(f"- recipe C={c}, ipc={ipc}, LGM (A={a}): its loader alone takes {load_s:.3f} s per step "
                            f"for {c * ipc * a} JPEGs ({args.loader_workers} workers) against its {step_s:.3f} s step: "
                            + ("hidden behind the step here (end to end ≈ per step)" if load_s < step_s
                               else "the loader bounds LGM's end to end"))
    for a, goal_step, goal_e2e in ((3, 6, 8), (10, None, None)):
        t_lgm, mine = med.get(("lgm", a)), med.get((auto, 1))
        if not t_lgm or not mine:
            continue
        for m in common.RECIPE_SFM_METHODS:
            t_m = med.get((m, 1))
            if not t_m:
                continue
            ratio, ratio_e2e = t_lgm / t_m, (e2e[a] / t_m if a in e2e else None)
            ratio_cpu = cpu[("lgm", a)] / cpu[(m, 1)] if device.type == "cpu" else None
            fl = f"; per step in process CPU time {ratio_cpu:.2f}×" if ratio_cpu else ""
            if flops.get(("lgm", a)) and flops.get((m, 1)):
                fl += f"; FLOP ratio {flops[('lgm', a)] / flops[(m, 1)]:.2f}×"
            check = ""
            if goal_step and m == auto:
                ok_e2e = "PASS" if ratio_e2e and ratio_e2e >= goal_e2e else "FAIL"
                check = (f" (goal ≥ {goal_step}× per step: {'PASS' if ratio >= goal_step else 'FAIL'}; "
                         f"≥ {goal_e2e}× end to end: {ok_e2e})")
            verdicts.append(f"- recipe C={c}, ipc={ipc}: LGM (A={a}) / {common.LABELS[m]} (A=1): per step "
                            f"**{ratio:.2f}×**, end to end **{ratio_e2e:.2f}×**{fl}{check}"
                            if ratio_e2e else f"- recipe C={c}, ipc={ipc}: LGM (A={a}) / {common.LABELS[m]}: "
                            f"per step **{ratio:.2f}×**{fl}{check}")
    return rows, verdicts


def main() -> int:
    parser = common.add_step_arguments(argparse.ArgumentParser(description=__doc__.split("\n")[0]))
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds (after one warm-up round)")
    parser.add_argument("--no-flops", action="store_true", help="skip the FLOP count")
    args = common.apply_preset(parser.parse_args())
    device = torch.device(args.device)
    os.environ.pop("TRITON_INTERPRET", None)
    torch.set_num_threads(args.threads)
    malloc = "not applicable"
    if device.type == "cpu":
        # what `sfmkern distill` does on its first CPU phase; every method of this process shares it, LGM included.
        # SFMKERN_MALLOC=off skips it (measured at --quick: the recipe ratios did not change, RESULTS.md 2026-11-30)
        from sfmkern import _malloc

        _malloc.configure()
        malloc = _malloc.describe()
    grid = common.parse_grid(args.grid)

    load_before = common.load_average()
    t_start = time.perf_counter()
    peak = matmul_peak(device) if device.type == "cuda" else None
    backbone = common.load_model(args.model, args.crop, device)
    common.warm_up(backbone, syn_res=args.syn_res, crop=args.crop)
    results = {}  # (config, method) -> {"times": [...], "flops": int | None, "oom": bool}
    for c, ipc, a in grid:
        case = common.make_case(backbone, c, ipc, a, syn_res=args.syn_res, crop=args.crop, chunk=args.chunk)
        methods = list(args.methods)
        cells = {m: {"times": [], "cpu": [], "flops": None, "oom": False} for m in methods}
        for r in range(args.repeats + 1):
            order = methods[r % len(methods):] + methods[: r % len(methods)]
            for m in order:
                if cells[m]["oom"]:
                    continue
                common.prepare(case, m)
                try:
                    common.sync(device)
                    t0, c0 = time.perf_counter(), time.process_time()
                    loss = common.run_step(case, m)
                    float(loss)
                    common.sync(device)
                except torch.cuda.OutOfMemoryError:
                    cells[m]["oom"] = True
                    torch.cuda.empty_cache()
                    continue
                if r > 0:
                    cells[m]["times"].append(time.perf_counter() - t0)
                    cells[m]["cpu"].append(time.process_time() - c0)
        if not args.no_flops:
            for m in methods:
                if not cells[m]["oom"]:
                    cells[m]["flops"] = count_flops(case, m)
        for m in methods:
            results[(c, ipc, a), m] = cells[m]
            t = statistics.median(cells[m]["times"]) if cells[m]["times"] else None
            print(f"{m:>14} C={c:4d} ipc={ipc} A={a}: "
                  + ("OOM" if t is None else f"{t:.3f} s/step")
                  + (f", {cells[m]['flops'] / 1e9:.1f} GFLOP" if cells[m]["flops"] else ""), flush=True)
        del case
        common.prepare_free(backbone)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    recipe_lines = run_recipes(args, backbone, device) if args.recipes else []
    if device.type == "cuda":
        torch.cuda.empty_cache()
    elapsed = time.perf_counter() - t_start

    def sec(cfg, m):
        cell = results.get((cfg, m))
        return statistics.median(cell["times"]) if cell and cell["times"] else None

    def flops(cfg, m):
        cell = results.get((cfg, m))
        return cell["flops"] if cell else None

    def cpu_sec(cfg, m):
        cell = results.get((cfg, m))
        return statistics.median(cell["cpu"]) if cell and cell["cpu"] else None

    def best_sfm(cfg):
        ts = [t for t in (sec(cfg, "sfm_single"), sec(cfg, "sfm_two_phase")) if t is not None]
        return min(ts) if ts else None


    dev = common.describe_machine(args.device)
    n_params = sum(p.numel() for p in backbone.model.parameters())
    lines = [
        common.stamp("runtime: benchmarks/runtime.py" + (" --quick" if args.quick else "")),
        "",
        f"Device: {dev}; {common.versions()}; model {args.model} "
        f"({n_params / 1e6:.1f}M parameters, random weights), crop {args.crop}, "
        f"syn_res {args.syn_res}, two-phase chunk {args.chunk} views"
        + (f", {args.threads} thread(s), {malloc} (shared by every method)" if device.type == "cpu" else "")
        + f"; median of {args.repeats} interleaved rounds after a warm-up round; one step = forward, backward and "
        f"Adam. Ratios: time / the faster sfmkern mode of the same configuration. "
        + (f"Measured bf16 matmul peak {peak / 1e12:.0f} TFLOP/s. " if peak else "")
        + f"Load average before: {load_before}, after: {common.load_average()}; run took {elapsed:.0f} s.",
        "",
        "| C | ipc | A | views | " + " | ".join(f"{common.LABELS[m]} s/step (×, GFLOP"
                                             + (", MFU" if peak else "") + ")" for m in args.methods) + " |",
        "|---:|---:|---:|---:|" + "---:|" * len(args.methods),
    ]
    for cfg in grid:
        ref = best_sfm(cfg)
        cells = []
        for m in args.methods:
            t = sec(cfg, m)
            if t is None:
                cells.append("OOM")
                continue
            cell = results[cfg, m]
            parts = [f"{ref and t / ref:.2f}×" if ref else "–"]
            if cell["flops"]:
                parts.append(f"{cell['flops'] / 1e9:.1f}")
                if peak:
                    parts.append(f"{cell['flops'] / t / peak:.0%}")
            cells.append(f"{t:.3f} ({', '.join(parts)})")
        lines.append(f"| {cfg[0]} | {cfg[1]} | {cfg[2]} | {cfg[0] * cfg[1] * cfg[2]} | " + " | ".join(cells) + " |")
    lines.append("")

    def verdict(other, cfg, goal, aim, mine_method=None):
        theirs = sec(cfg, other)
        mine = sec(cfg, mine_method) if mine_method else best_sfm(cfg)
        name = common.LABELS[mine_method] if mine_method else "sfmkern (faster mode)"
        if theirs is None or mine is None:
            return f"- {common.LABELS[other]} / {name} at C={cfg[0]}, ipc={cfg[1]}, A={cfg[2]}: not measured"
        r = theirs / mine
        return (f"- time, {common.LABELS[other]} / {name} at C={cfg[0]}, ipc={cfg[1]}, A={cfg[2]}: **{r:.2f}×** "
                f"(goal ≥ {goal}×, aim {aim}×: {'PASS' if r >= goal else 'FAIL'})")

    if "lgm" in args.methods:
        lines.append(verdict("lgm", (100, 1, 3), 4, 6))
        lines.append(verdict("lgm", (100, 1, 3), 4, 6, "sfm_two_phase"))
    for m, goal in (("sfm_two_phase", 1.6), ("sfm_lagged", 1.1), ("sfm_two_phase_ckpt", None)):
        for cfg in grid:
            t, single = sec(cfg, m), sec(cfg, "sfm_single")
            if t and single and cfg[0] * cfg[1] * cfg[2] >= args.chunk:
                check = f" (goal ≤ {goal}×: {'PASS' if t / single <= goal else 'FAIL'})" if goal else ""
                cpu = (f"; process CPU time {cpu_sec(cfg, m) / cpu_sec(cfg, 'sfm_single'):.2f}×"
                       if device.type == "cpu" else "")
                fl = flops(cfg, m), flops(cfg, "sfm_single")
                lines.append(f"- time, {common.LABELS[m]} / sfmkern single-phase at C={cfg[0]}, ipc={cfg[1]}, "
                             f"A={cfg[2]}: **{t / single:.2f}×**{check}{cpu}"
                             + (f"; FLOPs {fl[0] / fl[1]:.2f}×" if all(fl) else ""))
    if "public_sfm" in args.methods:
        for cfg in grid:
            lines.append(verdict("public_sfm", cfg, 1.0, 1.3, "sfm_single"))

    for other in ("lgm", "public_sfm"):  # the compute-bound ceiling of the time ratios above
        for cfg in grid:
            theirs, mine = flops(cfg, other), flops(cfg, "sfm_single")
            if theirs and mine and cfg in ((100, 1, 3), (100, 1, 1)):
                lines.append(f"- FLOPs per step, {common.LABELS[other]} / sfmkern single-phase at C={cfg[0]}, "
                             f"ipc={cfg[1]}, A={cfg[2]}: {theirs / mine:.2f}× (what the time ratio tends to when "
                             f"the step is compute-bound)")
    if peak:
        big = [cfg for cfg in grid if cfg[0] == 1000]
        for cfg in big:
            for m in ("sfm_single", "sfm_two_phase"):
                t, cell = sec(cfg, m), results.get((cfg, m))
                if t and cell and cell["flops"]:
                    mfu = cell["flops"] / t / peak
                    lines.append(f"- MFU, {common.LABELS[m]} at C={cfg[0]}, ipc={cfg[1]}, A={cfg[2]}: **{mfu:.0%}** "
                                 f"(goal ≥ 50%: {'PASS' if mfu >= 0.5 else 'FAIL'})")
    else:
        lines.append("- MFU: not measured (no GPU)")
    text = "\n".join(lines + [""] + recipe_lines) + "\n"
    common.publish(text, append=not args.no_append)
    return 0


if __name__ == "__main__":
    sys.exit(main())
