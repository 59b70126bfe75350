"""Chat data: the formats told apart by their fields, rendering with a chat template, every assistant turn
learned with its end-of-turn token, the length rules and bad records, on the GPT-2 BPE plus ChatML."""

import json
import re

import pytest
from helpers import CHATML, CHATML_GENERATION, SYSTEM, chat_tokenizer, conversation, independent_count

from dts_llm.chat import encode_conversation, learned_turns
from dts_llm.data import DataArguments, encode_example, format_prompt, load_instruction_data


@pytest.fixture(scope="module")
def chatml():
    return chat_tokenizer()


def learned_text(tokenizer, example) -> str:
    pairs = zip(example["input_ids"], example["labels"], strict=True)
    return tokenizer.decode([token for token, label in pairs if label != -100])


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


def load(tmp_path, tokenizer, path, **settings):
    arguments = DataArguments(dataset=str(path), data_cache_dir=str(tmp_path / "cache"), **{"dev_num": 0, **settings})
    return load_instruction_data(arguments, tokenizer)


@pytest.mark.parametrize("template", [CHATML, CHATML_GENERATION], ids=["incremental", "generation-blocks"])
def test_every_assistant_turn_and_its_end_of_turn_token_are_learned_and_nothing_else(chatml, template):
    messages = conversation(3, turns=3)
    example = encode_conversation(chatml, messages, template, learned_turns(messages), "x.jsonl:1")
    assert example["input_ids"] == chatml.apply_chat_template(messages, chat_template=template)["input_ids"]
    assert learned_text(chatml, example) == "It is 3.<|im_end|>It is 4.<|im_end|>It is 5.<|im_end|>"
    learned = sum(label != -100 for label in example["labels"])
    assert learned == independent_count(chatml, ["It is 3.", "It is 4.", "It is 5."])
    last = encode_conversation(chatml, messages, template, learned_turns(messages, last_turn_only=True), "x:1")
    assert learned_text(chatml, last) == "It is 5.<|im_end|>" and last["input_ids"] == example["input_ids"]


def test_a_bos_of_the_tokenizers_own_is_put_in_front_of_chat_and_minillm_examples():
    tokenizer = chat_tokenizer(bos="<|begin_of_text|>")
    bos = tokenizer.convert_tokens_to_ids("<|begin_of_text|>")
    messages = conversation(1, turns=1)
    chat = encode_conversation(tokenizer, messages, CHATML, learned_turns(messages), "x:1")
    minillm = encode_example(tokenizer, format_prompt("Say hi."), "Hi!")
    for example in (chat, minillm):
        assert example["input_ids"][0] == bos and example["input_ids"][1] != bos and example["labels"][0] == -100


def test_the_formats_are_told_apart_by_their_fields_and_counted(chatml, tmp_path, caplog):
    records = [
        {"messages": conversation(1)},
        {"messages": [SYSTEM, {"role": "user", "content": "Hi"}]},  # no assistant turn: skipped, counted
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": " "}]},  # empty
        {"messages": conversation(2, turns=1)},
    ]
    caplog.set_level("INFO", logger="dts_llm")
    data = load(tmp_path, chatml, write_jsonl(tmp_path / "chat.jsonl", records))
    assert data.template == "chat" and data.chat_template == CHATML
    assert data.report == {
        "records": 4, "train": 2, "validation": 0, "dropped_long_prompts": 0, "empty_responses": 1,
        "truncated_responses": 0, "no_assistant_turns": 1,
    }  # fmt: skip
    assert "Rendering with the tokenizer's chat template (template=auto)" in caplog.text
    assert "and 1 without an assistant turn" in caplog.text
    assert learned_text(chatml, data.train[0]) == "It is 1.<|im_end|>It is 2.<|im_end|>"

    # TRL's prompt/completion: message lists learn the completion only; strings are finished text + EOS.
    prompt, completion = conversation(5)[:-1], conversation(5)[-1:]
    listed = write_jsonl(tmp_path / "listed.jsonl", [{"prompt": prompt, "completion": completion}])
    assert learned_text(chatml, load(tmp_path, chatml, listed).train[0]) == "It is 6.<|im_end|>"
    texts = write_jsonl(tmp_path / "texts.jsonl", [{"prompt": "Q: 2+2?\nA:", "completion": " 4"}])
    strings = load(tmp_path, chatml, texts)
    assert strings.template == "minillm" and strings.train[0] == encode_example(chatml, "Q: 2+2?\nA:", " 4")

    # An Alpaca array: the MiniLLM template unless template=chat makes the instruction and input a user turn.
    alpaca = tmp_path / "alpaca.json"
    alpaca.write_text(json.dumps([{"instruction": "Translate.", "input": "Bonjour", "output": "Hello"}]))
    assert load(tmp_path, chatml, alpaca).template == "minillm"
    example = load(tmp_path, chatml, alpaca, template="chat").train[0]
    assert chatml.decode(example["input_ids"]).startswith(
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nTranslate.\n\nBonjour<|im_end|>"
    )
    assert learned_text(chatml, example) == "Hello<|im_end|>"


