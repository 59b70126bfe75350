"""GLUE data: the task table, the download script's TSVs (with their quirks), the Hugging Face export,
folder layouts, tokenisation, and the real samples in ../shared/data."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pyarrow
import pyarrow.parquet
import pytest
from helpers import SHARED_DATA, STSB_HEADER, stsb_row, write_tsv

from dts_llm.data import DataArguments, save_data_report
from dts_llm.glue import (
    GLUE_TASKS,
    glue_task,
    load_glue_data,
    read_glue_export,
    read_glue_split,
    read_glue_tsv,
    tokenize_glue,
)
from dts_llm.tasks import task_for

MNLI_TRAIN_HEADER = (
    "index promptID pairID genre sentence1_binary_parse sentence2_binary_parse sentence1_parse sentence2_parse "
    "sentence1 sentence2 label1 gold_label"
).split()
MNLI_DEV_HEADER = MNLI_TRAIN_HEADER[:-1] + ["label2", "label3", "label4", "label5", "gold_label"]


def mnli_row(header: list[str], index: int, premise: str, hypothesis: str, gold: str) -> list[str]:
    """An MNLI row as the script writes it: parses, genre, the annotators' labels, then gold_label."""
    values = {"index": str(index), "promptID": "31193", "pairID": f"{index}n", "genre": "government"}
    values |= {"sentence1": premise, "sentence2": hypothesis, "gold_label": gold}
    return [values.get(name, "( ( x ) )" if "parse" in name else gold) for name in header]


# Per task: {file: rows} as the download script writes them, and the dev records as (texts..., label).
SCRIPT_FILES: dict[str, tuple[dict[str, list[list[str]]], list[tuple]]] = {
    "cola": (  # no header row: source, label, original mark, sentence
        {"dev.tsv": [["gj04", "1", "", "The sailors rode the breeze."], ["gj04", "0", "*", 'The more "we study.']]},
        [("The sailors rode the breeze.", 1), ('The more "we study.', 0)],
    ),
    "sst2": (
        {"dev.tsv": [["sentence", "label"], ["it 's a charming journey . ", "1"], ['" bleak and desperate ', "0"]]},
        [("it 's a charming journey . ", 1), ('" bleak and desperate ', 0)],
    ),
    "mrpc": (
        {
            "dev.tsv": [
                ["Quality", "#1 ID", "#2 ID", "#1 String", "#2 String"],
                ["1", "1355540", "1355592", "He said the pie business doesn 't fit .", '" The pie does not fit .'],
                ["0", "2029631", "2029565", "Magnarelli said Racicot hated it .", "His wife said he was 100 ."],
            ]
        },
        [
            ("He said the pie business doesn 't fit .", '" The pie does not fit .', 1),
            ("Magnarelli said Racicot hated it .", "His wife said he was 100 .", 0),
        ],
    ),
    "qqp": (
        {
            "dev.tsv": [
                ["id", "qid1", "qid2", "question1", "question2", "is_duplicate"],
                ["201359", "303345", "303346", 'Why are "cats" so cute?', "Why are dogs so cute?", "0"],
                ["263843", "69383", "380476", "How do I learn Python?", "How can I learn Python?", "1"],
            ]
        },
        [
            ('Why are "cats" so cute?', "Why are dogs so cute?", 0),
            ("How do I learn Python?", "How can I learn Python?", 1),
        ],
    ),
    "stsb": (
        {
            "dev.tsv": [
                STSB_HEADER,
                stsb_row(0, "A man with a hard hat is dancing.", "A man in a hard hat is dancing.", "5.000"),
                stsb_row(1, 'A "young" child rides a horse.', "A child rides a horse.", "4.750"),
            ]
        },
        [
            ("A man with a hard hat is dancing.", "A man in a hard hat is dancing.", 5.0),
            ('A "young" child rides a horse.', "A child rides a horse.", 4.75),
        ],
    ),
    "mnli": (  # train.tsv has 12 columns, the dev files 16; labels are names
        {
            "train.tsv": [MNLI_TRAIN_HEADER, mnli_row(MNLI_TRAIN_HEADER, 0, "Cream skimming.", "Product.", "neutral")],
            "dev_matched.tsv": [
                MNLI_DEV_HEADER,
                mnli_row(MNLI_DEV_HEADER, 0, "The new rights are nice", "Everyone likes them.", "neutral"),
                mnli_row(MNLI_DEV_HEADER, 1, 'This site "includes" a list.', "The site has a list.", "entailment"),
                mnli_row(MNLI_DEV_HEADER, 2, "yes now you know", "August is a black out month.", "contradiction"),
            ],
            "dev_mismatched.tsv": [
                MNLI_DEV_HEADER,
                mnli_row(MNLI_DEV_HEADER, 0, "Your gift is welcome.", "Hi.", "neutral"),
            ],
        },
        [
            ("The new rights are nice", "Everyone likes them.", 1),
            ('This site "includes" a list.', "The site has a list.", 0),
            ("yes now you know", "August is a black out month.", 2),
        ],
    ),
    "qnli": (
        {
            "dev.tsv": [
                ["index", "question", "sentence", "label"],
                ["0", "What came into force?", "The Rhodesian state was created.", "not_entailment"],
                ["1", "What is the first major city?", "It is Birmingham.", "entailment"],
            ]
        },
        [
            ("What came into force?", "The Rhodesian state was created.", 1),
            ("What is the first major city?", "It is Birmingham.", 0),
        ],
    ),
    "rte": (
        {
            "dev.tsv": [
                ["index", "sentence1", "sentence2", "label"],
                ["0", "Dana Reeve has died of lung cancer.", "Reeve had an accident.", "not_entailment"],
                ["1", 'Bacteria are "mutating" faster.', "Bacteria is winning.", "entailment"],
            ]
        },
        [
            ("Dana Reeve has died of lung cancer.", "Reeve had an accident.", 1),
            ('Bacteria are "mutating" faster.', "Bacteria is winning.", 0),
        ],
    ),
    "wnli": (  # labels are ids, and 1 is entailment
        {
            "dev.tsv": [
                ["index", "sentence1", "sentence2", "label"],
                ["0", "The drain is clogged with hair. It has to be cleaned.", "The hair has to be cleaned.", "0"],
                ["1", "Jane knocked on Susan's door. She invited her in.", "Susan invited her in.", "1"],
            ]
        },
        [
            ("The drain is clogged with hair. It has to be cleaned.", "The hair has to be cleaned.", 0),
            ("Jane knocked on Susan's door. She invited her in.", "Susan invited her in.", 1),
        ],
    ),
}
TEXT_FIELDS = {
    "cola": ("sentence",),
    "sst2": ("sentence",),
    "mrpc": ("sentence1", "sentence2"),
    "qqp": ("question1", "question2"),
    "stsb": ("sentence1", "sentence2"),
    "mnli": ("premise", "hypothesis"),
    "qnli": ("question", "sentence"),
    "rte": ("sentence1", "sentence2"),
    "wnli": ("sentence1", "sentence2"),
}


