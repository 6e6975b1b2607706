"""Public ops of sfmkern: per-class feature sums and the fused SFM flow-matching loss, with backend dispatch.

Dispatch happens here and only here (`backend_for`): the Triton kernels of `sfmkern.kernels` for CUDA tensors, and
for CPU tensors when TRITON_INTERPRET=1 (set before the first op runs); `sfmkern.reference` (plain torch) otherwise.
`SFMKERN_BACKEND=triton|torch` overrides, read at every call. `sfmkern.kernels` (and with it triton) is imported only
when the Triton path is taken, and nothing here queries CUDA at import time.

Input checks (`sfmkern._validate`) run before any launch: structure always, values (labels in range, finite
features, every class present) by default on CPU and with `SFMKERN_VALIDATE=1` on CUDA, where they would cost host
syncs on the hot path. With value checks off the kernels stay memory-safe and a bad input shows up as a NaN loss.

`class_sums`, `sfm_loss`, `flow_loss_and_grad` and `feature_grad` are thin wrappers (argument types, constants
detached) around torch custom ops of the same names in the `sfmkern` namespace (`torch.ops.sfmkern.*`, registered at
import): dispatch and checks above run inside the op, when it runs, so they hold in eager mode and in a graph
compiled by `torch.compile`, which sees each op as one node (fullgraph=True compiles; see "registered ops" below).
In plain eager mode (`_eager`: not compiling or tracing, no dispatch/torch-function mode, no functorch transform,
plain tensors) the wrappers skip the dispatcher and run the same implementation through a plain autograd.Function:
same code, same results, a fraction of the host time (see "eager fast path" below).
"""

from __future__ import annotations

import os

import torch

from sfmkern import _validate, reference

BACKENDS = ("triton", "torch")
_BACKEND_ENV = "SFMKERN_BACKEND"

__all__ = ["BACKENDS", "backend_for", "class_sums", "feature_grad", "flow_loss_and_grad", "real_flow", "sfm_loss"]


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def backend_for(tensor: torch.Tensor) -> str:
    """"triton" or "torch": the backend that runs an op whose main input is `tensor`.

    CUDA tensors -> "triton"; CPU tensors -> "triton" when TRITON_INTERPRET=1, else "torch". The environment variable
    SFMKERN_BACKEND (read at call time) overrides: "triton" or "torch"; any other value raises ValueError, and so does
    "triton" for a CPU tensor without TRITON_INTERPRET=1 (Triton cannot run it).
    """
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"expected a torch.Tensor, got {type(tensor).__name__}")
    forced = os.environ.get(_BACKEND_ENV, "").strip()
    if forced:
        if forced not in BACKENDS:
            raise ValueError(f"{_BACKEND_ENV}={forced!r}: expected one of {BACKENDS}")
        if forced == "triton" and tensor.device.type != "cuda" and not _interpreting():
            raise ValueError(
                f"{_BACKEND_ENV}=triton but the tensor is on {tensor.device}: Triton runs CUDA tensors, or CPU tensors "
                "only with TRITON_INTERPRET=1"
            )
        return forced
    if tensor.device.type == "cuda":
        return "triton"
    return "triton" if tensor.device.type == "cpu" and _interpreting() else "torch"


def _kernels():
    import sfmkern.kernels as kernels  # lazy: triton is imported only on the Triton path

    return kernels


def _resolve_sorted(labels: torch.Tensor, sorted_labels: bool | None) -> bool:
    """None: detect non-decreasing labels where that is free (CPU); on CUDA assume unsorted (detecting would sync)."""
    if sorted_labels is not None:
        return bool(sorted_labels)
    if labels.numel() < 2:
        return True
    if labels.device.type == "cuda":
        return False
    return bool((labels[1:] >= labels[:-1]).all())


