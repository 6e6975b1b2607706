"""The evaluation phase: the linear-probe protocol and classifier inheritance (`evaluate`), the full-data head
(`fit_full_head`, `load_or_fit_head`) and the real-image baselines (`sfmkern.evaluation.baselines`, also reachable as
`sfmkern.baselines`).

Modules, one job each: `features` (features of sources, of the statistics' cache and of augmented views),
`heads` (the linear trainer, the full-data head and its reuse rule), `cache` (the result cache), `protocol`
(`evaluate`), `baselines`. The artefacts it reads and returns (`EvalReport`, `FeatureSet`, `LabelledImages`,
`LinearHead`) live in `sfmkern.artifacts` and are re-exported here. docs/protocol.md has the protocol.
"""

from sfmkern.artifacts import (
    REFERENCE_CAPTION,
    EvalReport,
    FeatureSet,
    LabelledImages,
    LinearHead,
    as_labelled_images,
    check_classes,
    head_path_for,
    markdown_table,
)
from sfmkern.evaluation.cache import EVAL_CACHE_FORMAT
from sfmkern.evaluation.features import (
    DEFAULT_SCALE,
    build_view_bank,
    clear_feature_cache,
    extract_features,
    stats_features,
)
from sfmkern.evaluation.heads import fit_full_head, head_reuse_problem, load_or_fit_head
from sfmkern.evaluation.protocol import CPU_VIEW_BANK, MODES, default_view_bank, evaluate

__all__ = [
    "CPU_VIEW_BANK", "DEFAULT_SCALE", "EVAL_CACHE_FORMAT", "EvalReport", "FeatureSet", "LabelledImages", "LinearHead",
    "MODES", "REFERENCE_CAPTION", "as_labelled_images", "build_view_bank", "check_classes", "clear_feature_cache",
    "default_view_bank", "evaluate", "extract_features", "fit_full_head", "head_path_for", "head_reuse_problem",
    "load_or_fit_head", "markdown_table", "stats_features",
]
