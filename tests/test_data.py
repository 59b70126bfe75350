"""Instruction data: the template, the encoding of one example, and loading records into tokenised splits."""

import json
import logging
import re
from pathlib import Path

import pyarrow
import pyarrow.parquet
import pytest
from helpers import SHARED_DATA
from transformers import DataCollatorForSeq2Seq, HfArgumentParser

from dts_llm import data as data_module
from dts_llm.data import DataArguments, encode_example, format_prompt, load_instruction_data
from dts_llm.records import read_records


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


def test_no_special_tokens_are_added_by_a_tokenizer_that_adds_bos(tokenizer, tmp_path):
    """OPT-style tokenizers add BOS by default; MiniLLM encodes the prompt without it."""
    from transformers import GPT2TokenizerFast

    tokenizer.save_pretrained(tmp_path)
    with_bos = GPT2TokenizerFast.from_pretrained(tmp_path, add_bos_token=True)
    prompt = format_prompt("Say hi.")
    assert with_bos(prompt).input_ids[0] == with_bos.bos_token_id
    example = encode_example(with_bos, prompt, "Hi!")
    assert example["input_ids"][0] != with_bos.bos_token_id
    assert example["input_ids"] == encode_example(tokenizer, prompt, "Hi!")["input_ids"]


def test_long_examples_are_cut_to_max_length(tokenizer):
    example = encode_example(tokenizer, format_prompt("Repeat."), "word " * 50, max_length=40)
    assert len(example["input_ids"]) == len(example["labels"]) == 40


# --- loading: real samples, the two layouts, bad input, the cache -------------------------------------

needs_shared_data = pytest.mark.skipif(
    not SHARED_DATA.exists(), reason=f"real data samples not found at {SHARED_DATA}"
)


