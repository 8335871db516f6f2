"""A merged model as one GGUF file, for llama.cpp, Ollama and LM Studio, written with the `gguf` package's writer.

What is written (llama.cpp's conventions, as its convert_hf_to_gguf.py writes them, so its runtime and
transformers' GGUF loader read the file):
- the architecture's hyperparameters under `<arch>.*` (context length, widths, heads, rope base, norm epsilon);
- every weight under llama.cpp's tensor names (`token_embd`, `blk.N.attn_q`, ...; gguf's own name map). Llama and
  Mistral store the rows of the query and key projections permuted (llama.cpp's rotary embedding pairs neighbouring
  dimensions, transformers' pairs the two halves), and a reader permutes them back; Qwen2 stores them as they are;
- the tokenizer: its tokens by id (padded to the embedding's rows with unused `[PADn]` tokens), their types
  (normal, control for special tokens, user-defined for other added tokens), the BPE merges, the pre-tokenizer's
  name, the special token ids, whether a BOS is added, and the chat template. The end tokens alignlab stops on go
  to `eos` and then `eot`, `eom` (llama.cpp stops on each of them).

Types (`gguf_type`): f32 (every tensor float32: the round trip gives back the float32 weights exactly), f16 (the
matrices as float16, the norms and biases float32, as llama.cpp does), q8_0 (matrices whose rows split into blocks
of 32 as 8-bit blocks with a float16 scale each, llama.cpp's Q8_0; any other matrix float16).

Supported: the Llama family as llama.cpp names it: Llama (SmolLM2, Llama 2 and 3 without rope scaling), Mistral
(written as llama, as llama.cpp does), Qwen2 / Qwen2.5. Tokenizers: byte-level BPE (GPT-2 style: SmolLM2, Llama 3,
Qwen2) and sentencepiece-style BPE with byte fallback (Llama 2, Mistral). Anything else is refused by
`check_gguf_export` before any weight is read.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from alignlab.export import ExportError

if TYPE_CHECKING:
    import torch

GGUF_TYPES = ("f32", "f16", "q8_0")
# transformers model_type -> llama.cpp architecture name
ARCHITECTURES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2"}
_PERMUTED = {"llama", "mistral"}  # query/key rows stored in llama.cpp's rotary order
_Q8_BLOCK = 32


class GGUFExportError(ExportError):
    """A model or tokenizer that this writer cannot represent; the message says what is supported."""


def check_gguf_export(config, tokenizer) -> None:
    """Refuse, before any weight is read, what the writer cannot write faithfully."""
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHITECTURES:
        raise GGUFExportError(
            f"GGUF export covers the Llama family: {', '.join(sorted(ARCHITECTURES))} (SmolLM2, Llama, Mistral, "
            f"Qwen2/2.5); this model is '{model_type}'. Export the HF folder without --gguf and convert it with "
            f"llama.cpp's convert_hf_to_gguf.py."
        )
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if rope.get("rope_type", "default") != "default":
        raise GGUFExportError(
            f"GGUF export writes plain rotary embeddings; this model uses rope_type '{rope['rope_type']}' scaling "
            f"(e.g. Llama 3.1's), which it does not write. Export the HF folder without --gguf and convert it with "
            f"llama.cpp's convert_hf_to_gguf.py."
        )
    if getattr(config, "use_sliding_window", False):
        raise GGUFExportError("GGUF export: this Qwen2 model uses sliding-window attention, which it does not write")
    _tokenizer_kind(_tokenizer_json(tokenizer))


def write_gguf(
    path: str | Path,
    config,
    state_dict: dict[str, torch.Tensor],
    tokenizer,
    end_ids: list[int],
    gguf_type: str,
    *,
    name: str,
    license: str | None = None,
    source_pre: str | None = None,
) -> dict:
    """Write `state_dict` (float32 weights of a model of `config`) and `tokenizer` as GGUF file `path`.
    `end_ids`: the tokens that end a response; `source_pre`: the pre-tokenizer name of the GGUF the base model came
    from, if it came from one. Returns {"tensors": {type: count}, "bytes": size}."""
    import gguf
    import numpy as np

    if gguf_type not in GGUF_TYPES:
        raise GGUFExportError(f"--gguf-type: expected one of {', '.join(GGUF_TYPES)}, got '{gguf_type}'")
    check_gguf_export(config, tokenizer)
    arch_name = ARCHITECTURES[config.model_type]
    arch = {"llama": gguf.MODEL_ARCH.LLAMA, "qwen2": gguf.MODEL_ARCH.QWEN2}[arch_name]
    writer = gguf.GGUFWriter(str(path), arch_name)
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    if license:
        writer.add_license(license)
    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16}
    writer.add_file_type(file_type.get(gguf_type, gguf.LlamaFileType.MOSTLY_Q8_0))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)

    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_freq_base(float(_rope_theta(config)))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_rope_dimension_count(head_dim)
    if head_dim != config.hidden_size // heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_vocab_size(config.vocab_size)

    _add_tokenizer(writer, tokenizer, config.vocab_size, end_ids, source_pre)

    names = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
    tied = getattr(config, "tie_word_embeddings", False)
    counts: dict[str, int] = {}
    for hf_name, tensor in state_dict.items():
        if hf_name == "lm_head.weight" and tied:
            continue  # llama.cpp reads the embedding matrix as the output head when there is no output tensor
        if hf_name.endswith("rotary_emb.inv_freq"):
            continue
        gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise GGUFExportError(f"GGUF export: no llama.cpp name for tensor {hf_name} of a {config.model_type} model")
        data = tensor.detach().float().cpu().numpy()
        if config.model_type in _PERMUTED and hf_name.endswith(("q_proj.weight", "k_proj.weight")):
            data = _rotary_rows(data, heads if "q_proj" in hf_name else kv_heads)
        data, qtype = _encode(data, gguf_type, np, gguf)
        writer.add_tensor(gguf_name, data, raw_dtype=qtype)
        counts[qtype.name] = counts.get(qtype.name, 0) + 1
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return {"tensors": counts, "bytes": Path(path).stat().st_size}


def _rope_theta(config) -> float:
    rope = getattr(config, "rope_parameters", None) or {}
    return rope.get("rope_theta") or getattr(config, "rope_theta", 10000.0)


def _rotary_rows(w, n_head: int):
    """[n_head * d, ...] rows of a query/key projection from transformers' rotary order (first half, second half of
    each head) to llama.cpp's (interleaved pairs): llama.cpp's convert_hf_to_gguf.py `permute`. Readers undo it."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def as_stored(tensor: torch.Tensor, gguf_type: str) -> torch.Tensor:
    """`tensor` (float32) as the file stores it, back in float32: what a reader of the file gets (f16 and q8_0
    round; f32 and every 1-D tensor are kept as they are)."""
    import gguf
    import numpy as np
    import torch

    data, qtype = _encode(tensor.detach().float().cpu().numpy(), gguf_type, np, gguf)
    if qtype == gguf.GGMLQuantizationType.Q8_0:
        data = gguf.quants.dequantize(data, qtype)
    return torch.from_numpy(np.ascontiguousarray(data, dtype=np.float32)).reshape(tensor.shape)


