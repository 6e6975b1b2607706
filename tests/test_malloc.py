"""sfmkern's malloc set-up (sfmkern/_malloc.py): on glibc, the first CPU phase raises the mmap and trim thresholds so
that large tensors come from the heap and stay there instead of being mapped and unmapped (and faulted in page by
page) every step, read from glibc's own accounting (mallinfo2); a user's own choice is left alone. Each case runs in
a fresh process (the set-up is process-wide and happens once)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from sfmkern import _malloc

_PROBE = """
import ctypes, json
import sfmkern, torch
from sfmkern import _malloc, _threads

class Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                     "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = Mallinfo2

def where_a_block_goes():
    # 64 MiB: above glibc's largest dynamic mmap threshold (32 MiB), so by default it is a mapping of its own
    # (mallinfo2's hblkhd, unmapped again on free); with sfmkern's thresholds it comes from the heap and stays there
    before = libc.mallinfo2()
    t = torch.empty(1 << 24)
    alive = libc.mallinfo2()
    del t
    freed = libc.mallinfo2()
    mib = 1 << 20
    return {"mapped_mib": (alive.hblkhd - before.hblkhd) / mib, "heap_kept_mib": (freed.arena - before.arena) / mib}

default = where_a_block_goes()
before_phase = _malloc.describe()
_threads.cpu_phase(lambda: None)()
print(json.dumps({"default": default, "after": where_a_block_goes(), "before_phase": before_phase,
                  "result": _malloc.describe()}))
"""

_GLIBC = _malloc._glibc() is not None


def _child(**env) -> dict:
    base = {k: v for k, v in os.environ.items()
            if k not in (*_malloc._USER_ENVS, "GLIBC_TUNABLES", _malloc.SWITCH_ENV)}
    base.update(env)
    out = subprocess.run([sys.executable, "-c", _PROBE], env=base, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not _GLIBC, reason="glibc only")
def test_first_cpu_phase_keeps_large_tensors_in_the_heap():
    got = _child()
    assert got["before_phase"].endswith("not configured yet (no CPU phase has run)")
    assert got["result"] == "glibc malloc: mmap and trim thresholds set to 1 GiB"
    assert got["default"]["mapped_mib"] >= 64, got  # by default: its own mapping, unmapped on free
    assert got["after"]["mapped_mib"] == 0, got  # then: from the heap ...
    assert got["after"]["heap_kept_mib"] > 48, got  # ... which keeps it after the free (no trim; the heap may
    # already have held a few MiB of it)


@pytest.mark.parametrize("env,reason", [
    ({"SFMKERN_MALLOC": "off"}, "SFMKERN_MALLOC=off"),
    ({"MALLOC_TRIM_THRESHOLD_": "131072"}, "MALLOC_TRIM_THRESHOLD_ set by the user"),
    ({"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=262144"}, "a glibc.malloc tunable set by the user"),
])
def test_a_users_choice_is_left_alone(env, reason):
    got = _child(**env)
    assert got["result"] == f"glibc malloc: left alone ({reason})"
    if _GLIBC:  # still glibc's default: a 64 MiB tensor is a mapping of its own
        assert got["after"]["mapped_mib"] >= 64, got
