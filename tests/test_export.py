"""`alignlab export`: a finished run's model as a folder plain transformers loads with the run's logits, its tokenizer,
chat template and end tokens; the model card's numbers are the run's records; the GGUF file reads back (through
alignlab's own GGUF reader) with the same logits within its type's tolerance, the same token ids and the same chat;
the adapter alone loads over its base; refusals come before any model loads and leave nothing at --to; the hub
upload (faked here) sends the finished folder only.

One small run per module on the built-in tiny model: SFT (LoRA, 2 steps) -> DPO (LoRA, continuing the adapter, 2
steps, a quarter of the labels flipped) -> eval of DPO against SFT. The real-model tier exports SmolLM2-135M-Instruct
after LoRA SFT (test at the end)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from alignlab.contract import StageOutput
from alignlab.export import ExportError
from alignlab.export.command import PROBE_CHAT, export_run
from alignlab.recipe import load_recipe
from tests.helpers import make_recipe
from tests.helpers import run as run_recipe

ARITH = "alignlab.builtin.tasks:arith_reward"
TEXTS = ["What is 12+345? It is 357.", "  two spaces,\ttabs\nand lines 2024", "<|im_start|>user\nhi<|im_end|>"]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("export") / "run"
    train = {"max_steps": 2, "per_device_batch_size": 4, "learning_rate": 3e-3, "max_length": 64}
    stages = [
        {"name": "sft", "type": "sft", "dataset": {"path": "builtin:arith", "split": "sft", "size": 16, "eval_size": 4},
         "train": train},
        {"name": "dpo", "type": "dpo", "train": {**train, "learning_rate": 1e-3},
         "dataset": {"path": "builtin:arith", "split": "preference", "size": 8, "eval_size": 4, "flip_rate": 0.25}},
        {"name": "eval", "type": "eval", "reference": "sft", "reward_fn": ARITH,
         "dataset": {"path": "builtin:arith", "split": "eval", "size": 4}},
    ]  # fmt: skip
    run_recipe(make_recipe(stages, run_dir, name="export-test", peft="lora"))
    return run_dir


@pytest.fixture(scope="module")
def exported(finished, tmp_path_factory):
    """The default export (the last stage with a model: dpo), float32, with a q8_0 GGUF file."""
    to = tmp_path_factory.mktemp("out") / "arith-dpo"
    result = export_run(finished, to, gguf_type="q8_0")
    return to, result


def _run_model(run_dir: Path, stage: str):
    """The stage's model as alignlab itself loads it (an adapter beside its base weights), and its tokenizer."""
    from alignlab.export.command import _tokenizer
    from alignlab.models import load_frozen_model

    recipe = load_recipe(run_dir / "recipe.yaml")
    out = StageOutput.load(run_dir / stage)
    return load_frozen_model(recipe, out, move=False), _tokenizer(recipe, out)


def _logits(model, tokenizer, text: str) -> torch.Tensor:
    ids = torch.tensor([tokenizer(text, add_special_tokens=False).input_ids])
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def _chat(tokenizer) -> str:
    return tokenizer.apply_chat_template(PROBE_CHAT[:1], tokenize=False, add_generation_prompt=True)


def _rel(a, b) -> float:
    return float((a - b).abs().max() / b.abs().max())


# ------------------------------------------------------------------------------------------- the records


def test_stage_records_hold_the_rows_flips_seconds_and_versions(finished):
    """What the card is written from: each stage's data (rows, held-out rows, flipped labels: 25% of 8 = 2), its
    wall-clock seconds and the library versions."""
    import transformers

    sft, dpo, ev = (StageOutput.load(finished / n) for n in ("sft", "dpo", "eval"))
    assert sft.data == [{"key": "dataset", "path": "builtin:arith", "split": "sft", "source": "builtin", "rows": 16,
                         "eval_rows": 4, "flipped": 0}]  # fmt: skip
    assert dpo.data == [{"key": "dataset", "path": "builtin:arith", "split": "preference", "source": "builtin",
                         "rows": 8, "eval_rows": 4, "flipped": 2}]  # fmt: skip
    assert ev.data[0]["rows"] == 4 and ev.data[0]["key"] == "dataset"
    for record in (sft, dpo, ev):
        assert record.seconds > 0 and record.versions["transformers"] == transformers.__version__


# ------------------------------------------------------------------------------------------- merged HF folder


