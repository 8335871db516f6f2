"""One run per folder: a second `alignlab run` on a folder another live run holds stops with a message naming the
holder, on every process under `accelerate launch`; a lock left by a killed run (its pid gone, or reused by another
process) does not block `--resume`."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from alignlab.cli import main
from alignlab.runlock import LOCK_FILE, RunLock, held_message, process_start_time, stale_reason
from tests.helpers import lora, make_recipe, write_yaml

REPO = Path(__file__).resolve().parent.parent
HOLD = (
    "import sys, time; from alignlab.runlock import RunLock; RunLock(sys.argv[1]).acquire(); print('held', flush=True)"
)


def _recipe(tmp_path):
    sft = {
        "name": "sft",
        "type": "sft",
        "dataset": {"path": "builtin:arith", "split": "sft", "size": 16, "eval_size": 4},
        "train": {"max_steps": 1, "per_device_batch_size": 4, "max_length": 32, "logging_steps": 1},
    }
    raw = make_recipe([sft], tmp_path / "run", name="lock", peft=lora(r=4, alpha=8, dropout=None))
    return write_yaml(tmp_path / "r.yaml", raw)


def _holder(run_dir):
    """Another process that takes the lock and sleeps (as a run in progress would hold it)."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD + "; time.sleep(300)", str(run_dir)], stdout=subprocess.PIPE, text=True, env=env
    )
    assert proc.stdout.readline().strip() == "held"
    return proc


@pytest.mark.slow
def test_second_run_stops_and_a_killed_holder_does_not_block_resume(tmp_path, capsys):
    recipe, run = _recipe(tmp_path), tmp_path / "run"
    holder = _holder(run)
    try:
        assert main(["run", recipe]) == 2
        err = capsys.readouterr().err
        assert f"error: another alignlab run is using {run} (pid {holder.pid}, started " in err
        assert "wait for it to finish, or give this run another output_dir" in err
        assert not (run / "sft").exists()  # stopped before anything
    finally:
        holder.kill()  # SIGKILL: no chance to remove its lock
        holder.wait()
    assert (run / LOCK_FILE).exists()
    assert main(["run", recipe, "--resume"]) == 0
    assert (run / "sft" / "stage_output.json").exists()
    assert not (run / LOCK_FILE).exists()  # released at the end of the run


def test_who_holds_a_lock():
    me, host = {"pid": os.getpid(), "pid_start": process_start_time(os.getpid())}, socket.gethostname()
    assert stale_reason({**me, "host": host}) is None  # alive
    # The pid now names another process (started at another time): the lock's run is gone.
    assert stale_reason({**me, "pid_start": me["pid_start"] + 1, "host": host}) == (
        f"pid {os.getpid()} now belongs to another process"
    )
    dead = _pid_of_finished()
    assert stale_reason({"pid": dead, "host": host}) == f"pid {dead} has exited"
    # Another machine's process cannot be checked from here: held, and the message says what to do.
    assert stale_reason({**me, "host": "elsewhere"}) is None
    text = held_message(Path("/runs/x") / LOCK_FILE, {"pid": 7, "host": "elsewhere", "started": "T", "command": "C"})
    assert text.startswith("another alignlab run is using /runs/x (pid 7 on host elsewhere, started T: C).")
    assert text.endswith(f"If that run is gone (that host cannot be checked from here), delete /runs/x/{LOCK_FILE} "
                         "and run again.")  # fmt: skip


def _pid_of_finished() -> int:
    """The pid of a process that exited and was reaped (free, until the system gives it to another)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_lock_is_ours_to_release_only(tmp_path):
    """A run releases the lock it took, never one another run took over after judging it stale."""
    first = RunLock(tmp_path)
    first.acquire()
    (tmp_path / LOCK_FILE).unlink()  # judged stale and removed by another run ...
    second = RunLock(tmp_path)
    second.acquire()  # ... which took it
    first.release()
    assert (tmp_path / LOCK_FILE).exists()
    second.release()
    assert not (tmp_path / LOCK_FILE).exists()


@pytest.mark.slow
def test_every_process_stops_when_the_lock_is_held_and_goes_on_when_its_holder_is_gone(tmp_path):
    from tests.test_multiprocess import launch_two_processes

    recipe, run = _recipe(tmp_path), tmp_path / "run"
    holder = _holder(run)
    try:
        done = launch_two_processes(recipe, timeout=240)  # a process left waiting would hang until the timeout
    finally:
        holder.kill()
        holder.wait()
    assert done.returncode != 0
    assert done.stderr.count(f"error: another alignlab run is using {run} (pid {holder.pid}") == 2, done.stderr[-3000:]
    assert not (run / "sft").exists()
    # The holder was killed: the main process takes its stale lock over, and both processes train.
    done = launch_two_processes(recipe, "--resume", timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (run / "sft" / "stage_output.json").exists() and not (run / LOCK_FILE).exists()
