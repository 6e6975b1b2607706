"""Plain-torch reference of every op in `sfmkern.ops`: same arguments, differentiable, the single source of truth.

Tests compare the Triton kernels against these functions in float64; benchmarks time them (eager and torch.compile);
`sfmkern.ops` falls back to them on CPU. Low-precision features are accumulated in float32; float64 inputs are
computed in float64 end to end.

The maths (Statistical Flow Matching, Xia et al. arXiv 2602.05391), for features z [N, D], labels y in [0, C):
    S_c = sum_{i: y_i = c} z_i,  n_c = |{i: y_i = c}|,  mu~_c = S_c / n_c
    nu_c = (sum_k mu_k - mu_c) / (C - 1),   F_c = nu_c - mu_c          (real flow, from the real class centres)
    nu~_c = (sum_k mu~_k - mu~_c) / (C - 1), F~_c = nu~_c - mu~_c      (synthetic flow)
    L = 1 - <vec F, vec F~> / (||F|| ||F~||)                            (ONE cosine over the flattened C x D matrices)
    [+ lambda * sum_c ||mu~_c - A_c||^2 / sum_c ||A_c - Abar||^2]      (optional anchoring to target means A)
Numerics shared with the kernels: flows are formed from means centred on one class's mean and the sums from features
minus one feature row (both shift-invariant), and every norm is taken of values scaled by their peak first.
The public SFM code divides the synthetic non-target sum by C * ipc - 1 instead of C - 1; the two agree at one image
per class. We use the self-consistent C - 1 form for both flows. Several augmented views of one image are just more
rows with the same label (the class mean over all views is the mean of the per-image view averages).
"""

from __future__ import annotations

import torch

