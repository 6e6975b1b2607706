"""Parameterisation of the synthetic images: a Laplacian-style pyramid (or plain pixels), colour decorrelation, sigmoid.

Decode (per image, 3 channels, resolution R):
    x = Σ_k upsample_bilinear(level_k, R)            levels of side 1, 2, 4, ... capped at R
    x ↦ M̂ x per pixel                                M̂ = M / max column norm of M (colour decorrelation)
    image = sigmoid(2 x) ∈ (0, 1)
The pyramid starts with the 1×1 level and gains a level of double resolution every `grow_every` steps; on each
extension the existing levels are multiplied by old_count / new_count and the new level is randn / new_count, so that
every level always has the scale randn / count. The `pixels` parameterisation is one full-resolution level that never
grows (the same colour decorrelation and sigmoid keep the images in (0, 1)).

Random draws are made per block of `_BLOCK` images from a generator seeded by (seed, level, block), so a rank holding
images [start, stop) of a sharded run draws exactly the values a single process would, without drawing the others.
"""

from __future__ import annotations

import functools
import hashlib

import torch

# Colour correlation of natural images (Lucid / LGM), rows = output channel; normalised by its largest column norm.
COLOUR_CORRELATION = ((0.26, 0.09, 0.02), (0.27, 0.00, -0.05), (0.27, -0.09, 0.03))
PARAMETERISATIONS = ("pyramid", "pixels")
_BLOCK = 64