def write_jsonl(path: Path, records: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


def data_args(tmp_path: Path, dataset, **overrides) -> DataArguments:
    """No dev split and a cache inside the test's folder unless a test says otherwise."""
    settings = {"dev_num": 0, "data_cache_dir": str(tmp_path / "cache"), **overrides}
    return DataArguments(dataset=str(dataset), **settings)


def dolly(count: int, start: int = 0) -> list[dict]:
    return [
        {"instruction": f"Add {i} and 1.", "context": "Numbers." if i % 2 else "", "response": f"{i + 1}"}
        for i in range(start, start + count)
    ]


def expected(tokenizer, instruction: str, context: str, response: str, **kwargs) -> dict[str, list[int]]:
    return encode_example(tokenizer, format_prompt(instruction, context), response, **kwargs)


@needs_shared_data
def test_raw_dolly_sample_loads_with_the_template_and_the_first_dev_num_records_as_validation(tokenizer, tmp_path):
    path = SHARED_DATA / "dolly" / "raw_sample.jsonl"
    records = read_records(str(path))
    data = load_instruction_data(data_args(tmp_path, path, dev_num=100), tokenizer)
    # These are MiniLLM's held-out records: all prompts fit in 256 tokens, every response is non-empty.
    counts = {"records": 1000, "train": 900, "validation": 100, "dropped_long_prompts": 0, "empty_responses": 0}
    counts["truncated_responses"] = 18  # of the 1000, 18 responses run past 512 tokens and lose their EOS
    assert data.report == counts
    assert data.train.column_names == data.validation.column_names == ["input_ids", "attention_mask", "labels"]
    with_context = next(i for i, r in enumerate(records[:100]) if r["context"])
    for split, index, record in [
        (data.validation, 0, records[0]),
        (data.validation, with_context, records[with_context]),
        (data.train, 0, records[100]),
    ]:
        assert split[index] == expected(tokenizer, record["instruction"], record["context"], record["response"])
    example = data.validation[with_context]
    pairs = zip(example["input_ids"], example["labels"], strict=True)
    prompt_ids = [token for token, label in pairs if label == -100]
    assert tokenizer.decode(prompt_ids).endswith(f"### Input:\n{records[with_context]['context']}\n\n### Response:\n")


@needs_shared_data
@pytest.mark.parametrize("name", ["dolly", "self-inst", "sinst", "uinst-short"])
def test_minillm_stored_prompt_is_exactly_the_template(name):
    records = read_records(str(SHARED_DATA / "minillm" / name / "valid.jsonl"))
    assert records and all(r["prompt"] == format_prompt(r["instruction"], r["input"]) for r in records)


@needs_shared_data
@pytest.mark.parametrize("name", ["dolly", "sinst"])
def test_minillm_processed_files_load_and_train_on_the_first_reference(tokenizer, tmp_path, name):
    path = SHARED_DATA / "minillm" / name / "valid.jsonl"
    records = read_records(str(path))
    data = load_instruction_data(data_args(tmp_path, path), tokenizer)
    kept = [r for r in records if len(tokenizer(r["prompt"], add_special_tokens=False).input_ids) <= 256]
    assert data.report["train"] == len(data.train) == len(kept) == len(records) - data.report["dropped_long_prompts"]
    assert data.validation is None
    if name == "sinst":
        assert all(isinstance(r["output"], list) for r in records)
    for example, record in zip(data.train.select(range(5)), kept, strict=False):
        reference = record["output"][0] if isinstance(record["output"], list) else record["output"]
        assert example == encode_example(tokenizer, record["prompt"], reference)


@needs_shared_data
def test_parquet_round_trip(tokenizer, tmp_path):
    records = read_records(str(SHARED_DATA / "minillm" / "sinst" / "valid.jsonl"))[:20]
    path = tmp_path / "sinst.parquet"
    pyarrow.parquet.write_table(pyarrow.Table.from_pylist(records), path)
    assert read_records(str(path)) == records
    from_parquet = load_instruction_data(data_args(tmp_path, path), tokenizer).train
    from_jsonl = load_instruction_data(data_args(tmp_path, write_jsonl(tmp_path / "sinst.jsonl", records)), tokenizer)
    assert from_parquet.to_list() == from_jsonl.train.to_list()


def test_malformed_json_line_names_file_and_line(tokenizer, tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text(json.dumps(dolly(1)[0]) + "\n\n" + '{"instruction": "Hi", "response": \n')
    with pytest.raises(ValueError, match=re.escape(f"{path}:3: malformed JSON")):
        read_records(str(path))
    with pytest.raises(ValueError, match=re.escape(f"{path}:3: malformed JSON")):
        load_instruction_data(data_args(tmp_path, path), tokenizer)
    array = tmp_path / "broken.json"
    array.write_text('[\n  {"instruction": "Hi", "response": "Hello"},\n  {"instruction": "Hi",, }\n]\n')
    with pytest.raises(ValueError, match=re.escape(f"{array}:3: malformed JSON")):
        read_records(str(array))
    with pytest.raises(ValueError, match=re.escape(f"{path}:1: expected a JSON object")):
        read_records(str(write_jsonl(path, [["not", "a", "record"]])))


def test_a_byte_that_is_not_utf8_names_file_and_line(tokenizer, tmp_path):
    lines = [json.dumps(record).encode() for record in dolly(3)]
    lines[2] = lines[2].replace(b"Add 2", b"Add \xe9 2")  # Latin-1 e-acute: not UTF-8
    path = tmp_path / "train.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    with pytest.raises(ValueError, match=re.escape(f"{path}:3: not UTF-8 text (byte 0xe9")):
        load_instruction_data(data_args(tmp_path, path), tokenizer)
    array = tmp_path / "train.json"
    array.write_bytes(b"[\n" + b",\n".join(lines) + b"\n]\n")
    with pytest.raises(ValueError, match=re.escape(f"{array}:4: not UTF-8 text")):
        read_records(str(array))


def test_a_utf8_byte_order_mark_is_accepted(tokenizer, tmp_path):
    jsonl = tmp_path / "train.jsonl"
    jsonl.write_text("".join(json.dumps(record) + "\n" for record in dolly(2)), encoding="utf-8-sig")
    array = tmp_path / "train.json"
    array.write_text(json.dumps(dolly(2)), encoding="utf-8-sig")
    assert read_records(str(jsonl)) == read_records(str(array)) == dolly(2)
    assert load_instruction_data(data_args(tmp_path, jsonl), tokenizer).report["train"] == 2


def test_an_absent_or_null_context_is_empty(tokenizer, tmp_path):
    records = dolly(3)
    del records[0]["context"]
    records[1]["context"] = None
    path = write_jsonl(tmp_path / "train.jsonl", records)
    data = load_instruction_data(data_args(tmp_path, path), tokenizer)
    contexts = ["", "", records[2]["context"]]
    assert data.train.to_list() == [
        expected(tokenizer, record["instruction"], context, record["response"])
        for record, context in zip(records, contexts, strict=False)
    ]
    minillm = [{"instruction": "Say yes.", "input": None, "output": "Yes"}, {"instruction": "Say no.", "output": "No"}]
    data = load_instruction_data(data_args(tmp_path, write_jsonl(tmp_path / "m.jsonl", minillm)), tokenizer)
    assert data.train.to_list() == [
        expected(tokenizer, "Say yes.", "", "Yes"),
        expected(tokenizer, "Say no.", "", "No"),
    ]


def test_missing_field_names_the_field_and_the_record(tokenizer, tmp_path):
    records = dolly(3)
    del records[1]["response"]
    path = write_jsonl(tmp_path / "train.jsonl", records)
    with pytest.raises(ValueError, match=re.escape(f"{path}:2: missing field 'response'")):
        load_instruction_data(data_args(tmp_path, path), tokenizer)
    with pytest.raises(ValueError, match=r"cannot tell the layout .* set instruction_field and response_field"):
        load_instruction_data(
            data_args(tmp_path, write_jsonl(tmp_path / "q.jsonl", [{"q": "1", "a": "2"}])), tokenizer
        )


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("response", 3, "field 'response' must be a string or a list of strings, got int 3"),
        ("response", ["ok", 1], "field 'response' must be a string or a list of strings, got list"),
        ("instruction", None, "field 'instruction' must be a string, got NoneType"),
        ("response", None, "field 'response' must be a string or a list of strings, got NoneType"),
        ("context", {"a": 1}, "field 'context' must be a string, got dict"),
    ],
)
def test_non_string_field_names_the_field_and_the_record(tokenizer, tmp_path, field, value, message):
    records = dolly(3)
    records[2][field] = value
    path = write_jsonl(tmp_path / "train.jsonl", records)
    with pytest.raises(ValueError, match=re.escape(f"{path}:3: {message}")):
        load_instruction_data(data_args(tmp_path, path), tokenizer)


def test_empty_responses_and_long_prompts_are_dropped_counted_and_logged(tokenizer, tmp_path, caplog):
    records = dolly(6)
    records[1]["response"] = ""
    records[2]["response"] = " \n"
    records[4]["context"] = "word " * 60  # a prompt of about 100 tokens
    path = write_jsonl(tmp_path / "train.jsonl", records)
    with caplog.at_level(logging.INFO, logger="dts_llm.data"):
        data = load_instruction_data(data_args(tmp_path, path, max_prompt_length=64, max_length=128), tokenizer)
    assert data.report == {
        "records": 6,
        "train": 3,
        "validation": 0,
        "dropped_long_prompts": 1,
        "empty_responses": 2,
        "truncated_responses": 0,
    }
    assert data.train.to_list() == [expected(tokenizer, **records[i]) for i in (0, 3, 5)]
    warning = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warning) == 1
    assert "dropped 1 with a prompt over 64 tokens and 2 with an empty response" in warning[0].getMessage()


