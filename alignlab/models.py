"""Model builders shared by every stage: tokenizer, base model (optionally 4/8-bit), PEFT, and the hand-off
from one stage's output to the next stage's trainable model and reference.

Hand-off rules (the part other tools leave to users):
- previous output is an adapter: load its base (quantized again for QLoRA) and continue the SAME adapter;
  the reference for DPO/PPO is that adapter frozen (a second, frozen copy "ref" on the same backbone), so the
  reference is the SFT model, not the raw base, and no second backbone is held in memory;
- previous output is full weights (full fine-tuning, or `merge: true`): load them; apply a fresh adapter
  when the recipe asks for PEFT; the reference is the input model with the new adapter disabled;
- no previous stage: the recipe's base model, with a fresh adapter when PEFT is on.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from alignlab.contract import StageOutput
    from alignlab.recipe import Recipe

log = logging.getLogger(__name__)

REF_ADAPTER = "ref"  # the name TRL's trainers look for when the reference is a frozen copy of the adapter


def resolve_base(recipe: Recipe) -> str:
    """The base model's folder or hub id: builtin:NAME built or fetched, a GGUF source converted (both cached)."""
    from alignlab.builtin import resolve_model_name
    from alignlab.gguf import converted_gguf_path, gguf_source

    gguf = gguf_source(recipe)
    if gguf is not None:
        return str(converted_gguf_path(gguf, key="model.gguf_file" if recipe.model.gguf_file else "model.name_or_path"))
    return resolve_model_name(recipe.model.name_or_path)


def load_tokenizer(recipe: Recipe, path: str | None = None, gguf_file: str | None = None):
    """`gguf_file`: read the tokenizer from this GGUF file in folder `path` (validate, before conversion)."""
    from transformers import AutoTokenizer

    spec = recipe.model
    src = spec.tokenizer or path or resolve_base(recipe)
    extra = {"gguf_file": gguf_file} if gguf_file and not spec.tokenizer else {}
    tok = AutoTokenizer.from_pretrained(src, revision=spec.revision, trust_remote_code=spec.trust_remote_code, **extra)
    if spec.chat_template:
        tok.chat_template = recipe.resolve_path(spec.chat_template).read_text()
    if tok.pad_token is None:
        # Padding is masked everywhere; EOS as pad is the usual fallback for models shipped without one.
        tok.pad_token = tok.eos_token
    return tok


def _dtype(name: str):
    import torch

    return "auto" if name == "auto" else getattr(torch, name)


def load_causal_lm(
    recipe: Recipe,
    path: str,
    *,
    quantize: bool | None = None,
    head: str = "causal_lm",
    dtype: str | None = None,
    **extra,
):
    """A pretrained model from `path` with the recipe's dtype (or `dtype`), attention and quantization settings."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    spec, peft = recipe.model, recipe.peft
    if spec.trust_remote_code:
        log.warning("trust_remote_code is on: code shipped with %s will run on this machine", path)
    kwargs = dict(
        dtype=_dtype(dtype or spec.dtype),
        trust_remote_code=spec.trust_remote_code,
        revision=spec.revision if path == resolve_base(recipe) else None,
        **extra,
    )
    if spec.attn_implementation:
        kwargs["attn_implementation"] = spec.attn_implementation
    quantize = peft.quantized if quantize is None else quantize
    if quantize:
        kwargs["quantization_config"] = bnb_config(recipe)
    cls = AutoModelForSequenceClassification if head == "sequence_classification" else AutoModelForCausalLM
    model = cls.from_pretrained(path, **kwargs)
    if quantize:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=spec.gradient_checkpointing)
        keep_4bit_layers_differentiable(model)
    if spec.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    return model


def keep_4bit_layers_differentiable(model) -> None:
    """Turn off bitsandbytes' CPU inference repacking of 4-bit weights.

    On CPUs with AVX512-BF16, bitsandbytes (0.50) repacks a Linear4bit's weights the first time the layer runs in
    eval mode without grad: a faster inference layout, with absmax rounded to bf16. The repacking is permanent, and
    from then on every forward, training ones included, goes through a kernel that has no backward. No gradient
    flows through the quantized layer to its input (silently: the adapters below it train on wrong gradients), and
    the outputs shift by the bf16 rounding. PPO's rollouts and every mid-training evaluation run such forwards.
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def bnb_config(recipe: Recipe):
    import torch
    from transformers import BitsAndBytesConfig

    q = recipe.peft.quantization or _default_quant()
    if q.bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=q.quant_type,
        bnb_4bit_use_double_quant=q.double_quant,
        bnb_4bit_compute_dtype=getattr(torch, q.compute_dtype),
        bnb_4bit_quant_storage=getattr(torch, q.quant_storage),
    )


