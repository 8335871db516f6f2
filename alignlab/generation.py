"""Sampling completions for prompts: shared by PPO rollouts and evaluation.

Prompts are tokenised as TRL's SFT/DPO trainers tokenise them (`prompt_token_ids`), left-padded so every row's
completion starts at the same column, and sampled until an end token (`end_token_ids`) or `max_new_tokens`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch


@dataclass
class Rollout:
    prompt_ids: torch.Tensor  # [B, P] left-padded prompt tokens
    prompt_mask: torch.Tensor  # [B, P] 1 = real prompt token
    completion_ids: torch.Tensor  # [B, C] right-padded completion tokens (the end token included when produced)
    completion_mask: torch.Tensor  # [B, C] 1 = real completion token, up to and including the first end token
    texts: list[str]  # decoded completions: the real tokens before the end token, special tokens stripped
    ended: torch.Tensor  # [B] bool: the completion produced an end token

    @property
    def input_ids(self) -> torch.Tensor:  # [B, P + C]
        return torch.cat([self.prompt_ids, self.completion_ids], dim=1)

    @property
    def attention_mask(self) -> torch.Tensor:  # [B, P + C]
        return torch.cat([self.prompt_mask, self.completion_mask], dim=1)


def encode_prompts(tokenizer, prompts: list, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded prompt tokens [B, P] and attention mask [B, P] (`prompt_token_ids` per prompt). The mask comes
    from each row's length, never from `ids != pad`: with pad = eos, EOS tokens inside a prompt (a ChatML turn end
    when <|im_end|> is the EOS) stay attended, and generate()'s positions count them."""
    rows = [prompt_token_ids(tokenizer, p) for p in prompts]
    enc = tokenizer.pad({"input_ids": rows}, padding_side="left", return_tensors="pt")
    return enc["input_ids"].to(device), enc["attention_mask"].to(device)


def prompt_token_ids(tokenizer, prompt) -> list[int]:
    """A prompt's tokens, as TRL 1.16's SFT/DPO trainers feed it (trl.data_utils._tokenize): a message list
    through the chat template (add_generation_prompt; tokenised without the tokenizer's own special tokens, since
    a template that wants a BOS writes it), a plain string through the tokenizer WITH its special tokens (the BOS
    of Llama-style tokenizers). Training's prompt is the part its prompt + completion shares with it, so
    special tokens a tokenizer appends after the text (an EOS) are left out."""
    if isinstance(prompt, list):
        return list(
            tokenizer.apply_chat_template(prompt, tokenize=True, add_generation_prompt=True, return_dict=True)[
                "input_ids"
            ]
        )
    full = tokenizer(prompt)["input_ids"]
    plain = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    for start in range(len(full) - len(plain) + 1):  # the text's tokens sit after the prefix special tokens
        if full[start : start + len(plain)] == plain:
            return full[: start + len(plain)]
    return full


def end_token_ids(tokenizer, model=None) -> list[int]:
    """Every token id that ends a response: the tokenizer's EOS, the ids the model's generation_config lists
    (Llama 3: <|eot_id|> and <|end_of_text|>; Qwen2.5: <|im_end|> and <|endoftext|>) and the chat template's
    end-of-turn token when it is a special token (the first token after an assistant message's content). Sampling
    stops at any of them and the completion mask ends on the first (`completion_mask_from_ids`). Read the model's
    own generation_config: call it outside `plain_generation_config`."""
    ids = [tokenizer.eos_token_id]
    if model is not None:
        inner = model.get_base_model() if hasattr(model, "get_base_model") else model
        listed = getattr(getattr(inner, "generation_config", None), "eos_token_id", None)
        ids += [listed] if isinstance(listed, int) else list(listed or [])
    ids.append(_template_end_token(tokenizer))
    return list(dict.fromkeys(int(i) for i in ids if i is not None))


def _template_end_token(tokenizer) -> int | None:
    """The special token a chat template writes right after an assistant message's content, if any (ChatML's
    <|im_end|>, Llama 3's <|eot_id|>, Gemma's <end_of_turn>, or the EOS some templates append)."""
    from jinja2 import TemplateError

    if getattr(tokenizer, "chat_template", None) is None:
        return None
    probe = "alignlab end probe"
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": probe}]
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False)
    except (TemplateError, ValueError):  # a template with stricter role rules: the other end tokens still apply
        return None
    if probe not in text:
        return None
    after = tokenizer(text[text.rindex(probe) + len(probe) :], add_special_tokens=False)["input_ids"]
    special = set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    return after[0] if after and after[0] in special else None


