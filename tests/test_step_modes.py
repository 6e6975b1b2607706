"""Step modes: checkpointing only when a plain chunk does not fit the budget, the opt-in `lagged` step (its gradient is
the previous step's G back-propagated through this step's views; exact at step 0 and after a growth; resumable), and
one (loss, G) method for every mode."""

from __future__ import annotations

import pytest
import torch

from sfmkern import ops
from sfmkern.distillation import DistillConfig, Distiller, chunk_for_budget, own_bytes_max

SMALL = {"syn_res": 32, "crop": 32}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def flow(backbone):
    gen = torch.Generator().manual_seed(7)
    f = torch.randn(4, backbone.feature_dim, generator=gen)
    return f - f.mean(0)


def _distiller(flow, backbone, **kw):
    cfg = dict(ipc=2, augs=2, grow_every=0, seed=1, chunk_size=3, **SMALL)
    cfg.update(kw)
    return Distiller(flow, backbone, config=DistillConfig(**cfg))


def _grads(d):
    return [p.grad.detach().clone() for p in d.parameters()]


def _assert_close_grads(a, b, tol=1e-4):
    for ga, gb in zip(a, b, strict=True):
        assert float(ga.norm()) > 0
        rel = float((ga - gb).norm() / ga.norm())
        assert rel <= tol, f"relative gradient error {rel:.2e}"


def _manual_grad(d, views, grad_mu, counts):
    """dL/dlevels when G = grad_mu is back-propagated through `views` of d's current images (plain autograd)."""
    levels = [p.detach().clone().requires_grad_(True) for p in d.parameters()]
    from sfmkern.synthetic import decode

    feats = d.backbone.features(d._augment(decode(levels, d.images.resolution), views))
    feats.backward(ops.feature_grad(grad_mu, counts, d.view_labels, dtype=feats.dtype))
    return [p.grad for p in levels]


# ------------------------------------------------------------------------------------------- chunk and checkpointing
def test_chunk_for_budget_checkpoints_only_when_a_plain_chunk_does_not_fit():
    asked = []

    def per_view(checkpointing):
        asked.append(checkpointing)
        return 10.0 if checkpointing else 100.0

    assert chunk_for_budget(5000, per_view, num_views=1000) == (50, False) and asked == [False]
    asked.clear()
    assert chunk_for_budget(500, per_view, num_views=1000) == (50, True) and asked == [False, True]
    assert chunk_for_budget(500, per_view, num_views=5) == (5, False)  # every view fits: no recomputation
    assert chunk_for_budget(5, per_view, num_views=1000) == (1, True)
    assert own_bytes_max(10, 4) == 4 * 4 * 10 * 3 * (1 + 4 + 16)
    assert own_bytes_max(10, 4, "pixels") == 4 * 4 * 10 * 3 * 16