def _default_quant():
    from alignlab.recipe import QuantizationSpec

    return QuantizationSpec()


def lora_config(recipe: Recipe, task_type: str = "CAUSAL_LM"):
    from peft import LoraConfig

    p = recipe.peft
    return LoraConfig(
        r=p.r,
        lora_alpha=p.alpha,
        lora_dropout=p.dropout,
        target_modules=p.target_modules,
        use_dora=p.method == "dora",
        use_rslora=p.use_rslora,
        modules_to_save=p.modules_to_save,
        task_type=task_type,
    )


def load_stage_model(recipe: Recipe, source: StageOutput | None, *, head: str = "causal_lm", ref_adapter=False):
    """The model a stage trains, built from the previous stage's output (see the module docstring).

    `ref_adapter`: when continuing an adapter, also load it a second time, frozen, as adapter "ref", the
    reference policy for DPO/PPO on the same backbone. Returns (model, input_path) where input_path is the
    directory the weights (not the adapter) came from.
    """
    from peft import PeftModel, get_peft_model

    task_type = "SEQ_CLS" if head == "sequence_classification" else "CAUSAL_LM"
    if source is not None and source.kind == "adapter" and source.head == head:
        model = load_causal_lm(recipe, source.base, head=head)
        model = PeftModel.from_pretrained(model, source.path, is_trainable=True)
        if ref_adapter:
            model.load_adapter(source.path, adapter_name=REF_ADAPTER, is_trainable=False)
            model.set_adapter("default")
        return model, source.base
    if source is not None and source.kind == "adapter":
        # A causal-LM adapter feeding a reward model (different head): start from the merged weights, merged by
        # one process while the others wait (several writing the same folder would race).
        path = source.merged_path
        if path is None:
            from accelerate import PartialState

            path = str(Path(source.path).parent / "merged")
            if PartialState().is_main_process:
                merge_adapter(recipe, source, Path(path))
            PartialState().wait_for_everyone()
    else:
        path = source.path if source is not None and source.kind == "full" else resolve_base(recipe)
    model = load_causal_lm(recipe, path, head=head, **({"num_labels": 1} if task_type == "SEQ_CLS" else {}))
    if task_type == "SEQ_CLS" and model.config.pad_token_id is None:
        model.config.pad_token_id = load_tokenizer(recipe, path).pad_token_id
    if recipe.peft.enabled:
        check_target_modules(recipe, model)
        model = get_peft_model(model, lora_config(recipe, task_type))
    return model, path


