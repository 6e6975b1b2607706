"""Differentiable, batched, replayable augmentations: horizontal flip, RandomResizedCrop and Gaussian noise.

Parameters are drawn once (`draw_views`) and applied any number of times (`apply_views`), so the two-phase
distillation step can recompute a chunk of views with autograd that is bit-identical to the one it saw without.
The crop follows torchvision's RandomResizedCrop sampling (10 attempts, then a centre crop of clamped ratio) and is
resampled bilinearly with `grid_sample`; the flip is folded into the same affine map. A step's parameters reach the
device in one packed, non-blocking copy (`Views.to`), and applying them reads nothing back: no host sync.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class Views:
    """Augmentation parameters for `n` views. `source[i]` is the image row view i is cut from.

    The four parameter tensors live on one device (the CPU after `draw_views`; `to(device)` moves them with one
    copy). `noisy_host` lists, always on the CPU, the views that get noise, so every decision that depends on it (is
    there any noise, which views does a slice keep) is taken on the host without reading the device.
    """

    source: torch.Tensor  # [n] int64 row of the source image
    theta: torch.Tensor  # [n, 2, 3] float32 affine map (output -> input, normalised coordinates, flip folded in)
    noise_on: torch.Tensor  # [n] bool: Gaussian noise added to this view
    noise_seed: torch.Tensor  # [n] int64 per-view seed of the noise field (`gaussian_field`: replayable per view)
    noisy: torch.Tensor | None = None  # [m] int64 ascending positions of the views with noise, on the device
    noisy_host: torch.Tensor | None = None  # the same positions on the CPU (default: from a CPU `noise_on`)

    def __post_init__(self):
        if self.noisy_host is None:
            if self.noise_on.device.type != "cpu":
                raise ValueError(f"Views with parameters on {self.noise_on.device} need noisy_host (the noisy "
                                 "views' positions on the CPU); build them on the CPU and move them with Views.to()")
            self.noisy_host = torch.nonzero(self.noise_on).flatten()
        if self.noisy is None:
            self.noisy = self.noisy_host

    def __len__(self) -> int:
        return int(self.source.numel())

    @property
    def device(self) -> torch.device:
        return self.source.device

    def select(self, idx: slice | torch.Tensor) -> Views:
        """Views `idx`: a slice (any device; the noisy positions are cut on the host) or an index tensor (CPU)."""
        if isinstance(idx, slice):
            v0, v1, step = idx.indices(len(self))
            if step != 1:
                raise ValueError(f"Views.select takes slices with step 1, got step {step}")
            v1 = max(v0, v1)
            a, b = (int(i) for i in torch.searchsorted(self.noisy_host, torch.tensor([v0, v1])))
            return Views(self.source[v0:v1], self.theta[v0:v1], self.noise_on[v0:v1], self.noise_seed[v0:v1],
                         noisy=self.noisy[a:b] - v0, noisy_host=self.noisy_host[a:b] - v0)
        if self.device.type != "cpu":
            raise ValueError(f"Views on {self.device} are selected by slices only; select with an index tensor "
                             "before Views.to()")
        return Views(self.source[idx], self.theta[idx], self.noise_on[idx], self.noise_seed[idx])

    def rebased(self, first_row: int) -> Views:
        """The same views with `source` counted from image row `first_row` (for a chunk of images [first_row, ...))."""
        return Views(self.source - first_row, self.theta, self.noise_on, self.noise_seed, noisy=self.noisy,
                     noisy_host=self.noisy_host)

    def to(self, device: torch.device | str) -> Views:
        """These views with their parameters on `device`, moved by ONE host-to-device copy and no host sync.

        The parameters are packed into one int64 CPU buffer (pinned when `device` is CUDA), copied with
        `non_blocking=True`, and unpacked on the device as views of that one buffer; `noisy_host` stays on the CPU.
        Views already on an accelerator are returned unchanged when `device` is theirs. CPU -> CPU runs the same
        packing (so the CPU tests exercise it) and the copy returns the buffer itself.
        """
        device = torch.device(device)
        if self.device.type != "cpu":
            if self.device == device or (device.index is None and self.device.type == device.type):
                return self
            return Views(self.source.to(device), self.theta.to(device), self.noise_on.to(device),
                         self.noise_seed.to(device), noisy=self.noisy.to(device), noisy_host=self.noisy_host)
        n, m = len(self), int(self.noisy_host.numel())
        # layout (int64 words): source n | theta 3n (6n float32) | noise_on n | noise_seed n | noisy m
        buf = torch.empty(6 * n + m, dtype=torch.int64, pin_memory=device.type == "cuda")
        buf[:n] = self.source
        buf[n:4 * n].view(torch.float32).copy_(self.theta.reshape(-1))
        buf[4 * n:5 * n] = self.noise_on
        buf[5 * n:6 * n] = self.noise_seed
        buf[6 * n:] = self.noisy_host
        dev = buf.to(device, non_blocking=True)
        return Views(dev[:n], dev[n:4 * n].view(torch.float32).view(n, 2, 3), dev[4 * n:5 * n] != 0,
                     dev[5 * n:6 * n], noisy=dev[6 * n:], noisy_host=self.noisy_host)


def _crop_boxes(n: int, height: int, width: int, scale, ratio, generator: torch.Generator) -> torch.Tensor:
    """torchvision's RandomResizedCrop.get_params, vectorised: [n, 4] float (top, left, h, w) in pixels."""
    area = float(height * width)
    attempts = 10
    target_area = area * torch.empty(n, attempts).uniform_(scale[0], scale[1], generator=generator)
    log_ratio = torch.empty(n, attempts).uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=generator)
    aspect = torch.exp(log_ratio)
    w = torch.round(torch.sqrt(target_area * aspect))
    h = torch.round(torch.sqrt(target_area / aspect))
    ok = (w > 0) & (h > 0) & (w <= width) & (h <= height)
    u_top = torch.rand(n, attempts, generator=generator)
    u_left = torch.rand(n, attempts, generator=generator)
    top = torch.floor(u_top * (height - h + 1))
    left = torch.floor(u_left * (width - w + 1))
    first = torch.where(ok.any(1), ok.float().argmax(1), torch.full((n,), -1))
    # fallback: centre crop with the ratio clamped into range (torchvision's behaviour after 10 failures)
    in_ratio = width / height
    if in_ratio < ratio[0]:
        fw, fh = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        fh, fw = height, round(height * ratio[1])
    else:
        fw, fh = width, height
    boxes = torch.empty(n, 4)
    boxes[:] = torch.tensor([(height - fh) // 2, (width - fw) // 2, fh, fw], dtype=torch.float32)
    hit = first >= 0
    rows = torch.nonzero(hit).flatten()
    cols = first[hit]
    boxes[rows] = torch.stack([top[rows, cols], left[rows, cols], h[rows, cols], w[rows, cols]], dim=1)
    return boxes


def draw_views(
    num_images: int,
    views_per_image: int,
    height: int,
    width: int,
    *,
    generator: torch.Generator,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    flip_p: float = 0.5,
    noise_p: float = 0.0,
) -> Views:
    """Draw parameters for `views_per_image` views of each of `num_images` images (view-major order:
    views [k*num_images:(k+1)*num_images] are the k-th view of every image). `generator` is a CPU generator."""
    if num_images < 1 or views_per_image < 1:
        raise ValueError(f"need num_images >= 1 and views_per_image >= 1, got {num_images}, {views_per_image}")
    n = num_images * views_per_image
    source = torch.arange(num_images, dtype=torch.int64).repeat(views_per_image)
    boxes = _crop_boxes(n, height, width, scale, ratio, generator)
    flip = torch.rand(n, generator=generator) < flip_p
    noise_on = torch.rand(n, generator=generator) < noise_p
    noise_seed = torch.randint(0, 2**62, (n,), generator=generator, dtype=torch.int64)
    top, left, h, w = boxes.unbind(1)
    # align_corners=False: the image spans [-1, 1]; a pixel box [left, left+w) maps to centre and half-width below
    cx = (2 * left + w) / width - 1
    cy = (2 * top + h) / height - 1
    sx = torch.where(flip, -w / width, w / width)
    sy = h / height
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 0, 2] = sx, cx
    theta[:, 1, 1], theta[:, 1, 2] = sy, cy
    return Views(source, theta, noise_on, noise_seed)


def apply_views(
    images: torch.Tensor,
    views: Views,
    *,
    crop: int,
    noise_std: float = 0.0,
    noise_mean: float = 0.0,
) -> torch.Tensor:
    """Cut `views` out of `images` [N, 3, H, W] (float, differentiable) -> [len(views), 3, crop, crop].

    Runs without a host sync when `views` already live on `images.device` (`Views.to`); otherwise it moves them
    there first with one copy."""
    if images.dim() != 4:
        raise ValueError(f"images must be [N, C, H, W], got shape {tuple(images.shape)}")
    if views.device != images.device:
        views = views.to(images.device)
    src = images.index_select(0, views.source)
    theta = views.theta if views.theta.dtype == images.dtype else views.theta.to(dtype=images.dtype)
    grid = F.affine_grid(theta, [len(views), images.shape[1], crop, crop], align_corners=False)
    out = F.grid_sample(src, grid, mode="bilinear", padding_mode="border", align_corners=False)
    if noise_std > 0 and views.noisy_host.numel() > 0:  # decided on the host: no device read
        # noise fields only for the views that get noise (about noise_p of them), added in place of a full-size mask
        field = gaussian_field(views.noise_seed.index_select(0, views.noisy), out[0].numel())
        noise = (field.to(out.dtype) * noise_std + noise_mean).view(-1, *out.shape[1:])
        out = out.index_add(0, views.noisy, noise)
    return out


_GOLDEN = 0x9E3779B97F4A7C15 - (1 << 64)  # splitmix64 constants as signed int64 (torch integer maths wraps)
_MIX1 = 0xBF58476D1CE4E5B9 - (1 << 64)
_MIX2 = 0x94D049BB133111EB - (1 << 64)


def _shr(x: torch.Tensor, k: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic): clear the sign-extended high bits."""
    return (x >> k) & ((1 << (64 - k)) - 1)


def _hash_uniform(seeds: torch.Tensor, numel: int, stream: int) -> torch.Tensor:
    """Counter-based uniforms in (0, 1): splitmix64 of (seed, element, stream) -> [n, numel] float32."""
    counter = torch.arange(numel, device=seeds.device, dtype=torch.int64) * 2 + stream
    z = seeds[:, None] + counter[None, :] * _GOLDEN
    z = (z ^ _shr(z, 30)) * _MIX1
    z = (z ^ _shr(z, 27)) * _MIX2
    z = z ^ _shr(z, 31)
    return (_shr(z, 40).to(torch.float32) + 0.5) * (1.0 / (1 << 24))


def gaussian_field(seeds: torch.Tensor, numel: int) -> torch.Tensor:
    """Standard normal noise [n, numel] float32, a pure function of each row's int64 seed (Box-Muller on
    counter-based uniforms): the same view gets the same noise in any chunk, on any rank, with no generator
    objects and no per-view launches."""
    u1 = _hash_uniform(seeds, numel, 0)
    u2 = _hash_uniform(seeds, numel, 1)
    return torch.sqrt(-2.0 * torch.log(u1)) * torch.cos((2.0 * torch.pi) * u2)
