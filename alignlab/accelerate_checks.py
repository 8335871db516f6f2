"""Accelerate launch settings checked against a recipe before any model loads.

`alignlab validate RECIPE --accelerate-config recipes/accelerate/fsdp2.yaml` reads the file with accelerate's own
loader; `alignlab run` under `accelerate launch` reads the same settings from the environment the launcher sets.
Known-bad combinations are errors (all listed at once); doubtful ones come back as "warning: ..." notes.

- QLoRA under FSDP or ZeRO-3: both shard floating-point tensors only, so the 4-bit weights must be packed in a
  float dtype equal to model.dtype (`peft.quantization.quant_storage`), and 8-bit is not supported (PEFT's FSDP and
  DeepSpeed guides). FSDP also wants fsdp_cpu_ram_efficient_loading: true and fsdp_use_orig_params: false, ZeRO-3
  zero3_init_flag: true (warnings).
- wdpo under FSDP or ZeRO-3: its penalty is a gradient taken with create_graph and differentiated again; sharded
  parameters are gathered per module and freed, which that double backprop does not survive.
- ppo, grpo and generate under DeepSpeed: alignlab's own loops shard their models themselves with FSDP2 (under an
  FSDP config or `parallel.shard: fsdp2`, alignlab/parallel.py) and prepare no dataloader, which DeepSpeed needs for
  its batch size: DDP or FSDP.
- ZeRO-3 without zero3_save_16bit_model: the final model cannot be gathered from the shards.
- DeepSpeed gradient_accumulation_steps / gradient_clipping unequal to the recipe's train keys: the Trainer refuses
  the mismatch, but only after the model has loaded.
- mixed_precision unequal to train.bf16 / train.fp16 (warning): the stage uses the recipe's when it sets one.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

from alignlab.losses.catalog import preference_loss_info
from alignlab.recipe import QuantizationSpec, Recipe, RecipeError, TrainSpec
from alignlab.stages.registry import stage_record
from alignlab.stages.specs import PreferenceLossSpec
from alignlab.stages.types import sharding_problem

UNSUPPORTED = {"XLA": "TPUs", "MEGATRON_LM": "Megatron-LM"}
FLOAT_DTYPES = ("float32", "bfloat16", "float16")


def load_launch_config(path: str | Path) -> dict:
    """An accelerate config file (`accelerate launch --config_file`), parsed by accelerate itself, as the plain
    settings `check_launch` reads."""
    import yaml
    from accelerate.commands.config.config_args import load_config_from_file

    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"accelerate config not found: {path}")
    try:
        cfg = load_config_from_file(str(path))
    except (ValueError, TypeError, AttributeError, KeyError, yaml.YAMLError) as e:
        raise RecipeError(f"accelerate config {path}: accelerate cannot read it: {e}") from e
    ds = dict(getattr(cfg, "deepspeed_config", None) or {})
    if ds.get("deepspeed_config_file"):
        ds.update(_deepspeed_json(Path(ds["deepspeed_config_file"])))
    fsdp = {k.removeprefix("fsdp_"): v for k, v in (getattr(cfg, "fsdp_config", None) or {}).items()}
    return {
        "source": str(path),
        "distributed_type": getattr(cfg.distributed_type, "value", str(cfg.distributed_type)),
        "mixed_precision": cfg.mixed_precision or "no",
        "num_machines": getattr(cfg, "num_machines", 1),
        "main_process_ip": getattr(cfg, "main_process_ip", None),
        "fsdp": fsdp,
        "deepspeed": ds,
    }


def launch_config_from_env(env=os.environ) -> dict | None:
    """The same settings from the environment `accelerate launch` gives each process; None outside a launch."""
    if env.get("ACCELERATE_USE_FSDP", "").lower() == "true":
        dist = "FSDP"
    elif env.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":
        dist = "DEEPSPEED"
    elif int(env.get("WORLD_SIZE", "1")) > 1:
        dist = "MULTI_GPU"
    else:
        return None
    ds = {
        "zero_stage": env.get("ACCELERATE_DEEPSPEED_ZERO_STAGE"),
        "zero3_init_flag": env.get("ACCELERATE_DEEPSPEED_ZERO3_INIT"),
        "zero3_save_16bit_model": env.get("ACCELERATE_DEEPSPEED_ZERO3_SAVE_16BIT_MODEL"),
        "gradient_accumulation_steps": env.get("ACCELERATE_GRADIENT_ACCUMULATION_STEPS"),
        "gradient_clipping": env.get("ACCELERATE_GRADIENT_CLIPPING"),
    }
    if env.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "none") != "none":
        ds.update(_deepspeed_json(Path(env["ACCELERATE_DEEPSPEED_CONFIG_FILE"])))
    fsdp = {
        "version": env.get("FSDP_VERSION", "1"),
        "use_orig_params": env.get("FSDP_USE_ORIG_PARAMS"),
        "cpu_ram_efficient_loading": env.get("FSDP_CPU_RAM_EFFICIENT_LOADING"),
    }
    return {
        "source": "the accelerate launch settings",
        "distributed_type": dist,
        "mixed_precision": env.get("ACCELERATE_MIXED_PRECISION", "no"),
        "num_machines": 1,  # the launcher already reached every machine
        "main_process_ip": env.get("MASTER_ADDR"),
        "fsdp": fsdp,
        "deepspeed": ds,
    }


def check_launch(recipe: Recipe, cfg: dict) -> list[str]:
    """Raise RecipeError listing every known-bad combination of `recipe` and launch settings `cfg`; return warnings."""
    problems: list[str] = []
    warnings: list[str] = []
    dist = cfg["distributed_type"]
    fsdp = cfg["fsdp"] if dist == "FSDP" else None
    ds = cfg["deepspeed"] if dist == "DEEPSPEED" else None
    zero = int(_num(ds.get("zero_stage")) or 2) if ds is not None else None  # accelerate's default stage is 2
    sharded = fsdp is not None or zero == 3
    engine = "FSDP" if fsdp is not None else f"DeepSpeed ZeRO-{zero}" if ds is not None else dist

    if dist in UNSUPPORTED:
        problems.append(f"distributed_type {dist} ({UNSUPPORTED[dist]}) is not supported; use DDP, FSDP or DeepSpeed")
    if ds is not None and importlib.util.find_spec("deepspeed") is None:
        warnings.append("deepspeed is not installed here; install it where you launch (pip install deepspeed)")
    if zero == 3 and not _true(ds.get("zero3_save_16bit_model")):
        problems.append(
            "ZeRO-3 needs zero3_save_16bit_model: true in deepspeed_config: a stage's final model is gathered from "
            "the shards as 16-bit weights, which DeepSpeed allows only then"
        )
    if (cfg.get("num_machines") or 1) > 1 and not cfg.get("main_process_ip"):
        problems.append("num_machines > 1 needs main_process_ip: the address of the machine with machine_rank 0")

    q = recipe.peft.quantization or QuantizationSpec()
    if recipe.peft.quantized and sharded:
        if q.bits == 8:
            problems.append(f"peft.quantization.bits: 8 cannot be sharded by {engine}; use bits: 4 (4-bit QLoRA is)")
        elif q.quant_storage not in FLOAT_DTYPES:
            dtype = recipe.model.dtype if recipe.model.dtype in FLOAT_DTYPES else "bfloat16"
            problems.append(
                f"peft.quantization.quant_storage is {q.quant_storage}: {engine} shards floating-point tensors only, "
                f"so QLoRA's 4-bit weights must be packed in a float dtype. Set quant_storage: {dtype} and "
                f"model.dtype: {dtype} (PEFT's FSDP/DeepSpeed QLoRA guides)"
            )
        elif q.quant_storage != recipe.model.dtype:
            problems.append(
                f"model.dtype is {recipe.model.dtype} but peft.quantization.quant_storage is {q.quant_storage}: under "
                f"{engine} every tensor in a shard has one dtype; set model.dtype: {q.quant_storage}"
            )
        if fsdp is not None and not _true(fsdp.get("cpu_ram_efficient_loading")):
            warnings.append("QLoRA under FSDP: set fsdp_cpu_ram_efficient_loading: true (PEFT's FSDP-QLoRA guide)")
        if fsdp is not None and str(fsdp.get("version", 1)) != "2" and _true(fsdp.get("use_orig_params")):
            warnings.append("QLoRA under FSDP: PEFT's FSDP-QLoRA guide sets fsdp_use_orig_params: false")
        if zero == 3 and str(ds.get("zero3_init_flag")).lower() == "false":
            warnings.append("QLoRA under ZeRO-3: set zero3_init_flag: true (PEFT's DeepSpeed QLoRA guide)")

    for i, spec in enumerate(recipe.stages):
        where = f"stages[{i}] ({spec.name})"
        loss = getattr(spec, "loss", None)
        preference = isinstance(loss, PreferenceLossSpec)  # an sft stage's loss (nll, unlikelihood) shards as any
        unshardable_loss = preference and not preference_loss_info(loss.name).shardable
        if unshardable_loss and sharded:
            problems.append(
                f"{where}.loss.name: {loss.name} differentiates its loss twice (a penalty on the gradient w.r.t. the "
                f"input embeddings, taken with create_graph); {engine} gathers and frees sharded parameters module by "
                f"module, which that double backprop does not survive. Use ddp.yaml or zero2.yaml, or another loss"
            )
        elif unshardable_loss and ds is not None:
            warnings.append(f"{where}: {loss.name} under DeepSpeed ZeRO-{zero} is untested; DDP is the tested setup")
        if fsdp is not None and (
            problem := sharding_problem(recipe, spec, f"{where}: the FSDP config (alignlab's own loop)")
        ):
            problems.append(problem)
        why = stage_record(spec.type).not_under_deepspeed
        if why and ds is not None:
            problems.append(
                f"{where}: {why}; it runs under DDP (ddp.yaml, multinode.yaml) or FSDP (fsdp2.yaml), not {engine}"
            )
        train = getattr(spec, "train", None)
        if not isinstance(train, TrainSpec):  # the trainer stages' keys (an own loop's train: has no such keys)
            continue
        if ds is not None:
            for ds_key, key, ours in (
                ("gradient_accumulation_steps", "gradient_accumulation_steps", train.gradient_accumulation_steps),
                ("gradient_clipping", "max_grad_norm", train.max_grad_norm),
            ):
                theirs = _num(ds.get(ds_key))
                if theirs is not None and theirs != ours:
                    problems.append(
                        f"deepspeed_config.{ds_key} is {theirs:g} but {where}.train.{key} is {ours:g}; the Trainer "
                        f"refuses the mismatch (after the model loads). Remove {ds_key} from the accelerate config "
                        f"(then the recipe's value is used) or make the two equal"
                    )
        mine = "bf16" if train.bf16 else "fp16" if train.fp16 else "no"
        theirs = cfg.get("mixed_precision") or "no"
        if mine != theirs:
            runs = mine if mine != "no" else theirs
            warnings.append(
                f"mixed precision: the accelerate config says {theirs}, {where}.train says {mine} (bf16/fp16 keys); "
                f"this stage trains in {runs}. Make them agree"
            )
    if problems:
        raise RecipeError(
            f"{recipe.source or recipe.name} cannot run with {cfg['source']}:\n  - " + "\n  - ".join(problems)
        )
    return [f"warning: {w}" for w in warnings]


def _deepspeed_json(path: Path) -> dict:
    if not path.is_file():
        raise RecipeError(f"deepspeed_config_file not found: {path}")
    raw = json.loads(path.read_text())
    zero = raw.get("zero_optimization", {})
    keys = ("gradient_accumulation_steps", "gradient_clipping")
    saved = zero.get("stage3_gather_16bit_weights_on_model_save", False)
    return {"zero_stage": zero.get("stage"), "zero3_save_16bit_model": saved, **{k: raw[k] for k in keys if k in raw}}


def _num(value) -> float | None:
    """A number from a config value; None for unset or "auto"."""
    if value is None or str(value).lower() in ("auto", "none", ""):
        return None
    return float(value)


def _true(value) -> bool:
    return str(value).lower() == "true"
