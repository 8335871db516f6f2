"""Assistant-only loss masks for chat (`messages`) data, on any chat template: no `{% generation %}` markers needed.

`tokenize_chat(messages, tokenizer)` gives `input_ids` and `assistant_masks` ([T] each, 1 = trained): every token of
every assistant turn and the end-of-turn token that closes it (`<|im_end|>` for ChatML, `<|eot_id|>` for Llama 3,
`<end_of_turn>` for Gemma, `</s>` for Mistral) are 1; system and user turns, role headers, the assistant header
(the generation prompt), BOS and the whitespace between turns are 0. The SFT stage feeds these two columns to
TRL's SFTTrainer as an already-tokenized dataset (TRL builds `labels` from `assistant_masks`, -100 where 0).

How. Rendering each prefix of the conversation and diffing does not work on templates that rewrite earlier
turns (Qwen3 drops the reasoning of earlier assistant turns; Mistral v0.3 moves the system prompt into the last
user turn), so the conversation is rendered whole, twice:
  1. the real conversation -> text R;
  2. the same conversation with each assistant content replaced by a unique sentinel -> skeleton S. Everything
     between sentinels ("frames": headers, user turns, end-of-turn tokens) does not depend on assistant content,
     so R = frame0 + c0 + frame1 + c1 + ... with frame_k taken from S, and c_k the content as the template wrote it.
Walking R frame by frame gives each assistant content's character span; the rebuilt text must equal R exactly,
else the template is refused (ChatMaskError). Spans go to tokens through the fast tokenizer's offset mapping (a
token overlapping a span is trained, as in transformers' `return_assistant_tokens_mask`); then each span is
extended over the tokens that close the turn (`_end_of_turn`): the first token the tokenizer keeps whole (an added
or special token), or a run of them up to the eos. The text is tokenized as TRL tokenizes a chat
(`apply_chat_template(tokenize=True)`: the template writes BOS, `add_special_tokens=False`), so the ids are TRL's.

Assumptions (and what happens when one fails):
- The template writes each assistant content verbatim, up to leading/trailing whitespace it may trim (Jinja
  `| trim`: Llama 3, Gemma, Mistral). Otherwise (content changed, escaped, dropped or written twice):
  ChatMaskError naming the row and message; `check_chat_masks` runs this on the first rows at `alignlab validate`.
- Frames do not depend on assistant content, except for reasoning: a content `<think>R</think>A` (or a
  `reasoning_content` field) is given to the skeleton as `<think>` + sentinel + `</think>` + sentinel, so a template
  that parses it (Qwen3, DeepSeek-R1) renders the skeleton the same way. Reasoning the template drops (Qwen3's
  earlier turns) is simply not in the text; reasoning it keeps is trained, from its `<think>` on. A `<think>...
  </think>` block that the template writes right before the content (Qwen3's empty block on the last turn) is
  trained too: the model writes it at inference, like TRL's own Qwen3 training template.
- The end-of-turn token is an added/special token right after the content (or the eos after whitespace, Llama 2's
  " </s>"). A template that closes no turn has the next turn's first token there, if it is kept whole: that one
  is trained (GLM-4's model stops on <|user|>). Plain text after the content: no end-of-turn token is trained
  for that turn (the model would not learn to stop), and a warning is logged.
- A template separator fused into the content's first token (Mistral's " " + content: one token "▁Hi") is
  trained with it, as the model writes that token at inference.
- A fast tokenizer (offsets); assistant contents are strings (no tool calls, no multimodal parts).
Truncation: `max_length` with TRL's `truncation_mode` ("keep_start" keeps the first tokens, "keep_end" the last);
the mask is cut with the ids.
"""

from __future__ import annotations

import logging
import re
from typing import TYPE_CHECKING, Any

from alignlab.data.formats import DataError, row_place

if TYPE_CHECKING:
    from datasets import Dataset

log = logging.getLogger("alignlab")

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
_SENTINEL = "@@alignlab-{}-{}@@"  # message index, part: c = content, r = reasoning. No whitespace (survives trim).
_SENTINEL_RE = re.compile(r"@@alignlab-(\d+)-([cr])@@")
# A reasoning block the template opens (or writes whole, empty) just before the first trained piece of a turn.
_THINK_BEFORE = re.compile(re.escape(THINK_OPEN) + r"\s*(?:" + re.escape(THINK_CLOSE) + r"\s*)?\Z")
_WARNED: set[str] = set()  # chat templates already warned about (no end-of-turn token)
_FIX = (
    "Use a template that writes assistant messages as given (model.chat_template: path/to/template.jinja), give "
    "prompt/completion columns instead (loss on the completion), or set completion_only_loss: false to train on "
    "every token."
)


class ChatMaskError(DataError):
    """The assistant tokens of a chat cannot be found: the template or the tokenizer does not allow it."""


