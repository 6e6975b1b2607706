"""The `sfmkern` command line (also `python -m sfmkern`): subcommands stats, distill, eval, demo and plan.

    sfmkern stats   --data train/ --backbone dinov2_vitb --out stats.safetensors [--cache-features]
    sfmkern distill --stats stats.safetensors --backbone dinov2_vitb --out-dir run/ --ipc 1 --steps 5000
    sfmkern eval    --distilled run/distilled.safetensors --backbone dinov2_vitb --test val/ [--mode inherit]
    sfmkern demo    --out demo/ [--quick]
    sfmkern plan    --backbone dinov2_vitb --classes 1000 --ipc 10 --max-memory 80GiB --tflops 400

Flags mirror the Python API (`collect_stats`, `distill`, `evaluate`, `sfmkern.baselines`); `--config FILE` reads
the same options from a YAML or JSON file (see `sfmkern.config`), and explicit flags win over it. Data is an
image folder (root/<class>/<image>), webdataset tar shards (a .tar file, a folder of them or a glob),
`fashion-mnist:train|test[:ROOT]` or `photo-patches:train|test`. Bad input exits with status 2 (usage) or 1
(anything else) and one line on stderr; `--debug` shows the traceback instead. Long work shows tqdm progress on
stderr (`--quiet` hides it).
Unless already set, OMP_WAIT_POLICY=PASSIVE is exported before torch is imported (see `main`).
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import os
import sys
import tempfile
from pathlib import Path

from sfmkern import __version__
from sfmkern.config import options_for, read_config

EXIT_USAGE = 2
EXIT_FAILURE = 1
EXIT_INTERRUPTED = 130


class UsageError(Exception):
    """Bad command-line input detected after parsing (a missing required option, an inconsistent combination)."""


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: `sfmkern <cmd>: error: <reason> (see --help)`, exit status 2."""

    def error(self, message: str):  # noqa: D401 - argparse API
        self.exit(EXIT_USAGE, f"{self.prog}: error: {_one_line(message)} (see {self.prog} --help)\n")


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


# ------------------------------------------------------------------------------------------------ inputs
def open_data(spec: str):
    """An sfmkern.data source from a command-line spec.

    `fashion-mnist:train`, `fashion-mnist:test` (optionally `:ROOT`, a folder with the IDX files);
    `photo-patches:train`, `photo-patches:test` (sfmkern.data.photo_patches with its default splits); a folder of
    class sub-folders (ImageFolder); a .tar file, a folder of .tar files or a glob of them (TarShards).
    Raises FileNotFoundError naming the spec when nothing matches.
    """
    from sfmkern import data

    if not isinstance(spec, str) or not spec:
        raise UsageError(f"data must be a path or fashion-mnist:train|test, got {spec!r}")
    if spec.lower().startswith(("fashion-mnist:", "fashion_mnist:")):
        parts = spec.split(":", 2)
        split = parts[1]
        root = parts[2] if len(parts) > 2 and parts[2] else None
        if split not in ("train", "test"):
            raise UsageError(f"data {spec!r}: the Fashion-MNIST split must be train or test, got {split!r}")
        return data.fashion_mnist(split, root=root)
    if spec.lower().startswith(("photo-patches:", "photo_patches:")):
        split = spec.split(":", 1)[1]
        if split not in ("train", "test"):
            raise UsageError(f"data {spec!r}: the photo-patches split must be train or test, got {split!r}")
        return data.photo_patches(split)
    path = Path(spec)
    if path.is_dir():
        has_subdirs = any(e.is_dir() and not e.name.startswith(".") for e in os.scandir(path))
        if not has_subdirs and any(path.glob("*.tar")):
            return data.TarShards(str(path))
        return data.ImageFolder(path)
    if path.is_file():
        if path.suffix.lower() == ".tar":
            return data.TarShards(str(path))
        raise UsageError(f"data {spec!r} is a file but not a .tar shard (expected an image folder, tar shards or "
                         "fashion-mnist:train|test)")
    if glob.has_magic(spec):
        if not glob.glob(spec):
            raise FileNotFoundError(f"data {spec!r}: the pattern matches no file")
        return data.TarShards(spec)
    raise FileNotFoundError(f"data {spec!r}: no such file or folder (expected an image folder root/<class>/<image>, "
                            "tar shards, or fashion-mnist:train|test)")