@torch.no_grad()
def generate(
    model,
    tokenizer,
    prompts: list,
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    generator_seed: int | None = None,
    row_seeds: list[int] | None = None,
    observe: Callable[[torch.Tensor, torch.Tensor], None] | None = None,
    end_ids: Sequence[int] | None = None,
    synced: bool = False,
) -> Rollout:
    """Sample (temperature > 0) or decode greedily (temperature == 0) one completion per prompt.

    `row_seeds` (one per prompt) gives every row its own random stream, so a row's completion does not depend on
    which other prompts share its batch or process: a batch split over several processes samples what it would in
    one. Otherwise sampling draws from torch's global generator (seeded with `generator_seed` when given).
    `observe(input_ids, logits)` (with row_seeds) sees each step's raw float logits [B, V] before sampling.
    `end_ids`: the tokens that end a response (default `end_token_ids(tokenizer, model)`; callers that generate
    often collect them once). Texts decode each row's real tokens before its end token: never the padding after
    it, which would otherwise decode as text (id 0 is "!" in the GPT-2, Llama 3 and Qwen2 vocabularies).
    `synced`: every process keeps running forward passes until all are done (a model sharded with per-layer gathers:
    each forward is collective; alignlab/parallel.py).

    Only the options given here shape the distribution: the model's generation_config.json (e.g. a repetition
    penalty or top_k shipped with an instruct model) is set aside, so samples come from softmax(logits /
    temperature), top-p-truncated, exactly the distribution whose log-probs PPO and the evaluation compute."""
    device = next(model.parameters()).device
    end_ids = list(end_token_ids(tokenizer, model) if end_ids is None else end_ids)
    prompt_ids, prompt_mask = encode_prompts(tokenizer, prompts, device)
    if generator_seed is not None:
        torch.manual_seed(generator_seed)
    was_training = model.training
    model.eval()
    sample = temperature > 0
    per_row = sample and row_seeds is not None
    if observe is not None and not per_row:
        raise ValueError("generate(observe=...) needs row_seeds and temperature > 0")
    with plain_generation_config(model, tokenizer, end_ids), contiguous_head_input(model):
        out = model.generate(
            input_ids=prompt_ids,
            attention_mask=prompt_mask,
            max_new_tokens=max_new_tokens,
            do_sample=sample and not per_row,
            temperature=temperature if sample and not per_row else None,
            top_p=top_p if sample and not per_row else None,
            top_k=0 if sample and not per_row else None,
            logits_processor=[RowSeededSampler(row_seeds, temperature, top_p, observe)] if per_row else None,
            synced_gpus=synced,
        )
    model.train(was_training)
    completion_ids = out[:, prompt_ids.shape[1] :]
    completion_mask, ended = completion_mask_from_ids(completion_ids, end_ids)
    completion_ids = completion_ids.masked_fill(completion_mask == 0, tokenizer.pad_token_id)
    lengths = (completion_mask.sum(dim=1) - ended.long()).tolist()  # real tokens before the end token
    texts = tokenizer.batch_decode(
        [row[:n] for row, n in zip(completion_ids.tolist(), lengths)], skip_special_tokens=True
    )
    return Rollout(prompt_ids, prompt_mask, completion_ids, completion_mask, texts, ended)


@contextmanager
def plain_generation_config(model, tokenizer, end_ids: Sequence[int] | None = None) -> Iterator[None]:
    """generate() fills every option it is not given from the model's generation_config (transformers 5), which
    may add logits processors (repetition_penalty, no_repeat_ngram_size, suppress_tokens, ...). Swap in one that
    holds only the special tokens for the call; its eos_token_id is the list of end tokens (default
    `end_token_ids`, read from the model's config before the swap), so every one of them stops sampling."""
    from transformers import GenerationConfig

    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    end_ids = list(end_token_ids(tokenizer, model) if end_ids is None else end_ids)
    saved = inner.generation_config
    inner.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=end_ids or None, pad_token_id=tokenizer.pad_token_id
    )
    try:
        yield
    finally:
        inner.generation_config = saved


