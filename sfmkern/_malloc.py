"""glibc's malloc set up for tensor work on the CPU, so that a CPU phase does not spend half its time in the kernel.

PyTorch's CPU allocator takes tensors from malloc. glibc serves every block above its mmap threshold (128 KiB,
growing to at most 32 MiB) with a fresh mmap and gives it back with munmap on free, and it returns free memory at the
top of the heap to the system beyond its trim threshold. A distillation step allocates and frees the same large
activations every step, so each one is mapped, zero-filled page by page and unmapped again: on the 2-core CPU
machine a step of the demo's backbone (EfficientNet-Lite0 at 128 px, 100 images) spent 3.3-4.1 s of system time in
~0.9M page faults against 3.9 s of user time, and the full demo 780 s of system time against 1015 s of user time.
With both thresholds at 1 GiB the same step took 0.05-0.13 s of system time and ran 1.7-1.8x faster (wall), for
5-10% more peak RSS (memory freed stays in the process, up to 1 GiB at the top of the heap).

`configure()` applies that once per process, on the first CPU-heavy phase (`_threads.cpu_phase`), never at import.
It does nothing when the user has chosen: any of MALLOC_MMAP_THRESHOLD_, MALLOC_TRIM_THRESHOLD_, MALLOC_TOP_PAD_,
MALLOC_MMAP_MAX_ set, a glibc.malloc tunable in GLIBC_TUNABLES, another allocator in LD_PRELOAD, or
SFMKERN_MALLOC=off; nor outside glibc (musl, macOS, Windows). `describe()` says what happened.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

SWITCH_ENV = "SFMKERN_MALLOC"
THRESHOLD_BYTES = 1 << 30
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_USER_ENVS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_")
_OFF = ("off", "0", "no", "false", "none")

_state: dict = {"result": None}


def env_switched_off(name: str) -> bool:
    """True when environment variable `name` says off (off, 0, no, false, none; any case): sfmkern's opt-outs
    (SFMKERN_MALLOC here, SFMKERN_THREADS in sfmkern._threads)."""
    return os.environ.get(name, "").strip().lower() in _OFF


def _user_choice() -> str | None:
    """Why malloc must be left alone (a one-line reason), or None."""
    if env_switched_off(SWITCH_ENV):
        return f"{SWITCH_ENV}=off"
    for name in _USER_ENVS:
        if name in os.environ:
            return f"{name} set by the user"
    if "glibc.malloc" in os.environ.get("GLIBC_TUNABLES", ""):
        return "a glibc.malloc tunable set by the user"
    preload = os.environ.get("LD_PRELOAD", "")
    if any(name in preload for name in ("jemalloc", "tcmalloc", "mimalloc")):
        return "another allocator preloaded"
    return None


def _glibc():
    """The C library as a ctypes handle when it is glibc with mallopt, else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version  # noqa: B018  (glibc only: AttributeError elsewhere)
        libc.mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
        libc.mallopt.restype = ctypes.c_int
    except (OSError, AttributeError):
        return None
    return libc


def configure() -> str:
    """Set glibc's mmap and trim thresholds to `THRESHOLD_BYTES` unless the user chose otherwise (see the module
    docstring). Idempotent; returns (and records for `describe()`) what was done."""
    if _state["result"] is not None:
        return _state["result"]
    reason = _user_choice()
    libc = None if reason else _glibc()
    if reason:
        result = f"left alone ({reason})"
    elif libc is None:
        result = "left alone (not glibc)"
    else:
        ok = libc.mallopt(_M_MMAP_THRESHOLD, THRESHOLD_BYTES) == 1
        ok = libc.mallopt(_M_TRIM_THRESHOLD, THRESHOLD_BYTES) == 1 and ok
        result = ("mmap and trim thresholds set to 1 GiB" if ok
                  else "left alone (glibc refused the thresholds)")
    _state["result"] = result
    return result


def describe() -> str:
    """One line: what sfmkern did about malloc in this process."""
    result = _state["result"]
    return f"glibc malloc: {result}" if result else "glibc malloc: not configured yet (no CPU phase has run)"


__all__ = ["SWITCH_ENV", "THRESHOLD_BYTES", "configure", "describe"]