# ------------------------------------------------------------------------------------------------- registered ops
# The four ops are registered with `torch.library.custom_op` as sfmkern::class_sums, sfmkern::sfm_loss,
# sfmkern::flow_loss_and_grad and sfmkern::feature_grad, each with an explicit schema, a fake (meta) implementation
# that allocates exactly what the launchers and the reference return, and (class_sums, sfm_loss) `register_autograd`.
# `torch.compile` puts each op into its graph as one opaque node (no graph break) and traces its fake to learn shapes.
#
# Why custom_op and not `torch.library.triton_op` + `wrap_triton` (which would let Inductor see the kernels):
# - A triton_op's function is traced with FakeTensors (it is its own fake), so each kernel launch in it must go
#   through `wrap_triton`. Under TRITON_INTERPRET=1 the kernels are `InterpretedFunction`s: torch 2.14 returns them
#   unwrapped (pytorch/pytorch#185597: eager only, "the traceable wrapper path still requires JIT metadata"), so the
#   fake would run the interpreter on FakeTensors; torch 2.11, the GPU machines' release, predates that change and
#   raises "wrap_triton only works on functions annotated with triton.jit" (pytorch/pytorch#152868). So a triton_op
#   could be neither opchecked nor compiled on CPU, where the whole suite runs.
# - The ops do host-side work by design that a traced function cannot: value checks that read tensors (on by default
#   on CPU, SFMKERN_VALIDATE=1 on CUDA), sorted-label detection on CPU, and the backend choice from SFMKERN_BACKEND /
#   TRITON_INTERPRET read at every call. In a custom op all of this runs at call time, compiled or not.
# - Inductor cannot fuse into a user Triton kernel anyway; what it would gain is scheduling around three small
#   launches over [C, D] and one pass over the features, which already read each input once.
# custom_op (with an explicit schema), register_fake, register_autograd and opcheck are all in torch >= 2.4, so the
# same code runs on torch 2.11 (GPU machines) and 2.14 (here); nothing here is newer.

_CLASS_SUMS_SCHEMA = "(Tensor features, Tensor labels, int num_classes, bool deterministic, bool? sorted_labels) " \
                     "-> (Tensor, Tensor)"
_SFM_LOSS_SCHEMA = "(Tensor features, Tensor labels, Tensor real_flow, Tensor? anchor, float anchor_weight, " \
                   "bool deterministic, bool? sorted_labels, bool compute_grad) -> (Tensor, Tensor, Tensor)"
_FLOW_LOSS_SCHEMA = "(Tensor sums, Tensor counts, Tensor real_flow, Tensor? anchor, float anchor_weight) " \
                    "-> (Tensor, Tensor)"
_FEATURE_GRAD_SCHEMA = "(Tensor grad, Tensor? counts, Tensor labels, Tensor? scale, ScalarType dtype) -> Tensor"


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _reference_loss_and_grad(sums, counts, real_flow, anchor, anchor_weight: float):
    """reference.flow_loss_and_grad wherever the op runs, with G contiguous (autograd lays it out after the inputs).

    The reference defines G = dL/d mu~ by `torch.autograd.grad`, which needs autograd to record. Inside a registered
    op's implementation it would not: torch.library's autograd wrapper has excluded the autograd dispatch keys from
    the thread's dispatch state (and torch.inference_mode excludes them too). `torch.inference_mode(False)` puts those
    keys back for the duration (the reference turns grad mode on itself), on the caller's thread, device and stream;
    the results carry no history out.
    """
    with torch.inference_mode(False):
        loss, grad = reference.flow_loss_and_grad(sums, counts, real_flow, anchor=anchor, anchor_weight=anchor_weight)
    return loss, grad.contiguous()


def _fake_checks(first_name: str, first: torch.Tensor, ndim: int, **others: tuple[torch.Tensor | None, int | None]):
    """What a fake checks before it allocates: ranks (None: any), and one device for all tensors (a meta tensor among
    CPU ones would otherwise dispatch to the fake and return meta outputs). The real implementations check all."""
    for name, (t, rank) in {first_name: (first, ndim), **others}.items():
        if t is None:
            continue
        if rank is not None and t.dim() != rank:
            raise ValueError(f"{name}: expected {rank} dimensions, got shape {tuple(t.shape)}")
        if t.device != first.device:
            raise ValueError(f"{name}: on {t.device} but expected {first.device}")


def _anchor_active(anchor, anchor_weight: float, num_classes: int, n_cols: int, device: torch.device) -> bool:
    """Checks of the anchoring term (values when enabled); True when it contributes (anchor given, weight > 0)."""
    return _validate.validate_anchor(anchor, anchor_weight, num_classes, n_cols, device)