def test_export_loads_with_plain_transformers_and_gives_the_runs_logits(finished, exported):
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    from alignlab.generation import end_token_ids

    to, result = exported
    assert result["stage"] == "dpo" and result["kind"] == "merged" and result["dtype"] == "float32"
    assert not list(to.parent.glob(".*export-tmp*"))  # written beside, then renamed: nothing else is left
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json", "README.md"} <= {
        p.name for p in to.iterdir()
    }
    assert not (to / "adapter_config.json").exists()
    model = AutoModelForCausalLM.from_pretrained(to).eval()
    tokenizer = AutoTokenizer.from_pretrained(to)
    run_model, run_tokenizer = _run_model(finished, "dpo")
    for text in [*TEXTS, _chat(run_tokenizer)]:
        assert tokenizer(text).input_ids == run_tokenizer(text).input_ids
        assert _rel(_logits(model, tokenizer, text), _logits(run_model, run_tokenizer, text)) < 1e-5
    assert _chat(tokenizer) == _chat(run_tokenizer)
    ends = end_token_ids(run_tokenizer, run_model)
    eos = GenerationConfig.from_pretrained(to).eos_token_id
    assert sorted(set(ends)) == sorted([eos] if isinstance(eos, int) else eos)
    # the merge moved the weights: the export is DPO's model, not the base's
    base = AutoModelForCausalLM.from_pretrained(StageOutput.load(finished / "dpo").base).eval()
    assert _rel(_logits(base, tokenizer, TEXTS[0]), _logits(model, tokenizer, TEXTS[0])) > 1e-3


def test_bfloat16_export_keeps_bfloat16_weights_close_to_the_run(finished, tmp_path):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    to = tmp_path / "bf16"
    export_run(finished, to, stage="sft", dtype="bfloat16")
    assert json.loads((to / "config.json").read_text())["dtype"] == "bfloat16"
    with safe_open(to / "model.safetensors", "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    model = AutoModelForCausalLM.from_pretrained(to, dtype=torch.bfloat16).eval()
    run_model, tok = _run_model(finished, "sft")
    # bf16 keeps 8 bits of mantissa: the logits move by a few percent of their scale (the export's own check, on its
    # probe: 8.1e-2 here)
    assert _rel(_logits(model, tok, TEXTS[0]), _logits(run_model, tok, TEXTS[0])) < 0.15


def test_adapter_only_keeps_the_adapter_naming_its_base(finished, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    to = tmp_path / "adapter"
    result = export_run(finished, to, stage="sft", adapter_only=True)
    assert result["kind"] == "adapter"
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "README.md"} <= {
        p.name for p in to.iterdir()
    }
    assert not (to / "model.safetensors").exists()
    config = json.loads((to / "adapter_config.json").read_text())
    record = StageOutput.load(finished / "sft")
    assert config["base_model_name_or_path"] == record.base  # builtin:tiny-llama: the folder it was trained on
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(config["base_model_name_or_path"]), to)
    run_model, tok = _run_model(finished, "sft")
    assert torch.equal(_logits(model.eval(), tok, TEXTS[1]), _logits(run_model, tok, TEXTS[1]))
    meta = yaml.safe_load((to / "README.md").read_text().split("---")[1])
    assert meta["library_name"] == "peft"


@pytest.mark.slow
def test_a_qlora_adapter_is_merged_into_the_unquantized_base(tmp_path):
    """After QLoRA SFT (4-bit base on CPU) the export merges the adapter into the base's unquantized weights: the
    folder gives the logits of the adapter over those weights, and the card says so. (Slow tier: ~30 s on 2 busy
    cores, most of it bitsandbytes' 4-bit training step.)"""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from alignlab.models import load_frozen_model

    train = {"max_steps": 1, "per_device_batch_size": 4, "learning_rate": 3e-3, "max_length": 64}
    stage = {
        "name": "sft",
        "type": "sft",
        "dataset": {"path": "builtin:arith", "split": "sft", "size": 8},
        "train": train,
    }
    run_recipe(make_recipe([stage], tmp_path / "run", name="qlora-export", peft="qlora"))
    to = tmp_path / "merged"
    export_run(tmp_path / "run", to)
    recipe = load_recipe(tmp_path / "run" / "recipe.yaml")
    unquantized = load_frozen_model(recipe, StageOutput.load(tmp_path / "run" / "sft"), quantize=False, move=False)
    model, tok = AutoModelForCausalLM.from_pretrained(to).eval(), AutoTokenizer.from_pretrained(to)
    assert _rel(_logits(model, tok, TEXTS[0]), _logits(unquantized, tok, TEXTS[0])) < 1e-5
    assert "merged here into the base's unquantized weights" in (to / "README.md").read_text()


