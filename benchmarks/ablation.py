"""Ablation of the distillation variants against real-image baselines on two real data sets (issue #11).

    PYTHONPATH=. python benchmarks/ablation.py run --datasets photo-patches --ipcs 1 --methods baselines
    PYTHONPATH=. python benchmarks/ablation.py table --write      # docs/distill.md ablation section + RESULTS.md

Cells: data set x ipc x method x seed. Data sets: `fashion-mnist` (Debian's dataset-fashion-mnist: seeded per-class
subsets of the train and test splits) and `photo-patches` (sfmkern.data.photo_patches: the whole default splits).
Methods: the real-image baselines (random real, centroid at ipc 1 / per-class k-means at ipc > 1, the full-data
probe) and the distillation variants of VARIANTS, each a set of keyword arguments to `sfmkern.distill` (variants
whose arguments this `distill` does not accept are skipped and listed). Every method is scored by the same probe
protocol (`sfmkern.evaluate` in probe mode with a view bank, as in `sfmkern demo`), one probe run per seed; the
seed also seeds the distillation, the random draw and the k-means.

Per data set, the statistics (with their feature cache, which the centroid / k-means selection and the full-data
probe read) and the test features are computed once into WORK/<dataset>/ and reused. Every finished cell is one JSON
line of WORK/results.jsonl keyed by everything that shapes it, so an interrupted or repeated run skips finished
cells, and several processes (one per data set) may append side by side. `table` prints the mean +- std over seeds.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import inspect
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, append_results, describe_machine, git_sha, load_average, stamp, versions  # noqa: E402

DATASETS = ("fashion-mnist", "photo-patches")
BASELINES = ("random-real", "real-select", "full-data")  # real-select: centroid at ipc 1, k-means at ipc > 1
# name -> (what it is, keyword arguments to sfmkern.distill beyond ipc/steps/seed/resolution/init_data, the ipcs it
# applies to: sub-centres change nothing at ipc 1, where "defaults" already is the real start + anchor)
_NOISE_SFM = {"init": "noise", "objective": "sfm", "subcentres": False}
VARIANTS: dict[str, tuple[str, dict, tuple[int, ...]]] = {
    "defaults": ("`sfmkern.distill` with no optional argument (the library defaults; at ipc 1 this is the real "
                 "start with the flow cosine)", {}, (1, 10)),
    "paper": ("the paper: noise start, flow cosine alone, lr 2e-3, a pyramid level every 200 steps",
              {**_NOISE_SFM, "lr": 2e-3, "grow_every": 200}, (1, 10)),
    "sfm-fast": ("the paper's objective with the short-budget schedule: noise start, flow cosine alone, lr 1e-2, "
                 "every level from step 0", _NOISE_SFM, (1, 10)),
    "sfm-fast+real-init": ("sfm-fast started from the real k-means images (lr 2e-3; at ipc 1 = `defaults`)",
                           {**_NOISE_SFM, "init": "real"}, (10,)),
    "sfm-fast+anchor": ("sfm-fast plus the anchoring term (lambda 10, augmented targets)",
                        {**_NOISE_SFM, "objective": "anchored"}, (1, 10)),
    "sfm-fast+subcentres": ("sfm-fast with sub-centre flows", {**_NOISE_SFM, "subcentres": True}, (10,)),
    "real-init+anchor": ("real start, anchoring (lambda 10, augmented targets), sub-centres at ipc 10",
                         {"init": "real", "objective": "anchored", "subcentres": True}, (1, 10)),
    "real-init+anchor-centred": ("real-init+anchor with the anchor on the clean centres, common offset removed",
                                 {"init": "real", "objective": "anchored", "subcentres": True,
                                  "anchor_target": "centred"}, (1, 10)),
    "defaults+mild-aug": ("the defaults with crops of scale (0.5, 1) instead of (0.08, 1)", {"scale": [0.5, 1.0]},
                          (1, 10)),
}
# cells a variant does not run because it is another variant there by construction: (variant, ipc) -> that variant
SAME_AS = {("sfm-fast+real-init", 1): "defaults", ("sfm-fast+subcentres", 1): "sfm-fast"}
DOC = ROOT / "docs" / "distill.md"
TABLE_BEGIN = "<!-- sfmkern:ablation-table:begin -->"
TABLE_END = "<!-- sfmkern:ablation-table:end -->"


# ------------------------------------------------------------------------------------------------ settings
def settings(args) -> dict:
    return {"size": args.size, "fm_train_per_class": args.fm_train, "fm_test_per_class": args.fm_test,
            "steps": {str(k): v for k, v in zip(args.ipcs_all, args.steps, strict=True)}, "epochs": args.epochs,
            "view_bank": args.view_bank, "backbone": args.backbone}


def cell_key(dataset: str, method: str, ipc: int, seed: int, cfg: dict, kwargs: dict | None) -> str:
    ident = {"dataset": dataset, "method": method, "ipc": ipc, "seed": seed, "size": cfg["size"],
             "epochs": cfg["epochs"], "view_bank": cfg["view_bank"], "backbone": cfg["backbone"],
             "data": _data_ident(dataset, cfg)}
    if kwargs is not None:
        ident.update(steps=cfg["steps"][str(ipc)], distill=effective_kwargs(kwargs))
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]


# distill() keywords that the script sets per cell or that do not change the images
_NOT_TRAJECTORY = {"ipc", "steps", "syn_res", "crop", "seed", "device", "max_memory", "out_dir", "resume",
                   "chunk_size", "checkpoint_every", "progress", "log_every", "mode", "classes", "init_data"}


# keywords distill() exposed after cells were recorded, with the value the step had always used then: at that value
# they stay out of the key (the trajectory is the same), so those cells stay valid; any other value enters the key
_EXPOSED_LATER = {"flip_p": repr(0.5), "ratio": repr((3 / 4, 4 / 3))}


def library_defaults() -> dict:
    """distill()'s keyword defaults that shape the images, as reprs."""
    from sfmkern.pipeline import distill

    return {name: repr(p.default) for name, p in inspect.signature(distill).parameters.items()
            if p.default is not inspect.Parameter.empty and name not in _NOT_TRAJECTORY}