def expected_records(name: str) -> list[dict]:
    return [dict(zip((*TEXT_FIELDS[name], "label"), values, strict=True)) for values in SCRIPT_FILES[name][1]]


@pytest.fixture
def glue_data(tmp_path) -> Path:
    """A ``glue_data`` folder as the download script leaves it, with the dev files of every task."""
    for name, (files, _) in SCRIPT_FILES.items():
        for file, rows in files.items():
            write_tsv(tmp_path / "glue_data" / GLUE_TASKS[name].folder / file, rows)
    return tmp_path / "glue_data"


def test_the_table_names_every_task_in_the_hubs_terms():
    assert {name: task.text_fields for name, task in GLUE_TASKS.items()} == TEXT_FIELDS
    assert list(GLUE_TASKS) == ["cola", "sst2", "mrpc", "qqp", "stsb", "mnli", "qnli", "rte", "wnli"]
    assert GLUE_TASKS["mnli"].label_names == ("entailment", "neutral", "contradiction")
    assert GLUE_TASKS["rte"].label_names == GLUE_TASKS["qnli"].label_names == ("entailment", "not_entailment")
    assert GLUE_TASKS["wnli"].label_names == ("not_entailment", "entailment")
    assert GLUE_TASKS["mnli"].eval_splits == ("validation_matched", "validation_mismatched")
    assert GLUE_TASKS["mnli"].files["validation_mismatched"] == "dev_mismatched.tsv"
    assert GLUE_TASKS["mrpc"].metrics == GLUE_TASKS["qqp"].metrics == ("f1", "accuracy")
    assert GLUE_TASKS["cola"].metrics == ("matthews_correlation",)
    assert GLUE_TASKS["stsb"].metrics == ("pearson", "spearmanr")
    for task in GLUE_TASKS.values():
        assert set(task.files) == set(task.splits), task.name
        assert len(task.tsv.texts) == len(task.text_fields) in (1, 2), task.name
    assert GLUE_TASKS["stsb"].num_labels == 1 and GLUE_TASKS["stsb"].is_regression
    assert GLUE_TASKS["stsb"].head_config() == {"num_labels": 1, "problem_type": "regression"}
    rte = GLUE_TASKS["rte"].head_config()
    assert rte["num_labels"] == 2 and rte["id2label"] == {0: "entailment", 1: "not_entailment"}
    assert glue_task("SST-2") is glue_task("sst2") is GLUE_TASKS["sst2"]
    with pytest.raises(ValueError, match=r"unknown GLUE task 'sst'.*cola"):
        glue_task("sst")