@contextmanager
def contiguous_head_input(model) -> Iterator[None]:
    """Hand the LM head a contiguous input while sampling, when it computes in a low precision. generate() reads the
    prompt's last position as `hidden[:, -1:, :]`, a strided view; torch 2.13's CPU matmul turns a bf16 linear on
    such a view into a batched matmul over a copy of the weight per row ([B, 576, 49152] for SmolLM2: one 11 s call
    at B = 128, 40% of a whole 64-token sampling call). A contiguous copy of the [B, 1, H] input costs nothing and
    gives the same logits. float32 heads take another path and are left alone."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    weight = getattr(head, "weight", None)
    if weight is None or weight.dtype == torch.float32:
        yield
        return
    handle = head.register_forward_pre_hook(lambda _, args: (args[0].contiguous(), *args[1:]))
    try:
        yield
    finally:
        handle.remove()


def native_half_precision(dtype: str) -> bool | None:
    """Whether this CPU's oneDNN has native kernels for `dtype` (bfloat16/float16): torch's own test,
    `torch.ops.mkldnn._is_mkldnn_bf16_supported` (AVX-512 or AMX); None where this torch has no such test."""
    ops = torch.ops.mkldnn
    try:
        return bool(ops._is_mkldnn_bf16_supported() if dtype == "bfloat16" else ops._is_mkldnn_fp16_supported())
    except (AttributeError, RuntimeError):
        return None


def slow_half_precision_note(dtype: str, key: str, device) -> str | None:
    """A warning for sampling in `dtype` (bfloat16/float16) on a CPU without native kernels for it
    (`native_half_precision`): there every matmul converts to float32 and back, and sampling is slower than in
    float32, not faster (measured, SmolLM2-135M on an AVX2 AMD EPYC: bf16 0.26x the speed of float32; on a CPU with
    AMX 1.75x). None on GPUs, on CPUs with such kernels, and where torch cannot tell."""
    if dtype not in ("bfloat16", "float16") or torch.device(device).type != "cpu":
        return None
    if native_half_precision(dtype) is not False:
        return None
    return (
        f"{key}: {dtype} on this CPU ({torch.backends.cpu.get_cpu_capability()}, no native {dtype} kernels) samples "
        f"slower than float32 (SmolLM2-135M on AVX2: 0.26x the speed). Remove {key} for speed on this machine; keep "
        "it to sample what a machine with AVX-512 or AMX samples"
    )


class RowSeededSampler:
    """Logits processor that turns greedy decoding into sampling with one random stream per row: with z the logits
    / temperature (-inf outside the top-p nucleus) and E ~ Exp(1) per token, argmax(z - log E) is a sample of
    softmax(z) (the Gumbel-max trick), the same distribution as `generate(do_sample=True)`. Row i's t-th token uses
    the t-th draw of its own generator, whatever else is in the batch. `observe(input_ids, scores)` sees the raw
    logits first."""

    def __init__(self, seeds: list[int], temperature: float, top_p: float, observe: Callable | None = None):
        from transformers import TemperatureLogitsWarper, TopPLogitsWarper

        self.seeds, self.generators, self.observe = [int(s) for s in seeds], None, observe
        self.warpers = [TemperatureLogitsWarper(temperature)] + ([TopPLogitsWarper(top_p)] if top_p < 1 else [])

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.observe is not None:
            self.observe(input_ids, scores)
        if self.generators is None:  # on the logits' device (the lm_head's, under a device map)
            self.generators = [torch.Generator(device=scores.device).manual_seed(s) for s in self.seeds]
        for warp in self.warpers:
            scores = warp(input_ids, scores)  # [B, V]
        noise = torch.stack([torch.empty_like(scores[0]).exponential_(generator=g) for g in self.generators])
        return scores - noise.log()


def completion_mask_from_ids(
    completion_ids: torch.Tensor, eos_id: int | Sequence[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, C] mask of tokens up to and including the first end token (any of `eos_id`: one id or the list of
    `end_token_ids`; all tokens when none came), and [B] whether one came. With pad = eos the padding after the
    first EOS is EOS too: only the first counts, so the response keeps its own EOS and none of the padding."""
    ends = [eos_id] if isinstance(eos_id, int) else list(eos_id)
    ends = torch.tensor(ends, dtype=completion_ids.dtype, device=completion_ids.device)
    is_eos = torch.isin(completion_ids, ends)
    ended = is_eos.any(dim=1)
    first = torch.where(
        ended, is_eos.int().argmax(dim=1), torch.full_like(ended, completion_ids.shape[1], dtype=torch.long)
    )
    positions = torch.arange(completion_ids.shape[1], device=completion_ids.device)
    return (positions[None, :] <= first[:, None]).long(), ended
