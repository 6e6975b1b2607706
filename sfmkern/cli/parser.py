"""The `sfmkern` argument parser: one sub-parser per command, the distillation flags derived from DistillConfig (and
the other commands' defaults read from the API functions), and `--config` files applied as defaults."""

from __future__ import annotations

import argparse
import dataclasses
import inspect

from sfmkern import __version__
from sfmkern.config import options_for, read_config

BASELINES = ("random-real", "centroid", "kmeans", "full-data")
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
    g.add_argument("--no-channels-last", action="store_true",
                   help="keep a convolutional model's activations NCHW on the CPU (default: channels-last, faster)")


def _default(fn, name: str):
    """The default of parameter `name` of the API function `fn`: the flag's default is read from there (the phases
    without a config dataclass), so that the command line and the API never disagree."""
    return inspect.signature(fn).parameters[name].default


def _config_dest(f: dataclasses.Field) -> str:
    return (f.metadata["flag"] or f"--{f.name}").lstrip("-").replace("-", "_")


def _config_options(p: argparse.ArgumentParser, config_cls, title: str) -> None:
    """One flag per field of `config_cls` (a phase's config dataclass) that has one: its help, type, choices and the
    default shown in the help all come from the field (`sfmkern.distillation.config.option`). The parsed value is
    None (or False for a switch) when the flag is not given, so that the dataclass alone decides the default."""
    g = p.add_argument_group(title)
    for f in dataclasses.fields(config_cls):
        meta = f.metadata
        if "help" not in meta or meta["flag"] is None:
            continue
        flag = meta["flag"] or "--" + f.name.replace("_", "-")
        shown = f.default[0] if isinstance(f.default, tuple) else f.default
        if isinstance(f.default, bool):
            g.add_argument(flag, dest=_config_dest(f), action="store_true",
                           help=f"{meta['help']} (turns {f.name}={f.default} off)")
            continue
        g.add_argument(flag, dest=_config_dest(f), type=meta["type"] or type(shown), choices=meta["choices"],
                       metavar=meta["metavar"], default=None, help=f"{meta['help']} (default {shown})")


def config_settings(args: argparse.Namespace, config_cls, *, fill: dict | None = None) -> dict:
    """The keyword arguments of the config fields given on the command line (or in --config), then those of
    `fill` (e.g. the paper's schedule) for fields not given; the dataclass supplies every other default."""
    given = {}
    for f in dataclasses.fields(config_cls):
        if "help" not in f.metadata or f.metadata["flag"] is None:
            continue
        value = getattr(args, _config_dest(f), None)
        if value is None or value is False:
            continue
        if isinstance(f.default, bool):
            value = not f.default
        elif isinstance(f.default, tuple):
            value = (value, *f.default[1:])
        given[f.name] = value
    for key, value in (fill or {}).items():
        given.setdefault(key, value)
    return given


def distill_settings(args: argparse.Namespace) -> dict:
    """DistillConfig keyword arguments of `sfmkern distill`: the flags given, then `--paper`'s schedule."""
    from sfmkern.distillation import PAPER_SCHEDULE, DistillConfig

    return config_settings(args, DistillConfig, fill=PAPER_SCHEDULE if args.paper else None)


