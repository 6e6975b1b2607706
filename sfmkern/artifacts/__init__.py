"""What users keep: each artefact a dataclass that validates itself, saves and loads itself (safetensors or JSON with
metadata: a format name with its version and the fingerprints it depends on) and refuses, in one line naming the
file, to load under a mismatched backbone or statistics.

    ClassStats    statistics phase (`sfmkern.stats`)          sfmkern.ClassStats/1     backbone
    DistilledSet  distillation phase (`sfmkern.distillation`)  sfmkern.DistilledSet/1   statistics, backbone
    LinearHead    evaluation phase (`sfmkern.evaluation`)      sfmkern.LinearHead/1     backbone, statistics
    FeatureSet    evaluation phase                              sfmkern.FeatureSet/1     backbone
    EvalReport    evaluation phase (JSON)                       sfmkern.EvalReport/1     backbone

A leaf of the package: it imports only `sfmkern._io` (and torch, numpy, safetensors); every phase imports it, it
imports no phase (docs/design.md).
"""

from sfmkern.artifacts._files import check_classes
from sfmkern.artifacts.distilled import DistilledSet
from sfmkern.artifacts.features import FeatureSet, LabelledImages, as_labelled_images
from sfmkern.artifacts.head import LinearHead, head_path_for
from sfmkern.artifacts.report import REFERENCE_CAPTION, EvalReport, markdown_table
from sfmkern.artifacts.stats import ClassStats

__all__ = ["REFERENCE_CAPTION", "ClassStats", "DistilledSet", "EvalReport", "FeatureSet", "LabelledImages",
           "LinearHead", "as_labelled_images", "check_classes", "head_path_for", "markdown_table"]