# ------------------------------------------------------------------------------------------------- model card


def _card(to: Path) -> tuple[dict, str]:
    text = (to / "README.md").read_text()
    _, front, body = text.split("---", 2)
    return yaml.safe_load(front), body


def _numbers(cell: str) -> list[float]:
    return [float(x) for x in re.findall(r"-?\d+(?:\.\d+)?(?:e[-+]?\d+)?", cell)]


def test_model_card_numbers_are_the_records(finished, exported):
    """Every score in the card is eval.json's (value and 95% interval, for the model, the reference and the paired
    difference); every row count, flip count and time is the stage records'."""
    from alignlab.evaluation.report import ROWS

    to, _ = exported
    meta, body = _card(to)
    assert meta["license"] == "apache-2.0" and meta["pipeline_tag"] == "text-generation"
    assert meta["tags"] == ["alignlab", "sft", "dpo", "lora", "gguf"] and meta["library_name"] == "transformers"
    assert "base_model" not in meta  # builtin:tiny-llama is on no hub

    res = json.loads((finished / "eval" / "eval.json").read_text())
    assert f"this model vs {res['reference']}" in body and f"{res['num_prompts']} prompts" in body
    rows = {line.split(" | ")[0].lstrip("| "): line for line in body.splitlines() if line.startswith("| ")}
    checked = 0
    for label, key, ref_key, diff_key in ROWS:
        if res.get(key) is None:
            continue
        label += f" (by {res['win_rate_by'].replace('_', ' ')})" if key == "win_rate" else ""
        cells = rows[label].strip("| ").split(" | ")[1:]
        for cell, k in zip(cells, (key, ref_key, diff_key)):
            expected = [] if k is None else [res[k], *(res.get(f"{k}_ci") or [])]
            assert _numbers(cell) == pytest.approx(expected, rel=5e-3, abs=1e-9), (label, k, cell)
            checked += 1
    assert checked >= 9

    records = {n: StageOutput.load(finished / n) for n in ("sft", "dpo")}
    for name, record in records.items():
        d = record.data[0]
        line = next(v for k, v in rows.items() if k == name and "`builtin:arith`" in v)
        assert _numbers(line.split(" | ")[-3:][0] + " " + line.split(" | ")[-2] + " " + line.split(" | ")[-1]) == [
            d["rows"], d["eval_rows"], d["flipped"]
        ]  # fmt: skip
    assert "`dataset.flip_rate`" not in body and "flipped" in body  # flips shown as counts, data keys in the table
    assert "`train.max_steps: 2`" in body and "`loss.name" not in body  # settings off their defaults only
    assert "eval (eval)" not in body.split("## How it scores")[0].split("\n")[2]  # the eval is no stage behind it


def test_model_card_says_when_no_eval_measured_the_stage(finished, tmp_path):
    to = tmp_path / "sft"
    export_run(finished, to, stage="sft")
    _, body = _card(to)
    assert "No eval stage of the run evaluated stage `sft`." in body
    assert "| dpo |" not in body  # stages after it made none of it


# ------------------------------------------------------------------------------------------------------- GGUF


def _read_back(path: Path, tmp: Path) -> Path:
    """The GGUF file through alignlab's own reader (alignlab/gguf.py: transformers' loader, then a safetensors
    folder with the tokenizer, chat template and end tokens), as a recipe naming the file would read it."""
    from alignlab.gguf import convert_gguf

    alone = tmp / "alone"
    alone.mkdir(parents=True)
    shutil.copyfile(path, alone / path.name)
    convert_gguf(alone / path.name, tmp / "read")
    return tmp / "read"


