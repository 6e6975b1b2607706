"""sfmkern: dataset distillation by Statistical Flow Matching on frozen backbones, with fused kernels.

The public API is imported lazily so that `import sfmkern` stays cheap (no timm, no triton at import time).
Importing sfmkern before torch lets it export OMP_WAIT_POLICY=PASSIVE unless already set (`sfmkern._threads`).
"""

from __future__ import annotations

import importlib

from sfmkern import _threads

_threads.configure_at_import()

__version__ = "0.1.0"

_LAZY = {
    "collect_stats": "sfmkern.stats",
    "ClassStats": "sfmkern.stats",
    "distill": "sfmkern.distill",
    "DistilledSet": "sfmkern.distill",
    "evaluate": "sfmkern.evaluate",
    "EvalReport": "sfmkern.evaluate",
    "fit_full_head": "sfmkern.evaluate",
    "load_backbone": "sfmkern.backbone",
    "Backbone": "sfmkern.backbone",
    "plan": "sfmkern.plan",
    "Plan": "sfmkern.plan",
}

_SUBMODULES = {"augment", "backbone", "baselines", "data", "ops", "reference", "stats"}

__all__ = ["__version__", *sorted(_LAZY)]


def __getattr__(name: str):
    if name in _SUBMODULES:  # `sfmkern.data.ImageFolder(...)` without a separate import
        return importlib.import_module(f"sfmkern.{name}")
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'sfmkern' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