def test_folder_of_files_reads_every_file_in_name_order(tokenizer, tmp_path):
    folder = tmp_path / "data"
    write_jsonl(folder / "b.jsonl", dolly(2, start=2))
    write_jsonl(folder / "a.jsonl", dolly(2))
    (folder / "c.json").write_text(json.dumps(dolly(1, start=4)))  # one JSON array, as Alpaca ships
    (folder / "notes.txt").write_text("not data")
    assert read_records(str(folder)) == dolly(5)
    data = load_instruction_data(data_args(tmp_path, folder, dev_num=2), tokenizer)
    assert data.validation.to_list() == [expected(tokenizer, **r) for r in dolly(2)]
    assert data.train.to_list() == [expected(tokenizer, **r) for r in dolly(3, start=2)]
    (folder / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"no .json, .jsonl, .parquet files"):
        read_records(str(folder / "empty"))
    with pytest.raises(FileNotFoundError):  # a missing local file, not a hub id
        load_instruction_data(data_args(tmp_path, folder / "missing.jsonl"), tokenizer)


def test_a_folder_of_split_files_is_read_by_split_and_its_test_file_is_never_trained_on(tokenizer, tmp_path, caplog):
    folder = tmp_path / "data"
    write_jsonl(folder / "train.jsonl", dolly(3))
    write_jsonl(folder / "validation.jsonl", dolly(2, start=10))
    write_jsonl(folder / "test.jsonl", dolly(2, start=20))
    with caplog.at_level(logging.INFO, logger="dts_llm.data"):
        data = load_instruction_data(data_args(tmp_path, folder, dev_num=1000), tokenizer)  # dev_num not applied
    assert data.train.to_list() == [expected(tokenizer, **r) for r in dolly(3)]
    assert data.validation.to_list() == [expected(tokenizer, **r) for r in dolly(2, start=10)]
    assert data.report["records"] == 5
    assert f"{folder}: train from train.jsonl; validation from validation.jsonl; not read: test.jsonl" in caplog.text
    # valid* and dev* name the validation split too; several train files are read in name order
    (folder / "validation.jsonl").rename(folder / "dev.jsonl")
    write_jsonl(folder / "train_more.jsonl", dolly(1, start=3))
    data = load_instruction_data(data_args(tmp_path, folder), tokenizer)
    assert data.train.to_list() == [expected(tokenizer, **r) for r in dolly(4)]
    assert data.validation.to_list() == [expected(tokenizer, **r) for r in dolly(2, start=10)]


