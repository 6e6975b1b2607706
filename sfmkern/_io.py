"""Crash-safe files: atomic writes (temporary file, fsync, rename), safetensors with JSON metadata, advisory locks
per output, disk-space checks and preallocation.

Every checkpoint and result file of sfmkern goes through `atomic_write`, so a run killed at any instant leaves either
the previous complete file or the new complete file, never a torn one; the temporary files a kill leaves behind
(`.<name>.<random>.tmp`) are removed by `remove_stale_temps` when the next run takes the output's lock. Any I/O error
of a write becomes an OSError whose one-line message names the file.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

_META_KEY = "sfmkern"


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Call `write(tmp_path)` on a temporary file beside `path`, fsync it, then rename it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        try:
            write(tmp)
        except OSError as exc:
            raise OSError(exc.errno, f"cannot write {path}: {exc.strerror or exc}") from exc
        except Exception as exc:  # safetensors, PIL, numpy: their own types, with the OS error inside the text
            if "os error" not in str(exc).lower() and "i/o error" not in str(exc).lower():
                raise
            raise OSError(errno.EIO, f"cannot write {path}: {' '.join(str(exc).split())}") from exc
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; result files are meant to be shared like any other output
        try:
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except OSError as exc:
            raise OSError(exc.errno, f"cannot write {path}: {exc.strerror or exc}") from exc
        with contextlib.suppress(OSError):  # make the rename itself durable where the platform allows it
            dir_fd = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def save_tensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict) -> Path:
    """Atomically save CPU-contiguous copies of `tensors` as safetensors, with `metadata` stored as JSON."""
    from safetensors.torch import save_file

    cpu = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    meta = {_META_KEY: json.dumps(metadata, sort_keys=True)}
    return atomic_write(path, lambda tmp: save_file(cpu, tmp, metadata=meta))


def load_tensors(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """Load a file written by `save_tensors`: (tensors, metadata). Raises FileNotFoundError/ValueError clearly."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        with safe_open(str(path), framework="pt") as fh:
            raw = fh.metadata() or {}
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    except Exception as exc:  # safetensors raises its own error types for torn or foreign files
        raise ValueError(f"{path}: not a readable safetensors file ({exc})") from exc
    if _META_KEY not in raw:
        raise ValueError(f"{path}: not an sfmkern file (no '{_META_KEY}' metadata)")
    return tensors, json.loads(raw[_META_KEY])


# ------------------------------------------------------------------------------------------------ temporary files
def _temp_pattern(name: str, any_suffix: bool) -> re.Pattern:
    return re.compile(re.escape(f".{name}") + (r"[^/]*" if any_suffix else "") + r"\.[A-Za-z0-9_]{8}\.tmp")


def remove_stale_temps(path: str | os.PathLike, *, any_suffix: bool = False) -> list[Path]:
    """Remove the temporary files `atomic_write(path, ...)` leaves when killed mid-write (with `any_suffix`, also
    those of `path` + any suffix, e.g. its checkpoints `<path>.partial-0of1`). Call it only while holding the lock
    of the output (`output_lock`): no other writer's temporary file can then be in flight."""
    p = Path(path)
    if not p.parent.is_dir():
        return []
    pattern = _temp_pattern(p.name, any_suffix)
    removed = []
    for entry in os.scandir(p.parent):
        if pattern.fullmatch(entry.name) and entry.is_file(follow_symlinks=False):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(entry.path)
                removed.append(Path(entry.path))
    return removed


# ------------------------------------------------------------------------------------------------ locks
class OutputBusyError(RuntimeError):
    """Another process holds the advisory lock of an output (it is writing the same file or folder)."""


def lock_path_for(path: str | os.PathLike) -> Path:
    """The lock file of an output: `.<name>.lock` beside a file, `<folder>/.lock` inside a folder."""
    p = Path(path)
    return p / ".lock" if p.is_dir() else p.with_name(f".{p.name}.lock")


@contextlib.contextmanager
def output_lock(path: str | os.PathLike, what: str = "output") -> Iterator[Path]:
    """Hold an exclusive advisory lock (`fcntl.flock` on `lock_path_for(path)`) while writing `path`; a second
    process locking the same output gets OutputBusyError at once (naming the output and the holder's pid). The
    lock file stays (removing it would race with a waiting locker); the lock itself ends with the process."""
    import fcntl

    lock = lock_path_for(path)
    lock.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode("ascii", "replace").strip() or "?"
            raise OutputBusyError(f"{what} {str(path)!r} is being written by another process (pid {holder}, lock "
                                  f"{lock}); wait for it to finish or choose another output") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield lock
    finally:
        os.close(fd)  # releases the lock


# ------------------------------------------------------------------------------------------------ disk space
def check_free_space(folder: str | os.PathLike, needed: int, what: str) -> None:
    """Raise OSError(ENOSPC) naming `what` when the file system of `folder` has fewer than `needed` free bytes."""
    st = os.statvfs(folder)
    free = st.f_bavail * st.f_frsize
    if needed > free:
        raise OSError(errno.ENOSPC, f"not enough free disk space for {what}: {needed / 2**20:.1f} MiB needed, "
                                    f"{free / 2**20:.1f} MiB free in {folder}")


def preallocate(path: str | os.PathLike) -> None:
    """Reserve disk blocks for the whole of an existing file (`posix_fallocate`), so that writing through a memory
    map can never hit a full disk (which kills the process with SIGBUS); raises OSError naming the file."""
    fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    try:
        size = os.fstat(fd).st_size
        if size:
            try:
                os.posix_fallocate(fd, 0, size)
            except OSError as exc:
                if exc.errno not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                    raise OSError(exc.errno, f"cannot reserve {size / 2**20:.1f} MiB for {path}: "
                                             f"{exc.strerror or exc}") from None
    finally:
        os.close(fd)


def notice(message: str, enabled: bool = True) -> None:
    """One line on stderr about what a run reuses, refits or skips (`sfmkern: ...`)."""
    if enabled:
        print(f"sfmkern: {' '.join(str(message).split())}", file=sys.stderr, flush=True)
