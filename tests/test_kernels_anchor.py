"""The anchoring term (issue 11, /work/notes/anchor_spec.md) in the reference and in the fused Triton loss.

    L = (1 - cos(vec F, vec F~)) + lambda * sum_c ||mu~_c - A_c||^2 / sum_c ||A_c - Abar||^2
    G = G_flow + 2 lambda (mu~ - A) / sum_c ||A_c - Abar||^2
Triton paths run under TRITON_INTERPRET=1, with the interpreter's wide tiles and with the CUDA launch configuration
(SFMKERN_GPU_LAUNCH=1: many column blocks, so the partial reductions are combined across programs).
"""

from __future__ import annotations

import pytest
import torch
from conftest import rel_err

from sfmkern import ops, reference


def _problem(n, c, d, *, seed=0, offset=0.0):
    gen = torch.Generator().manual_seed(seed)
    labels = torch.cat([torch.arange(c), torch.randint(0, c, (n - c,), generator=gen)])
    labels = labels[torch.randperm(n, generator=gen)]
    features = torch.randn(n, d, generator=gen, dtype=torch.float64) + offset
    centres = torch.randn(c, d, generator=gen, dtype=torch.float64) + offset
    anchor = centres + 0.3 * torch.randn(c, d, generator=gen, dtype=torch.float64)
    return features, labels, centres, anchor


def _by_definition(features, labels, centres, anchor, lam):
    c = centres.shape[0]
    means = torch.stack([features[labels == k].mean(0) for k in range(c)])
    flow_loss = reference.sfm_loss(features, labels, reference.real_flow(centres))
    spread = ((anchor - anchor.mean(0)) ** 2).sum()
    return flow_loss + lam * ((means - anchor) ** 2).sum() / spread


@pytest.fixture(params=("wide", "gpu"))
def launch(request, monkeypatch):
    monkeypatch.setenv("SFMKERN_GPU_LAUNCH", "1" if request.param == "gpu" else "0")
    return request.param


def test_reference_anchor_matches_definition_and_closed_form_gradient():
    features, labels, centres, anchor = _problem(40, 5, 7)
    flow = reference.real_flow(centres)
    for lam in (0.5, 3.0):
        loss = reference.sfm_loss(features, labels, flow, anchor=anchor, anchor_weight=lam)
        assert torch.allclose(loss, _by_definition(features, labels, centres, anchor, lam), rtol=1e-12)
        sums, counts = reference.class_sums(features, labels, 5)
        loss2, grad = reference.flow_loss_and_grad(sums, counts, flow, anchor=anchor, anchor_weight=lam)
        _, grad_flow = reference.flow_loss_and_grad(sums, counts, flow)
        spread = ((anchor - anchor.mean(0)) ** 2).sum()
        closed = grad_flow + 2 * lam * (sums / counts[:, None] - anchor) / spread
        assert torch.allclose(loss2, loss, rtol=1e-12)
        assert torch.allclose(grad, closed, rtol=1e-10, atol=1e-14)
    # Off: exactly the flow loss, whether the anchor is absent or its weight zero.
    plain = reference.sfm_loss(features, labels, flow)
    assert torch.equal(reference.sfm_loss(features, labels, flow, anchor=anchor, anchor_weight=0.0), plain)
    # A common offset of features and anchor changes nothing (the normaliser is the anchor's own spread).
    shifted = reference.sfm_loss(features + 5.0, labels, flow, anchor=anchor + 5.0, anchor_weight=2.0)
    assert torch.allclose(shifted, reference.sfm_loss(features, labels, flow, anchor=anchor, anchor_weight=2.0),
                          rtol=1e-12)


def test_gradcheck_with_anchor_reference_and_triton():
    features, labels, centres, anchor = _problem(7, 3, 3, seed=1)
    flow = reference.real_flow(centres)
    z = features.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda x: reference.sfm_loss(x, labels, flow, anchor=anchor, anchor_weight=1.5), (z,))
    assert ops.backend_for(z) == "triton"
    assert torch.autograd.gradcheck(lambda x: ops.sfm_loss(x, labels, flow, anchor=anchor, anchor_weight=1.5), (z,))