def effective_kwargs(kwargs: dict, defaults: dict | None = None) -> dict:
    """Every trajectory keyword of a variant: the library defaults overlaid with the variant's own (reprs), so a
    cell is keyed by what it ran, and goes stale exactly when the library changes a default the variant relies on."""
    out = dict(library_defaults() if defaults is None else defaults)
    out.update({k: repr(tuple(v) if isinstance(v, list) else v) for k, v in kwargs.items()})
    return {k: v for k, v in out.items() if _EXPOSED_LATER.get(k) != v}


def _data_ident(dataset: str, cfg: dict):
    if dataset == "fashion-mnist":
        return [cfg["fm_train_per_class"], cfg["fm_test_per_class"]]
    from sfmkern.data.photo_patches import MAX_SCALE, MIN_SCALE

    return f"default-splits-scale-{MIN_SCALE}-{MAX_SCALE}"


def load_results(path: Path) -> dict[str, dict]:
    out = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            if line.strip():
                rec = json.loads(line)
                out[rec["key"]] = rec
    return out


# ------------------------------------------------------------------------------------------------ one data set
class Prepared:
    """Train/test sources, backbone, statistics (with cached features) and test features of one data set."""

    def __init__(self, dataset: str, cfg: dict, work: Path):
        from sfmkern.backbone import load_backbone
        from sfmkern.demo import cached_test_features, per_class_subset
        from sfmkern.stats import collect_stats

        size = cfg["size"]
        if dataset == "fashion-mnist":
            from sfmkern.data import fashion_mnist

            self.train = per_class_subset(fashion_mnist("train"), cfg["fm_train_per_class"], 0)
            self.test = per_class_subset(fashion_mnist("test"), cfg["fm_test_per_class"], 0)
        elif dataset == "photo-patches":
            from sfmkern.data import photo_patches

            self.train, self.test = photo_patches("train"), photo_patches("test")
        else:
            raise ValueError(f"unknown data set {dataset!r}; choose from {DATASETS}")
        self.dir = work / dataset / f"{cfg['backbone']}-{size}px"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.size = size
        self.backbone = load_backbone(cfg["backbone"], pretrained=True, img_size=None, device="cpu")
        self.stats = collect_stats(self.train, self.backbone, resize=size, crop=size, batch_size=100,
                                   out=self.dir / "stats.safetensors", resume=True, cache_features=True, workers=1,
                                   progress=False)
        self.test_fs = cached_test_features(self.dir / "test-features.safetensors", self.test, self.backbone,
                                            size=size, batch_size=100, fresh=False, progress=False)


