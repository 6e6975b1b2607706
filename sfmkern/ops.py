"""Public ops of sfmkern: per-class feature sums and the fused SFM flow-matching loss, with backend dispatch.

Dispatch happens here and only here (`backend_for`): the Triton kernels of `sfmkern.kernels` for CUDA tensors, and
for CPU tensors when TRITON_INTERPRET=1 (set before the first op runs); `sfmkern.reference` (plain torch) otherwise.
`SFMKERN_BACKEND=triton|torch` overrides, read at every call. `sfmkern.kernels` (and with it triton) is imported only
when the Triton path is taken, and nothing here queries CUDA at import time.

Input checks (`sfmkern._validate`) run before any launch: structure always, values (labels in range, finite
features, every class present) by default on CPU and with `SFMKERN_VALIDATE=1` on CUDA, where they would cost host
syncs on the hot path. With value checks off the kernels stay memory-safe and a bad input shows up as a NaN loss.
"""

from __future__ import annotations

import os

import torch
from torch.autograd.function import once_differentiable

from sfmkern import _validate, reference

BACKENDS = ("triton", "torch")
_BACKEND_ENV = "SFMKERN_BACKEND"

__all__ = ["BACKENDS", "backend_for", "class_sums", "feature_grad", "flow_loss_and_grad", "real_flow", "sfm_loss"]


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def backend_for(tensor: torch.Tensor) -> str:
    """"triton" or "torch": the backend that runs an op whose main input is `tensor`.

    CUDA tensors -> "triton"; CPU tensors -> "triton" when TRITON_INTERPRET=1, else "torch". The environment variable
    SFMKERN_BACKEND (read at call time) overrides: "triton" or "torch"; any other value raises ValueError, and so does
    "triton" for a CPU tensor without TRITON_INTERPRET=1 (Triton cannot run it).
    """
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"expected a torch.Tensor, got {type(tensor).__name__}")
    forced = os.environ.get(_BACKEND_ENV, "").strip()
    if forced:
        if forced not in BACKENDS:
            raise ValueError(f"{_BACKEND_ENV}={forced!r}: expected one of {BACKENDS}")
        if forced == "triton" and tensor.device.type != "cuda" and not _interpreting():
            raise ValueError(
                f"{_BACKEND_ENV}=triton but the tensor is on {tensor.device}: Triton runs CUDA tensors, or CPU tensors "
                "only with TRITON_INTERPRET=1"
            )
        return forced
    if tensor.device.type == "cuda":
        return "triton"
    return "triton" if tensor.device.type == "cpu" and _interpreting() else "torch"


def _kernels():
    import sfmkern.kernels as kernels  # lazy: triton is imported only on the Triton path

    return kernels


def _resolve_sorted(labels: torch.Tensor, sorted_labels: bool | None) -> bool:
    """None: detect non-decreasing labels where that is free (CPU); on CUDA assume unsorted (detecting would sync)."""
    if sorted_labels is not None:
        return bool(sorted_labels)
    if labels.numel() < 2:
        return True
    if labels.device.type == "cuda":
        return False
    return bool((labels[1:] >= labels[:-1]).all())


class ClassSums(torch.autograd.Function):
    """sums = index_add of features by label, counts = bincount; backward gathers dL/dsums[y_i] into each row."""

    @staticmethod
    def forward(ctx, features, labels, num_classes, deterministic, sorted_labels):
        sums, counts = _kernels().class_sums_triton(features, labels, num_classes, deterministic=deterministic,
                                                    sorted_labels=sorted_labels)
        ctx.mark_non_differentiable(counts)
        ctx.save_for_backward(labels)
        ctx.features_dtype = features.dtype
        return sums, counts

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_sums, grad_counts):
        (labels,) = ctx.saved_tensors
        grad = _kernels().feature_grad_triton(grad_sums, None, labels, dtype=ctx.features_dtype)
        return grad, None, None, None, None


