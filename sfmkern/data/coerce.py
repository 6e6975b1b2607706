"""`as_source`: a data source from what a user passes (a source, an image folder, tar shards or a glob of them)."""

from __future__ import annotations

import os

from sfmkern.data.sources import ImageFolder, Source, TarShards


def as_source(data, *, what: str = "collect_stats"):
    """`data` itself if it is an sfmkern.data source; a path: TarShards for a .tar file, a glob or a folder of
    shards, else ImageFolder. Raises FileNotFoundError / TypeError naming `what`."""
    if isinstance(data, Source):
        return data
    if isinstance(data, (str, os.PathLike)):
        text = os.fspath(data)
        if any(ch in text for ch in "*?[") or text.endswith(".tar"):
            return TarShards(text)
        if os.path.isdir(text):
            entries = list(os.scandir(text))
            if not any(e.is_dir() for e in entries) and any(e.name.endswith(".tar") for e in entries):
                return TarShards(text)  # a directory of shards
            return ImageFolder(text)
        raise FileNotFoundError(f"{what}: data {text!r} is neither a directory nor a tar shard (glob)")
    raise TypeError(f"{what}: data must be a path or an sfmkern.data source, got {type(data).__name__}")
