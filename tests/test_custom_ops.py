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


# ---------------------------------------------------------------------------------------------------- eager fast path
# In plain eager mode the public functions run the ops' implementations through plain autograd.Functions instead of
# the dispatcher (sfmkern.ops, "eager fast path"). Same code, so the same bits as the registered ops, both backends.
def _fast_node(loss: torch.Tensor) -> str:
    return type(loss.grad_fn).__name__


@pytest.mark.parametrize("anchored", (False, True), ids=("plain", "anchor"))
@pytest.mark.parametrize("deterministic", (False, True), ids=("atomic", "det"))
@pytest.mark.parametrize("sorted_labels", (None, True, False), ids=("detect", "sorted", "unsorted"))
def test_eager_fast_path_equals_the_registered_op(backend, anchored, deterministic, sorted_labels):
    features, labels, flow, anchor = make_problem(41, 5, 12, sort=sorted_labels is True, seed=3)
    a, w = (anchor, 0.6) if anchored else (None, 0.0)
    upstream = torch.tensor(-1.75)  # a grad_output other than 1 reaches the gather

    z_fast = features.clone().requires_grad_(True)
    loss_fast = ops.sfm_loss(z_fast, labels, flow, deterministic=deterministic, sorted_labels=sorted_labels,
                             anchor=a, anchor_weight=w)
    assert _fast_node(loss_fast) == "_SFMLossFunctionBackward"  # the fast path was taken
    loss_fast.backward(upstream)
    z_op = features.clone().requires_grad_(True)
    loss_op, _, _ = torch.ops.sfmkern.sfm_loss(z_op, labels, flow, a, w, deterministic, sorted_labels, True)
    assert "GeneratedBackwardFor_sfmkern_sfm_loss" in _fast_node(loss_op)
    loss_op.backward(upstream)
    assert torch.equal(loss_fast, loss_op) and loss_fast.dtype == loss_op.dtype == torch.float32
    assert torch.equal(z_fast.grad, z_op.grad) and z_fast.grad.abs().max() > 0
    # ... and both equal the reference (not just each other).
    z_ref = features.double().requires_grad_(True)
    loss_ref = reference.sfm_loss(z_ref, labels, flow.double(), deterministic=deterministic, anchor=a,
                                  anchor_weight=w)
    (upstream.double() * loss_ref).backward()
    assert torch.allclose(loss_fast.double(), loss_ref, rtol=1e-5, atol=1e-6)
    assert torch.allclose(z_fast.grad.double(), z_ref.grad, rtol=1e-4, atol=1e-7)

    # Without a gradient to compute (no_grad; inputs not requiring grad) both give the same loss and no history.
    with torch.no_grad():
        plain = ops.sfm_loss(features, labels, flow, deterministic=deterministic, sorted_labels=sorted_labels,
                             anchor=a, anchor_weight=w)
    assert torch.equal(plain, loss_op.detach()) and plain.grad_fn is None

    x_fast = features.clone().requires_grad_(True)
    sums_fast, counts_fast = ops.class_sums(x_fast, labels, 5, deterministic=deterministic,
                                            sorted_labels=sorted_labels)
    assert _fast_node(sums_fast) == "_ClassSumsFunctionBackward" and not counts_fast.requires_grad
    x_op = features.clone().requires_grad_(True)
    sums_op, counts_op = torch.ops.sfmkern.class_sums(x_op, labels, 5, deterministic, sorted_labels)
    weights = torch.randn(5, 12, generator=torch.Generator().manual_seed(4))
    (sums_fast * weights).sum().backward()
    (sums_op * weights).sum().backward()
    assert torch.equal(sums_fast, sums_op) and torch.equal(counts_fast, counts_op)
    assert torch.equal(x_fast.grad, x_op.grad) and torch.equal(x_fast.grad, weights[labels])

    weight = 0.6 if anchored else 0.0
    fast = ops.flow_loss_and_grad(sums_op.detach(), counts_op, flow, anchor=a, anchor_weight=weight)
    slow = torch.ops.sfmkern.flow_loss_and_grad(sums_op.detach(), counts_op, flow, a, weight)
    assert all(torch.equal(f, s) for f, s in zip(fast, slow, strict=True)) and fast[1].is_contiguous()
    grad = fast[1]
    fast_rows = ops.feature_grad(grad, counts_op, labels, scale=upstream, dtype=torch.bfloat16)
    slow_rows = torch.ops.sfmkern.feature_grad(grad, counts_op, labels, upstream, torch.bfloat16)
    assert torch.equal(fast_rows, slow_rows) and fast_rows.dtype == torch.bfloat16


