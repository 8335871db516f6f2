"""GGUF files as a model source: converted once to a cached safetensors folder, then used like any local model.

A recipe names a GGUF file either directly (`model.name_or_path: path/to/model.Q4_K_M.gguf`) or as a folder plus
a file name (`model.name_or_path: path/to/folder`, `model.gguf_file: model.Q4_K_M.gguf`). Every architecture
that transformers' GGUF loader reads works (llama, mistral, qwen2, qwen3, gemma2/3, phi3, ...: the list is
`transformers.modeling_gguf_pytorch_utils.GGUF_SUPPORTED_ARCHITECTURES`).

Why convert instead of passing `gguf_file=` to every `from_pretrained`: transformers dequantizes a GGUF to
float32 on every load (10 s for a 135M model; every stage, every process, the tokenizer too), and a GGUF-loaded
model refuses `save_pretrained`, which every stage that writes full weights or merges an adapter needs. So the
first use converts: tokenizer (with its chat template), config, float32 weights and a generation_config holding
the end-of-turn token ids, written with `save_pretrained` into `<cache>/gguf/<file stem>-<sha256[:16]>-v<N>`,
where <cache> is $ALIGNLAB_CACHE or ~/.cache/alignlab (as for the builtin models). The weights are the GGUF's
dequantized values: exactly what `from_pretrained(..., gguf_file=...)` gives, not the unquantized original.

Cache key: the sha256 of the file's content (and its file name, for a readable cache), so a copy of the file in
another folder is not converted again and a changed file is. Hashing runs at about 400 MB/s here (0.26 s for a
98 MB GGUF, warm page cache); its result is kept in `<cache>/gguf/.sha256/`, keyed by (absolute path, size,
mtime), so a multi-GB file is hashed once, not once per process and stage. The folder is written into a
temporary folder beside it, a marker file last, then renamed into place, under a file lock, so two processes
(`accelerate launch`) asking at once convert it once and neither ever sees a half-written folder.

`read_gguf_header` reads only the metadata (no tensors, no numpy), for `alignlab validate`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import struct
import time
from pathlib import Path
from typing import TYPE_CHECKING

from alignlab.cache import MARKER_FILE, build_once, cache_root

if TYPE_CHECKING:
    from alignlab.recipe import Recipe

__all__ = [
    "CONVERTER_VERSION",
    "GGUF_MAGIC",
    "MARKER_FILE",
    "ModelSourceError",
    "build_once",
    "check_gguf_file",
    "converted_gguf_path",
    "convert_gguf",
    "file_sha256",
    "gguf_source",
    "is_gguf_name",
    "read_gguf_header",
    "supported_architectures",
]

GGUF_MAGIC = b"GGUF"
CONVERTER_VERSION = 1  # bump when `convert_gguf` changes what it writes: cached conversions are then redone


class ModelSourceError(ValueError):
    """A model source that cannot be used (missing or bad GGUF file, a builtin that cannot be fetched); the
    message names the recipe key and the fix. The CLI prints it as one error, without a traceback."""


# --------------------------------------------------------------------------------------------------------------
# Where a recipe's GGUF is
# --------------------------------------------------------------------------------------------------------------


def is_gguf_name(name_or_path: str) -> bool:
    return name_or_path.lower().endswith(".gguf")


def gguf_source(recipe: Recipe) -> Path | None:
    """The GGUF file a recipe's base model comes from, or None when it is not a GGUF source. Pure path logic
    (`recipe.resolve_path`: as given, else beside the recipe file); nothing is checked here."""
    spec = recipe.model
    if spec.gguf_file:
        return recipe.resolve_path(spec.name_or_path) / spec.gguf_file
    if is_gguf_name(spec.name_or_path):
        return recipe.resolve_path(spec.name_or_path)
    return None


# --------------------------------------------------------------------------------------------------------------
# Reading the header (validate): magic, version, metadata key/values
# --------------------------------------------------------------------------------------------------------------

# GGUF value types (ggml's gguf.h / gguf-py's GGUFValueType) -> struct format of one value.
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9


def read_gguf_header(path: str | Path) -> dict:
    """The metadata of a GGUF file: {"GGUF.version": int, "GGUF.tensor_count": int, key: value, ...} for every
    scalar or string key (arrays, e.g. the 49152 vocabulary strings, are skipped: only their length is read).

    Reads the header only (a few MB for a large vocabulary), with the standard library: ~0.1 s where gguf's
    GGUFReader takes ~2 s (numpy memory map of every tensor). Raises ModelSourceError for a file that is not GGUF
    (wrong magic, e.g. a safetensors or HTML file) or is truncated. Layout (GGUF v2/v3, little-endian): magic
    "GGUF", u32 version, u64 tensor count, u64 key/value count, then per key/value: string key (u64 length +
    UTF-8 bytes), u32 type, value; arrays are u32 element type, u64 count, elements.
    """
    path = Path(path)
    with path.open("rb") as f:
        magic = f.read(4)
        if magic != GGUF_MAGIC:
            raise ModelSourceError(f"{path} is not a GGUF file (it starts with {magic!r}, a GGUF file with b'GGUF')")
        try:
            return _read_metadata(f)
        except (struct.error, UnicodeDecodeError, ValueError) as e:
            raise ModelSourceError(f"{path}: unreadable GGUF header ({e}); the file may be truncated") from e


def _read_metadata(f) -> dict:
    def read(fmt: str):
        size = struct.calcsize(fmt)
        data = f.read(size)
        if len(data) != size:
            raise ValueError("unexpected end of file")
        return struct.unpack(fmt, data)[0]

    (version,) = struct.unpack("<I", f.read(4))
    order = "<"
    if version & 0xFFFF == 0:  # written on a big-endian machine: the version reads as 0x0N000000
        order, version = ">", struct.unpack(">I", struct.pack("<I", version))[0]
    if version < 2:
        raise ValueError(f"GGUF version {version} is too old (transformers reads version 2 and 3)")

    def read_string() -> str:
        n = read(order + "Q")
        data = f.read(n)
        if len(data) != n:
            raise ValueError("unexpected end of file")
        return data.decode("utf-8")

    def skip(vtype: int, count: int) -> None:
        if vtype == _STRING:
            for _ in range(count):
                f.seek(read(order + "Q"), os.SEEK_CUR)
        elif vtype in _SCALARS:
            f.seek(struct.calcsize(_SCALARS[vtype]) * count, os.SEEK_CUR)
        else:
            raise ValueError(f"unknown GGUF value type {vtype} inside an array")

    meta = {"GGUF.version": version, "GGUF.tensor_count": read(order + "Q")}
    for _ in range(read(order + "Q")):
        key, vtype = read_string(), read(order + "I")
        if vtype == _STRING:
            meta[key] = read_string()
        elif vtype in _SCALARS:
            meta[key] = read(order + _SCALARS[vtype])
        elif vtype == _ARRAY:
            etype, count = read(order + "I"), read(order + "Q")
            skip(etype, count)
        else:
            raise ValueError(f"unknown GGUF value type {vtype} for key {key!r}")
    return meta


# llama.cpp architecture names that transformers' loader renames before looking them up (mirrors
# transformers.modeling_gguf_pytorch_utils.load_gguf_checkpoint).
_ARCH_ALIASES = {
    "qwen2moe": "qwen2_moe",
    "qwen3moe": "qwen3_moe",
    "gpt-oss": "gpt_oss",
    "minimax-m2": "minimax_m2",
    "t5encoder": "t5",
}


def supported_architectures() -> list[str]:
    """GGUF architectures (llama.cpp names) the installed transformers converts ("general" and "tokenizer" in
    its mapping are metadata sections, not architectures)."""
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    return [a for a in GGUF_SUPPORTED_ARCHITECTURES if a not in ("general", "tokenizer")]


def check_gguf_file(path: str | Path, key: str = "model.name_or_path") -> dict:
    """Check a GGUF source without reading its tensors: the file exists, is GGUF, and transformers reads its
    architecture. Returns the header metadata; raises ModelSourceError naming `key` and the fix."""
    path = Path(path)
    if not path.is_file():
        what = "is a folder, not a .gguf file" if path.is_dir() else "not found"
        raise ModelSourceError(
            f"{key}: GGUF file {path} {what}. Point {key} at an existing .gguf file (or name_or_path at its "
            f"folder and model.gguf_file at the file name)."
        )
    try:
        meta = read_gguf_header(path)
    except ModelSourceError as e:
        raise ModelSourceError(f"{key}: {e}. Point it at a .gguf model file.") from None
    arch = meta.get("general.architecture")
    supported = supported_architectures()
    if not isinstance(arch, str):
        raise ModelSourceError(f"{key}: {path} has no general.architecture in its metadata; not a model GGUF?")
    if arch not in supported and _ARCH_ALIASES.get(arch) not in supported:
        raise ModelSourceError(
            f"{key}: {path} is a GGUF of architecture '{arch}', which transformers "
            f"cannot load from GGUF (it reads: {', '.join(supported)}). Use a GGUF of one of those, or the "
            f"model's safetensors folder or hub id instead."
        )
    return meta


# --------------------------------------------------------------------------------------------------------------
# Cache: content hash, atomic build
# --------------------------------------------------------------------------------------------------------------


def file_sha256(path: str | Path, cache_dir: str | Path | None = None) -> str:
    """sha256 of the file's content, remembered in `<cache>/gguf/.sha256/` under (absolute path, size,
    mtime_ns), so each version of a file is hashed once (see the module docstring for the speed)."""
    path = Path(path).resolve()
    st = path.stat()
    ident = hashlib.sha256(f"{path}\0{st.st_size}\0{st.st_mtime_ns}".encode()).hexdigest()[:32]
    memo = cache_root(cache_dir) / "gguf" / ".sha256" / ident
    with contextlib.suppress(OSError):
        known = memo.read_text().strip()
        if len(known) == 64:
            return known
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    value = digest.hexdigest()
    with contextlib.suppress(OSError):  # a read-only cache only costs a second hashing
        memo.parent.mkdir(parents=True, exist_ok=True)
        tmp = memo.with_name(f"{memo.name}.{os.getpid()}.tmp")
        tmp.write_text(value + "\n")
        os.replace(tmp, memo)
    return value


def converted_gguf_path(
    gguf_path: str | Path, cache_dir: str | Path | None = None, *, build: bool = True, key: str = "model.name_or_path"
) -> Path | None:
    """The safetensors folder converted from `gguf_path`, converting it on first use (after `check_gguf_file`,
    whose errors name `key`). With build=False: the folder when it is already converted, else None (validate
    never converts)."""
    gguf_path = Path(gguf_path)
    if not gguf_path.is_file():
        if not build:
            return None
        check_gguf_file(gguf_path, key)  # raises: not found / a folder
    digest = file_sha256(gguf_path, cache_dir)
    final = cache_root(cache_dir) / "gguf" / f"{gguf_path.stem}-{digest[:16]}-v{CONVERTER_VERSION}"
    if (final / MARKER_FILE).exists():
        return final
    if not build:
        return None
    check_gguf_file(gguf_path, key)
    return build_once(final, lambda tmp: _convert_into(gguf_path, tmp), _marker(gguf_path, digest))


def _convert_into(gguf_path: Path, out_dir: Path) -> None:
    info = convert_gguf(gguf_path, out_dir)
    (out_dir / "alignlab-source.json").write_text(json.dumps({"gguf": str(gguf_path), **info}, indent=2) + "\n")


def _marker(gguf_path: Path, digest: str) -> str:
    return json.dumps({"source": str(gguf_path), "sha256": digest, "converter_version": CONVERTER_VERSION}) + "\n"


# --------------------------------------------------------------------------------------------------------------
# Conversion
# --------------------------------------------------------------------------------------------------------------

# GGUF keys of the tokens that end a turn. llama.cpp stops on every one of them; transformers' loader maps only
# eos into the config, so e.g. Llama-3's <|eot_id|> would otherwise be missing from the generation config.
_END_TOKEN_KEYS = ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id")


def convert_gguf(gguf_path: str | Path, out_dir: str | Path, chat_template: str | None = None) -> dict:
    """Write the GGUF model at `gguf_path` as a safetensors model folder into `out_dir`: config.json,
    model.safetensors (float32, the dequantized GGUF weights), tokenizer files with the chat template
    (`chat_template` replaces the GGUF's when given) and generation_config.json with every end-of-turn id.

    transformers refuses `save_pretrained` on a GGUF-loaded model (it counts as "quantized with gguf"), so the
    weights are moved into a plain model built from the same config: built on the meta device and filled with
    `load_state_dict(assign=True)`, so no second copy of the weights is allocated and tied embeddings (one
    tensor behind `embed_tokens` and `lm_head`) stay one tensor, which save_pretrained then writes once.
    Returns {"seconds": ..., "architecture": ..., "parameters": ...}.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    start = time.perf_counter()
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    folder, name = str(gguf_path.parent), gguf_path.name
    meta = read_gguf_header(gguf_path)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    # The loaded config says "quantization_config: gguf" (a reload would look for the GGUF again) and carries the
    # GGUF's general.name as `_model_name_or_path`: drop both.
    config_dict = loaded.config.to_dict()
    for key in ("quantization_config", "_model_name_or_path", "_name_or_path"):
        config_dict.pop(key, None)
    config = type(loaded.config).from_dict(config_dict)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    result = model.load_state_dict(loaded.state_dict(), strict=True, assign=True)
    if result.missing_keys or result.unexpected_keys:  # strict=True raises; kept for a clear message if not
        raise RuntimeError(f"GGUF conversion of {gguf_path}: state dict mismatch {result}")
    model.tie_weights()
    del loaded  # (non-persistent buffers, e.g. rotary inv_freq, stay on meta: this model is only saved, never run)

    ends = []
    for key in _END_TOKEN_KEYS:
        token_id = meta.get(key)
        if isinstance(token_id, int) and token_id not in ends:
            ends.append(token_id)
    gen = model.generation_config
    gen.eos_token_id = ends[0] if len(ends) == 1 else (ends or gen.eos_token_id)
    if gen.pad_token_id is None:
        gen.pad_token_id = tokenizer.pad_token_id
    max_len = getattr(model.config, "max_position_embeddings", None)
    if max_len and tokenizer.model_max_length > 10**9:  # the GGUF tokenizer has no limit; the model has one
        tokenizer.model_max_length = max_len

    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return {
        "seconds": round(time.perf_counter() - start, 1),
        "architecture": meta.get("general.architecture"),
        "parameters": sum(p.numel() for p in model.parameters()),
    }
