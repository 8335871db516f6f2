"""Where a run's output goes. The console shows what a user needs: alignlab's own lines (stage start and end,
notes, warnings), one progress bar per long phase, the trainers' metrics, the summary and the error that stopped
a run. `logs/run.<rank>.log` gets all of that and everything else: the libraries' log records (transformers,
datasets, accelerate, TRL, PEFT: load reports, deprecations), Python warnings (`logging.captureWarnings`), every
logged metrics row, and the error that stopped the run with its traceback.

`--verbose` (or ALIGNLAB_VERBOSE=1) brings the libraries' warnings and their progress bars (datasets' map bars,
transformers' weight loading) back to the console. Progress bars (alignlab's and the Trainer's) are drawn on
the main process only, to stderr, and only when stderr is a terminal: piped into a file, a bar is a stream of
carriage returns. ALIGNLAB_PROGRESS=1 (or 0) forces them on (or off).

Torch-free: imported by the command line before anything heavy loads.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

# Pass as `extra=FILE_ONLY` for a record the log file should hold but the console should not show (metrics rows the
# Trainer already prints, the traceback of an error the command line reports in one line).
FILE_ONLY = {"console": False}
# Library loggers that print to the console on their own (a handler of their own, no propagation): alignlab takes
# their records into its handlers instead.
_OWN_HANDLERS = ("transformers", "datasets")
_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

_state = {"verbose": False}


def verbose() -> bool:
    return _state["verbose"] or os.environ.get("ALIGNLAB_VERBOSE", "") not in ("", "0")


def progress_enabled(main_process: bool = True) -> bool:
    """Draw progress bars? Main process only; ALIGNLAB_PROGRESS=1/0 decides, else whether stderr is a terminal."""
    if not main_process:
        return False
    forced = os.environ.get("ALIGNLAB_PROGRESS", "")
    if forced:
        return forced != "0"
    return bool(getattr(sys.stderr, "isatty", lambda: False)())


class _Handler(logging.Handler):
    """The console handler: writes to the current sys.stderr (not the one of setup time, which a test's capture may
    have closed since) through tqdm, so a line logged while a bar is drawn lands above the bar, not inside it."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm import tqdm

            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # noqa: BLE001 - logging must never raise (as logging.Handler.handleError)
            self.handleError(record)


class _Pending(logging.Handler):
    """Records logged before the log file is known (the command line's notes come before the pipeline creates the
    run folder); the file gets them first when it is set up. Bounded: a command that never sets one up keeps the
    last 1000."""

    def __init__(self):
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records = self.records[-999:] + [record]


_pending = _Pending()


class _ConsoleFilter(logging.Filter):
    def __init__(self, main_process: bool):
        super().__init__()
        self.main_process = main_process

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "console", True) is False:
            return False
        if record.name == "alignlab" or record.name.startswith("alignlab."):
            return record.levelno >= (logging.INFO if self.main_process else logging.WARNING)
        return record.levelno >= (logging.WARNING if verbose() else logging.ERROR)  # a library's record


def setup(log_path: Path | str | None = None, main_process: bool = True, verbose_: bool | None = None) -> None:
    """Route all output: the console through a filter (above), everything to `log_path` (appended to). Idempotent;
    a later call replaces the handlers of an earlier one (a second run in one process logs to its own folder), and
    keeps the verbosity an earlier call chose when `verbose_` is None.

    Handlers sit on the root logger, so records of every library reach the file; alignlab's logger is at INFO,
    the libraries keep their own levels (WARNING for transformers and datasets)."""
    if verbose_ is not None:
        _state["verbose"] = verbose_
    reset()
    if log_path is None:  # a new command: nothing of an earlier one is pending
        _pending.records.clear()
    root = logging.getLogger()
    console = _Handler()
    console.setFormatter(logging.Formatter("%(message)s"))
    console.addFilter(_ConsoleFilter(main_process))
    handlers: list[logging.Handler] = [console]
    if log_path is None:  # the run folder is not known (or not to be created) yet: keep the records for the file
        handlers.append(_pending)
    else:
        Path(log_path).parent.mkdir(parents=True, exist_ok=True)
        file = logging.FileHandler(log_path)
        file.setFormatter(logging.Formatter(_FORMAT))
        for record in _pending.records:  # what was shown before the run folder existed (notes, thread count)
            file.handle(record)
        _pending.records.clear()
        handlers.append(file)
    for h in handlers:
        h._alignlab = True  # type: ignore[attr-defined]
        root.addHandler(h)
    if root.level > logging.WARNING or root.level == logging.NOTSET:
        root.setLevel(logging.WARNING)
    ours = logging.getLogger("alignlab")
    ours.setLevel(logging.INFO)
    ours.propagate = True
    for h in [h for h in ours.handlers if isinstance(h, logging.StreamHandler)]:  # handlers of older setups
        ours.removeHandler(h)
    # warnings.warn -> logger "py.warnings": the file, the console only if verbose. Off then on: captureWarnings(True)
    # is a no-op when an earlier call is still recorded, even if something (a warnings.catch_warnings block, e.g.
    # pytest's per-test one) has since put its own showwarning back.
    logging.captureWarnings(False)
    logging.captureWarnings(True)
    _quiet_libraries(verbose())


