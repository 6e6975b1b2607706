"""The benchmark baselines compute what they claim: the public-SFM step's loss (and gradient) equals sfmkern's on the
same views, and the LGM step's loss is 1 − cosine of the closed-form cross-entropy head gradients (float64)."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

from baselines import AMP_SCALE, lgm_forward_backward, new_head, public_sfm_forward_backward  # noqa: E402

from sfmkern.backbone import load_backbone  # noqa: E402
from sfmkern.distillation import DistillConfig, Distiller  # noqa: E402


def _distiller(num_classes=3, ipc=2, augs=2, seed=0):
    torch.manual_seed(seed)
    backbone = load_backbone("test_vit", pretrained=False, img_size=16)
    gen = torch.Generator().manual_seed(seed + 1)
    flow = torch.randn(num_classes, backbone.feature_dim, generator=gen)
    flow -= flow.mean(0)
    cfg = DistillConfig(ipc=ipc, augs=augs, syn_res=20, crop=16, grow_every=0, seed=seed)
    return Distiller(flow, backbone, config=cfg)


def _grads(d):
    return [level.grad.detach().clone() for level in d.images.levels]


@pytest.mark.parametrize("ipc,augs", [(1, 1), (2, 3)])
def test_public_sfm_loss_and_gradient_equal_sfmkern(ipc, augs):
    d = _distiller(num_classes=3, ipc=ipc, augs=augs)
    views = d.draw_views()
    loss_single = d.forward_backward("single", views)
    grads_single = _grads(d)
    loss_two = d.forward_backward("two_phase", views)
    loss_public = public_sfm_forward_backward(d, views)
    grads_public = _grads(d)
    assert any(p.requires_grad for p in d.backbone.model.parameters())  # as coded: weights not frozen
    assert any(p.grad is not None for p in d.backbone.model.parameters())
    torch.testing.assert_close(loss_public, loss_single.float(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(loss_public, loss_two.float(), rtol=1e-5, atol=1e-6)
    for gp, gs in zip(grads_public, grads_single, strict=True):
        torch.testing.assert_close(gp, gs, rtol=1e-4, atol=1e-7)
        assert gp.abs().sum() > 0


def _closed_form_cosine(z_real, y_real, z_syn, y_syn, weight, bias):
    """float64: dW = (softmax(zWᵀ + b) − onehot)ᵀ z / N, db = Σ (softmax − onehot) / N; cos of [vec dW, db]."""

    def grad(z, y):
        z = z.double()
        logits = z @ weight.double().T + bias.double()
        p = torch.softmax(logits, dim=1)
        e = (p - torch.nn.functional.one_hot(y, weight.shape[0]).double()) / z.shape[0]
        return torch.cat([(e.T @ z).flatten(), e.sum(0)])

    g_r, g_s = grad(z_real, y_real), grad(z_syn, y_syn)
    return (g_r @ g_s) / (g_r.norm() * g_s.norm()), g_r, g_s


def test_lgm_loss_is_one_minus_closed_form_gradient_cosine():
    d = _distiller(num_classes=4, ipc=2, augs=3, seed=3)
    n_real = 4 * 2 * 3
    gen = torch.Generator().manual_seed(7)
    real = torch.rand(n_real, 3, 20, 20, generator=gen)
    labels = torch.arange(4).repeat_interleave(6)
    views = d.draw_views()
    head = new_head(d.real_flow.shape[1], 4, device="cpu", generator=torch.Generator().manual_seed(11))
    parts = lgm_forward_backward(d, real, labels, syn_views=views, head=head,
                                 generator=torch.Generator().manual_seed(5), return_parts=True)
    assert parts["z_real"].shape == (n_real, d.real_flow.shape[1])
    assert parts["z_syn"].shape == (d.num_views, d.real_flow.shape[1])
    cos64, g_r, g_s = _closed_form_cosine(parts["z_real"], labels, parts["z_syn"], d.view_labels, *head)
    torch.testing.assert_close(parts["grad_real"].double(), g_r, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(parts["grad_syn"].double(), g_s, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(parts["loss"].double(), 1 - cos64, rtol=0, atol=2e-6)
    grads_scaled = _grads(d)
    assert all(torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads_scaled)
    assert any(p.grad is not None for p in d.backbone.model.parameters())  # backward also reaches the weights

    # the manual ×1024 loss scale is undone on the images' gradients
    parts1 = lgm_forward_backward(d, real, labels, syn_views=views, head=head,
                                  generator=torch.Generator().manual_seed(5), loss_scale=1.0, return_parts=True)
    torch.testing.assert_close(parts1["loss"], parts["loss"])
    for g1, g in zip(_grads(d), grads_scaled, strict=True):
        torch.testing.assert_close(g1, g, rtol=1e-5, atol=1e-9)
    assert AMP_SCALE == 1024.0


def test_new_head_init_and_bad_input():
    w, b = new_head(512, 40, device="cpu", generator=torch.Generator().manual_seed(0))
    assert w.shape == (40, 512) and b.shape == (40,) and w.requires_grad and b.requires_grad
    wd = w.detach()
    assert abs(float(wd.std()) - 0.01) < 5e-4 and abs(float(wd.mean())) < 5e-4 and not b.detach().any()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        d = _distiller(num_classes=2, ipc=1, augs=1)
    with pytest.raises(ValueError, match="disagree"):
        lgm_forward_backward(d, torch.rand(3, 3, 20, 20), torch.zeros(2, dtype=torch.int64))
