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
