"""Every data layout the readers take, on the hand-written files of tests/fixtures/: a clone without
../shared/data still covers them (the real samples are tested in test_data.py, test_glue_data.py and
test_eval_suites.py, which skip without them)."""

import json

import pytest
from helpers import FIXTURES

from dts_llm.data import DataArguments, encode_example, format_prompt, load_instruction_data
from dts_llm.glue import read_glue_split
from dts_llm.records import read_records
from eval.suites import EvalExample, load_suite


def load(tmp_path, tokenizer, source, **settings):
    arguments = DataArguments(
        dataset=str(source), data_cache_dir=str(tmp_path / "cache"), **{"dev_num": 0, **settings}
    )
    return load_instruction_data(arguments, tokenizer)


def test_raw_dolly_is_templated_with_its_context_and_split_by_dev_num(tokenizer, tmp_path):
    records = read_records(str(FIXTURES / "dolly_raw.jsonl"))
    data = load(tmp_path, tokenizer, FIXTURES / "dolly_raw.jsonl", dev_num=1)
    assert data.report == {
        "records": 4, "train": 3, "validation": 1, "dropped_long_prompts": 0, "empty_responses": 0,
        "truncated_responses": 0,
    }  # fmt: skip
    assert data.validation[0] == encode_example(
        tokenizer, format_prompt(records[0]["instruction"]), records[0]["response"]
    )
    with_context = records[1]
    assert "### Input:" in format_prompt(with_context["instruction"], with_context["context"])
    assert data.train[0] == encode_example(
        tokenizer, format_prompt(with_context["instruction"], with_context["context"]), with_context["response"]
    )


def test_minillm_processed_records_train_on_their_stored_prompt(tokenizer, tmp_path):
    records = read_records(str(FIXTURES / "minillm_processed.jsonl"))
    assert all(r["prompt"] == format_prompt(r["instruction"], r["input"]) for r in records)
    data = load(tmp_path, tokenizer, FIXTURES / "minillm_processed.jsonl")
    assert list(data.train) == [encode_example(tokenizer, r["prompt"], r["output"]) for r in records]
    assert data.validation is None


def test_sinst_list_outputs_train_on_the_first_reference_and_score_against_all(tokenizer, tmp_path):
    records = read_records(str(FIXTURES / "sinst_processed.jsonl"))
    assert all(isinstance(r["output"], list) for r in records)
    data = load(tmp_path, tokenizer, FIXTURES / "sinst_processed.jsonl")
    assert list(data.train) == [encode_example(tokenizer, r["prompt"], r["output"][0]) for r in records]
    suite = load_suite("sinst", str(FIXTURES / "sinst_processed.jsonl"))
    assert suite.examples == [EvalExample(r["prompt"], tuple(r["output"])) for r in records]


def test_raw_dolly_is_scored_with_the_training_template():
    records = read_records(str(FIXTURES / "dolly_raw.jsonl"))
    suite = load_suite("dolly", str(FIXTURES / "dolly_raw.jsonl"))
    expected = [EvalExample(format_prompt(r["instruction"], r["context"]), (r["response"],)) for r in records]
    assert suite.examples == expected


@pytest.mark.parametrize("name", ["alpaca.json", "alpaca.parquet"])
def test_an_alpaca_array_and_its_parquet_read_the_same_records(tokenizer, tmp_path, name):
    records = json.loads((FIXTURES / "alpaca.json").read_text())
    assert read_records(str(FIXTURES / name)) == records
    data = load(tmp_path, tokenizer, FIXTURES / name)
    expected = [encode_example(tokenizer, format_prompt(r["instruction"], r["input"]), r["output"]) for r in records]
    assert list(data.train) == expected


def test_a_split_folder_trains_on_train_validates_on_validation_and_leaves_test(tokenizer, tmp_path):
    data = load(tmp_path, tokenizer, FIXTURES / "splits", dev_num=2)
    assert (data.report["records"], data.report["train"], data.report["validation"]) == (4, 3, 1)
    (held_out,) = read_records(str(FIXTURES / "splits" / "validation.jsonl"))
    assert data.validation[0] == encode_example(
        tokenizer, format_prompt(held_out["instruction"]), held_out["response"]
    )


def test_glue_tsv_from_the_download_script_folder():
    assert read_glue_split("sst2", FIXTURES / "glue_data", "validation") == [
        {"sentence": "a warm , funny film . ", "label": 1},
        {"sentence": "dull and far too long . ", "label": 0},
        {"sentence": "the cast is wonderful . ", "label": 1},
    ]


def test_glue_tsv_label_names_and_the_hub_export_give_the_same_records():
    from_tsv = read_glue_split("rte", FIXTURES / "glue_data" / "RTE" / "dev.tsv", "validation")
    assert [record["label"] for record in from_tsv] == [0, 1]  # entailment, not_entailment
    assert read_glue_split("rte", FIXTURES, "validation") == from_tsv  # found as rte/validation-*.parquet
