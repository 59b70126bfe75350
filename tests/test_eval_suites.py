"""Suite readers: every layout users have: MiniLLM folders and files, raw Dolly, Self-Instruct, Vicuna; broken
files."""

from __future__ import annotations

import json
import re

import pytest
from helpers import SHARED_DATA

from dts_llm.data import format_prompt
from eval.suites import EvalExample, load_suite

MINILLM = SHARED_DATA / "minillm"
needs_shared_data = pytest.mark.skipif(not MINILLM.is_dir(), reason=f"real data samples not found at {SHARED_DATA}")


def write_jsonl(path, records) -> str:
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return str(path)


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@needs_shared_data
@pytest.mark.parametrize("name", ["dolly", "self-inst", "sinst", "uinst-short"])
def test_minillm_folder_uses_stored_prompts_and_all_references(name):
    records = read_jsonl(MINILLM / name / "valid.jsonl")
    suite = load_suite(name, str(MINILLM / name))
    assert suite.name == name and suite.skipped == {}
    assert [example.prompt for example in suite.examples] == [record["prompt"] for record in records]
    expected = [tuple(r["output"]) if isinstance(r["output"], list) else (r["output"],) for r in records]
    assert [example.references for example in suite.examples] == expected


@needs_shared_data
def test_sinst_keeps_every_reference_of_a_list():
    suite = load_suite("sinst", str(MINILLM / "sinst" / "valid.jsonl"))  # the file itself, not the folder
    assert sum(len(example.references) > 1 for example in suite.examples) > 0


@needs_shared_data
def test_records_without_stored_prompt_get_the_training_template(tmp_path):
    """MiniLLM's stored prompts are the training template: dropping them must not change what the model sees."""
    records = read_jsonl(MINILLM / "dolly" / "valid.jsonl")[:50]
    stripped = write_jsonl(tmp_path / "dolly.jsonl", [{k: v for k, v in r.items() if k != "prompt"} for r in records])
    assert [e.prompt for e in load_suite("dolly", stripped).examples] == [r["prompt"] for r in records]


@needs_shared_data
def test_raw_dolly_is_templated_like_training():
    records = read_jsonl(SHARED_DATA / "dolly" / "raw_sample.jsonl")
    suite = load_suite("dolly", str(SHARED_DATA / "dolly" / "raw_sample.jsonl"), limit=20)
    assert len(suite.examples) == 20
    for example, record in zip(suite.examples, records, strict=False):
        assert example == EvalExample(format_prompt(record["instruction"], record["context"]), (record["response"],))


def test_self_instruct_gives_one_example_per_instance(tmp_path):
    path = write_jsonl(
        tmp_path / "user_oriented_instructions.jsonl",
        [
            {
                "id": "user_oriented_task_0",
                "instruction": "Fix the grammar.",
                "instances": [{"input": "he go home", "output": "He goes home."}, {"input": "", "output": "Nothing."}],
            },
            {
                "id": "user_oriented_task_1",
                "instruction": "Name a colour.",
                "instances": [{"input": "", "output": ""}],
            },
        ],
    )
    suite = load_suite("self-inst", path)
    assert suite.examples == [
        EvalExample(format_prompt("Fix the grammar.", "he go home"), ("He goes home.",)),
        EvalExample(format_prompt("Fix the grammar."), ("Nothing.",)),
    ]
    assert suite.skipped == {"empty reference": 1}


@pytest.mark.parametrize("question", [{"text": "How do I sleep well?"}, {"turns": ["How do I sleep well?", "And?"]}])
def test_vicuna_questions_scored_when_they_carry_a_reference(tmp_path, question):
    path = write_jsonl(
        tmp_path / "question.jsonl",
        [
            {"question_id": 1, "category": "generic", **question, "reference": "Keep a schedule."},
            {"question_id": 2, "category": "generic", **question, "answer": "Avoid screens."},
            {"question_id": 3, "category": "generic", **question},
        ],
    )
    suite = load_suite("vicuna", path)
    prompt = format_prompt("How do I sleep well?")
    assert suite.examples == [EvalExample(prompt, ("Keep a schedule.",)), EvalExample(prompt, ("Avoid screens.",))]
    assert suite.skipped == {"no reference": 1}