def run_cell(prep: Prepared, method: str, ipc: int, seed: int, cfg: dict, kwargs: dict | None) -> dict:
    from sfmkern import baselines
    from sfmkern.evaluation import evaluate
    from sfmkern.pipeline import distill

    size = prep.size
    ev = dict(epochs=cfg["epochs"], runs=1, seed=seed, view_bank=cfg["view_bank"], resize=size, crop=size,
              feature_batch=100, progress=False)
    t0 = time.perf_counter()
    extra = {}
    if method == "random-real":
        report = baselines.random_real(prep.train, prep.backbone, prep.test_fs, ipc=ipc, image_size=size, **ev)
    elif method == "real-select":
        report = baselines.centroid(prep.train, prep.stats, prep.backbone, prep.test_fs, ipc=ipc, image_size=size,
                                    **ev)
    elif method == "full-data":
        report = baselines.full_data(prep.stats, prep.backbone, prep.test_fs, epochs=10, runs=1, seed=seed,
                                     resize=size, crop=size, feature_batch=100, progress=False)
    else:
        steps = cfg["steps"][str(ipc)]
        tag = cell_key("", method, ipc, seed, cfg, kwargs)
        run_dir = prep.dir / "runs" / f"{method}-ipc{ipc}-s{steps}-seed{seed}-{tag}"
        kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}
        ds = distill(prep.stats, prep.backbone, ipc=ipc, steps=steps, syn_res=size, crop=size, seed=seed,
                     out_dir=run_dir, resume=True, checkpoint_every=50, progress=False, init_data=prep.train,
                     **kwargs)
        extra["distill_s"] = round(time.perf_counter() - t0, 1)
        report = evaluate(ds, prep.backbone, prep.test_fs, mode="probe", name=method, **ev)
    return {"top1": float(report.top1[0]), "top5": float(report.top5[0]), "seconds": round(time.perf_counter() - t0, 1),
            **extra}


def supported(kwargs: dict) -> bool:
    from sfmkern.pipeline import distill

    params = inspect.signature(distill).parameters
    return all(k in params for k in kwargs)


def cmd_run(args) -> None:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    torch.set_num_threads(args.threads)
    cfg = settings(args)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    results_path = work / "results.jsonl"
    methods = expand_methods(args.methods)
    for dataset in args.datasets:
        prep = None
        for ipc in args.ipcs:
            for method in methods:
                kwargs = None if method in BASELINES else VARIANTS[method][1]
                if kwargs is not None and ipc not in VARIANTS[method][2]:
                    continue
                if kwargs is not None and not supported(kwargs):
                    print(f"[ablation] skip {method}: this distill() does not accept {sorted(kwargs)}", flush=True)
                    continue
                if method == "full-data" and ipc != args.ipcs[0]:
                    continue
                for seed in args.seeds:
                    key = cell_key(dataset, method, ipc, seed, cfg, kwargs)
                    if key in load_results(results_path):
                        continue
                    if prep is None:
                        t0 = time.perf_counter()
                        prep = Prepared(dataset, cfg, work)
                        print(f"[ablation] {dataset}: prepared in {time.perf_counter() - t0:.0f} s", flush=True)
                    load0 = load_average()
                    res = run_cell(prep, method, ipc, seed, cfg, kwargs)
                    rec = {"key": key, "dataset": dataset, "method": method,
                           "ipc": "all" if method == "full-data" else ipc, "seed": seed, **res,
                           "steps": None if kwargs is None else cfg["steps"][str(ipc)], "distill_kwargs": kwargs,
                           "load": f"{load0} -> {load_average()}", "git": git_sha(),
                           "utc": f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M}", "settings": cfg}
                    with open(results_path, "a") as fh:
                        fh.write(json.dumps(rec) + "\n")
                    print(f"[ablation] {dataset} ipc={rec['ipc']} {method} seed={seed}: top-1 {res['top1']:.2f} "
                          f"({res['seconds']:.0f} s, load {rec['load']})", flush=True)


