"""Sharding for the stages alignlab runs itself (ppo, grpo, generate, eval): torch's FSDP2 (`fully_shard`).

`parallel: {shard: fsdp2}` (the recipe's, or a stage's own) splits every parameter of the model a stage trains or
samples over the processes of the run: `fully_shard` on each decoder layer (the classes a transformers model names
in `_no_split_modules`, as accelerate's transformer wrap policy picks them), then on the root (embeddings, final
norm, LM head and, for PPO, the value head). Each process holds 1/N of the parameters, of their gradients and of
AdamW's state; a layer's weights are all-gathered when it runs and freed after (forward), gathered again for its
backward, and its gradients reduce-scattered back to the shards, averaged over processes as DDP averages them. So a
sharded run computes what an unsharded one does (other float sums), on CPU (gloo) as on GPUs (nccl), in float32 or
under bf16 autocast (on GPUs: FSDP2's MixedPrecisionPolicy, bf16 parameters and float32 gradient reduction); fp16 is
refused (no loss scaling here). The model is not moved to the device first: fully_shard moves each unit as it shards
it, so a GPU never holds more than the shards and one whole unit (each process still reads the whole checkpoint into
CPU memory).

LoRA under sharding: the adapters live inside the decoder layers, so they are sharded with them (one unit per
layer: frozen base weights and trainable A/B together, which FSDP2 allows). The frozen "ref" adapter and the
adapter-disabled backbone keep working as the reference: they are the same modules.

Sampling (`parallel.gather`): decoding runs the model once per new token. `once` (default) gathers every layer's
weights when a sampling pass starts and frees them when it ends (`gathered`): one all-gather per layer per pass, and
the whole model's weights on each device meanwhile. `per_layer` gathers a layer each time it runs: 1/N of the
weights plus one layer held, at one all-gather per layer per token (bench/shard_memory.py measures both).
Processes that sample different numbers of tokens keep stepping together (`synced`), since every all-gather needs
every process.

Checkpoints of a sharded recipe are written with torch.distributed.checkpoint (each process writes its shards, the
optimizer state keyed by parameter name), so a checkpoint written by N processes resumes on M (alignlab/rl/loop.py).
The stage's final model is gathered into whole tensors and saved as an ordinary Hugging Face folder.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

log = logging.getLogger("alignlab")


class Sharding:
    """What a stage's `parallel` setting means on this run. `requested`: the recipe asks for fsdp2 (its checkpoints
    are then distributed checkpoints, whatever the process count); `enabled`: there is more than one process to shard
    over. `state`: an Accelerator or accelerate's PartialState."""

    def __init__(self, setting, state, where: str):
        import os

        # An FSDP accelerate config (distributed_type FSDP, GPUs only) asks for sharding too, even on one process:
        # accelerate would otherwise wrap the model itself. Read from the launcher's environment: a PartialState
        # reports FSDP only once an Accelerator has been built in the process.
        by_launcher = os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true"
        self.requested = setting.shard == "fsdp2" or by_launcher
        self.gather = setting.gather
        self.world_size = state.num_processes
        self.device = torch.device(state.device)
        self.enabled = self.requested and (self.world_size > 1 or by_launcher)
        self.mixed_precision = getattr(state, "mixed_precision", "no")
        self._mesh = None
        if by_launcher and setting.shard != "fsdp2":
            log.info("%s: sharded with FSDP2 (the accelerate config's distributed_type is FSDP)", where)
        if self.requested and not self.enabled:
            log.info("%s: parallel.shard fsdp2 with one process: nothing to shard, the stage runs unsharded", where)
        if self.enabled and self.mixed_precision == "fp16":
            from alignlab.recipe import RecipeError

            raise RecipeError(
                f"{where}: parallel.shard fsdp2 under fp16 mixed precision: alignlab's sharded loops scale no loss, so "
                "small fp16 gradients would round to zero. Use mixed_precision bf16 (or no), or shard: none"
            )

    @property
    def mode(self) -> str:
        return "fsdp2" if self.enabled else "none"

    @property
    def synced(self) -> bool:
        """Whether sampling must keep every process stepping until all are done (per-layer gathers are collective)."""
        return self.enabled and self.gather == "per_layer"

    # ------------------------------------------------------------------------------------------------ sharding

    def shard(self, root: nn.Module) -> nn.Module:
        """fully_shard each decoder layer inside `root`, then `root` itself (in place; returns `root`). A no-op
        when not enabled."""
        if not self.enabled:
            return root
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        if self._mesh is None:
            self._mesh = init_device_mesh(self.device.type, (self.world_size,))
            if self.device.type == "cpu":
                return_freed_memory()
        # No root.to(device): fully_shard moves each unit to the mesh's device as it shards it, so a GPU never holds
        # more than the shards and one whole unit (the model stays where it was loaded until then).
        kwargs = {"mesh": self._mesh}
        policy = self._mixed_precision_policy()
        if policy is not None:
            kwargs["mp_policy"] = policy
        layers = decoder_layers(root)
        if not layers:
            raise ValueError(
                f"parallel.shard fsdp2: found no decoder layers in {type(root).__name__} (looked for the classes its "
                "transformers model lists in _no_split_modules); use shard: none for this model"
            )
        for layer in layers:
            fully_shard(layer, **kwargs)
        fully_shard(root, **kwargs)
        # The root is the first module to run forward, which is how FSDP2 tells it from the layers. Sampling calls
        # the model inside a wrapper (the policy inside PPO's value-head module), so fix the roles now.
        root._get_fsdp_state()._lazy_init()
        return root

    def _mixed_precision_policy(self):
        """bf16/fp16 parameters in forward and backward, gradients reduced in float32: on GPUs under accelerate's
        mixed precision. On CPU accelerate's autocast does the casting (as unsharded)."""
        if self.device.type == "cpu" or self.mixed_precision not in ("bf16", "fp16"):
            return None
        from torch.distributed.fsdp import MixedPrecisionPolicy

        dtype = torch.bfloat16 if self.mixed_precision == "bf16" else torch.float16
        return MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)

    @contextmanager
    def gathered(self, root: nn.Module) -> Iterator[None]:
        """While sampling from `root` (or a module inside it, called directly): with gather `once`, every layer's
        weights all-gathered on entry and kept until exit; with `per_layer`, only the root's own (embeddings, head),
        each layer gathering itself when it runs. Every process must enter together. A no-op when not enabled."""
        from torch.distributed.fsdp import FSDPModule

        if not self.enabled:
            yield
            return
        units = [m for m in root.modules() if isinstance(m, FSDPModule)]
        if self.gather == "per_layer":
            units = [root]
        for unit in units:
            unit.unshard()
            unit.set_reshard_after_forward(False, recurse=False)
        try:
            yield
        finally:
            for unit in units:  # FSDP2's defaults: layers reshard after forward, the root does not
                unit.set_reshard_after_forward(unit is not root, recurse=False)
                unit.reshard()

    # ------------------------------------------------------------------------------------------------ state

    def full_state(self, module: nn.Module, trainable_only: bool = False) -> dict[str, torch.Tensor]:
        """Whole tensors of `module`'s state dict (its trainable parameters only, with `trainable_only`), on the CPU
        of the main process ({} on the others; every process must call it). Unsharded: the tensors themselves."""
        if not self.enabled:
            return {
                n: t.detach() for n, t in module.state_dict().items() if not trainable_only or n in _trainable(module)
            }
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=trainable_only)
        state = get_model_state_dict(module, options=options)
        return only_trainable(module, state) if trainable_only else state

    def load_full_state(self, module: nn.Module, state: dict[str, torch.Tensor]) -> None:
        """Copy whole tensors into `module`'s parameters (its shards of them when sharded); every process passes
        the same `state`."""
        if not self.enabled:
            own = dict(module.named_parameters())
            with torch.no_grad():
                for name, tensor in state.items():
                    own[name].copy_(tensor)
            return
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(module, state, options=StateDictOptions(full_state_dict=True, strict=False))

    def record(self, module: nn.Module) -> dict:
        """What stage_output.json records: {shard, world_size, params_per_rank, trainable_per_rank}: the parameter
        elements this process holds, all and trainable (each of the latter also has a gradient and AdamW's two
        moments)."""
        return {
            "shard": self.mode,
            "world_size": self.world_size,
            "params_per_rank": params_per_rank(module),
            "trainable_per_rank": params_per_rank(module, trainable_only=True),
        }