def test_a_split_folder_without_validation_file_holds_out_dev_num_of_its_train_files(tokenizer, tmp_path):
    folder = tmp_path / "data"
    write_jsonl(folder / "dolly_train.jsonl", dolly(4))
    write_jsonl(folder / "dolly_test.jsonl", dolly(2, start=20))
    data = load_instruction_data(data_args(tmp_path, folder, dev_num=1), tokenizer)
    assert data.validation.to_list() == [expected(tokenizer, **dolly(1)[0])]
    assert data.train.to_list() == [expected(tokenizer, **r) for r in dolly(3, start=1)]
    valid = write_jsonl(tmp_path / "valid.jsonl", dolly(1, start=30))
    data = load_instruction_data(data_args(tmp_path, folder, validation_file=str(valid)), tokenizer)
    assert len(data.train) == 4 and data.validation.to_list() == [expected(tokenizer, **dolly(1, start=30)[0])]


@pytest.mark.parametrize(
    ("names", "message"),
    [
        (["train.jsonl", "extra.jsonl"], "extra.jsonl names no split"),
        (["train.jsonl", "train_dev.jsonl"], "train_dev.jsonl names more than one split"),
        (["validation.jsonl", "test.jsonl"], "no train* file"),
    ],
)
def test_a_split_folder_with_an_unclear_file_is_refused_with_the_file_names(tokenizer, tmp_path, names, message):
    folder = tmp_path / "data"
    for name in names:
        write_jsonl(folder / name, dolly(2))
    with pytest.raises(ValueError, match=re.escape(f"{folder}: ") + ".*" + re.escape(message)):
        load_instruction_data(data_args(tmp_path, folder), tokenizer)