# The implementations: what each op does when it runs on real tensors. The registered ops and the eager fast path
# both call these, so the two paths run the same code.
def _class_sums_impl(features, labels, num_classes, deterministic, sorted_labels):
    if backend_for(features) == "torch":
        return reference.class_sums(features, labels, num_classes, deterministic=deterministic,
                                    sorted_labels=sorted_labels)
    _, _, c = _validate.validate_class_sums(features, labels, num_classes, sorted_labels)
    labels = labels.contiguous()  # the kernels read labels with unit stride
    is_sorted = _resolve_sorted(labels, sorted_labels)
    return _kernels().class_sums_triton(features, labels, c, deterministic=deterministic, sorted_labels=is_sorted)


def _flow_loss_and_grad_impl(sums, counts, real_flow, anchor, anchor_weight):
    if backend_for(sums) == "torch":
        return _reference_loss_and_grad(sums, counts, real_flow, anchor, anchor_weight)
    c, d = _validate.validate_flow_loss(sums, counts, real_flow)
    anchored = _anchor_active(anchor, anchor_weight, c, d, sums.device)
    return _kernels().flow_loss_and_grad_triton(sums, counts.contiguous(), real_flow,
                                                anchor=anchor if anchored else None,
                                                anchor_weight=anchor_weight if anchored else 0.0)


def _feature_grad_impl(grad, counts, labels, scale, dtype):
    if backend_for(grad) == "torch":
        return reference.feature_grad(grad, counts, labels, scale=scale, dtype=dtype).contiguous()
    _validate.validate_feature_grad(grad, counts, labels, scale, dtype)
    counts = None if counts is None else counts.contiguous()
    return _kernels().feature_grad_triton(grad, counts, labels.contiguous(), scale=scale, dtype=dtype)


def _shifted_anchor(anchor, anchored: bool, shift: torch.Tensor, dtype: torch.dtype):
    """A - z_0 (in float64, rounded once to `dtype`) when the anchoring term is active, else None."""
    if not anchored:
        return None
    return (anchor.to(torch.float64) - shift.to(torch.float64)).to(dtype)


def _sfm_loss_torch(features, labels, real_flow, anchor, anchor_weight, deterministic, sorted_labels, compute_grad):
    """The torch backend of sfmkern::sfm_loss: the references of class_sums and flow_loss_and_grad, composed on the
    features shifted by row 0, exactly as `reference.sfm_loss` forms its loss (same sums, same loss bits). Without
    compute_grad no autograd runs and G is returned as zeros."""
    _, d, c = _validate.validate_sfm_loss(features, labels, real_flow, sorted_labels)
    anchored = _anchor_active(anchor, anchor_weight, c, d, features.device)
    acc = _acc_dtype(features.dtype)
    shift = features[:1].to(acc)
    sums, counts = reference.class_sums(features.to(acc) - shift, labels, c, deterministic=deterministic,
                                        sorted_labels=sorted_labels)
    target = _shifted_anchor(anchor, anchored, shift[0], acc)
    weight = anchor_weight if anchored else 0.0
    if compute_grad:
        loss, grad = _reference_loss_and_grad(sums, counts, real_flow, target, weight)
        return loss, grad, counts
    _validate.validate_flow_loss(sums, counts, real_flow)  # what reference.flow_loss_and_grad checks first
    loss = reference.flow_loss(sums / counts.to(acc)[:, None], real_flow, target, weight)
    return loss, torch.zeros_like(sums), counts


def _sfm_loss_impl(features, labels, real_flow, anchor, anchor_weight, deterministic, sorted_labels, compute_grad):
    if backend_for(features) == "torch":
        return _sfm_loss_torch(features, labels, real_flow, anchor, anchor_weight, deterministic, sorted_labels,
                               compute_grad)
    kernels = _kernels()
    _, d, c = _validate.validate_sfm_loss(features, labels, real_flow, sorted_labels)
    anchored = _anchor_active(anchor, anchor_weight, c, d, features.device)
    labels = labels.contiguous()  # the kernels read labels with unit stride
    is_sorted = _resolve_sorted(labels, sorted_labels)
    # Sums of z_i - z_0: the flow and G are shift-invariant, and centred sums keep their accuracy when the features
    # share a large offset. The anchor is shifted alike.
    shift = features[0]
    sums, counts = kernels.class_sums_triton(features, labels, c, deterministic=deterministic, sorted_labels=is_sorted,
                                             shift=shift)
    if _validate.value_checks_enabled(features.device):  # needs the counts: after the class sums, before the loss
        _validate.check_counts_nonempty(counts)
    loss, grad = kernels.flow_loss_and_grad_triton(sums, counts, real_flow, compute_grad=compute_grad,
                                                   anchor=_shifted_anchor(anchor, anchored, shift, sums.dtype),
                                                   anchor_weight=anchor_weight if anchored else 0.0)
    return loss, grad, counts