def _encode(data, gguf_type: str, np, gguf):
    """The tensor in the file's type: 1-D tensors (norms, biases) always float32, as llama.cpp keeps them."""
    f32, f16, q8 = gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.Q8_0
    if data.ndim < 2 or gguf_type == "f32":
        return data.astype(np.float32), f32
    if gguf_type == "q8_0" and data.shape[-1] % _Q8_BLOCK == 0:
        return gguf.quants.quantize(data.astype(np.float32), q8), q8
    return data.astype(np.float16), f16


# ---------------------------------------------------------------------------------------------------- tokenizer


def _tokenizer_json(tokenizer) -> dict:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise GGUFExportError(
            f"GGUF export needs a fast tokenizer (tokenizer.json); this model's is {type(tokenizer).__name__}"
        )
    return json.loads(backend.to_str())


def _tokenizer_kind(tok_json: dict) -> str:
    """gpt2 (byte-level BPE) or llama (sentencepiece-style BPE with byte fallback), llama.cpp's tokenizer models."""
    model = tok_json.get("model", {})
    decoder = (tok_json.get("decoder") or {}).get("type")
    if model.get("type") == "BPE" and not model.get("byte_fallback") and decoder == "ByteLevel":
        return "gpt2"
    if model.get("type") == "BPE" and model.get("byte_fallback"):
        return "llama"
    raise GGUFExportError(
        f"GGUF export writes byte-level BPE tokenizers (SmolLM2, Llama 3, Qwen2) and sentencepiece-style BPE with "
        f"byte fallback (Llama 2, Mistral); this tokenizer is a {model.get('type')} model with a {decoder} decoder"
    )