def expand_methods(names: list[str]) -> list[str]:
    out: list[str] = []
    for name in names:
        if name == "baselines":
            out += list(BASELINES)
        elif name == "variants":
            out += list(VARIANTS)
        elif name in BASELINES or name in VARIANTS:
            out.append(name)
        else:
            raise SystemExit(f"unknown method {name!r}: choose baselines, variants, {', '.join(BASELINES)} or "
                             f"{', '.join(VARIANTS)}")
    return list(dict.fromkeys(out))


# ------------------------------------------------------------------------------------------------ table
def _cells(records: list[dict], cfg: dict, used: list | None = None) -> dict[tuple, list[float]]:
    """(method, dataset, ipc) -> top-1 per seed, for records made under the current settings and variant set (the
    records themselves are appended to `used`)."""
    out: dict[tuple, list[float]] = {}
    for rec in records:
        method = rec["method"]
        kwargs = None if method in BASELINES else VARIANTS.get(method, (None, None, None))[1]
        if method not in BASELINES and kwargs is None:
            continue
        ipc = rec["ipc"]
        key = cell_key(rec["dataset"], method, 1 if ipc == "all" else int(ipc), rec["seed"], cfg, kwargs)
        if key != rec["key"]:
            continue
        out.setdefault((method, rec["dataset"], str(ipc)), []).append(rec["top1"])
        if used is not None:
            used.append(rec)
    return out


def acceptance(cells: dict, dataset: str = "photo-patches") -> list[str]:
    """Issue #11's margins for the library defaults: ipc 1 >= centroid + 3 points, ipc 10 >= k-means real + 2."""
    lines = []
    for ipc, margin, base in (("1", 3.0, "centroid"), ("10", 2.0, "k-means real")):
        sfm, ref = cells.get(("defaults", dataset, ipc)), cells.get(("real-select", dataset, ipc))
        if not sfm or not ref:
            lines.append(f"- {dataset} ipc {ipc}: defaults vs {base} + {margin:g}: not measured")
            continue
        diff = float(np.mean(sfm) - np.mean(ref))
        verdict = "PASS" if diff >= margin else "FAIL"
        lines.append(f"- {dataset} ipc {ipc}: defaults − {base} = {diff:+.1f} points (target ≥ +{margin:g}): "
                     f"{verdict} (n = {len(sfm)} / {len(ref)} seeds)")
    return lines


def _fmt(values: list[float] | None) -> str:
    if not values:
        return "—"
    a = np.asarray(values, dtype=np.float64)
    std = a.std(ddof=1) if a.size > 1 else 0.0
    return f"{a.mean():.1f} ± {std:.1f}" + ("" if a.size >= 3 else f" (n={a.size})")


def render_table(records: list[dict], cfg: dict, ipcs: list[int], command: str) -> str:
    used: list[dict] = []
    cells = _cells(records, cfg, used)
    cols = [(d, str(k)) for d in DATASETS for k in ipcs]
    names = {"random-real": "random real", "real-select": "centroid (1) / k-means real (10)",
             "full-data": "*reference:* full-data probe (every training image; an upper bound, not a result of "
                          "distilled images)"}
    lines = ["| method | " + " | ".join(f"{d} ipc {k}" for d, k in cols) + " |",
             "|---|" + "---:|" * len(cols)]
    for method in list(BASELINES) + list(VARIANTS):
        if method == "full-data":
            row = [_fmt(cells.get((method, d, "all"))) for d, _ in cols]
        else:
            row = [f"= {SAME_AS[(method, int(k))]}" if (method, int(k)) in SAME_AS else _fmt(cells.get((method, d, k)))
                   for d, k in cols]
        label = names.get(method, f"SFM: {method}")
        lines.append(f"| {label} | " + " | ".join(row) + " |")
    steps = ", ".join(f"{s} steps at ipc {k}" for k, s in cfg["steps"].items())
    variants = "\n".join(f"- `{m}`: {desc} (`{json.dumps(kw)}`)" for m, (desc, kw, _) in VARIANTS.items())
    shown = ("init", "objective", "lr", "grow_every", "subcentres", "scale")
    resolved = ", ".join(f"{k}={v}" for k, v in library_defaults().items() if k in shown)
    variants += f"\n\nThe library defaults these cells ran with: {resolved}."
    seeds = sorted({r["seed"] for r in used})
    used.sort(key=lambda r: r["utc"])
    loads = [r["load"] for r in used if "load" in r]
    cpu = sum(r.get("seconds", 0.0) for r in used) / 60
    text = [
        f"Top-1 % on real test images, mean ± std over seeds {seeds} (one probe run per seed; the seed also seeds the "
        f"distillation, the random draw and the k-means). Backbone `{cfg['backbone']}` (ImageNet weights), "
        f"{cfg['size']} px, {steps}; probe: `sfmkern.evaluate` mode probe, {cfg['epochs']} epochs, a bank of "
        f"{cfg['view_bank']} augmented views per image. Fashion-MNIST: {cfg['fm_train_per_class']} training and "
        f"{cfg['fm_test_per_class']} test images per class (seeded subsets); photo-patches: the default splits "
        "(300 / 100 patches per class from disjoint regions of 10 photos).",
        "",
        "\n".join(lines),
        "",
        "Acceptance (issue #11, library defaults on the second data set):",
        "\n".join(acceptance(cells)),
        "",
        "Variants:",
        variants,
        "",
        f"Command: `{command}`. Machine: {describe_machine()}; {versions()}; single-threaded processes, at most two "
        f"at a time, each in its own session; load average (1/5/15 min) from {loads[0] if loads else 'n/a'} to "
        f"{loads[-1] if loads else 'n/a'} over the cells ({cpu:.0f} min of wall time in the cells shown). "
        "'—': not measured in the time available; '= X': the same run as variant X by construction (at ipc 1 "
        "the real start is the centroid image either way, and a class has one sub-centre).",
    ]
    return "\n".join(text)