def test_fast_path_outputs_carry_no_history_where_the_op_promises_none(backend):
    features, labels, flow, anchor = make_problem(20, 4, 6)
    sums, counts = reference.class_sums(features, labels, 4)
    s = sums.clone().requires_grad_(True)
    loss, grad = ops.flow_loss_and_grad(s, counts, flow, anchor=anchor.requires_grad_(True), anchor_weight=0.5)
    assert loss.grad_fn is None and grad.grad_fn is None and not loss.requires_grad
    rows = ops.feature_grad(grad.requires_grad_(True), counts, labels, scale=torch.tensor(2.0, requires_grad=True))
    assert rows.grad_fn is None and not rows.requires_grad


def test_fast_path_backward_is_once_differentiable():
    features, labels, flow, _ = make_problem(16, 4, 5)
    z = features.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(ops.sfm_loss(z, labels, flow), z, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|does not require grad"):
        g.sum().backward()


def test_tracing_modes_and_subclasses_take_the_registered_op():
    """What the fast path must not see: under each of these the public function goes through torch.ops.sfmkern."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.proxy_tensor import make_fx
    from torch.utils._python_dispatch import TorchDispatchMode

    features, labels, flow, _ = make_problem(12, 3, 4)
    assert ops._eager(features, labels, flow, None)

    class Recording(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    with Recording() as mode:
        assert not ops._eager(features)
        ops.sfm_loss(features, labels, flow)
    assert "sfmkern.sfm_loss.default" in mode.ops
    with FakeTensorMode() as fake_mode:
        fake = fake_mode.from_tensor(features)
        loss = ops.sfm_loss(fake, fake_mode.from_tensor(labels), fake_mode.from_tensor(flow))
        assert loss.shape == () and not ops._eager(fake)
    graph = make_fx(lambda x, y, f: ops.sfm_loss(x, y, f))(features, labels, flow)
    assert "sfmkern.sfm_loss" in graph.code
    with torch.device("cpu"):  # a TorchFunctionMode
        assert not ops._eager(features)
        z = features.clone().requires_grad_(True)
        assert "GeneratedBackwardFor" in _fast_node(ops.sfm_loss(z, labels, flow))

    class Marked(torch.Tensor):
        pass

    assert not ops._eager(features.as_subclass(Marked))
    assert ops._eager(torch.nn.Parameter(features))


def test_torch_backend_runs_on_the_callers_thread(monkeypatch):
    """The reference's autograd runs inside the op without a helper thread: registered op and fast path, with and
    without inference mode (G from autograd, equal to the reference's computed outside any op)."""
    import threading

    monkeypatch.setenv("SFMKERN_BACKEND", "torch")

    def no_threads(self):
        raise AssertionError("sfmkern started a thread")

    monkeypatch.setattr(threading.Thread, "start", no_threads)
    features, labels, flow, anchor = make_problem(24, 4, 6)
    sums, counts = reference.class_sums(features, labels, 4)
    ref_loss, ref_grad = reference.flow_loss_and_grad(sums, counts, flow, anchor=anchor, anchor_weight=0.3)
    for infer in (False, True):
        with torch.inference_mode(infer):
            for loss, grad in (ops.flow_loss_and_grad(sums, counts, flow, anchor=anchor, anchor_weight=0.3),
                               torch.ops.sfmkern.flow_loss_and_grad(sums, counts, flow, anchor, 0.3)):
                assert torch.equal(loss, ref_loss) and torch.equal(grad, ref_grad)
    z = features.clone().requires_grad_(True)
    torch.ops.sfmkern.sfm_loss(z, labels, flow, None, 0.0, False, None, True)[0].backward()
    z_ref = features.clone().requires_grad_(True)
    reference.sfm_loss(z_ref, labels, flow).backward()
    assert torch.allclose(z.grad, z_ref.grad, rtol=1e-5, atol=1e-8) and z.grad.abs().max() > 0