def _pre_tokenizer_name(tok_json: dict, source_pre: str | None) -> str:
    """llama.cpp's name of the byte-level tokenizer's pre-tokenizer (how text is split before BPE): the base model's
    GGUF's own when it came from one, else recognised from tokenizer.json."""
    if source_pre:
        return source_pre
    pre = tok_json.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    types = [p.get("type") for p in parts]
    if types == ["ByteLevel"] and parts[0].get("use_regex", True):
        return "gpt2"
    if types == ["Digits", "ByteLevel"] and parts[0].get("individual_digits") and parts[1].get("use_regex", True):
        return "smollm"  # each digit alone, then GPT-2's split (llama.cpp's smollm/starcoder pre-tokenizer)
    if types == ["Split", "ByteLevel"] and not parts[1].get("use_regex", True):
        from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS

        regex = (parts[0].get("pattern") or {}).get("Regex")
        for name, split in GGUF_PRE_TOKENIZER_SPLITS.items():
            if split == regex:
                return {"llama3": "llama-bpe", "llama-v3": "llama-bpe"}.get(name, name)
    raise GGUFExportError(
        f"GGUF export: the tokenizer's pre-tokenizer ({' + '.join(map(str, types))}) is not one llama.cpp names "
        f"that this writer recognises (GPT-2's byte-level split, digits then GPT-2's, or the Llama 3 / Qwen2 "
        f"split). Convert the exported folder with llama.cpp's convert_hf_to_gguf.py instead."
    )


def _add_tokenizer(writer, tokenizer, n_vocab: int, end_ids: list[int], source_pre: str | None) -> None:
    import gguf

    tok_json = _tokenizer_json(tokenizer)
    kind = _tokenizer_kind(tok_json)
    model = tok_json["model"]
    by_id: dict[int, str] = {i: t for t, i in model["vocab"].items()}
    types: dict[int, int] = dict.fromkeys(by_id, gguf.TokenType.NORMAL)
    for added in tok_json.get("added_tokens", []):
        by_id[added["id"]] = added["content"]
        types[added["id"]] = gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED
    if kind == "llama":  # byte-fallback pieces <0x00>..<0xFF> are byte tokens
        for i, text in by_id.items():
            if len(text) == 6 and text.startswith("<0x") and text.endswith(">"):
                types[i] = gguf.TokenType.BYTE
    size = max(n_vocab, max(by_id) + 1)
    if size > n_vocab:
        raise GGUFExportError(f"GGUF export: the tokenizer has ids up to {size - 1}, the model {n_vocab} embeddings")
    tokens = [by_id.get(i, f"[PAD{i}]") for i in range(size)]
    token_types = [types.get(i, gguf.TokenType.UNUSED) for i in range(size)]
    writer.add_tokenizer_model(kind)
    if kind == "gpt2":
        writer.add_tokenizer_pre(_pre_tokenizer_name(tok_json, source_pre))
    else:
        writer.add_tokenizer_pre("default")
        # sentencepiece scores: llama.cpp ranks merges by them when a file has none; the merge order is the rank
        writer.add_token_scores([-float(i) for i in range(size)])
    writer.add_token_list(tokens)
    writer.add_token_types(token_types)
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])])

    if tokenizer.bos_token_id is not None:
        writer.add_bos_token_id(tokenizer.bos_token_id)
    if tokenizer.unk_token_id is not None:
        writer.add_unk_token_id(tokenizer.unk_token_id)
    if tokenizer.pad_token_id is not None:
        writer.add_pad_token_id(tokenizer.pad_token_id)
    ends = list(dict.fromkeys(end_ids or [tokenizer.eos_token_id]))
    if len(ends) > 3:
        raise GGUFExportError(f"GGUF export: llama.cpp holds three end tokens (eos, eot, eom); this model has {ends}")
    for add, token_id in zip((writer.add_eos_token_id, writer.add_eot_token_id, writer.add_eom_token_id), ends):
        add(token_id)
    probe = tokenizer("a").input_ids
    writer.add_add_bos_token(bool(probe) and probe[0] == tokenizer.bos_token_id)
    writer.add_add_eos_token(bool(probe) and len(probe) > 1 and probe[-1] == tokenizer.eos_token_id)
    if isinstance(tokenizer.chat_template, str):
        writer.add_chat_template(tokenizer.chat_template)
