"""The evaluation result cache (`evaluate(cache_dir=...)`): a finished evaluation stored as JSON under a key made of
everything that decides its result; a later call with the same key returns the stored report (`EVAL_CACHE_FORMAT`)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

from sfmkern._io import atomic_write
from sfmkern.artifacts import EvalReport, FeatureSet, LinearHead

EVAL_CACHE_FORMAT = "sfmkern.eval-cache/1"


def digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def _tensor_sha(*tensors: torch.Tensor | None) -> str:
    h = hashlib.sha256()
    for t in tensors:
        if t is None:
            h.update(b"none|")
            continue
        t = t.detach().cpu().contiguous()
        h.update(f"{t.dtype}|{tuple(t.shape)}|".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def cache_key(sets, backbone, test: FeatureSet, *, mode, head, head_backbone, stats, epochs, runs, seed, view_bank,
               resize, crop, scale, max_batch, feature_batch) -> dict:
    """Everything that decides an evaluation's result (the report's name and timings excepted)."""
    if isinstance(head, (str, os.PathLike)):
        head = LinearHead.load(head)
    head_id = None
    if isinstance(head, LinearHead):
        head_id = {"weights": _tensor_sha(head.weight, head.bias), "classes": list(head.classes),
                   "backbone": head.backbone_fingerprint, "stats": head.stats_fingerprint}
    return {
        "format": EVAL_CACHE_FORMAT, "mode": mode, "device": torch.device(backbone.device).type,
        "images": None if sets is None else [
            {"pixels": _tensor_sha(s.images, s.labels), "classes": list(s.classes)} for s in sets],
        "backbone": {"name": backbone.name, "fingerprint": backbone.fingerprint},
        "test": {"features": _tensor_sha(test.features, test.labels), "classes": list(test.classes),
                 "backbone": test.backbone_fingerprint, "preprocessing": test.preprocessing,
                 "skipped": test.skipped},
        "head": head_id, "head_backbone": getattr(head_backbone, "fingerprint", None),
        "stats": getattr(stats, "fingerprint", None),
        "protocol": {"epochs": int(epochs), "runs": int(runs), "seed": int(seed),
                     "view_bank": None if view_bank is None else int(view_bank), "resize": int(resize),
                     "crop": int(crop), "scale": [float(v) for v in scale], "max_batch": int(max_batch),
                     "feature_batch": int(feature_batch)},
    }


def load_cached(path: Path, key: dict) -> EvalReport | None:
    """The report stored at `path` if its recorded key equals `key` (anything else, or a damaged file: None)."""
    try:
        doc = json.loads(path.read_text())
        if doc.get("key") != json.loads(json.dumps(key, default=str)):
            return None
        report = EvalReport.from_json(json.dumps(doc["report"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None
    report.provenance = {**report.provenance, "reused_from": str(path)}
    return report


def store_cached(path: Path, key: dict, report: EvalReport) -> None:
    text = json.dumps({"key": key, "report": report.to_dict()}, indent=1, sort_keys=True, default=str)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text + "\n"))