def test_json_array_file_and_limit(tmp_path):
    path = tmp_path / "custom.json"
    path.write_text(json.dumps([{"instruction": f"Say {i}.", "output": str(i)} for i in range(5)], indent=1))
    suite = load_suite("custom", str(path), limit=3)
    assert [example.references for example in suite.examples] == [("0",), ("1",), ("2",)]


def test_bad_references_are_counted_skips_not_errors(tmp_path):
    write_jsonl(
        tmp_path / "valid.jsonl",
        [
            {"prompt": "P1", "output": ["a", "b"]},
            {"prompt": "P2", "output": []},
            {"prompt": "P3", "output": "  "},
            {"prompt": "P4"},
            {"prompt": "P5", "output": ["", "kept"]},
        ],
    )
    suite = load_suite("sinst", str(tmp_path))  # a folder: its valid.jsonl
    assert suite.examples == [EvalExample("P1", ("a", "b")), EvalExample("P5", ("kept",))]
    assert suite.skipped == {"empty reference list": 1, "empty reference": 1, "no reference": 1}


def test_malformed_json_names_file_and_line(tmp_path):
    path = tmp_path / "valid.jsonl"
    path.write_text(json.dumps({"prompt": "P", "output": "R"}) + "\n" + '{"prompt": "P", "output": \n')
    with pytest.raises(ValueError, match=rf"{path}:2: malformed JSON"):
        load_suite("dolly", str(path))


def test_a_byte_that_is_not_utf8_names_file_and_line_and_a_byte_order_mark_is_accepted(tmp_path):
    path = tmp_path / "valid.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"prompt": "P", "output": "R"}\n{"prompt": "caf\xe9", "output": "R"}\n')
    with pytest.raises(ValueError, match=re.escape(f"{path}:2: not UTF-8 text (byte 0xe9 at byte 16 of the line)")):
        load_suite("dolly", str(path))
    path.write_bytes(b'\xef\xbb\xbf{"prompt": "P", "output": "R"}\n')
    assert load_suite("dolly", str(path)).examples == [EvalExample("P", ("R",))]


def test_raw_dolly_without_context_or_with_null_context_is_templated_without_input(tmp_path):
    records = [{"instruction": "A.", "response": "R"}, {"instruction": "B.", "context": None, "response": "S"}]
    suite = load_suite("dolly", write_jsonl(tmp_path / "dolly.jsonl", records))
    assert suite.examples == [EvalExample(format_prompt("A."), ("R",)), EvalExample(format_prompt("B."), ("S",))]


@pytest.mark.parametrize(
    ("record", "field"),
    [
        ({"input": "x", "output": "R"}, "'prompt' or 'instruction'"),
        ({"context": "x", "response": "R"}, "'instruction'"),
        ({"prompt": "", "output": "R"}, "'prompt'"),
        ({"question_id": 7, "category": "generic"}, "'text' or 'turns'"),
        ({"instruction": "Do it.", "instances": [{"output": "R", "input": 3}]}, "'input'"),
    ],
)
def test_missing_prompt_field_names_file_line_and_field(tmp_path, record, field):
    path = write_jsonl(tmp_path / "suite.jsonl", [{"prompt": "P", "output": "R"}, record])
    with pytest.raises(ValueError, match=rf"suite.jsonl:2.*{field}"):
        load_suite("custom", path)


def test_reference_of_the_wrong_type_is_an_error(tmp_path):
    path = write_jsonl(tmp_path / "suite.jsonl", [{"prompt": "P", "output": 42}])
    with pytest.raises(ValueError, match=r"suite.jsonl:1: field 'output' must be a string or a list of strings"):
        load_suite("custom", path)


def test_folder_without_valid_jsonl(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"valid.jsonl"):
        load_suite("dolly", str(tmp_path))
