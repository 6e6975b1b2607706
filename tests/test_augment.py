"""sfmkern.augment: replayable views (any chunking gives the same pixels), noise only where drawn, identity crop."""

import sys

import pytest
import torch

from sfmkern.augment import Views, apply_views, draw_views, gaussian_field


def _views(n=7, a=3, noise_p=0.5):
    return draw_views(n, a, 40, 36, generator=torch.Generator().manual_seed(3), noise_p=noise_p)


def test_chunks_replay_the_same_views():
    views = _views()
    images = torch.rand(7, 3, 40, 36)
    whole = apply_views(images, views, crop=24, noise_std=0.2, noise_mean=0.5)
    parts = [apply_views(images, views.select(slice(lo, lo + 5)), crop=24, noise_std=0.2, noise_mean=0.5)
             for lo in range(0, len(views), 5)]
    assert torch.equal(whole, torch.cat(parts))


def test_noise_only_on_views_drawn_noisy():
    views = _views()
    assert 0 < int(views.noise_on.sum()) < len(views)
    images = torch.rand(7, 3, 40, 36)
    clean = apply_views(images, views, crop=24)
    noisy = apply_views(images, views, crop=24, noise_std=0.2, noise_mean=0.5)
    diff = (noisy - clean).flatten(1)
    assert torch.all(diff[~views.noise_on] == 0)
    expected = gaussian_field(views.noise_seed[views.noise_on], diff.shape[1]) * 0.2 + 0.5
    torch.testing.assert_close(diff[views.noise_on], expected, rtol=0, atol=1e-6)


def test_gaussian_field_statistics_and_determinism():
    seeds = torch.tensor([1, 2, 2**61 + 5])
    field = gaussian_field(seeds, 200_000)
    assert torch.equal(field[1:2], gaussian_field(seeds[1:2], 200_000))
    assert abs(float(field.mean())) < 0.01 and abs(float(field.std()) - 1) < 0.01
    assert not torch.equal(field[0], field[1])


def test_full_crop_without_flip_is_identity_and_differentiable():
    views = draw_views(2, 1, 16, 16, generator=torch.Generator().manual_seed(0), scale=(1, 1), ratio=(1, 1),
                       flip_p=0.0)
    images = torch.rand(2, 3, 16, 16, requires_grad=True)
    out = apply_views(images, views, crop=16)
    torch.testing.assert_close(out, images)
    out.sum().backward()
    assert images.grad is not None and float(images.grad.abs().sum()) > 0


def test_to_packs_every_parameter_and_slices_keep_the_noisy_positions():
    views = _views()
    moved = views.to("cpu")  # the packing path runs on the CPU too (the copy itself is then the identity)
    for name in ("source", "theta", "noise_on", "noise_seed", "noisy", "noisy_host"):
        assert torch.equal(getattr(moved, name), getattr(views, name)), name
    assert moved.theta.dtype == torch.float32 and moved.noise_on.dtype == torch.bool
    assert moved.source.untyped_storage().data_ptr() == moved.noise_seed.untyped_storage().data_ptr()  # one buffer
    for lo, hi in ((0, 5), (5, 9), (9, 21), (4, 4)):
        part, expected = moved.select(slice(lo, hi)), views.select(torch.arange(lo, hi))
        assert torch.equal(part.noisy, expected.noisy) and torch.equal(part.noisy_host, expected.noisy_host)
        assert torch.equal(part.noise_seed, expected.noise_seed)
    meta = views.to("meta")
    assert meta.theta.shape == (21, 2, 3) and meta.noisy.device.type == "meta" and meta.noisy_host.device.type == "cpu"
    with pytest.raises(ValueError, match="noisy_host"):
        Views(meta.source, meta.theta, meta.noise_on, meta.noise_seed)


class _TransferLog:
    """Records every Tensor.to/.cuda/.cpu/.copy_ call that names a device (or copies across devices) made from
    sfmkern/augment.py or sfmkern/distillation/distiller.py: (function, target device, non_blocking)."""

    WATCHED = ("sfmkern/augment.py", "sfmkern/distillation/distiller.py")

    def __init__(self, monkeypatch):
        self.calls = []
        for name in ("to", "cuda", "cpu", "copy_"):
            monkeypatch.setattr(torch.Tensor, name, self._wrap(name, getattr(torch.Tensor, name)))

    def _wrap(self, name, original):
        log = self

        def wrapper(tensor, *args, **kwargs):
            caller = sys._getframe(1)
            if caller.f_code.co_filename.endswith(log.WATCHED):
                target = log._target(name, tensor, args, kwargs)
                if target is not None:
                    log.calls.append((caller.f_code.co_name, target, bool(kwargs.get("non_blocking", False))))
            return original(tensor, *args, **kwargs)

        return wrapper

    @staticmethod
    def _target(name, tensor, args, kwargs):
        if name == "cuda":
            return "cuda"
        if name == "cpu":
            return "cpu"
        if name == "copy_":
            src = args[0] if args else kwargs.get("src")
            return str(tensor.device) if src.device != tensor.device else None
        for value in (*args, kwargs.get("device")):
            if isinstance(value, torch.device):
                return str(value)
            if isinstance(value, str):
                return value
        return None


def test_a_step_moves_its_augmentation_parameters_once(monkeypatch):
    """The step's views reach the device in one non-blocking copy, whatever the number of chunks and phases (on CPU
    the target is the CPU, so the copy is free, but the calls are the same as on CUDA)."""
    from sfmkern.backbone import load_backbone
    from sfmkern.distillation import DistillConfig, Distiller

    torch.manual_seed(0)
    backbone = load_backbone("test_vit", pretrained=False, img_size=32, device="cpu")
    flow = torch.randn(3, backbone.feature_dim)
    cfg = DistillConfig(ipc=2, augs=2, syn_res=32, crop=32, chunk_size=5, grow_every=0, noise_p=0.5, seed=1)
    distiller = Distiller(flow - flow.mean(0), backbone, config=cfg)
    log = _TransferLog(monkeypatch)
    for mode in ("two_phase", "single", "two_phase"):
        log.calls.clear()
        distiller.step(mode)
        assert log.calls == [("to", "cpu", True)], (mode, log.calls)  # 12 views in 3 chunks, two phases: 1 copy
