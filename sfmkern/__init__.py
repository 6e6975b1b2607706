"""sfmkern: dataset distillation by Statistical Flow Matching on frozen backbones, with fused kernels.

The public API is imported lazily so that `import sfmkern` stays cheap (no timm, no triton at import time).
Importing sfmkern before torch lets it export OMP_WAIT_POLICY=PASSIVE unless already set (`sfmkern._threads`).
"""

from __future__ import annotations

import importlib

from sfmkern import _threads

_threads.configure_at_import()

__version__ = "0.1.0"

_LAZY = {  # public name -> the module that defines it (phase modules are named apart from their functions)
    "collect_stats": "sfmkern.stats",
    "distill": "sfmkern.pipeline",
    "DistillConfig": "sfmkern.distillation",
    "Distiller": "sfmkern.distillation",
    "plan": "sfmkern.distillation",
    "Plan": "sfmkern.distillation",
    "evaluate": "sfmkern.evaluation",
    "fit_full_head": "sfmkern.evaluation",
    "load_or_fit_head": "sfmkern.evaluation",
    "ClassStats": "sfmkern.artifacts",
    "DistilledSet": "sfmkern.artifacts",
    "EvalReport": "sfmkern.artifacts",
    "FeatureSet": "sfmkern.artifacts",
    "LinearHead": "sfmkern.artifacts",
    "load_backbone": "sfmkern.backbone",
    "Backbone": "sfmkern.backbone",
}

_SUBMODULES = {  # `sfmkern.data.ImageFolder(...)` without a separate import
    "artifacts": "sfmkern.artifacts", "augment": "sfmkern.augment", "backbone": "sfmkern.backbone",
    "baselines": "sfmkern.evaluation.baselines", "data": "sfmkern.data", "distillation": "sfmkern.distillation",
    "evaluation": "sfmkern.evaluation", "ops": "sfmkern.ops", "reference": "sfmkern.reference",
    "stats": "sfmkern.stats",
}

__all__ = ["__version__", *sorted(_LAZY)]


def __getattr__(name: str):
    if name in _SUBMODULES:
        return importlib.import_module(_SUBMODULES[name])
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'sfmkern' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
