"""Where alignlab keeps what it builds or converts once (built-in models, GGUF conversions): $ALIGNLAB_CACHE, else
~/.cache/alignlab; and how such a folder is built: once, atomically, by one process at a time (`build_once`)."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

MARKER_FILE = ".alignlab-complete"  # written last into a built folder: its presence means "complete"


def cache_root(cache_dir: str | Path | None = None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir)
    if os.environ.get("ALIGNLAB_CACHE"):
        return Path(os.environ["ALIGNLAB_CACHE"])
    return Path.home() / ".cache" / "alignlab"


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive lock on `path` (fcntl.flock), so a second process waits for the first one's build instead of
    building the same thing again beside it. Where flock is missing (Windows) both build, and the rename in
    `build_once` still keeps the result whole."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    with path.open("a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def build_once(final: Path, build: Callable[[Path], None], marker: str) -> Path:
    """`final`, built by `build(tmp_dir)` the first time: into a temporary folder beside it, marker file
    written last, renamed into place under a lock. A folder without the marker (a crash mid-build, or something
    else) is moved aside and rebuilt, never trusted."""
    if (final / MARKER_FILE).exists():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(final.parent / f".{final.name}.lock"):
        if (final / MARKER_FILE).exists():  # another process built it while this one waited for the lock
            return final
        if final.exists():
            _discard(final)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
        tmp.chmod(0o755)  # mkdtemp makes it private (0700); the cache is read by whoever runs the recipe
        try:
            build(tmp)
            (tmp / MARKER_FILE).write_text(marker)
            try:
                os.replace(tmp, final)  # atomic; fails if another process (no flock) got there first
            except OSError:
                if not (final / MARKER_FILE).exists():
                    raise
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return final


def _discard(path: Path) -> None:
    trash = Path(tempfile.mkdtemp(prefix=f".{path.name}.trash-", dir=path.parent))
    with contextlib.suppress(OSError):  # another process moved it first
        os.replace(path, trash / path.name)
    shutil.rmtree(trash, ignore_errors=True)
