"""The statistics pass: each class's mean backbone feature over every real image, computed once and saved.

`collect_stats(data, backbone)` streams `data` through the C++ decoder (the next batch decodes while this one runs
forward), copies each uint8 batch to the device (pinned memory, non-blocking, on a side CUDA stream), normalises
there, runs the frozen backbone under `torch.no_grad()` and reduces with `ops.class_sums` (fp32 per batch, fp64
running totals, final division in fp64). Partial sums are checkpointed atomically every `checkpoint_every` batches,
keyed to the data, the backbone weights and the preprocessing, so a killed run resumes where it stopped and a stale
checkpoint is never reused. Under torch.distributed every rank streams its shard; sums and counts are all-reduced.

Feature cache layout (`cache_features=True`, `out="stats.safetensors"`): `stats.features.npy` is a float16
[N, D] .npy file (numpy memmap-able) whose row i is the feature of source item i (the `data` source's own order);
`stats.labels.npy` is int64 [N] with the class index of item i, or -1 where item i was skipped (corrupt file) and so
has no feature. `ClassStats.load_features()` opens both read-only. Both files are preallocated on disk before the
pass (free space checked first), so a full disk is an OSError naming the file at the start, never a SIGBUS mid-pass.

Reuse is never silent: a finished file is returned only for the same run key (data, backbone weights, preprocessing,
decoder, world size, caching) and with its feature cache present, and that is said in one line on stderr; a
checkpoint is resumed only with the same run key and the very feature cache files it was written with (else the pass
starts over, with one line saying why). While it runs, `collect_stats(out=...)` holds an advisory lock beside `out`
(`.<name>.lock`): a second process writing the same `out` fails at once with OutputBusyError.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from sfmkern import _threads, ops
from sfmkern._io import (
    OutputBusyError,
    check_free_space,
    load_tensors,
    notice,
    output_lock,
    preallocate,
    remove_stale_temps,
    save_tensors,
)
from sfmkern._nvtx import nvtx_range
from sfmkern.artifacts import ClassStats
from sfmkern.artifacts.stats import labels_path_for
from sfmkern.backbone import Backbone, load_backbone
from sfmkern.data import DECODER_VERSION, check_classes_nonempty, stream
from sfmkern.data.coerce import as_source

_CHECKPOINT_FORMAT = "sfmkern.stats-checkpoint/1"


def _cache_paths(out: Path) -> tuple[Path, Path]:
    stem = out.name[: -len(out.suffix)] if out.suffix else out.name
    return out.with_name(stem + ".features.npy"), out.with_name(stem + ".labels.npy")


def _checkpoint_path(out: Path, rank: int, world: int) -> Path:
    return out.with_name(f"{out.name}.partial-{rank}of{world}")


def data_fingerprint(source) -> str:
    """sha256 identifying a source's items: type, classes, labels, item names, file sizes/mtimes or array bytes."""
    h = hashlib.sha256()
    h.update(f"{type(source).__name__}|{len(source)}|{json.dumps(list(source.classes))}\n".encode())
    h.update(np.ascontiguousarray(source.labels, dtype=np.int64).tobytes())
    for i in range(len(source)):
        h.update(os.fsencode(source.name(i)) + b"\0")
    root = source
    while hasattr(root, "parent"):  # SubsetSource: the files live in the parent
        h.update(np.ascontiguousarray(root.indices, dtype=np.int64).tobytes())
        root = root.parent
    files = list(getattr(root, "paths", None) or getattr(root, "shards", None) or [])
    for path in files:
        try:
            st = os.stat(path)
            h.update(os.fsencode(path) + f"|{st.st_size}|{st.st_mtime_ns}\n".encode())
        except OSError as exc:  # gone or unreadable since listing: the decoder skips it with its reason
            h.update(os.fsencode(path) + f"|unreadable {exc.errno}\n".encode())
    images = getattr(root, "images", None)
    if isinstance(images, np.ndarray):
        h.update(str(images.shape).encode())
        h.update(np.ascontiguousarray(images).data)
    return h.hexdigest()