@pytest.mark.parametrize("name", list(SCRIPT_FILES))
def test_every_task_reads_the_download_scripts_dev_file(glue_data, name):
    split = GLUE_TASKS[name].eval_splits[0]
    assert read_glue_split(name, glue_data, split) == expected_records(name)
    assert read_glue_split(name, glue_data / GLUE_TASKS[name].folder, split) == expected_records(name)


def test_cola_has_no_header_row_so_its_first_line_is_an_example(glue_data):
    records = read_glue_tsv(glue_data / "CoLA" / "dev.tsv", "cola")
    assert len(records) == 2 and records[0]["sentence"] == "The sailors rode the breeze."


def test_mnli_train_and_dev_differ_in_width_and_map_string_labels(glue_data, tokenizer):
    data = load_glue_data("mnli", glue_data, None, tokenizer, max_length=64)
    assert data.report["train"]["examples"] == 1 and data.train["labels"][:] == [1]
    assert list(data.evaluation) == ["validation_matched", "validation_mismatched"]
    assert data.evaluation["validation_matched"]["labels"][:] == [1, 0, 2]
    assert data.report["validation_mismatched"]["examples"] == 1


def test_unbalanced_quotes_stay_in_the_text_and_do_not_merge_lines(tmp_path):
    rows = [["sentence", "label"], ['" the film opens', "1"], ["and closes", "0"], ['with a quote "', "1"]]
    records = read_glue_tsv(write_tsv(tmp_path / "dev.tsv", rows), "sst2")
    assert [r["sentence"] for r in records] == ['" the film opens', "and closes", 'with a quote "']


def test_windows_line_endings_and_a_trailing_blank_line_are_read(tmp_path):
    (tmp_path / "dev.tsv").write_bytes(b"sentence\tlabel\r\ngood\t1\r\nbad\t0\r\n\n")
    assert read_glue_tsv(tmp_path / "dev.tsv", "sst2") == [
        {"sentence": "good", "label": 1},
        {"sentence": "bad", "label": 0},
    ]


def test_a_byte_order_mark_is_accepted_and_a_byte_that_is_not_utf8_names_file_and_line(tmp_path):
    (tmp_path / "dev.tsv").write_bytes(b"\xef\xbb\xbfsentence\tlabel\ngood\t1\ncaf\xe9\t0\n")
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path / 'dev.tsv'}:3: not UTF-8 text (byte 0xe9")):
        read_glue_tsv(tmp_path / "dev.tsv", "sst2")
    (tmp_path / "dev.tsv").write_bytes(b"\xef\xbb\xbfsentence\tlabel\ngood\t1\n")
    assert read_glue_tsv(tmp_path / "dev.tsv", "sst2") == [{"sentence": "good", "label": 1}]
    (tmp_path / "validation.jsonl").write_bytes(b'{"sentence": "caf\xe9", "label": 0}\n')
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path / 'validation.jsonl'}:1: not UTF-8 text")):
        read_glue_export(tmp_path / "validation.jsonl", "sst2")


def test_an_empty_tsv_is_refused(tmp_path):
    (tmp_path / "dev.tsv").write_bytes(b"")
    with pytest.raises(ValueError, match=r"dev.tsv: empty file, expected a header row"):
        read_glue_tsv(tmp_path / "dev.tsv", "sst2")