# The backward formulas, shared by both paths: `feature_grad` is the registered op in the op's autograd formula (so a
# compiled backward graph holds it as a node) and the implementation itself in the eager autograd.Function.
def _class_sums_grad(ctx, grad_sums, feature_grad):
    """dL/dz_i = dL/dS_{y_i}: the gather, without the division by n_c (these are sums, not means)."""
    if not ctx.needs_input_grad[0]:
        return None
    (labels,) = ctx.saved_tensors
    return feature_grad(grad_sums, None, labels, None, ctx.features_dtype)


def _sfm_loss_grad(ctx, grad_loss, feature_grad):
    """dL/dz_i = grad_output * G[y_i] / n_{y_i}: one gather of the G saved by the forward."""
    if not ctx.needs_input_grad[0]:
        return None
    if not ctx.compute_grad:
        raise RuntimeError("sfmkern::sfm_loss ran with compute_grad=False, so it saved no gradient to go back with")
    grad, counts, labels = ctx.saved_tensors
    return feature_grad(grad, counts, labels, grad_loss, ctx.features_dtype)


# The registrations.
_class_sums_op = torch.library.custom_op("sfmkern::class_sums", _class_sums_impl, mutates_args=(),
                                         schema=_CLASS_SUMS_SCHEMA)


@_class_sums_op.register_fake
def _class_sums_fake(features, labels, num_classes, deterministic, sorted_labels):
    _fake_checks("features", features, 2, labels=(labels, 1))
    sums = features.new_empty((num_classes, features.shape[1]), dtype=_acc_dtype(features.dtype))
    return sums, features.new_empty((num_classes,), dtype=torch.int64)


def _class_sums_setup(ctx, inputs, output):
    features, labels = inputs[0], inputs[1]
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(labels)
    ctx.features_dtype = features.dtype


def _class_sums_backward(ctx, grad_sums, grad_counts):
    return _class_sums_grad(ctx, grad_sums, torch.ops.sfmkern.feature_grad), None, None, None, None


_class_sums_op.register_autograd(_class_sums_backward, setup_context=_class_sums_setup)

_flow_loss_and_grad_op = torch.library.custom_op("sfmkern::flow_loss_and_grad", _flow_loss_and_grad_impl,
                                                 mutates_args=(), schema=_FLOW_LOSS_SCHEMA)


@_flow_loss_and_grad_op.register_fake
def _flow_loss_and_grad_fake(sums, counts, real_flow, anchor, anchor_weight):
    _fake_checks("sums", sums, 2, counts=(counts, 1), real_flow=(real_flow, 2), anchor=(anchor, 2))
    return sums.new_empty((), dtype=sums.dtype), sums.new_empty(sums.shape, dtype=sums.dtype)


_feature_grad_op = torch.library.custom_op("sfmkern::feature_grad", _feature_grad_impl, mutates_args=(),
                                           schema=_FEATURE_GRAD_SCHEMA)


@_feature_grad_op.register_fake
def _feature_grad_fake(grad, counts, labels, scale, dtype):
    _fake_checks("G", grad, 2, counts=(counts, 1), labels=(labels, 1), scale=(scale, None))
    return grad.new_empty((labels.shape[0], grad.shape[1]), dtype=dtype)


_sfm_loss_op = torch.library.custom_op("sfmkern::sfm_loss", _sfm_loss_impl, mutates_args=(), schema=_SFM_LOSS_SCHEMA)


