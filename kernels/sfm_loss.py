"""The SFM flow-matching loss and its gradient from class sums, fused; plus the gather that turns it into dL/dz.

Forward = four small launches over [C, D] (never over the N feature rows): (1) per column block, the synthetic class
means (centred on class 0's mean), the synthetic flow F~ and the reductions <F, F~>, ||F||^2, ||F~||^2 (and, with an
anchor A, sum ||mu~ - A||^2 and sum ||A - Abar||^2) in one pass, each sum of squares scaled by its block's peak so
that nothing overflows; (2) one program: the global norms, cosine and anchoring term; (3) per tile, G = dL/d mu~ in
place of F~ plus a partial of the loss; (4) the loss. Partial sums are reduced in a fixed order, so the loss and G are
deterministic. The backward is one gather, dL/dz_i = g * G[y_i] / n_{y_i}, writing each feature gradient once, cast
to the features' dtype only at the store. Accumulation in fp32 (fp64 for fp64 inputs); an empty class makes the loss
NaN (the ops layer rejects it first when value checks are on).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import gpu_launch, num_warps, pow2_block, tile


@triton.jit
def _flow_stats_kernel(
    S_ptr,  # [num_classes, n_cols] class sums (fp32/fp64), contiguous
    N_ptr,  # [num_classes] int64 class counts, contiguous
    F_ptr,  # [num_classes, n_cols] real flow F (fp32/fp64), contiguous
    A_ptr,  # [num_classes, n_cols] anchor: target class means A, accumulator dtype (unused unless HAS_ANCHOR)
    FT_ptr,  # out [num_classes, n_cols]: synthetic flow F~, in the accumulator dtype
    FBAR_ptr,  # out [n_cols]: column means of F (zero for a flow made by real_flow, kept for any F)
    PART_ptr,  # out [num_programs, NUM_STATS]: this program's scaled reductions (see the layout below)
    num_classes,  # C
    n_cols,  # D
    HAS_ANCHOR: tl.constexpr,  # also reduce the anchoring term's two sums of squares
    NUM_STATS: tl.constexpr,  # row length of PART (8)
    BLOCK_C: tl.constexpr,  # classes per loop step
    BLOCK_D: tl.constexpr,  # columns per program
):
    # PART row of program p, over its columns; every sum of squares is taken of values divided by the program's own
    # peak (so nothing overflows or underflows for features near 1e30 or 1e-30), the peaks are stored beside them and
    # the consumers rescale each partial to the global peak (as LAPACK's nrm2 does):
    #   0: <F, F~> / (MR MS)   1: ||F||^2 / MR^2   2: ||F~||^2 / MS^2   3: MR = max|F|   4: MS (bounds |F~| / 4)
    #   5: sum ||mu~ - A||^2 / MA^2   6: sum ||A - Abar||^2 / MA^2   7: MA = max(|A - A_0|, |mu~ - A|)
    pid = tl.program_id(0)
    acc_ty = FT_ptr.dtype.element_ty
    cols = pid * BLOCK_D + tl.arange(0, BLOCK_D)
    col_ok = cols < n_cols
    # The flows are formed from means centred on class 0's mean (the flow is shift-invariant): with a large common
    # offset, sum_k mu~_k - C mu~_c would otherwise lose ~log10(C) digits to cancellation.
    n0 = tl.load(N_ptr).to(acc_ty)
    ref = tl.load(S_ptr + cols, mask=col_ok, other=0.0).to(acc_ty) / n0
    if HAS_ANCHOR:
        a_ref = tl.load(A_ptr + cols, mask=col_ok, other=0.0).to(acc_ty)
    mean_sum = tl.zeros((BLOCK_D,), dtype=acc_ty)  # sum_k (mu~_k - mu~_0) over this column block
    flow_sum = tl.zeros((BLOCK_D,), dtype=acc_ty)  # sum_k F_k
    anchor_sum = tl.zeros((BLOCK_D,), dtype=acc_ty)  # sum_k (A_k - A_0)
    peak_mean = tl.zeros((BLOCK_D,), dtype=acc_ty)  # max_k |mu~_k - mu~_0|
    peak_real = tl.zeros((BLOCK_D,), dtype=acc_ty)  # max_k |F_k|
    peak_anchor = tl.zeros((BLOCK_D,), dtype=acc_ty)  # max_k max(|A_k - A_0|, |mu~_k - A_k|)
    first = 0
    while first < num_classes:  # a while loop: Triton 3.6's interpreter cannot take a runtime bound in range()
        cls = first + tl.arange(0, BLOCK_C)
        first += BLOCK_C
        cls_ok = cls < num_classes
        mask = cls_ok[:, None] & col_ok[None, :]
        offs = cls.to(tl.int64)[:, None] * n_cols + cols[None, :]
        n = tl.load(N_ptr + cls, mask=cls_ok, other=1).to(acc_ty)
        mean = tl.load(S_ptr + offs, mask=mask, other=0.0).to(acc_ty) / n[:, None]
        centred = tl.where(mask, mean - ref[None, :], 0.0)
        real = tl.load(F_ptr + offs, mask=mask, other=0.0).to(acc_ty)
        mean_sum += tl.sum(centred, axis=0)
        flow_sum += tl.sum(real, axis=0)
        peak_mean = tl.maximum(peak_mean, tl.max(tl.abs(centred), axis=0))
        peak_real = tl.maximum(peak_real, tl.max(tl.abs(real), axis=0))
        if HAS_ANCHOR:
            a = tl.load(A_ptr + offs, mask=mask, other=0.0).to(acc_ty)
            a_centred = tl.where(mask, a - a_ref[None, :], 0.0)
            anchor_sum += tl.sum(a_centred, axis=0)
            dev = tl.where(mask, mean - a, 0.0)
            peak_anchor = tl.maximum(peak_anchor, tl.max(tl.maximum(tl.abs(a_centred), tl.abs(dev)), axis=0))
    tl.store(FBAR_ptr + cols, flow_sum / num_classes, mask=col_ok)
    # |F~_c| = |sum_k (mu~_k - mu~_0) - C (mu~_c - mu~_0)| / (C - 1) <= 2C/(C-1) MM <= 4 MM: MS = 4 MM bounds it.
    ms = 4.0 * tl.max(peak_mean, axis=0)
    mr = tl.max(peak_real, axis=0)
    inv_ms = 1.0 / tl.where(ms > 0, ms, 1.0)  # a zero peak means all-zero values: any divisor works
    inv_mr = 1.0 / tl.where(mr > 0, mr, 1.0)
    if HAS_ANCHOR:
        ma = tl.max(peak_anchor, axis=0)
        inv_ma = 1.0 / tl.where(ma > 0, ma, 1.0)
        anchor_mean = anchor_sum / num_classes  # Abar - A_0
    dot = tl.zeros((BLOCK_D,), dtype=acc_ty)
    sq_real = tl.zeros((BLOCK_D,), dtype=acc_ty)
    sq_syn = tl.zeros((BLOCK_D,), dtype=acc_ty)
    sq_dev = tl.zeros((BLOCK_D,), dtype=acc_ty)
    sq_spread = tl.zeros((BLOCK_D,), dtype=acc_ty)
    first = 0
    while first < num_classes:  # a while loop: Triton 3.6's interpreter cannot take a runtime bound in range()
        cls = first + tl.arange(0, BLOCK_C)
        first += BLOCK_C
        cls_ok = cls < num_classes
        mask = cls_ok[:, None] & col_ok[None, :]
        offs = cls.to(tl.int64)[:, None] * n_cols + cols[None, :]
        n = tl.load(N_ptr + cls, mask=cls_ok, other=1).to(acc_ty)
        mean = tl.load(S_ptr + offs, mask=mask, other=0.0).to(acc_ty) / n[:, None]
        # F~_c = nu~_c - mu~_c = (sum_k mu~_k - mu~_c) / (C - 1) - mu~_c = (sum_k mu~_k - C mu~_c) / (C - 1),
        # with every mu~ replaced by mu~ - mu~_0 (the shift cancels)
        syn = tl.where(mask, (mean_sum[None, :] - num_classes * (mean - ref[None, :])) / (num_classes - 1), 0.0)
        real = tl.load(F_ptr + offs, mask=mask, other=0.0).to(acc_ty)
        tl.store(FT_ptr + offs, syn, mask=mask)
        real_s = real * inv_mr
        syn_s = syn * inv_ms
        dot += tl.sum(real_s * syn_s, axis=0)
        sq_real += tl.sum(real_s * real_s, axis=0)
        sq_syn += tl.sum(syn_s * syn_s, axis=0)
        if HAS_ANCHOR:
            a = tl.load(A_ptr + offs, mask=mask, other=0.0).to(acc_ty)
            dev = tl.where(mask, mean - a, 0.0) * inv_ma
            spread = tl.where(mask, (a - a_ref[None, :]) - anchor_mean[None, :], 0.0) * inv_ma
            sq_dev += tl.sum(dev * dev, axis=0)
            sq_spread += tl.sum(spread * spread, axis=0)
    row = PART_ptr + pid * NUM_STATS
    tl.store(row + 0, tl.sum(dot, axis=0))
    tl.store(row + 1, tl.sum(sq_real, axis=0))
    tl.store(row + 2, tl.sum(sq_syn, axis=0))
    tl.store(row + 3, mr)
    tl.store(row + 4, ms)
    if HAS_ANCHOR:
        tl.store(row + 5, tl.sum(sq_dev, axis=0))
        tl.store(row + 6, tl.sum(sq_spread, axis=0))
        tl.store(row + 7, ma)


@triton.jit
def _combine_parts(PART_ptr, num_parts, COL: tl.constexpr, PEAK_COL: tl.constexpr, NUM_STATS: tl.constexpr,
                   BLOCK_P: tl.constexpr):
    """(sum_p PART[p, COL] * (peak_p / peak)^2, peak) with peak = max_p PART[p, PEAK_COL]: a scaled sum of squares
    over all programs, relative to the global peak."""
    parts = tl.arange(0, BLOCK_P)
    ok = parts < num_parts
    peaks = tl.load(PART_ptr + parts * NUM_STATS + PEAK_COL, mask=ok, other=0.0)
    peak = tl.max(peaks, axis=0)
    ratio = peaks / tl.where(peak > 0, peak, 1.0)
    return tl.sum(tl.load(PART_ptr + parts * NUM_STATS + COL, mask=ok, other=0.0) * ratio * ratio, axis=0), peak


@triton.jit
def _flow_norms_kernel(
    PART_ptr,  # [num_parts, NUM_STATS] partial reductions from _flow_stats_kernel
    W_ptr,  # 0-dim lambda in the accumulator dtype (unused unless HAS_ANCHOR)
    SC_ptr,  # out [NUM_SCALARS]: the global scalars of the loss and G (layout below)
    num_classes,  # C
    num_parts,  # programs of _flow_stats_kernel
    HAS_ANCHOR: tl.constexpr,  # also the anchoring term's scalars
    NUM_STATS: tl.constexpr,  # row length of PART
    BLOCK_P: tl.constexpr,  # >= num_parts
):
    # One program combines the partials into the scalars every tile of G needs (a' = ||F|| / MR, b' = ||F~|| / MS):
    #   0: 1/MR  1: 1/a'  2: 1/MS  3: 1/b'  4: cos = <F, F~>/(ab)  5: C / ((C-1) b)
    #   6: 2 lambda / spread'  7: 1/MA  8: lambda * dev' / spread'   (spread', dev': sums of squares / MA^2)
    sq_real, mr = _combine_parts(PART_ptr, num_parts, 1, 3, NUM_STATS, BLOCK_P)
    sq_syn, ms = _combine_parts(PART_ptr, num_parts, 2, 4, NUM_STATS, BLOCK_P)
    parts = tl.arange(0, BLOCK_P)
    parts_ok = parts < num_parts
    part_mr = tl.load(PART_ptr + parts * NUM_STATS + 3, mask=parts_ok, other=0.0)
    part_ms = tl.load(PART_ptr + parts * NUM_STATS + 4, mask=parts_ok, other=0.0)
    part_dot = tl.load(PART_ptr + parts * NUM_STATS + 0, mask=parts_ok, other=0.0)
    dot = tl.sum(part_dot * (part_mr / mr) * (part_ms / ms), axis=0)  # <F, F~> / (MR MS)
    norm_real = tl.sqrt(sq_real)
    norm_syn = tl.sqrt(sq_syn)
    tl.store(SC_ptr + 0, 1.0 / mr)
    tl.store(SC_ptr + 1, 1.0 / norm_real)
    tl.store(SC_ptr + 2, 1.0 / ms)
    tl.store(SC_ptr + 3, 1.0 / norm_syn)
    tl.store(SC_ptr + 4, dot / (norm_real * norm_syn))
    tl.store(SC_ptr + 5, num_classes / ((num_classes - 1) * (ms * norm_syn)))
    if HAS_ANCHOR:
        spread, ma = _combine_parts(PART_ptr, num_parts, 6, 7, NUM_STATS, BLOCK_P)
        dev, _ = _combine_parts(PART_ptr, num_parts, 5, 7, NUM_STATS, BLOCK_P)
        weight = tl.load(W_ptr)
        tl.store(SC_ptr + 6, 2.0 * weight / spread)
        tl.store(SC_ptr + 7, 1.0 / ma)
        tl.store(SC_ptr + 8, weight * (dev / spread))


@triton.jit
def _flow_grad_kernel(
    S_ptr,  # [num_classes, n_cols] class sums (read only when HAS_ANCHOR), contiguous
    N_ptr,  # [num_classes] int64 class counts (read only when HAS_ANCHOR), contiguous
    F_ptr,  # [num_classes, n_cols] real flow F, contiguous
    A_ptr,  # [num_classes, n_cols] anchor A (unused unless HAS_ANCHOR)
    FT_ptr,  # in: synthetic flow F~ [num_classes, n_cols]; out: G = dL/d mu~ (when WRITE_GRAD)
    FBAR_ptr,  # [n_cols] column means of F
    SC_ptr,  # [NUM_SCALARS] global scalars from _flow_norms_kernel
    LP_ptr,  # out [num_programs]: partial sums of ||F/||F|| - F~/||F~|| ||^2
    num_classes,  # C
    n_cols,  # D
    WRITE_GRAD: tl.constexpr,  # compute G (skipped when no input needs a gradient)
    HAS_ANCHOR: tl.constexpr,  # add the anchoring term's gradient
    BLOCK_C: tl.constexpr,  # classes per program
    BLOCK_D: tl.constexpr,  # columns per program
):
    pid_c = tl.program_id(0)
    pid_d = tl.program_id(1)
    acc_ty = FT_ptr.dtype.element_ty
    inv_mr = tl.load(SC_ptr + 0)
    inv_a = tl.load(SC_ptr + 1)
    cls = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    col_ok = cols < n_cols
    cls_ok = cls < num_classes
    mask = cls_ok[:, None] & col_ok[None, :]
    offs = cls.to(tl.int64)[:, None] * n_cols + cols[None, :]
    real = tl.load(F_ptr + offs, mask=mask, other=0.0).to(acc_ty)
    syn = tl.load(FT_ptr + offs, mask=mask, other=0.0)
    # Unit vectors u = F/||F||, v = F~/||F~||, each formed from values scaled by their peak.
    unit_real = (real * inv_mr) * inv_a
    unit_syn = (syn * tl.load(SC_ptr + 2)) * tl.load(SC_ptr + 3)
    # L = 1 - <F, F~>/(ab) = ||u - v||^2 / 2 (a = ||F||, b = ||F~||): the difference of unit vectors keeps the
    # loss's relative accuracy as L -> 0, where 1 - cos would cancel; an error in a or b only scales L by (1 + eps).
    diff = tl.where(mask, unit_real - unit_syn, 0.0)
    tl.store(LP_ptr + pid_c * tl.num_programs(1) + pid_d, tl.sum(tl.sum(diff * diff, axis=1), axis=0))
    if WRITE_GRAD:
        # Gradient. With cos = <u, v>: dL/dF~ = H = -(u - cos v) / b. The synthetic flow is linear in mu~:
        # F~ = -C/(C-1) P mu~, with P = I - 11^T/C the centring over classes (symmetric), hence
        # G = dL/dmu~ = -C/(C-1) P H = -C/(C-1) (H - colmean(H)). v is centred (its rows sum to zero), so
        # colmean(H) = -colmean(u)/b, and
        #     G = C / ((C-1) b) * (u - colmean(u) - cos v).
        # colmean(F) is zero for a flow from real_flow() (also centred); subtracting it keeps G exact for any F.
        unit_mean = (tl.load(FBAR_ptr + cols, mask=col_ok, other=0.0) * inv_mr) * inv_a
        grad = tl.load(SC_ptr + 5) * ((unit_real - unit_mean[None, :]) - tl.load(SC_ptr + 4) * unit_syn)
        if HAS_ANCHOR:
            # d/dmu~ of lambda sum ||mu~ - A||^2 / sum ||A - Abar||^2 = 2 lambda (mu~ - A) / spread, with both
            # sums scaled by 1/MA^2: (2 lambda / spread') ((mu~ - A) / MA) / MA.
            inv_ma = tl.load(SC_ptr + 7)
            n = tl.load(N_ptr + cls, mask=cls_ok, other=1).to(acc_ty)
            mean = tl.load(S_ptr + offs, mask=mask, other=0.0).to(acc_ty) / n[:, None]
            a = tl.load(A_ptr + offs, mask=mask, other=0.0).to(acc_ty)
            grad += tl.load(SC_ptr + 6) * (((mean - a) * inv_ma) * inv_ma)
        tl.store(FT_ptr + offs, grad, mask=mask)


@triton.jit
def _loss_finalize_kernel(
    LP_ptr,  # [num_loss_parts] partial sums of ||u - v||^2
    SC_ptr,  # [NUM_SCALARS] global scalars (the anchoring term's loss)
    L_ptr,  # out: 0-dim loss
    num_loss_parts,  # programs of _flow_grad_kernel
    HAS_ANCHOR: tl.constexpr,  # add lambda * sum ||mu~ - A||^2 / sum ||A - Abar||^2
    BLOCK_L: tl.constexpr,  # loss parts per loop step
):
    acc = tl.zeros((BLOCK_L,), dtype=L_ptr.dtype.element_ty)
    first = 0
    while first < num_loss_parts:  # see _flow_stats_kernel on while loops
        parts = first + tl.arange(0, BLOCK_L)
        first += BLOCK_L
        acc += tl.load(LP_ptr + parts, mask=parts < num_loss_parts, other=0.0)
    loss = 0.5 * tl.sum(acc, axis=0)
    if HAS_ANCHOR:
        loss += tl.load(SC_ptr + 8)
    tl.store(L_ptr, loss)


@triton.jit
def _feature_grad_kernel(
    G_ptr,  # [num_classes, n_cols] per-class gradient (fp32/fp64), contiguous
    N_ptr,  # [num_classes] int64 counts (unused unless HAS_COUNTS)
    Y_ptr,  # [n_rows] int64 labels, any stride
    SCALE_ptr,  # 0-dim scale, e.g. the upstream grad_output (unused unless HAS_SCALE)
    OUT_ptr,  # out [n_rows, n_cols] feature gradient, any float dtype, contiguous
    n_rows,  # N
    n_cols,  # D
    num_classes,  # C
    stride_y,  # elements between labels (0 for expanded labels)
    HAS_COUNTS: tl.constexpr,  # divide by n_{y_i}
    HAS_SCALE: tl.constexpr,  # multiply by *SCALE_ptr
    OUT_BF16: tl.constexpr,  # OUT is bf16 (rounded by hand, see below)
    BLOCK_N: tl.constexpr,  # rows per program
    BLOCK_D: tl.constexpr,  # columns per program
):
    pid_n = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    row_ok = rows < n_rows
    col_ok = cols < n_cols
    labels = tl.load(Y_ptr + rows * stride_y, mask=row_ok, other=0)
    valid = row_ok & (labels >= 0) & (labels < num_classes)  # out-of-range rows (checks off) get a zero gradient
    grad = tl.load(G_ptr + labels[:, None] * n_cols + cols[None, :], mask=valid[:, None] & col_ok[None, :], other=0.0)
    if HAS_COUNTS:
        n = tl.load(N_ptr + labels, mask=valid, other=1).to(grad.dtype)
        grad = grad / n[:, None]
    if HAS_SCALE:
        grad = grad * tl.load(SCALE_ptr).to(grad.dtype)
    out_mask = row_ok[:, None] & col_ok[None, :]
    # The only cast of the gradient to the features' dtype, rounding to nearest even (what a GPU's cvt.rn does).
    if OUT_BF16:
        # fp32 -> bf16 by hand: the interpreter's cast truncates, and its "rtne" mode drops the carry (both measured
        # at twice torch's error), so this is the one code path that rounds alike on a GPU and in the interpreter.
        # Keep the top 16 bits after adding 0x7FFF + (lowest kept bit): ties go to even; NaN stays NaN.
        bits = grad.to(tl.float32).to(tl.uint32, bitcast=True)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        rounded = tl.where(grad != grad, bits >> 16, rounded)
        out = rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        out = grad.to(OUT_ptr.dtype.element_ty)
    tl.store(OUT_ptr + rows[:, None] * n_cols + cols[None, :], out, mask=out_mask)


NUM_STATS = 8  # row length of the partial-reduction buffer (layout in _flow_stats_kernel)
NUM_SCALARS = 9  # the global scalars (layout in _flow_norms_kernel)


def flow_loss_and_grad_triton(sums: torch.Tensor, counts: torch.Tensor, real_flow: torch.Tensor, *,
                              compute_grad: bool = True, anchor: torch.Tensor | None = None,
                              anchor_weight: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the fused loss kernels. Inputs are validated by `sfmkern.ops`.

    Args:
        sums: [C, D] fp32/fp64 class sums; counts: [C] int64 (every n_c >= 1); real_flow: [C, D] fp32/fp64; any
            strides (copied to contiguous: they are C x D, never N x D).
        compute_grad: write G (otherwise the returned buffer holds the synthetic flow F~ and must not be used).
        anchor: optional [C, D] target class means A, with anchor_weight lambda: the loss gains
            lambda * sum_c ||mu~_c - A_c||^2 / sum_c ||A_c - Abar||^2 and G its gradient, in the same passes.
    Returns:
        loss: 0-dim, sums' dtype. G: [C, D] sums' dtype, G = dL/d mu~ with mu~ = sums / counts.

    Equivalent PyTorch:
        mu = (sums / counts[:, None]).requires_grad_()
        loss = sfmkern.reference.flow_loss(mu, real_flow, anchor, anchor_weight)
        G, = torch.autograd.grad(loss, mu)
    """
    sums = sums.contiguous()
    counts = counts.contiguous()
    acc = sums.dtype
    real_flow = real_flow.to(acc).contiguous()
    has_anchor = anchor is not None and anchor_weight != 0
    anchor = anchor.to(acc).contiguous() if has_anchor else sums
    num_classes, n_cols = sums.shape
    device = sums.device
    on_gpu = gpu_launch(sums)
    syn_flow = torch.empty_like(sums)  # becomes G in place
    flow_mean = torch.empty(n_cols, dtype=acc, device=device)
    # (1) Column blocks, each looping over all classes: narrow on a GPU for parallelism, one block in the interpreter.
    stats_d = pow2_block(n_cols, 32) if on_gpu else tile(sums, 1, n_cols)[1]
    stats_c = pow2_block(num_classes, 128) if on_gpu else tile(sums, num_classes, stats_d)[0]
    num_parts = triton.cdiv(n_cols, stats_d)
    parts = torch.zeros(num_parts, NUM_STATS, dtype=acc, device=device)
    _flow_stats_kernel[(num_parts,)](
        S_ptr=sums, N_ptr=counts, F_ptr=real_flow, A_ptr=anchor, FT_ptr=syn_flow, FBAR_ptr=flow_mean,
        PART_ptr=parts, num_classes=num_classes, n_cols=n_cols, HAS_ANCHOR=has_anchor, NUM_STATS=NUM_STATS,
        BLOCK_C=stats_c, BLOCK_D=stats_d, num_warps=num_warps(stats_c * stats_d),
    )
    # (2) One program: the global scalars (norms, cosine, anchoring term) from the partials.
    weight = torch.full((), float(anchor_weight) if has_anchor else 0.0, dtype=acc, device=device)  # no host copy
    scalars = torch.zeros(NUM_SCALARS, dtype=acc, device=device)
    _flow_norms_kernel[(1,)](
        PART_ptr=parts, W_ptr=weight, SC_ptr=scalars, num_classes=num_classes, num_parts=num_parts,
        HAS_ANCHOR=has_anchor, NUM_STATS=NUM_STATS, BLOCK_P=pow2_block(num_parts, 1 << 30), num_warps=4,
    )
    # (3) Tiles over [C, D]: G and the loss partials.
    block_c, block_d = tile(sums, num_classes, n_cols, max_cols=256 if on_gpu else 1024)
    grid = (triton.cdiv(num_classes, block_c), triton.cdiv(n_cols, block_d))
    loss_parts = torch.empty(grid[0] * grid[1], dtype=acc, device=device)
    _flow_grad_kernel[grid](
        S_ptr=sums, N_ptr=counts, F_ptr=real_flow, A_ptr=anchor, FT_ptr=syn_flow, FBAR_ptr=flow_mean,
        SC_ptr=scalars, LP_ptr=loss_parts, num_classes=num_classes, n_cols=n_cols, WRITE_GRAD=compute_grad,
        HAS_ANCHOR=has_anchor, BLOCK_C=block_c, BLOCK_D=block_d, num_warps=num_warps(block_c * block_d),
    )
    # (4) The loss.
    loss = torch.empty((), dtype=acc, device=device)
    _loss_finalize_kernel[(1,)](
        LP_ptr=loss_parts, SC_ptr=scalars, L_ptr=loss, num_loss_parts=loss_parts.numel(), HAS_ANCHOR=has_anchor,
        BLOCK_L=pow2_block(loss_parts.numel(), 32), num_warps=4,  # a loop over the parts (one program)
    )
    return loss, syn_flow