def build_parser() -> argparse.ArgumentParser:
    # the phases' config dataclasses import torch: loaded here, after `main` has set OMP_WAIT_POLICY, not at import
    from sfmkern.distillation import MODES as DISTILL_MODES
    from sfmkern.distillation import DistillConfig, plan
    from sfmkern.distillation import distill as distill_fn
    from sfmkern.evaluation import MODES as EVAL_MODES
    from sfmkern.evaluation import evaluate, fit_full_head
    from sfmkern.stats import collect_stats

    DISTILL_MODE_DEFAULT = _default(distill_fn, "mode")  # noqa: N806

    def stats_default(name):
        return _default(collect_stats, name)

    def eval_default(name):
        return _default(evaluate, name)

    def head_default(name):
        return _default(fit_full_head, name)
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
    p.add_argument("--resize", type=int, default=stats_default("resize"),
                   help=f"shorter side before the centre crop (default {stats_default('resize')})")
    p.add_argument("--crop", type=int, default=stats_default("crop"),
                   help=f"centre crop side (default {stats_default('crop')})")
    p.add_argument("--batch-size", type=int, default=stats_default("batch_size"),
                   help=f"images per forward (default {stats_default('batch_size')})")
    p.add_argument("--workers", type=int, help="decode threads (default: all CPUs)")
    p.add_argument("--cache-features", action="store_true",
                   help="also keep every feature (fp16) beside the file, for baselines and classifier inheritance")
    p.add_argument("--checkpoint-every", type=int, default=stats_default("checkpoint_every"),
                   help=f"batches between resume checkpoints (default {stats_default('checkpoint_every')})")
    p.add_argument("--no-resume", action="store_true", help="start over instead of resuming a checkpoint")
    _common(p)

    # distill -----------------------------------------------------------------------------------------------
    p = sub.add_parser("distill", help="distil images per class (distill)",
                       description="Distil synthetic images whose statistical flow matches the real one.")
    p.add_argument("--stats", metavar="FILE", help="statistics file from `sfmkern stats` (or give --data)")
    p.add_argument("--data", metavar="DATA", help="training images: statistics are collected and cached first")
    p.add_argument("--out-dir", metavar="DIR", help="run folder: checkpoints, distilled.safetensors, grid.png "
                   "(required)")
    _backbone_options(p)
    p.add_argument("--grad-checkpointing", action="store_true", help="activation checkpointing in the backbone")
    p.add_argument("--paper", action="store_true",
                   help="the paper's recipe: noise start, flow cosine alone, lr 2e-3, a level every 200 steps, 5000 "
                        "steps; explicit flags still win")
    p.add_argument("--init-data", metavar="DATA",
                   help="the training images the --stats file was collected on (real start, augmented anchors)")
    p.add_argument("--mode", choices=DISTILL_MODES, default=DISTILL_MODE_DEFAULT,
                   help="step: single-phase when every view fits one chunk, else two-phase (auto), or force one; "
                        f"lagged: memory-flat at single-phase cost, back-propagating the previous step's G "
                        f"(docs/distill.md) (default {DISTILL_MODE_DEFAULT})")
    _config_options(p, DistillConfig, "distillation settings (sfmkern.DistillConfig; defaults from there)")
    p.add_argument("--no-resume", action="store_true", help="start over instead of resuming a checkpoint")
    p.add_argument("--grid", metavar="PNG", help="where to write the image grid (default OUT_DIR/grid.png)")
    p.add_argument("--image-folder", metavar="DIR", help="also write the images as PNG files, one folder per class")
    _common(p)

    # eval --------------------------------------------------------------------------------------------------
    p = sub.add_parser("eval", help="linear probe / classifier inheritance on real test images (evaluate)",
                       description="Evaluate a distilled set (or a real-image baseline) on real test images.")
    p.add_argument("--distilled", metavar="FILE", help="distilled.safetensors or its run folder")
    p.add_argument("--baseline", choices=BASELINES, help="evaluate a real-image baseline instead")
    p.add_argument("--test", metavar="DATA", help="real test images (required)")
    p.add_argument("--train-data", metavar="DATA", help="training images (random-real, centroid, kmeans)")
    p.add_argument("--stats", metavar="FILE", help="statistics of the distillation backbone (centroid, kmeans, "
                   "full-data; the full-data head of --mode inherit lies beside it)")
    _backbone_options(p)
    p.add_argument("--mode", choices=EVAL_MODES, default=eval_default("mode"),
                   help=f"probe: train a new linear head on the set; inherit: the full-data head (default "
                        f"{eval_default('mode')})")
    p.add_argument("--head", metavar="FILE", help="full-data head for --mode inherit (default: beside --stats)")
    p.add_argument("--head-backbone", metavar="NAME",
                   help="backbone A the head was fitted on, when evaluating with another backbone B (projector)")
    p.add_argument("--head-epochs", type=int, default=head_default("epochs"),
                   help=f"epochs of the full-data head (default {head_default('epochs')})")
    p.add_argument("--ipc", type=int, default=1, help="images per class of a baseline (default 1)")
    p.add_argument("--epochs", type=int, default=eval_default("epochs"),
                   help=f"probe epochs (default {eval_default('epochs')})")
    p.add_argument("--runs", type=int, default=eval_default("runs"), help=f"seeds (default {eval_default('runs')})")
    p.add_argument("--seed", type=int, default=eval_default("seed"),
                   help=f"seed of the probe runs and baseline draws (default {eval_default('seed')})")
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
    p.add_argument("--resize", type=int, default=eval_default("resize"),
                   help=f"test Resize (default {eval_default('resize')})")
    p.add_argument("--crop", type=int, default=eval_default("crop"),
                   help=f"test CenterCrop and training view side (default {eval_default('crop')})")
    p.add_argument("--batch-size", dest="batch_size", type=int, default=eval_default("feature_batch"),
                   help=f"images per backbone forward (default {eval_default('feature_batch')})")
    p.add_argument("--out", metavar="JSON", help="write the report as JSON")
    p.add_argument("--markdown", metavar="MD", help="write the report as Markdown")
    _common(p)

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
                   help="distillation steps, one per --ipc value (default 200 60 on CPU, 1000 1000 on CUDA)")
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

    # plan --------------------------------------------------------------------------------------------------
    p = sub.add_parser("plan", help="mode, chunk, peak memory, FLOPs and time per step of a run (sfmkern.plan)",
                       description="Plan a distillation run before starting it (random weights: memory and FLOPs "
                                   "do not depend on them).")
    _backbone_options(p)
    p.add_argument("--classes", type=int, help="number of classes C (required)")
    p.add_argument("--ipc", type=int, default=_default(plan, "ipc"),
                   help=f"images per class (default {_default(plan, 'ipc')})")
    p.add_argument("--augs", type=int, default=_default(plan, "augs"),
                   help=f"augmented views per image per step (default {_default(plan, 'augs')})")
    p.add_argument("--crop", type=int, help="backbone input side (default: the backbone's)")
    p.add_argument("--syn-res", type=int, help="synthetic image side (default 256)")
    p.add_argument("--max-memory", metavar="BYTES", help="device memory budget, e.g. 80GiB (default: free CUDA "
                   "memory; none on CPU)")
    p.add_argument("--chunk-size", type=int, help="views per chunk (default: from the budget)")
    p.add_argument("--mode", choices=DISTILL_MODES, default=_default(plan, "mode"),
                   help="step mode to plan for (auto: as distill would pick; default auto)")
    p.add_argument("--tflops", type=float, help="sustained TFLOP/s for the time per step")
    p.add_argument("--measure-steps", type=int, default=0,
                   help="time this many probe steps on --device instead (default 0: not measured)")
    _common(p)
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
