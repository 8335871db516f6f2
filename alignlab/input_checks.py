"""Checks of what a recipe points at on disk, for `alignlab validate` (and so `alignlab run`, which validates first):
the output folder, a local model folder, a chat template file. Each returns None, or one sentence saying what is
wrong with which path and how to fix it; none reads model weights or imports torch.

Without them these inputs pass validation and fail later, as a traceback: an output_dir that is a file when the run
directory is made, a model folder without weights when the first stage loads it, a chat template with a Jinja
syntax error when the first prompt is rendered.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

# File names transformers loads weights from: safetensors and PyTorch files (single or sharded, with their index),
# and GGUF files.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth")


def output_dir_problem(run_dir: Path) -> str | None:
    """The run directory must be a folder that exists or can be made, and be writable."""
    if run_dir.exists() and not run_dir.is_dir():
        return f"output_dir: {run_dir} is a file, not a folder. Point output_dir at a folder (it is made if missing)."
    existing = run_dir
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        return f"output_dir: cannot make {run_dir}, because {existing} is a file. Point output_dir elsewhere."
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"output_dir: {existing} is not writable, so {run_dir} cannot be written. Point output_dir elsewhere."
    return None


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt")


def model_folder_problem(path: Path, needs_tokenizer: bool = True) -> str | None:
    """A local model folder (one holding config.json) needs a readable config.json, weights and (unless the recipe
    names another, `needs_tokenizer` False) tokenizer files; an adapter folder needs its adapter weights."""
    config = path / "config.json"
    if config.is_file():
        try:
            data = json.loads(config.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            where = f" (line {e.lineno}, column {e.colno}: {e.msg})" if isinstance(e, json.JSONDecodeError) else ""
            return f"{config} is not valid JSON{where}. Restore the model's config.json (save_pretrained writes it)."
        if not isinstance(data, dict) or not ("model_type" in data or "auto_map" in data):
            return (
                f"{config} has no 'model_type', so transformers cannot tell which architecture to build. Restore the "
                f"model's config.json (save_pretrained writes it)."
            )
        if not any(f.suffix in WEIGHT_SUFFIXES for f in path.iterdir()):
            return (
                f"model folder {path} has a config.json but no weights (*.safetensors, pytorch_model.bin, *.gguf). "
                f"Copy the weight files in, or point the key at the complete model folder."
            )
        has_gguf = any(f.suffix == ".gguf" for f in path.iterdir())  # a GGUF file holds its tokenizer
        if needs_tokenizer and not has_gguf and not any((path / f).is_file() for f in TOKENIZER_FILES):
            return (
                f"model folder {path} has no tokenizer files ({', '.join(TOKENIZER_FILES[:2])}). Copy them in "
                f"(tokenizer.save_pretrained writes them), or name the tokenizer with model.tokenizer."
            )
    elif (path / "adapter_config.json").is_file() and not any(f.suffix in WEIGHT_SUFFIXES for f in path.iterdir()):
        return f"adapter folder {path} has an adapter_config.json but no adapter weights (adapter_model.safetensors)."
    return None


def chat_template_problem(path: Path) -> str | None:
    """A chat template file must be UTF-8 Jinja that compiles as transformers compiles it (with loop controls and
    the `{% generation %}` block of assistant-mask templates)."""
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(jinja2.ext.Extension):  # parses like transformers' AssistantTracker; never rendered here
        tags = {"generation"}

        def parse(self, parser):
            next(parser.stream)
            return parser.parse_statements(("name:endgeneration",), drop_needle=True)

    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        return f"model.chat_template: {path} is not UTF-8 text. Save the template as UTF-8."
    env = ImmutableSandboxedEnvironment(extensions=[Generation, jinja2.ext.loopcontrols])
    try:
        env.from_string(text)
    except jinja2.TemplateSyntaxError as e:
        return f"model.chat_template: {path}:{e.lineno}: Jinja syntax error: {e.message}. Fix the template."
    return None


def is_hub_id_syntax(name: str) -> bool:
    """Whether `name` could be a hub repository id (`name` or `owner/name`), checked offline."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


# Keys whose values name files or folders (the run folder, models, data, templates, stage folders).
PATH_KEYS = frozenset(
    {
        "output_dir",
        "name",
        "name_or_path",
        "tokenizer",
        "chat_template",
        "gguf_file",
        "path",
        "eval_path",
        "reward_model",
    }
)
NAME_MAX = 255  # bytes in one file or folder name: ext4, XFS, APFS, NTFS (in UTF-16 units)


def unusable_text(values: dict, run_dir: Path) -> list[str]:
    """Strings of a recipe (`values`: Recipe.model_dump()) that no run can use, each as one problem naming its key:
    a NUL character or a lone surrogate, which YAML's escapes (\\0, \\x00, \\ud800) allow in any string, and which no
    file name holds and UTF-8 cannot write (the run folder keeps the recipe as UTF-8 text); and in a value naming a
    file or folder, a name longer than file systems allow. The checks of what the paths point at raise OSError or
    ValueError on such strings, so they come first."""
    problems = []
    for key, text in _strings(values, ""):
        if "\x00" in text:
            problems.append(f"{key}: {_short(text)} holds a NUL character (a \\0 or \\x00 escape): remove it")
        elif any("\ud800" <= c <= "\udfff" for c in text):
            problems.append(
                f"{key}: {_short(text)} holds a lone surrogate (an escape such as \\ud800), which is no character and "
                f"cannot be written as UTF-8: write the character itself (or one \\U0001F600-style escape for it)"
            )
        elif key.rsplit(".", 1)[-1] in PATH_KEYS:
            problems += _long_name(key, text)
    if not problems:
        problems += _long_name("output_dir", str(run_dir))  # with ${name} filled in
    return list(dict.fromkeys(problems))


def _long_name(key: str, path: str) -> list[str]:
    part = next((p for p in path.split("/") if len(p.encode("utf-8")) > NAME_MAX), None)
    if part is None:
        return []
    return [
        f"{key}: the name {_short(part)} is {len(part.encode('utf-8'))} bytes long, and file systems allow "
        f"{NAME_MAX} bytes in a file or folder name: shorten it"
    ]


def _strings(value, key: str):
    """(dotted key, string) for every string in a recipe's plain data, stages named as stages[i]."""
    if isinstance(value, str):
        yield key, value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from _strings(v, f"{key}.{k}" if key else str(k))
    elif isinstance(value, list | tuple):
        for i, v in enumerate(value):
            yield from _strings(v, f"{key}[{i}]")


def _short(text: str, n: int = 40) -> str:
    shown = repr(text)
    return shown if len(shown) <= n else shown[: n - 4] + "...'"