def test_gguf_round_trip_gives_the_same_logits_ids_chat_and_end_tokens(exported, tmp_path):
    """The q8_0 file of the default export, and f32 / f16 files of the same merged weights, read back: every weight
    is the merged model's as the type stores it (f32: equal; f16, q8_0: their rounding), the logits equal the merged
    model's within the type's tolerance (largest difference over largest logit; f32: 1e-5, f16: 1e-2, q8_0: 0.3;
    measured here 0, 6.7e-4 and 0.23: this 3M-parameter model amplifies the 0.6% per-row rounding of its
    embeddings, SmolLM2 moves by 3.5e-2), the tokenizer gives the same ids, the chat template renders the same, and
    the end tokens are the ones generation_config.json names."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    from alignlab.export.gguf_writer import as_stored, write_gguf

    to, result = exported
    assert result["gguf"]["file"] == "arith-dpo-Q8_0.gguf" and result["checks"]["gguf"] < 0.3
    model = AutoModelForCausalLM.from_pretrained(to).eval()
    tok = AutoTokenizer.from_pretrained(to)
    ends = GenerationConfig.from_pretrained(to).eos_token_id
    files = {"q8_0": to / result["gguf"]["file"]}
    for kind in ("f32", "f16"):
        files[kind] = tmp_path / f"model-{kind}.gguf"
        write_gguf(files[kind], model.config, model.state_dict(), tok, [ends], kind, name="arith-dpo")
    errors = {}
    for kind, path in files.items():
        folder = _read_back(path, tmp_path / kind)
        back, back_tok = AutoModelForCausalLM.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)
        read = back.state_dict()
        for name, tensor in model.state_dict().items():
            assert torch.equal(read[name], as_stored(tensor, kind)), (kind, name)
        errors[kind] = max(_rel(_logits(back, back_tok, t), _logits(model, tok, t)) for t in [*TEXTS, _chat(tok)])
        for text in TEXTS:
            assert back_tok(text).input_ids == tok(text).input_ids, (kind, text)
        assert _chat(back_tok) == _chat(tok)
        assert GenerationConfig.from_pretrained(folder).eos_token_id == ends
    assert errors["f32"] < 1e-5 and errors["f16"] < 1e-2 and errors["q8_0"] < 0.3, errors
    assert errors["f32"] < errors["f16"] < errors["q8_0"]


def _random_model(model_type: str, vocab: int):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        model_type, vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        tie_word_embeddings=model_type == "qwen2",
    )  # fmt: skip
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


@pytest.mark.parametrize("model_type", ["qwen2", "mistral"])
def test_gguf_writes_qwen2_and_mistral(model_type, tiny_model_path, tmp_path):
    """Qwen2 (biases on q/k/v, tied embeddings, rows not permuted) and Mistral (grouped-query attention, written as
    llama, as llama.cpp does) read back with the float32 logits, an embedding larger than the vocabulary padded
    with unused tokens."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from alignlab.export.gguf_writer import write_gguf

    tok = AutoTokenizer.from_pretrained(tiny_model_path)
    model = _random_model(model_type, vocab=len(tok) + 21)
    if model_type == "qwen2":  # biases start at 0: give them values the round trip must keep
        for layer in model.model.layers:
            torch.nn.init.normal_(layer.self_attn.q_proj.bias)
    write_gguf(tmp_path / "m.gguf", model.config, model.state_dict(), tok, [tok.eos_token_id], "f32", name="x")
    back = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf").eval()
    for text in TEXTS:
        assert _rel(_logits(back, tok, text), _logits(model, tok, text)) < 1e-5


