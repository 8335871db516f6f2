"""Built-in shallow students: a built-in model with some of its decoder layers, to distill the whole model into
(`type: distill`, alignlab/stages/distill.py). Built on first use from the source model's folder, without a
download of its own: `builtin:smollm2-135m-instruct-half` is `builtin:smollm2-135m-instruct` with every other
decoder layer (0, 2, ..., 28: 15 of 30), its embeddings, final norm, tied head and tokenizer unchanged, the way
DistilBERT (Sanh et al. 2019, arXiv 1910.01108, sec. 3) initialises its student from one layer of two.

Dropping half the layers breaks the model before distillation: on the first six builtin:prose paragraphs its NLL per
token is 13.8 against the whole model's 3.2 (KL to the whole model 10.9 per token; keeping the odd layers instead:
16.1, and the even ones up to 26 plus the last: 15.5). Distillation is what repairs it.

Cache: `<cache>/builtin/<name>-v<version>`, built in a temporary folder and renamed into place (alignlab/cache.py),
with `alignlab-source.json` saying which layers of which model it holds.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from alignlab.cache import MARKER_FILE, build_once, cache_root

__all__ = ["SHALLOW_MODELS", "ShallowModel", "built_shallow_path", "shallow_model_path"]


@dataclass(frozen=True)
class ShallowModel:
    """A student made of `layers` (indices into the decoder layers) of built-in pretrained model `source`."""

    source: str
    layers: tuple[int, ...]
    description: str
    version: int = 1


SHALLOW_MODELS: dict[str, ShallowModel] = {
    "smollm2-135m-instruct-half": ShallowModel(
        source="smollm2-135m-instruct",
        layers=tuple(range(0, 30, 2)),
        description="SmolLM2-135M-Instruct's decoder layers 0, 2, ..., 28 (15 of 30): a student to distill it into",
    ),
}


def _model_dir(name: str, cache_dir) -> Path:
    return cache_root(cache_dir) / "builtin" / f"{name}-v{SHALLOW_MODELS[name].version}"


def built_shallow_path(name: str, cache_dir: str | Path | None = None) -> Path | None:
    """The folder of `name` when it is already built (validate never builds), else None."""
    path = _model_dir(name, cache_dir)
    return path if (path / MARKER_FILE).exists() else None


def shallow_model_path(name: str, cache_dir: str | Path | None = None) -> Path:
    """Folder of shallow student `name` (safetensors model + tokenizer), built on first use from its source model
    (fetched first when it is not there yet)."""
    from alignlab.builtin.pretrained import pretrained_model_path

    spec = SHALLOW_MODELS[name]
    final = _model_dir(name, cache_dir)
    if built_shallow_path(name, cache_dir) is not None:
        return final
    source = pretrained_model_path(spec.source, cache_dir)

    def build(tmp: Path) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
        keep_layers(model, spec.layers)
        model.save_pretrained(tmp)
        AutoTokenizer.from_pretrained(source).save_pretrained(tmp)
        (tmp / "alignlab-source.json").write_text(
            json.dumps({"builtin": name, "source": f"builtin:{spec.source}", "layers": list(spec.layers)}, indent=2)
            + "\n"
        )

    return build_once(final, build, f"{name} v{spec.version}\n")


def keep_layers(model, layers: tuple[int, ...]) -> None:
    """Keep decoder layers `layers` of a transformers causal LM (in place), renumbered 0 ... len(layers) - 1 (each
    attention layer's index is its slot in the KV cache)."""
    from torch import nn

    count = model.config.num_hidden_layers
    stack = next(m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) == count)
    kept = [stack[i] for i in layers]
    for i, layer in enumerate(kept):
        if hasattr(getattr(layer, "self_attn", None), "layer_idx"):
            layer.self_attn.layer_idx = i
    parent = next(m for m in model.modules() if any(child is stack for child in m.children()))
    name = next(n for n, child in parent.named_children() if child is stack)
    setattr(parent, name, nn.ModuleList(kept))
    config = model.config
    if getattr(config, "layer_types", None) is not None:
        config.layer_types = [config.layer_types[i] for i in layers]
    config.num_hidden_layers = len(layers)
