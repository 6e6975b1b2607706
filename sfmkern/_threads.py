"""How sfmkern sets up CPU threading for itself, so that the Python API runs as fast as the command line.

PyTorch's CPU kernels run on GNU OpenMP (libgomp). By default its idle threads spin for a while before sleeping; on a
CPU shared with other processes the spinning threads of one process steal the cores the others need, and a
distillation step was measured 5-10x slower on a loaded 2-core machine. `OMP_WAIT_POLICY=PASSIVE` (idle threads
sleep) cures it, but libgomp reads it only once, when it is loaded, i.e. at `import torch`; setting it later in
`os.environ` does nothing (measured: same time as not setting it). Hence two layers:

1. `configure_at_import()` runs when `sfmkern` is imported. If torch is not loaded yet and the user has set neither
   OMP_WAIT_POLICY nor SFMKERN_THREADS=off, it exports OMP_WAIT_POLICY=PASSIVE (also inherited by child processes).
   `import sfmkern` before `import torch`, or export the variable in the shell, and this is all that happens.
2. When torch was imported first (libgomp already spins) and the user has not chosen a thread count (no
   OMP_NUM_THREADS / MKL_NUM_THREADS, torch.get_num_threads() still the number of usable CPUs), each CPU-heavy
   phase (`collect_stats`, `distill`, `evaluate`, wrapped by `cpu_phase`) measures how many CPUs other processes
   leave idle (/proc/stat over 0.1 s) and, if fewer than torch's thread count, runs with that many threads (at
   least 1), restoring the count afterwards. Fewer threads than busy cores is what spinning OpenMP needs.

Overrides: any explicit OMP_WAIT_POLICY (e.g. ACTIVE), OMP_NUM_THREADS, MKL_NUM_THREADS, a torch.set_num_threads(n)
with n different from the CPU count, or SFMKERN_THREADS=off (sfmkern then never touches threading) are respected.
`describe()` says what was done.
"""

from __future__ import annotations

import functools
import os
import sys
import time

from sfmkern import _malloc

SWITCH_ENV = "SFMKERN_THREADS"
_USER_THREAD_ENVS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")

# what configure_at_import found: "passive" (exported OMP_WAIT_POLICY=PASSIVE), "user" (OMP_WAIT_POLICY already
# set), "off" (SFMKERN_THREADS=off), "late" (torch was imported first: OpenMP spins), None (not run yet)
_state: dict = {"mode": None}


def _switched_off() -> bool:
    return _malloc.env_switched_off(SWITCH_ENV)


def configure_at_import() -> str:
    """Export OMP_WAIT_POLICY=PASSIVE unless the user chose a policy, switched sfmkern's setup off, or torch (and so
    the OpenMP runtime) is already loaded. Returns the mode recorded for `describe()`."""
    if _switched_off():
        mode = "off"
    elif "OMP_WAIT_POLICY" in os.environ:
        mode = "user"
    elif "torch" in sys.modules:
        mode = "late"
    else:
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
        mode = "passive"
    _state["mode"] = mode
    return mode


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def _cpu_times() -> tuple[int, int] | None:
    """(idle + iowait jiffies, total jiffies) of all CPUs from /proc/stat, None where there is no /proc."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
    except OSError:
        return None
    if not fields or fields[0] != "cpu":
        return None
    values = [int(v) for v in fields[1:9]]  # user nice system idle iowait irq softirq steal
    return values[3] + values[4], sum(values)


def idle_cpus(window_s: float = 0.1) -> float | None:
    """How many CPUs were idle over `window_s` seconds (this process sleeps meanwhile, so it is the room other
    processes leave), or None where /proc/stat is not available."""
    first = _cpu_times()
    if first is None:
        return None
    time.sleep(window_s)
    second = _cpu_times()
    if second is None or second[1] <= first[1]:
        return None
    fraction = (second[0] - first[0]) / (second[1] - first[1])
    return fraction * (os.cpu_count() or 1)


def user_chose_threads() -> bool:
    """True when the thread count is the user's: SFMKERN_THREADS=off, OMP_NUM_THREADS / MKL_NUM_THREADS set, or
    torch.get_num_threads() differs from the number of usable CPUs (torch.set_num_threads was called)."""
    import torch

    if _switched_off() or any(os.environ.get(name) for name in _USER_THREAD_ENVS):
        return True
    return torch.get_num_threads() != usable_cpus()


def phase_threads() -> int | None:
    """The thread count for a CPU phase, or None to leave torch's as it is: only when OpenMP spins (torch came
    before sfmkern, no OMP_WAIT_POLICY) and the user chose no thread count; then min(torch's count, idle CPUs
    rounded, at least 1)."""
    if _state["mode"] != "late" or "OMP_WAIT_POLICY" in os.environ or user_chose_threads():
        return None
    import torch

    idle = idle_cpus()
    if idle is None:
        return None
    wanted = max(1, int(idle + 0.5))
    current = torch.get_num_threads()
    return wanted if wanted < current else None


def cpu_phase(fn):
    """Decorator for a CPU-heavy phase: runs `fn` with `phase_threads()` threads when that is not None (restoring
    torch's count afterwards), else unchanged. Nested phases keep the outer one's choice. The first phase of the
    process also sets up glibc's malloc for tensor work (`sfmkern._malloc.configure`)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if _state.get("active"):
            return fn(*args, **kwargs)
        _malloc.configure()  # once per process: glibc thresholds that stop mmap/munmap churn (see sfmkern._malloc)
        threads = phase_threads()
        if threads is None:
            _state["active"] = True
            try:
                return fn(*args, **kwargs)
            finally:
                _state["active"] = False
        import torch

        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        _state.update(active=True, last_phase_threads=threads)
        try:
            return fn(*args, **kwargs)
        finally:
            _state["active"] = False
            torch.set_num_threads(before)

    return wrapper


def describe() -> str:
    """One line: what sfmkern did about threading in this process."""
    mode = _state["mode"]
    policy = os.environ.get("OMP_WAIT_POLICY", "unset")
    if mode == "passive":
        return "OMP_WAIT_POLICY=PASSIVE exported by sfmkern before torch was loaded"
    if mode == "user":
        return f"OMP_WAIT_POLICY={policy} set by the user: left alone"
    if mode == "off":
        return f"{SWITCH_ENV}=off: threading left alone"
    if mode == "late":
        last = _state.get("last_phase_threads")
        tail = f" (last phase: {last} threads)" if last else ""
        return ("torch was imported before sfmkern (OpenMP spins): CPU phases use no more threads than idle CPUs"
                + tail)
    return "sfmkern's threading set-up has not run"


__all__ = ["SWITCH_ENV", "configure_at_import", "cpu_phase", "describe", "idle_cpus", "phase_threads",
           "usable_cpus", "user_chose_threads"]
