"""The optimizer's parameter groups: layer-wise learning-rate decay (`train.layer_lr_decay`), for TRL's trainers
(alignlab/stages/trl_glue.py) and alignlab's own loops (alignlab/rl/loop.py) alike.

Layer-wise learning-rate decay (discriminative fine-tuning: Howard and Ruder 2018, ULMFiT, section 3.2; the
per-layer form of Clark et al. 2020, ELECTRA, appendix A) gives the layers near the input smaller steps, which
protects what pre-training put there. A model with L decoder layers is read as L + 2 depths from the input:

    depth 0         the input embeddings
    depth l         decoder layer l (1 ... L, counted from the input)
    depth L + 1     everything else: the final norm and the head (LM head, reward score, value head)

and a parameter at depth l gets   lr_l = lr * decay^(L + 1 - l):   the head the full rate, the top decoder layer
lr * decay, the embeddings the lowest, lr * decay^(L + 1). A LoRA adapter's matrices sit inside the layer they
adapt, so they get that layer's rate; full fine-tuning and adapters follow the same rule. A head tied to the input
embeddings (SmolLM2's) is one tensor: it is an embedding, and gets the embeddings' rate.

Each group records its depth (`layer`) beside `lr`; the groups are saved with the optimizer state, so a resumed run
restores them.
"""

from __future__ import annotations

from collections.abc import Collection

from torch import nn


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's stack of decoder layers: the outermost ModuleList as long as its config's num_hidden_layers (a
    PEFT wrapper, DDP or the RL loops' own wrappers around it included)."""
    depth = None
    for module in model.modules():
        depth = getattr(getattr(module, "config", None), "num_hidden_layers", None)
        if depth:
            break
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and depth and len(module) == depth:
            return module
    raise ValueError(
        f"train.layer_lr_decay: cannot find the decoder layers of {type(model).__name__} (no module list as long as "
        f"its config's num_hidden_layers = {depth}), so the layers' depths are unknown. Remove layer_lr_decay for "
        "this model"
    )


def input_embeddings(model: nn.Module) -> nn.Module | None:
    for module in model.modules():
        if hasattr(module, "get_input_embeddings"):
            return module.get_input_embeddings()
    return None


def parameter_depths(model: nn.Module) -> tuple[dict[int, int], int]:
    """({id(parameter): depth}, L) for every parameter of `model` (see the module docstring)."""
    layers = decoder_layers(model)
    depths = {id(p): len(layers) + 1 for p in model.parameters()}
    for i, layer in enumerate(layers):
        depths.update({id(p): i + 1 for p in layer.parameters()})
    embeddings = input_embeddings(model)
    if embeddings is not None:
        depths.update({id(p): 0 for p in embeddings.parameters()})  # a tied head: the same tensor, an embedding
    return depths, len(layers)


def layer_lr_groups(
    model: nn.Module, lr: float, decay: float, weight_decay: float = 0.0, no_decay: Collection[str] = ()
) -> list[dict]:
    """Parameter groups of `model`'s trainable parameters, one per (depth, weight decay or not), each with its
    rate lr * decay^(L + 1 - depth) and its `layer` (the depth). `no_decay`: names of the parameters that take no
    weight decay (transformers' Trainer exempts biases and norms)."""
    depths, n_layers = parameter_depths(model)
    groups: dict[tuple[int, bool], dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        depth, decays = depths[id(param)], name not in no_decay
        group = groups.setdefault(
            (depth, decays),
            {
                "params": [],
                "lr": lr * decay ** (n_layers + 1 - depth),
                "weight_decay": weight_decay if decays else 0.0,
                "layer": depth,
            },
        )
        group["params"].append(param)
    return [groups[key] for key in sorted(groups)]