BROKEN_TSVS = [
    # task, rows, 1-based line of the error, what the message says
    ("sst2", [["sentence", "label"], ["fine", "1"], ["no label here"]], 3, "expected 2 tab-separated fields"),
    ("rte", [["index", "sentence1", "sentence2", "label"], ["0", "a\tb", "c", "entailment"]], 2, "found 5"),
    ("cola", [["gj04", "1", "", "ok"], ["gj04", "0", "missing mark column"]], 2, "expected 4 tab-separated fields"),
    ("mnli", [MNLI_DEV_HEADER, mnli_row(MNLI_DEV_HEADER, 0, "p", "h", "-")], 2, "unknown label '-'"),
    ("rte", [["index", "sentence1", "sentence2", "label"], ["0", "a", "b", "entails"]], 2, "unknown label 'entails'"),
    ("cola", [["gj04", "2", "", "ok"]], 1, "unknown label '2'"),
    (
        "stsb",
        [STSB_HEADER, stsb_row(0, "a", "b", "4.0"), stsb_row(1, "a", "b", "n/a")],
        3,
        "score 'n/a' is not a number",
    ),
    ("stsb", [STSB_HEADER, stsb_row(0, "a", "b", "nan")], 2, "score 'nan' is not a number"),
    ("qnli", [["index", "question", "sentence"], ["0", "q", "s"]], 1, "lacks the column(s) ['label']"),
]


@pytest.mark.parametrize("name, rows, line, message", BROKEN_TSVS)
def test_a_broken_tsv_is_an_error_naming_file_and_line(tmp_path, name, rows, line, message):
    path = write_tsv(tmp_path / "dev.tsv", rows)
    with pytest.raises(ValueError, match=re.escape(f"{path}:{line}: ") + ".*" + re.escape(message)):
        read_glue_tsv(path, name)


def test_test_files_have_no_labels_and_are_refused(tmp_path):
    path = write_tsv(tmp_path / "test.tsv", [["index", "sentence"], ["0", "a film"]])
    with pytest.raises(ValueError, match=re.escape(str(path)) + ".*no labels"):
        read_glue_tsv(path, "sst2")
    path = write_tsv(tmp_path / "test_matched.tsv", [MNLI_DEV_HEADER[:-6], ["0"] * 10])
    with pytest.raises(ValueError, match=r"test_matched.tsv: GLUE test files have no labels"):
        read_glue_tsv(path, "mnli")


