"""The MiniLLM / Alpaca prompt template: written once, as strings; ``parse_prompt`` reads it back.

MiniLLM, DistiLLM and the DTS paper train and evaluate with it; the evaluation suites template records
with it too, so a model is evaluated with the prompts it learned.
"""

from __future__ import annotations

import re

PROMPT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request."
    "\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)
PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request."
    "\n\n### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)


def format_prompt(instruction: str, context: str = "") -> str:
    """The prompt MiniLLM, DistiLLM and the DTS paper train and evaluate with."""
    if context:
        return PROMPT_WITH_INPUT.format(instruction=instruction, input=context)
    return PROMPT.format(instruction=instruction)


def _pattern(template: str) -> re.Pattern:
    """``template`` as a regular expression: its text literal, each ``{field}`` a named group."""
    parts = re.split(r"\{(\w+)\}", template)  # text, field, text, field, ..., text
    body = "".join(re.escape(part) if index % 2 == 0 else f"(?P<{part}>.*)" for index, part in enumerate(parts))
    return re.compile(rf"\A{body}\Z", re.DOTALL)


_PATTERNS = (_pattern(PROMPT_WITH_INPUT), _pattern(PROMPT))


def parse_prompt(prompt: str) -> tuple[str, str] | None:
    """(instruction, context) of a prompt built with ``format_prompt``, else None (re-templating gives the
    prompt back exactly)."""
    for pattern in _PATTERNS:
        match = pattern.match(prompt)
        if match:
            instruction, context = match["instruction"], match.groupdict().get("input") or ""
            if format_prompt(instruction, context) == prompt:
                return instruction, context
    return None