from sfmkern import _validate


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def class_sums(features: torch.Tensor, labels: torch.Tensor, num_classes: int, *, deterministic: bool = False,
               sorted_labels: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-class feature sums and row counts.

    Args:
        features: [N, D] float32 / bfloat16 / float16 / float64.
        labels: [N] int64 in [0, num_classes).
        num_classes: C >= 2.
        deterministic: use a deterministic accumulation (`index_put_(accumulate=True)`) on CUDA.
        sorted_labels: accepted for signature parity with `sfmkern.ops.class_sums`; when True the labels are checked
            to be non-decreasing (with value checks on).
    Returns:
        sums [C, D] float32 (float64 for float64 features), counts [C] int64. Differentiable w.r.t. `features`.

    Equivalent PyTorch:
        sums = torch.zeros(C, D).index_add(0, labels, features.float()); counts = torch.bincount(labels, minlength=C)
    """
    _, d, c = _validate.validate_class_sums(features, labels, num_classes, sorted_labels)
    acc = _acc_dtype(features.dtype)
    zeros = torch.zeros(c, d, dtype=acc, device=features.device)
    values = features.to(acc)
    if deterministic:
        sums = zeros.index_put((labels,), values, accumulate=True)
    else:
        sums = zeros.index_add(0, labels, values)
    counts = torch.bincount(labels, minlength=c)
    return sums, counts


def real_flow(real_centres: torch.Tensor) -> torch.Tensor:
    """The real statistical flow F_c = (sum_k mu_k - mu_c) / (C - 1) - mu_c = (sum_k mu_k - C mu_c) / (C - 1).

    Args:
        real_centres: [C, D] real class centres mu, C >= 2.
    Returns:
        F [C, D] float32 (float64 when given float64), computed in float64. Its rows sum to zero.
    """
    _validate.check_centres(real_centres)
    out = torch.float64 if real_centres.dtype == torch.float64 else torch.float32
    flow = _flow(real_centres.to(torch.float64)).to(out)
    _validate.check_flow_nonzero(flow, "real_flow(real_centres)")  # computed once per run: this sync is cheap
    return flow


def _flow(means: torch.Tensor) -> torch.Tensor:
    """F_c = nu_c - mu_c with nu_c the mean of the other classes' means; means [C, D] -> [C, D], same dtype.

    The flow is shift-invariant, so it is formed from means centred on the first class's mean (detached: a constant
    shift): with features sharing a large common offset, sum_k mu_k - C mu_c would otherwise cancel ~C-fold.
    """
    c = means.shape[0]
    centred = means - means[:1].detach()
    others_mean = (centred.sum(dim=0, keepdim=True) - centred) / (c - 1)
    return others_mean - centred


def _unit(x: torch.Tensor) -> torch.Tensor:
    """x / ||x||, scaled by max|x| (a detached constant) before the norm so that it neither overflows nor underflows
    (features near 1e30 would overflow a float32 sum of squares). The norm is sqrt(sum(x * x)): torch's float32
    vector_norm on CPU was measured 7e-6 off at C x D = 1000 x 768, the summed squares 4e-8."""
    peak = x.detach().abs().amax()
    peak = torch.where(peak > 0, peak, torch.ones_like(peak))
    scaled = x / peak
    return scaled / scaled.square().sum().sqrt()


def anchor_term(mean_syn: torch.Tensor, anchor: torch.Tensor) -> torch.Tensor:
    """sum_c ||mu~_c - A_c||^2 / sum_c ||A_c - Abar||^2 (Abar = mean_c A_c), in the dtype of `mean_syn`. Both sums of
    squares are scaled by the same constant (the peak of |A - Abar|) so that neither overflows."""
    target = anchor.to(mean_syn.dtype)
    spread = target - target.mean(dim=0, keepdim=True)
    peak = spread.detach().abs().amax()
    peak = torch.where(peak > 0, peak, torch.ones_like(peak))
    return ((mean_syn - target) / peak).square().sum() / (spread / peak).square().sum()


def flow_loss(mean_syn: torch.Tensor, real_flow: torch.Tensor, anchor: torch.Tensor | None = None,
              anchor_weight: float = 0.0) -> torch.Tensor:
    """L = 1 - <F, F~> / (||F|| ||F~||) [+ anchor_weight * anchor_term(mu~, A)] from synthetic class means mu~ [C, D]
    and the real flow F [C, D], computed in the dtype of `mean_syn` (no checks; differentiable; also what tests run
    to measure torch's own error). The cosine is taken between the unit vectors, each scaled by its peak first.
    """
    syn_flow = _flow(mean_syn)
    flow = real_flow.to(mean_syn.dtype)
    loss = 1 - (_unit(flow) * _unit(syn_flow)).sum()
    if anchor is not None and anchor_weight != 0:
        loss = loss + anchor_weight * anchor_term(mean_syn, anchor)
    return loss


def flow_loss_and_grad(sums: torch.Tensor, counts: torch.Tensor, real_flow: torch.Tensor, *,
                       anchor: torch.Tensor | None = None,
                       anchor_weight: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """The SFM loss from class sums and its gradient w.r.t. the synthetic class means.

    Args:
        sums: [C, D] float32/float64 class sums; counts: [C] int64, every n_c >= 1; real_flow: [C, D] float32/64.
        anchor: optional [C, D] float32/float64 target class means A; anchor_weight: lambda >= 0. With both,
            L += lambda * sum_c ||mu~_c - A_c||^2 / sum_c ||A_c - Abar||^2 (see `anchor_term`).
    Returns:
        loss: 0-dim, sums' dtype. G: [C, D] = dL/d mu~ (mu~ = sums / counts), by autograd.
    """
    _validate.validate_flow_loss(sums, counts, real_flow)
    _validate.validate_anchor(anchor, anchor_weight, sums.shape[0], sums.shape[1], sums.device)
    mean_syn = (sums.detach() / counts.to(sums.dtype)[:, None]).requires_grad_(True)
    with torch.enable_grad():
        loss = flow_loss(mean_syn, real_flow, anchor, anchor_weight)
        (grad,) = torch.autograd.grad(loss, mean_syn)
    return loss.detach(), grad


def feature_grad(grad: torch.Tensor, counts: torch.Tensor | None, labels: torch.Tensor, *,
                 scale: torch.Tensor | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """dL/dz_i = scale * G[y_i] / n_{y_i}: the gradient of the loss w.r.t. each feature row.

    Args:
        grad: G [C, D] float32/float64; counts: [C] int64 (None: no division); labels: [N] int64;
        scale: 0-dim tensor (e.g. the upstream grad_output) or None; dtype: dtype of the result.
    Returns:
        [N, D] `dtype`.
    """
    _validate.validate_feature_grad(grad, counts, labels, scale, dtype)
    out = grad[labels]
    if counts is not None:
        out = out / counts.to(grad.dtype)[labels, None]
    if scale is not None:
        out = out * scale.reshape(()).to(grad.dtype)
    return out.to(dtype)


def sfm_loss(features: torch.Tensor, labels: torch.Tensor, real_flow: torch.Tensor, *, deterministic: bool = False,
             sorted_labels: bool | None = None, anchor: torch.Tensor | None = None,
             anchor_weight: float = 0.0) -> torch.Tensor:
    """The SFM flow-matching loss of synthetic features against a real flow; differentiable w.r.t. `features`.

    Args:
        features: [N, D] float32/bf16/fp16/float64 synthetic features; labels: [N] int64, every class present;
        real_flow: [C, D] float32/float64 from `real_flow(real_centres)` (treated as a constant).
        anchor, anchor_weight: optional anchoring term, as in `flow_loss_and_grad` (A is a constant).
    Returns:
        0-dim float32 loss (float64 for float64 features).

    The class sums are taken of z_i - z_0 (row 0, a detached constant): the flow is shift-invariant, and with
    features sharing a large offset the centred sums keep their relative accuracy. The anchor is shifted alike.
    """
    _, d, c = _validate.validate_sfm_loss(features, labels, real_flow, sorted_labels)
    _validate.validate_anchor(anchor, anchor_weight, c, d, features.device)
    acc = _acc_dtype(features.dtype)
    zeros = torch.zeros(c, d, dtype=acc, device=features.device)
    shift = features[:1].detach().to(acc)
    values = features.to(acc) - shift
    sums = zeros.index_put((labels,), values, accumulate=True) if deterministic else zeros.index_add(0, labels, values)
    counts = torch.bincount(labels, minlength=c)
    if _validate.value_checks_enabled(features.device):
        _validate.check_counts_nonempty(counts)
    target = None
    if anchor is not None and anchor_weight != 0:
        target = (anchor.detach().to(torch.float64) - shift.to(torch.float64)).to(acc)
    return flow_loss(sums / counts.to(acc)[:, None], real_flow.detach(), target, anchor_weight)
