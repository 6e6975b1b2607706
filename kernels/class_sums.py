"""Per-class feature sums S_c = sum_{y_i = c} z_i and counts n_c, fused in one pass that reads the features once.

Two kernels: an atomic one for labels in any order (fp32 `atomic_add` into [C, D], counts in the same launch) and a
segmented, atomic-free one for labels grouped by class (a program owns a block of classes, finds each class's run of
rows in the sorted order with `searchsorted` offsets, and walks the runs side by side, one row per class per step). The
deterministic mode feeds the segmented kernel a stable sort of the labels, reading rows through the permutation: it is
bitwise reproducible without a [blocks, C, D] partial buffer. Features are upcast to the accumulator (fp32; fp64 for
fp64 inputs) before any atomic or dot. Offsets are int64. Limit: the segmented kernel takes as many steps as the
largest class in a block has rows, so it suits balanced classes (ImageNet: 732..1300 rows per class).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import gpu_launch, num_warps, pow2_block, tile


@triton.jit
def _class_sums_atomic_kernel(
    X_ptr,  # [n_rows, n_cols] features (fp32/bf16/fp16/fp64), unit column stride
    Y_ptr,  # [n_rows] int64 labels, any order
    SH_ptr,  # [n_cols] shift subtracted from every row, in the accumulator dtype (unused unless HAS_SHIFT)
    S_ptr,  # [num_classes, n_cols] zero-initialised sums (fp32, or fp64 for fp64 features), contiguous
    N_ptr,  # [num_classes] zero-initialised int64 counts
    n_rows,  # N
    n_cols,  # D
    num_classes,  # C
    stride_x_row,  # elements between feature rows (0 for an expanded row)
    stride_y,  # elements between labels (0 for expanded labels)
    HAS_SHIFT: tl.constexpr,  # sum z_i - shift instead of z_i
    BLOCK_N: tl.constexpr,  # rows per program
    BLOCK_D: tl.constexpr,  # columns per program
):
    pid_n = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    row_ok = rows < n_rows
    col_ok = cols < n_cols
    labels = tl.load(Y_ptr + rows * stride_y, mask=row_ok, other=-1)
    # Rows whose label is out of range (possible only with value checks off) are dropped, never written out of bounds.
    valid = row_ok & (labels >= 0) & (labels < num_classes)
    mask = valid[:, None] & col_ok[None, :]
    x = tl.load(X_ptr + rows[:, None] * stride_x_row + cols[None, :], mask=mask, other=0.0).to(S_ptr.dtype.element_ty)
    if HAS_SHIFT:
        x = x - tl.load(SH_ptr + cols, mask=col_ok, other=0.0)[None, :]
    tl.atomic_add(S_ptr + labels[:, None] * n_cols + cols[None, :], x, mask=mask, sem="relaxed")
    if pid_d == 0:  # each row is counted once, by the programs of the first column block
        ones = tl.full((BLOCK_N,), 1, tl.int64)
        tl.atomic_add(N_ptr + labels, ones, mask=valid, sem="relaxed")


@triton.jit
def _class_sums_segmented_kernel(
    X_ptr,  # [n_rows, n_cols] features, unit column stride
    P_ptr,  # [n_rows] int64 row order (a stable argsort of the labels); unused unless HAS_PERM
    OFF_ptr,  # [num_classes + 1] int64: sorted positions OFF[c] .. OFF[c+1] have label c
    SH_ptr,  # [n_cols] shift subtracted from every row, in the accumulator dtype (unused unless HAS_SHIFT)
    S_ptr,  # [num_classes, n_cols] sums, written (not accumulated), contiguous
    num_classes,  # C
    n_cols,  # D
    stride_x_row,  # elements between feature rows (0 for an expanded row)
    HAS_PERM: tl.constexpr,  # read rows through P (unsorted labels, deterministic mode)
    HAS_SHIFT: tl.constexpr,  # sum z_i - shift instead of z_i
    BLOCK_C: tl.constexpr,  # classes per program, summed side by side
    BLOCK_D: tl.constexpr,  # columns per program
):
    pid_c = tl.program_id(0)
    pid_d = tl.program_id(1)
    classes = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    cls_ok = classes < num_classes
    cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    col_ok = cols < n_cols
    starts = tl.load(OFF_ptr + classes, mask=cls_ok, other=0)
    sizes = tl.load(OFF_ptr + classes + 1, mask=cls_ok, other=0) - starts
    acc = tl.zeros((BLOCK_C, BLOCK_D), dtype=S_ptr.dtype.element_ty)
    if HAS_SHIFT:
        shift = tl.load(SH_ptr + cols, mask=col_ok, other=0.0)
    # Step j adds row j of every class in the block (one contiguous row slice per class): rows are summed in order,
    # with no atomics, so the result depends only on the row order.
    longest = tl.max(sizes, axis=0)
    j = 0
    while j < longest:  # a while loop: Triton 3.6's interpreter cannot take a runtime bound in range()
        pos = starts + j
        row_ok = j < sizes
        if HAS_PERM:
            rows = tl.load(P_ptr + pos, mask=row_ok, other=0)
        else:
            rows = pos
        ok = row_ok[:, None] & col_ok[None, :]
        x = tl.load(X_ptr + rows[:, None] * stride_x_row + cols[None, :], mask=ok, other=0.0).to(acc.dtype)
        if HAS_SHIFT:
            x = tl.where(ok, x - shift[None, :], 0.0)
        acc += x
        j += 1
    mask = cls_ok[:, None] & col_ok[None, :]
    tl.store(S_ptr + classes.to(tl.int64)[:, None] * n_cols + cols[None, :], acc, mask=mask)


def class_sums_triton(features: torch.Tensor, labels: torch.Tensor, num_classes: int, *,
                      deterministic: bool = False, sorted_labels: bool = False,
                      shift: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the class-sum kernels. Inputs are validated by `sfmkern.ops` (structure always, values when enabled).

    Args:
        features: [N, D] fp32/bf16/fp16/fp64, any strides (a column stride other than 1 is copied; row stride 0, i.e.
            an expanded row, is read in place).
        labels: [N] int64, any stride. `sorted_labels=True` promises non-decreasing labels (segmented path).
        num_classes: C. deterministic: for unsorted labels, sort them (stable) and use the segmented path.
        shift: optional [D] vector m: sum z_i - m instead of z_i (the loss passes a feature row, so that features
            sharing a large offset are summed as small, exactly formed differences).
    Returns:
        sums [C, D] fp32 (fp64 for fp64 features), counts [C] int64.

    Equivalent PyTorch:
        torch.zeros(C, D).index_add_(0, labels, features.float() - m), torch.bincount(labels, minlength=C)
    """
    if features.stride(1) != 1 and features.shape[1] > 1:
        features = features.contiguous()
    n_rows, n_cols = features.shape
    acc = torch.float64 if features.dtype == torch.float64 else torch.float32
    device = features.device
    on_gpu = gpu_launch(features)
    if shift is not None:
        shift = shift.reshape(n_cols).to(acc).contiguous()
    if not sorted_labels and not deterministic:
        sums = torch.zeros(num_classes, n_cols, dtype=acc, device=device)
        counts = torch.zeros(num_classes, dtype=torch.int64, device=device)
        block_n, block_d = tile(features, n_rows, n_cols, max_cols=512 if on_gpu else 1024)
        grid = (triton.cdiv(n_rows, block_n), triton.cdiv(n_cols, block_d))
        _class_sums_atomic_kernel[grid](
            X_ptr=features, Y_ptr=labels, SH_ptr=shift if shift is not None else sums, S_ptr=sums, N_ptr=counts,
            n_rows=n_rows, n_cols=n_cols, num_classes=num_classes, stride_x_row=features.stride(0),
            stride_y=labels.stride(0), HAS_SHIFT=shift is not None, BLOCK_N=block_n, BLOCK_D=block_d,
            num_warps=num_warps(block_n * block_d),
        )
        return sums, counts
    if sorted_labels:
        ordered, perm = labels.contiguous(), None
    else:
        ordered, perm = torch.sort(labels, stable=True)
    # Segment starts: offsets[c] = #labels < c, so out-of-range labels (value checks off) fall outside every segment.
    bounds = torch.arange(num_classes + 1, dtype=torch.int64, device=device)
    offsets = torch.searchsorted(ordered, bounds)
    counts = offsets[1:] - offsets[:-1]
    sums = torch.empty(num_classes, n_cols, dtype=acc, device=device)
    if on_gpu:  # many narrow programs: 16 classes x 64 columns
        block_c, block_d = 16, pow2_block(n_cols, 64)
    else:  # interpreter: few wide programs (each step is a handful of numpy calls)
        block_d = tile(features, 1, n_cols)[1]
        block_c = tile(features, num_classes, block_d)[0]
    grid = (triton.cdiv(num_classes, block_c), triton.cdiv(n_cols, block_d))
    _class_sums_segmented_kernel[grid](
        X_ptr=features, P_ptr=perm if perm is not None else ordered, OFF_ptr=offsets,
        SH_ptr=shift if shift is not None else sums, S_ptr=sums, num_classes=num_classes, n_cols=n_cols,
        stride_x_row=features.stride(0), HAS_PERM=perm is not None, HAS_SHIFT=shift is not None,
        BLOCK_C=block_c, BLOCK_D=block_d, num_warps=num_warps(block_c * block_d),
    )
    return sums, counts
