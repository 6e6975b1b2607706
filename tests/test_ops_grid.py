"""The acceptance grid: every op's Triton path (under TRITON_INTERPRET=1 on CPU) against the float64 reference.

Grid: D in {1, 17, 761, 768} x C in {2, 3, 100, 997} x N in {C, 4C+1} x sorted/unsorted labels x fp32/fp16/bf16.
The full product runs (192 cases). Each case checks the class sums and counts, the loss and the feature gradient
dL/dz.

Error measure: normwise relative error ||x - ref|| / max(||ref||, floor) against float64 on the same inputs. The floor
only matters where the exact value vanishes identically (C = 2 with D = 1: both flows are multiples of [1, -1], so
L is 0 or 2 and G = 0): losses are floored at 1e-3 and gradients at 10% of their natural scale C / ((C-1) ||F~||)
(||G|| = that scale x sin(angle between the flows), so the floor is inactive unless the flows are within ~6 degrees).
fp32: error <= 1e-5. fp16/bf16: error <= min(2 x (error of an upcasting torch baseline) + 1e-6, 1e-2), the baseline
being plain torch computing in fp32 from the same low-precision inputs with dL/dz cast to the input dtype at the end
(a baseline computing in fp16 underflowed to a zero gradient, so its bound let a zero gradient pass). fp16 gradients
are taken under a loss scale (as AMP's GradScaler does) that brings the largest |dL/dz| near 1: without it, dL/dz at
C*D >= 1e5 lies in fp16's subnormal range for any implementation.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import rel_err

from sfmkern import ops, reference

DIMS = (1, 17, 761, 768)
CLASSES = (2, 3, 100, 997)
FP32_TOL = 1e-5
LOWP_CAP = 1e-2


def make_labels(n: int, c: int, order: str, gen: torch.Generator) -> torch.Tensor:
    """[n] int64 labels with every class present, sorted or shuffled."""
    labels = torch.cat([torch.arange(c), torch.randint(0, c, (n - c,), generator=gen)])
    if order == "sorted":
        return labels.sort().values
    return labels[torch.randperm(n, generator=gen)]


def grad_floors(sums64: torch.Tensor, counts: torch.Tensor, labels: torch.Tensor) -> float:
    """10% of the natural scale of dL/dz: G ~ C / ((C-1) ||F~||) per class mean, divided by n_y per row."""
    c = sums64.shape[0]
    syn_flow = reference._flow(sums64 / counts.double()[:, None])
    g_scale = c / ((c - 1) * torch.linalg.vector_norm(syn_flow).item())
    per_row = (1.0 / counts.double()[labels] ** 2).sum().item() / c
    return 0.1 * g_scale * math.sqrt(per_row)


def torch_upcast(features: torch.Tensor, labels: torch.Tensor, flow: torch.Tensor, c: int, grad_scale: float):
    """Plain torch computing sums, loss and dL/dz in fp32 from the low-precision features (dL/dz cast back)."""
    z = features.detach().clone().requires_grad_(True)
    sums = torch.zeros(c, z.shape[1]).index_add(0, labels, z.float())
    counts = torch.bincount(labels, minlength=c)
    loss = reference.flow_loss(sums / counts.float()[:, None], flow.float())
    (loss * grad_scale).backward()
    return sums.detach(), loss.detach(), z.grad


VARIANTS = [
    (rows, order, dtype)
    for dtype in (torch.float32, torch.float16, torch.bfloat16)
    for rows in ("N=C", "N=4C+1")
    for order in ("unsorted", "sorted")
]

@pytest.mark.parametrize(
    ("rows", "order", "dtype"), VARIANTS, ids=[f"{r}-{o}-{str(t).removeprefix('torch.')}" for r, o, t in VARIANTS]
)
@pytest.mark.parametrize("c", CLASSES)
@pytest.mark.parametrize("d", DIMS)
def test_grid_matches_float64_reference(d, c, rows, order, dtype):
    assert ops.backend_for(torch.empty(1)) == "triton", "the grid must exercise the Triton kernels (interpreter)"
    n = c if rows == "N=C" else 4 * c + 1
    gen = torch.Generator().manual_seed(1000 * d + 10 * c + (n > c) + 7 * (order == "sorted"))
    labels = make_labels(n, c, order, gen)
    features = (torch.randn(n, d, generator=gen) + 0.5).to(dtype)  # an offset: flows are differences of means
    flow = ops.real_flow(torch.randn(c, d, generator=gen))
    assert flow.dtype == torch.float32
    is_sorted = order == "sorted"

    # Float64 reference on exactly the same (rounded) inputs.
    z64 = features.double().requires_grad_(True)
    sums64, counts64 = reference.class_sums(z64.detach(), labels, c)
    loss64 = reference.sfm_loss(z64, labels, flow.double())
    (grad64,) = torch.autograd.grad(loss64, z64)
    grad_scale = 1.0
    grad_floor = grad_floors(sums64, counts64, labels)
    if dtype == torch.float16:  # a GradScaler-like power of two, from the gradient's natural scale at the least
        # (at C = 2, D = 1 the flows are exactly (anti-)aligned and the true gradient is 0: scaling by it would
        # overflow fp16 on the kernel's rounding-level output)
        top = max(grad64.abs().max().item(), 10 * grad_floor)
        grad_scale = 2.0 ** -math.floor(math.log2(top))
    grad64 = grad64 * grad_scale
    grad_floor = grad_floor * grad_scale

    sums, counts = ops.class_sums(features, labels, c, sorted_labels=is_sorted)
    assert sums.dtype == torch.float32 and sums.shape == (c, d)
    assert counts.dtype == torch.int64 and torch.equal(counts, counts64)

    z = features.clone().requires_grad_(True)
    loss = ops.sfm_loss(z, labels, flow, sorted_labels=is_sorted)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    (loss * grad_scale).backward()
    assert z.grad.dtype == dtype and z.grad.shape == (n, d)

    errs = {
        "sums": rel_err(sums, sums64),
        "loss": rel_err(loss, loss64, floor=1e-3),
        "grad": rel_err(z.grad, grad64, floor=grad_floor),
    }
    if dtype == torch.float32:
        bounds = dict.fromkeys(errs, FP32_TOL)
    else:
        sums_t, loss_t, grad_t = torch_upcast(features, labels, flow, c, grad_scale)
        torch_errs = {
            "sums": rel_err(sums_t, sums64),
            "loss": rel_err(loss_t, loss64, floor=1e-3),
            "grad": rel_err(grad_t, grad64, floor=grad_floor),
        }
        bounds = {k: min(2 * v + 1e-6, LOWP_CAP) for k, v in torch_errs.items()}
        # A zero, halved or sign-flipped gradient must fail the gradient bound (where the gradient is not ~0).
        wrongs = (torch.zeros_like(grad64), 0.5 * grad64, -grad64)
        for wrong in wrongs if torch.linalg.vector_norm(grad64).item() > grad_floor else ():
            assert rel_err(wrong.to(dtype), grad64, floor=grad_floor) > bounds["grad"]
    for key, err in errs.items():
        assert err <= bounds[key], f"{key}: error {err:.3e} > bound {bounds[key]:.3e} (loss64={loss64.item():.6f})"
