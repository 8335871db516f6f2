"""The console shows what a user needs, logs/run.<rank>.log holds that and more (the error that stopped a run too),
long phases draw a progress bar with a time estimate on a terminal, and torch's CPU threads are lowered only on
an oversubscribed machine (alignlab/console.py, alignlab/threads.py)."""

from __future__ import annotations

import fcntl
import logging
import os
import pty
import select
import struct
import subprocess
import sys
import termios
import warnings
from pathlib import Path

import pytest
import yaml

from alignlab import console
from alignlab.threads import apply_thread_policy, plan_threads

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _fresh_console():
    yield
    console.reset()
    console._state["verbose"] = False


# ------------------------------------------------------------------------------------------------------ threads


@pytest.mark.parametrize(
    "load, cpus, threads, processes, expected",
    [
        # 2 cores, 7 other busy jobs: free = 2 - 7 < 0 -> one thread (the 4.3 s -> 0.3 s step of the issue)
        (7.0, 2, 2, 1, 1),
        # idle 2 cores: 2 threads <= free 1.8 + 1 slack -> leave torch alone
        (0.2, 2, 2, 1, None),
        # one other job on 2 cores: 2 <= 1.0 + 1 -> still fits with the slack
        (1.0, 2, 2, 1, None),
        # 1.5 busy on 2 cores: 2 > 0.5 + 1 -> floor(0.5) = 0, at least 1
        (1.5, 2, 2, 1, 1),
        # 64 CPUs, load 10, 32 threads: 32 <= 54 + 1 -> leave alone (a big idle-ish machine keeps its speed)
        (10.0, 64, 32, 1, None),
        # 64 CPUs, load 50: free 14, 32 > 15 -> 14 threads
        (50.0, 64, 32, 1, 14),
        # 16 CPUs, 2 processes of 8 threads, load 4: 16 > 12 + 1 -> each floor(12 / 2) = 6
        (4.0, 16, 8, 2, 6),
        # already one thread on a busy machine: nothing lower to set
        (9.0, 2, 1, 1, None),
    ],
)
def test_plan_threads_acts_only_when_oversubscribed(load, cpus, threads, processes, expected):
    assert plan_threads(load, cpus, threads, processes) == expected


