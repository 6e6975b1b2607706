"""Issue 16 at the op level: any strides on both paths, a zero real flow, and features near 1e30 / 1e-30.

Every public op takes strided, expanded (stride 0) and sliced labels/counts/features/sums/flows; each result is
compared with the float64 reference on contiguous copies, on the torch path and on the Triton path (interpreter, with
its wide tiles and with the CUDA launch configuration).
"""

from __future__ import annotations

import pytest
import torch
from conftest import rel_err

from sfmkern import ops, reference


@pytest.fixture(params=("torch", "triton-wide", "triton-gpu-launch"))
def path(request, monkeypatch):
    backend, _, config = request.param.partition("-")
    monkeypatch.setenv("SFMKERN_BACKEND", backend)
    monkeypatch.setenv("SFMKERN_GPU_LAUNCH", "1" if config == "gpu-launch" else "0")
    return request.param


def strided(t: torch.Tensor) -> torch.Tensor:
    """The same values as a non-contiguous view (every other element of a doubled tensor): the issue's
    torch.stack([l, l], 1)[:, 0] for 1-D tensors, a column-interleaved view for 2-D ones."""
    view = torch.stack([t, torch.full_like(t, 7)], -1)[..., 0]
    assert not view.is_contiguous() and torch.equal(view, t)
    return view


def _problem(n=45, c=3, d=300, seed=0):
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % c
    labels = labels[torch.randperm(n, generator=gen)]
    features = torch.randn(n, d, generator=gen) + 0.3
    centres = torch.randn(c, d, generator=gen)
    return features, labels, centres


def test_strided_labels_and_features(path):
    features, labels, centres = _problem()
    c = 3
    flow = ops.real_flow(centres)
    sums64, counts64 = reference.class_sums(features.double(), labels, c)
    z64 = features.double().requires_grad_(True)
    loss64 = reference.sfm_loss(z64, labels, flow.double())
    loss64.backward()
    wide = torch.zeros(features.shape[0] * 2, features.shape[1] + 5)
    wide[::2, 3:-2] = features
    variants = {
        "strided labels": (features, strided(labels)),
        "column-strided features": (strided(features), labels),
        "row-sliced features": (wide[::2, 3:-2], labels),
        "both": (wide[::2, 3:-2], strided(labels)),
    }
    for name, (feats, labs) in variants.items():
        for kwargs in ({"sorted_labels": False}, {"deterministic": True}):
            sums, counts = ops.class_sums(feats, labs, c, **kwargs)
            assert torch.equal(counts, counts64), (name, kwargs, counts)
            assert rel_err(sums, sums64) <= 1e-6, (name, kwargs)
        z = feats.clone().requires_grad_(True) if feats.is_contiguous() else feats.detach().requires_grad_(True)
        loss = ops.sfm_loss(z, labs, flow)
        loss.backward()
        assert abs(loss.item() - loss64.item()) <= 1e-5 * loss64.item(), (name, loss.item(), loss64.item())
        assert rel_err(z.grad, z64.grad) <= 1e-5, name
    # Sorted labels, strided: the segmented kernel.
    order = labels.argsort(stable=True)
    sums, counts = ops.class_sums(features[order], strided(labels[order]), c, sorted_labels=True)
    assert torch.equal(counts, counts64) and rel_err(sums, sums64) <= 1e-6


def test_expanded_labels_and_features(path):
    """Stride-0 labels (the issue's torch.ones(1).long().expand(4096)) and a stride-0 feature row."""
    labels = torch.ones(1, dtype=torch.int64).expand(4096)
    row = torch.randn(1, 33)
    features = row.expand(4096, 33)
    sums, counts = ops.class_sums(features, labels, 2, sorted_labels=False)
    assert counts.tolist() == [0, 4096]
    assert torch.allclose(sums[1], 4096 * row[0], rtol=3e-4) and not sums[0].any()  # 4096 fp32 adds
    grad = torch.randn(2, 33)
    out = ops.feature_grad(grad, torch.tensor([5, 4096]), labels, scale=torch.tensor(2.0))
    assert out.shape == (4096, 33) and torch.allclose(out, (2.0 * grad[1] / 4096).expand(4096, 33), rtol=1e-6)
    # A stride-0 feature matrix (one row repeated): read in place, every class sum is n_c times the row.
    labels3 = torch.arange(15) % 3
    expanded = torch.randn(1, 40).expand(15, 40)
    assert expanded.stride(0) == 0
    for kwargs in ({"sorted_labels": False}, {"deterministic": True}):
        sums, counts = ops.class_sums(expanded, labels3, 3, **kwargs)
        assert counts.tolist() == [5, 5, 5] and torch.allclose(sums, 5 * expanded[:3], rtol=1e-6)


