"""sfmkern's threading set-up (sfmkern/_threads.py): PASSIVE exported before torch loads, a user's explicit
settings always respected, and the per-phase thread cap only when OpenMP already spins."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from sfmkern import _threads

_PROBE = """
import json, os, sys
{first}
import sfmkern
threads = sys.modules["torch"].get_num_threads() if "torch" in sys.modules else None
print(json.dumps({{"policy": os.environ.get("OMP_WAIT_POLICY"), "mode": sfmkern._threads._state["mode"],
                   "torch_threads": threads}}))
"""


def _child(first: str, **env) -> dict:
    base = {k: v for k, v in os.environ.items()
            if k not in ("OMP_WAIT_POLICY", "SFMKERN_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    base.update(env)
    out = subprocess.run([sys.executable, "-c", _PROBE.format(first=first)], env=base, capture_output=True,
                         text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def test_import_exports_passive_before_torch():
    got = _child("")
    assert got == {"policy": "PASSIVE", "mode": "passive", "torch_threads": None}  # and torch not loaded


@pytest.mark.parametrize("policy", ["ACTIVE", "passive", ""])
def test_explicit_wait_policy_is_kept(policy):
    got = _child("", OMP_WAIT_POLICY=policy)
    assert got["policy"] == policy and got["mode"] == "user"


def test_switch_off_leaves_environment_alone():
    got = _child("", SFMKERN_THREADS="off")
    assert got["policy"] is None and got["mode"] == "off"


def test_torch_first_is_detected_and_nothing_exported():
    """After `import torch` libgomp has read its environment: exporting then would only mislead."""
    got = _child("import torch")
    assert got["policy"] is None and got["mode"] == "late"


def test_explicit_thread_count_is_kept():
    got = _child("import torch", OMP_NUM_THREADS="1")
    assert got["torch_threads"] == 1 and got["mode"] == "late"


@pytest.fixture
def late(monkeypatch):
    """This process as if torch had been imported before sfmkern with no OpenMP settings."""
    monkeypatch.setitem(_threads._state, "mode", "late")
    for name in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "SFMKERN_THREADS"):
        monkeypatch.delenv(name, raising=False)
    before = torch.get_num_threads()
    monkeypatch.setattr(_threads, "usable_cpus", lambda: 4)
    torch.set_num_threads(4)
    yield
    torch.set_num_threads(before)


def _phase_threads_seen():
    @_threads.cpu_phase
    def phase():
        return torch.get_num_threads()

    inside = phase()
    return inside, torch.get_num_threads()


def test_phase_caps_threads_at_idle_cpus_and_restores(late, monkeypatch):
    monkeypatch.setattr(_threads, "idle_cpus", lambda window_s=0.1: 1.4)
    assert _phase_threads_seen() == (1, 4)
    monkeypatch.setattr(_threads, "idle_cpus", lambda window_s=0.1: 0.2)
    assert _phase_threads_seen() == (1, 4)  # at least one thread
    monkeypatch.setattr(_threads, "idle_cpus", lambda window_s=0.1: 2.6)
    assert _phase_threads_seen() == (3, 4)
    monkeypatch.setattr(_threads, "idle_cpus", lambda window_s=0.1: 3.9)
    assert _phase_threads_seen() == (4, 4)  # never more than torch's count


@pytest.mark.parametrize("how", ["omp_num_threads", "mkl_num_threads", "set_num_threads", "switch_off", "policy",
                                 "passive_mode"])
def test_phase_respects_user_choices(late, monkeypatch, how):
    monkeypatch.setattr(_threads, "idle_cpus", lambda window_s=0.1: 0.0)
    expected = 4
    if how == "omp_num_threads":
        monkeypatch.setenv("OMP_NUM_THREADS", "4")
    elif how == "mkl_num_threads":
        monkeypatch.setenv("MKL_NUM_THREADS", "4")
    elif how == "set_num_threads":
        torch.set_num_threads(3)  # differs from the 4 usable CPUs: the user's choice
        expected = 3
    elif how == "switch_off":
        monkeypatch.setenv("SFMKERN_THREADS", "off")
    elif how == "policy":
        monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    else:
        monkeypatch.setitem(_threads._state, "mode", "passive")
    assert _phase_threads_seen() == (expected, expected)


def test_phase_restores_threads_on_error(late, monkeypatch):
    monkeypatch.setattr(_threads, "idle_cpus", lambda window_s=0.1: 1.0)

    @_threads.cpu_phase
    def failing():
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        failing()
    assert torch.get_num_threads() == 4 and not _threads._state.get("active")


def test_idle_cpus_reads_proc_stat():
    idle = _threads.idle_cpus(0.05)
    if idle is None:
        pytest.skip("no /proc/stat")
    assert 0.0 <= idle <= (os.cpu_count() or 1) + 1e-9


def test_public_phases_are_wrapped():
    from sfmkern.distillation import distill  # sfmkern.distill (pipeline) runs these two phases, each wrapped
    from sfmkern.evaluation import evaluate
    from sfmkern.stats import collect_stats

    for fn in (distill, evaluate, collect_stats):
        assert fn.__wrapped__.__name__ == fn.__name__  # functools.wraps of cpu_phase
