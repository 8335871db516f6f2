"""`alignlab export RUN [--stage NAME] --to DIR`: a finished stage's model as a folder that plain transformers (and,
with --gguf, llama.cpp) loads, with a model card, optionally uploaded to the hub.

    alignlab export runs/sft-dpo-lora --to exported/sft-dpo                  # the last stage that wrote a model
    alignlab export runs/sft-dpo-lora --stage sft --to exported/sft --adapter-only
    alignlab export runs/sft-dpo-lora --to exported/sft-dpo --gguf --gguf-type q8_0 --push-to-hub me/sft-dpo

What DIR holds: merged weights (safetensors, in --dtype; an adapter is merged into float32 base weights first, a
QLoRA base reloaded unquantized), or with --adapter-only the PEFT adapter naming its base; the tokenizer with its
chat template; generation_config.json whose eos_token_id lists the tokens alignlab stops on (the tokenizer's end
token and the chat template's end-of-turn token: `alignlab.generation.end_token_ids`); README.md, the model card
(card.py); with --gguf, one GGUF file (gguf_writer.py).

Refusals, each before any model loads: a folder that is no run, a stage the run does not have or that writes no
model, a stage that has not finished (or, for the default stage, any unfinished stage: the run is unfinished), a run
that another alignlab process is using, a non-empty DIR, a GGUF of an architecture or tokenizer the writer does not
cover, an upload without a token or with the hub switched off.

Atomic: everything is written into a temporary folder beside DIR, checked, then renamed to DIR, so DIR is either
absent or complete. The checks, on a probe text (the chat template applied to a short conversation): merging the
adapter kept the logits (1e-4 of the largest logit, float32); DIR loaded with plain transformers holds exactly the
weights saved, gives the run's model's logits within DTYPE_TOLERANCE of its dtype (float32: 1e-5), and its tokenizer
the same ids and the same rendered chat; the GGUF file loaded with transformers' GGUF loader holds exactly the
merged weights as its type stores them, gives their logits within GGUF_TOLERANCE of its type, and the same ids and
chat. Only then is DIR uploaded.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from alignlab.contract import OUTPUT_FILE, StageOutput, run_outputs
from alignlab.export import ExportError
from alignlab.stages.registry import stage_record

if TYPE_CHECKING:
    import torch

    from alignlab.recipe import Recipe

log = logging.getLogger("alignlab")

DTYPES = ("auto", "float32", "bfloat16", "float16")
# Largest |logit difference| / largest |logit| allowed between the GGUF file and the merged float32 model, per type:
# what the type's rounding may cost (the file's weights themselves are checked exactly). Measured on the probe: f32 0;
# f16 6.7e-4 (tiny-llama); q8_0 3.5e-2 (SmolLM2-135M-Instruct), and on the 3M-parameter tiny-llama up to 0.23
# (its logits amplify the 0.6% per-row rounding of its embeddings). docs/export.md has the table.
GGUF_TOLERANCE = {"f32": 1e-5, "f16": 1e-2, "q8_0": 0.3}
MERGE_TOLERANCE = 1e-4  # merging an adapter into float32 weights changes only the float sums' order
# The same, between the written folder (loaded with plain transformers) and the run's model (float32), per --dtype:
# float32 changes only the order of float sums; bfloat16 keeps 8 bits of mantissa, float16 11 (a wrong tensor gives
# ~1). Measured on the probe (tiny-llama after LoRA SFT, and after SFT -> DPO): float32 1.3e-6 and 9e-7, float16
# 2.2e-3 and 1.6e-3, bfloat16 8.1e-2 and 1.8e-2.
DTYPE_TOLERANCE = {"float32": 1e-5, "float16": 2e-2, "bfloat16": 0.15}
PROBE_CHAT = [
    {"role": "user", "content": "Name three colours, then count from 7 to 12."},
    {"role": "assistant", "content": "Red, green and blue. 7, 8, 9, 10, 11, 12."},
]


def export_run(
    run_dir: str | Path,
    to: str | Path,
    *,
    stage: str | None = None,
    dtype: str = "auto",
    adapter_only: bool = False,
    gguf_type: str | None = None,
    push_to_hub: str | None = None,
    private: bool = False,
) -> dict:
    """Export stage `stage` (default: the run's last stage that writes a model) of the finished run in `run_dir`
    into the new folder `to` (see the module docstring). Returns what was done: {to, stage, kind, dtype, checks,
    gguf, url}."""
    from alignlab.export.gguf_writer import GGUF_TYPES
    from alignlab.export.hub import hub_token
    from alignlab.runlock import RunLocked, run_lock

    if dtype not in DTYPES:
        raise ExportError(f"--dtype: expected one of {', '.join(DTYPES)}, got '{dtype}'")
    if gguf_type is not None and gguf_type not in GGUF_TYPES:
        raise ExportError(f"--gguf-type: expected one of {', '.join(GGUF_TYPES)}, got '{gguf_type}'")
    if gguf_type is not None and adapter_only:
        raise ExportError("--gguf writes merged weights, --adapter-only the adapter alone: drop one of them")
    token = hub_token(push_to_hub) if push_to_hub else None
    run_dir, to = Path(run_dir), Path(to)
    if to.exists() and (not to.is_dir() or any(to.iterdir())):
        raise ExportError(
            f"--to {to}: exists and is not an empty folder. Export into a new folder (nothing is overwritten)."
        )
    recipe = _run_recipe(run_dir)
    out = _chosen_stage(run_dir, recipe, stage)
    if adapter_only and out.kind != "adapter":
        raise ExportError(
            f"--adapter-only: stage '{out.stage}' wrote full weights (peft.method none, or a merge), not an adapter. "
            f"Export it without --adapter-only."
        )
    try:
        with run_lock(run_dir):
            result = _export_locked(run_dir, recipe, out, to, dtype, adapter_only, gguf_type, push_to_hub)
    except RunLocked as e:
        raise ExportError(f"cannot export {run_dir} while a run uses it: {e}") from None
    if push_to_hub:
        from alignlab.export.hub import upload

        result["url"] = upload(to, push_to_hub, token, private)
    return result


# ------------------------------------------------------------------------------------------ which stage, checks


def _run_recipe(run_dir: Path) -> Recipe:
    from alignlab.recipe import RecipeError, load_recipe

    if not (run_dir / "recipe.yaml").is_file():
        raise ExportError(
            f"{run_dir}: not a run folder (no recipe.yaml). Pass the output_dir of an `alignlab run` (e.g. runs/NAME)."
        )
    try:
        return load_recipe(run_dir / "recipe.yaml")
    except RecipeError as e:
        raise ExportError(f"{run_dir}/recipe.yaml cannot be read by this alignlab: {e}") from None


def _chosen_stage(run_dir: Path, recipe: Recipe, stage: str | None) -> StageOutput:
    names = [s.name for s in recipe.stages]
    models = [s.name for s in recipe.stages if stage_record(s.type).writes_model]
    finished = {n: o for n, o in run_outputs(run_dir).items() if o.kind != "none"}
    if stage is None:
        if not models:
            raise ExportError(f"{run_dir}: no stage of this run writes a model (its stages: {', '.join(names)})")
        unfinished = [n for n in names if StageOutput.load(run_dir / n) is None]
        if unfinished:
            hint = f", or export a finished stage with --stage {list(finished)[-1]}" if finished else ""
            raise ExportError(
                f"{run_dir}: the run is unfinished: stage(s) {', '.join(unfinished)} have not finished (no "
                f"{OUTPUT_FILE}). Finish it (alignlab run RECIPE; --resume after a kill){hint}."
            )
        stage = models[-1]
    if stage not in names:
        raise ExportError(
            f"--stage {stage}: the run has no such stage; its stages: {', '.join(names)} (with a model: "
            f"{', '.join(models) or 'none'})"
        )
    spec = recipe.stage(stage)
    out = StageOutput.load(run_dir / stage)
    if not stage_record(spec.type).writes_model or (out is not None and out.kind == "none"):
        raise ExportError(
            f"--stage {stage}: a {spec.type} stage writes no model. Export a stage that does: "
            f"{', '.join(models) or '(none in this run)'}."
        )
    if out is None:
        hint = f", or export a finished one (--stage {list(finished)[-1]})" if finished else ""
        raise ExportError(
            f"stage '{stage}' has not finished in {run_dir} (no {stage}/{OUTPUT_FILE}): the run is unfinished. "
            f"Finish it (alignlab run RECIPE --stage {stage}; --resume after a kill){hint}."
        )
    if not Path(out.path).is_dir():
        raise ExportError(f"stage '{stage}': its model folder {out.path} is missing (the run folder was moved?)")
    return out


def _export_locked(run_dir, recipe, out, to: Path, dtype, adapter_only, gguf_type, hub_repo) -> dict:
    from alignlab.export.card import base_model_info, model_card

    base = base_model_info(recipe)
    dtype = _auto_dtype(out) if dtype == "auto" else dtype
    tmp = to.with_name(f".{to.name}.export-tmp")
    shutil.rmtree(tmp, ignore_errors=True)  # a killed export's leftovers
    tmp.mkdir(parents=True)
    try:
        if adapter_only:
            checks = _write_adapter(recipe, out, tmp, base)
            export = {"kind": "adapter", "dtype": _adapter_dtype(out), "gguf": None}
        else:
            gguf_file = f"{to.name}-{gguf_type.upper()}.gguf" if gguf_type else None
            checks, gguf = _write_merged(recipe, out, tmp, dtype, gguf_type, gguf_file, base)
            export = {"kind": "merged", "dtype": dtype, "gguf": gguf}
        export |= {
            "name": to.name,
            "base": base,
            "checks": checks,
            "hub_repo": hub_repo,
            "adapter_base": _adapter_base(recipe, out, base),
        }
        card = model_card(recipe, run_dir, run_outputs(run_dir), out.stage, export)
        (tmp / "README.md").write_text(card)
        if to.exists():
            to.rmdir()  # empty (checked first)
        os.replace(tmp, to)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"to": str(to), "stage": out.stage, "kind": export["kind"], "dtype": export["dtype"], "checks": checks,
            "gguf": export["gguf"], "url": None}  # fmt: skip


def _auto_dtype(out: StageOutput) -> str:
    """`--dtype auto`: the dtype the base model's config.json names, if it is one of float32/bfloat16/float16."""
    config = Path(out.base if out.kind == "adapter" else out.path) / "config.json"
    name = None
    if config.is_file():
        data = json.loads(config.read_text())
        name = data.get("dtype") or data.get("torch_dtype")
    return name if name in DTYPES[1:] else "float32"


def _adapter_dtype(out: StageOutput) -> str:
    return "the adapter's own dtype (as trained)"


def _adapter_base(recipe: Recipe, out: StageOutput, base: dict) -> str:
    """What an exported adapter names as its base: the recipe's hub id when the adapter sits on the recipe's base
    model, else the folder it was trained on (a built-in or local model, or an earlier stage's full weights)."""
    from alignlab.models import resolve_base

    if out.kind != "adapter":
        return ""
    if base["hub_id"] == recipe.model.name_or_path and out.base == resolve_base(recipe):
        return base["hub_id"]
    return out.base


# ----------------------------------------------------------------------------------------------- what is written


def _tokenizer(recipe: Recipe, out: StageOutput):
    """The tokenizer the stage saved beside its weights (its chat template included), else its base's."""
    from transformers import AutoTokenizer

    from alignlab.models import output_tokenizer_dir

    tok = AutoTokenizer.from_pretrained(
        output_tokenizer_dir(recipe, out), trust_remote_code=recipe.model.trust_remote_code
    )
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token  # as training set it (alignlab.models.load_tokenizer)
    return tok


def _probe_texts(tokenizer) -> list[str]:
    texts = ["The quick brown fox jumps over 13 lazy dogs.\n  Tabs\tand 2024 spaces."]
    if isinstance(tokenizer.chat_template, str):
        texts.append(tokenizer.apply_chat_template(PROBE_CHAT, tokenize=False))
    return texts


def _probe(tokenizer) -> torch.Tensor:
    import torch

    return torch.tensor([tokenizer(_probe_texts(tokenizer)[-1], add_special_tokens=False).input_ids])  # [1, T]


def _logits(model, ids) -> torch.Tensor:
    import torch

    with torch.no_grad():
        return model(input_ids=ids).logits.float()  # [1, T, V] (a reward model: [1, 1])


def _rel(a, b) -> float:
    """Largest |a - b| over the largest |b|: differences in units of the logits' scale."""
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def _same_tokenizer(expected, got, where: str) -> None:
    for text in _probe_texts(expected):
        if expected(text).input_ids != got(text).input_ids:
            raise ExportError(f"{where}: its tokenizer gives other ids than the run's for {text[:40]!r}")
    if isinstance(expected.chat_template, str):
        render = lambda t: t.apply_chat_template(PROBE_CHAT, tokenize=False)  # noqa: E731
        if render(expected) != render(got):
            raise ExportError(f"{where}: its chat template renders a conversation differently from the run's")


def _end_ids(tokenizer, model) -> list[int]:
    from alignlab.generation import end_token_ids

    return [i for i in dict.fromkeys(end_token_ids(tokenizer, model)) if i is not None]


def _write_merged(recipe, out, tmp: Path, dtype: str, gguf_type, gguf_file, base: dict):
    import torch
    from peft import PeftModel
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    from alignlab.models import load_frozen_model

    causal = out.head == "causal_lm"
    tokenizer = _tokenizer(recipe, out)
    if gguf_type:
        from alignlab.export.gguf_writer import check_gguf_export

        if not causal:
            raise ExportError(f"--gguf: stage '{out.stage}' is a reward model (a score head); GGUF holds causal LMs")
        check_gguf_export(AutoConfig.from_pretrained(out.base if out.kind == "adapter" else out.path), tokenizer)

    model = load_frozen_model(recipe, out, quantize=False, move=False, dtype="float32")
    ids = _probe(tokenizer)
    run_logits = _logits(model, ids)  # the run's model as alignlab uses it (an adapter: beside the base weights)
    if isinstance(model, PeftModel):
        model = model.merge_and_unload()
    merged_logits = _logits(model, ids)
    checks = {"probe_tokens": ids.shape[1], "merge": _rel(merged_logits, run_logits)}
    if checks["merge"] > MERGE_TOLERANCE:
        raise ExportError(f"stage '{out.stage}': merging the adapter changed the logits by {checks['merge']:.3g}")
    model.config.use_cache = True  # (gradient checkpointing in the recipe turns it off for training)
    end_ids = _end_ids(tokenizer, model) if causal else []

    gguf = None
    if gguf_type:
        from alignlab.export.gguf_writer import write_gguf

        info = write_gguf(tmp / gguf_file, model.config, model.state_dict(), tokenizer, end_ids, gguf_type,
                          name=tmp.name.removeprefix(".").removesuffix(".export-tmp"), license=base["license"],
                          source_pre=_source_pre(base))  # fmt: skip
        gguf = {"file": gguf_file, "type": gguf_type, "bytes": info["bytes"], "tensors": info["tensors"]}
        checks["gguf"] = _check_gguf(tmp, gguf_file, model, ids, merged_logits, tokenizer, gguf_type)

    model = model.to(getattr(torch, dtype))
    if causal:
        gen = model.generation_config
        gen.eos_token_id = end_ids[0] if len(end_ids) == 1 else end_ids
        gen.pad_token_id, gen.bos_token_id = tokenizer.pad_token_id, tokenizer.bos_token_id
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)

    auto = AutoModelForCausalLM if causal else AutoModelForSequenceClassification
    reloaded = auto.from_pretrained(tmp, dtype=getattr(torch, dtype)).eval()
    saved, read = model.state_dict(), reloaded.state_dict()
    differ = [k for k in saved if k not in read or not torch.equal(saved[k], read[k])]
    if differ or set(read) - set(saved):
        raise ExportError(f"the written folder does not load back as the weights saved: {differ[:3]}")
    del model, saved
    got = _logits(reloaded, ids)
    del reloaded, read
    checks["folder_vs_run"] = _rel(got, run_logits)
    if checks["folder_vs_run"] > DTYPE_TOLERANCE[dtype]:
        raise ExportError(
            f"the written folder ({dtype}) gives logits {checks['folder_vs_run']:.3g} (of the largest) away from the "
            f"run's model's, over the {DTYPE_TOLERANCE[dtype]:g} {dtype} allows"
        )
    _same_tokenizer(tokenizer, AutoTokenizer.from_pretrained(tmp), "the written folder")
    if causal:
        from transformers import GenerationConfig

        written = GenerationConfig.from_pretrained(tmp).eos_token_id
        if sorted([written] if isinstance(written, int) else written) != sorted(end_ids):
            raise ExportError(f"generation_config.json holds eos {written}, not alignlab's end tokens {end_ids}")
    return checks, gguf