def meta_model(recipe: Recipe, path: str, gguf_file: str | None = None):
    """The architecture of the model at `path` on the meta device, built from its config.json (or the metadata of
    GGUF file `gguf_file` in folder `path`): module names and shapes for pre-flight checks, without reading (or
    allocating) any weights."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    trust = recipe.model.trust_remote_code
    config = AutoConfig.from_pretrained(
        path, trust_remote_code=trust, **({"gguf_file": gguf_file} if gguf_file else {})
    )
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, trust_remote_code=trust)


def check_target_modules(recipe: Recipe, model) -> None:
    """A LoRA target module that the model lacks is an error that lists the module names it has."""
    targets = recipe.peft.target_modules
    if not recipe.peft.enabled or isinstance(targets, str):
        return
    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    missing = [t for t in targets if t not in names]
    if missing:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if type(m).__name__ == "Linear"})
        raise ValueError(
            f"peft.target_modules: {', '.join(missing)} not found in the model; its linear modules are "
            f"{', '.join(linear)}. Use some of those, or 'all-linear'."
        )


def save_model_atomic(model, tokenizer, final_dir: Path, state_dict: dict | None = None) -> Path:
    """save_pretrained (safetensors) into a temporary folder, then rename it into place, so a crash never
    leaves a half-written model where a good one was. `state_dict`: the full weights gathered from shards."""
    final_dir = Path(final_dir)
    tmp = final_dir.with_name(final_dir.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    model.save_pretrained(tmp, safe_serialization=True, state_dict=state_dict)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    if final_dir.exists():
        old = final_dir.with_name(final_dir.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final_dir, old)
        os.replace(tmp, final_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final_dir)
    return final_dir


def save_stage_model(
    recipe: Recipe, spec, model, tokenizer, out: StageOutput, stage_dir: Path, state_dict=None
) -> None:
    """A stage's final model, saved by the main process: the adapter (without the frozen reference copy, which is
    not part of the output) or full weights into <stage>/model atomically, and merged weights into <stage>/merged
    when the stage says `merge: true` (sets out.merged_path). `state_dict`: full weights gathered from shards."""
    if hasattr(model, "peft_config") and REF_ADAPTER in model.peft_config:
        model.delete_adapter(REF_ADAPTER)
    save_model_atomic(model, tokenizer, stage_dir / "model", state_dict=state_dict)
    if spec.merge and out.kind == "adapter":
        out.merged_path = merge_adapter(recipe, out, stage_dir / "merged")


def merge_adapter(recipe: Recipe, source: StageOutput, out_dir: Path) -> str:
    """Merge an adapter into full-precision base weights and save them (QLoRA: the base is reloaded
    unquantized in the compute dtype, so the merge is not done into 4-bit weights)."""
    from peft import PeftModel

    extra = {"num_labels": 1} if source.head == "sequence_classification" else {}
    base = load_causal_lm(recipe, source.base, quantize=False, head=source.head, **extra)
    merged = PeftModel.from_pretrained(base, source.path).merge_and_unload()
    save_model_atomic(merged, load_tokenizer(recipe, source.base), out_dir)
    return str(out_dir)


def load_frozen_model(
    recipe: Recipe,
    source: StageOutput | None,
    *,
    quantize: bool | None = None,
    move: bool = True,
    dtype: str | None = None,
):
    """A stage's output (or the base model, None) as a frozen model in eval mode: full weights, or an adapter over
    its base; with the head the stage trained (a reward model's: one label). For evaluation and scoring. `move`:
    onto this process's device (False: it stays where it loaded, for sharding to place it unit by unit). `dtype`:
    instead of the recipe's model.dtype."""
    from peft import PeftModel

    head = source.head if source is not None else "causal_lm"
    extra = {"num_labels": 1} if head == "sequence_classification" else {}
    if source is None:
        model = load_causal_lm(recipe, resolve_base(recipe), quantize=quantize, dtype=dtype)
    elif source.kind == "adapter":
        base = load_causal_lm(recipe, source.base, quantize=quantize, head=head, dtype=dtype, **extra)
        model = PeftModel.from_pretrained(base, source.path)
    else:
        model = load_causal_lm(recipe, source.path, quantize=quantize, head=head, dtype=dtype, **extra)
    if move and getattr(model, "hf_device_map", None) is None and not getattr(model, "is_quantized", False):
        from accelerate import PartialState

        model = model.to(PartialState().device)
    return model.eval().requires_grad_(False)


def merged_for_sampling(model):
    """A frozen model for sampling only: an adapter folded into its base's weights (merge_and_unload), the same
    function with no low-rank matmuls beside every layer (~10% faster sampling of SmolLM2-135M + LoRA r 16 on 2 CPU
    cores). Other models, and adapters over quantized bases (a merge into 4-bit weights rounds), come back as they
    are. The model is changed in place: only for a copy nobody reads as an adapter afterwards."""
    from peft import PeftModel

    if isinstance(model, PeftModel) and not getattr(model, "is_quantized", False):
        return model.merge_and_unload().eval().requires_grad_(False)
    return model


def output_tokenizer_dir(recipe: Recipe, source: StageOutput | None) -> str:
    """Where a checkpoint's tokenizer lives: its own folder (stages save one beside the weights), else its
    base's, else the recipe's base model's. A hub id is asked for its own."""
    for candidate in (source.path, source.base) if source is not None else ():
        if not Path(candidate).is_dir() or Path(candidate, "tokenizer_config.json").exists():
            return candidate
    return resolve_base(recipe)
