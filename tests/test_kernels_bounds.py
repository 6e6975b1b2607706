"""Memory bounds of the kernels: no program reads or writes outside the tensors it is given.

A read or write one row or column past a buffer (a dropped or off-by-one mask) can leave every result intact under
the interpreter while, on a GPU, it reads or overwrites a neighbouring allocation. Here every float buffer the kernels
touch lies between guard zones of NaN, each as long as the buffer itself: the inputs (built by the test) and the
outputs and workspaces the launchers allocate (the launcher modules' `torch` is replaced by a proxy whose `empty`,
`empty_like` and `zeros` return guarded views). A stray read brings a NaN into the results; a stray write changes a
guard's bits. Run on the interpreter's wide tiles and on the CUDA launch configuration, at sizes that leave ragged
tails in every block dimension (C = 37: 16-class blocks, D = 300: 32/64/256/512-column blocks).
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import rel_err

from sfmkern import kernels, ops, reference

class_sums_mod, sfm_loss_mod = kernels.class_sums, kernels.sfm_loss  # the launcher modules

INT_VIEW = {torch.float64: torch.int64, torch.float32: torch.int32, torch.float16: torch.int16,
            torch.bfloat16: torch.int16}
LABEL_GUARD = 1 << 40  # guard value of int64 buffers (out of range as a label, as a count, as an offset)


def _guard_value(dtype: torch.dtype):
    return float("nan") if dtype.is_floating_point else LABEL_GUARD


class Guarded:
    """Allocates tensors in the middle of guard-padded buffers and checks later that the guards are untouched."""

    def __init__(self):
        self.buffers: list[tuple[torch.Tensor, int, int]] = []

    def place(self, values: torch.Tensor) -> torch.Tensor:
        """A contiguous copy of `values` between two guard zones."""
        out = self.alloc(values.shape, values.dtype)
        out.copy_(values)
        return out

    def alloc(self, shape, dtype, fill=None) -> torch.Tensor:
        shape = torch.Size(shape)
        n = math.prod(shape)
        pad = max(n, 64)
        big = torch.full((pad + n + pad,), _guard_value(dtype), dtype=dtype)
        if fill is not None:
            big[pad:pad + n] = fill
        self.buffers.append((big, pad, n))
        return big[pad:pad + n].view(shape)

    def check(self) -> None:
        for big, pad, n in self.buffers:
            for name, zone in (("before", big[:pad]), ("after", big[pad + n:])):
                if zone.dtype.is_floating_point:
                    bits = zone.view(INT_VIEW[zone.dtype])
                    intact = torch.equal(bits, torch.full_like(zone, float("nan")).view(INT_VIEW[zone.dtype]))
                else:
                    intact = bool((zone == LABEL_GUARD).all())
                assert intact, f"a kernel wrote {name} a {big.dtype} buffer of {n} elements"


class GuardedTorch:
    """Stands in for `torch` inside a launcher module: its output buffers and workspaces come from `Guarded`."""

    def __init__(self, guard: Guarded):
        self._guard = guard

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def _shape(size):
        return tuple(size[0]) if len(size) == 1 and isinstance(size[0], (tuple, list, torch.Size)) else size

    def empty(self, *size, dtype=None, device=None):
        assert device is None or torch.device(device).type == "cpu"
        return self._guard.alloc(self._shape(size), dtype or torch.get_default_dtype())

    def zeros(self, *size, dtype=None, device=None):
        assert device is None or torch.device(device).type == "cpu"
        return self._guard.alloc(self._shape(size), dtype or torch.get_default_dtype(), fill=0)

    def empty_like(self, t):
        return self._guard.alloc(t.shape, t.dtype)


@pytest.fixture(params=("wide", "gpu-launch"))
def guard(request, monkeypatch):
    monkeypatch.setenv("SFMKERN_GPU_LAUNCH", "1" if request.param == "gpu-launch" else "0")
    monkeypatch.setenv("SFMKERN_BACKEND", "triton")
    g = Guarded()
    monkeypatch.setattr(class_sums_mod, "torch", GuardedTorch(g))
    monkeypatch.setattr(sfm_loss_mod, "torch", GuardedTorch(g))
    yield g
    g.check()


@pytest.mark.parametrize("order", ("unsorted", "sorted", "deterministic"))
def test_class_sums_and_loss_stay_in_bounds(guard, order):
    c, d, n = 37, 300, 120
    gen = torch.Generator().manual_seed(11)
    labels = torch.cat([torch.arange(c), torch.randint(0, c, (n - c,), generator=gen)])
    labels = labels.sort().values if order == "sorted" else labels[torch.randperm(n, generator=gen)]
    features = torch.randn(n, d, generator=gen) + 0.5
    centres = torch.randn(c, d, generator=gen, dtype=torch.float64)
    flow64 = reference.real_flow(centres)
    anchor64 = centres + 0.3 * torch.randn(c, d, generator=gen, dtype=torch.float64)
    sums64, counts64 = reference.class_sums(features.double(), labels, c)
    kwargs = {"sorted_labels": order == "sorted", "deterministic": order == "deterministic"}
    z, y = guard.place(features), guard.place(labels)
    flow, anchor = guard.place(flow64.float()), guard.place(anchor64.float())
    before = len(guard.buffers)

    sums, counts = class_sums_mod.class_sums_triton(z, y, c, **kwargs)
    assert torch.equal(counts, counts64) and rel_err(sums, sums64) <= 1e-6
    shifted, _ = class_sums_mod.class_sums_triton(z, y, c, shift=z[0], **kwargs)
    assert rel_err(shifted, sums64 - counts64[:, None] * features[0].double()) <= 1e-6
    for extra in ({}, {"anchor": anchor, "anchor_weight": 0.7}):
        extra64 = {k: anchor64 if k == "anchor" else v for k, v in extra.items()}
        loss64, grad64 = reference.flow_loss_and_grad(sums64, counts64, flow64, **extra64)
        loss, grad = sfm_loss_mod.flow_loss_and_grad_triton(sums, counts, flow, **extra)
        assert abs(loss.item() - loss64.item()) <= 1e-5 * loss64.item(), (extra.keys(), loss.item(), loss64.item())
        assert rel_err(grad, grad64) <= 1e-5, extra.keys()
        out = sfm_loss_mod.feature_grad_triton(grad, counts, y, scale=guard.place(torch.tensor(1.5)))
        ref = reference.feature_grad(grad64, counts64, labels, scale=torch.tensor(1.5, dtype=torch.float64),
                                     dtype=torch.float64)
        assert rel_err(out, ref) <= 1e-5, extra.keys()
    assert len(guard.buffers) >= before + 10, "the launchers no longer allocate through `torch`: guard them anew"


def test_sfm_loss_op_stays_in_bounds(guard):
    """The whole op (forward and backward) with guarded inputs."""
    c, d, n = 37, 300, 100
    gen = torch.Generator().manual_seed(12)
    labels = torch.cat([torch.arange(c), torch.randint(0, c, (n - c,), generator=gen)])
    labels = labels[torch.randperm(n, generator=gen)]
    features = torch.randn(n, d, generator=gen, dtype=torch.float64) + 0.5
    flow64 = reference.real_flow(torch.randn(c, d, generator=gen, dtype=torch.float64))
    z64 = features.clone().requires_grad_(True)
    loss64 = reference.sfm_loss(z64, labels, flow64)
    loss64.backward()
    z = guard.place(features.float()).requires_grad_(True)
    loss = ops.sfm_loss(z, guard.place(labels), guard.place(flow64.float()))
    loss.backward()
    assert abs(loss.item() - loss64.item()) <= 1e-5 * loss64.item(), (loss.item(), loss64.item())
    assert rel_err(z.grad, z64.grad) <= 1e-5