def test_gguf_writes_a_sentencepiece_style_tokenizer(tmp_path):
    """A Llama-2-style tokenizer (BPE over "\u2581"-spaced text with byte fallback: <0xNN> tokens for bytes outside
    the vocabulary, a BOS added), trained here, written as llama.cpp's "llama" tokenizer: read back, the same ids
    (accents and a symbol through byte fallback) and chat, and the model's float32 logits. Text that starts with
    spaces is left out: transformers rebuilds such a tokenizer with a Metaspace pre-tokenizer, which spells leading
    spaces one "\u2581" shorter than this normalizer (a difference of its GGUF reader, not of the file)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, processors, trainers
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

    from alignlab.export.gguf_writer import write_gguf

    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    special = ["<unk>", "<s>", "</s>", *(f"<0x{i:02X}>" for i in range(256))]
    corpus = ["the quick brown fox jumps over the lazy dog", "what is 12 plus 30", "hello world, tabs\tand lines"]
    tok.train_from_iterator(
        corpus * 20, trainers.BpeTrainer(vocab_size=400, special_tokens=special, show_progress=False)
    )
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.chat_template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}{% endfor %}"
    config = AutoConfig.for_model(
        "llama", vocab_size=len(fast), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
    )  # fmt: skip
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    write_gguf(tmp_path / "m.gguf", config, model.state_dict(), fast, [fast.eos_token_id], "f32", name="sp")
    back = AutoTokenizer.from_pretrained(tmp_path, gguf_file="m.gguf")
    for text in ["the quick brown fox", "what is 12 plus 30?", "\u00fcn\u00efcode \u2713 bytes", "hello  world"]:
        assert back(text).input_ids == fast(text).input_ids, text
    assert fast("\u2713").input_ids[1:] == fast.convert_tokens_to_ids(["\u2581", "<0xE2>", "<0x9C>", "<0x93>"])
    assert _chat(back) == _chat(fast)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf").eval()
    assert _rel(_logits(loaded, fast, "the quick brown fox"), _logits(model, fast, "the quick brown fox")) < 1e-5


def test_gguf_refuses_what_it_cannot_write(tiny_model_path):
    from transformers import AutoConfig, AutoTokenizer

    from alignlab.export.gguf_writer import GGUFExportError, check_gguf_export

    tok = AutoTokenizer.from_pretrained(tiny_model_path)
    with pytest.raises(GGUFExportError, match="llama, mistral, qwen2.*this model is 'gpt2'"):
        check_gguf_export(AutoConfig.for_model("gpt2"), tok)
    scaled = AutoConfig.from_pretrained(tiny_model_path)
    scaled.rope_parameters = {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}
    with pytest.raises(GGUFExportError, match="rope_type 'llama3'"):
        check_gguf_export(scaled, tok)


# ---------------------------------------------------------------------------------------------------- refusals


@pytest.fixture
def no_model_loads(monkeypatch):
    """Refusals come before any model loads."""

    def refuse(*a, **k):
        raise AssertionError("a model was loaded before the refusal")

    monkeypatch.setattr("alignlab.models.load_frozen_model", refuse)


def test_refusals_name_the_stage_and_the_fix(finished, tmp_path, no_model_loads):
    to = tmp_path / "out"
    with pytest.raises(ExportError, match=r"a eval stage writes no model\. Export a stage that does: sft, dpo"):
        export_run(finished, to, stage="eval")
    with pytest.raises(ExportError, match="no such stage; its stages: sft, dpo, eval"):
        export_run(finished, to, stage="ppo")
    with pytest.raises(ExportError, match="not a run folder"):
        export_run(tmp_path, to)
    with pytest.raises(ExportError, match="--gguf writes merged weights"):
        export_run(finished, to, adapter_only=True, gguf_type="f16")
    (to / "x").mkdir(parents=True)
    with pytest.raises(ExportError, match="exists and is not an empty folder"):
        export_run(finished, to)

    unfinished = tmp_path / "unfinished"
    shutil.copytree(finished, unfinished, ignore=shutil.ignore_patterns(".alignlab.lock"))
    (unfinished / "dpo" / "stage_output.json").unlink()
    with pytest.raises(ExportError, match=r"the run is unfinished: stage\(s\) dpo .*--stage sft"):
        export_run(unfinished, tmp_path / "a")
    with pytest.raises(ExportError, match=r"stage 'dpo' has not finished .*--stage sft"):
        export_run(unfinished, tmp_path / "b", stage="dpo")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_a_run_in_progress_is_not_exported(finished, tmp_path, no_model_loads):
    import os
    import socket

    from alignlab.runlock import LOCK_FILE, process_start_time

    locked = tmp_path / "locked"
    shutil.copytree(finished, locked)
    holder = {"pid": os.getpid(), "start_time": process_start_time(os.getpid()), "host": socket.gethostname(),
              "started": "now", "command": "alignlab run recipe.yaml", "token": "x"}  # fmt: skip
    (locked / LOCK_FILE).write_text(json.dumps(holder))
    with pytest.raises(ExportError, match="while a run uses it"):
        export_run(locked, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_failed_check_leaves_nothing_at_to(finished, tmp_path, monkeypatch):
    import alignlab.export.command as command

    def broken(*a, **k):
        raise ExportError("the GGUF file read back gives other logits")

    monkeypatch.setattr(command, "_check_gguf", broken)
    with pytest.raises(ExportError, match="other logits"):
        export_run(finished, tmp_path / "out", gguf_type="f16")
    assert list(tmp_path.iterdir()) == []  # neither the folder nor its temporary one


def test_cli_prints_a_refusal_as_one_error(finished, tmp_path, capsys):
    from alignlab.cli import main

    assert main(["export", str(finished), "--stage", "eval", "--to", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --stage eval: a eval stage writes no model") and "Traceback" not in err


# ---------------------------------------------------------------------------------------------------------- hub


def test_push_to_hub_uploads_the_verified_folder(finished, tmp_path, monkeypatch):
    """The upload call (faked) gets the finished folder, complete (card, weights, tokenizer, GGUF) when it is called,
    and the repository is created private as asked."""
    import huggingface_hub

    calls = {}

    def create_repo(self, repo_id, **kw):
        calls["create"] = (repo_id, kw)
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, **kw):
        calls["upload"] = kw
        calls["files"] = sorted(p.name for p in Path(kw["folder_path"]).iterdir())

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: "hf_fake")
    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    to = tmp_path / "up"
    result = export_run(finished, to, stage="sft", gguf_type="f16", push_to_hub="me/arith-sft", private=True)
    assert calls["create"] == ("me/arith-sft", {"repo_type": "model", "private": True, "exist_ok": True})
    assert calls["upload"]["repo_id"] == "me/arith-sft" and Path(calls["upload"]["folder_path"]) == to
    assert {"README.md", "model.safetensors", "config.json", "tokenizer.json", "up-F16.gguf"} <= set(calls["files"])
    assert result["url"] == "https://huggingface.co/me/arith-sft"
    assert 'from_pretrained("me/arith-sft")' in (to / "README.md").read_text()


def test_push_to_hub_fails_before_any_work(finished, tmp_path, monkeypatch, no_model_loads):
    import huggingface_hub

    with pytest.raises(ExportError, match=r"HF_HUB_OFFLINE=1.*hf upload me/m DIR"):  # conftest: offline
        export_run(finished, tmp_path / "o", push_to_hub="me/m")
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    with pytest.raises(ExportError, match="no Hugging Face token found. Run `hf auth login`"):
        export_run(finished, tmp_path / "o", push_to_hub="me/m")
    with pytest.raises(ExportError, match="OWNER/NAME"):
        export_run(finished, tmp_path / "o", push_to_hub="not a repo")
    assert not (tmp_path / "o").exists()


# -------------------------------------------------------------------------------------- real model (SmolLM2)


@pytest.mark.real
def test_smollm2_after_lora_sft_exports_with_its_logits_and_a_gguf(tmp_path):
    """SmolLM2-135M-Instruct after 2 steps of LoRA SFT: the merged folder gives the run's logits (plain transformers),
    the same ids and chat, and its generation config stops at <|im_end|>; the card names the hub base model and its
    license. The q8_0 GGUF file was read back by the export itself with transformers' GGUF loader (every weight its
    Q8_0 rounding, the same ids and chat; the round trip through alignlab's reader runs on the tiny model above, as
    reading this 49,152-token vocabulary back costs ~30 s a time): its logits moved by 3.8e-2 of the largest here."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    from alignlab.gguf import read_gguf_header

    chats = [
        [{"role": "user", "content": "What is the capital of France?"}, {"role": "assistant", "content": "Paris."}],
        [{"role": "user", "content": "Name a primary colour."}, {"role": "assistant", "content": "Blue is one."}],
    ]
    data = tmp_path / "chats.jsonl"
    data.write_text("".join(json.dumps({"messages": c}) + "\n" for c in chats))
    train = {"max_steps": 2, "per_device_batch_size": 2, "learning_rate": 3e-3, "max_length": 64}
    stage = {"name": "sft", "type": "sft", "dataset": {"path": str(data)}, "train": train}
    lora = {"method": "lora", "r": 8, "alpha": 16, "dropout": 0.0}
    raw = make_recipe([stage], tmp_path / "run", name="real-export", model="builtin:smollm2-135m-instruct", peft=lora)
    run_recipe(raw)

    to = tmp_path / "smol-sft"
    result = export_run(tmp_path / "run", to, gguf_type="q8_0")
    model, tok = AutoModelForCausalLM.from_pretrained(to).eval(), AutoTokenizer.from_pretrained(to)
    run_model, run_tok = _run_model(tmp_path / "run", "sft")
    chat = _chat(run_tok)
    assert tok(chat).input_ids == run_tok(chat).input_ids and _chat(tok) == chat
    assert _rel(_logits(model, tok, chat), _logits(run_model, run_tok, chat)) < 1e-5
    assert GenerationConfig.from_pretrained(to).eos_token_id == tok.convert_tokens_to_ids("<|im_end|>") == 2
    meta, _ = _card(to)
    assert meta["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct" and meta["license"] == "apache-2.0"

    assert result["checks"]["gguf"] < 0.1  # q8_0 (measured: docs/export.md)
    header = read_gguf_header(to / result["gguf"]["file"])
    assert header["general.architecture"] == "llama" and header["tokenizer.ggml.pre"] == "smollm"  # the source's
    assert header["tokenizer.ggml.eos_token_id"] == 2 and header["general.license"] == "apache-2.0"