def test_a_validation_file_folder_of_split_files_gives_its_validation_files_only(tokenizer, tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", dolly(3))
    folder = tmp_path / "minillm"
    write_jsonl(folder / "train.jsonl", dolly(5, start=10))
    write_jsonl(folder / "valid.jsonl", dolly(1, start=20))
    data = load_instruction_data(data_args(tmp_path, train, validation_file=str(folder)), tokenizer)
    assert data.validation.to_list() == [expected(tokenizer, **dolly(1, start=20)[0])]
    (folder / "valid.jsonl").unlink()
    with pytest.raises(ValueError, match=re.escape(f"validation_file: {folder}: ") + ".*no validation"):
        load_instruction_data(data_args(tmp_path, train, validation_file=str(folder)), tokenizer)
    write_jsonl(tmp_path / "data" / "train.jsonl", dolly(3))
    write_jsonl(tmp_path / "data" / "valid.jsonl", dolly(1))
    with pytest.raises(
        ValueError, match=r"holds the validation split \(valid.jsonl\) and validation_file is also given"
    ):
        load_instruction_data(data_args(tmp_path, tmp_path / "data", validation_file=str(train)), tokenizer)


def test_custom_field_names_are_mapped(tokenizer, tmp_path):
    # A stored prompt was built from other fields: once the fields are remapped it is not used.
    records = [{"question": "Capital of France?", "passage": "Geography.", "answer": "Paris", "prompt": "ignored"}]
    path = write_jsonl(tmp_path / "qa.jsonl", records)
    args = data_args(tmp_path, path, instruction_field="question", context_field="passage", response_field="answer")
    data = load_instruction_data(args, tokenizer)
    assert data.train.to_list() == [expected(tokenizer, "Capital of France?", "Geography.", "Paris")]


def test_validation_file_replaces_the_dev_split(tokenizer, tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", dolly(3))
    minillm = [
        {"instruction": "Say yes.", "input": "", "output": ["Yes", "Yes."], "prompt": format_prompt("Say yes.")}
    ]
    valid = write_jsonl(tmp_path / "valid.jsonl", minillm)
    data = load_instruction_data(data_args(tmp_path, train, validation_file=str(valid), dev_num=1000), tokenizer)
    assert data.report["records"] == 4 and len(data.train) == 3
    assert data.validation.to_list() == [expected(tokenizer, "Say yes.", "", "Yes")]
    with pytest.raises(ValueError, match="dev_num=3 leaves no training records of the 3"):
        load_instruction_data(data_args(tmp_path, train, dev_num=3), tokenizer)


def test_responses_cut_to_max_length_lose_their_eos_and_are_counted_and_logged(tokenizer, tmp_path, caplog):
    records = [{"instruction": "Count.", "context": "", "response": "one " * 100}, *dolly(2)]
    path = write_jsonl(tmp_path / "train.jsonl", records)
    with caplog.at_level(logging.WARNING, logger="dts_llm.data"):
        data = load_instruction_data(data_args(tmp_path, path, max_length=80, max_prompt_length=60), tokenizer)
    example = data.train[0]
    assert len(example["input_ids"]) == len(example["labels"]) == len(example["attention_mask"]) == 80
    assert example["input_ids"][-1] != tokenizer.eos_token_id
    assert data.report["truncated_responses"] == 1 and data.report["train"] == 3
    assert "cut 1 response at 80 tokens (they lose their EOS)" in caplog.text
    exact = len(expected(tokenizer, **dolly(1)[0])["input_ids"])  # EOS at the last position: not cut
    data = load_instruction_data(data_args(tmp_path, path, max_length=exact, max_prompt_length=exact - 1), tokenizer)
    assert data.report["truncated_responses"] == 1 and data.train[1] == expected(tokenizer, **dolly(1)[0])


def test_eos_is_learned_after_padding_with_eos(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", dolly(4))
    train = load_instruction_data(data_args(tmp_path, path), tokenizer).train
    assert tokenizer.pad_token_id == tokenizer.eos_token_id
    batch = DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100)(train.to_list())
    for row, example in enumerate(train):
        length = len(example["input_ids"])
        assert batch["labels"][row, length - 1] == tokenizer.eos_token_id  # the response's EOS: learned
        assert (batch["labels"][row, length:] == -100).all()  # padding, also EOS ids: not learned


def test_tokenisation_is_cached_and_the_cache_follows_the_settings(tokenizer, tmp_path, monkeypatch):
    path = write_jsonl(tmp_path / "train.jsonl", dolly(8))

    def load(**overrides):
        data = load_instruction_data(data_args(tmp_path, path, dev_num=2, **overrides), tokenizer)
        files = [Path(f["filename"]) for f in data.train.cache_files + data.validation.cache_files]
        return data, {file: (file.stat().st_ino, file.stat().st_mtime_ns) for file in files}

    first, files = load()
    assert len(files) == 2 and all(file.parent == tmp_path / "cache" / "dts_llm" for file in files)
    # Same texts, tokenizer and max_length: the same files, not rewritten (max_prompt_length is applied after).
    second, second_files = load(max_prompt_length=200)
    assert second_files == files
    assert second.train.to_list() == first.train.to_list() and second.report == first.report
    # Other tokens: other files, whether the settings or the encoding code changed.
    assert not set(load(max_length=300)[1]) & set(files)
    monkeypatch.setattr(data_module, "encode_example", lambda *args: encode_example(*args[:3], max_length=5))
    changed, changed_files = load()
    assert not set(changed_files) & set(files) and len(changed.train[0]["input_ids"]) == 5


def test_a_changed_encoding_under_the_same_name_does_not_load_the_old_cache(tokenizer, tmp_path, monkeypatch):
    """`datasets` pickles a module's functions by name: an upgrade that changes the encoding code must
    not read the cache of the old one (it lacked a column the new code reads, and crashed)."""
    path = write_jsonl(tmp_path / "train.jsonl", dolly(8))
    first = load_instruction_data(data_args(tmp_path, path, dev_num=2), tokenizer)
    original = data_module._encode_with_prompt_length

    def upgraded(example, tokenizer, max_length):
        return {**original(example, tokenizer, max_length), "input_ids": [0, 1]}

    upgraded.__module__, upgraded.__qualname__ = original.__module__, original.__qualname__
    monkeypatch.setattr(data_module, "_encode_with_prompt_length", upgraded)
    again = load_instruction_data(data_args(tmp_path, path, dev_num=2), tokenizer)
    assert again.train[0]["input_ids"] == [0, 1] != first.train[0]["input_ids"]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"max_length": 0}, "max_length must be a positive integer"),
        ({"max_prompt_length": -1}, "max_prompt_length must be a positive integer"),
        ({"num_proc": 0}, "num_proc must be a positive integer"),
        ({"dev_num": -1}, "dev_num must be 0"),
        ({"max_prompt_length": 512}, r"max_prompt_length \(512\) must be smaller than max_length \(512\)"),
        ({"dataset": ""}, "dataset: give a hub id"),
    ],
)
def test_data_arguments_are_checked(overrides, message):
    with pytest.raises(ValueError, match=message):
        DataArguments(**{"dataset": "data.jsonl", **overrides})


def test_data_arguments_parse_with_hf_argument_parser():
    flags = (
        "--dataset databricks/databricks-dolly-15k --max_length 256 --max_prompt_length 128 --response_field output"
    )
    (args,) = HfArgumentParser(DataArguments).parse_args_into_dataclasses(flags.split())
    assert (args.dataset, args.max_length, args.max_prompt_length) == ("databricks/databricks-dolly-15k", 256, 128)
    assert args.response_field == "output" and args.instruction_field is None
    assert args.dev_num == 1000 and args.validation_file is None and args.dataset_split == "train"
    with pytest.raises(SystemExit):
        HfArgumentParser(DataArguments).parse_args_into_dataclasses([])  # dataset is required