@_sfm_loss_op.register_fake
def _sfm_loss_fake(features, labels, real_flow, anchor, anchor_weight, deterministic, sorted_labels,
                   compute_grad):
    _fake_checks("features", features, 2, labels=(labels, 1), real_flow=(real_flow, 2), anchor=(anchor, 2))
    c, d = real_flow.shape[0], features.shape[1]
    acc = _acc_dtype(features.dtype)
    return (features.new_empty((), dtype=acc), features.new_empty((c, d), dtype=acc),
            features.new_empty((c,), dtype=torch.int64))


def _sfm_loss_setup(ctx, inputs, output):
    features, labels, compute_grad = inputs[0], inputs[1], inputs[7]
    _, grad, counts = output
    ctx.mark_non_differentiable(grad, counts)
    ctx.save_for_backward(grad, counts, labels)
    ctx.features_dtype = features.dtype
    ctx.compute_grad = compute_grad


def _sfm_loss_backward(ctx, grad_loss, grad_grad, grad_counts):
    return (_sfm_loss_grad(ctx, grad_loss, torch.ops.sfmkern.feature_grad), None, None, None, None, None, None,
            None)


_sfm_loss_op.register_autograd(_sfm_loss_backward, setup_context=_sfm_loss_setup)


# ----------------------------------------------------------------------------------------------- eager fast path
# A call through a registered op pays torch.library's Python machinery on every call, forward and backward: the
# dispatcher boxes the arguments into Python, the autograd kernel builds a generated autograd.Function around a
# redispatch (fill_defaults, keyset handling), the backend kernel enters the implementation through a
# torch._dynamo.disable wrapper (swapping the frame-evaluation hook in and out) and checks the outputs for aliasing.
# For a loss whose kernels take tens of microseconds on a GPU, that host time is the call. In plain eager mode,
# `_eager` holds and the public functions below call the implementations directly, through the two autograd.Functions
# here (the same setup and backward formulas as the registered ops). Everything else (torch.compile / Dynamo,
# make_fx and AOT tracing, FakeTensor, functionalization, any TorchDispatchMode (opcheck's included) or
# TorchFunctionMode, functorch transforms, torch.jit tracing, tensor subclasses) goes through the registered op,
# which is what those systems understand.
_PYTHON_KEY = torch._C.DispatchKey.Python


def _eager(*tensors) -> bool:
    """True when a public op may run its implementation directly (see above): plain eager mode, plain tensors."""
    if torch.compiler.is_compiling() or torch.jit.is_tracing():  # first: Dynamo folds this to True, traces no further
        return False
    if torch._C._dispatch_tls_is_dispatch_key_included(_PYTHON_KEY) or torch._C._are_functorch_transforms_active():
        return False  # a dispatch mode (FakeTensor, proxy, functional, user modes) or a functorch transform is active
    for t in tensors:
        if t is not None and type(t) is not torch.Tensor and type(t) is not torch.nn.Parameter:
            return False  # a subclass: its __torch_dispatch__ / __torch_function__ must see the op
    return not torch.overrides.has_torch_function(tensors)  # a TorchFunctionMode (e.g. `with torch.device(...)`)


class _ClassSumsFunction(torch.autograd.Function):
    """sfmkern::class_sums in eager mode: the same implementation, setup and backward, without the dispatcher."""

    @staticmethod
    def forward(ctx, features, labels, num_classes, deterministic, sorted_labels):
        output = _class_sums_impl(features, labels, num_classes, deterministic, sorted_labels)
        _class_sums_setup(ctx, (features, labels), output)
        return output

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_sums, grad_counts):
        return _class_sums_grad(ctx, grad_sums, _feature_grad_impl), None, None, None, None


class _SFMLossFunction(torch.autograd.Function):
    """sfmkern::sfm_loss in eager mode, returning the loss only (G and the counts stay in the context)."""

    @staticmethod
    def forward(ctx, features, labels, real_flow, anchor, anchor_weight, deterministic, sorted_labels, compute_grad):
        output = _sfm_loss_impl(features, labels, real_flow, anchor, anchor_weight, deterministic, sorted_labels,
                                compute_grad)
        _sfm_loss_setup(ctx, (features, labels, None, None, None, None, None, compute_grad), output)
        return output[0]

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss):
        return _sfm_loss_grad(ctx, grad_loss, _feature_grad_impl), None, None, None, None, None, None, None


