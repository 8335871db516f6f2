"""`alignlab plan RECIPE --gpus N --gpu-memory 80GB`: memory per GPU of each stage under DDP, FSDP2 and FSDP2 with
CPU offload, estimated from the model's config.json alone (the architecture is built on the meta device: shapes,
never weights), and the cheapest engine that fits, or what to change.

Per process, for a stage that trains (bytes; P: parameters, T: trainable parameters, N: processes):
- weights P x their dtype (QLoRA: 4-bit linear weights, 0.53 bytes each with their quantization constants; the
  rest in the compute dtype); gradients T and AdamW's two moments 2 T in the trainable parameters' dtype (LoRA
  adapters are float32); DDP keeps its gradient buckets beside the gradients (T once more);
- activations saved for backward, per decoder layer: rows x length x (10 H + 4 I) values (the norms', attention
  projections', rotary and MLP inputs of a Llama-style block; H hidden size, I MLP width), plus rows x heads x
  length^2 for eager attention's probabilities, in the compute dtype; with gradient checkpointing one layer's worth
  plus every layer's input; and the logits with their log-softmax in float32, twice: rows x length x vocab (ppo
  and grpo: the response's tokens only);
- the reference: a frozen copy of the weights when the stage needs one and trains full weights (under LoRA it is
  the same backbone); a reward model (`reward_model`): as large as the policy (alignlab's reward stages train one
  from the same base), whole on every process;
- sampling (ppo, grpo, generate, eval): the KV cache, 2 x layers x KV heads x head size x rows x length.
FSDP2 divides weights, gradients, optimizer state and the reference by N and adds two gathered decoder layers;
sampling with `parallel.gather: once` holds every weight meanwhile (`per_layer` does not). FSDP2 + CPU offload (the
trainer stages, under accelerate's fsdp_offload_params) keeps weights, gradients and optimizer state in CPU memory:
the GPU holds gathered layers, activations and the KV cache; alignlab's own loops do not offload.

How close it is: bench/plan_check.py runs it on the settings of the CPU benches (bench/results/shard_memory.json,
peft_memory.json) and prints estimate / measured peak (docs/multi-gpu.md has the numbers). It is an estimate:
allocator overhead, fragmentation and CUDA's context (~0.5-1 GB) come on top.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from alignlab.stages.registry import stage_record

GB = 1e9
BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
ENGINES = ("DDP", "FSDP2", "FSDP2 + CPU offload")


@dataclass
class ModelShape:
    """What the estimate needs of a model, read off its architecture on the meta device."""

    params: int
    linear_params: int  # in the decoder layers' linear modules (what QLoRA quantizes)
    largest_layer: int  # parameters of one decoder layer (FSDP2's unit)
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    lora: dict[int, int] = field(default_factory=dict)  # rank -> adapter parameters at that rank


@dataclass
class Estimate:
    stage: str
    parts: dict[str, float]  # bytes per process, DDP
    engines: dict[str, float]  # bytes per GPU
    cpu_offloaded: float  # bytes in CPU memory per process under offload
    rows: int
    length: int
    gathered_for_sampling: float = 0.0  # bytes FSDP2 adds while sampling with gather: once


def model_shape(recipe, path: str, r: int) -> ModelShape:
    """Counts from the architecture of the model at `path`, built on the meta device from its config.json."""
    from torch import nn

    from alignlab.models import meta_model
    from alignlab.parallel import decoder_layers
    from alignlab.recipe import RecipeError

    try:
        model = meta_model(recipe, path, None if path.endswith(".json") else recipe.model.gguf_file)
    except OSError as e:
        raise RecipeError(
            f"alignlab plan reads the model's config.json, and {path} has none here ({type(e).__name__}). Offline, "
            "give it with --config FILE (e.g. `huggingface-cli download ID config.json` where the hub is reachable)"
        ) from None
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    layers = decoder_layers(model)
    targets = recipe.peft.target_modules
    lora, linear = 0, 0
    for layer in layers:
        for name, m in layer.named_modules():
            if isinstance(m, nn.Linear):
                linear += m.weight.numel()
                short = name.rsplit(".", 1)[-1]
                if isinstance(targets, str) or short in targets:
                    lora += r * (m.in_features + m.out_features)
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return ModelShape(
        params=sum(p.numel() for p in model.parameters()),
        linear_params=linear,
        largest_layer=max(sum(p.numel() for p in layer.parameters()) for layer in layers),
        layers=len(layers),
        hidden=cfg.hidden_size,
        intermediate=getattr(cfg, "intermediate_size", 4 * cfg.hidden_size),
        heads=heads,
        kv_heads=getattr(cfg, "num_key_value_heads", None) or heads,
        head_dim=head_dim,
        vocab=cfg.vocab_size,
        lora={r: lora},
    )


def estimate(recipe, spec, shape: ModelShape, gpus: int, prompt_length: int, *, device: str = "cuda") -> Estimate:
    """Bytes per process of `spec` under each engine (module docstring)."""
    peft = recipe.peft
    dtype = recipe.model.dtype if recipe.model.dtype in BYTES else "float32"
    w_bytes = BYTES[dtype]
    quant = peft.method == "qlora"
    compute = peft.quantization.compute_dtype if quant and peft.quantization else "bfloat16"
    if quant:
        weights = shape.linear_params * 0.53 + (shape.params - shape.linear_params) * BYTES[compute]
    else:
        weights = shape.params * w_bytes
    work = stage_record(spec.type).workload(spec, prompt_length)
    rows, length, sampled, trains = work.rows, work.length, work.sampled, work.trains
    lora = peft.method in ("lora", "dora", "qlora")
    trainable = (shape.lora.get(peft.r, 0) if lora else shape.params) if trains else 0
    t_bytes = 4 if lora else w_bytes
    grads, optim = trainable * t_bytes, 2 * trainable * t_bytes
    act_bytes = 2 if (device == "cuda" and dtype != "float32") or quant else 4
    eager = recipe.model.attn_implementation == "eager" or device == "cpu"
    per_layer = rows * length * (10 * shape.hidden + 4 * shape.intermediate)
    per_layer += rows * shape.heads * length * length if eager else 0
    if recipe.model.gradient_checkpointing:
        activations = (shape.layers * rows * length * shape.hidden + per_layer) * act_bytes
    else:
        activations = shape.layers * per_layer * act_bytes
    logit_length = min(work.scored, length) if work.scored else length
    activations += 2 * rows * logit_length * shape.vocab * 4 if trains else 0
    kv = 2 * shape.layers * shape.kv_heads * shape.head_dim * sampled * length * act_bytes  # 0 when nothing samples
    reference = weights if work.reference and not lora else 0.0  # LoRA: the adapter-free backbone is the reference
    parts = {
        "weights": weights,
        "gradients": grads,
        "ddp buckets": grads if gpus > 1 else 0.0,
        "optimizer": optim,
        "activations": activations,
        "reference": reference,
        "kv cache": kv,
        "reward model": shape.params * w_bytes if getattr(spec, "reward_model", None) else 0.0,
    }
    unit = 2 * shape.largest_layer * (BYTES[compute] if quant else w_bytes)
    states = weights + grads + optim + reference
    ddp = sum(parts.values())
    once = recipe.parallel_for(spec).gather == "once"
    sampling_gather = weights * (1 - 1 / gpus) if sampled and once else 0.0
    fsdp = states / gpus + unit + activations + kv + sampling_gather + parts["reward model"]
    offload = unit + activations + kv + parts["reward model"]
    if spec.SHARDABLE:  # alignlab's own loops shard, but do not offload
        offload = math.inf

    engines = dict(zip(ENGINES, (ddp, fsdp, offload)))
    return Estimate(spec.name, parts, engines, states / gpus, rows, length, sampling_gather)


def advice(recipe, spec, est: Estimate, budget: float) -> str:
    """The cheapest engine that fits in `budget` bytes per GPU, or what to change."""
    for engine in ENGINES:
        if est.engines[engine] <= budget:
            return engine
    tips = []
    if recipe.parallel_for(spec).gather == "once" and est.gathered_for_sampling > 0:
        if est.engines["FSDP2"] - est.gathered_for_sampling <= budget:
            return "FSDP2 with parallel.gather: per_layer (sampling gathers one layer at a time)"
        tips.append("parallel.gather: per_layer")
    if recipe.peft.method == "none" and est.parts["optimizer"] > 0:
        tips.append("peft.method: lora")
    elif recipe.peft.method == "lora":
        tips.append("peft.method: qlora")
    if est.parts["activations"] > 0.3 * budget:
        tips.append(f"a smaller batch ({est.rows} rows of {est.length} tokens now)")
        if not recipe.model.gradient_checkpointing:
            tips.append("model.gradient_checkpointing: true")
    if est.parts["kv cache"] > 0.3 * budget:
        tips.append("fewer rows sampled at once, or fewer max_new_tokens")
    return "does not fit: try " + (", ".join(tips) if tips else "more GPUs")


def plan(
    recipe, gpus: int, gpu_memory: float, prompt_length: int = 256, device: str = "cuda", config: str | None = None
) -> str:
    """The plan as Markdown: one row per stage (GB per GPU under each engine, and the verdict). `config`: a
    config.json (or its folder) to read instead of the recipe's model's."""
    from alignlab.models import resolve_base

    shape = model_shape(recipe, str(config) if config else resolve_base(recipe), recipe.peft.r)
    size = f"{shape.params / 1e9:.2f}B" if shape.params >= 1e9 else f"{shape.params / 1e6:.1f}M"
    lines = [
        f"{recipe.name}: {size} parameters ({shape.layers} layers), peft {recipe.peft.method}, "
        f"model.dtype {recipe.model.dtype}, {gpus} GPU(s) of {gpu_memory / GB:.0f} GB; prompts of {prompt_length} "
        "tokens assumed",
        "",
        "| stage | type | rows x tokens | " + " | ".join(f"{e} GB" for e in ENGINES) + " | plan |",
        "|---|---|---|" + "---|" * len(ENGINES) + "---|",
    ]
    for spec in recipe.stages:
        est = estimate(recipe, spec, shape, gpus, prompt_length, device=device)
        cells = " | ".join(f"{est.engines[e] / GB:.1f}" if math.isfinite(est.engines[e]) else "-" for e in ENGINES)
        size = f"{est.rows} x {est.length}" if est.rows else f"samples {est.length} tokens"
        lines.append(f"| {spec.name} | {spec.type} | {size} | {cells} | {advice(recipe, spec, est, gpu_memory)} |")
    lines += [
        "",
        "Estimates per GPU before allocator overhead and the CUDA context (~0.5-1 GB); FSDP2 + CPU offload also holds "
        "each process's share of weights, gradients and optimizer state in CPU memory. How close they come: "
        "docs/multi-gpu.md.",
    ]
    return "\n".join(lines)


def parse_memory(text: str) -> float:
    """'80GB', '80 GiB', '24g', '80' (GB) -> bytes."""
    t = text.strip().lower().replace(" ", "")
    units = {"gib": 2**30, "gb": GB, "g": GB, "mib": 2**20, "mb": 1e6}
    for unit, scale in units.items():
        if t.endswith(unit):
            return float(t[: -len(unit)]) * scale
    value = float(t)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(text)
    return value * GB