def return_freed_memory() -> None:
    """Serve CPU allocations of 128 KiB and more with their own mappings (glibc's M_MMAP_THRESHOLD), so that memory
    freed is given back to the system at once. Sharding allocates and frees a buffer of every layer's size at every
    gather; glibc's default threshold grows past those sizes and serves them from its heap instead, where they
    fragment: measured with 2 processes on SmolLM2-135M (full fine-tuning GRPO, bench/shard_memory.py), the sharded
    process's peak RSS went from 1.13x DDP's to 0.60x with it. A no-op where the C library is not glibc."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        libc.mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD (glibc's malloc.h)
    except (OSError, AttributeError, TypeError):
        pass


def decoder_layers(root: nn.Module) -> list[nn.Module]:
    """The decoder layers inside `root`: modules whose class a transformers model inside it names in
    `_no_split_modules` (LlamaDecoderLayer, Qwen2DecoderLayer, ...), innermost first (FSDP2 shards a module's
    children before it)."""
    names: set[str] = set()
    for m in root.modules():
        names.update(getattr(m, "_no_split_modules", None) or ())
    return [m for m in reversed(list(root.modules())) if type(m).__name__ in names]


def only_trainable(module: nn.Module, state: dict) -> dict:
    """`state` without the frozen tensors that ignore_frozen_params lets through: a frozen weight tied to another name
    (the LM head tied to the embeddings) keeps its second name."""
    keep = {n for n, p in module.named_parameters(remove_duplicate=False) if p.requires_grad}
    return {k: v for k, v in state.items() if k in keep}


def params_per_rank(module: nn.Module, trainable_only: bool = False) -> int:
    """Parameter elements this process holds (its shards, when sharded)."""
    from torch.distributed.tensor import DTensor

    return sum(
        p.to_local().numel() if isinstance(p, DTensor) else p.numel()
        for p in module.parameters()
        if p.requires_grad or not trainable_only
    )


def _trainable(module: nn.Module) -> set[str]:
    return {n for n, p in module.named_parameters() if p.requires_grad}