# ---------------------------------------------------------------------------------------------------- public API
def _require_tensor(name: str, value, *, optional: bool = False) -> None:
    if value is None and optional:
        return
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(value).__name__}")


def _check_sorted_arg(sorted_labels) -> None:
    if sorted_labels not in (None, True, False):
        raise TypeError(f"sorted_labels: expected None or a bool, got {sorted_labels!r}")


def _anchor_weight_arg(anchor_weight) -> float:
    if isinstance(anchor_weight, bool) or not isinstance(anchor_weight, (int, float)):
        raise TypeError(f"anchor_weight: expected a float, got {type(anchor_weight).__name__}")
    return float(anchor_weight)


def class_sums(features: torch.Tensor, labels: torch.Tensor, num_classes: int, *, deterministic: bool = False,
               sorted_labels: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-class feature sums and counts in one pass over the features (the registered op sfmkern::class_sums).

    Args:
        features: [N, D] float32 / bfloat16 / float16 (float64 accepted: computed in float64), any strides. Any N, D;
            N*D may exceed 2**31.
        labels: [N] int64 in [0, num_classes), any order.
        num_classes: C >= 2.
        deterministic: bitwise reproducible sums (unsorted labels are stably sorted and summed segment by segment
            instead of with atomics).
        sorted_labels: True promises non-decreasing labels (atomic-free segmented kernel; verified when value checks
            are on); False forces the atomic kernel; None detects on CPU and assumes unsorted on CUDA (no sync).
    Returns:
        sums [C, D] float32 (float64 for float64 features), counts [C] int64 (0 for absent classes), both contiguous.
        Differentiable w.r.t. `features` (the backward is sfmkern::feature_grad, a gather of dL/dsums by label).

    Equivalent PyTorch:
        sums = torch.zeros(C, D).index_add_(0, labels, features.float())
        counts = torch.bincount(labels, minlength=C)
    """
    _require_tensor("features", features)
    _require_tensor("labels", labels)
    _validate.check_num_classes(num_classes)
    _check_sorted_arg(sorted_labels)
    if _eager(features, labels):
        return _ClassSumsFunction.apply(features, labels, num_classes, bool(deterministic), sorted_labels)
    return torch.ops.sfmkern.class_sums(features, labels, num_classes, bool(deterministic), sorted_labels)


def real_flow(real_centres: torch.Tensor) -> torch.Tensor:
    """The real statistical flow F_c = (sum_k mu_k - C mu_c) / (C - 1) (mean of the other centres minus mu_c).

    A run computes it once, so both backends use the same float64 torch arithmetic (exact to float32 rounding). Not a
    registered op: plain torch, which torch.compile traces like any other.

    Args:
        real_centres: [C, D] class centres mu (float32/bf16/fp16/float64), C >= 2.
    Returns:
        F [C, D] float32 (float64 when given float64); its rows sum to zero.

    Equivalent PyTorch:
        ((mu.sum(0) - mu) / (C - 1) - mu).float()
    """
    return reference.real_flow(real_centres)


def flow_loss_and_grad(sums: torch.Tensor, counts: torch.Tensor, real_flow: torch.Tensor, *,
                       anchor: torch.Tensor | None = None,
                       anchor_weight: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """The SFM loss from class sums (e.g. after an all-reduce) and G = dL/d mu~, with mu~ = sums / counts (the
    registered op sfmkern::flow_loss_and_grad).

    Args:
        sums: [C, D] float32 (or float64); counts: [C] int64 with every n_c >= 1; real_flow: [C, D] float32/float64.
        anchor: optional [C, D] float32/float64 target class means A; anchor_weight: lambda >= 0. With both,
            L += lambda * sum_c ||mu~_c - A_c||^2 / sum_c ||A_c - Abar||^2 (Abar = mean_c A_c) and G gains its gradient.
    Returns:
        loss: 0-dim (sums' dtype) = 1 - <F, F~> / (||F|| ||F~||) [+ the anchoring term]. G: [C, D] sums' dtype,
        contiguous. Neither carries autograd history: the inputs are treated as constants.

    Equivalent PyTorch:
        mu = (sums / counts[:, None]).requires_grad_()
        loss = sfmkern.reference.flow_loss(mu, real_flow, anchor, anchor_weight); G, = torch.autograd.grad(loss, mu)
    """
    _require_tensor("sums", sums)
    _require_tensor("counts", counts)
    _require_tensor("real_flow", real_flow)
    _require_tensor("anchor", anchor, optional=True)
    weight = _anchor_weight_arg(anchor_weight)
    args = (sums.detach(), counts, real_flow.detach(), None if anchor is None else anchor.detach(), weight)
    if _eager(*args[:4]):
        return _flow_loss_and_grad_impl(*args)
    return torch.ops.sfmkern.flow_loss_and_grad(*args)


def feature_grad(grad: torch.Tensor, counts: torch.Tensor | None, labels: torch.Tensor, *,
                 scale: torch.Tensor | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """dL/dz_i = scale * G[y_i] / n_{y_i}: spread a per-class-mean gradient back to feature rows (one gather; the
    registered op sfmkern::feature_grad, also the backward of class_sums and sfm_loss).

    Args:
        grad: G [C, D] float32/float64; counts: [C] int64 (None: no division, i.e. the gradient of class *sums*);
        labels: [N] int64 in [0, C); scale: 0-dim tensor (e.g. grad_output) or None; dtype: result dtype.
    Returns:
        [N, D] `dtype`, contiguous, without autograd history (a gradient, not a differentiable function of G).

    Equivalent PyTorch:
        (scale * grad[labels] / counts[labels, None]).to(dtype)
    """
    _require_tensor("G", grad)
    _require_tensor("counts", counts, optional=True)
    _require_tensor("labels", labels)
    _require_tensor("scale", scale, optional=True)
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype: expected a torch.dtype, got {type(dtype).__name__}")
    args = (grad.detach(), counts, labels, None if scale is None else scale.detach(), dtype)
    if _eager(*args[:4]):
        return _feature_grad_impl(*args)
    return torch.ops.sfmkern.feature_grad(*args)


def sfm_loss(features: torch.Tensor, labels: torch.Tensor, real_flow: torch.Tensor, *, deterministic: bool = False,
             sorted_labels: bool | None = None, anchor: torch.Tensor | None = None,
             anchor_weight: float = 0.0) -> torch.Tensor:
    """The SFM flow-matching loss of synthetic features against a real flow, differentiable w.r.t. `features` (the
    registered op sfmkern::sfm_loss; its autograd formula is one sfmkern::feature_grad).

    L = 1 - <vec F, vec F~> / (||F|| ||F~||) with F~ the flow of the synthetic class means (see sfmkern.reference).
    The forward reads the features once and computes dL/dmu~ alongside the loss (only when `features` requires grad);
    the backward writes dL/dz once (grad_output * G[y_i] / n_{y_i}). `real_flow` and `anchor` are constants (they
    receive no gradient). Under torch.compile the op is one node of the graph (fullgraph=True compiles).

    Args:
        features: [N, D] float32 / bfloat16 / float16 (float64: computed in float64) synthetic features, any strides,
            e.g. several augmented views per image as rows with the same label.
        labels: [N] int64; every class 0..C-1 needs at least one row.
        real_flow: [C, D] float32/float64 from `real_flow(real_centres)`.
        deterministic, sorted_labels: as in `class_sums`.
        anchor, anchor_weight: optional anchoring term, as in `flow_loss_and_grad`.
    Returns:
        0-dim float32 loss (float64 for float64 features).

    Equivalent PyTorch:
        sums, counts = class_sums(features, labels, C)
        sfmkern.reference.flow_loss(sums / counts[:, None], real_flow, anchor, anchor_weight)
    """
    _require_tensor("features", features)
    _require_tensor("labels", labels)
    _require_tensor("real_flow", real_flow)
    _require_tensor("anchor", anchor, optional=True)
    _check_sorted_arg(sorted_labels)
    weight = _anchor_weight_arg(anchor_weight)
    compute_grad = torch.is_grad_enabled() and features.requires_grad
    args = (features, labels, real_flow.detach(), None if anchor is None else anchor.detach(), weight,
            bool(deterministic), sorted_labels, compute_grad)
    if _eager(*args[:4]):
        return _SFMLossFunction.apply(*args)
    loss, _, _ = torch.ops.sfmkern.sfm_loss(*args)
    return loss