def colour_matrix(dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
    """M̂ [3, 3]: COLOUR_CORRELATION divided by its largest column (Euclidean) norm. One cached copy per (dtype,
    device), made once: a fresh host-to-device copy every decode would be a host sync inside each distillation step.
    The result is shared: do not modify it in place."""
    return _colour_matrix(dtype, torch.device(device) if device is not None else torch.device("cpu"))


@functools.cache
@torch.inference_mode(False)  # a normal tensor even if first asked for under inference_mode (autograd saves it later)
def _colour_matrix(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    m = torch.tensor(COLOUR_CORRELATION, dtype=torch.float64)
    m = m / m.norm(dim=0).max()
    return m.to(dtype=dtype, device=device)


def decorrelate_colours(x: torch.Tensor) -> torch.Tensor:
    """Per pixel x ↦ M̂ x: [N, 3, H, W] -> [N, 3, H, W] (same dtype, differentiable).

    Equivalent PyTorch: `torch.einsum("ij,njhw->nihw", colour_matrix(), x)`.
    """
    if x.dim() != 4 or x.shape[1] != 3:
        raise ValueError(f"decorrelate_colours expects [N, 3, H, W], got shape {tuple(x.shape)}")
    m = colour_matrix(x.dtype, x.device)
    return torch.einsum("ij,njhw->nihw", m, x)


def squash(x: torch.Tensor) -> torch.Tensor:
    """sigmoid(2x): maps decoded values into (0, 1)."""
    return torch.sigmoid(2 * x)


def level_sizes(resolution: int) -> list[int]:
    """Sides of the pyramid levels, coarsest first: 1, 2, 4, ... doubling, the last one capped at `resolution`."""
    if resolution < 1:
        raise ValueError(f"resolution must be >= 1, got {resolution}")
    sizes = [1]
    while sizes[-1] < resolution:
        sizes.append(min(2 * sizes[-1], resolution))
    return sizes


def upsample_sum(levels: list[torch.Tensor], resolution: int) -> torch.Tensor:
    """Σ_k bilinear upsampling (align_corners=False, no antialias) of levels [n, 3, r_k, r_k] to [n, 3, R, R].

    Each upsampling is applied as two small matrix products, B_k · level · B_kᵀ with B_k = `bilinear_matrix(r_k, R)`,
    equal to `F.interpolate(level, size=(R, R), mode="bilinear", align_corners=False)` up to rounding. Why not
    F.interpolate: on CUDA its backward scatters every output pixel's gradient into the level with atomic adds, and
    a 1×1 or 2×2 level receives 65,536 or 16,384 of them per channel at one address. That contention was 86% of a
    whole distillation step of ViT-B/14 at C = 1000 on an H200 (2.64 of 3.08 s, benchmarks/profile_step.py); the
    transposed products of the backward here have no atomics.
    """
    out = None
    for level in levels:
        r = level.shape[-1]
        if r == resolution:
            up = level
        else:
            b = bilinear_matrix(r, resolution, level.dtype, level.device)
            up = torch.matmul(torch.matmul(b, level), b.transpose(0, 1))
        out = up if out is None else out + up
    return out


def bilinear_matrix(src: int, dst: int, dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
    """B [dst, src]: 1-D bilinear resampling with align_corners=False and no antialias, as F.interpolate does it
    (source position (i + 0.5)·src/dst − 0.5, clamped at 0; both neighbours clamped to the last index), so that
    B · x equals F.interpolate(x, dst, mode="linear") for x [..., src]. Cached per (src, dst, dtype, device) and built
    on the device itself (no host-to-device copy inside a step). Shared: do not modify in place."""
    if src < 1 or dst < 1:
        raise ValueError(f"bilinear_matrix needs positive sizes, got src={src}, dst={dst}")
    device = torch.device(device) if device is not None else torch.device("cpu")
    return _bilinear_matrix(int(src), int(dst), dtype, device)


@functools.lru_cache(maxsize=256)
@torch.inference_mode(False)  # as _colour_matrix: cached for later autograd use
def _bilinear_matrix(src: int, dst: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    rows = torch.arange(dst, dtype=torch.int64, device=device)
    pos = ((rows.to(torch.float64) + 0.5) * (src / dst) - 0.5).clamp_min(0.0)
    lo = pos.floor().to(torch.int64).clamp_max(src - 1)
    hi = (lo + 1).clamp_max(src - 1)
    frac = pos - lo.to(torch.float64)
    b = torch.zeros(dst, src, dtype=torch.float64, device=device)
    b.index_put_((rows, lo), 1.0 - frac, accumulate=True)
    b.index_put_((rows, hi), frac, accumulate=True)
    return b.to(dtype)


def decode(levels: list[torch.Tensor], resolution: int) -> torch.Tensor:
    """Pyramid levels -> images in (0, 1): sigmoid(2 · M̂ · Σ upsample(level)). [n, 3, R, R], differentiable."""
    return squash(decorrelate_colours(upsample_sum(levels, resolution)))


def encode(images: torch.Tensor, sizes: list[int], *, margin: float = 0.02) -> list[torch.Tensor]:
    """The inverse of `decode`: images [n, 3, R, R] in [0, 1] -> levels (sides `sizes`, the last = R) that decode to
    margin + (1 - 2·margin)·images. The values are squeezed into [margin, 1 - margin] first so that no pixel starts
    in the sigmoid's flat tails (margin 0.02: |2x| <= 3.9); the coarser levels start at zero and the finest holds
    M̂⁻¹ · logit(y) / 2. (Adam's steps do not depend on how the sum is split between levels.)

    Equivalent PyTorch: `[zeros for the coarser sides] + [torch.linalg.solve(colour_matrix(), logit(y).flatten(2) / 2)
    .view_as(y)]`, y = margin + (1 - 2·margin)·images.
    """
    if images.dim() != 4 or images.shape[1] != 3 or images.shape[2] != images.shape[3] or images.shape[3] != sizes[-1]:
        raise ValueError(f"encode expects images [n, 3, {sizes[-1]}, {sizes[-1]}], got shape {tuple(images.shape)}")
    if not 0 < margin < 0.5:
        raise ValueError(f"margin must be in (0, 0.5), got {margin}")
    y = margin + (1 - 2 * margin) * images.double().clamp(0, 1)
    z = torch.logit(y) / 2
    inverse = torch.linalg.inv(colour_matrix(torch.float64, images.device))
    x = torch.einsum("ij,njhw->nihw", inverse, z).float()
    n = images.shape[0]
    coarse = [torch.zeros(n, 3, side, side, device=images.device) for side in sizes[:-1]]
    return [*coarse, x.contiguous()]


def _block_seed(seed: int, tag: str, block: int) -> int:
    digest = hashlib.sha256(f"sfmkern.synthetic:{seed}:{tag}:{block}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def block_randn(seed: int, tag: str, start: int, stop: int, shape: tuple[int, ...]) -> torch.Tensor:
    """Rows [start, stop) of a virtual float32 CPU tensor randn(num_images, *shape), drawn per block of images from
    generators seeded by (seed, tag, block): the same values whichever range a caller asks for."""
    parts = []
    for block in range(start // _BLOCK, (stop - 1) // _BLOCK + 1):
        g = torch.Generator().manual_seed(_block_seed(seed, tag, block))
        values = torch.randn((_BLOCK, *shape), generator=g)
        lo = max(start, block * _BLOCK) - block * _BLOCK
        hi = min(stop, (block + 1) * _BLOCK) - block * _BLOCK
        parts.append(values[lo:hi])
    return torch.cat(parts) if parts else torch.empty((0, *shape))


class SyntheticImages:
    """The trainable parameters of images [start, stop) of `num_images` synthetic images.

    `levels` is a list of leaf float32 tensors [stop - start, 3, r, r] (coarsest first) requiring grad; `render(lo, hi)`
    decodes local rows [lo, hi) into [hi - lo, 3, R, R] images in (0, 1) with autograd to the levels.
    """

    def __init__(
        self,
        num_images: int,
        resolution: int,
        *,
        param: str = "pyramid",
        grow_every: int = 200,
        seed: int = 0,
        rows: tuple[int, int] | None = None,
        device: torch.device | str | None = None,
    ):
        if param not in PARAMETERISATIONS:
            raise ValueError(f"param must be one of {PARAMETERISATIONS}, got {param!r}")
        if num_images < 1:
            raise ValueError(f"num_images must be >= 1, got {num_images}")
        if grow_every < 0:
            raise ValueError(f"grow_every must be >= 0 (0 = all levels from the start), got {grow_every}")
        start, stop = rows if rows is not None else (0, num_images)
        if not 0 <= start < stop <= num_images:
            raise ValueError(f"rows {rows} not a non-empty range inside [0, {num_images})")
        self.num_images = num_images
        self.resolution = int(resolution)
        self.param = param
        self.grow_every = int(grow_every)
        self.seed = int(seed)
        self.start, self.stop = start, stop
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.sizes = [self.resolution] if param == "pixels" else level_sizes(self.resolution)
        initial = len(self.sizes) if (param == "pixels" or self.grow_every == 0) else 1
        self.levels = [self._draw(k) / initial for k in range(initial)]
        for level in self.levels:
            level.requires_grad_(True)

    def _draw(self, k: int) -> torch.Tensor:
        side = self.sizes[k]
        values = block_randn(self.seed, f"{self.param}-level{k}-{side}", self.start, self.stop, (3, side, side))
        return values.to(self.device)

    @property
    def num_levels(self) -> int:
        return len(self.levels)

    @property
    def max_levels(self) -> int:
        return len(self.sizes)

    def __len__(self) -> int:
        return self.stop - self.start

    def levels_due(self, step: int) -> int:
        """Levels the schedule wants before 0-based `step` runs (growth at steps grow_every, 2·grow_every, ...)."""
        if self.param == "pixels" or self.grow_every == 0:
            return self.max_levels
        return min(self.max_levels, 1 + step // self.grow_every)

    def grow(self) -> bool:
        """Add the next level: existing levels × old/new, the new one randn/new. False when already at full size."""
        old = self.num_levels
        if old >= self.max_levels:
            return False
        new = old + 1
        with torch.no_grad():
            kept = [level.detach() * (old / new) for level in self.levels]
        self.levels = [*kept, self._draw(old) / new]
        for level in self.levels:
            level.requires_grad_(True)
        return True

    def set_images(self, images: torch.Tensor, *, margin: float = 0.02) -> None:
        """Start from given images [len(self), 3, R, R] in [0, 1] (e.g. real ones): every level is created (the
        growth schedule is complete from here on) and the levels are set by `encode`, so `render()` returns the
        images squeezed into [margin, 1 - margin]."""
        if tuple(images.shape) != (len(self), 3, self.resolution, self.resolution):
            raise ValueError(f"set_images expects [{len(self)}, 3, {self.resolution}, {self.resolution}], got "
                             f"{tuple(images.shape)}")
        levels = encode(images.to(self.device, torch.float32), self.sizes, margin=margin)
        self.levels = [level.requires_grad_(True) for level in levels]

    def render(self, lo: int = 0, hi: int | None = None) -> torch.Tensor:
        """Decode local rows [lo, hi) -> [hi - lo, 3, R, R] float32 in (0, 1) (autograd to the levels when enabled)."""
        hi = len(self) if hi is None else hi
        return decode([level[lo:hi] for level in self.levels], self.resolution)

    def nbytes(self) -> int:
        """Bytes of the parameters themselves (not their gradients or optimiser state)."""
        return sum(level.numel() * level.element_size() for level in self.levels)

    def load_levels(self, levels: list[torch.Tensor]) -> None:
        """Replace the levels by `levels` (shapes checked against this shard's schedule)."""
        if not 1 <= len(levels) <= self.max_levels:
            raise ValueError(f"expected 1..{self.max_levels} levels, got {len(levels)}")
        for k, level in enumerate(levels):
            want = (len(self), 3, self.sizes[k], self.sizes[k])
            if tuple(level.shape) != want:
                raise ValueError(f"level {k} has shape {tuple(level.shape)}, expected {want}")
        self.levels = [level.detach().to(self.device, torch.float32).clone().requires_grad_(True) for level in levels]