def _loss_inputs(c: int, d: int, *, seed: int):
    """counts [C] in 1..8, class sums [C, D] of that many unit-variance rows, a real flow and an anchor (contiguous)."""
    gen = torch.Generator().manual_seed(seed)
    counts = torch.randint(1, 9, (c,), generator=gen)
    sums = torch.randn(c, d, generator=gen) * counts[:, None]
    flow = ops.real_flow(torch.randn(c, d, generator=gen))
    return counts, sums, flow, torch.randn(c, d, generator=gen)


def test_strided_counts_sums_flows_and_grads(path):
    c, d = 5, 70
    counts, sums, flow, anchor = _loss_inputs(c, d, seed=2)
    loss64, grad64 = reference.flow_loss_and_grad(sums.double(), counts, flow.double(), anchor=anchor.double(),
                                                  anchor_weight=0.5)
    transposed = {  # column-major copies: stride (1, C)
        "sums": sums.t().contiguous().t(), "flow": flow.t().contiguous().t(), "anchor": anchor.t().contiguous().t(),
    }
    loss, grad = ops.flow_loss_and_grad(transposed["sums"], strided(counts), transposed["flow"],
                                        anchor=transposed["anchor"], anchor_weight=0.5)
    assert abs(loss.item() - loss64.item()) <= 1e-5 * loss64.item() and rel_err(grad, grad64) <= 1e-5
    labels = torch.arange(40) % c
    ref = reference.feature_grad(grad64, counts, labels, dtype=torch.float64)
    for g, cnt, labs in ((grad.t().contiguous().t(), strided(counts), strided(labels)),
                         (strided(grad), counts[:, None].expand(c, 3)[:, 1], labels)):
        out = ops.feature_grad(g, cnt, labs)
        assert rel_err(out, ref) <= 1e-5  # the issue: non-contiguous counts were off by 0.39


@pytest.mark.parametrize("config", ("wide", "gpu-launch"))
def test_launchers_read_strided_and_expanded_labels_in_place(monkeypatch, config):
    """The launchers' own contract: labels of any stride (2, and 0 for expanded labels) are read in place through
    stride_y, on the atomic class-sum path (with and without the shift) and in the gather. The ops layer makes labels
    contiguous before it launches, so only a direct launch reaches these strides: this test keeps the launchers true
    to their docstrings (and kills the mutants that read labels as contiguous)."""
    from sfmkern.kernels import class_sums_triton, feature_grad_triton

    monkeypatch.setenv("SFMKERN_GPU_LAUNCH", "1" if config == "gpu-launch" else "0")
    c = 3
    features, labels, _ = _problem(n=45, c=c, d=300)
    shift = features[0]
    gen = torch.Generator().manual_seed(4)
    grad = torch.randn(c, 300, generator=gen)
    scale = torch.tensor(1.5)
    expanded = torch.full((1,), 2, dtype=torch.int64).expand(45)
    for name, labs in (("stride 2", strided(labels)), ("stride 0", expanded)):
        assert labs.stride(0) != 1, name
        plain = labs.contiguous()
        sums64, counts64 = reference.class_sums(features.double(), plain, c)
        sums, counts = class_sums_triton(features, labs, c)
        assert torch.equal(counts, counts64) and rel_err(sums, sums64) <= 1e-6, name
        shifted, _ = class_sums_triton(features, labs, c, shift=shift)
        ref = sums64 - counts64[:, None].double() * shift.double()
        assert rel_err(shifted, ref) <= 1e-6, name
        counts_all = counts64.clamp(min=1)  # the gather divides by n_c: every class needs a non-zero count
        ref = reference.feature_grad(grad.double(), counts_all, plain, scale=scale.double(), dtype=torch.float64)
        for cnt in (counts_all, strided(counts_all)):  # strided counts: the launcher copies them
            out = feature_grad_triton(grad, cnt, labs, scale=scale)
            assert rel_err(out, ref) <= 1e-6, (name, cnt.stride())