def accumulate_class_sums(sums: torch.Tensor, counts: torch.Tensor, features: torch.Tensor,
                          labels: torch.Tensor) -> None:
    """Add one batch's per-class feature sums into the running totals, in place.

    sums float64 [C, D] and counts int64 [C] (the accumulators, on the features' device); features [B, D]
    (float32 / half), labels int64 [B] in [0, C). The batch is reduced over the classes it contains only: its labels
    are renumbered 0..U-1 in class order (U <= B, no host sync: the compact table has min(B, C) rows, unused rows
    stay zero), `ops.class_sums(..., deterministic=True)` sums each class in float32 over the same rows in the same
    sorted positions as with the original labels, and the float64 totals receive those rows by `index_add_`. So the
    result is bit-identical to `sums += ops.class_sums(features, labels, C)[0].double()` while the temporaries are
    [min(B, C), D] instead of a dense [C, D] in float32 and float64 per batch, and the accumulation stays
    deterministic (an unused row adds an exact 0.0 to row 0 of the totals, which changes nothing in any order).

    Equivalent PyTorch:
        batch_sums, batch_counts = ops.class_sums(features, labels, C, deterministic=True)
        sums += batch_sums.double(); counts += batch_counts
    """
    n = labels.shape[0]
    if n == 0:
        return
    rows = max(2, min(n, sums.shape[0]))  # ops.class_sums needs >= 2 classes
    sorted_labels, order = torch.sort(labels, stable=True)
    starts = torch.ones(n, dtype=torch.bool, device=labels.device)
    starts[1:] = sorted_labels[1:] != sorted_labels[:-1]
    segment = torch.cumsum(starts, 0) - 1  # compact id of each sorted row: 0..U-1, in class order
    compact = torch.empty_like(labels).index_put_((order,), segment)
    class_of_row = torch.zeros(rows, dtype=labels.dtype, device=labels.device).index_put_((segment,), sorted_labels)
    batch_sums, batch_counts = ops.class_sums(features, compact, rows, deterministic=True)
    sums.index_add_(0, class_of_row, batch_sums.to(torch.float64))
    counts.index_add_(0, class_of_row, batch_counts)


def _dist_info() -> tuple[int, int, bool]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), True
    return 0, 1, False


class _CudaCopier:
    """Host-to-device copies of pinned batches on a side stream, so the copy of batch k+1 overlaps forward k."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"
        self.stream = torch.cuda.Stream(device=device) if self.cuda else None

    def issue(self, batch):
        """Start copying `batch` to the device; returns (images, labels) usable after `wait`."""
        if not self.cuda:
            return batch.images, batch.labels
        with nvtx_range("stats/h2d"), torch.cuda.stream(self.stream):
            images = batch.images.to(self.device, non_blocking=True)
            labels = batch.labels.to(self.device, non_blocking=True)
        return images, labels

    def wait(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        if self.cuda:
            current = torch.cuda.current_stream(self.device)
            current.wait_stream(self.stream)
            images.record_stream(current)  # the side stream's allocation is used on the compute stream
            labels.record_stream(current)


def _cache_id(out: Path) -> list | None:
    """Identity of the feature cache files (device, inode, size): a checkpoint resumes only into the same files."""
    ids = []
    for p in _cache_paths(out):
        try:
            st = os.stat(p)
        except OSError:
            return None
        ids.append([st.st_dev, st.st_ino, st.st_size])
    return ids


def _cache_problem(out: Path, recorded) -> str:
    """Why the feature cache beside `out` cannot take a resumed pass ('' when it can)."""
    now = _cache_id(out)
    if now is None:
        missing = [str(p) for p in _cache_paths(out) if not p.is_file()]
        return f"its feature cache {', '.join(missing)} is missing"
    if recorded is None or [list(x) for x in recorded] != now:
        return f"its feature cache {_cache_paths(out)[0]} was replaced or rewritten since the checkpoint"
    return ""


def _flush_cache(cache) -> None:
    for array, path in ((cache[0], cache[2]), (cache[1], labels_path_for(cache[2]))):
        try:
            array.flush()
        except OSError as exc:
            raise OSError(exc.errno, f"cannot write the feature cache {path}: {exc.strerror or exc}") from exc


def _open_cache(out: Path, n: int, d: int, *, create: bool) -> tuple[np.memmap, np.memmap, Path]:
    feats_path, labels_path = _cache_paths(out)
    feats_path.parent.mkdir(parents=True, exist_ok=True)
    try:
        if create or not (feats_path.is_file() and labels_path.is_file()):
            needed = 2 * n * d + 8 * n + 2 * 4096  # fp16 features, int64 labels, .npy headers
            for p in (feats_path, labels_path):  # space the old files hold comes back when they are replaced
                if p.is_file():
                    needed -= p.stat().st_size
            check_free_space(feats_path.parent, needed, f"the feature cache {feats_path}")
            feats = np.lib.format.open_memmap(feats_path, mode="w+", dtype=np.float16, shape=(n, d))
            labels = np.lib.format.open_memmap(labels_path, mode="w+", dtype=np.int64, shape=(n,))
            del feats, labels
            preallocate(feats_path)
            preallocate(labels_path)
            labels = np.load(labels_path, mmap_mode="r+")
            labels[:] = -1
            labels.flush()
            del labels
        else:
            preallocate(feats_path)  # a sparse cache (written by an older version) gets its blocks now
            preallocate(labels_path)
        feats = np.load(feats_path, mmap_mode="r+")
        labels = np.load(labels_path, mmap_mode="r+")
    except OSError as exc:
        text = exc.strerror or str(exc)
        if str(feats_path) not in text and str(labels_path) not in text:
            text = f"feature cache {feats_path}: {text}"
        raise OSError(exc.errno, text) from exc
    if feats.shape != (n, d) or feats.dtype != np.float16 or labels.shape != (n,):
        raise ValueError(f"{feats_path}: existing feature cache has shape {feats.shape}, expected ({n}, {d})")
    return feats, labels, feats_path


def _fixed_input_mismatch(backbone, crop: int) -> bool:
    model = backbone.model
    return crop != backbone.input_size and hasattr(model, "patch_embed") and not getattr(
        model, "dynamic_img_size", False)


# ----------------------------------------------------------------------------------------------------- the pass
def _listing_problems(source) -> list[tuple[int, str, str]]:
    """Listing problems of the source's folders (unreadable folders, loops, special files) as skipped entries."""
    root = source
    while hasattr(root, "parent"):
        root = root.parent
    return [(-1, str(name), str(reason)) for name, reason in getattr(root, "problems", [])]


