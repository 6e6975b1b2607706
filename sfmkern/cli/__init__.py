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

from sfmkern.cli.parser import (
    BASELINES,
    EXIT_FAILURE,
    EXIT_INTERRUPTED,
    EXIT_USAGE,
    UsageError,
    _apply_config,
    _merge_globals,
    _one_line,
    build_parser,
    distill_settings,
)


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
            channels_last=False if getattr(args, "no_channels_last", False) else None,
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
    from sfmkern.artifacts import ClassStats

    return ClassStats.load(path, backbone=backbone, crop=crop)


def cmd_distill(args) -> int:
    from sfmkern.pipeline import distill

    _require(args, "backbone", "out_dir")
    if (args.stats is None) == (args.data is None):
        raise UsageError("give exactly one of --stats (a statistics file) or --data (collected first)")
    if args.init_data is not None and args.stats is None:
        raise UsageError("--init-data goes with --stats (with --data the same images are used)")
    out_dir = check_writable(args.out_dir, "distillation output", is_dir=True)
    for opt, value in (("grid", args.grid), ("image_folder", args.image_folder)):
        if value:
            check_writable(value, f"--{opt.replace('_', '-')}", is_dir=opt == "image_folder")
    if args.stats is not None and not Path(args.stats).is_file():
        raise FileNotFoundError(f"statistics file {args.stats!r} does not exist")
    source = open_data(args.data) if args.data is not None else None
    backbone = _load_backbone(args)
    stats = _load_stats_for(args.stats, backbone) if args.stats is not None else source
    distilled = distill(stats, backbone, out_dir=out_dir, resume=not args.no_resume, progress=not args.quiet,
                        mode=args.mode, init_data=open_data(args.init_data) if args.init_data else None,
                        **distill_settings(args))
    grid = Path(args.grid) if args.grid else out_dir / "grid.png"
    distilled.grid(grid)
    if args.image_folder:
        distilled.to_image_folder(args.image_folder)
    print(f"distilled {len(distilled)} images ({args.ipc} per class, {len(distilled.classes)} classes) -> "
          f"{out_dir / 'distilled.safetensors'}; grid -> {grid}")
    return 0


def _resolve_distilled(path: str) -> Path:
    p = Path(path)
    if p.is_dir():
        p = p / "distilled.safetensors"
    if not p.is_file():
        raise FileNotFoundError(f"distilled set {path!r} does not exist (a distilled.safetensors file or its folder)")
    return p


def cmd_eval(args) -> int:
    from sfmkern.evaluation import (
        LinearHead,
        baselines,
        evaluate,
        head_path_for,
        load_or_fit_head,
        markdown_table,
    )

    _require(args, "backbone", "test")
    if (args.distilled is None) == (args.baseline is None):
        raise UsageError("give exactly one of --distilled (a distilled set) or --baseline "
                         f"({', '.join(BASELINES)})")
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
                head.check_stats(stats, where=f"head {args.head}")
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
    from sfmkern.distillation import plan

    _require(args, "backbone", "classes")
    args.no_pretrained, args.checkpoint = True, None  # memory and FLOPs do not depend on the weights
    backbone = _load_backbone(args)
    result = plan(backbone, args.classes, ipc=args.ipc, augs=args.augs, crop=args.crop, syn_res=args.syn_res,
                  max_memory=args.max_memory, mode=args.mode, chunk_size=args.chunk_size, tflops=args.tflops,
                  measure_steps=args.measure_steps)
    print(result)
    return 0


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
            return int(COMMANDS[args.command](args) or 0)
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


COMMANDS = {"stats": cmd_stats, "distill": cmd_distill, "eval": cmd_eval, "demo": cmd_demo, "plan": cmd_plan}

__all__ = ["build_parser", "check_writable", "main", "open_data"]
