"""torch's CPU thread count on a busy machine.

torch runs each CPU op on as many threads as the machine has cores. When other processes already keep those cores
busy, every op waits at its threads' barrier for the thread the OS has parked: on a 2-core machine shared with
other jobs one training step took 4.3 s on torch's default 2 threads and 0.3 s on one. Always using one thread would
cost speed on an idle or larger machine, so the count is lowered only when the machine is oversubscribed, once at
the start of a command (`plan_threads`), and the change is logged.

Knobs: `alignlab run|eval|bench --threads N` (or ALIGNLAB_THREADS=N) sets N threads whatever the load;
`--threads auto` (the default) decides from the load; OMP_NUM_THREADS set by you is left alone (auto only).
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger("alignlab")


def plan_threads(load: float, cpus: int, threads: int, processes: int = 1) -> int | None:
    """The intra-op thread count to set, or None to leave torch's alone.

    `load`: the 1-minute load average (runnable processes, other jobs and this one's start-up alike); `cpus`: the
    machine's logical CPUs; `threads`: torch's current count per process; `processes`: this run's processes on this
    machine. The machine is oversubscribed when our threads do not fit in the cores the load leaves free, with one
    core of slack (the load average lags, and counts our own start-up and short jobs). Then each process gets its
    share of the free cores, at least one; never more threads than torch has now.
    """
    free = cpus - load
    if processes * threads <= free + 1:
        return None
    share = max(1, int(free // processes))
    return share if share < threads else None


def apply_thread_policy(setting: str | int | None = None, processes: int | None = None) -> int | None:
    """Set torch's intra-op threads per `setting` (an int N, "auto" or None: ALIGNLAB_THREADS, else auto); returns
    the count set, or None when torch's default stays."""
    import torch

    setting = str(setting or os.environ.get("ALIGNLAB_THREADS") or "auto").strip().lower()
    now = torch.get_num_threads()
    if setting != "auto":
        if not setting.isdigit() or int(setting) < 1:
            raise ValueError(f"--threads / ALIGNLAB_THREADS: expected a positive integer or 'auto', got '{setting}'")
        n = int(setting)
        if n != now:
            torch.set_num_threads(n)
            log.info("torch CPU threads: %d -> %d (--threads / ALIGNLAB_THREADS)", now, n)
        return n
    if os.environ.get("OMP_NUM_THREADS") or not hasattr(os, "getloadavg"):  # the user chose; or no load (Windows)
        return None
    cpus = os.cpu_count() or 1
    load = os.getloadavg()[0]
    procs = processes or int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    n = plan_threads(load, cpus, now, procs)
    if n is not None:
        torch.set_num_threads(n)
        log.info(
            "torch CPU threads: %d -> %d: this machine is busy (load %.1f on %d CPUs, %d process(es) of this run). "
            "Choose with --threads N (or ALIGNLAB_THREADS=N).",
            now, n, load, cpus, procs,
        )  # fmt: skip
    return n
