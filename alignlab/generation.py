"""Sampling completions for prompts: shared by PPO rollouts and evaluation.

Prompts are chat-templated once (add_generation_prompt) when the tokenizer has a template, left-padded so
every row's completion starts at the same column, and sampled until EOS or `max_new_tokens`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch


@dataclass
class Rollout:
    prompt_ids: torch.Tensor  # [B, P] left-padded prompt tokens
    prompt_mask: torch.Tensor  # [B, P] 1 = real prompt token
    completion_ids: torch.Tensor  # [B, C] right-padded completion tokens (EOS included when produced)
    completion_mask: torch.Tensor  # [B, C] 1 = real completion token, up to and including the first EOS
    texts: list[str]  # decoded completions, special tokens stripped
    ended: torch.Tensor  # [B] bool: the completion produced EOS

    @property
    def input_ids(self) -> torch.Tensor:  # [B, P + C]
        return torch.cat([self.prompt_ids, self.completion_ids], dim=1)

    @property
    def attention_mask(self) -> torch.Tensor:  # [B, P + C]
        return torch.cat([self.prompt_mask, self.completion_mask], dim=1)


def encode_prompts(tokenizer, prompts: list, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Chat-template (when the tokenizer has one and prompts are message lists) and left-pad."""
    texts = [
        tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True) if isinstance(p, list) else p
        for p in prompts
    ]
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        # The template already holds any BOS it wants; add_special_tokens would add a second one.
        enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    finally:
        tokenizer.padding_side = side
    return enc["input_ids"].to(device), enc["attention_mask"].to(device)


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
) -> Rollout:
    """Sample (temperature > 0) or decode greedily (temperature == 0) one completion per prompt.

    `row_seeds` (one per prompt) gives every row its own random stream, so a row's completion does not depend on
    which other prompts share its batch or process: a batch split over several processes samples what it would in
    one. Otherwise sampling draws from torch's global generator (seeded with `generator_seed` when given).
    `observe(input_ids, logits)` (with row_seeds) sees each step's raw float logits [B, V] before sampling.

    Only the options given here shape the distribution: the model's generation_config.json (e.g. a repetition
    penalty or top_k shipped with an instruct model) is set aside, so samples come from softmax(logits /
    temperature), top-p-truncated, exactly the distribution whose log-probs PPO and the evaluation compute."""
    device = next(model.parameters()).device
    prompt_ids, prompt_mask = encode_prompts(tokenizer, prompts, device)
    if generator_seed is not None:
        torch.manual_seed(generator_seed)
    was_training = model.training
    model.eval()
    sample = temperature > 0
    per_row = sample and row_seeds is not None
    if observe is not None and not per_row:
        raise ValueError("generate(observe=...) needs row_seeds and temperature > 0")
    with plain_generation_config(model, tokenizer):
        out = model.generate(
            input_ids=prompt_ids,
            attention_mask=prompt_mask,
            max_new_tokens=max_new_tokens,
            do_sample=sample and not per_row,
            temperature=temperature if sample and not per_row else None,
            top_p=top_p if sample and not per_row else None,
            top_k=0 if sample and not per_row else None,
            logits_processor=[RowSeededSampler(row_seeds, temperature, top_p, observe)] if per_row else None,
        )
    model.train(was_training)
    completion_ids = out[:, prompt_ids.shape[1] :]
    completion_mask, ended = completion_mask_from_ids(completion_ids, tokenizer.eos_token_id)
    completion_ids = completion_ids.masked_fill(completion_mask == 0, tokenizer.pad_token_id)
    texts = tokenizer.batch_decode(completion_ids * completion_mask, skip_special_tokens=True)
    return Rollout(prompt_ids, prompt_mask, completion_ids, completion_mask, texts, ended)


@contextmanager
def plain_generation_config(model, tokenizer) -> Iterator[None]:
    """generate() fills every option it is not given from the model's generation_config (transformers 5), which
    may add logits processors (repetition_penalty, no_repeat_ngram_size, suppress_tokens, ...). Swap in one that
    holds only the special tokens for the call."""
    from transformers import GenerationConfig

    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    saved = inner.generation_config
    inner.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    try:
        yield
    finally:
        inner.generation_config = saved


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


def completion_mask_from_ids(completion_ids: torch.Tensor, eos_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, C] mask of tokens up to and including the first EOS (all when none), and [B] whether EOS came."""
    is_eos = completion_ids == eos_id
    ended = is_eos.any(dim=1)
    first = torch.where(
        ended, is_eos.int().argmax(dim=1), torch.full_like(ended, completion_ids.shape[1], dtype=torch.long)
    )
    positions = torch.arange(completion_ids.shape[1], device=completion_ids.device)
    return (positions[None, :] <= first[:, None]).long(), ended


def sequence_logprobs(model, input_ids, attention_mask, start: int, temperature: float = 1.0) -> torch.Tensor:
    """Per-token log-probs [B, T - start] of input_ids[:, start:] under the model (logits / temperature)."""
    # Left padding: positions count real tokens only, as generate() did when it sampled them.
    position_ids = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)
    logits = model(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
    ).logits
    logits = logits[:, start - 1 : -1].float() / temperature
    targets = input_ids[:, start:]
    return torch.log_softmax(logits, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
