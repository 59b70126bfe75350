"""Tokenisation of one instruction example: the template, the prompt mask and the learned EOS."""

from dts_llm.data import encode_example, format_prompt


def test_template_matches_minillm_exactly():
    assert format_prompt("Name a colour.") == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the "
        "request.\n\n### Instruction:\nName a colour.\n\n### Response:\n"
    )
    assert format_prompt("Summarise.", "A long text.") == (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n### Instruction:\nSummarise.\n\n"
        "### Input:\nA long text.\n\n### Response:\n"
    )


def test_prompt_is_masked_and_eos_is_learned_even_when_pad_is_eos(tokenizer):
    assert tokenizer.pad_token_id == tokenizer.eos_token_id
    prompt = format_prompt("Say hi.")
    example = encode_example(tokenizer, prompt, "Hi!")
    prompt_ids = tokenizer(prompt, add_special_tokens=False).input_ids
    response_ids = tokenizer("Hi!", add_special_tokens=False).input_ids
    assert example["input_ids"] == prompt_ids + response_ids + [tokenizer.eos_token_id]
    assert example["labels"] == [-100] * len(prompt_ids) + response_ids + [tokenizer.eos_token_id]
    assert example["attention_mask"] == [1] * len(example["input_ids"])


def test_long_examples_are_cut_to_max_length(tokenizer):
    example = encode_example(tokenizer, format_prompt("Repeat."), "word " * 50, max_length=40)
    assert len(example["input_ids"]) == len(example["labels"]) == 40
