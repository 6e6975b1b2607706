"""Input checks shared by `sfmkern.ops` and `sfmkern.reference`: every bad input fails here, before any kernel launch.

Two kinds of check:
- structural (dtype, device, rank, shape, C >= 2): free, always on;
- value checks (labels in range, every class has a row, finite features and flows): they read tensor values, which on
  a GPU means a host synchronisation and, for finiteness, one more pass over the features. They are on by default for
  CPU tensors and off by default for CUDA tensors (the distillation hot path must not sync); `SFMKERN_VALIDATE=1`
  turns them on everywhere (debugging), `SFMKERN_VALIDATE=0` off everywhere. With them off the kernels stay
  memory-safe: rows with out-of-range labels are dropped, an empty class or a non-finite feature makes the loss NaN.
"""

from __future__ import annotations

import math
import os

import torch

FEATURE_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
STAT_DTYPES = (torch.float32, torch.float64)
_VALIDATE_ENV = "SFMKERN_VALIDATE"


def value_checks_enabled(device: torch.device) -> bool:
    """Whether value checks run for tensors on `device`: `SFMKERN_VALIDATE` (0/1, read at call time) or CPU-only."""
    raw = os.environ.get(_VALIDATE_ENV, "").strip()
    if raw == "":
        return device.type != "cuda"
    if raw in ("0", "1"):
        return raw == "1"
    raise ValueError(f"{_VALIDATE_ENV}={raw!r}: expected '0' or '1'")


