"""One Linear Gradient Matching (LGM) step, re-implemented as its public code runs it.

Behaviour of the public code mirrored here (its `match_gradients` / `get_real_grad` / `get_syn_grad`):
  - the backbone is in eval() mode but its weights still require grad (it is never frozen), so every forward records
    a graph through the weights and the final backward also writes (and keeps accumulating) the weights' `.grad`;
    no activation checkpointing;
  - a fresh linear head each step: weight ~ N(0, 0.01²), bias 0;
  - a real batch of ipc·A·C images (one loader batch, held for the whole step), each augmented once, forwarded with
    autograd; CE gradient of the head's weight and bias by `torch.autograd.grad` (no graph kept), flattened and
    concatenated;
  - the C·ipc synthetic images are repeated A times, each copy augmented independently, forwarded in ONE batch;
    CE gradient of the head's weight and bias with `create_graph=True` (second-order graph kept);
  - loss = 1 − cosine(flattened real gradient, flattened synthetic gradient); the loss is multiplied by 1024 (manual
    loss scale, needed because GradScaler cannot handle second-order gradients), back-propagated into the synthetic
    images (and the backbone weights), and the images' gradients are divided by 1024 before the optimiser step;
  - CUDA: the augmentation, normalisation, forwards and CE run under fp16 autocast. CPU: fp32 (CPU autocast would be
    bf16 and slower; this is a documented difference of the CPU runs only). The ×1024 scale is applied on both (exact:
    a power of two).
Differences that do not change the cost: the synthetic images, their views, the augmentation code and the optimiser
are the `Distiller`'s (image-major view order instead of the public code's view-major `torch.cat` of copies: the mean
CE is order-independent), and the real images are random tensors standing in for a loaded batch (allocated on the
device inside the step, as the public code's `x_real.cuda()` is).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from sfmkern import augment
from sfmkern._nvtx import nvtx_range

AMP_SCALE = 1024.0


def new_head(feature_dim: int, num_classes: int, *, device, generator: torch.Generator | None = None):
    """A fresh linear head: (weight [C, D] ~ N(0, 0.01²), bias [C] = 0), both float32 leaves requiring grad."""
    weight = torch.empty(num_classes, feature_dim).normal_(0.0, 0.01, generator=generator)
    bias = torch.zeros(num_classes)
    return weight.to(device).requires_grad_(True), bias.to(device).requires_grad_(True)


def head_gradient_cosine(grad_real: torch.Tensor, grad_syn: torch.Tensor) -> torch.Tensor:
    """cosine(g_real, g_syn) of two flattened [C·D + C] gradient vectors (torch's cosine_similarity, eps 1e-8)."""
    return F.cosine_similarity(grad_real, grad_syn, dim=0)


def _autocast(device: torch.device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.float16)
    return contextlib.nullcontext()


def _embed(backbone, x: torch.Tensor) -> torch.Tensor:
    """(x − mean) / std, then the backbone's feature head (no bf16 autocast of its own: the caller's precision)."""
    x = (x - backbone._mean_t) / backbone._std_t
    return backbone._forward(x)


def lgm_forward_backward(distiller, real_images: torch.Tensor, real_labels: torch.Tensor, *,
                         syn_views: augment.Views | None = None, real_views: augment.Views | None = None,
                         head: tuple[torch.Tensor, torch.Tensor] | None = None,
                         generator: torch.Generator | None = None, loss_scale: float = AMP_SCALE,
                         return_parts: bool = False):
    """One LGM step's forward and backward on `distiller`'s images; leaves dL/dlevel in each level's `.grad`.

    distiller: a single-process `sfmkern.distillation.Distiller` (its images, config, view labels and backbone are
    used).
    real_images: [C·ipc·A, 3, H, W] float in [0, 1] on the device (the loader batch); real_labels: [C·ipc·A] int64.
    syn_views / real_views: augmentation draws (default: `distiller.draw_views()` and one draw per real image from
    `generator`). head: (weight [C, D], bias [C]) leaves, default `new_head(..., generator=generator)`.
    Returns the loss 1 − cos (0-dim float32, unscaled), or with `return_parts` a dict with "loss", "cos",
    "z_real", "z_syn" (detached features), "grad_real", "grad_syn" (detached flattened head gradients) and "head".
    """
    if distiller.world != 1:
        raise ValueError("the LGM baseline runs in a single process")
    cfg = distiller.config
    backbone = distiller.backbone
    device = distiller.device
    if real_images.dim() != 4 or real_images.shape[0] != real_labels.shape[0]:
        raise ValueError(f"real_images [N, 3, H, W] and real_labels [N] disagree: {tuple(real_images.shape)} vs "
                         f"{tuple(real_labels.shape)}")
    backbone.model.eval()
    backbone.model.requires_grad_(True)  # as coded: the weights are never frozen
    distiller._grow_to(distiller.step_count)
    if syn_views is None:
        syn_views = distiller.draw_views()
    if real_views is None:
        gen = generator if generator is not None else torch.Generator().manual_seed(distiller.step_count)
        real_views = augment.draw_views(real_images.shape[0], 1, real_images.shape[2], real_images.shape[3],
                                        generator=gen, scale=cfg.scale, ratio=cfg.ratio, flip_p=cfg.flip_p,
                                        noise_p=cfg.noise_p)
    if head is None:
        head = new_head(distiller.real_flow.shape[1], distiller.num_classes, device=device, generator=generator)
    weight, bias = head
    for level in distiller.images.levels:
        level.grad = None  # the public code's optimizer.zero_grad() (set_to_none)

    # real side: graph through the weights recorded, then freed by autograd.grad (retain_graph=False)
    with nvtx_range("lgm/real"), _autocast(device):
        x_real = augment.apply_views(real_images.detach(), real_views, crop=cfg.crop, noise_std=cfg.noise_std,
                                     noise_mean=cfg.noise_mean)
        z_real = _embed(backbone, x_real)
        loss_real = F.cross_entropy(F.linear(z_real, weight, bias), real_labels)
    g_real_w, g_real_b = torch.autograd.grad(loss_real, [weight, bias], retain_graph=False, create_graph=False)
    grad_real = torch.cat([g_real_w.detach().flatten(), g_real_b.detach().flatten()])
    del x_real, loss_real

    # synthetic side: every copy of every image in one batch, second-order graph kept
    with nvtx_range("lgm/synthetic"), _autocast(device):
        images = distiller.images.render()
        x_syn = augment.apply_views(images, syn_views, crop=cfg.crop, noise_std=cfg.noise_std,
                                    noise_mean=cfg.noise_mean)
        z_syn = _embed(backbone, x_syn)
        loss_syn = F.cross_entropy(F.linear(z_syn, weight, bias), distiller.view_labels)
    g_syn_w, g_syn_b = torch.autograd.grad(loss_syn, [weight, bias], retain_graph=True, create_graph=True)
    grad_syn = torch.cat([g_syn_w.flatten(), g_syn_b.flatten()])

    with nvtx_range("lgm/match"):
        cos = head_gradient_cosine(grad_real, grad_syn)
        loss = 1 - cos
        (loss * loss_scale).backward()
        for level in distiller.images.levels:
            if level.grad is not None:
                level.grad /= loss_scale
    if not return_parts:
        return loss.detach().float()
    return {"loss": loss.detach().float(), "cos": cos.detach().float(), "z_real": z_real.detach().float(),
            "z_syn": z_syn.detach().float(), "grad_real": grad_real.float(), "grad_syn": grad_syn.detach().float(),
            "head": (weight.detach(), bias.detach())}
