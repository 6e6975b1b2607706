"""Launch settings shared by the kernels: block sizes by formula and warps from one helper.

On a GPU a program owns a tile of about 4096 elements (32 fp32 registers per thread at 4 warps). A CPU tensor can only
reach a kernel under TRITON_INTERPRET=1, where every program is a round of numpy calls: there tiles grow to 2**16
elements so that the grid, and with it the interpreter's Python overhead, stays small.

`SFMKERN_GPU_LAUNCH=1` (read at every launch) makes the launchers pick the CUDA configuration for CPU tensors too:
exactly the block sizes, warps and program counts a GPU run gets, executed by the interpreter. The tests use it to run
the multi-block code paths that the interpreter's wide tiles would otherwise hide.
"""

from __future__ import annotations

import os

import torch
import triton

MIN_BLOCK = 16  # smallest block along any axis (tl.arange needs >= 16 for some layouts; keeps tiles regular)
_GPU_TILE = 4096  # elements per program on a GPU
_INTERPRETER_TILE = 1 << 16  # elements per program under the interpreter
GPU_LAUNCH_ENV = "SFMKERN_GPU_LAUNCH"


def gpu_launch(t: torch.Tensor) -> bool:
    """True when a launch on `t` uses the CUDA configuration: `t` is on a GPU, or SFMKERN_GPU_LAUNCH=1 forces it."""
    if t.device.type == "cuda":
        return True
    raw = os.environ.get(GPU_LAUNCH_ENV, "").strip()
    if raw in ("", "0"):
        return False
    if raw == "1":
        return True
    raise ValueError(f"{GPU_LAUNCH_ENV}={raw!r}: expected '0' or '1'")


def interpreted(t: torch.Tensor) -> bool:
    """True when a launch on `t` uses the interpreter's wide-tile configuration (see `gpu_launch`)."""
    return not gpu_launch(t)


def pow2_block(n: int, cap: int) -> int:
    """next_power_of_2(n) clamped to [MIN_BLOCK, cap]."""
    return max(MIN_BLOCK, min(int(cap), triton.next_power_of_2(max(int(n), 1))))


def tile(t: torch.Tensor, n_rows: int, n_cols: int, *, max_cols: int = 1024) -> tuple[int, int]:
    """(BLOCK_ROWS, BLOCK_COLS) for a 2-D tile over [n_rows, n_cols]: columns first (up to `max_cols`), then as many
    rows as fit the per-program element budget."""
    budget = _INTERPRETER_TILE if interpreted(t) else _GPU_TILE
    block_cols = pow2_block(n_cols, min(max_cols, budget // MIN_BLOCK))
    block_rows = pow2_block(n_rows, budget // block_cols)
    return block_rows, block_cols


def num_warps(block_elems: int) -> int:
    """4 warps up to 4096 elements per program, 8 above (ignored by the interpreter)."""
    return 8 if block_elems > 4096 else 4
