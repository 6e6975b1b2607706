"""sfmkern.ops beyond the grid: gradcheck, extreme flows, standalone ops, determinism, dispatch and input validation.

Runs the Triton kernels on CPU under TRITON_INTERPRET=1 (set by conftest); GPU-only checks skip without CUDA.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import sfmkern.kernels as kernels
import torch
from conftest import rel_err

from sfmkern import ops, reference


def make_problem(n, c, d, *, dtype=torch.float32, seed=0, sort=False):
    gen = torch.Generator().manual_seed(seed)
    labels = torch.cat([torch.arange(c), torch.randint(0, c, (n - c,), generator=gen)])
    labels = labels.sort().values if sort else labels[torch.randperm(n, generator=gen)]
    features = (torch.randn(n, d, generator=gen) + 0.25).to(dtype)
    centres = torch.randn(c, d, generator=gen)
    return features, labels, centres


# ---------------------------------------------------------------------------------------------------------- gradcheck
def test_gradcheck_op_float64():
    features, labels, centres = make_problem(11, 3, 5, dtype=torch.float64)
    flow = ops.real_flow(centres.double())
    z = features.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: ops.sfm_loss(x, labels, flow), (z,))
    assert torch.autograd.gradcheck(lambda x: ops.sfm_loss(x, labels, flow, sorted_labels=False), (z,))


def test_gradcheck_class_sums_op_float64():
    features, labels, _ = make_problem(9, 4, 3, dtype=torch.float64)
    z = features.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: ops.class_sums(x, labels, 4)[0], (z,))
    assert torch.autograd.gradcheck(lambda x: ops.class_sums(x, labels, 4, deterministic=True)[0], (z,))


def test_float64_features_stay_float64():
    features, labels, centres = make_problem(41, 5, 7, dtype=torch.float64)
    flow = ops.real_flow(centres.double())
    z = features.clone().requires_grad_(True)
    loss = ops.sfm_loss(z, labels, flow)
    loss.backward()
    z64 = features.clone().requires_grad_(True)
    loss64 = reference.sfm_loss(z64, labels, flow)
    loss64.backward()
    assert loss.dtype == torch.float64 and z.grad.dtype == torch.float64
    assert abs(loss.item() - loss64.item()) <= 1e-12 * abs(loss64.item())
    assert rel_err(z.grad, z64.grad) <= 1e-12


# ---------------------------------------------------------------------------------------------- extreme flow geometry
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16, torch.float16), ids=str)
@pytest.mark.parametrize("sign", (1.0, -1.0), ids=("collinear", "anti-aligned"))
def test_near_collinear_and_anti_aligned_flows(sign, dtype):
    """Synthetic rows = +-(real centre of their class) + small noise: loss ~ 0 (collinear) or ~ 2 (anti-aligned)."""
    c, d, n = 100, 761, 401
    gen = torch.Generator().manual_seed(3)
    centres = 0.1 * torch.randn(c, d, generator=gen)  # scale 0.1 keeps torch's own fp16 <F, F~> below 65504
    labels = torch.cat([torch.arange(c), torch.randint(0, c, (n - c,), generator=gen)])
    features = (sign * centres[labels] + 0.01 * torch.randn(n, d, generator=gen)).to(dtype)
    flow = ops.real_flow(centres)
    z64 = features.double().requires_grad_(True)
    loss64 = reference.sfm_loss(z64, labels, flow.double())
    loss64.backward()
    if sign > 0:
        assert 0 < loss64.item() < 5e-3
    else:
        assert 2 - 5e-3 < loss64.item() < 2
    z = features.clone().requires_grad_(True)
    loss = ops.sfm_loss(z, labels, flow)
    loss.backward()
    # Pure relative errors (no floor): the loss to 1e-5 of itself even at ~1e-3, thanks to the difference form.
    loss_err = abs(loss.item() - loss64.item()) / loss64.item()
    grad_err = rel_err(z.grad, z64.grad)
    if dtype == torch.float32:
        assert loss_err <= 1e-5 and grad_err <= 1e-5, (loss_err, grad_err)
    else:
        zt = features.clone().requires_grad_(True)
        sums = torch.zeros(c, d, dtype=dtype).index_add(0, labels, zt)
        loss_t = reference.flow_loss(sums / torch.bincount(labels, minlength=c).to(dtype)[:, None], flow.to(dtype))
        loss_t.backward()
        assert loss_err <= 2 * abs(loss_t.item() - loss64.item()) / loss64.item() + 1e-6
        assert grad_err <= 2 * rel_err(zt.grad, z64.grad) + 1e-6


# ------------------------------------------------------------------------------------------------------- standalone
@pytest.mark.parametrize("centred", (True, False), ids=("real_flow", "arbitrary-F"))
@pytest.mark.parametrize("dtype", (torch.float32, torch.float64), ids=str)
def test_flow_loss_and_grad_matches_autograd(dtype, centred):
    c, d = 37, 29
    gen = torch.Generator().manual_seed(5)
    counts = torch.randint(1, 6, (c,), generator=gen)
    sums = (torch.randn(c, d, generator=gen) * counts[:, None]).to(dtype)
    flow = ops.real_flow(torch.randn(c, d, generator=gen)) if centred else torch.randn(c, d, generator=gen)
    flow = flow.to(dtype)
    loss, grad = ops.flow_loss_and_grad(sums, counts, flow)
    loss64, grad64 = reference.flow_loss_and_grad(sums.double(), counts, flow.double())
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    assert loss.dtype == dtype and grad.dtype == dtype and grad.shape == (c, d)
    assert abs(loss.item() - loss64.item()) <= tol * loss64.item()
    assert rel_err(grad, grad64) <= tol


@pytest.mark.parametrize("out_dtype", (torch.float32, torch.bfloat16), ids=str)
def test_feature_grad_matches_reference(out_dtype):
    c, d, n = 6, 19, 40
    gen = torch.Generator().manual_seed(6)
    grad = torch.randn(c, d, generator=gen)
    labels = torch.randint(0, c, (n,), generator=gen)
    labels[:c] = torch.arange(c)
    counts = torch.bincount(labels, minlength=c)
    scale = torch.tensor(-2.5)
    for cnt, sc in ((counts, scale), (counts, None), (None, scale)):
        out = ops.feature_grad(grad, cnt, labels, scale=sc, dtype=out_dtype)
        ref = reference.feature_grad(grad.double(), cnt, labels, scale=sc, dtype=torch.float64)
        assert out.dtype == out_dtype and out.shape == (n, d)
        assert rel_err(out, ref) <= (1e-6 if out_dtype == torch.float32 else 4e-3)


def test_grad_output_scales_the_feature_gradient_and_no_grad_path():
    features, labels, centres = make_problem(50, 7, 13)
    flow = ops.real_flow(centres)
    z = features.clone().requires_grad_(True)
    (ops.sfm_loss(z, labels, flow) * -3.0).backward()
    z64 = features.double().requires_grad_(True)
    (reference.sfm_loss(z64, labels, flow.double()) * -3.0).backward()
    assert rel_err(z.grad, z64.grad) <= 1e-5
    loss = ops.sfm_loss(features, labels, flow)  # features do not require grad: no graph, G never written
    assert not loss.requires_grad
    assert abs(loss.item() - reference.sfm_loss(features.double(), labels, flow.double()).item()) <= 1e-5


def test_class_sums_drops_out_of_range_labels_when_value_checks_are_off(monkeypatch):
    """With SFMKERN_VALIDATE=0 nothing is checked, but the kernels never write out of bounds."""
    monkeypatch.setenv("SFMKERN_VALIDATE", "0")
    features, labels, _ = make_problem(30, 4, 9)
    bad = labels.clone()
    bad[[3, 17]] = torch.tensor([4, -1])
    keep = (bad >= 0) & (bad < 4)
    ref_sums, ref_counts = reference.class_sums(features[keep].double(), bad[keep], 4)
    for kwargs in ({}, {"deterministic": True}):
        sums, counts = ops.class_sums(features, bad, 4, **kwargs)
        assert torch.equal(counts, ref_counts) and rel_err(sums, ref_sums) <= 1e-6


# ------------------------------------------------------------------------------------------------------ determinism
def test_deterministic_mode_is_bitwise_reproducible():
    features, labels, centres = make_problem(601, 50, 65)
    first = ops.class_sums(features, labels, 50, deterministic=True)
    second = ops.class_sums(features, labels, 50, deterministic=True)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    # Stable sort + segmented kernel: identical bits to the sorted path on a stably pre-sorted copy.
    order = torch.sort(labels, stable=True).indices
    presorted = ops.class_sums(features[order], labels[order], 50, sorted_labels=True)
    assert torch.equal(first[0], presorted[0])
    assert rel_err(first[0], reference.class_sums(features.double(), labels, 50)[0]) <= 1e-6
    flow = ops.real_flow(centres)
    losses = [ops.sfm_loss(features, labels, flow, deterministic=True) for _ in range(2)]
    assert torch.equal(losses[0], losses[1])


# --------------------------------------------------------------------------------------------------------- dispatch
def test_backend_for_dispatch(monkeypatch):
    cpu = torch.zeros(2)
    monkeypatch.delenv("SFMKERN_BACKEND", raising=False)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert ops.backend_for(cpu) == "triton"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert ops.backend_for(cpu) == "torch"
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        monkeypatch.setenv("SFMKERN_BACKEND", "triton")
        ops.backend_for(cpu)
    monkeypatch.setenv("SFMKERN_BACKEND", "torch")
    assert ops.backend_for(cpu) == "torch"
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert ops.backend_for(cpu) == "torch"
    monkeypatch.setenv("SFMKERN_BACKEND", "triton")
    assert ops.backend_for(cpu) == "triton"
    for bad in ("cuda", "Triton", "1"):
        monkeypatch.setenv("SFMKERN_BACKEND", bad)
        with pytest.raises(ValueError, match="SFMKERN_BACKEND"):
            ops.backend_for(cpu)
    with pytest.raises(TypeError):
        ops.backend_for([1.0])


def test_torch_backend_never_launches_a_kernel(monkeypatch):
    monkeypatch.setenv("SFMKERN_BACKEND", "torch")
    for name in ("class_sums_triton", "flow_loss_and_grad_triton", "feature_grad_triton"):
        monkeypatch.setattr(kernels, name, _launch_forbidden)
    features, labels, centres = make_problem(20, 3, 4)
    z = features.clone().requires_grad_(True)
    ops.sfm_loss(z, labels, ops.real_flow(centres)).backward()
    sums, counts = ops.class_sums(features, labels, 3)
    ops.flow_loss_and_grad(sums, counts, ops.real_flow(centres))
    assert z.grad is not None


def test_import_without_triton_and_without_cuda_queries():
    """`import sfmkern.ops` must work with triton unimportable, must not import the kernels, and must not touch CUDA."""
    code = (
        "import sys, torch\n"
        "sys.modules['triton'] = None\n"
        "torch.cuda.is_available = lambda: (_ for _ in ()).throw(AssertionError('CUDA queried'))\n"
        "torch.cuda.device_count = torch.cuda.is_available\n"
        "import sfmkern.ops as ops\n"
        "assert 'sfmkern.kernels' not in sys.modules\n"
        "x = torch.randn(6, 3); y = torch.tensor([0, 1, 2, 0, 1, 2])\n"
        "print(float(ops.sfm_loss(x, y, ops.real_flow(torch.randn(3, 3)))))\n"
    )
    env = {k: v for k, v in __import__("os").environ.items() if k not in ("TRITON_INTERPRET", "SFMKERN_BACKEND")}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr


# ------------------------------------------------------------------------------------------------------- validation
def _launch_forbidden(*args, **kwargs):
    raise AssertionError("a kernel was launched despite invalid input")


@pytest.fixture(params=("triton", "torch"))
def guarded_backend(request, monkeypatch):
    """Each backend in turn, with every Triton launcher replaced by a tripwire."""
    monkeypatch.setenv("SFMKERN_BACKEND", request.param)
    monkeypatch.delenv("SFMKERN_VALIDATE", raising=False)
    for name in ("class_sums_triton", "flow_loss_and_grad_triton", "feature_grad_triton"):
        monkeypatch.setattr(kernels, name, _launch_forbidden)
    return request.param


def _bad_inputs():
    features, labels, centres = make_problem(12, 3, 5)
    flow = reference.real_flow(centres)
    nan_features = features.clone()
    nan_features[7, 2] = float("nan")
    inf_features = features.clone()
    inf_features[4, 0] = float("-inf")
    return [
        ("int features", TypeError, "dtype", lambda: (features.to(torch.int32), labels, flow)),
        ("1-D features", ValueError, r"\[N, D\]", lambda: (features[:, 0], labels, flow)),
        ("int32 labels", TypeError, "int64", lambda: (features, labels.int(), flow)),
        ("short labels", ValueError, r"\[12\]", lambda: (features, labels[:-1], flow)),
        ("labels on another device", ValueError, "device|meta", lambda: (features, labels.to("meta"), flow)),
        ("label >= C", ValueError, r"labels\[5\]=3", lambda: (features, _set(labels, 5, 3), flow)),
        ("negative label", ValueError, r"labels\[2\]=-1", lambda: (features, _set(labels, 2, -1), flow)),
        ("NaN feature", ValueError, "row 7", lambda: (nan_features, labels, flow)),
        ("Inf feature", ValueError, "row 4", lambda: (inf_features, labels, flow)),
        ("flow D mismatch", ValueError, "D=5", lambda: (features, labels, flow[:, :4])),
        ("flow C = 1", ValueError, "C >= 2", lambda: (features, torch.zeros_like(labels), flow[:1])),
        ("flow 1-D", ValueError, r"\[C, D\]", lambda: (features, labels, flow[0])),
        ("float16 flow", TypeError, "real_flow", lambda: (features, labels, flow.half())),
    ]


def _set(t, i, v):
    t = t.clone()
    t[i] = v
    return t


@pytest.mark.parametrize("case", range(len(_bad_inputs())), ids=[c[0] for c in _bad_inputs()])
def test_sfm_loss_rejects_bad_input_before_any_launch(guarded_backend, case):
    _, error, pattern, make = _bad_inputs()[case]
    features, labels, flow = make()
    with pytest.raises(error, match=pattern):
        ops.sfm_loss(features, labels, flow)


def test_class_sums_rejects_bad_input_before_any_launch(guarded_backend):
    features, labels, _ = make_problem(12, 3, 5)
    with pytest.raises(ValueError, match="C >= 2"):
        ops.class_sums(features, torch.zeros_like(labels), 1)
    with pytest.raises(TypeError, match="num_classes"):
        ops.class_sums(features, labels, 3.0)
    with pytest.raises(ValueError, match="out of range"):
        ops.class_sums(features, labels, 2)
    bad = features.clone()
    bad[9, 4] = float("inf")
    with pytest.raises(ValueError, match="row 9"):
        ops.class_sums(bad, labels, 3)
    with pytest.raises(ValueError, match="sorted_labels=True"):
        ops.class_sums(features, torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 1, 2]), 3, sorted_labels=True)
    with pytest.raises(TypeError, match="sorted_labels"):
        ops.class_sums(features, labels, 3, sorted_labels="yes")


def test_flow_loss_and_feature_grad_reject_bad_input_before_any_launch(guarded_backend):
    sums, counts = torch.randn(4, 6), torch.tensor([1, 2, 0, 3])
    flow = reference.real_flow(torch.randn(4, 6))
    with pytest.raises(ValueError, match="class 2 has no synthetic row"):
        ops.flow_loss_and_grad(sums, counts, flow)
    with pytest.raises(TypeError, match="counts"):
        ops.flow_loss_and_grad(sums, counts.int(), flow)
    with pytest.raises(ValueError, match="counts"):
        ops.flow_loss_and_grad(sums, counts[:3], flow)
    with pytest.raises(ValueError, match="3 classes"):
        ops.flow_loss_and_grad(sums, counts, flow[:3])
    with pytest.raises(TypeError, match="sums"):
        ops.flow_loss_and_grad(sums.half(), counts, flow)
    labels = torch.tensor([0, 1, 3, 3])
    good_counts = torch.tensor([1, 1, 1, 2])
    with pytest.raises(ValueError, match="scale"):
        ops.feature_grad(sums, good_counts, labels, scale=torch.ones(2))
    with pytest.raises(ValueError, match=r"labels\[2\]=7"):
        ops.feature_grad(sums, good_counts, torch.tensor([0, 1, 7]))
    with pytest.raises(TypeError, match="dtype"):
        ops.feature_grad(sums, good_counts, labels, dtype=torch.int8)


def test_empty_class_raises_after_class_sums_before_the_loss_kernel(monkeypatch):
    """The n_c >= 1 check needs the counts: it runs between the class-sum kernel and the loss kernel."""
    monkeypatch.delenv("SFMKERN_BACKEND", raising=False)
    launched = []
    real_class_sums = kernels.class_sums_triton

    def counting_class_sums(*args, **kwargs):
        launched.append("class_sums")
        return real_class_sums(*args, **kwargs)

    monkeypatch.setattr(kernels, "class_sums_triton", counting_class_sums)
    monkeypatch.setattr(kernels, "flow_loss_and_grad_triton", _launch_forbidden)
    features, _, centres = make_problem(12, 4, 5)
    labels = torch.tensor([0, 1, 3] * 4)  # class 2 has no row
    with pytest.raises(ValueError, match="class 2 has no synthetic row"):
        ops.sfm_loss(features.requires_grad_(True), labels, ops.real_flow(centres))
    assert launched == ["class_sums"]


def test_validate_env_is_parsed_strictly(monkeypatch):
    features, labels, centres = make_problem(12, 3, 5)
    monkeypatch.setenv("SFMKERN_VALIDATE", "yes")
    with pytest.raises(ValueError, match="SFMKERN_VALIDATE"):
        ops.sfm_loss(features, labels, ops.real_flow(centres))


# ------------------------------------------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
@pytest.mark.parametrize("mode", ("atomic", "sorted", "deterministic"))
def test_cuda_kernels_match_reference(dtype, mode):
    c, d, n = 1000, 768, 4001
    features, labels, centres = make_problem(n, c, d, dtype=dtype, sort=mode == "sorted")
    features, labels, centres = features.cuda(), labels.cuda(), centres.cuda()
    kwargs = {"sorted_labels": mode == "sorted", "deterministic": mode == "deterministic"}
    flow = ops.real_flow(centres)
    sums, counts = ops.class_sums(features, labels, c, **kwargs)
    sums64, counts64 = reference.class_sums(features.double(), labels, c)
    assert torch.equal(counts, counts64) and rel_err(sums, sums64) <= 1e-5
    z = features.clone().requires_grad_(True)
    loss = ops.sfm_loss(z, labels, flow, **kwargs)
    loss.backward()
    z64 = features.double().requires_grad_(True)
    loss64 = reference.sfm_loss(z64, labels, flow.double())
    loss64.backward()
    assert abs(loss.item() - loss64.item()) <= 1e-5 * loss64.item()
    assert rel_err(z.grad, z64.grad) <= (1e-5 if dtype == torch.float32 else 1e-2)