def _source_pre(base: dict) -> str | None:
    """The pre-tokenizer name in the GGUF the base model was converted from (llama.cpp names it; the converted
    tokenizer.json no longer does)."""
    if not base.get("gguf"):
        return None
    from alignlab.gguf import read_gguf_header

    return read_gguf_header(base["gguf"]).get("tokenizer.ggml.pre")


def _check_gguf(folder: Path, file: str, model, ids, merged_logits, tokenizer, gguf_type: str) -> float:
    """The GGUF file read back with transformers' GGUF loader holds exactly the merged model's weights as its type
    stores them (f32: the weights; f16, q8_0: their rounding; `gguf_writer.as_stored`), and gives the same token ids
    and rendered chat. Returns how far its logits are from the float32 model's (largest difference over largest
    logit): what the type's rounding costs, which GGUF_TOLERANCE bounds."""
    import tempfile

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from alignlab.export.gguf_writer import as_stored

    # Read alone, as whoever downloads only the .gguf reads it: transformers, given a folder that also holds
    # tokenizer files, builds the GGUF's tokenizer without the chat template the file carries.
    with tempfile.TemporaryDirectory(prefix=".gguf-check-", dir=folder.parent) as alone:
        try:
            os.link(folder / file, Path(alone) / file)
        except OSError:
            shutil.copyfile(folder / file, Path(alone) / file)
        loaded = AutoModelForCausalLM.from_pretrained(alone, gguf_file=file, dtype=torch.float32).eval()
        read = loaded.state_dict()
        for name, tensor in model.state_dict().items():
            if name not in read or not torch.equal(read[name], as_stored(tensor, gguf_type)):
                raise ExportError(f"the GGUF file ({gguf_type}) read back does not hold {name} as written")
        err = _rel(_logits(loaded, ids), merged_logits)
        del loaded, read
        if err > GGUF_TOLERANCE[gguf_type]:
            raise ExportError(
                f"the GGUF file ({gguf_type}) read back gives logits {err:.3g} (of the largest) away from the merged "
                f"model's, over the {GGUF_TOLERANCE[gguf_type]:g} its type allows"
            )
        _same_tokenizer(tokenizer, AutoTokenizer.from_pretrained(alone, gguf_file=file), f"the GGUF file {file}")
    return err