def test_thread_policy_forced_auto_and_user_choice(monkeypatch, caplog):
    import torch

    set_to = []
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    monkeypatch.setattr(torch, "set_num_threads", set_to.append)
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    monkeypatch.setattr(os, "getloadavg", lambda: (7.0, 7.0, 7.0))
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("ALIGNLAB_THREADS", raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    caplog.set_level(logging.INFO, logger="alignlab")

    assert apply_thread_policy(None) == 1 and set_to == [1]  # busy: lowered, and said so
    assert "torch CPU threads: 2 -> 1: this machine is busy (load 7.0 on 2 CPUs" in caplog.text
    assert "--threads N" in caplog.text
    assert apply_thread_policy("3") == 3 and set_to[-1] == 3  # --threads 3 whatever the load
    monkeypatch.setenv("ALIGNLAB_THREADS", "4")
    assert apply_thread_policy(None) == 4 and set_to[-1] == 4
    monkeypatch.setenv("ALIGNLAB_THREADS", "auto")
    monkeypatch.setenv("OMP_NUM_THREADS", "2")  # the user chose: auto leaves it
    assert apply_thread_policy(None) is None and len(set_to) == 3
    monkeypatch.delenv("OMP_NUM_THREADS")
    monkeypatch.setattr(os, "getloadavg", lambda: (0.1, 0.1, 0.1))  # idle: torch's default stays
    assert apply_thread_policy("auto") is None and len(set_to) == 3
    with pytest.raises(ValueError, match="expected a positive integer or 'auto', got 'many'"):
        apply_thread_policy("many")


# ------------------------------------------------------------------------------------------------ log routing


def test_console_shows_alignlab_lines_and_errors_the_file_holds_everything(tmp_path, capsys):
    log_file = tmp_path / "logs" / "run.0.log"
    console.setup(log_file, main_process=True, verbose_=False)
    ours, lib = logging.getLogger("alignlab"), logging.getLogger("transformers.modeling_utils")
    ours.info("stage sft (sft): starting")
    lib.warning("LlamaForSequenceClassification LOAD REPORT: score.weight newly initialized")
    logging.getLogger("datasets").warning("a datasets warning")
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.warn("`gradient_checkpointing` is deprecated", FutureWarning, stacklevel=1)
    ours.info("step 1: {loss: 1.0}", extra=console.FILE_ONLY)
    lib.error("a library error")
    err = capsys.readouterr().err
    assert err.splitlines() == ["stage sft (sft): starting", "a library error"]
    text = log_file.read_text()
    for line in ("stage sft (sft): starting", "LOAD REPORT", "a datasets warning", "step 1: {loss: 1.0}"):
        assert line in text
    assert "FutureWarning: `gradient_checkpointing` is deprecated" in text

    console.setup(log_file, main_process=True, verbose_=True)  # --verbose: the libraries' warnings come back
    lib.warning("LOAD REPORT again")
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.warn("deprecated again", FutureWarning, stacklevel=1)
    err = capsys.readouterr().err
    assert "LOAD REPORT again" in err and "FutureWarning: deprecated again" in err

    console.setup(tmp_path / "logs" / "run.1.log", main_process=False, verbose_=False)  # another rank
    ours.info("stage sft (sft): starting")
    ours.warning("rank 1 saw something")
    assert capsys.readouterr().err.splitlines() == ["rank 1 saw something"]
    assert "stage sft (sft): starting" in (tmp_path / "logs" / "run.1.log").read_text()


def test_progress_off_without_a_terminal_notes_the_phase_in_the_file(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("ALIGNLAB_PROGRESS", raising=False)
    console.setup(tmp_path / "run.log")
    assert not console.progress_enabled()  # pytest's stderr is no terminal
    assert sum(console.progress(range(5), desc="reference log-probs (train)", unit="batch")) == 10
    assert capsys.readouterr().err == ""
    assert "reference log-probs (train): done in" in (tmp_path / "run.log").read_text()
    assert "(5 batch)" in (tmp_path / "run.log").read_text()
    monkeypatch.setenv("ALIGNLAB_PROGRESS", "1")
    assert console.progress_enabled() and not console.progress_enabled(main_process=False)


def test_failed_run_log_holds_the_error(tmp_path, capsys, monkeypatch):
    """A stage that fails: one line on the console; the run's log has the stage line, that line and the traceback."""
    import torch

    from alignlab.cli import main
    from alignlab.contract import StageFailed
    from alignlab.stages import sft

    def fail(ctx):
        raise StageFailed("the training loss is nan at step 3 of 6")

    monkeypatch.setattr(sft, "run", fail)
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)  # --threads 1 must not slow the other tests
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    recipe = {
        "name": "fails",
        "output_dir": str(tmp_path / "run"),
        "model": {"name_or_path": "builtin:tiny-llama"},
        "stages": [{"name": "sft", "type": "sft", "dataset": {"path": "builtin:arith", "split": "sft", "size": 8}}],
    }
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    assert main(["run", str(tmp_path / "r.yaml"), "--threads", "1"]) == 1
    err = capsys.readouterr().err
    message = "error: stage 'sft' (sft): the training loss is nan at step 3 of 6"
    assert message in err and "Traceback" not in err
    log = (tmp_path / "run" / "logs" / "run.0.log").read_text()
    assert "torch CPU threads: 2 -> 1 (--threads / ALIGNLAB_THREADS)" in log  # logged before the folder existed
    assert "stage sft (sft): starting from the base model" in log
    assert "run stopped: StageFailed: stage 'sft' (sft): the training loss is nan at step 3 of 6" in log
    assert "Traceback (most recent call last)" in log and message in log

    def crash(ctx):  # not an alignlab error: the traceback reaches the console as ever, and the log has it too
        raise ZeroDivisionError("division by zero in a user reward")

    monkeypatch.setattr(sft, "run", crash)
    with pytest.raises(ZeroDivisionError):
        main(["run", str(tmp_path / "r.yaml")])
    log = (tmp_path / "run" / "logs" / "run.0.log").read_text()
    assert "run stopped: ZeroDivisionError: division by zero in a user reward" in log


# ---------------------------------------------------------------------------------------- a whole run's console


def _run_in_terminal(cmd: list[str], env: dict, timeout: float = 900) -> tuple[int, str]:
    """Run `cmd` with stdout and stderr on a pseudo-terminal of 40 x 120 (as a user's terminal: progress bars are
    drawn); return its exit code and everything it wrote."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    proc = subprocess.Popen(cmd, stdin=slave, stdout=slave, stderr=slave, env=env, cwd=ROOT, close_fds=True)
    os.close(slave)
    chunks = []
    try:
        while True:
            ready, _, _ = select.select([master], [], [], 1.0)
            if ready:
                try:
                    data = os.read(master, 65536)
                except OSError:  # the child closed the terminal
                    break
                if not data:
                    break
                chunks.append(data)
            elif proc.poll() is not None:
                break
        proc.wait(timeout=timeout)
    finally:
        os.close(master)
    return proc.returncode, b"".join(chunks).decode(errors="replace")


def _rendered_lines(out: str) -> list[str]:
    """The lines a terminal shows: a bar redrawn with carriage returns stays one line (its last drawing)."""
    lines = []
    for line in out.replace("\r\n", "\n").split("\n"):
        parts = [p for p in line.split("\r") if p.strip()]
        lines.append(parts[-1].rstrip() if parts else "")
    return lines[:-1] if lines and lines[-1] == "" else lines


@pytest.mark.slow
def test_two_stage_run_prints_a_short_console_and_logs_the_rest(tmp_path):
    """sft_dpo_lora.yaml, 2 steps per stage, on a terminal: at most 40 lines (before this: 48 lines and ~140
    drawings, with datasets' map bars, deprecation warnings and weight-loading bars), a bar with a time estimate
    for the reference log-probs, and the log file holds the console's lines plus the libraries' warnings."""
    run_dir = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k not in ("TQDM_DISABLE", "ALIGNLAB_PROGRESS", "ALIGNLAB_VERBOSE")}
    env["PYTHONPATH"] = str(ROOT)
    sizes = [
        "stages.sft.dataset.size=64",
        "stages.sft.dataset.eval_size=16",
        "stages.dpo.dataset.size=64",
        "stages.dpo.dataset.eval_size=16",
    ]
    cmd = [sys.executable, "-m", "alignlab", "run", "recipes/sft_dpo_lora.yaml", f"output_dir={run_dir}"]
    cmd += ["stages.sft.train.max_steps=2", "stages.dpo.train.max_steps=2", *sizes]
    code, out = _run_in_terminal(cmd, env)
    lines = _rendered_lines(out)
    shown = "\n".join(lines)
    assert code == 0, shown
    assert len(lines) <= 40, shown
    for noise in ("Warning", "LOAD REPORT", "Tokenizing", "chat format", "Loading weights", "Map"):
        assert noise not in out, noise
    bars = [x for x in lines if x.startswith("reference log-probs (train):")]
    assert len(bars) == 1 and "100%" in bars[0] and "<00:00" in bars[0], shown  # [elapsed<left]
    for line in ("stage sft (sft): starting from the base model", "stage dpo (dpo): starting from sft"):
        assert line in lines, shown
    assert [x for x in lines if x.startswith("stage sft: finished in")], shown
    assert f"alignlab: run 'sft-dpo-lora' finished. Outputs in {run_dir}" in lines, shown

    log = (run_dir / "logs" / "run.0.log").read_text()
    ours = [x for x in lines if x.startswith(("stage ", "torch CPU threads", "alignlab: run", "  sft ", "  dpo "))]
    for line in ours:  # everything alignlab showed ...
        assert line.strip() in log, line
    assert "FutureWarning" in log and '"train_loss"' in log  # ... and more: warnings, every metrics row
    assert "reference log-probs (train): done in" in log and "(4 batch)" in log  # 64 pairs / 16 per batch