@contextlib.contextmanager
def _locked_output(out, *, progress: bool):
    """The advisory lock of `out` (rank 0 takes it; under torch.distributed every rank learns the outcome), and
    removal of the temporary files a killed earlier run left beside it."""
    rank, _, distributed = _dist_info()
    with contextlib.ExitStack() as stack:
        error = ""
        if rank == 0:
            try:
                stack.enter_context(output_lock(out, "statistics file"))
                removed = remove_stale_temps(out, any_suffix=True)
                if removed:
                    notice(f"removed {len(removed)} temporary file(s) a killed run left beside {out}", progress)
            except OutputBusyError as exc:
                error = str(exc)
        if distributed:
            shared = [error]
            dist.broadcast_object_list(shared, src=0)
            error = shared[0]
        if error:
            raise OutputBusyError(error)
        yield


@_threads.cpu_phase
def collect_stats(data, backbone, *, resize: int = 256, crop: int = 224, batch_size: int = 64, device=None,
                  out: str | os.PathLike | None = None, resume: bool = True, cache_features: bool = False,
                  checkpoint_every: int = 50, workers: int | None = None, progress: bool = True) -> ClassStats:
    """Mean backbone feature of every class of `data` -> ClassStats (saved to `out` when given).

    data: an sfmkern.data source, an ImageFolder directory, or tar shards (a *.tar path or glob). backbone: a
    `Backbone` or a name for `load_backbone`. resize/crop: shorter side, then centre square crop (pixels).
    out: the result file (safetensors); its checkpoints `<out>.partial-<rank>of<world>` and, with
    `cache_features=True`, `<stem>.features.npy` / `<stem>.labels.npy` lie beside it. Without `out` nothing is
    written and there is no resume. resume: continue from a matching checkpoint (or return a matching finished
    file, saying so on stderr). checkpoint_every: batches between checkpoints. workers: decode threads (None: all
    CPUs).

    Under torch.distributed each rank streams positions rank, rank + world, ...; sums and counts are all-reduced
    and rank 0 writes `out`; every rank returns the same ClassStats. Raises ValueError naming any class that has
    no item (before decoding anything) or no usable image (after the pass); OutputBusyError when another process
    is writing `out`; OSError naming the file on a full disk or any other write error (the last checkpoint stays).
    """
    kwargs = dict(resize=resize, crop=crop, batch_size=batch_size, device=device, out=out, resume=resume,
                  cache_features=cache_features, checkpoint_every=checkpoint_every, workers=workers,
                  progress=progress)
    if out is None:
        return _collect_stats(data, backbone, **kwargs)
    with _locked_output(out, progress=progress):
        return _collect_stats(data, backbone, **kwargs)