@pytest.mark.parametrize("dtype", (torch.float32, torch.float64), ids=str)
@pytest.mark.parametrize(("c", "d"), ((3, 17), (37, 100), (130, 300)))
def test_triton_flow_loss_and_grad_with_anchor(launch, c, d, dtype):
    gen = torch.Generator().manual_seed(c + d)
    counts = torch.randint(1, 6, (c,), generator=gen)
    sums = ((torch.randn(c, d, generator=gen, dtype=torch.float64) + 2.0) * counts[:, None]).to(dtype)
    flow = ops.real_flow(torch.randn(c, d, generator=gen, dtype=torch.float64)).to(dtype)
    anchor = (torch.randn(c, d, generator=gen, dtype=torch.float64) + 2.0).to(dtype)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    for lam in (0.0, 0.7, 10.0):
        loss, grad = ops.flow_loss_and_grad(sums, counts, flow, anchor=anchor, anchor_weight=lam)
        loss64, grad64 = reference.flow_loss_and_grad(sums.double(), counts, flow.double(), anchor=anchor.double(),
                                                      anchor_weight=lam)
        assert loss.dtype == dtype and grad.dtype == dtype
        assert abs(loss.item() - loss64.item()) <= tol * abs(loss64.item()), (lam, loss.item(), loss64.item())
        assert rel_err(grad, grad64) <= tol, lam


@pytest.mark.parametrize("sorted_labels", (False, True))
def test_triton_sfm_loss_with_anchor_and_offset(launch, sorted_labels):
    """Features and anchor sharing an offset of 20: the op shifts both by a feature row; the result is unchanged."""
    features, labels, centres, anchor = _problem(301, 60, 70, seed=2, offset=20.0)
    if sorted_labels:
        labels = labels.sort().values
    flow = ops.real_flow(centres)
    z64 = features.clone().requires_grad_(True)
    loss64 = reference.sfm_loss(z64, labels, flow.double(), anchor=anchor, anchor_weight=2.0)
    loss64.backward()
    z = features.float().requires_grad_(True)
    loss = ops.sfm_loss(z, labels, flow, anchor=anchor.float(), anchor_weight=2.0, sorted_labels=sorted_labels)
    loss.backward()
    # fp32 inputs rounded from float64 at magnitude 20: ~1e-7 relative per value, amplified by the offset / spread.
    assert abs(loss.item() - loss64.item()) <= 1e-5 * loss64.item()
    assert rel_err(z.grad, z64.grad) <= 1e-5


@pytest.mark.parametrize("backend", ("triton", "torch"))
def test_anchor_input_checks(monkeypatch, backend):
    monkeypatch.setenv("SFMKERN_BACKEND", backend)
    features, labels, centres, anchor = _problem(12, 3, 5)
    features, anchor = features.float(), anchor.float()
    flow = ops.real_flow(centres.float())
    cases = [
        (dict(anchor=anchor[:2], anchor_weight=1.0), ValueError, r"anchor: expected shape \[3, 5\]"),
        (dict(anchor=anchor.half(), anchor_weight=1.0), TypeError, "anchor: expected dtype"),
        (dict(anchor=anchor, anchor_weight=-1.0), ValueError, "anchor_weight=-1.0"),
        (dict(anchor=anchor, anchor_weight=float("nan")), ValueError, "anchor_weight=nan"),
        (dict(anchor=anchor, anchor_weight=torch.tensor(1.0)), TypeError, "anchor_weight"),
        (dict(anchor=None, anchor_weight=1.0), ValueError, "no anchor"),
        (dict(anchor=anchor[:1].expand(3, 5), anchor_weight=1.0), ValueError, "all rows are equal"),
        (dict(anchor=torch.where(anchor > 0, float("inf"), anchor), anchor_weight=1.0), ValueError, "anchor: row"),
    ]
    for kwargs, error, pattern in cases:
        with pytest.raises(error, match=pattern):
            ops.sfm_loss(features, labels, flow, **kwargs)
    sums, counts = ops.class_sums(features, labels, 3)
    with pytest.raises(ValueError, match="no anchor"):
        ops.flow_loss_and_grad(sums, counts, flow, anchor_weight=0.5)
