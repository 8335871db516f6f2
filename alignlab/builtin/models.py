"""Built-in model names -> folders: the tiny models built here (tiny_model.py), the real pretrained ones fetched
from PyPI on first use (pretrained.py) and the shallow students made of some of their layers (shallow.py); `.gguf`
sources go through their cached conversion (alignlab/gguf.py)."""

from __future__ import annotations

from pathlib import Path

from alignlab.builtin.pretrained import PRETRAINED_MODELS, built_pretrained_path, pretrained_model_path
from alignlab.builtin.shallow import SHALLOW_MODELS, built_shallow_path, shallow_model_path
from alignlab.builtin.tiny_model import BUILTIN_MODELS, BUILTIN_PREFIX, MARKER_FILE, tiny_model_dir
from alignlab.builtin.tiny_model import builtin_model_path as tiny_model_path


def builtin_model_names() -> list[str]:
    return [*BUILTIN_MODELS, *PRETRAINED_MODELS, *SHALLOW_MODELS]


def builtin_model_path(name: str, cache_dir: str | Path | None = None) -> Path:
    """Directory of builtin model `name` (model + tokenizer), building (or fetching) it on first use."""
    if name in PRETRAINED_MODELS:
        return pretrained_model_path(name, cache_dir)
    if name in SHALLOW_MODELS:
        return shallow_model_path(name, cache_dir)
    if name not in BUILTIN_MODELS:
        raise ValueError(f"unknown builtin model {name!r}; known builtin models: {', '.join(builtin_model_names())}")
    return tiny_model_path(name, cache_dir)


def built_model_path(name: str) -> Path | None:
    """The folder of builtin model `name` when it is already built or fetched (validation never builds), else None."""
    if name in PRETRAINED_MODELS:
        return built_pretrained_path(name)
    if name in SHALLOW_MODELS:
        return built_shallow_path(name)
    path = tiny_model_dir(name)
    return path if (path / MARKER_FILE).exists() else None


def resolve_model_name(name_or_path: str) -> str:
    """Map "builtin:<name>" to the built model's directory and a .gguf file to its converted folder (alignlab.gguf),
    as strings; return anything else unchanged."""
    if name_or_path.lower().endswith(".gguf"):
        from alignlab.gguf import converted_gguf_path

        return str(converted_gguf_path(Path(name_or_path).expanduser()))
    if not name_or_path.startswith(BUILTIN_PREFIX):
        return name_or_path
    return str(builtin_model_path(name_or_path[len(BUILTIN_PREFIX) :]))