def _write_adapter(recipe, out, tmp: Path, base: dict) -> dict:
    """The stage's adapter files (weights, config, tokenizer; not PEFT's own README), its config naming the base as
    _adapter_base says, a generation_config.json with alignlab's end tokens; checked by loading it over the base."""
    from peft import PeftModel
    from transformers import AutoTokenizer, GenerationConfig

    from alignlab.models import load_causal_lm, load_frozen_model

    tokenizer = _tokenizer(recipe, out)
    for f in Path(out.path).iterdir():
        if f.is_file() and f.name != "README.md":
            shutil.copy2(f, tmp / f.name)
    config = json.loads((tmp / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = _adapter_base(recipe, out, base)
    (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    tokenizer.save_pretrained(tmp)

    model = load_frozen_model(recipe, out, quantize=False, move=False, dtype="float32")
    ids = _probe(tokenizer)
    run_logits = _logits(model, ids)
    if out.head == "causal_lm":
        end_ids = _end_ids(tokenizer, model)
        gen = GenerationConfig.from_model_config(model.config)
        gen.eos_token_id = end_ids[0] if len(end_ids) == 1 else end_ids
        gen.pad_token_id, gen.bos_token_id = tokenizer.pad_token_id, tokenizer.bos_token_id
        gen.save_pretrained(tmp)
    del model
    extra = {"num_labels": 1} if out.head == "sequence_classification" else {}
    base_model = load_causal_lm(recipe, out.base, quantize=False, head=out.head, dtype="float32", **extra)
    reloaded = PeftModel.from_pretrained(base_model, tmp).eval()
    got = _logits(reloaded, ids)
    checks = {"probe_tokens": ids.shape[1], "folder_vs_run": _rel(got, run_logits)}
    if checks["folder_vs_run"] > DTYPE_TOLERANCE["float32"]:
        raise ExportError(
            f"the written adapter's logits differ from the run's model's by {checks['folder_vs_run']:.3g}"
        )
    _same_tokenizer(tokenizer, AutoTokenizer.from_pretrained(tmp), "the written folder")
    return checks
