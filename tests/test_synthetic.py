"""Synthetic-image parameterisation against hand-computed values: pyramid growth, colour decorrelation, sigmoid."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from sfmkern.synthetic import (
    SyntheticImages,
    bilinear_matrix,
    block_randn,
    colour_matrix,
    decode,
    decorrelate_colours,
    level_sizes,
    squash,
    upsample_sum,
)

# sqrt(0.26² + 0.27² + 0.27²) = sqrt(0.2134): the first column has the largest norm
_MAX_COLUMN_NORM = math.sqrt(0.2134)


def test_colour_matrix_by_hand():
    m = colour_matrix(torch.float64)
    assert m[0, 0].item() == pytest.approx(0.26 / 0.46195238, rel=1e-6)
    assert m[2, 1].item() == pytest.approx(-0.09 / _MAX_COLUMN_NORM, rel=1e-12)
    assert m.norm(dim=0).max().item() == pytest.approx(1.0, rel=1e-12)
    # per pixel x = (1, 2, 3): M x = (0.26+0.18+0.06, 0.27+0-0.15, 0.27-0.18+0.09) = (0.50, 0.12, 0.18)
    x = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64).view(1, 3, 1, 1).expand(2, 3, 2, 3).contiguous()
    out = decorrelate_colours(x)
    want = torch.tensor([0.50, 0.12, 0.18], dtype=torch.float64) / _MAX_COLUMN_NORM
    assert out.shape == (2, 3, 2, 3)
    torch.testing.assert_close(out[1, :, 1, 2], want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out[0, :, 0, 0], want, rtol=1e-12, atol=1e-12)


def test_decorrelate_rejects_bad_shape():
    with pytest.raises(ValueError, match=r"\[N, 3, H, W\]"):
        decorrelate_colours(torch.zeros(2, 4, 3, 3))


def test_squash_is_sigmoid_of_twice():
    x = torch.tensor([0.0, math.log(3) / 2, -math.log(3) / 2, 10.0], dtype=torch.float64)
    torch.testing.assert_close(squash(x), torch.tensor([0.5, 0.75, 0.25, 1 / (1 + math.exp(-20))],
                                                       dtype=torch.float64))


def test_level_sizes():
    assert level_sizes(32) == [1, 2, 4, 8, 16, 32]
    assert level_sizes(28) == [1, 2, 4, 8, 16, 28]
    assert level_sizes(256) == [1, 2, 4, 8, 16, 32, 64, 128, 256]
    assert level_sizes(1) == [1]
    with pytest.raises(ValueError):
        level_sizes(0)


def test_bilinear_upsampling_by_hand():
    # 2x2 -> 4x4, align_corners=False: sample positions (x + 0.5) / 2 - 0.5 = -0.25, 0.25, 0.75, 1.25 (edges clamp)
    coarse = torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=torch.float64).view(1, 1, 2, 2).expand(1, 3, 2, 2)
    w = torch.tensor([[1.0, 0.0], [0.75, 0.25], [0.25, 0.75], [0.0, 1.0]], dtype=torch.float64)
    want = w @ torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=torch.float64) @ w.T
    constant = torch.full((1, 3, 1, 1), 0.5, dtype=torch.float64)
    out = upsample_sum([constant, coarse.contiguous()], 4)
    torch.testing.assert_close(out[0, 1], want + 0.5)
    assert want[0].tolist() == [1.0, 1.25, 1.75, 2.0]


def test_decode_formula():
    g = torch.Generator().manual_seed(1)
    levels = [torch.randn(2, 3, s, s, generator=g, dtype=torch.float64) for s in (1, 2, 4)]
    out = decode(levels, 4)
    summed = levels[2] + torch.nn.functional.interpolate(levels[1], size=(4, 4), mode="bilinear") + levels[0]
    m = colour_matrix(torch.float64)
    manual = 1 / (1 + torch.exp(-2 * torch.einsum("ij,njhw->nihw", m, summed)))
    torch.testing.assert_close(out, manual, rtol=1e-12, atol=1e-12)
    assert out.min() > 0 and out.max() < 1


def test_block_randn_is_shard_independent():
    full = block_randn(7, "t", 0, 150, (3, 2, 2))
    part = block_randn(7, "t", 61, 130, (3, 2, 2))
    assert torch.equal(full[61:130], part)
    assert not torch.equal(block_randn(8, "t", 0, 10, (3, 2, 2)), full[:10])


def test_pyramid_growth_scaling():
    imgs = SyntheticImages(5, 4, grow_every=2, seed=3)
    draw = [block_randn(3, f"pyramid-level{k}-{s}", 0, 5, (3, s, s)) for k, s in enumerate((1, 2, 4))]
    assert imgs.num_levels == 1 and imgs.max_levels == 3
    torch.testing.assert_close(imgs.levels[0].detach(), draw[0])  # initial level: randn / 1 level
    assert [imgs.levels_due(s) for s in range(7)] == [1, 1, 2, 2, 3, 3, 3]
    assert imgs.grow()  # 1 -> 2 levels: old x 1/2, new randn / 2
    torch.testing.assert_close(imgs.levels[0].detach(), draw[0] / 2)
    torch.testing.assert_close(imgs.levels[1].detach(), draw[1] / 2)
    assert imgs.grow()  # 2 -> 3 levels: old x 2/3, new randn / 3
    for k in range(3):
        torch.testing.assert_close(imgs.levels[k].detach(), draw[k] / 3)
    assert not imgs.grow()
    assert all(level.requires_grad and level.is_leaf for level in imgs.levels)
    want = decode([d / 3 for d in draw], 4)
    torch.testing.assert_close(imgs.render().detach(), want)
    torch.testing.assert_close(imgs.render(1, 4).detach(), want[1:4])


def test_all_levels_at_once_and_pixels():
    imgs = SyntheticImages(2, 8, grow_every=0, seed=0)
    assert imgs.num_levels == 4 and imgs.levels_due(0) == 4
    torch.testing.assert_close(imgs.levels[3].detach(), block_randn(0, "pyramid-level3-8", 0, 2, (3, 8, 8)) / 4)
    pix = SyntheticImages(2, 8, param="pixels", seed=0)
    assert pix.num_levels == 1 and pix.levels[0].shape == (2, 3, 8, 8) and not pix.grow()


def test_sharded_rows_match_full():
    full = SyntheticImages(10, 8, grow_every=0, seed=5)
    shard = SyntheticImages(10, 8, grow_every=0, seed=5, rows=(4, 9))
    torch.testing.assert_close(shard.render().detach(), full.render(4, 9).detach(), rtol=0, atol=0)


def test_bad_arguments():
    with pytest.raises(ValueError, match="param"):
        SyntheticImages(2, 8, param="fourier")
    with pytest.raises(ValueError, match="grow_every"):
        SyntheticImages(2, 8, grow_every=-1)
    with pytest.raises(ValueError, match="rows"):
        SyntheticImages(2, 8, rows=(1, 3))
    imgs = SyntheticImages(2, 8)
    with pytest.raises(ValueError, match="level 0 has shape"):
        imgs.load_levels([torch.zeros(3, 3, 1, 1)])


def test_bilinear_matrix_by_hand():
    # 2 -> 4: source positions (i + 0.5)/2 - 0.5 = -0.25 (clamped to 0), 0.25, 0.75, 1.25 (upper neighbour clamped)
    expected = torch.tensor([[1.0, 0.0], [0.75, 0.25], [0.25, 0.75], [0.0, 1.0]], dtype=torch.float64)
    assert torch.equal(bilinear_matrix(2, 4, torch.float64), expected)
    assert torch.equal(bilinear_matrix(1, 5, torch.float64), torch.ones(5, 1, dtype=torch.float64))
    with pytest.raises(ValueError, match="src=0"):
        bilinear_matrix(0, 4)


@pytest.mark.parametrize("src,dst", [(1, 256), (2, 256), (3, 7), (5, 17), (64, 100), (128, 224), (7, 32)])
def test_upsample_sum_equals_interpolate_forward_and_backward(src, dst):
    """The matrix-product upsampling is F.interpolate's bilinear (align_corners=False) in value and in gradient."""
    g = torch.Generator().manual_seed(src * 1000 + dst)
    level = torch.randn(2, 3, src, src, generator=g, dtype=torch.float64, requires_grad=True)
    full = torch.randn(2, 3, dst, dst, generator=g, dtype=torch.float64, requires_grad=True)
    upstream = torch.randn(2, 3, dst, dst, generator=g, dtype=torch.float64)
    ours = upsample_sum([level, full], dst)
    grads = torch.autograd.grad(ours, (level, full), upstream)
    theirs = F.interpolate(level, size=(dst, dst), mode="bilinear", align_corners=False) + full
    expected = torch.autograd.grad(theirs, (level, full), upstream)
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)
    for a, b in zip(grads, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_cached_constants_made_under_inference_mode_still_serve_autograd():
    """decode's cached matrices are normal tensors even when first made under inference_mode (exporting images),
    so a later differentiable decode can save them for backward."""
    from sfmkern import synthetic

    synthetic._colour_matrix.cache_clear()
    synthetic._bilinear_matrix.cache_clear()
    levels = [torch.randn(2, 3, s, s) for s in (1, 2, 8)]
    with torch.inference_mode():
        decode(levels, 8)
    leaves = [level.clone().requires_grad_(True) for level in levels]
    decode(leaves, 8).sum().backward()
    assert all(leaf.grad is not None and torch.isfinite(leaf.grad).all() for leaf in leaves)