def tokenize_chat(
    messages: list[dict[str, Any]],
    tokenizer,
    *,
    max_length: int | None = None,
    truncation_mode: str = "keep_start",
    where: str = "chat",
) -> dict[str, list[int]]:
    """`{"input_ids": [T], "assistant_masks": [T]}` for one conversation (see the module docstring)."""
    text, spans = assistant_spans(messages, tokenizer, where=where)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    mask = [0] * len(ids)
    whole = _kept_whole_ids(tokenizer)
    t = 0
    for start, end in spans:  # spans are in order and do not overlap
        while t < len(ids) and offsets[t][1] <= start:
            t += 1
        while t < len(ids) and offsets[t][0] < end:
            mask[t] = 1
            t += 1
        closing = _end_of_turn(ids, offsets, text, t, whole, tokenizer.eos_token_id)
        for k in closing:
            mask[k] = 1
        t = closing[-1] + 1 if closing else t
        if not closing and tokenizer.chat_template not in _WARNED:
            _WARNED.add(tokenizer.chat_template)  # once per template, not once per row
            log.warning(
                "%s: no end-of-turn token after an assistant turn (it is followed by %r), so the model is not "
                "trained to stop there. Templates normally close each turn with a special token such as <|im_end|>.",
                where,
                text[end : end + 20],
            )
    if max_length is not None and len(ids) > max_length:
        if truncation_mode == "keep_start":
            ids, mask = ids[:max_length], mask[:max_length]
        elif truncation_mode == "keep_end":
            ids, mask = ids[-max_length:], mask[-max_length:]
        else:
            raise ValueError(f"truncation_mode must be 'keep_start' or 'keep_end', not {truncation_mode!r}")
    return {"input_ids": list(ids), "assistant_masks": mask}


def assistant_spans(messages: list[dict[str, Any]], tokenizer, *, where: str = "chat") -> tuple[str, list[tuple]]:
    """The rendered conversation and the character spans [(start, end)] of each assistant turn's output (content,
    reasoning kept by the template), end-of-turn token excluded, in order."""
    _check_fast(tokenizer, where)
    originals: dict[tuple[int, str], str] = {}
    skeleton_messages = []
    for j, m in enumerate(messages):
        if m.get("role") != "assistant":
            skeleton_messages.append(m)
            continue
        content = m.get("content")
        if not isinstance(content, str):
            raise ChatMaskError(
                f"{where}: message {j} (assistant) has content of type {type(content).__name__}, not a string; "
                f"assistant-only loss handles plain-text assistant messages (no tool calls or content parts). {_FIX}"
            )
        c, r = _SENTINEL.format(j, "c"), _SENTINEL.format(j, "r")
        if isinstance(m.get("reasoning_content"), str):
            originals[(j, "r")], originals[(j, "c")] = m["reasoning_content"], content
            skeleton_messages.append({**m, "reasoning_content": r, "content": c})
        elif content.count(THINK_CLOSE) == 1:
            before, answer = content.split(THINK_CLOSE)
            head, opened, reasoning = before.rpartition(THINK_OPEN)
            originals[(j, "r")], originals[(j, "c")] = reasoning, answer
            skeleton_messages.append({**m, "content": head + opened + r + THINK_CLOSE + c})
        else:
            originals[(j, "c")] = content
            skeleton_messages.append({**m, "content": c})
    text = _render(tokenizer, messages, where)
    skeleton = _render(tokenizer, skeleton_messages, where)

    # Walk the real text along the skeleton: frames must match exactly, each sentinel stands for its original text
    # (perhaps trimmed of surrounding whitespace).
    pieces: dict[int, list[tuple[int, int, int]]] = {}  # message -> [(frame start, piece start, piece end)]
    found = list(_SENTINEL_RE.finditer(skeleton))
    keys = [(int(f[1]), f[2]) for f in found]
    if len(set(keys)) < len(keys) or not set(keys) <= set(originals):
        raise ChatMaskError(
            f"{where}: the chat template writes an assistant message more than once, or a message's text contains "
            f"alignlab's marker '@@alignlab-N-c@@'; cannot tell which tokens are the assistant's. {_FIX}"
        )
    missing = sorted({j for j, part in originals if part == "c"} - {j for j, part in keys if part == "c"})
    if missing:
        raise _not_verbatim(where, missing[0], tokenizer)
    pos, frame_start = 0, 0
    for k, (match, key) in enumerate(zip(found, keys)):
        frame = skeleton[frame_start : match.start()]
        following = skeleton[match.end() : found[k + 1].start() if k + 1 < len(found) else len(skeleton)]
        at = pos + len(frame)
        piece = _rendered_piece(originals[key], text, at, following) if text.startswith(frame, pos) else None
        if piece is None:
            raise _not_verbatim(where, key[0], tokenizer)
        pieces.setdefault(key[0], []).append((pos, at, at + len(piece)))
        pos, frame_start = at + len(piece), match.end()
    if text[pos:] != skeleton[frame_start:]:
        raise _not_verbatim(where, keys[-1][0] if keys else 0, tokenizer)

    spans = []
    for j in sorted(pieces):
        frame_at, start, _ = pieces[j][0]
        think = _THINK_BEFORE.search(text, frame_at, start)
        spans.append((think.start() if think else start, pieces[j][-1][2]))
    return text, spans


