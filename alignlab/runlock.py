"""One run at a time per run folder: a lock file, `<run_dir>/.alignlab.lock`.

Two `alignlab run`s on the same output folder would write the same checkpoints, models and stage records, each
over the other's. The first takes the lock; a second stops with a message naming the holder. The lock records
its owner (pid, the pid's start time, host, when the run started, the command line). A killed run (SIGKILL, a
lost machine) leaves its lock behind: a lock whose pid is gone on this host, or now belongs to another process
(a reused pid: its start time differs), is stale and taken over with a warning, so `--resume` just works. A lock
from another host cannot be checked from here: the message says so, and how to remove it.

Under `accelerate launch` only the main process takes the lock; it tells the others whether it got it (a
broadcast), so every process either goes on or stops with the same message.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

log = logging.getLogger("alignlab")
LOCK_FILE = ".alignlab.lock"
T = TypeVar("T")


class RunLocked(RuntimeError):
    """Another live run holds the run folder's lock. The message names it and says how to proceed."""


@contextlib.contextmanager
def run_lock(run_dir: Path, state=None) -> Iterator[None]:
    """Hold the lock on `run_dir` for the body (taken by the main process of `state`, an accelerate
    PartialState; all processes when None). Raises RunLocked on every process when another run holds it."""
    lock = RunLock(Path(run_dir))
    main = state is None or state.is_main_process
    from_main(state, lock.acquire)
    try:
        yield
    finally:
        if main:
            lock.release()


class RunLock:
    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK_FILE
        self.token = uuid.uuid4().hex

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):  # a stale lock removed, then a race with another run taking it: try again
            if self._create():
                return
            holder = self._read()
            if holder is None:  # removed in between, or unreadable (see _read): try again
                continue
            why = stale_reason(holder)
            if why is None:
                raise RunLocked(held_message(self.path, holder))
            log.warning("run folder lock %s was left by a run that is gone (%s); taking it over", self.path, why)
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
        raise RunLocked(f"could not take the lock {self.path}: another run keeps taking it. Try again.")

    def release(self) -> None:
        """Remove the lock if it is still ours (never a lock another run took after ours was judged stale)."""
        holder = self._read()
        if holder is not None and holder.get("token") == self.token:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()

    def _create(self) -> bool:
        """Write the owner record to a private file, then hard-link it to the lock path: the link either creates
        the lock with its whole content or fails because a lock exists (no half-written lock is ever seen)."""
        record = {
            "pid": os.getpid(),
            "pid_start": process_start_time(os.getpid()),
            "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S"),
            "command": " ".join(sys.argv),
            "token": self.token,
        }
        tmp = self.path.with_name(f"{LOCK_FILE}.{self.token}.tmp")
        tmp.write_text(json.dumps(record))
        try:
            os.link(tmp, self.path)
            return True
        except FileExistsError:
            return False
        finally:
            tmp.unlink()

    def _read(self) -> dict | None:
        try:
            return json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):  # not written by _create (it never leaves a partial file): not ours to judge
            return {"pid": None, "host": None, "started": "?", "command": "? (unreadable lock file)"}


def stale_reason(holder: dict) -> str | None:
    """Why the lock's owner is gone, or None when it may still run."""
    if holder.get("host") != socket.gethostname() or not isinstance(holder.get("pid"), int) or holder["pid"] <= 0:
        return None  # another machine's process (or an unreadable record): cannot tell from here
    pid = holder["pid"]
    start = process_start_time(pid)
    if not pid_alive(pid):
        return f"pid {pid} has exited"
    if start is not None and holder.get("pid_start") is not None and start != holder["pid_start"]:
        return f"pid {pid} now belongs to another process"
    return None


def held_message(path: Path, holder: dict) -> str:
    host = holder.get("host")
    where = f"pid {holder.get('pid')}" + (f" on host {host}" if host != socket.gethostname() else "")
    check = (
        f"If that run is gone (that host cannot be checked from here), delete {path} and run again."
        if host != socket.gethostname()
        else f"If you are sure no alignlab run uses this folder, delete {path} and run again."
    )
    return (
        f"another alignlab run is using {path.parent} ({where}, started {holder.get('started')}: "
        f"{holder.get('command')}). Two runs on one folder would overwrite each other's checkpoints and models: "
        f"wait for it to finish, or give this run another output_dir. {check}"
    )


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    try:  # a zombie (killed, not yet reaped by its parent) is gone for our purpose
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def process_start_time(pid: int) -> int | None:
    """The process's start time in clock ticks after boot (/proc/PID/stat field 22; None off Linux): with the pid,
    it tells a process apart from a later one given the same pid."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def from_main(state, fn: Callable[..., T], *args) -> T:
    """Run `fn(*args)` on the main process of `state` and hand every process its result, or raise its exception
    on every process (so none waits at a barrier the others never reach). One process, or state None: fn(*args)."""
    if state is None or state.num_processes == 1:
        return fn(*args)
    from accelerate.utils import broadcast_object_list

    box: list[Any] = [None]
    if state.is_main_process:
        try:
            box[0] = ("ok", fn(*args))
        except Exception as e:  # noqa: BLE001  (re-raised below, on every process)
            box[0] = ("error", e)
    broadcast_object_list(box, from_process=0)
    kind, value = box[0]
    if kind == "error":
        raise value
    return value
