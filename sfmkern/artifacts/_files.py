"""What every artefact file shares: a format name with a version, one-line refusals that name the file and what to
re-run, and the class-list check."""

from __future__ import annotations

import os
from collections.abc import Sequence

from sfmkern._io import load_tensors


def short(fingerprint: str | None) -> str:
    """The first 12 characters of a fingerprint ("?" when unknown), as error messages show it."""
    return (fingerprint or "?")[:12]


def read_artifact(path: str | os.PathLike, *, kind: str, formats: Sequence[str], tensors: Sequence[str],
                  rerun: str, legacy: dict | None = None) -> tuple[dict, dict]:
    """(tensors, metadata) of an artefact file whose metadata `format` is one of `formats` (the current one first,
    then older ones still read) and which holds every name in `tensors`; a file without `format` whose metadata
    holds every item of `legacy` (what an older sfmkern wrote) is read too. Anything else: ValueError in one line
    naming the file, what it is not, and the command that writes a fresh one (`rerun`)."""
    loaded, meta = load_tensors(path)
    found = meta.get("format")
    if found is None and legacy and all(meta.get(k) == v for k, v in legacy.items()):
        found = formats[0]
    if found not in formats:
        newer = isinstance(found, str) and found.split("/")[0] == formats[0].split("/")[0]
        why = (f"format {found!r} is not one this sfmkern reads ({', '.join(map(repr, formats))})" if newer
               else f"not a {kind} file (format {found!r})")
        raise ValueError(f"{path}: {why}; {rerun}")
    missing = [name for name in tensors if name not in loaded]
    if missing:
        raise ValueError(f"{path}: {kind} file without {', '.join(missing)} (damaged); {rerun}")
    return loaded, meta


def check_classes(what_a: str, classes_a: Sequence[str], what_b: str, classes_b: Sequence[str]) -> None:
    """Raise ValueError if two class lists differ in count or in any name (order matters: labels index them)."""
    a, b = [str(c) for c in classes_a], [str(c) for c in classes_b]
    if len(a) != len(b):
        raise ValueError(f"class count mismatch: {what_a} has {len(a)} classes, {what_b} has {len(b)}")
    for i, (x, y) in enumerate(zip(a, b, strict=True)):
        if x != y:
            raise ValueError(f"class names differ at label {i}: {what_a} has {x!r}, {what_b} has {y!r}")


def check_backbone(what: str, name: str, fingerprint: str | None, backbone, *, how: str = "made with") -> None:
    """Refuse (ValueError, one line) `backbone` when it is not the one (`name`, `fingerprint`) `what` records
    ("<what> was <how> backbone ..., not <how's preposition> ...")."""
    if backbone is None or not fingerprint:
        return
    if backbone.fingerprint != fingerprint:
        raise ValueError(f"{what} was {how} backbone {name!r} ({short(fingerprint)}), not {how.split()[-1]} "
                         f"{backbone.name!r} ({short(backbone.fingerprint)})")


def check_stats(what: str, fingerprint: str | None, stats, *, how: str = "made from", then: str = "") -> None:
    """Refuse (ValueError, one line) `stats` when `what` records other statistics (`fingerprint`); `then` is appended
    (what to do about it)."""
    if stats is None or not fingerprint:
        return
    if stats.fingerprint != fingerprint:
        raise ValueError(f"{what} was {how} statistics {short(fingerprint)}, not {how.split()[-1]} these "
                         f"({short(stats.fingerprint)}){then}")
