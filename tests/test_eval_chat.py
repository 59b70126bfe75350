"""Evaluating a chat model: suite prompts rendered with its chat template (an instruction as the user turn it
is trained on), a suite of conversations, and the choice said in the output and the results."""

import json

import pytest
from helpers import FIXTURES, SYSTEM, chat_tokenizer, conversation, tiny_chat_model

from dts_llm.chat import instruction_messages
from eval.__main__ import main
from eval.generate import prompt_token_ids
from eval.suites import load_suite, with_chat_template


def test_suite_prompts_are_rendered_with_the_chat_template_as_training_renders_instructions():
    tokenizer = chat_tokenizer()
    suite = with_chat_template(load_suite("dolly", str(FIXTURES / "dolly_raw.jsonl")), tokenizer)
    record = json.loads((FIXTURES / "dolly_raw.jsonl").read_text().splitlines()[1])
    user = instruction_messages(record["instruction"], record["context"])
    assert suite.examples[1].prompt == tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
    assert suite.examples[1].prompt.endswith("<|im_end|>\n<|im_start|>assistant\n")


def test_a_bos_of_the_tokenizers_own_leads_every_prompt_once():
    tokenizer = chat_tokenizer(bos="<|begin_of_text|>")
    bos = tokenizer.bos_token_id
    assert [ids[:2].count(bos) for ids in prompt_token_ids(tokenizer, ["Hi", "<|begin_of_text|>Hi"])] == [1, 1]


@pytest.fixture(scope="module")
def chat_model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("chat-model")
    tokenizer = chat_tokenizer()
    tiny_chat_model("qwen2", tokenizer).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_a_chat_model_is_scored_with_its_template_on_instructions_and_conversations(chat_model_dir, tmp_path, capsys):
    chats = tmp_path / "chats.jsonl"
    records = [{"messages": [SYSTEM]}] + [{"messages": conversation(i)} for i in range(2)]
    chats.write_text("".join(json.dumps(record) + "\n" for record in records))
    argv = ["rouge", "--model", str(chat_model_dir), "--greedy", "--limit", "2"]
    argv += ["--max-length", "104", "--max-prompt-tokens", "96"]
    suites = f"dolly={FIXTURES / 'dolly_raw.jsonl'},chats={chats}"
    result = main([*argv, "--suites", suites, "--output", str(tmp_path / "auto"), "--no-progress"])
    assert "the model's tokenizer has a chat template: prompts are rendered with it" in capsys.readouterr().out
    assert result["settings"]["chat_template"] is True
    assert result["suites"]["chats"]["count"] == 2 and result["suites"]["chats"]["skipped"] == {"no assistant turn": 1}
    predictions = (tmp_path / "auto" / "predictions" / "chats" / "greedy.jsonl").read_text().splitlines()
    first = json.loads(predictions[0])
    assert first["references"] == ["It is 1."] and first["prompt"].endswith("<|im_start|>assistant\n")
    with pytest.raises(ValueError, match=r"suites \['chats'\] hold conversations"):
        main([*argv, "--suites", suites, "--output", str(tmp_path / "off"), "--no-chat-template", "--no-progress"])
