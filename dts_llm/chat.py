"""Conversations rendered with a chat template and labelled turn by turn.

Every assistant turn is learned, with the end-of-turn token that closes it (so the student learns to
stop); system, user and tool turns and the template's scaffolding are -100. The labels follow the one
rendered text token for token, in one of two ways:

- a template that marks assistant content with ``{% generation %}`` says itself what is learned
  (``apply_chat_template(..., return_assistant_tokens_mask=True)``);
- otherwise each learned turn is found by rendering the conversation up to it (with the generation
  prompt) and through it: the turn is what the second adds to the first, less the whitespace after its
  end-of-turn token. Both renderings must be prefixes of the whole conversation, or the turns cannot be
  told apart and the conversation is refused with its file:line.

A token that overlaps a learned span is learned (as transformers' assistant mask does). A tokenizer with a
BOS of its own (Llama, Mistral, Gemma) gets it in front, as its model was trained; GPT-2 and OPT, whose
BOS is their EOS, get none (the MiniLLM protocol).
"""

from __future__ import annotations

import re
from pathlib import Path

import jinja2

from .errors import UserError
from .losses import IGNORE_INDEX
from .records import read_text

ROLES = ("system", "user", "assistant", "tool")
_GENERATION_BLOCK = re.compile(r"\{%-?\s*generation\s*-?%\}")


def instruction_messages(instruction: str, context: str = "") -> list[dict[str, str]]:
    """The user turn an instruction (and its context) is given to a chat model in, in training and evaluation."""
    return [{"role": "user", "content": f"{instruction}\n\n{context}" if context else instruction}]


def chat_template_of(tokenizer, chat_template: str | None = None) -> str | None:
    """The Jinja to render with: ``chat_template`` (a template, or the path of a file holding one), else the
    tokenizer's own (None when it has none)."""
    if chat_template is None:
        return tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else None
    if "{" not in chat_template:  # a template always has a tag; a path never needs one
        path = Path(chat_template)
        if not path.is_file():
            raise UserError(f"chat_template: {chat_template} is neither a Jinja template nor a file")
        return read_text(path)
    return chat_template


def bos_prefix(tokenizer) -> list[int]:
    """``[BOS]`` for a tokenizer that adds a BOS of its own when it encodes text, else ``[]``.

    GPT-2 and OPT mark documents with their EOS, which MiniLLM's protocol leaves out of prompts; Llama,
    Mistral and Gemma models never saw text without their BOS.
    """
    bos = tokenizer.bos_token_id
    if bos is None or bos == tokenizer.eos_token_id:
        return []
    return [bos] if tokenizer("a").input_ids[:1] == [bos] else []


def check_messages(messages, where: str, field: str) -> None:
    """Refuse a conversation that is not a list of ``{"role", "content"}`` with known roles and string content."""
    if not isinstance(messages, list):
        raise UserError(
            f"{where}: field {field!r} must be a list of {{role, content}} messages, "
            f"got {type(messages).__name__} {messages!r:.80}"
        )
    for index, message in enumerate(messages):
        name = f"{field}[{index}]"
        if not isinstance(message, dict):
            raise UserError(f"{where}: {name} must be a {{role, content}} message, got {type(message).__name__}")
        if message.get("role") not in ROLES:
            raise UserError(f"{where}: {name}.role is {message.get('role')!r}; the roles are {', '.join(ROLES)}")
        if not isinstance(message.get("content"), str):
            content = message.get("content")
            raise UserError(f"{where}: {name}.content must be a string, got {type(content).__name__} {content!r:.80}")


def learned_turns(messages: list[dict], first: int = 0, last_turn_only: bool = False) -> list[int]:
    """Indices of the assistant turns that are learned: from ``first`` on (a prompt/completion record learns
    its completion), or the last one only."""
    turns = [i for i, message in enumerate(messages) if message["role"] == "assistant" and i >= first]
    return turns[-1:] if last_turn_only else turns


def encode_conversation(
    tokenizer, messages: list[dict], template: str, turns: list[int], where: str
) -> dict[str, list[int]]:
    """input_ids/attention_mask/labels of ``messages`` rendered with ``template``, the assistant ``turns``
    learned (``learned_turns``) and everything else -100."""
    try:
        if _GENERATION_BLOCK.search(template):
            input_ids, learned = _generation_mask(tokenizer, messages, template, turns, where)
        else:
            input_ids, learned = _incremental_mask(tokenizer, messages, template, turns, where)
    except jinja2.TemplateError as error:
        raise UserError(f"{where}: the chat template refuses this conversation: {error}") from None
    bos = bos_prefix(tokenizer)
    if bos and input_ids[:1] != bos:
        input_ids, learned = bos + input_ids, [False] + learned
    labels = [token if keep else IGNORE_INDEX for token, keep in zip(input_ids, learned, strict=True)]
    return {"input_ids": input_ids, "attention_mask": [1] * len(input_ids), "labels": labels}


def _render(tokenizer, messages: list[dict], template: str, generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(
        messages, chat_template=template, tokenize=False, add_generation_prompt=generation_prompt
    )


def _generation_mask(tokenizer, messages, template, turns, where) -> tuple[list[int], list[bool]]:
    """The template's own assistant mask, each masked run one assistant turn, kept for ``turns`` only."""
    encoded = tokenizer.apply_chat_template(
        messages, chat_template=template, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    mask = [bool(flag) for flag in encoded["assistant_masks"]]
    runs = [i for i, flag in enumerate(mask) if flag and (i == 0 or not mask[i - 1])]
    assistants = [i for i, message in enumerate(messages) if message["role"] == "assistant"]
    with_content = [i for i in assistants if messages[i]["content"]]  # an empty turn may mark no token
    owners = next((group for group in (assistants, with_content) if len(group) == len(runs)), None)
    if owners is None:
        raise UserError(
            f"{where}: the chat template's {{% generation %}} blocks mark {len(runs)} spans for the "
            f"{len(assistants)} assistant turns: cannot tell which turn each is"
        )
    learned = [False] * len(mask)
    for start, owner in zip(runs, owners, strict=True):
        position = start
        while owner in turns and position < len(mask) and mask[position]:
            learned[position] = True
            position += 1
    return list(encoded["input_ids"]), learned


def _incremental_mask(tokenizer, messages, template, turns, where) -> tuple[list[int], list[bool]]:
    """Learned character spans from renderings up to and through each turn; tokens overlapping one are learned."""
    text = _render(tokenizer, messages, template)
    spans = []
    for turn in turns:
        if turn == 0:
            raise UserError(f"{where}: the conversation opens with an assistant turn: no prompt comes before it")
        before = _render(tokenizer, messages[:turn], template, generation_prompt=True)
        through = _render(tokenizer, messages[: turn + 1], template)
        if not (text.startswith(before) and text.startswith(through) and through.startswith(before)):
            raise UserError(
                f"{where}: the chat template renders the conversation up to message {turn} differently from the "
                "whole, so its assistant turns cannot be found; use a template with {% generation %} blocks"
            )
        spans.append((len(before), len(through.rstrip())))
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    learned = [any(start < stop and end > begin for begin, stop in spans) for start, end in encoded["offset_mapping"]]
    return list(encoded["input_ids"]), learned