def _collect_stats(
    data,
    backbone,
    *,
    resize: int = 256,
    crop: int = 224,
    batch_size: int = 64,
    device=None,
    out: str | os.PathLike | None = None,
    resume: bool = True,
    cache_features: bool = False,
    checkpoint_every: int = 50,
    workers: int | None = None,
    progress: bool = True,
) -> ClassStats:
    """collect_stats without the output lock (see collect_stats)."""

    if isinstance(backbone, str):
        backbone = load_backbone(backbone, device=device)
    if not isinstance(backbone, Backbone):
        raise TypeError(f"collect_stats: backbone must be a Backbone or a name, got {type(backbone).__name__}")
    if device is not None and torch.device(device) != backbone.device:
        dev = torch.device(device)
        if not (dev.type == backbone.device.type and dev.index is None):
            raise ValueError(f"collect_stats: device={device} but the backbone lives on {backbone.device}")
    device = backbone.device
    for name, value in (("batch_size", batch_size), ("checkpoint_every", checkpoint_every)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"collect_stats: {name} must be a positive int, got {value!r}")
    if _fixed_input_mismatch(backbone, crop):
        raise ValueError(f"collect_stats: crop={crop} but backbone {backbone.name!r} takes fixed "
                         f"{backbone.input_size}px inputs (load it with img_size={crop} or use crop="
                         f"{backbone.input_size})")
    if cache_features and out is None:
        raise ValueError("collect_stats: cache_features=True needs out= (the cache is written beside it)")
    source = as_source(data, what="collect_stats")
    rank, world, distributed = _dist_info()
    num_classes, n_items, dim = len(source.classes), len(source), backbone.feature_dim
    if num_classes == 0 or n_items == 0:
        raise ValueError(f"collect_stats: data {source!r} has no classes or no items")
    check_classes_nonempty(source, "collect_stats")  # an empty class fails now, not after the whole pass
    listing_problems = _listing_problems(source)

    preprocessing = {
        "resize": int(resize), "crop": int(crop), "mean": list(backbone.mean), "std": list(backbone.std),
        "input_size": backbone.input_size, "feature_kind": backbone.feature_kind,
    }
    t0 = time.perf_counter()
    data_fp = data_fingerprint(source)
    run_key = hashlib.sha256(json.dumps({
        "data": data_fp, "backbone": backbone.name, "weights": backbone.fingerprint, "pre": preprocessing,
        "decoder": DECODER_VERSION, "world": world, "cache": bool(cache_features),
    }, sort_keys=True).encode()).hexdigest()

    out_path = Path(out) if out is not None else None
    if out_path is not None and resume and out_path.is_file():
        try:
            done = ClassStats.load(out_path)
        except ValueError:
            done = None
        if done is not None and done.run_info.get("run_key") == run_key:
            missing = cache_features and not (done.features_path and Path(done.features_path).is_file()
                                              and labels_path_for(Path(done.features_path)).is_file())
            if not missing:
                notice(f"reusing the finished statistics {out_path} (same data, backbone and settings; "
                       "resume=False / --no-resume recomputes)", progress and rank == 0)
                done.run_info.update(images_forwarded=0, reused_result=True)  # nothing redone in this call
                return done
            notice(f"recomputing {out_path}: its feature cache is missing", progress and rank == 0)
        elif done is not None:
            notice(f"recomputing {out_path}: it was computed from other data, backbone or settings",
                   progress and rank == 0)

    # running totals, accumulated in place: fp64 sums of the fp32 per-batch class sums, int64 counts
    sums = torch.zeros(num_classes, dim, dtype=torch.float64, device=device)
    counts = torch.zeros(num_classes, dtype=torch.int64, device=device)
    start, skipped_before = 0, []
    ckpt_path = _checkpoint_path(out_path, rank, world) if out_path is not None else None
    if ckpt_path is not None and resume and ckpt_path.is_file():
        try:
            tensors, meta = load_tensors(ckpt_path)
        except ValueError:
            meta = {}
        problem = "" if meta.get("run_key") == run_key else "it belongs to other data, backbone or settings"
        if meta.get("format") != _CHECKPOINT_FORMAT:
            problem = "it is not a statistics checkpoint"
        if not problem and cache_features:
            problem = _cache_problem(out_path, meta.get("cache_id"))
        if problem:
            notice(f"not resuming {ckpt_path}: {problem}; starting over", progress)
        else:
            sums.copy_(tensors["sums"])
            counts.copy_(tensors["counts"])
            start = int(meta["position"])
            skipped_before = [tuple(s) for s in meta["skipped"]]
            notice(f"resuming {ckpt_path} at position {start}", progress and rank == 0)

    cache = None
    if cache_features:
        if distributed:  # rank 0 creates the shared files, the others open them once they exist
            if rank == 0:
                _open_cache(out_path, n_items, dim, create=start == 0)
            dist.barrier()
            cache = _open_cache(out_path, n_items, dim, create=False)
        else:
            cache = _open_cache(out_path, n_items, dim, create=start == 0)

    it = stream(source, batch_size=batch_size, resize=resize, crop=crop, workers=workers, shard=(rank, world),
                start=start)
    shard_total = start + it.num_items
    bar = None
    if progress and rank == 0:
        bar = tqdm(total=shard_total, initial=start, unit="img", unit_scale=True, desc=f"stats {backbone.name}",
                   dynamic_ncols=True)

    def save_checkpoint(position: int) -> None:
        if cache is not None:
            _flush_cache(cache)
        meta = {"format": _CHECKPOINT_FORMAT, "run_key": run_key, "position": position,
                "skipped": [list(s) for s in skipped_before + list(it.report.skipped)],
                "cache_id": _cache_id(out_path) if cache is not None else None}
        save_tensors(ckpt_path, {"sums": sums, "counts": counts}, meta)

    copier = _CudaCopier(device)
    forwarded, batches, position = 0, 0, start
    try:
        with torch.no_grad():
            with nvtx_range("stats/decode"):
                batch = next(it, None)
            pending = copier.issue(batch) if batch is not None else None
            while batch is not None:
                images, labels = pending
                copier.wait(images, labels)
                with nvtx_range("stats/forward"):
                    feats = backbone.features_uint8(images)
                with nvtx_range("stats/reduce"):
                    accumulate_class_sums(sums, counts, feats, labels)
                # CUDA kernels run asynchronously: take the next batch (decoded in the background meanwhile) and
                # start its host-to-device copy while the GPU is still busy with this forward
                with nvtx_range("stats/decode"):
                    nxt = next(it, None)
                pending = copier.issue(nxt) if nxt is not None else None
                if cache is not None:
                    rows = batch.indices.numpy()
                    cache[0][rows] = feats.to(torch.float16).cpu().numpy()
                    cache[1][rows] = batch.labels.numpy()
                forwarded += len(batch.indices)
                batches += 1
                position = batch.position
                if bar is not None:
                    bar.update(position - bar.n)
                if ckpt_path is not None and batches % checkpoint_every == 0:
                    save_checkpoint(position)
                batch = nxt
    finally:
        it.close()
        if bar is not None:
            bar.close()

    skipped = skipped_before + list(it.report.skipped)
    if rank == 0:
        skipped += listing_problems
    if distributed:
        if ckpt_path is not None:
            save_checkpoint(position)  # this rank's shard is done: a rerun after a failed all-reduce skips it
        reduce_device = sums.device if dist.get_backend() != "gloo" else torch.device("cpu")
        sums_r, counts_r = sums.to(reduce_device), counts.to(reduce_device)
        dist.all_reduce(sums_r)
        dist.all_reduce(counts_r)
        sums, counts = sums_r, counts_r
        gathered: list = [None] * world
        dist.all_gather_object(gathered, skipped)
        skipped = [s for part in gathered for s in part]
    skipped = sorted((int(i), str(n), str(r)) for i, n, r in skipped)

    counts_cpu = counts.cpu()
    empty = torch.nonzero(counts_cpu == 0).flatten().tolist()
    if empty:
        named = ", ".join(f"{source.classes[c]!r} (index {c})" for c in empty)
        reasons = [f"{n}: {r}" for i, n, r in skipped if i >= 0 and int(source.labels[i]) in empty][:5]
        raise ValueError(f"collect_stats: no usable image in class {named}"
                         + (f"; skipped files include {reasons}" if reasons else ""))
    centres = (sums.cpu() / counts_cpu.unsqueeze(1).to(torch.float64)).to(torch.float32)

    stats = ClassStats(
        centres=centres, counts=counts_cpu, classes=list(source.classes), class_to_idx=dict(source.class_to_idx),
        backbone_name=backbone.name, backbone_fingerprint=backbone.fingerprint, preprocessing=preprocessing,
        decoder_version=DECODER_VERSION, skipped=[list(s) for s in skipped],
        features_path=str(cache[2]) if cache is not None else None,
        run_info={"run_key": run_key, "data_fingerprint": data_fp, "resumed_from": start, "images_forwarded": forwarded,
                  "seconds": round(time.perf_counter() - t0, 3), "world_size": world, "data": repr(source)},
    )
    if cache is not None:
        _flush_cache(cache)
    if out_path is not None:
        if rank == 0:
            stats.save(out_path)
        if distributed:
            dist.barrier()  # the file exists on every rank's return
        if ckpt_path.is_file():
            ckpt_path.unlink()
    return stats