def class_sums(features: torch.Tensor, labels: torch.Tensor, num_classes: int, *, deterministic: bool = False,
               sorted_labels: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-class feature sums and counts in one pass over the features.

    Args:
        features: [N, D] float32 / bfloat16 / float16 (float64 accepted: computed in float64). Any N, D; N*D may exceed
            2**31.
        labels: [N] int64 in [0, num_classes), any order.
        num_classes: C >= 2.
        deterministic: bitwise reproducible sums (unsorted labels are stably sorted and summed segment by segment
            instead of with atomics).
        sorted_labels: True promises non-decreasing labels (atomic-free segmented kernel; verified when value checks
            are on); False forces the atomic kernel; None detects on CPU and assumes unsorted on CUDA (no sync).
    Returns:
        sums [C, D] float32 (float64 for float64 features), counts [C] int64 (0 for absent classes).
        Differentiable w.r.t. `features` (the backward is a gather of dL/dsums by label).

    Equivalent PyTorch:
        sums = torch.zeros(C, D).index_add_(0, labels, features.float())
        counts = torch.bincount(labels, minlength=C)
    """
    if backend_for(features) == "torch":
        return reference.class_sums(features, labels, num_classes, deterministic=deterministic,
                                    sorted_labels=sorted_labels)
    _, _, c = _validate.validate_class_sums(features, labels, num_classes, sorted_labels)
    is_sorted = _resolve_sorted(labels, sorted_labels)
    if features.requires_grad and torch.is_grad_enabled():
        return ClassSums.apply(features, labels, c, deterministic, is_sorted)
    return _kernels().class_sums_triton(features, labels, c, deterministic=deterministic, sorted_labels=is_sorted)


def real_flow(real_centres: torch.Tensor) -> torch.Tensor:
    """The real statistical flow F_c = (sum_k mu_k - C mu_c) / (C - 1) (mean of the other centres minus mu_c).

    A run computes it once, so both backends use the same float64 torch arithmetic (exact to float32 rounding).

    Args:
        real_centres: [C, D] class centres mu (float32/bf16/fp16/float64), C >= 2.
    Returns:
        F [C, D] float32 (float64 when given float64); its rows sum to zero.

    Equivalent PyTorch:
        ((mu.sum(0) - mu) / (C - 1) - mu).float()
    """
    return reference.real_flow(real_centres)


def flow_loss_and_grad(sums: torch.Tensor, counts: torch.Tensor, real_flow: torch.Tensor, *,
                       anchor: torch.Tensor | None = None,
                       anchor_weight: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """The SFM loss from class sums (e.g. after an all-reduce) and G = dL/d mu~, with mu~ = sums / counts.

    Args:
        sums: [C, D] float32 (or float64); counts: [C] int64 with every n_c >= 1; real_flow: [C, D] float32/float64.
        anchor: optional [C, D] float32/float64 target class means A (same feature space as mu~);
        anchor_weight: lambda >= 0. With both, L += lambda * sum_c ||mu~_c - A_c||^2 / sum_c ||A_c - Abar||^2.
    Returns:
        loss: 0-dim (sums' dtype) = 1 - <F, F~> / (||F|| ||F~||) [+ the anchoring term]. G: [C, D] sums' dtype.

    Equivalent PyTorch:
        mu = (sums / counts[:, None]).requires_grad_()
        loss = sfmkern.reference.flow_loss(mu, real_flow, anchor, anchor_weight)
        G, = torch.autograd.grad(loss, mu)
    """
    if backend_for(sums) == "torch":
        return reference.flow_loss_and_grad(sums, counts, real_flow, anchor=anchor, anchor_weight=anchor_weight)
    _validate.validate_flow_loss(sums, counts, real_flow)
    _validate.validate_anchor(anchor, anchor_weight, sums.shape[0], sums.shape[1], sums.device)
    return _kernels().flow_loss_and_grad_triton(sums, counts, real_flow, anchor=anchor, anchor_weight=anchor_weight)


def feature_grad(grad: torch.Tensor, counts: torch.Tensor | None, labels: torch.Tensor, *,
                 scale: torch.Tensor | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """dL/dz_i = scale * G[y_i] / n_{y_i}: spread a per-class-mean gradient back to feature rows (one gather).

    Args:
        grad: G [C, D] float32/float64; counts: [C] int64 (None: no division, i.e. the gradient of class *sums*);
        labels: [N] int64 in [0, C); scale: 0-dim tensor (e.g. grad_output) or None; dtype: result dtype.
    Returns:
        [N, D] `dtype`.

    Equivalent PyTorch:
        (scale * grad[labels] / counts[labels, None]).to(dtype)
    """
    if backend_for(grad) == "torch":
        return reference.feature_grad(grad, counts, labels, scale=scale, dtype=dtype)
    _validate.validate_feature_grad(grad, counts, labels, scale, dtype)
    return _kernels().feature_grad_triton(grad, counts, labels, scale=scale, dtype=dtype)


class SFMLoss(torch.autograd.Function):
    """Forward: class sums -> synthetic flow -> loss and G (saved); backward: grad_output * G[y_i] / n_{y_i}."""

    @staticmethod
    def forward(ctx, features, labels, real_flow, num_classes, deterministic, sorted_labels, check_values, anchor,
                anchor_weight):
        kernels = _kernels()
        # Sums of z_i - z_0: the flow and G are shift-invariant, and centred sums keep their accuracy when the
        # features share a large offset. The anchor is shifted alike (in float64, then rounded once).
        shift = features[0].detach()
        sums, counts = kernels.class_sums_triton(features, labels, num_classes, deterministic=deterministic,
                                                 sorted_labels=sorted_labels, shift=shift)
        if check_values:  # needs the counts: after the class sums, before the loss kernel
            _validate.check_counts_nonempty(counts)
        if anchor is not None and anchor_weight != 0:
            anchor = (anchor.to(torch.float64) - shift.to(torch.float64)).to(sums.dtype)
        need_grad = ctx.needs_input_grad[0]
        loss, grad = kernels.flow_loss_and_grad_triton(sums, counts, real_flow, compute_grad=need_grad,
                                                       anchor=anchor, anchor_weight=anchor_weight)
        if need_grad:
            ctx.save_for_backward(grad, counts, labels)
            ctx.features_dtype = features.dtype
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        grad, counts, labels = ctx.saved_tensors
        features_grad = _kernels().feature_grad_triton(grad, counts, labels, scale=grad_output,
                                                       dtype=ctx.features_dtype)
        return features_grad, None, None, None, None, None, None, None, None


def sfm_loss(features: torch.Tensor, labels: torch.Tensor, real_flow: torch.Tensor, *, deterministic: bool = False,
             sorted_labels: bool | None = None, anchor: torch.Tensor | None = None,
             anchor_weight: float = 0.0) -> torch.Tensor:
    """The SFM flow-matching loss of synthetic features against a real flow, differentiable w.r.t. `features`.

    L = 1 - <vec F, vec F~> / (||F|| ||F~||) with F~ the flow of the synthetic class means (see sfmkern.reference).
    The Triton forward reads the features once and computes dL/dmu~ alongside the loss; the backward writes
    dL/dz once (grad_output * G[y_i] / n_{y_i}). `real_flow` is a constant (it receives no gradient).

    Args:
        features: [N, D] float32 / bfloat16 / float16 (float64: computed in float64) synthetic features, e.g. several
            augmented views per image as rows with the same label.
        labels: [N] int64; every class 0..C-1 needs at least one row.
        real_flow: [C, D] float32/float64 from `real_flow(real_centres)`.
        deterministic, sorted_labels: as in `class_sums`.
        anchor, anchor_weight: optional anchoring term, as in `flow_loss_and_grad` (computed in the same fused
            passes; A is a constant).
    Returns:
        0-dim float32 loss (float64 for float64 features).

    Equivalent PyTorch:
        sums, counts = class_sums(features, labels, C); sfmkern.reference.flow_loss(sums / counts[:, None], real_flow)
    """
    if backend_for(features) == "torch":
        return reference.sfm_loss(features, labels, real_flow, deterministic=deterministic,
                                  sorted_labels=sorted_labels, anchor=anchor, anchor_weight=anchor_weight)
    _, d, c = _validate.validate_sfm_loss(features, labels, real_flow, sorted_labels)
    active = _validate.validate_anchor(anchor, anchor_weight, c, d, features.device)
    is_sorted = _resolve_sorted(labels, sorted_labels)
    check_values = _validate.value_checks_enabled(features.device)
    return SFMLoss.apply(features, labels, real_flow.detach(), c, deterministic, is_sorted, check_values,
                         anchor.detach() if active else None, float(anchor_weight) if active else 0.0)