def test_budget_decides_checkpointing_and_gradients_are_unchanged(flow, backbone):
    model_bytes = sum(p.numel() * p.element_size() for p in backbone.model.parameters())
    probe = _distiller(flow, backbone, chunk_size=None)
    own = own_bytes_max(probe.num_images, SMALL["syn_res"])
    plain, ckpt = probe._probe_bytes_per_view(False), probe._probe_bytes_per_view(True)
    assert 0 < ckpt < plain
    roomy = _distiller(flow, backbone, chunk_size=None, max_memory=int(model_bytes + own + 100 * plain))
    assert roomy.resolve_chunk_size() == roomy.num_views and not roomy.checkpointing
    assert roomy.resolve_mode("auto") == "single"
    tight = _distiller(flow, backbone, chunk_size=None, max_memory=int(model_bytes + own + 3.5 * plain))
    assert tight.resolve_chunk_size() == int(3.5 * plain // ckpt) and tight.checkpointing
    assert tight.resolve_mode("auto") == "two_phase" and tight.chunk_size < tight.num_views
    seen = []
    original = backbone.features

    def spy(x):
        seen.append((torch.is_grad_enabled(), backbone.grad_checkpointing))
        return original(x)

    views = roomy.draw_views()
    roomy.forward_backward("single", views)
    backbone.features = spy
    try:
        tight.forward_backward("two_phase", views)
    finally:
        del backbone.features
    assert not backbone.grad_checkpointing  # switched back off after the step
    assert (True, True) in seen and (False, False) in seen and (True, False) not in seen
    _assert_close_grads(_grads(roomy), _grads(tight))


# ------------------------------------------------------------------------------------------- one (L, G) method
@pytest.mark.parametrize("mode,steps", [("single", 1), ("two_phase", 1), ("lagged", 2)])
def test_every_mode_computes_loss_and_grad_in_one_method(flow, backbone, monkeypatch, mode, steps):
    d = _distiller(flow, backbone)
    flow_loss_and_grad = ops.flow_loss_and_grad
    calls = []

    def one_method(self, sums, counts):
        calls.append(tuple(sums.shape))
        return flow_loss_and_grad(sums, counts, self.real_flow)

    def bypass(*args, **kwargs):
        raise AssertionError("a step mode evaluated the objective outside Distiller._loss_and_grad")

    monkeypatch.setattr(Distiller, "_loss_and_grad", one_method)
    monkeypatch.setattr(ops, "flow_loss_and_grad", bypass)
    monkeypatch.setattr(ops, "sfm_loss", bypass)
    for _ in range(steps):
        d.step(mode)
    assert calls == [(4, backbone.feature_dim)] * steps


# ------------------------------------------------------------------------------------------- lagged
def test_lagged_gradient_is_the_previous_steps_g_through_this_steps_views(flow, backbone):
    exact, lagged = _distiller(flow, backbone), _distiller(flow, backbone)
    views0 = exact.draw_views()
    lagged.draw_views()  # same generator state
    loss0_exact = exact.forward_backward("two_phase", views0)
    loss0_lagged = lagged.forward_backward("lagged", views0)
    torch.testing.assert_close(loss0_lagged, loss0_exact)
    _assert_close_grads(_grads(exact), _grads(lagged), 1e-6)  # step 0 is exact
    grad0, counts0, _ = lagged._lagged
    for d in (exact, lagged):
        d.optimizer.step()
        d.step_count += 1
    views1 = lagged.draw_views()
    exact.draw_views()
    want = _manual_grad(lagged, views1, grad0, counts0)
    loss1_exact = exact.forward_backward("two_phase", views1)
    loss1_lagged = lagged.forward_backward("lagged", views1)
    torch.testing.assert_close(loss1_lagged, loss1_exact, rtol=1e-5, atol=1e-6)  # the loss itself is exact
    _assert_close_grads(want, _grads(lagged))
    exact_grad = _grads(exact)
    diff = max(float((a - b).norm() / a.norm()) for a, b in zip(exact_grad, _grads(lagged), strict=True))
    assert diff > 1e-3  # lagged differs from the exact step after step 0 (the test above is not vacuous)
    # the kept G is this step's: the exact step's G on the same images and views
    sums, counts = ops.class_sums(torch.cat([lagged.backbone.features(lagged._augment(
        lagged.images.render(0, len(lagged.images)), views1))]).detach(), lagged.view_labels, 4, sorted_labels=True)
    torch.testing.assert_close(lagged._lagged[0], ops.flow_loss_and_grad(sums, counts, lagged.real_flow)[1],
                               rtol=1e-4, atol=1e-6)


def test_lagged_is_exact_again_after_a_growth(flow, backbone):
    exact, lagged = _distiller(flow, backbone, grow_every=2), _distiller(flow, backbone, grow_every=2)
    for _ in range(2):
        exact.step("two_phase")
        lagged.step("lagged")
    assert lagged.images.num_levels == 1
    views = exact.draw_views()
    lagged.draw_views()
    exact.forward_backward("two_phase", views)
    lagged.forward_backward("lagged", views)  # step 2 grows the pyramid: no stale G is used
    assert lagged.images.num_levels == 2 == lagged._lagged[2]
    # the images differ after one lagged step, so compare against the exact gradient of lagged's own images
    ref = _distiller(flow, backbone, grow_every=2)
    ref.images.load_levels([p.detach() for p in lagged.parameters()])
    ref.step_count = lagged.step_count
    ref.forward_backward("two_phase", views)
    _assert_close_grads(_grads(ref), _grads(lagged), 1e-5)


def test_lagged_resume_from_checkpoint_is_identical(flow, backbone, tmp_path):
    straight = _distiller(flow, backbone)
    for _ in range(5):
        straight.step("lagged")
    first = _distiller(flow, backbone)
    for _ in range(3):
        first.step("lagged")
    path = first.save_checkpoint(tmp_path / "ckpt.safetensors")
    resumed = _distiller(flow, backbone)
    assert resumed.load_checkpoint(path) == 3 and resumed._lagged is not None
    for _ in range(2):
        resumed.step("lagged")
    for a, b in zip(straight.parameters(), resumed.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # without the kept G the resumed step would be an exact one, and the images would differ
    blank = _distiller(flow, backbone)
    blank.load_checkpoint(path)
    blank._lagged = None
    for _ in range(2):
        blank.step("lagged")
    assert any(not torch.equal(a, b) for a, b in zip(straight.parameters(), blank.parameters(), strict=True))


# ------------------------------------------------------------------------------------------- one chunk alive at a time
class _Saved:
    """A tensor autograd saved for backward, counted in `live` until autograd lets go of it."""

    def __init__(self, t, live, peak):
        self.t, self.live, self.nbytes = t, live, t.numel() * t.element_size()
        live[0] += self.nbytes
        peak[0] = max(peak[0], live[0])

    def __del__(self):
        self.live[0] -= self.nbytes


def _peak_saved_bytes(d, mode, views):
    """The most bytes of non-weight tensors saved for backward that are alive at once during one step of `mode`."""
    weights = {p.data_ptr() for p in d.backbone.model.parameters()}
    live, peak = [0], [0]

    def pack(t):
        return t if t.data_ptr() in weights else _Saved(t, live, peak)

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda s: s if isinstance(s, torch.Tensor) else s.t):
        d.forward_backward(mode, views)
    assert live[0] == 0  # every saved activation was released by the end of the step
    return peak[0]


@pytest.mark.parametrize("mode", ["two_phase", "lagged"])
def test_memory_flat_modes_keep_one_chunk_of_activations_alive(flow, backbone, mode):
    # 16 views in chunks of 4: single-phase saves all 16 views' activations at once; the memory-flat modes (two-phase
    # keeping its last chunk's graph from phase 1 into phase 2, lagged after its first exact step) one chunk's
    d = _distiller(flow, backbone, ipc=2, augs=2, chunk_size=4)
    views = d.draw_views()
    two = flow[:2] - flow[:2].mean(0)  # 2 classes x 1 image x 2 views: one chunk of the same shape, single-phase
    one_chunk = _peak_saved_bytes(_distiller(two, backbone, ipc=1, augs=2, chunk_size=4), "single", None)
    everything = _peak_saved_bytes(d, "single", views)
    assert everything > 3.5 * one_chunk
    if mode == "lagged":
        d.forward_backward("lagged", views)  # the first lagged step is an exact two-phase step
    flat = _peak_saved_bytes(d, mode, views)
    assert 0.9 * one_chunk <= flat <= 1.1 * one_chunk, (flat, one_chunk, everything)