def _quiet_libraries(loud: bool) -> None:
    """Take the console handlers transformers and datasets install for themselves off their loggers (their records
    propagate to ours instead), and switch their progress bars off unless verbose. Libraries not imported yet are
    imported here: a run imports them anyway, and one imported later would install its handler again."""
    for name in _OWN_HANDLERS:
        lib = logging.getLogger(name)
        try:
            if name == "transformers":
                import transformers.utils.logging as tl

                tl.disable_default_handler()
                tl.enable_propagation()
                tl.enable_progress_bar() if loud else tl.disable_progress_bar()
            else:
                import datasets

                datasets.enable_progress_bars() if loud else datasets.disable_progress_bars()
        except ImportError:
            continue
        for h in [h for h in lib.handlers if type(h) is logging.StreamHandler]:
            lib.removeHandler(h)
        lib.propagate = True


def to_file(level: int, message: str) -> None:
    """Log `message` to the log file only, if one is set up (before that there is no file, and a record with no
    handler would reach the console through logging's last-resort handler)."""
    if any(isinstance(h, logging.FileHandler) and getattr(h, "_alignlab", False) for h in logging.getLogger().handlers):
        logging.getLogger("alignlab").log(level, "%s", message, extra=FILE_ONLY)


def reset() -> None:
    """Take alignlab's handlers off the root logger (tests run many runs in one process; the file is closed)."""
    root = logging.getLogger()
    for h in [h for h in root.handlers if getattr(h, "_alignlab", False)]:
        root.removeHandler(h)
        if h is not _pending:
            h.close()


def _note_done(desc: str, n: int, unit: str, seconds: float) -> None:
    logging.getLogger("alignlab").info("%s: done in %s (%d %s)", desc, duration(seconds), n, unit, extra=FILE_ONLY)


class _Quiet:
    """The no-bar stand-in: iterates and counts; on close, notes `desc: done in T (N unit)` in the log file."""

    def __init__(self, iterable, desc, unit):
        self.iterable, self.desc, self.unit = iterable, desc, unit
        self.n, self.start = 0, time.perf_counter()

    def __iter__(self) -> Iterator[Any]:
        for x in self.iterable:
            yield x
            self.n += 1
        self.close()

    def update(self, n: int = 1) -> None:
        self.n += n

    def close(self) -> None:
        if self.start is not None:
            _note_done(self.desc, self.n, self.unit, time.perf_counter() - self.start)
            self.start = None


def duration(seconds: float) -> str:
    """4.2 s, 3 min 05 s, 1 h 02 min."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    m, s = divmod(round(seconds), 60)
    return f"{m} min {s:02d} s" if m < 60 else f"{m // 60} h {m % 60:02d} min"


def progress(
    iterable: Iterable | None = None,
    *,
    total: int | None = None,
    desc: str,
    unit: str = "it",
    main_process: bool = True,
    initial: int = 0,
):
    """A tqdm bar (elapsed time, rate, time left) on stderr when bars are on (`progress_enabled`), else a stand-in
    that draws nothing. Either way the log file gets how long the phase took. Use as an iterable wrapper or with
    `update` and `close`."""
    if total is None and iterable is not None and hasattr(iterable, "__len__"):
        total = len(iterable)
    if not progress_enabled(main_process):
        return _Quiet(iterable if iterable is not None else (), desc, unit)
    from tqdm.auto import tqdm

    class Bar(tqdm):  # the bar's last state goes to the log file too
        def close(self):
            if not getattr(self, "_noted", True):
                self._noted = True
                _note_done(self.desc, self.n - self._initial, self.unit, time.perf_counter() - self._started)
            super().close()

    bar = Bar(iterable, total=total, desc=desc, unit=unit, initial=initial, dynamic_ncols=True, file=sys.stderr)
    bar._noted, bar._initial, bar._started = False, initial, time.perf_counter()
    return bar
