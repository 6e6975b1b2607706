"""The ops as registered torch custom ops: schemas, `torch.library.opcheck`, and torch.compile without graph breaks.

opcheck runs each op through its schema check (no mutation or aliasing of inputs), its fake (output shapes, dtypes and
strides equal to the real implementation's), its autograd registration, and an AOT-dispatch trace with dynamic shapes
compared against eager (values and gradients). Each op is checked with both backends on CPU: "torch" (the reference)
and "triton" (the kernels under TRITON_INTERPRET=1, set by conftest), and with dense inputs in several layouts
(contiguous, column-major, row- and column-strided views, expanded rows, strided labels and counts).

The compile tests use backend="aot_eager": Dynamo captures the whole function into one graph (fullgraph=True fails on
any graph break) and AOT autograd traces forward and backward through the ops' fakes and autograd formulas, which is
everything a graph break would come from. Inductor on CPU would add only its C++ code generation around the opaque op
nodes, at ~90 s per compile on this 2-core machine (7 s for aot_eager).
"""

from __future__ import annotations

import pytest
import sfmkern.kernels as kernels
import torch

from sfmkern import ops, reference

BACKENDS = ("torch", "triton")
LAYOUTS = ("contiguous", "column_major", "row_strided", "col_strided")


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    monkeypatch.setenv("SFMKERN_BACKEND", request.param)
    monkeypatch.delenv("SFMKERN_VALIDATE", raising=False)
    return request.param


def layout(x: torch.Tensor, kind: str) -> torch.Tensor:
    """The same values as `x` [R, K] in another dense layout, in a fresh buffer (a leaf)."""
    if kind == "contiguous":
        return x.clone()
    if kind == "column_major":
        return x.t().contiguous().t()
    if kind == "row_strided":  # every other row of a taller buffer
        buf = torch.full((2 * x.shape[0], x.shape[1]), float("nan"), dtype=x.dtype)
        buf[::2] = x
        return buf[::2]
    if kind == "col_strided":  # every other column of a wider buffer
        buf = torch.full((x.shape[0], 2 * x.shape[1]), float("nan"), dtype=x.dtype)
        buf[:, ::2] = x
        return buf[:, ::2]
    raise ValueError(kind)


def strided_1d(x: torch.Tensor) -> torch.Tensor:
    """x as a stride-2 view (padding that would be out of range if read)."""
    buf = torch.full((2 * x.shape[0],), 10**6, dtype=x.dtype)
    buf[::2] = x
    return buf[::2]


