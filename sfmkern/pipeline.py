"""Entry points that span phases (the API layer, above the phases): `distill(data_or_stats, backbone, **kwargs)` is
`sfmkern.distill`; given a data source instead of statistics it collects them first (`sfmkern.stats`), cached as
`out_dir/stats.safetensors` when `out_dir` is given, and starts from that source's real images (`init_data`)."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from sfmkern.artifacts import DistilledSet
from sfmkern.distillation import CONFIG_FIELDS, DistillConfig
from sfmkern.distillation import distill as distill_stats
from sfmkern.distillation.run import config_signature
from sfmkern.stats import collect_stats


def _is_statistics(obj) -> bool:
    return (isinstance(obj, torch.Tensor) or hasattr(obj, "centres")
            or (isinstance(obj, (str, os.PathLike)) and os.fspath(obj).endswith(".safetensors")))


def distill(data_or_stats, backbone, **kwargs) -> DistilledSet:
    """`sfmkern.distillation.distill` (its keyword arguments: the fields of DistillConfig and the run options),
    from ClassStats, a statistics file, a real-flow tensor, or a data source (an sfmkern.data source, an image
    folder or tar shards): then statistics are collected first with Resize round(crop * 256 / 224) / CenterCrop
    `crop`, cached as out_dir/stats.safetensors with the feature cache when out_dir is given, and the source is
    the real-image start (`init_data`) unless one is given."""
    if _is_statistics(data_or_stats):
        return distill_stats(data_or_stats, backbone, **kwargs)
    DistillConfig(**{k: v for k, v in kwargs.items() if k in CONFIG_FIELDS})  # bad settings fail before any work
    crop = kwargs.get("crop", DistillConfig.crop)
    out_dir, progress = kwargs.get("out_dir"), kwargs.get("progress", True)
    out = Path(out_dir) / "stats.safetensors" if out_dir is not None else None
    stats = collect_stats(data_or_stats, backbone, resize=max(crop, round(crop * 256 / 224)), crop=crop, out=out,
                          resume=True, cache_features=out is not None, progress=progress)
    if kwargs.get("init_data") is None:
        kwargs["init_data"] = data_or_stats
    return distill_stats(stats, backbone, **kwargs)


_signature = config_signature(distill_stats, DistillConfig, first=2)
_first, *_rest = _signature.parameters.values()
distill.__signature__ = _signature.replace(parameters=[_first.replace(name="data_or_stats"), *_rest])

__all__ = ["distill"]