def check_writable(path: str | os.PathLike, what: str, *, is_dir: bool = False) -> Path:
    """Fail early (before any long work) if `path` cannot be written: create its folder and a probe file there."""
    p = Path(path)
    folder = p if is_dir else p.parent
    if not is_dir and p.is_dir():
        raise UsageError(f"cannot write {what} {str(p)!r}: it is a folder")
    if is_dir and p.exists() and not p.is_dir():
        raise UsageError(f"cannot write {what} into {str(p)!r}: it is a file, not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".sfmkern-write-probe-", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise PermissionError(f"cannot write {what} {str(p)!r}: {reason}") from None
    return p


def _load_backbone(args, name: str | None = None, checkpoint=None):
    """load_backbone from the flags. Random weights (--no-pretrained) are drawn under a fixed seed, so that every
    command of a pipeline builds the same model and the files it writes match each other."""
    import torch

    from sfmkern.backbone import load_backbone

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return load_backbone(
            name or args.backbone,
            pretrained=not args.no_pretrained,
            checkpoint=checkpoint if name else args.checkpoint,
            img_size=args.img_size,
            device=args.device,
            grad_checkpointing=bool(getattr(args, "grad_checkpointing", False)),
        )


def _require(args, *names: str) -> None:
    for name in names:
        if getattr(args, name, None) in (None, ""):
            raise UsageError(f"--{name.replace('_', '-')} is required (on the command line or in --config)")


def _log(args, message: str) -> None:
    if not args.quiet:
        print(message, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------ commands
def cmd_stats(args) -> int:
    from sfmkern.stats import collect_stats

    _require(args, "data", "backbone", "out")
    check_writable(args.out, "statistics")
    source = open_data(args.data)
    backbone = _load_backbone(args)
    stats = collect_stats(
        source, backbone, resize=args.resize, crop=args.crop, batch_size=args.batch_size, out=args.out,
        resume=not args.no_resume, cache_features=args.cache_features, checkpoint_every=args.checkpoint_every,
        workers=args.workers, progress=not args.quiet,
    )
    counts = [int(c) for c in stats.counts.tolist()]
    reused = " (reused: same data, backbone and settings)" if stats.run_info.get("reused_result") else ""
    print(f"statistics of {sum(counts)} images in {len(counts)} classes ({len(stats.skipped)} skipped) with "
          f"{stats.backbone_name} -> {args.out}{reused}")
    _report_skipped(stats.skipped, args.out)
    return 0


SKIPPED_SHOWN = 10


def skipped_list_path(out: str | os.PathLike) -> Path:
    """Where `sfmkern stats` writes the full list of skipped files: `<stem>.skipped.tsv` beside the statistics."""
    p = Path(out)
    stem = p.name[: -len(".safetensors")] if p.name.endswith(".safetensors") else p.stem
    return p.with_name(f"{stem}.skipped.tsv")


def _report_skipped(skipped, out) -> None:
    """Print the first SKIPPED_SHOWN skipped files with their reasons on stderr, and write the full list (index,
    name, reason; index -1: a listing problem) as a tab-separated file beside `out`."""
    if not skipped:
        return
    from sfmkern._io import atomic_write

    path = skipped_list_path(out)
    lines = ["index\tname\treason"] + ["\t".join(_one_line(v) for v in row) for row in skipped]
    atomic_write(path, lambda tmp: Path(tmp).write_text("\n".join(lines) + "\n", encoding="utf-8"))
    print(f"skipped {len(skipped)} file(s); the full list is in {path}:", file=sys.stderr)
    for _index, name, reason in skipped[:SKIPPED_SHOWN]:
        print(f"  {name}: {_one_line(reason)}", file=sys.stderr)
    if len(skipped) > SKIPPED_SHOWN:
        print(f"  ... and {len(skipped) - SKIPPED_SHOWN} more", file=sys.stderr)
    sys.stderr.flush()


def _load_stats_for(path: str, backbone, *, crop: int | None = None):
    from sfmkern.stats import ClassStats

    return ClassStats.load(path, backbone=backbone, crop=crop)


def cmd_distill(args) -> int:
    from sfmkern.distill import PAPER_SCHEDULE, distill

    _require(args, "backbone", "out_dir")
    if (args.stats is None) == (args.data is None):
        raise UsageError("give exactly one of --stats (a statistics file) or --data (collected first)")
    if args.init_data is not None and args.stats is None:
        raise UsageError("--init-data goes with --stats (with --data the same images are used)")
    paper = PAPER_SCHEDULE if args.paper else {}
    method = {"init": args.init or paper.get("init", "real"),
              "objective": args.objective or paper.get("objective", "sfm"),
              "lr": args.lr if args.lr is not None else paper.get("lr"),
              "grow_every": args.grow_every if args.grow_every is not None else paper.get("grow_every"),
              "subcentres": not args.no_subcentres and paper.get("subcentres", True)}
    out_dir = check_writable(args.out_dir, "distillation output", is_dir=True)
    for opt, value in (("grid", args.grid), ("image_folder", args.image_folder)):
        if value:
            check_writable(value, f"--{opt.replace('_', '-')}", is_dir=opt == "image_folder")
    if args.stats is not None and not Path(args.stats).is_file():
        raise FileNotFoundError(f"statistics file {args.stats!r} does not exist")
    source = open_data(args.data) if args.data is not None else None
    backbone = _load_backbone(args)
    stats = _load_stats_for(args.stats, backbone) if args.stats is not None else source
    distilled = distill(
        stats, backbone, ipc=args.ipc, steps=args.steps, augs=args.augs, syn_res=args.syn_res,
        crop=args.crop, seed=args.seed, max_memory=args.max_memory, out_dir=out_dir, resume=not args.no_resume,
        param=args.param, noise_std=args.noise_std, noise_p=args.noise_p,
        noise_mean=args.noise_mean, chunk_size=args.chunk_size, checkpoint_every=args.checkpoint_every,
        progress=not args.quiet, log_every=args.log_every, mode=args.mode, anchor_weight=args.anchor_weight,
        anchor_target=args.anchor_target, anchor_images=args.anchor_images, anchor_views=args.anchor_views,
        scale=(args.scale_min, 1.0), init_data=open_data(args.init_data) if args.init_data else None, **method,
    )
    grid = Path(args.grid) if args.grid else out_dir / "grid.png"
    distilled.grid(grid)
    if args.image_folder:
        distilled.to_image_folder(args.image_folder)
    print(f"distilled {len(distilled)} images ({args.ipc} per class, {len(distilled.classes)} classes) -> "
          f"{out_dir / 'distilled.safetensors'}; grid -> {grid}")
    return 0


_BASELINES = ("random-real", "centroid", "kmeans", "full-data")


def _resolve_distilled(path: str) -> Path:
    p = Path(path)
    if p.is_dir():
        p = p / "distilled.safetensors"
    if not p.is_file():
        raise FileNotFoundError(f"distilled set {path!r} does not exist (a distilled.safetensors file or its folder)")
    return p


def cmd_eval(args) -> int:
    from sfmkern import baselines
    from sfmkern.evaluate import (
        LinearHead,
        check_head_stats,
        evaluate,
        head_path_for,
        load_or_fit_head,
        markdown_table,
    )

    _require(args, "backbone", "test")
    if (args.distilled is None) == (args.baseline is None):
        raise UsageError("give exactly one of --distilled (a distilled set) or --baseline "
                         f"({', '.join(_BASELINES)})")
    if args.baseline is not None and args.mode != "probe":
        raise UsageError("--baseline is evaluated with the probe protocol only (drop --mode inherit)")
    for opt, value in (("out", args.out), ("markdown", args.markdown)):
        if value:
            check_writable(value, f"--{opt} report")
    if args.baseline in ("random-real", "centroid", "kmeans"):
        _require(args, "train_data")
    if args.baseline in ("centroid", "kmeans", "full-data") or (args.mode == "inherit" and args.head is None):
        _require(args, "stats")
    distilled_path = _resolve_distilled(args.distilled) if args.distilled is not None else None
    test = open_data(args.test)
    train = open_data(args.train_data) if args.train_data else None
    backbone = _load_backbone(args)
    stats = None
    if args.stats is not None:
        if not Path(args.stats).is_file():
            raise FileNotFoundError(f"statistics file {args.stats!r} does not exist")
        # the statistics belong to the distillation backbone: the evaluated one, unless --head-backbone names it
        stats = _load_stats_for(args.stats, None if args.head_backbone else backbone)
    if args.fresh_views and args.view_bank is not None:
        raise UsageError("give at most one of --view-bank K and --fresh-views")
    view_bank = None if args.fresh_views else "auto" if args.view_bank is None else args.view_bank
    cache_dir = None
    if not args.no_cache:
        cache_dir = args.cache_dir or (distilled_path.parent / "eval-cache" if distilled_path is not None else None)
    if cache_dir is not None:
        check_writable(cache_dir, "evaluation cache", is_dir=True)
    common = dict(epochs=args.epochs, runs=args.runs, seed=args.seed, view_bank=view_bank, resize=args.resize,
                  crop=args.crop, feature_batch=args.batch_size, progress=not args.quiet)
    cached = dict(common, cache_dir=cache_dir)
    if args.baseline == "random-real":
        report = baselines.random_real(train, backbone, test, ipc=args.ipc, image_size=args.resize, **cached)
    elif args.baseline in ("centroid", "kmeans"):
        ipc = 1 if args.baseline == "centroid" else args.ipc
        if args.baseline == "kmeans" and ipc < 2:
            raise UsageError("--baseline kmeans needs --ipc >= 2 (ipc 1 is the centroid baseline)")
        report = baselines.centroid(train, stats, backbone, test, ipc=ipc, image_size=args.resize,
                                    feature_backbone=backbone, **cached)
    elif args.baseline == "full-data":
        report = baselines.full_data(stats, backbone, test, epochs=args.head_epochs, runs=args.runs, seed=args.seed,
                                     resize=args.resize, crop=args.crop, feature_batch=args.batch_size,
                                     progress=not args.quiet)
    else:
        head = head_backbone = None
        if args.mode == "inherit":
            head_backbone = _load_backbone(args, name=args.head_backbone) if args.head_backbone else backbone
            if stats is not None:
                stats.check_compatible(backbone=head_backbone, where=str(args.stats))
            if args.head is not None:  # an explicit head: refused if fitted on other statistics
                head = LinearHead.load(args.head, backbone=head_backbone)
                check_head_stats(head, stats, where=f"head {args.head}")
            else:
                head_file = check_writable(head_path_for(args.stats), "full-data head")
                head = load_or_fit_head(stats, head_backbone, head_file, epochs=args.head_epochs, seed=args.seed,
                                        progress=not args.quiet, log=lambda message: _log(args, message))
        report = evaluate(str(distilled_path), backbone, test, mode=args.mode, head=head,
                          head_backbone=head_backbone if args.head_backbone else None, stats=stats, **cached)
    if args.out:
        report.save(args.out)
    if args.markdown:
        from sfmkern._io import atomic_write

        text = report.to_markdown()
        atomic_write(args.markdown, lambda tmp: Path(tmp).write_text(text))
    print(markdown_table([report]))
    return 0


def cmd_demo(args) -> int:
    from sfmkern.demo import PRESETS, gate_failures, run_demo

    _require(args, "out")
    check_writable(args.out, "demo report", is_dir=True)
    preset = "tiny" if args.tiny else "quick" if args.quick else "full"
    overrides = {}
    for key in ("backbone", "image_size", "train_per_class", "test_per_class", "epochs", "runs", "view_bank",
                "seed", "data_root", "cross_backbone", "batch_size"):
        value = getattr(args, key)
        if value is not None:
            overrides[key] = value
    if args.ipc is not None:
        overrides["ipcs"] = tuple(args.ipc)
    if args.steps is not None:
        overrides["steps"] = tuple(args.steps)
    if args.no_kmeans:
        overrides["kmeans"] = False
    if args.no_cross_backbone:
        overrides["cross_backbone"] = ""  # "" = none (None would mean: the preset's default)
    assert preset in PRESETS
    result = run_demo(args.out, preset=preset, device=args.device, fresh=args.fresh, progress=not args.quiet,
                      **overrides)
    print(result["table"])
    if result.get("reference_table"):
        print("reference rows (upper bounds, not results of the distilled images):")
        print(result["reference_table"])
    print(f"report -> {Path(args.out) / 'report.md'} (total {result['total_s']:.0f} s)")
    failed = gate_failures(result)
    if failed:
        print(f"sfmkern demo: gate FAILED: {'; '.join(failed)}", file=sys.stderr)
        return 3
    return 0


def cmd_plan(args) -> int:
    from sfmkern.plan import plan

    _require(args, "backbone", "classes")
    args.no_pretrained, args.checkpoint = True, None  # memory and FLOPs do not depend on the weights
    backbone = _load_backbone(args)
    result = plan(backbone, args.classes, ipc=args.ipc, augs=args.augs, crop=args.crop, syn_res=args.syn_res,
                  max_memory=args.max_memory, mode=args.mode, chunk_size=args.chunk_size, tflops=args.tflops,
                  measure_steps=args.measure_steps)
    print(result)
    return 0


# ------------------------------------------------------------------------------------------------ parser
def _common(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("general")
    g.add_argument("--config", metavar="FILE", default=argparse.SUPPRESS,
                   help="YAML or JSON file of options (keys = long option names); flags given here win")
    g.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                   help="show the full traceback on errors")
    g.add_argument("--quiet", action="store_true", default=argparse.SUPPRESS,
                   help="no progress bars or log lines (results are still printed)")


def _backbone_options(p: argparse.ArgumentParser, *, required: bool = True, default: str | None = None) -> None:
    g = p.add_argument_group("backbone")
    req = " (required)" if required else ""
    g.add_argument("--backbone", metavar="NAME", default=default,
                   help=f"timm model name or alias (dinov2_vitb, clip_vitb, eva02_vitb, mocov3_vitb, "
                        f"efficientnet_lite0_offline, ...){req}")
    g.add_argument("--checkpoint", metavar="FILE", help="local safetensors/.pth weights (strict key/shape check)")
    g.add_argument("--no-pretrained", action="store_true",
                   help="random weights, drawn with a fixed seed (tests); default: pretrained")
    g.add_argument("--img-size", type=int, metavar="PX", help="input size the model is built at (ViTs)")
    g.add_argument("--device", metavar="DEV", help="cpu, cuda, cuda:1 (default: CUDA when available)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="sfmkern", description="Dataset distillation by Statistical Flow Matching on frozen "
                     "timm backbones. Data: an image folder, tar shards, or fashion-mnist:train|test.")
    parser.add_argument("--version", action="version", version=f"sfmkern {__version__}")
    parser.add_argument("--config", metavar="FILE", help="YAML or JSON file of options for the subcommand")
    parser.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    parser.add_argument("--quiet", action="store_true", help="no progress bars or log lines")
    sub = parser.add_subparsers(dest="command", metavar="{stats,distill,eval,demo,plan}", parser_class=_Parser)

    # stats -------------------------------------------------------------------------------------------------
    p = sub.add_parser("stats", help="per-class mean features of real images (collect_stats)",
                       description="Collect each class's mean backbone feature (sfmkern.collect_stats).")
    p.add_argument("--data", metavar="DATA", help="training images (required)")
    p.add_argument("--out", metavar="FILE", help="statistics file to write, .safetensors (required)")
    _backbone_options(p)
    p.add_argument("--resize", type=int, default=256, help="shorter side before the centre crop (default 256)")
    p.add_argument("--crop", type=int, default=224, help="centre crop side (default 224)")
    p.add_argument("--batch-size", type=int, default=64, help="images per forward (default 64)")
    p.add_argument("--workers", type=int, help="decode threads (default: all CPUs)")
    p.add_argument("--cache-features", action="store_true",
                   help="also keep every feature (fp16) beside the file, for baselines and classifier inheritance")
    p.add_argument("--checkpoint-every", type=int, default=50, help="batches between resume checkpoints")
    p.add_argument("--no-resume", action="store_true", help="start over instead of resuming a checkpoint")
    _common(p)
    p.set_defaults(func=cmd_stats)

    # distill -----------------------------------------------------------------------------------------------
    p = sub.add_parser("distill", help="distil images per class (distill)",
                       description="Distil synthetic images whose statistical flow matches the real one.")
    p.add_argument("--stats", metavar="FILE", help="statistics file from `sfmkern stats` (or give --data)")
    p.add_argument("--data", metavar="DATA", help="training images: statistics are collected and cached first")
    p.add_argument("--out-dir", metavar="DIR", help="run folder: checkpoints, distilled.safetensors, grid.png "
                   "(required)")
    _backbone_options(p)
    p.add_argument("--grad-checkpointing", action="store_true", help="activation checkpointing in the backbone")
    p.add_argument("--ipc", type=int, default=1, help="images per class (default 1)")
    p.add_argument("--steps", type=int, default=5000, help="optimisation steps (default 5000)")
    p.add_argument("--augs", type=int, default=1, help="augmented views per image per step (default 1)")
    p.add_argument("--lr", type=float, default=None,
                   help="Adam learning rate (default: 1e-2 from noise, 2e-3 from real images; the paper: 2e-3)")
    p.add_argument("--syn-res", type=int, default=256, help="synthetic image side (default 256)")
    p.add_argument("--crop", type=int, default=224, help="RandomResizedCrop output side (default 224)")
    p.add_argument("--seed", type=int, default=0, help="seed of the initial images and the augmentations")
    p.add_argument("--grow-every", type=int, default=None,
                   help="steps between pyramid levels; 0 = all levels from the start (default: 0; the paper: 200)")
    p.add_argument("--paper", action="store_true",
                   help="the paper's recipe: noise start, flow cosine alone, lr 2e-3, a level every 200 steps "
                        "(--steps 5000 for its budget); explicit flags still win")
    p.add_argument("--init", choices=("real", "noise"), default=None,
                   help="start from the real images nearest the class centre / sub-centres (real, default; needs "
                        "--data or --init-data) or from noise")
    p.add_argument("--init-data", metavar="DATA",
                   help="the training images the --stats file was collected on (real start, augmented anchors)")
    p.add_argument("--objective", choices=("anchored", "sfm"), default=None,
                   help="sfm (default): the paper's flow cosine; anchored: flow cosine + the anchoring term")
    p.add_argument("--anchor-weight", type=float, default=10.0, help="weight of the anchoring term (default 10)")
    p.add_argument("--anchor-target", choices=("augmented", "centred"), default="augmented",
                   help="anchor to class means of augmented real views (default) or to the clean centres with "
                        "their common offset removed")
    p.add_argument("--anchor-images", type=int, default=64,
                   help="real images per class for the augmented anchors (default 64)")
    p.add_argument("--anchor-views", type=int, default=4, help="augmented views per real image (default 4)")
    p.add_argument("--no-subcentres", action="store_true",
                   help="ipc > 1: match every image to its class flow instead of its own k-means sub-centre's")
    p.add_argument("--scale-min", type=float, default=0.08,
                   help="lower bound of the RandomResizedCrop area scale (default 0.08)")
    p.add_argument("--param", choices=("pyramid", "pixels"), default="pyramid", help="image parameterisation")
    p.add_argument("--noise-std", type=float, default=0.2, help="std of the Gaussian noise on a view (default 0.2)")
    p.add_argument("--noise-p", type=float, default=0.5, help="probability of noise on a view (default 0.5)")
    p.add_argument("--noise-mean", type=float, default=0.5,
                   help="0.5 as in the code behind the published numbers, 0.0 as in LGM's later fix")
    p.add_argument("--max-memory", metavar="BYTES", help="device memory budget, e.g. 8GiB (sets the chunk size)")
    p.add_argument("--chunk-size", type=int, help="views per chunk of the two-phase step")
    p.add_argument("--mode", choices=("auto", "single", "two_phase", "lagged"), default="auto",
                   help="step: single-phase when every view fits one chunk, else two-phase (auto), or force one; "
                        "lagged: memory-flat at single-phase cost, back-propagating the previous step's G "
                        "(docs/distill.md) (default auto)")
    p.add_argument("--checkpoint-every", type=int, default=100, help="steps between checkpoints")
    p.add_argument("--log-every", type=int, default=10, help="steps between loss checks / progress updates")
    p.add_argument("--no-resume", action="store_true", help="start over instead of resuming a checkpoint")
    p.add_argument("--grid", metavar="PNG", help="where to write the image grid (default OUT_DIR/grid.png)")
    p.add_argument("--image-folder", metavar="DIR", help="also write the images as PNG files, one folder per class")
    _common(p)
    p.set_defaults(func=cmd_distill)

    # eval --------------------------------------------------------------------------------------------------
    p = sub.add_parser("eval", help="linear probe / classifier inheritance on real test images (evaluate)",
                       description="Evaluate a distilled set (or a real-image baseline) on real test images.")
    p.add_argument("--distilled", metavar="FILE", help="distilled.safetensors or its run folder")
    p.add_argument("--baseline", choices=_BASELINES, help="evaluate a real-image baseline instead")
    p.add_argument("--test", metavar="DATA", help="real test images (required)")
    p.add_argument("--train-data", metavar="DATA", help="training images (random-real, centroid, kmeans)")
    p.add_argument("--stats", metavar="FILE", help="statistics of the distillation backbone (centroid, kmeans, "
                   "full-data; the full-data head of --mode inherit lies beside it)")
    _backbone_options(p)
    p.add_argument("--mode", choices=("probe", "inherit"), default="probe",
                   help="probe: train a new linear head on the set; inherit: the full-data head (default probe)")
    p.add_argument("--head", metavar="FILE", help="full-data head for --mode inherit (default: beside --stats)")
    p.add_argument("--head-backbone", metavar="NAME",
                   help="backbone A the head was fitted on, when evaluating with another backbone B (projector)")
    p.add_argument("--head-epochs", type=int, default=10, help="epochs of the full-data head (default 10)")
    p.add_argument("--ipc", type=int, default=1, help="images per class of a baseline (default 1)")
    p.add_argument("--epochs", type=int, default=1000, help="probe epochs (default 1000)")
    p.add_argument("--runs", type=int, default=3, help="seeds (default 3)")
    p.add_argument("--seed", type=int, default=0, help="seed of the probe runs and baseline draws")
    views = p.add_argument_group("views (docs/protocol.md)")
    views.add_argument("--view-bank", type=int, metavar="K",
                       help="precompute K augmented views per image; default: fresh views on CUDA, a bank of "
                            "10 views per image on the CPU")
    views.add_argument("--fresh-views", action="store_true",
                       help="the exact protocol on any device: fresh augmented views at every probe step (slow on "
                            "CPU)")
    p.add_argument("--cache-dir", metavar="DIR",
                   help="where finished evaluations are stored and reused when nothing changed (default: "
                        "eval-cache/ beside --distilled; baselines: none)")
    p.add_argument("--no-cache", action="store_true", help="always recompute; store nothing")
    p.add_argument("--resize", type=int, default=256, help="test Resize (default 256)")
    p.add_argument("--crop", type=int, default=224, help="test CenterCrop and training view side (default 224)")
    p.add_argument("--batch-size", type=int, default=256, help="images per backbone forward")
    p.add_argument("--out", metavar="JSON", help="write the report as JSON")
    p.add_argument("--markdown", metavar="MD", help="write the report as Markdown")
    _common(p)
    p.set_defaults(func=cmd_eval)

    # demo --------------------------------------------------------------------------------------------------
    p = sub.add_parser("demo", help="offline end-to-end demo: Fashion-MNIST, real efficientnet-lite0 weights",
                       description="Statistics, distillation (1 and 10 images per class) and evaluation against "
                       "real-image baselines on Fashion-MNIST with real pretrained weights, no network. Writes "
                       "OUT/report.md, report.json, grid.png, the distilled sets and the statistics; re-running "
                       "reuses them.")
    p.add_argument("--out", metavar="DIR", help="report folder (required)")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="a few minutes: fewer images, steps, epochs and runs (CI)")
    size.add_argument("--tiny", action="store_true", help="under a minute: a smoke test of every phase")
    p.add_argument("--backbone", metavar="NAME", help="default efficientnet_lite0_offline")
    p.add_argument("--cross-backbone", metavar="NAME",
                   help="also evaluate classifier inheritance with this backbone through a projector (default on CUDA: "
                        "efficientnet_lite1_offline)")
    p.add_argument("--no-cross-backbone", action="store_true", help="skip the cross-backbone evaluation")
    p.add_argument("--device", metavar="DEV", help="cpu, cuda (default: CUDA when available)")
    p.add_argument("--image-size", type=int, metavar="PX", help="resize = crop = synthetic side (default 128)")
    p.add_argument("--train-per-class", type=int, metavar="N",
                   help="training images per class (default 2000 on CPU, all on CUDA)")
    p.add_argument("--test-per-class", type=int, metavar="N", help="test images per class (default: all)")
    p.add_argument("--ipc", type=int, nargs="+", help="images per class to distil (default 1 10)")
    p.add_argument("--steps", type=int, nargs="+",
                   help="distillation steps, one per --ipc value (default 300 100 on CPU, 1000 1000 on CUDA)")
    p.add_argument("--epochs", type=int, help="probe epochs")
    p.add_argument("--runs", type=int, help="probe seeds")
    p.add_argument("--view-bank", type=int, metavar="K", help="augmented views per image for the probe")
    p.add_argument("--batch-size", type=int, help="images per backbone forward")
    p.add_argument("--seed", type=int, help="seed of subsets, distillation, baselines and probes (default 0)")
    p.add_argument("--no-kmeans", action="store_true", help="skip the per-class k-means baseline")
    p.add_argument("--data-root", metavar="DIR", help="folder of the Fashion-MNIST IDX files "
                   "(default /usr/share/datasets/fashion-mnist)")
    p.add_argument("--fresh", action="store_true", help="recompute everything instead of reusing OUT's files")
    _common(p)
    p.set_defaults(func=cmd_demo)

    # plan --------------------------------------------------------------------------------------------------
    p = sub.add_parser("plan", help="mode, chunk, peak memory, FLOPs and time per step of a run (sfmkern.plan)",
                       description="Plan a distillation run before starting it (random weights: memory and FLOPs "
                                   "do not depend on them).")
    _backbone_options(p)
    p.add_argument("--classes", type=int, help="number of classes C (required)")
    p.add_argument("--ipc", type=int, default=1, help="images per class (default 1)")
    p.add_argument("--augs", type=int, default=1, help="augmented views per image per step (default 1)")
    p.add_argument("--crop", type=int, help="backbone input side (default: the backbone's)")
    p.add_argument("--syn-res", type=int, help="synthetic image side (default 256)")
    p.add_argument("--max-memory", metavar="BYTES", help="device memory budget, e.g. 80GiB (default: free CUDA "
                   "memory; none on CPU)")
    p.add_argument("--chunk-size", type=int, help="views per chunk (default: from the budget)")
    p.add_argument("--mode", choices=("auto", "single", "two_phase", "lagged"), default="auto",
                   help="step mode to plan for (auto: as distill would pick; default auto)")
    p.add_argument("--tflops", type=float, help="sustained TFLOP/s for the time per step")
    p.add_argument("--measure-steps", type=int, default=0,
                   help="time this many probe steps on --device instead (default 0: not measured)")
    _common(p)
    p.set_defaults(func=cmd_plan)
    return parser


def _apply_config(parser: argparse.ArgumentParser, args: argparse.Namespace, argv: list[str]) -> argparse.Namespace:
    """Re-parse `argv` with the config file's values as defaults of the subcommand (flags still win)."""
    sub = _subparser(parser, args.command)
    opts = options_for(read_config(args.config), args.command, args.config)
    actions = {a.dest: a for a in sub._actions if a.dest not in ("help", "config", "func")}
    defaults = {}
    for dest, value in opts.items():
        action = actions.get(dest)
        if action is None:
            raise UsageError(f"config file {args.config!r}: unknown option {dest.replace('_', '-')!r} for "
                             f"`sfmkern {args.command}`")
        defaults[dest] = _config_value(action, value, args.config)
    sub.set_defaults(**defaults)
    return parser.parse_args(argv)


def _config_value(action: argparse.Action, value, path):
    name = f"config file {path!r}: option {action.dest.replace('_', '-')!r}"
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        if not isinstance(value, bool):
            raise UsageError(f"{name} must be true or false, got {value!r}")
        return value
    if action.nargs in ("+", "*"):
        values = value if isinstance(value, list) else [value]
        return [_convert(action, v, name) for v in values]
    if isinstance(value, (list, dict)):
        raise UsageError(f"{name} takes one value, got {value!r}")
    return _convert(action, value, name)


def _convert(action, value, name):
    if value is None:
        return None
    if action.type is int and isinstance(value, float):
        raise UsageError(f"{name} must be an integer, got {value!r}")  # int(8.5) would silently give 8
    if action.type is not None:
        try:
            value = action.type(value) if not isinstance(value, bool) else _bad(name, value)
        except (TypeError, ValueError):
            raise UsageError(f"{name} must be {action.type.__name__}, got {value!r}") from None
    elif not isinstance(value, str):
        value = str(value)
    if action.choices is not None and value not in action.choices:
        raise UsageError(f"{name} must be one of {', '.join(map(str, action.choices))}, got {value!r}")
    return value


def _bad(name, value):
    raise UsageError(f"{name} got a boolean {value!r}")


def _subparser(parser: argparse.ArgumentParser, command: str) -> argparse.ArgumentParser:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices[command]
    raise AssertionError("no subcommands")


def _merge_globals(args: argparse.Namespace) -> argparse.Namespace:
    for key in ("debug", "quiet"):
        setattr(args, key, bool(getattr(args, key, False)))
    return args


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `sfmkern` console script. Returns the exit status (0 on success)."""
    if "torch" not in sys.modules:
        # OpenMP threads that sleep instead of spinning: on a CPU shared with other processes, spinning threads of
        # several processes starve each other (a 5-10x slowdown measured on 2 cores); set before torch loads libgomp.
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)  # exits 2 with one line on a usage error, 0 on --help
    args = _merge_globals(args)
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    prog = f"sfmkern {args.command}"
    try:
        if args.config:
            debug, quiet = args.debug, args.quiet
            args = _merge_globals(_apply_config(parser, args, argv))
            args.debug, args.quiet = args.debug or debug, args.quiet or quiet
        with _process_group(args):
            return int(args.func(args) or 0)
    except KeyboardInterrupt:
        if args.debug:
            raise
        print(f"{prog}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except UsageError as exc:
        if args.debug:
            raise
        print(f"{prog}: error: {_one_line(exc)} (see {prog} --help)", file=sys.stderr)
        return EXIT_USAGE
    except Exception as exc:  # noqa: BLE001 - the CLI's contract: one line per failure, traceback with --debug
        if args.debug:
            raise
        print(f"{prog}: error: {_describe(exc)}", file=sys.stderr)
        return EXIT_FAILURE


@contextlib.contextmanager
def _process_group(args: argparse.Namespace):
    """Under `torchrun` (WORLD_SIZE > 1): join the process group (NCCL on CUDA, gloo on CPU), pin this rank to its
    GPU, and leave the group at the end. `stats` then shards the data and all-reduces the sums; `distill` shards
    the images and all-reduces the per-class feature sums every step; rank 0 writes the files."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    import torch.distributed as dist

    if world <= 1 or not dist.is_available() or dist.is_initialized():
        yield
        return
    import torch

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    wants_cuda = torch.cuda.is_available() and not str(getattr(args, "device", None) or "").startswith("cpu")
    if wants_cuda:
        torch.cuda.set_device(local_rank)
        if getattr(args, "device", None) in (None, "cuda"):
            args.device = f"cuda:{local_rank}"
    dist.init_process_group(backend="nccl" if wants_cuda else "gloo")
    try:
        yield
    finally:
        dist.destroy_process_group()


def _describe(exc: BaseException) -> str:
    text = _one_line(exc) or type(exc).__name__
    if isinstance(exc, (OSError, ImportError, MemoryError, RuntimeError, FloatingPointError)) or not text:
        text = f"{type(exc).__name__}: {text}"
    return text + " (run with --debug for the traceback)"


__all__ = ["build_parser", "check_writable", "main", "open_data"]


if __name__ == "__main__":  # pragma: no cover - `python -m sfmkern.cli`
    sys.exit(main())
