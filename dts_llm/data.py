"""Instruction data: the MiniLLM / Alpaca prompt template and the tokenisation of one example."""

from __future__ import annotations

from .losses import IGNORE_INDEX

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


def encode_example(tokenizer, prompt: str, response: str, max_length: int = 512) -> dict[str, list[int]]:
    """Token ids of prompt + response + EOS, with the prompt masked out of the labels.

    The prompt is encoded without special tokens; the EOS after the response is a label even when
    the tokenizer pads with EOS (GPT-2), because labels are built here, not from the padding mask.
    """
    prompt_ids = tokenizer(prompt, add_special_tokens=False).input_ids
    response_ids = tokenizer(response, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
    input_ids = (prompt_ids + response_ids)[:max_length]
    labels = ([IGNORE_INDEX] * len(prompt_ids) + response_ids)[:max_length]
    return {"input_ids": input_ids, "attention_mask": [1] * len(input_ids), "labels": labels}