def test_long_prompts_are_dropped_and_a_cut_turn_keeps_its_learned_prefix(chatml, tmp_path):
    long = [SYSTEM | {"content": "word " * 80}, {"role": "user", "content": "Hi"}]
    records = [{"messages": conversation(1, turns=3)}, {"messages": long + [{"role": "assistant", "content": "Yo"}]}]
    path = write_jsonl(tmp_path / "chat.jsonl", records)
    whole = encode_conversation(chatml, records[0]["messages"], CHATML, [2, 4, 6], "x:1")
    first = next(i for i, label in enumerate(whole["labels"]) if label != -100)
    end_of_turn_one = whole["labels"].index(chatml.eos_token_id)
    cut_at = next(i for i in range(end_of_turn_one + 1, len(whole["labels"])) if whole["labels"][i] != -100) + 2
    data = load(tmp_path, chatml, path, max_length=cut_at, max_prompt_length=first)
    assert data.report["dropped_long_prompts"] == 1 and data.report["truncated_responses"] == 1
    assert data.train[0]["labels"] == whole["labels"][:cut_at]
    assert learned_text(chatml, data.train[0]) == "It is 1.<|im_end|>It is"  # turn two's learned prefix


@pytest.mark.parametrize(
    ("messages", "message"),
    [
        ("Hello", r"field 'messages' must be a list of \{role, content\} messages, got str"),
        ([{"role": "robot", "content": "Hi"}], r"messages\[0\].role is 'robot'"),
        ([{"role": "user", "content": ["Hi"]}], r"messages\[0\].content must be a string, got list"),
    ],
)
def test_a_bad_conversation_names_its_file_line_and_field(chatml, tmp_path, messages, message):
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": conversation(1)}, {"messages": messages}])
    with pytest.raises(ValueError, match=re.escape(f"{path}:2: ") + message):
        load(tmp_path, chatml, path)


def test_a_template_that_refuses_the_conversation_or_is_not_a_prefix_is_refused_with_the_record(chatml, tmp_path):
    alternating = (
        "{% for m in messages %}{% if loop.index0 > 0 and m['role'] == messages[loop.index0 - 1]['role'] %}"
        "{{ raise_exception('Conversation roles must alternate user/assistant') }}{% endif %}"
        "[{{ m['role'] }}] {{ m['content'] }}</s>{% endfor %}"
    )
    twice = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "A"}]
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": twice}, {"messages": twice + twice[1:]}])
    with pytest.raises(ValueError, match=re.escape(f"{path}:2: the chat template refuses") + ".*must alternate"):
        load(tmp_path, chatml, path, chat_template=alternating)
    # A template that marks the last message: the turns rendered one by one are not prefixes of the whole.
    marked = CHATML.replace("'<|im_end|>' + '\\n' }}", "'<|im_end|>' + '\\n' }}{% if loop.last %}END{% endif %}")
    with pytest.raises(ValueError, match=re.escape(f"{path}:1: the chat template renders the conversation up to")):
        load(tmp_path, chatml, path, chat_template=marked)


def test_template_settings_refuse_what_cannot_render_and_read_a_template_file(chatml, tmp_path):
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": conversation(1)}])
    with pytest.raises(ValueError, match="template=minillm renders instructions, but the records are messages"):
        load(tmp_path, chatml, path, template="minillm")
    bare = chat_tokenizer()
    bare.chat_template = None
    with pytest.raises(ValueError, match="the tokenizer has none: set chat_template"):
        load(tmp_path, bare, path)
    (tmp_path / "chatml.jinja").write_text(CHATML)
    given = load(tmp_path, bare, path, chat_template=str(tmp_path / "chatml.jinja"))
    assert given.train[0] == load(tmp_path, chatml, path).train[0]