@pytest.mark.parametrize("config", ("wide", "gpu-launch"))
def test_loss_launcher_takes_strided_inputs(monkeypatch, config):
    """flow_loss_and_grad_triton's contract: sums, counts, flow and anchor of any strides (copied to contiguous;
    they are C x D). The ops layer passes contiguous counts, so only a direct launch checks the launcher's copy."""
    from sfmkern.kernels import flow_loss_and_grad_triton

    monkeypatch.setenv("SFMKERN_GPU_LAUNCH", "1" if config == "gpu-launch" else "0")
    counts, sums, flow, anchor = _loss_inputs(21, 70, seed=6)
    for kwargs in ({}, {"anchor": anchor.t().contiguous().t(), "anchor_weight": 0.5}):
        kwargs64 = {k: v.double() if torch.is_tensor(v) else v for k, v in kwargs.items()}
        loss64, grad64 = reference.flow_loss_and_grad(sums.double(), counts, flow.double(), **kwargs64)
        loss, grad = flow_loss_and_grad_triton(sums.t().contiguous().t(), strided(counts), strided(flow), **kwargs)
        assert abs(loss.item() - loss64.item()) <= 1e-5 * loss64.item(), (kwargs.keys(), loss.item(), loss64.item())
        assert rel_err(grad, grad64) <= 1e-5, kwargs.keys()


@pytest.mark.parametrize("backend", ("torch", "triton"))
def test_zero_real_flow_is_a_clear_error(monkeypatch, backend):
    monkeypatch.setenv("SFMKERN_BACKEND", backend)
    features, labels, centres = _problem(n=12, c=3, d=5)
    with pytest.raises(ValueError, match=r"real_flow\(real_centres\): all zero"):
        ops.real_flow(centres[:1].expand(3, 5))
    zero = torch.zeros(3, 5)
    with pytest.raises(ValueError, match="real_flow: all zero"):
        ops.sfm_loss(features, labels, zero)
    sums, counts = ops.class_sums(features, labels, 3)
    with pytest.raises(ValueError, match="real_flow: all zero"):
        ops.flow_loss_and_grad(sums, counts, zero)


@pytest.mark.parametrize("scale", (1e30, 1e-30), ids=("1e30", "1e-30"))
def test_extreme_feature_scales(path, scale):
    """Features near 1e30 (their squares overflow fp32) or 1e-30 (underflow): the loss and dL/dz match float64; on
    e194489 the 1e30 loss came out 1.0 (torch) or 0.5 (Triton) instead of ~0.70."""
    features, labels, centres = _problem(n=60, c=4, d=300, seed=3)
    flow = ops.real_flow(centres)
    features = features + 0.1 * centres[labels]  # a loss well away from 0, 1 and 2
    z64 = (features.double() * scale).requires_grad_(True)
    loss64 = reference.sfm_loss(z64, labels, flow.double())
    loss64.backward()
    assert 0.3 < loss64.item() < 0.9
    z = (features * scale).requires_grad_(True)
    loss = ops.sfm_loss(z, labels, flow)
    loss.backward()
    assert torch.isfinite(loss) and abs(loss.item() - loss64.item()) <= 1e-5 * loss64.item(), loss.item()
    assert rel_err(z.grad, z64.grad) <= 1e-5
    anchor = centres * scale
    loss_a = ops.sfm_loss(features * scale, labels, flow, anchor=anchor, anchor_weight=0.3)
    ref_a = reference.sfm_loss(features.double() * scale, labels, flow.double(), anchor=anchor.double(),
                               anchor_weight=0.3)
    assert abs(loss_a.item() - ref_a.item()) <= 1e-5 * ref_a.item(), (loss_a.item(), ref_a.item())