def test_the_hugging_face_export_reads_parquet_json_and_json_lines(tmp_path):
    records = [
        {"sentence1": "a", "sentence2": "b", "label": 1, "idx": 0},
        {"sentence1": "c", "sentence2": "d", "label": 0, "idx": 1},
    ]
    expected = [{k: r[k] for k in ("sentence1", "sentence2", "label")} for r in records]
    pyarrow.parquet.write_table(pyarrow.Table.from_pylist(records), tmp_path / "validation.parquet")
    (tmp_path / "validation.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (tmp_path / "validation.json").write_text(json.dumps(records))
    for file in ("validation.parquet", "validation.jsonl", "validation.json"):
        assert read_glue_export(tmp_path / file, "rte") == expected, file
    scores = [{"sentence1": "a", "sentence2": "b", "label": 3.2}, {"sentence1": "c", "sentence2": "d", "label": 1}]
    (tmp_path / "stsb.jsonl").write_text("".join(json.dumps(r) + "\n" for r in scores))
    labels = [r["label"] for r in read_glue_export(tmp_path / "stsb.jsonl", "stsb")]
    assert labels == [3.2, 1.0] and isinstance(labels[1], float)


@pytest.mark.parametrize(
    "record, message",
    [
        ({"sentence1": "a", "label": 0}, "missing field 'sentence2'"),
        ({"sentence1": "a", "sentence2": "b"}, "missing field 'label'"),
        ({"sentence1": "a", "sentence2": "b", "label": 2}, "label id 0..1"),
        ({"sentence1": "a", "sentence2": "b", "label": -1}, "unlabelled test split"),
        ({"sentence1": "a", "sentence2": "b", "label": "entailment"}, "got 'entailment'"),
        ({"sentence1": "a", "sentence2": None, "label": 0}, "'sentence2' must be a string"),
    ],
)
def test_a_bad_export_record_is_an_error_naming_file_line_and_field(tmp_path, record, message):
    path = tmp_path / "validation.jsonl"
    path.write_text(json.dumps({"sentence1": "x", "sentence2": "y", "label": 0}) + "\n" + json.dumps(record) + "\n")
    with pytest.raises(ValueError, match=re.escape(f"{path}:2: ") + ".*" + re.escape(message)):
        read_glue_export(path, "rte")


def test_folders_in_the_hubs_layout_and_ambiguous_or_missing_files(tmp_path):
    records = [{"sentence1": "a", "sentence2": "b", "label": 1, "idx": 0}]
    (tmp_path / "rte").mkdir()
    for shard in ("validation-00000-of-00002.parquet", "validation-00001-of-00002.parquet"):
        pyarrow.parquet.write_table(pyarrow.Table.from_pylist(records), tmp_path / "rte" / shard)
    assert len(read_glue_split("rte", tmp_path, "validation")) == 2
    write_tsv(
        tmp_path / "rte" / "dev.tsv", [["index", "sentence1", "sentence2", "label"], ["0", "a", "b", "entailment"]]
    )
    with pytest.raises(ValueError, match="several files hold GLUE rte validation"):
        read_glue_split("rte", tmp_path, "validation")
    with pytest.raises(
        FileNotFoundError, match=re.escape("no GLUE rte train file: looked for train.tsv, train.parquet")
    ):
        read_glue_split("rte", tmp_path, "train")
    with pytest.raises(ValueError, match="GLUE rte has no labelled split 'test'"):
        read_glue_split("rte", tmp_path, "test")
    with pytest.raises(FileNotFoundError, match=r"absent.tsv: no such file"):
        read_glue_split("rte", tmp_path / "absent.tsv", "validation")


def test_tokenisation_truncates_counts_and_types_the_labels(tokenizer):
    records = [
        {"sentence1": "a " * 50, "sentence2": "b " * 50, "label": 4.5},
        {"sentence1": "a", "sentence2": "b", "label": 0.0},
    ]
    dataset, truncated = tokenize_glue(records, "stsb", tokenizer, max_length=16)
    assert truncated == 1 and [len(ids) for ids in dataset["input_ids"]] == [16, 2]
    assert dataset.features["labels"].dtype == "float32" and dataset["labels"][:] == [4.5, 0.0]
    assert set(dataset.column_names) == {"input_ids", "attention_mask", "labels"}  # GPT-2 makes no token types
    first = tokenizer.decode(dataset["input_ids"][0])
    assert first.count("a") == first.count("b") == 8  # a pair loses tokens from its longer text first
    dataset, _ = tokenize_glue([{"sentence": "good", "label": 1}], "sst2", tokenizer, max_length=16)
    assert dataset.features["labels"].dtype == "int64"


def test_load_glue_data_reports_every_split_and_refuses_unclear_requests(glue_data, tokenizer):
    dev = glue_data / "RTE" / "dev.tsv"
    data = load_glue_data("rte", dev, {"validation": dev}, tokenizer, max_length=16)  # pairs of 17 and 16 tokens
    assert len(data.train) == 2 and list(data.evaluation) == ["validation"] and data.task is GLUE_TASKS["rte"]
    assert data.report["validation"] == {"source": str(dev), "examples": 2, "truncated": 1}
    assert load_glue_data("rte", dev, {}, tokenizer).evaluation == {}
    with pytest.raises(ValueError, match="eval_sources: give"):
        load_glue_data("rte", dev, None, tokenizer)
    with pytest.raises(ValueError, match=r"no evaluation split \['dev'\]"):
        load_glue_data("rte", None, {"dev": dev}, tokenizer)
    with pytest.raises(ValueError, match="nothing to load"):
        load_glue_data("rte", None, {}, tokenizer)


def test_the_cli_data_report_of_a_glue_task_is_the_glue_report_and_is_saved(glue_data, tokenizer, tmp_path):
    dev = str(glue_data / "RTE" / "dev.tsv")
    data_args = DataArguments(dataset=dev, validation_file=dev, glue_task="rte", max_length=16)
    report = task_for(data_args).load_data(data_args, tokenizer).report
    assert report["validation"] == {"source": dev, "examples": 2, "truncated": 1} and report["train"]["examples"] == 2
    assert json.loads(save_data_report(report, str(tmp_path / "run")).read_text()) == report


def _shared(path: str) -> Path:
    if not (SHARED_DATA / path).is_file():
        pytest.skip(f"{SHARED_DATA / path} is absent (the real GLUE samples live in ../shared/data)")
    return SHARED_DATA / path


def test_the_real_sst2_dev_file_has_872_examples_444_positive():
    records = read_glue_split("sst2", _shared("glue/SST-2/dev.tsv"), "validation")
    assert len(records) == 872 and sum(r["label"] for r in records) == 444
    assert records[0] == {"sentence": "it 's a charming and often affecting journey . ", "label": 1}


def test_the_real_rte_export_has_277_examples_146_entailed(tokenizer):
    source = _shared("glue/RTE/validation.parquet")
    records = read_glue_split("rte", source.parent, "validation")
    assert len(records) == 277 and [r["label"] for r in records].count(0) == 146
    data = load_glue_data("rte", None, {"validation": source}, tokenizer, max_length=512)
    assert len(data.evaluation["validation"]) == 277 and data.report["validation"]["truncated"] == 0