def cmd_table(args) -> None:
    cfg = settings(args)
    records = list(load_results(Path(args.work) / "results.jsonl").values())
    command = ("PYTHONPATH=. python benchmarks/ablation.py run " + " ".join(sys.argv[2:]).replace("--write", "")
               ).strip() if args.command is None else args.command
    table = render_table(records, cfg, args.ipcs_all, command)
    print(table)
    if args.write:
        doc = DOC.read_text()
        if TABLE_BEGIN not in doc or TABLE_END not in doc:
            raise SystemExit(f"{DOC}: markers {TABLE_BEGIN} / {TABLE_END} not found")
        head, rest = doc.split(TABLE_BEGIN, 1)
        _, tail = rest.split(TABLE_END, 1)
        DOC.write_text(f"{head}{TABLE_BEGIN}\n{table}\n{TABLE_END}{tail}")
        append_results(f"{stamp('ablation: benchmarks/ablation.py')}\n\n{table}\n")
        print(f"[ablation] wrote {DOC} and benchmarks/RESULTS.md", file=sys.stderr)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("action", choices=("run", "table"))
    p.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=DATASETS)
    p.add_argument("--ipcs", nargs="+", type=int, default=[1, 10], help="ipcs to run (subset of 1 10)")
    p.add_argument("--methods", nargs="+", default=["baselines", "variants"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--steps", nargs=2, type=int, default=[200, 40], metavar=("STEPS_IPC1", "STEPS_IPC10"),
                   help="the fixed step budget at ipc 1 and ipc 10")
    p.add_argument("--size", type=int, default=64, help="image side (px) of statistics, synthetic and test images")
    p.add_argument("--fm-train", type=int, default=300, help="Fashion-MNIST training images per class")
    p.add_argument("--fm-test", type=int, default=100, help="Fashion-MNIST test images per class")
    p.add_argument("--epochs", type=int, default=300, help="probe epochs")
    p.add_argument("--view-bank", type=int, default=8, help="augmented views per image in the probe's bank")
    p.add_argument("--backbone", default="efficientnet_lite0_offline")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--work", default=str(ROOT / "benchmarks" / "ablation-work"))
    p.add_argument("--write", action="store_true", help="table: write docs/distill.md's section and RESULTS.md")
    p.add_argument("--command", default=None, help="table: the command line to quote (default: this one)")
    args = p.parse_args(argv)
    args.ipcs_all = [1, 10]
    if any(k not in args.ipcs_all for k in args.ipcs):
        p.error(f"--ipcs must be a subset of {args.ipcs_all}")
    (cmd_run if args.action == "run" else cmd_table)(args)


if __name__ == "__main__":
    main()
