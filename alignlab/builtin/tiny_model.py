"""Built-in tiny base model, built on this machine on first use (no download).

`builtin:tiny-llama` in a recipe resolves to a directory holding a randomly initialised ~3M-parameter
`LlamaForCausalLM` and a byte-level BPE tokenizer trained here on a generated corpus (`tokenizer_corpus`), both
saved with `save_pretrained` (safetensors). The build is deterministic on a given CPU: the same code gives
bit-identical files, whatever the thread count. Across CPU models it is not: the pretraining's float sums follow the
CPU's matmul kernels, and 300 steps carry a last-bit difference into another model (seen: on an AMD EPYC the base
answers nearly every arith chat prompt with ".", which broke 11 tests written on another CPU). Tests must
not depend on which build they get.

Tokenizer design (and why):
- byte-level BPE (vocab 1024) with a digit pre-tokenizer, so every digit is one token and `a+b` is learnable;
- special tokens: pad `<|pad|>` (id 0, distinct from eos so padding is never mistaken for the end of a turn),
  bos `<|begin_of_text|>` (1), eos `<|im_end|>` (2: the end of an assistant turn, so generation stops there),
  `<|im_start|>` (3);
- ChatML chat template; the template writes the single bos at the start, and the tokenizer adds no special tokens
  of its own (so `apply_chat_template(tokenize=True)` has exactly one bos, and one eos per turn). The assistant
  content and its `<|im_end|>` are wrapped in `{% generation %}` so `return_assistant_tokens_mask=True` (TRL's
  `assistant_only_loss`) works.

Cache: `<cache>/builtin/<name>-v<version>`, where <cache> is the `cache_dir` argument, else $ALIGNLAB_CACHE, else
~/.cache/alignlab. The model is built in a temporary directory beside it and renamed into place, and a marker
file is written last, so a crash or two concurrent processes (e.g. `accelerate launch` with 2 processes) never
leave a half-written model behind.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

from alignlab.builtin.tasks import task_corpus
from alignlab.cache import MARKER_FILE, build_once, cache_root

__all__ = [
    "BUILTIN_MODELS",
    "BUILTIN_PREFIX",
    "BuiltinModel",
    "build_builtin_model",
    "builtin_model_path",
    "tiny_model_dir",
    "tokenizer_corpus",
]

BUILTIN_PREFIX = "builtin:"


PAD, BOS, EOS, IM_START = "<|pad|>", "<|begin_of_text|>", "<|im_end|>", "<|im_start|>"
SPECIAL_TOKENS = [PAD, BOS, EOS, IM_START]  # ids 0..3, in this order

# ChatML. The bos is written by the template (the tokenizer itself adds none). Only the assistant content and
# its <|im_end|> are inside {% generation %}: that is what the model is trained to produce; the "\n" after it
# is not (generation stops at <|im_end|>, the eos).
CHAT_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- for message in messages -%}"
    "{%- if message['role'] not in ['system', 'user', 'assistant'] -%}"
    "{{- raise_exception('Unknown role: ' + message['role']) -}}"
    "{%- endif -%}"
    "{{- '<|im_start|>' + message['role'] + '\n' -}}"
    "{%- if message['role'] == 'assistant' -%}"
    "{% generation %}{{- message['content'] + '<|im_end|>' -}}{% endgeneration %}"
    "{%- else -%}"
    "{{- message['content'] + '<|im_end|>' -}}"
    "{%- endif -%}"
    "{{- '\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|im_start|>assistant\n' -}}"
    "{%- endif -%}"
)


@dataclass(frozen=True)
class BuiltinModel:
    """Recipe for one builtin model. Bump `version` whenever anything here changes the built files."""

    description: str
    version: int = 2
    seed: int = 0
    pretrain_steps: int = 300  # a short deterministic pretraining, so the base is a (tiny) pretrained model
    vocab_size: int = 1024
    model_max_length: int = 512
    llama: dict = field(default_factory=dict)  # LlamaConfig kwargs


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    "tiny-llama": BuiltinModel(
        description="~3.1M-parameter Llama (4 layers, hidden 256, 4 heads), byte-level BPE vocab 1024",
        llama=dict(
            hidden_size=256,
            intermediate_size=512,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=4,
            max_position_embeddings=512,
            rope_theta=10000.0,
            tie_word_embeddings=False,
        ),
    ),
}


def _spec(name: str) -> BuiltinModel:
    if name not in BUILTIN_MODELS:
        raise ValueError(f"unknown builtin model {name!r}; known builtin models: {', '.join(BUILTIN_MODELS)}")
    return BUILTIN_MODELS[name]


def tiny_model_dir(name: str, cache_dir: str | Path | None = None) -> Path:
    return cache_root(cache_dir) / "builtin" / f"{name}-v{_spec(name).version}"


def builtin_model_path(name: str, cache_dir: str | Path | None = None) -> Path:
    """Directory of tiny builtin model `name` (model + tokenizer), building it on first use. (Every builtin, the
    fetched ones too: alignlab.builtin.builtin_model_path.)"""
    spec = _spec(name)
    final = tiny_model_dir(name, cache_dir)
    if (final / MARKER_FILE).exists():
        return final
    return build_once(final, lambda tmp: build_builtin_model(name, tmp), f"{name} v{spec.version}\n")


# --------------------------------------------------------------------------------------------------------------
# Building
# --------------------------------------------------------------------------------------------------------------

_SUBJECTS = [
    "the model", "the assistant", "a student", "the teacher", "my friend", "the team", "a small robot",
    "the user", "the reviewer", "our group", "the old man", "a young woman", "the engineer", "the writer",
    "the cat", "the dog", "this tool", "the program", "she", "he", "they", "we", "you", "it", "I",
]  # fmt: skip
_VERBS = [
    "reads", "writes", "answers", "learns", "explains", "checks", "builds", "finds", "helps", "asks",
    "trains", "tests", "solves", "counts", "adds", "likes", "needs", "wants", "makes", "sees", "follows",
    "compares", "prefers", "rejects", "chooses", "improves", "describes", "remembers", "opens", "closes",
]  # fmt: skip
_OBJECTS = [
    "the question", "a short answer", "the book", "the data", "a new recipe", "the result", "the numbers",
    "a simple plan", "the letter", "the code", "the story", "every example", "the reward", "the table",
    "a good reason", "the door", "the window", "some water", "the problem", "the sum", "the report",
    "a better response", "the first step", "the last line", "the map", "a long list", "the small model",
]  # fmt: skip
_ADVERBS = [
    "carefully", "quickly", "slowly", "again", "today", "every day", "at night", "in the morning",
    "without help", "with care", "for a while", "once more", "very well", "as usual", "in silence",
]  # fmt: skip
_OPENERS = [
    "Please", "Can you", "Could you", "Tell me how to", "Explain how to", "Help me",
    "I would like to", "Let us", "Try to", "Remember to",
]  # fmt: skip
_IMPERATIVES = [
    "write a short poem", "answer the question", "add the two numbers", "check the result", "explain the idea",
    "summarize the text", "list three colors", "name a city", "describe the weather", "count to ten",
    "say hello", "give an example", "fix the error", "read the letter", "find the answer",
]  # fmt: skip
_REPLIES = [
    "Sure, here is the answer.", "Of course.", "I am not sure.", "The answer is", "Yes.", "No.",
    "Thank you!", "Here is a short summary:", "Let me think about it.", "That is a good question.",
    "You are a helpful assistant.", "Hello! How can I help you today?", "I think so.", "Good morning.",
]  # fmt: skip


def _english_line(rng: random.Random) -> str:
    kind = rng.random()
    if kind < 0.5:
        s = f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)}"
        if rng.random() < 0.5:
            s += f" {rng.choice(_ADVERBS)}"
        s = s[0].upper() + s[1:] + rng.choice([".", ".", ".", "!", "?"])
        if rng.random() < 0.3:
            s += f" {rng.choice(_REPLIES)}"
        return s
    if kind < 0.8:
        return f"{rng.choice(_OPENERS)} {rng.choice(_IMPERATIVES)}{rng.choice(['?', '.', '!'])}"
    if kind < 0.9:
        return rng.choice(_REPLIES)
    n = rng.randint(0, 9999)
    return f"There are {n} {rng.choice(['apples', 'steps', 'words', 'pages', 'tokens'])}, not {n + rng.randint(1, 20)}."


def tokenizer_corpus(seed: int = 0, n_english: int = 20000, n_task: int = 4000) -> list[str]:
    """The deterministic corpus the builtin tokenizer is trained on: English-ish lines + builtin task strings.

    The chat markup (role names, "\\n") is included, the special tokens themselves are not (they are added whole).
    """
    rng = random.Random(f"tokenizer-corpus/{seed}")
    lines = [_english_line(rng) for _ in range(n_english)]
    lines += [f"system\n{r}\nuser\n{q}\nassistant\n" for r, q in zip(_REPLIES, _IMPERATIVES)]
    lines += task_corpus(seed, n_task)
    rng.shuffle(lines)
    return lines


def _build_tokenizer(spec: BuiltinModel):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    # Digits first (each digit its own pre-token, so BPE can never merge "12"), then the usual byte-level split.
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=spec.vocab_size,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(tokenizer_corpus(spec.seed), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        extra_special_tokens=[IM_START],
        model_max_length=spec.model_max_length,
        padding_side="right",
        chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
    )


def build_builtin_model(name: str, out_dir: str | Path) -> Path:
    """Build builtin model `name` into `out_dir` (no caching, no atomicity: see `builtin_model_path`)."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    spec = _spec(name)
    out_dir = Path(out_dir)
    tokenizer = _build_tokenizer(spec)
    ids = dict(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    config = LlamaConfig(vocab_size=len(tokenizer), **spec.llama, **ids)
    # Seeded init without touching the caller's global RNG state.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        model = LlamaForCausalLM(config)
        _pretrain(model, tokenizer, spec)
    model.generation_config = GenerationConfig(**ids)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def pretraining_corpus(seed: int = 0, n: int = 12000) -> list[str]:
    """Plain-text lines (no chat markup) the builtin model is pretrained on: English-ish text and correct sums
    of the task's TRAINING-side operand pairs only, so held-out evaluation prompts stay unseen."""
    from alignlab.builtin.tasks import ARITH_PROMPT, _arith_pairs

    rng = random.Random(f"pretraining-corpus/{seed}")
    pairs = _arith_pairs(eval_side=False)
    lines = []
    for i in range(n):
        if i % 2:
            lines.append(_english_line(rng))
        else:
            a, b = rng.choice(pairs)
            lines.append(f"{ARITH_PROMPT.format(a=a, b=b)} {a + b}.")
    return lines


def _pretrain(model, tokenizer, spec: BuiltinModel, batch_size: int = 32) -> None:
    """A few hundred steps of next-token prediction on `pretraining_corpus`, seeded, single process.

    A randomly initialised base makes LoRA meaningless (low-rank updates cannot sharpen a random network's
    output), so the builtin base is pretrained just enough to be a base model: it writes English-ish text and
    often-right sums, and knows no chat format (SFT teaches that). Runs once per cache (~1 minute on 2 CPUs).
    """
    import torch

    lines = pretraining_corpus(spec.seed)
    rng = random.Random(f"pretrain/{spec.seed}")
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=spec.pretrain_steps, pct_start=0.1)
    model.train()
    for _ in range(spec.pretrain_steps):
        batch = [tokenizer.bos_token + line + tokenizer.eos_token for line in rng.sample(lines, batch_size)]
        enc = tokenizer(batch, return_tensors="pt", padding=True, add_special_tokens=False)
        labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        loss = model(**enc, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    model.eval()
