"""The distillation phase: `distill(stats, backbone, **config)` (a run with checkpoints and resume), the `Distiller`
that owns the images and takes the steps, `DistillConfig` (the one source of every hyper-parameter's default) and
`plan` (the mode, chunk, memory and FLOPs of a run before starting it).

Modules: `config` (DistillConfig, the paper's schedule, the chunk arithmetic), `distiller` (Distiller), `run`
(distill), `realdata` (real-image start and anchors from the statistics' feature cache), `plan`. The artefact it
writes, `DistilledSet`, lives in `sfmkern.artifacts` and is re-exported here. `sfmkern.distill` (sfmkern.pipeline)
also takes a data source and collects its statistics first.
"""

from sfmkern.artifacts import DistilledSet
from sfmkern.distillation.config import (
    ANCHOR_TARGETS,
    DEFAULT_LR,
    INITS,
    MODES,
    OBJECTIVES,
    PAPER_SCHEDULE,
    DistillConfig,
    chunk_for_budget,
    own_bytes_max,
    paper_schedule,
    parse_bytes,
    warn_incomplete_schedule,
)
from sfmkern.distillation.distiller import Distiller
from sfmkern.distillation.plan import Plan, plan
from sfmkern.distillation.run import CONFIG_FIELDS, RUN_OPTIONS, distill

__all__ = [
    "ANCHOR_TARGETS", "CONFIG_FIELDS", "DEFAULT_LR", "INITS", "MODES", "OBJECTIVES", "PAPER_SCHEDULE", "RUN_OPTIONS",
    "DistillConfig", "DistilledSet", "Distiller", "Plan", "chunk_for_budget", "distill", "own_bytes_max",
    "paper_schedule", "parse_bytes", "plan", "warn_incomplete_schedule",
]
