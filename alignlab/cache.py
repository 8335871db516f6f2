"""Where alignlab keeps what it builds or converts once (built-in models, GGUF conversions): $ALIGNLAB_CACHE, else
~/.cache/alignlab."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root(cache_dir: str | Path | None = None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir)
    if os.environ.get("ALIGNLAB_CACHE"):
        return Path(os.environ["ALIGNLAB_CACHE"])
    return Path.home() / ".cache" / "alignlab"
