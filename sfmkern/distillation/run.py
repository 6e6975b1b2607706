"""`distill(stats, backbone, **config)`: a distillation run from statistics, with checkpoints, resume and the run
folder's lock. Its keyword arguments are the fields of `DistillConfig` (their one source of defaults; the signature
shown by `help()` is derived from them) and the run options of `RUN_OPTIONS`. `sfmkern.distill` (sfmkern.pipeline)
also accepts a data source and collects its statistics first."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import os
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from sfmkern import _io, _threads
from sfmkern.artifacts import ClassStats, DistilledSet
from sfmkern.data.coerce import as_source
from sfmkern.distillation import realdata
from sfmkern.distillation.config import MODES, DistillConfig, warn_incomplete_schedule
from sfmkern.distillation.distiller import Distiller, _dist_info, _same_device

CONFIG_FIELDS = tuple(f.name for f in dataclasses.fields(DistillConfig))
RUN_OPTIONS = ("device", "out_dir", "resume", "progress", "mode", "classes", "init_data")


def _locked_run(fn):
    """Decorates `distill`: with `out_dir=`, the run folder is locked (`out_dir/.lock`, taken by rank 0; under
    torch.distributed every rank learns the outcome) for the whole call, and the temporary files a killed earlier
    run left there are removed first."""

    @functools.wraps(fn)
    def locked(*args, **kwargs):
        out_dir = kwargs.get("out_dir")
        if out_dir is None:
            return fn(*args, **kwargs)
        out_path, progress = Path(out_dir), kwargs.get("progress", True)
        rank, world = _dist_info()
        with contextlib.ExitStack() as stack:
            error = ""
            if rank == 0:
                try:
                    out_path.mkdir(parents=True, exist_ok=True)
                    stack.enter_context(_io.output_lock(out_path, "distillation run folder"))
                    removed = [p for name in ("checkpoint", "distilled.safetensors")
                               for p in _io.remove_stale_temps(out_path / name, any_suffix=True)]
                    if removed:
                        _io.notice(f"removed {len(removed)} temporary file(s) a killed run left in {out_path}",
                                   progress)
                except _io.OutputBusyError as exc:
                    error = str(exc)
            if world > 1:
                shared = [error]
                torch.distributed.broadcast_object_list(shared, src=0)
                error = shared[0]
            if error:
                raise _io.OutputBusyError(error)
            return fn(*args, **kwargs)

    return locked


def _say_resumed(ckpt: Path, start: int, steps: int, *, show: bool) -> None:
    """Refuse a checkpoint past `steps` (its images are not those of a `steps`-step run); say in one line whether a
    finished run is reused or a run resumed."""
    if start > steps:
        raise ValueError(f"{ckpt}: holds a run at step {start}, past steps={steps}; its images are not a {steps}-step "
                         "result: use another out_dir, resume=False (--no-resume) to start over, or steps >= "
                         f"{start}")
    if start == steps:
        _io.notice(f"reusing the finished run {ckpt} ({steps} steps, same statistics, backbone and configuration; "
                   "resume=False / --no-resume recomputes)", show)
    else:
        _io.notice(f"resuming {ckpt} at step {start} of {steps}", show)


@_threads.cpu_phase
@_locked_run
def distill(stats, backbone, *, device=None, out_dir=None, resume: bool = True, progress: bool = True,
            mode: str = "auto", classes=None, init_data=None, **config) -> DistilledSet:
    """Distil `ipc` images per class whose statistical flow matches the real one; returns a DistilledSet.

    data_or_stats: a ClassStats, a path to a saved one, a real-flow tensor [C, D], or a data source (statistics are
    collected with `crop`, cached as out_dir/stats.safetensors when out_dir is given). With out_dir, checkpoints
    (images, Adam state, RNG state, step) are written atomically every `checkpoint_every` steps and at the end,
    `resume=True` continues from one, and the result is saved as out_dir/distilled.safetensors. A non-finite loss
    (checked every `log_every` steps and before each checkpoint) raises FloatingPointError and keeps the last good
    checkpoint. mode: "auto" (single-phase when one chunk holds every view, else two-phase), "single",
    "two_phase" or "lagged" (one autograd pass per step back-propagating the previous step's G; see docs/distill.md).
    A checkpoint is resumed only when written for the same statistics, backbone and trajectory settings (else
    ValueError naming the difference), and never past `steps` (a 300-step checkpoint and steps=100: ValueError);
    resuming or reusing a finished run is said in one line on stderr. While it runs, `out_dir` is locked
    (`out_dir/.lock`): a second process distilling into it fails at once with OutputBusyError.

    Beyond the paper (docs/distill.md has the measurements; `PAPER_SCHEDULE` holds the paper's settings):
    init "real" (default: start from the real images nearest the class centre / k-means sub-centres, found in the
    statistics' feature cache; needs the real images: `init_data=` the source the statistics were collected on, or
    data as the first argument; otherwise noise, with a warning) or "noise"; objective "sfm" (default: the paper's
    flow cosine alone) or "anchored" (flow cosine + anchor_weight x the anchoring term to the class means of
    augmented real views, anchor_target="augmented", over anchor_images per class x anchor_views views; "centred":
    the clean centres with their common offset removed; measured harmful at weight 10); subcentres (ipc > 1):
    each image matches the flow of its own k-means sub-centre. lr None: DEFAULT_LR by start; grow_every None:
    every pyramid level from step 0.
    """
    unknown = sorted(set(config) - set(CONFIG_FIELDS))
    if unknown:
        raise TypeError(f"distill() got an unexpected keyword argument {unknown[0]!r} (DistillConfig fields and "
                        f"{', '.join(RUN_OPTIONS)} are accepted)")
    config = DistillConfig(**config)
    warn_incomplete_schedule(config)
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if device is not None and not _same_device(device, backbone.device):
        raise ValueError(f"device={device} but the backbone lives on {backbone.device}; load it there "
                         "(load_backbone(..., device=...))")
    out_path = Path(out_dir) if out_dir is not None else None
    if isinstance(stats, (str, os.PathLike)):
        stats = ClassStats.load(stats, backbone=backbone)
    if not (isinstance(stats, torch.Tensor) or hasattr(stats, "centres")):
        raise TypeError(f"distill: expected ClassStats, a statistics file or a real-flow tensor, got "
                        f"{type(stats).__name__} (sfmkern.distill also takes a data source)")
    if init_data is not None:
        init_data = as_source(init_data, what="distill init_data")
    real = realdata.prepare(stats, init_data, backbone, config)
    distiller = Distiller(stats, backbone, classes=classes, config=config, device=backbone.device, **real)
    ckpt = distiller.checkpoint_path(out_path) if out_path is not None else None
    start = 0
    if ckpt is not None and resume and ckpt.is_file():
        start = distiller.load_checkpoint(ckpt)
        _say_resumed(ckpt, start, config.steps, show=progress and distiller.rank == 0)
    bar = tqdm(total=config.steps, initial=min(start, config.steps), disable=not progress or distiller.rank != 0,
               desc="distill", unit="step")
    last_time, last_step = time.perf_counter(), start
    try:
        for s in range(start, config.steps):
            try:
                loss = distiller.step(mode)
            except ValueError as exc:  # the ops' value checks (CPU) name non-finite features before any launch
                if "finite" not in str(exc).lower():
                    raise
                kept = f"; the last good checkpoint {ckpt} is kept" if ckpt is not None and ckpt.is_file() else ""
                raise FloatingPointError(f"non-finite values at step {s + 1}: {exc}{kept}") from exc
            done = s + 1
            save = ckpt is not None and (done % config.checkpoint_every == 0 or done == config.steps)
            if done % config.log_every == 0 or save or done == config.steps:
                try:
                    distiller.check_finite()
                except FloatingPointError as exc:
                    kept = f"; the last good checkpoint {ckpt} is kept" if ckpt is not None and ckpt.is_file() else ""
                    raise FloatingPointError(f"{exc} (loss {float(loss)}){kept}") from None
                now = time.perf_counter()
                bar.set_postfix(loss=f"{float(loss):.5f}", s_per_step=f"{(now - last_time) / (done - last_step):.3f}")
                last_time, last_step = now, done
            if save:
                distiller.save_checkpoint(ckpt)
            bar.update(1)
    finally:
        bar.close()
    result = distiller.distilled_set({"backbone": getattr(backbone, "name", ""),
                                      "backbone_fingerprint": getattr(backbone, "fingerprint", "")})
    if out_path is not None and distiller.rank == 0:
        result.save(out_path / "distilled.safetensors")
    return result


def config_signature(fn, config_cls, *, first: int) -> inspect.Signature:
    """`fn`'s signature with its `**config` replaced by one keyword-only parameter per field of `config_cls` (with
    the field's default and annotation): what `help(fn)` and IDEs show, derived from the dataclass."""
    names = {f.name for f in dataclasses.fields(config_cls)}
    params = list(inspect.signature(fn).parameters.values())
    kept = [p for p in params if p.kind is not inspect.Parameter.VAR_KEYWORD and p.name not in names]
    fields = [inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default, annotation=f.type)
              for f in dataclasses.fields(config_cls)]
    return inspect.Signature(kept[:first] + fields + kept[first:], return_annotation=DistilledSet)


distill.__signature__ = config_signature(distill, DistillConfig, first=2)
