"""Batched, sharded, resumable streaming of a source through the C++ decoder, with bounded prefetch.

A background thread asks the C++ thread pool (GIL released) to decode batch k+1 while the consumer works on batch k;
at most `prefetch` decoded batches wait in the queue, so memory stays bounded. Items the decoder flags (corrupt,
truncated, empty, oversized, unsupported) are dropped from their batch and listed in the report with a reason.
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import torch

from sfmkern.data._ext import DEFAULT_MAX_PIXELS, check_sizes, make_decoder
from sfmkern.data.sources import Source, _normalise_indices


class Batch(NamedTuple):
    """One decoded batch. images uint8 [B, S, S, 3] (pinned when CUDA is available), labels int64 [B],
    indices int64 [B] (source indices), position int (shard position after this batch: pass as `start=`)."""

    images: torch.Tensor
    labels: torch.Tensor
    indices: torch.Tensor
    position: int


@dataclass
class StreamReport:
    """Skipped items as (source index, name, reason) and per-class counts (int64 [C]) of the items yielded."""

    skipped: list[tuple[int, str, str]] = field(default_factory=list)
    class_counts: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))

    @property
    def num_yielded(self) -> int:
        return int(self.class_counts.sum())


_DONE = object()


class _Failure:
    def __init__(self, exc: BaseException):
        self.exc = exc


class _Producer:
    """The decode thread's state. It holds no reference to the iterator, so an abandoned iterator is collected and
    its __del__ stops this thread."""

    def __init__(self, source, shard_indices, start, batch_size, resize, crop, decoder, pin, prefetch):
        self.source, self.shard_indices, self.start = source, shard_indices, start
        self.batch_size, self.resize, self.crop = batch_size, resize, crop
        self.decoder, self.pin = decoder, pin
        self.queue: queue.Queue = queue.Queue(maxsize=prefetch)
        self.stop = threading.Event()

    def put(self, item) -> bool:
        while not self.stop.is_set():
            try:
                self.queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def run(self) -> None:
        try:
            src, s, n = self.source, self.crop, len(self.shard_indices)
            for begin in range(self.start, n, self.batch_size):
                if self.stop.is_set():
                    return
                end = min(begin + self.batch_size, n)
                idx = self.shard_indices[begin:end]
                images = torch.empty((len(idx), s, s, 3), dtype=torch.uint8, pin_memory=self.pin)
                reasons = src._decode_into(self.decoder, idx, images.numpy(), self.resize, s)
                ok = np.fromiter((not r for r in reasons), dtype=bool, count=len(reasons))
                skipped = [(int(idx[j]), src.name(int(idx[j])), reasons[j]) for j in np.nonzero(~ok)[0]]
                if not ok.all():
                    images = images.index_select(0, torch.from_numpy(np.nonzero(ok)[0]))
                    if self.pin:
                        images = images.pin_memory()
                    idx = idx[ok]
                labels = torch.from_numpy(src.labels[idx].copy())
                if not self.put((Batch(images, labels, torch.from_numpy(idx.copy()), end), skipped)):
                    return
            self.put(_DONE)
        except BaseException as exc:  # surfaced in the consumer thread
            self.put(_Failure(exc))


class StreamIterator:
    """Iterator returned by `stream`. `report` is complete once the iterator is exhausted (it is updated as batches
    are yielded before that). `num_items`: items of this shard from `start` on. `close()` stops the decode thread
    (also done when the iterator is exhausted or garbage-collected)."""

    def __init__(self, source, *, batch_size, resize, crop, workers, shard, start, prefetch, max_pixels):
        if not isinstance(source, Source):
            raise TypeError(f"stream: source must be an sfmkern.data source, got {type(source).__name__}")
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise ValueError(f"stream: batch_size must be a positive int, got {batch_size!r}")
        self.resize, self.crop = check_sizes(resize, crop)
        try:
            rank, world = (int(shard[0]), int(shard[1]))
        except (TypeError, ValueError, IndexError) as exc:
            raise ValueError(f"stream: shard must be (rank, world_size), got {shard!r}") from exc
        if world < 1 or not 0 <= rank < world:
            raise ValueError(f"stream: shard must satisfy 0 <= rank < world_size, got {shard!r}")
        if not isinstance(prefetch, int) or prefetch < 1:
            raise ValueError(f"stream: prefetch must be a positive int, got {prefetch!r}")
        self.source = source
        self.batch_size = batch_size
        self.shard = (rank, world)
        shard_indices = np.arange(rank, len(source), world, dtype=np.int64)
        if not isinstance(start, int) or not 0 <= start <= len(shard_indices):
            raise ValueError(f"stream: start must be an int in [0, {len(shard_indices)}], got {start!r}")
        self.start = start
        self.num_items = len(shard_indices) - start
        self.report = StreamReport(class_counts=np.zeros(len(source.classes), dtype=np.int64))
        decoder = make_decoder(workers, max_pixels)
        self._producer = _Producer(source, shard_indices, start, batch_size, self.resize, self.crop, decoder,
                                   torch.cuda.is_available(), prefetch)
        self._finished = False
        self._thread = threading.Thread(target=self._producer.run, name="sfmkern-decode", daemon=True)
        self._thread.start()

    def __iter__(self):
        return self

    def __next__(self) -> Batch:
        while True:
            if self._finished:
                raise StopIteration
            item = self._producer.queue.get()
            if item is _DONE:
                self._finish()
                raise StopIteration
            if isinstance(item, _Failure):
                self._finish()
                raise item.exc
            batch, skipped = item
            self.report.skipped.extend(skipped)
            if batch.labels.numel():
                self.report.class_counts += np.bincount(batch.labels.numpy(), minlength=len(self.source.classes))
                return batch
            # every item of this batch was flagged: nothing to yield, move on to the next one

    def _finish(self) -> None:
        self._finished = True
        self.close()

    def close(self) -> None:
        """Stop the decode thread (safe to call more than once, also mid-stream)."""
        self._producer.stop.set()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join()

    def __del__(self):
        producer = getattr(self, "_producer", None)
        if producer is not None:
            producer.stop.set()


def stream(
    source: Source,
    *,
    batch_size: int = 256,
    resize: int = 256,
    crop: int = 224,
    workers: int | None = None,
    shard: tuple[int, int] = (0, 1),
    start: int = 0,
    prefetch: int = 2,
    max_pixels: int | None = None,
) -> StreamIterator:
    """Stream `source` as decoded, resized (shorter side -> `resize`, antialiased) and centre-cropped batches.

    Shard `(rank, world_size)` takes source positions rank, rank + w, rank + 2w, ... in order; `start` is a position
    within the shard (a `Batch.position` from an earlier run resumes right after that batch). Batches hold up to
    `batch_size` items; flagged items are dropped (a batch may be shorter, an all-flagged batch is not yielded).
    `resize` and `crop` must be ints with crop <= resize (no "None = keep size" mode). `workers`: decode threads
    (None: all CPUs). `prefetch`: decoded batches that may wait for the consumer. `max_pixels`: decoder limit on
    declared width * height (None: 2**28).

    Returns an iterator of `Batch(images uint8 [B, crop, crop, 3], labels int64 [B], indices int64 [B], position)`;
    after exhaustion its `.report` is a `StreamReport(skipped=[(index, name, reason)], class_counts int64 [C])`.
    """
    return StreamIterator(
        source,
        batch_size=batch_size,
        resize=resize,
        crop=crop,
        workers=workers,
        shard=shard,
        start=start,
        prefetch=prefetch,
        max_pixels=DEFAULT_MAX_PIXELS if max_pixels is None else max_pixels,
    )


def load_images(
    source: Source,
    indices,
    *,
    resize: int = 256,
    crop: int = 224,
    workers: int | None = None,
    return_reasons: bool = False,
):
    """Random access: decode items `indices` of `source` -> (images uint8 [K, crop, crop, 3], ok bool [K]).

    Failed items are zero-filled with ok=False (with `return_reasons=True` a third element lists the reasons,
    '' for decoded items). Same preprocessing as `stream`.
    """
    if not isinstance(source, Source):
        raise TypeError(f"load_images: source must be an sfmkern.data source, got {type(source).__name__}")
    resize, crop = check_sizes(resize, crop)
    idx = _normalise_indices(indices, len(source))
    images = torch.empty((len(idx), crop, crop, 3), dtype=torch.uint8)
    reasons: list[str] = []
    if len(idx):
        decoder = make_decoder(workers if workers is not None else None)
        reasons = source._decode_into(decoder, idx, images.numpy(), resize, crop)
    ok = torch.tensor([not r for r in reasons], dtype=torch.bool)
    if return_reasons:
        return images, ok, reasons
    return images, ok