def _check_tensor(x, name: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")


def check_features(features, name: str = "features") -> tuple[int, int]:
    """features: [N, D] float32/bfloat16/float16/float64 with N >= 1, D >= 1. Returns (N, D)."""
    _check_tensor(features, name)
    if features.dtype not in FEATURE_DTYPES:
        raise TypeError(f"{name}: dtype {features.dtype} not supported, expected one of {FEATURE_DTYPES}")
    if features.dim() != 2:
        raise ValueError(f"{name}: expected shape [N, D], got {tuple(features.shape)}")
    n, d = features.shape
    if n < 1 or d < 1:
        raise ValueError(f"{name}: needs at least one row and one column, got shape {tuple(features.shape)}")
    return n, d


def check_num_classes(num_classes) -> int:
    """num_classes: a Python int >= 2 (the flow of a single class is undefined: it divides by C - 1)."""
    if isinstance(num_classes, bool) or not isinstance(num_classes, int):
        raise TypeError(f"num_classes: expected an int, got {type(num_classes).__name__}")
    if num_classes < 2:
        raise ValueError(f"num_classes={num_classes}: statistical flow matching needs C >= 2 classes")
    return num_classes


def check_labels(labels, n_rows: int, device: torch.device) -> None:
    """labels: [N] int64 on the features' device."""
    _check_tensor(labels, "labels")
    if labels.dtype != torch.int64:
        raise TypeError(f"labels: expected dtype torch.int64, got {labels.dtype}")
    if labels.dim() != 1 or labels.shape[0] != n_rows:
        raise ValueError(f"labels: expected shape [{n_rows}] (one per feature row), got {tuple(labels.shape)}")
    if labels.device != device:
        raise ValueError(f"labels: on {labels.device} but features are on {device}")


def check_label_values(labels: torch.Tensor, num_classes: int) -> None:
    """Every label in [0, num_classes). Names the first offending row. (Value check: syncs on a GPU.)"""
    bad = (labels < 0) | (labels >= num_classes)
    if bool(bad.any()):
        row = int(bad.nonzero()[0, 0])
        raise ValueError(f"labels[{row}]={int(labels[row])} is out of range [0, {num_classes})")


def check_finite_rows(features: torch.Tensor, name: str = "features") -> None:
    """Every value finite. Names the first row holding a NaN/Inf. (Value check: reads all of `features`.)"""
    finite_rows = torch.isfinite(features).all(dim=1)
    if not bool(finite_rows.all()):
        row = int((~finite_rows).nonzero()[0, 0])
        raise ValueError(f"{name}: row {row} holds a non-finite value (NaN or Inf)")


def check_sorted(labels: torch.Tensor) -> None:
    """labels non-decreasing (the promise made by `sorted_labels=True`)."""
    drops = labels[1:] < labels[:-1]
    if bool(drops.any()):
        row = int(drops.nonzero()[0, 0]) + 1
        raise ValueError(f"sorted_labels=True but labels[{row}]={int(labels[row])} < labels[{row - 1}]")


def check_counts_nonempty(counts: torch.Tensor) -> None:
    """Every class has at least one synthetic row (the synthetic class mean divides by n_c). (Value check.)"""
    empty = counts < 1
    if bool(empty.any()):
        cls = int(empty.nonzero()[0, 0])
        raise ValueError(
            f"class {cls} has no synthetic row (counts[{cls}]=0); every class of the flow needs at least one row"
        )


def check_flow(real_flow, num_classes: int | None, n_cols: int | None, device: torch.device,
               name: str = "real_flow") -> tuple[int, int]:
    """real_flow: [C, D] float32/float64 on `device`; when given, C and D must match. Returns (C, D)."""
    _check_tensor(real_flow, name)
    if real_flow.dtype not in STAT_DTYPES:
        raise TypeError(f"{name}: expected dtype float32 or float64, got {real_flow.dtype}")
    if real_flow.dim() != 2:
        raise ValueError(f"{name}: expected shape [C, D], got {tuple(real_flow.shape)}")
    c, d = real_flow.shape
    if num_classes is not None and c != num_classes:
        raise ValueError(f"{name}: has {c} classes (shape {tuple(real_flow.shape)}) but {num_classes} are expected")
    if n_cols is not None and d != n_cols:
        raise ValueError(f"{name}: shape {tuple(real_flow.shape)} disagrees with feature dimension D={n_cols}")
    check_num_classes(c)
    if real_flow.device != device:
        raise ValueError(f"{name}: on {real_flow.device} but features are on {device}")
    return c, d


def check_centres(real_centres) -> tuple[int, int]:
    """real_centres: [C, D] floating with C >= 2 and finite values (checked when value checks are on)."""
    _check_tensor(real_centres, "real_centres")
    if real_centres.dtype not in FEATURE_DTYPES:
        raise TypeError(f"real_centres: dtype {real_centres.dtype} not supported, expected one of {FEATURE_DTYPES}")
    if real_centres.dim() != 2:
        raise ValueError(f"real_centres: expected shape [C, D], got {tuple(real_centres.shape)}")
    c, d = real_centres.shape
    check_num_classes(c)
    if d < 1:
        raise ValueError(f"real_centres: needs at least one column, got shape {tuple(real_centres.shape)}")
    if value_checks_enabled(real_centres.device):
        check_finite_rows(real_centres, "real_centres")
    return c, d


def check_flow_nonzero(real_flow: torch.Tensor, name: str = "real_flow") -> None:
    """The real flow is not identically zero (its norm divides the cosine). (Value check.)"""
    if not bool((real_flow != 0).any()):
        raise ValueError(
            f"{name}: all zero (||F|| = 0, e.g. every real class centre is equal), so the flow cosine is undefined"
        )


def validate_anchor(anchor, anchor_weight, num_classes: int, n_cols: int, device: torch.device) -> bool:
    """The optional anchoring term: anchor None or a [C, D] float32/float64 tensor on `device`, anchor_weight a finite
    real >= 0 (> 0 needs an anchor). Value checks: anchor finite, its rows not all equal (the term divides by their
    spread). Returns whether the term is active (anchor given and weight > 0)."""
    if isinstance(anchor_weight, bool) or not isinstance(anchor_weight, (int, float)):
        raise TypeError(f"anchor_weight: expected a float, got {type(anchor_weight).__name__}")
    if not math.isfinite(anchor_weight) or anchor_weight < 0:
        raise ValueError(f"anchor_weight={anchor_weight!r}: expected a finite value >= 0")
    if anchor is None:
        if anchor_weight > 0:
            raise ValueError(f"anchor_weight={anchor_weight!r} > 0 but no anchor was given")
        return False
    _check_tensor(anchor, "anchor")
    if anchor.dtype not in STAT_DTYPES:
        raise TypeError(f"anchor: expected dtype float32 or float64, got {anchor.dtype}")
    if tuple(anchor.shape) != (num_classes, n_cols):
        raise ValueError(f"anchor: expected shape [{num_classes}, {n_cols}] (one target mean per class), "
                         f"got {tuple(anchor.shape)}")
    if anchor.device != device:
        raise ValueError(f"anchor: on {anchor.device} but expected {device}")
    if anchor_weight == 0:
        return False
    if value_checks_enabled(device):
        check_finite_rows(anchor, "anchor")
        if not bool((anchor != anchor[:1]).any()):
            raise ValueError("anchor: all rows are equal, so the anchoring term's normaliser sum_c ||A_c - Abar||^2 "
                             "is zero")
    return True


def validate_class_sums(features, labels, num_classes, sorted_labels) -> tuple[int, int, int]:
    """All checks of `class_sums` (values only when enabled). Returns (N, D, C)."""
    n, d = check_features(features)
    check_labels(labels, n, features.device)
    c = check_num_classes(num_classes)
    if sorted_labels not in (None, True, False):
        raise TypeError(f"sorted_labels: expected None or a bool, got {sorted_labels!r}")
    if value_checks_enabled(features.device):
        check_label_values(labels, c)
        check_finite_rows(features)
        if sorted_labels:
            check_sorted(labels)
    return n, d, c


def validate_sfm_loss(features, labels, real_flow, sorted_labels) -> tuple[int, int, int]:
    """Checks of `sfm_loss` that precede the class-sum kernel. Returns (N, D, C). The empty-class check needs the
    counts and is made by the caller (`check_counts_nonempty`) between the class sums and the loss kernel."""
    n, d = check_features(features)
    check_labels(labels, n, features.device)
    c, _ = check_flow(real_flow, None, d, features.device)
    if sorted_labels not in (None, True, False):
        raise TypeError(f"sorted_labels: expected None or a bool, got {sorted_labels!r}")
    if value_checks_enabled(features.device):
        check_label_values(labels, c)
        check_finite_rows(features)
        check_finite_rows(real_flow, "real_flow")
        check_flow_nonzero(real_flow)
        if sorted_labels:
            check_sorted(labels)
    return n, d, c


def validate_flow_loss(sums, counts, real_flow) -> tuple[int, int]:
    """sums [C, D] float32/float64, counts [C] int64 with every n_c >= 1, real_flow [C, D]. Returns (C, D)."""
    _check_tensor(sums, "sums")
    if sums.dtype not in STAT_DTYPES:
        raise TypeError(f"sums: expected dtype float32 or float64, got {sums.dtype}")
    if sums.dim() != 2:
        raise ValueError(f"sums: expected shape [C, D], got {tuple(sums.shape)}")
    c, d = sums.shape
    check_num_classes(c)
    _check_counts_tensor(counts, c, sums.device)
    check_flow(real_flow, c, d, sums.device)
    if value_checks_enabled(sums.device):
        check_counts_nonempty(counts)
        check_finite_rows(sums, "sums")
        check_finite_rows(real_flow, "real_flow")
        check_flow_nonzero(real_flow)
    return c, d


def _check_counts_tensor(counts, num_classes: int, device: torch.device) -> None:
    _check_tensor(counts, "counts")
    if counts.dtype != torch.int64:
        raise TypeError(f"counts: expected dtype torch.int64, got {counts.dtype}")
    if counts.shape != (num_classes,):
        raise ValueError(f"counts: expected shape [{num_classes}], got {tuple(counts.shape)}")
    if counts.device != device:
        raise ValueError(f"counts: on {counts.device} but expected {device}")


def validate_feature_grad(grad, counts, labels, scale, dtype) -> tuple[int, int, int]:
    """grad [C, D] float32/float64, counts [C] int64 (or None: no division), labels [N] int64 in range, scale a 0-dim
    tensor or None, dtype a feature dtype. Returns (N, D, C)."""
    _check_tensor(grad, "G")
    if grad.dtype not in STAT_DTYPES:
        raise TypeError(f"G: expected dtype float32 or float64, got {grad.dtype}")
    if grad.dim() != 2:
        raise ValueError(f"G: expected shape [C, D], got {tuple(grad.shape)}")
    c, d = grad.shape
    if counts is not None:
        _check_counts_tensor(counts, c, grad.device)
    _check_tensor(labels, "labels")
    if labels.dtype != torch.int64 or labels.dim() != 1:
        raise TypeError(f"labels: expected a 1-D torch.int64 tensor, got {labels.dtype} {tuple(labels.shape)}")
    if labels.device != grad.device:
        raise ValueError(f"labels: on {labels.device} but G is on {grad.device}")
    if scale is not None:
        _check_tensor(scale, "scale")
        if scale.numel() != 1 or not scale.is_floating_point():
            raise ValueError(f"scale: expected a floating 0-dim tensor, got {scale.dtype} {tuple(scale.shape)}")
        if scale.device != grad.device:
            raise ValueError(f"scale: on {scale.device} but G is on {grad.device}")
    if dtype not in FEATURE_DTYPES:
        raise TypeError(f"dtype: {dtype} not supported, expected one of {FEATURE_DTYPES}")
    if value_checks_enabled(grad.device):
        check_label_values(labels, c)
        if counts is not None:
            check_counts_nonempty(counts)
    return labels.shape[0], d, c