def feature_grad_triton(grad: torch.Tensor, counts: torch.Tensor | None, labels: torch.Tensor, *,
                        scale: torch.Tensor | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Launch the gather: out[i] = scale * grad[labels[i]] / counts[labels[i]] (each factor optional).

    Args:
        grad: [C, D] fp32/fp64; counts: [C] int64 or None; labels: [N] int64; scale: 0-dim tensor or None.
    Returns:
        [N, D] `dtype`, contiguous.

    Equivalent PyTorch:
        (scale * grad[labels] / counts[labels, None]).to(dtype)
    """
    grad = grad.contiguous()
    counts = counts.contiguous() if counts is not None else None
    num_classes, n_cols = grad.shape
    n_rows = labels.shape[0]
    out = torch.empty(n_rows, n_cols, dtype=dtype, device=grad.device)
    if n_rows == 0:
        return out
    block_n, block_d = tile(grad, n_rows, n_cols, max_cols=512 if gpu_launch(grad) else 1024)
    grid = (triton.cdiv(n_rows, block_n), triton.cdiv(n_cols, block_d))
    _feature_grad_kernel[grid](
        G_ptr=grad, N_ptr=counts if counts is not None else labels, Y_ptr=labels,
        SCALE_ptr=scale if scale is not None else grad, OUT_ptr=out, n_rows=n_rows, n_cols=n_cols,
        num_classes=num_classes, stride_y=labels.stride(0), HAS_COUNTS=counts is not None,
        HAS_SCALE=scale is not None, OUT_BF16=dtype == torch.bfloat16, BLOCK_N=block_n, BLOCK_D=block_d,
        num_warps=num_warps(block_n * block_d),
    )
    return out