def make_problem(n: int, c: int, d: int, *, dtype=torch.float32, sort: bool = False, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    labels = torch.cat([torch.arange(c), torch.randint(0, c, (n - c,), generator=gen)])
    labels = labels.sort().values if sort else labels[torch.randperm(n, generator=gen)]
    features = (torch.randn(n, d, generator=gen) + 0.5).to(dtype)
    flow = reference.real_flow(torch.randn(c, d, generator=gen))
    anchor = torch.randn(c, d, generator=gen)
    return features, labels, flow, anchor


# ------------------------------------------------------------------------------------------------------- registration
def test_ops_are_registered_with_their_schemas():
    schemas = {name: str(getattr(torch.ops.sfmkern, name).default._schema)
               for name in ("class_sums", "sfm_loss", "flow_loss_and_grad", "feature_grad")}
    assert "int num_classes, bool deterministic, bool? sorted_labels) -> (Tensor, Tensor)" in schemas["class_sums"]
    assert "Tensor? anchor, float anchor_weight, bool deterministic, bool? sorted_labels, bool compute_grad)" \
        in schemas["sfm_loss"]
    assert "Tensor real_flow, Tensor? anchor, float anchor_weight) -> (Tensor, Tensor)" in schemas["flow_loss_and_grad"]
    assert "Tensor? counts, Tensor labels, Tensor? scale, ScalarType dtype) -> Tensor" in schemas["feature_grad"]
    for schema in schemas.values():  # functional: no input is written
        assert "!" not in schema


# ----------------------------------------------------------------------------------------------------------- opcheck
@pytest.mark.parametrize("kind", LAYOUTS)
def test_opcheck_class_sums(backend, kind):
    features, labels, _, _ = make_problem(37, 5, 11)
    x = layout(features, kind).requires_grad_(True)
    for labels_in, det, srt in ((labels, False, None), (strided_1d(labels), True, None),
                                (labels.sort().values, False, True)):
        torch.library.opcheck(torch.ops.sfmkern.class_sums, (x, labels_in, 5, det, srt))
    # Expanded rows (stride 0): every row the same feature vector.
    row = torch.randn(1, 11).expand(37, 11).requires_grad_(True)
    torch.library.opcheck(torch.ops.sfmkern.class_sums, (row, labels, 5, False, None))


@pytest.mark.parametrize("kind", LAYOUTS)
@pytest.mark.parametrize("anchored", (False, True), ids=("plain", "anchor"))
def test_opcheck_sfm_loss(backend, kind, anchored):
    features, labels, flow, anchor = make_problem(29, 4, 9)
    x = layout(features, kind).requires_grad_(True)
    a, w = (layout(anchor, kind), 0.75) if anchored else (None, 0.0)
    op = torch.ops.sfmkern.sfm_loss
    torch.library.opcheck(op, (x, labels, layout(flow, kind), a, w, False, None, True))
    torch.library.opcheck(op, (x, strided_1d(labels), flow, a, w, True, None, True))
    # compute_grad=False declares that no backward follows (the G output is then unspecified and backward raises, see
    # test_backward_without_a_saved_gradient_raises); the AOT check would force one, so only schema and fake run.
    torch.library.opcheck(op, (features, labels, flow, a, w, False, False, False),
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("kind", LAYOUTS)
def test_opcheck_flow_loss_and_grad(backend, kind):
    features, labels, flow, anchor = make_problem(40, 6, 13)
    sums, counts = reference.class_sums(features, labels, 6)
    op = torch.ops.sfmkern.flow_loss_and_grad
    torch.library.opcheck(op, (layout(sums, kind), strided_1d(counts), layout(flow, kind), None, 0.0))
    torch.library.opcheck(op, (layout(sums, kind), counts, flow, layout(anchor, kind), 1.5))
    torch.library.opcheck(op, (sums.double(), counts, flow.double(), anchor.double(), 0.25))


@pytest.mark.parametrize("kind", LAYOUTS)
def test_opcheck_feature_grad(backend, kind):
    _, labels, _, _ = make_problem(33, 5, 7)
    grad = torch.randn(5, 7)
    counts = torch.bincount(labels, minlength=5)
    op = torch.ops.sfmkern.feature_grad
    torch.library.opcheck(op, (layout(grad, kind), counts, labels, torch.tensor(-2.5), torch.float32))
    torch.library.opcheck(op, (layout(grad, kind), strided_1d(counts), strided_1d(labels), None, torch.bfloat16))
    torch.library.opcheck(op, (grad.double(), None, labels, torch.tensor([0.5], dtype=torch.float64), torch.float16))


def test_registered_ops_match_the_reference(backend):
    """What opcheck cannot see: the values. Every layout gives the reference's result."""
    features, labels, flow, anchor = make_problem(31, 4, 10, dtype=torch.float64)
    ref_sums, ref_counts = reference.class_sums(features, labels, 4)
    ref_loss, ref_grad = reference.flow_loss_and_grad(ref_sums, ref_counts, flow.double(), anchor=anchor.double(),
                                                      anchor_weight=0.5)
    z_ref = features.clone().requires_grad_(True)
    reference.sfm_loss(z_ref, labels, flow.double(), anchor=anchor.double(), anchor_weight=0.5).backward()
    for kind in LAYOUTS:
        sums, counts = torch.ops.sfmkern.class_sums(layout(features, kind), strided_1d(labels), 4, False, None)
        assert torch.equal(counts, ref_counts) and torch.allclose(sums, ref_sums, rtol=1e-12, atol=1e-12)
        loss, grad = torch.ops.sfmkern.flow_loss_and_grad(layout(ref_sums, kind), strided_1d(ref_counts),
                                                          layout(flow.double(), kind), layout(anchor.double(), kind),
                                                          0.5)
        assert torch.allclose(loss, ref_loss, rtol=1e-12) and torch.allclose(grad, ref_grad, rtol=1e-10, atol=1e-14)
        z = layout(features, kind).requires_grad_(True)
        ops.sfm_loss(z, strided_1d(labels), flow.double(), anchor=anchor.double(), anchor_weight=0.5).backward()
        assert torch.allclose(z.grad, z_ref.grad, rtol=1e-10, atol=1e-14)


def test_backward_without_a_saved_gradient_raises():
    features, labels, flow, _ = make_problem(12, 3, 4)
    z = features.clone().requires_grad_(True)
    loss, _, _ = torch.ops.sfmkern.sfm_loss(z, labels, flow, None, 0.0, False, None, False)
    with pytest.raises(RuntimeError, match="compute_grad=False"):
        loss.backward()


def test_torch_backend_without_gradient_runs_under_inference_mode(monkeypatch):
    monkeypatch.setenv("SFMKERN_BACKEND", "torch")
    features, labels, flow, _ = make_problem(20, 4, 6)
    with torch.inference_mode():
        loss = ops.sfm_loss(features, labels, flow)
    assert loss.item() == reference.sfm_loss(features, labels, flow).item()


# ----------------------------------------------------------------------------------------------------- torch.compile
def _step(weight, images, labels, flow, anchor):
    """A distillation-like step: features from a differentiable map, the SFM loss (anchored), a scale."""
    features = torch.tanh(images @ weight)
    return 3.0 * ops.sfm_loss(features, labels, flow, anchor=anchor, anchor_weight=0.25)


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_compile_fullgraph_matches_eager_and_dispatches_at_run_time(backend_name, monkeypatch):
    monkeypatch.setenv("SFMKERN_BACKEND", backend_name)
    monkeypatch.delenv("SFMKERN_VALIDATE", raising=False)
    torch._dynamo.reset()
    images, labels, flow, anchor = make_problem(48, 6, 16, seed=1)
    weight = torch.randn(16, 16) / 4
    compiled = torch.compile(_step, fullgraph=True, backend="aot_eager")

    x = images.clone().requires_grad_(True)
    loss = compiled(weight, x, labels, flow, anchor)
    loss.backward()
    x_eager = images.clone().requires_grad_(True)
    loss_eager = _step(weight, x_eager, labels, flow, anchor)
    loss_eager.backward()
    assert torch.allclose(loss, loss_eager, rtol=1e-6, atol=0)
    assert torch.allclose(x.grad, x_eager.grad, rtol=1e-5, atol=1e-9)
    assert loss.item() > 0 and x.grad.abs().max() > 0

    # Dynamo sees one graph with the registered op as a node of it.
    explanation = torch._dynamo.explain(_step)(weight, x, labels, flow, anchor)
    assert explanation.graph_count == 1 and explanation.graph_break_count == 0
    assert "sfmkern.sfm_loss" in explanation.graphs[0].code

    # The op runs its checks and its backend choice when called, not when traced: the compiled function (same shapes,
    # no recompilation) rejects an out-of-range label and follows SFMKERN_BACKEND set after compilation.
    bad = labels.clone()
    bad[5] = 6
    with pytest.raises(ValueError, match=r"labels\[5\]=6"):
        compiled(weight, images, bad, flow, anchor)
    launched = []
    real_launcher = kernels.flow_loss_and_grad_triton

    def counting_launcher(*args, **kwargs):
        launched.append(1)
        return real_launcher(*args, **kwargs)

    monkeypatch.setattr(kernels, "flow_loss_and_grad_triton", counting_launcher)
    for name, expected in (("torch", 0), ("triton", 1)):
        launched.clear()
        monkeypatch.setenv("SFMKERN_BACKEND", name)
        again = compiled(weight, images.clone().requires_grad_(True), labels, flow, anchor)
        assert len(launched) == expected
        assert torch.allclose(again, loss_eager, rtol=1e-5)