def tokenize_chat_dataset(
    ds: Dataset,
    tokenizer,
    *,
    max_length: int | None = None,
    truncation_mode: str = "keep_start",
    where: str = "dataset",
) -> Dataset:
    """`messages` rows -> `input_ids` + `assistant_masks` rows (other columns dropped), in TRL's pre-tokenized form."""
    _check_fast(tokenizer, where)

    def one(row, i):
        return tokenize_chat(
            row["messages"],
            tokenizer,
            max_length=max_length,
            truncation_mode=truncation_mode,
            where=f"{where}: row {i}",
        )

    return ds.map(one, with_indices=True, remove_columns=ds.column_names, desc="assistant masks")


def check_chat_masks(ds: Dataset, tokenizer, where: str, rows: int = 8) -> None:
    """Before any run (`alignlab validate`): the assistant tokens of the first `rows` conversations can be found
    (fast tokenizer, template writes assistant content verbatim). Raises ChatMaskError."""
    if "messages" not in ds.column_names or tokenizer.chat_template is None:
        return
    for i in range(min(rows, len(ds))):
        tokenize_chat(ds[i]["messages"], tokenizer, where=f"{where}: {row_place(where, i)}")


def _rendered_piece(original: str, text: str, at: int, following: str) -> str | None:
    """The longest whitespace-trimmed form of `original` that `text` holds at `at`, followed by `following` (the
    next frame). Templates trim content (`| trim`, `.strip('\\n')`), never more than its surrounding whitespace."""
    core = original.strip()
    lead = len(original) - len(original.lstrip())
    trail = len(original) - len(original.rstrip())
    if not core:  # whitespace only: any part of it
        lead, trail = len(original), 0
    for a in range(lead + 1):
        for b in range(len(original), len(original) - trail - 1, -1):
            piece = original[a:b]
            if text.startswith(piece, at) and text.startswith(following, at + len(piece)):
                return piece
    return None


def _render(tokenizer, messages: list[dict], where: str) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False)
    except Exception as e:  # jinja2 TemplateError, the template's own raise_exception, ...
        raise ChatMaskError(f"{where}: the chat template cannot render this conversation: {e}") from e


def _check_fast(tokenizer, where: str) -> None:
    if not getattr(tokenizer, "is_fast", False):
        raise ChatMaskError(
            f"{where}: assistant-only loss on `messages` data needs a fast tokenizer (for its character offsets); "
            f"{tokenizer.name_or_path} loads as {type(tokenizer).__name__}, a slow one. Give the model a "
            f"tokenizer.json (model.tokenizer), or set completion_only_loss: false to train on every token."
        )


def _end_of_turn(ids: list[int], offsets: list, text: str, t: int, whole: set[int], eos_id: int | None) -> list[int]:
    """Indices of the tokens from `t` (the first after the content) that close an assistant turn: of the run of
    kept-whole tokens there, the first, or all up to the eos when the run holds it (Cohere's <|END_RESPONSE|>
    <|END_OF_TURN_TOKEN|>). Never past that: Llama 3's <|eot_id|> is followed at once by the next turn's
    <|start_header_id|>, Mistral's </s> by [INST]. Whitespace-only tokens may come first only before the eos
    (Llama 2's " </s>"), not before any other kept-whole token, which would be the next turn's header."""
    u = t
    while u < len(ids) and ids[u] not in whole and not text[offsets[u][0] : offsets[u][1]].strip():
        u += 1
    run = u
    while run < len(ids) and ids[run] in whole:
        run += 1
    eos = next((k for k in range(u, run) if ids[k] == eos_id), None)
    if eos is not None:
        return list(range(t, eos + 1))
    return [u] if u == t and run > u else []  # [] = no end-of-turn token: text follows (or nothing)


def _kept_whole_ids(tokenizer) -> set[int]:
    """Tokens the tokenizer never splits: special tokens and added tokens (Gemma's <end_of_turn> is added, not
    special)."""
    return set(tokenizer.all_special_ids) | set(tokenizer.added_tokens_decoder)


def _not_verbatim(where: str, j: int, tokenizer) -> ChatMaskError:
    return ChatMaskError(
        f"{where}: the chat template of {tokenizer.name_or_path} does not write assistant message {j} as given (it "
        f"changes, escapes or drops the text, beyond trimming whitespace), so the assistant's tokens cannot be found "
        f"for assistant-only loss. {_FIX}"
    )
