"""`dts-llm teacher-report`: the teacher's entropy and top-k mass at each T, against a float64 dense
reference over the same response tokens, and the files it writes."""

import json

import pytest
import torch
import yaml
from helpers import arithmetic_records, tokenize_records
from transformers import AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq

from dts_llm.cli import main
from dts_llm.teacher_report import RANGE_GRID, recommended_range, report_table, teacher_statistics

TEMPERATURES = [0.5, 1.0, 4.0, 32.0]


def dense_reference(teacher, batch, vocab_size: int, temperature: float, k: int) -> tuple[float, float]:
    """Mean entropy and top-k mass over positions whose next label is a response token, in float64."""
    with torch.no_grad():
        logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logits = logits[:, :-1, :vocab_size].double()
    scored = batch["labels"][:, 1:] != -100
    p = (logits[scored] / temperature).softmax(-1)
    entropy = -(p * p.log()).sum(-1)
    return entropy.mean().item(), p.topk(k, dim=-1).values.sum(-1).mean().item()


def test_statistics_match_a_dense_reference_and_move_with_the_temperature(trained_teacher_dir, tokenizer):
    teacher = AutoModelForCausalLM.from_pretrained(trained_teacher_dir).eval()
    dataset = tokenize_records(tokenizer, arithmetic_records(12, start=50))
    batch = DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100)(list(dataset))
    halves = [{key: value[:6] for key, value in batch.items()}, {key: value[6:] for key, value in batch.items()}]
    report = teacher_statistics(teacher, halves, len(tokenizer), TEMPERATURES, top_k=(1, 5), rows_per_chunk=7)
    assert report["tokens"] == int((batch["labels"][:, 1:] != -100).sum())
    for row, t in zip(report["temperatures"], TEMPERATURES, strict=False):
        for k in (1, 5):
            entropy, mass = dense_reference(teacher, batch, len(tokenizer), t, k)
            assert row["entropy"] == pytest.approx(entropy, rel=1e-5)
            assert row["top_k_mass"][str(k)] == pytest.approx(mass, rel=1e-5)
    entropies = [row["entropy"] for row in report["temperatures"]]
    top1 = [row["top_k_mass"]["1"] for row in report["temperatures"]]
    assert entropies == sorted(entropies) and top1 == sorted(top1, reverse=True)
    assert entropies[-1] < report["max_entropy"]


def measured(rows: list[tuple[float, float, float]], max_entropy: float = 6.0) -> dict:
    """A report of (T, entropy, top-1 mass) rows."""
    rows = [{"temperature": t, "entropy": h, "top_k_mass": {"1": top_1}} for t, h, top_1 in rows]
    return {"max_entropy": max_entropy, "temperatures": rows}


def test_the_recommended_range_runs_from_a_top_1_mass_of_09_to_half_the_uniform_entropy():
    # Top-1 mass 0.95 -> 0.85 between T = 1 and 2 crosses 0.9 half-way in log T: sqrt(2). The entropy 2 -> 4
    # between T = 2 and 4 crosses 3 = 0.5 x 6 half-way: 2 sqrt(2). Rows below T = 1 are not read.
    report = measured([(0.5, 0.1, 0.99), (1.0, 1.0, 0.95), (2.0, 2.0, 0.85), (4.0, 4.0, 0.5), (8.0, 5.0, 0.2)])
    assert recommended_range(report) == (1.41, 2.83)
    # A teacher already below 0.9 at T = 1 starts at 1; a top-1 mass exactly at the level is its crossing.
    assert recommended_range(measured([(1.0, 1.0, 0.8), (2.0, 5.0, 0.5)])) == (1.0, 1.41)
    assert recommended_range(measured([(1.0, 1.0, 0.95), (2.0, 2.0, 0.9), (4.0, 4.0, 0.5)])) == (2.0, 2.83)
    for rows, named in (
        ([(1.0, 3.5, 0.5), (2.0, 5.0, 0.2)], "entropy 3.500 nats at T = 1"),  # flat from the start
        ([(1.0, 0.1, 0.99), (2.0, 0.2, 0.98)], "top-1 mass 0.990"),  # peaked throughout
        ([(2.0, 0.1, 0.99), (4.0, 4.0, 0.5)], "from T = 1"),
    ):
        with pytest.raises(ValueError, match=named):
            recommended_range(measured(rows))


def test_a_teacher_without_a_range_gets_its_table_and_the_reason():
    """The command keeps the report of a teacher peaked at every measured T (recommended_range None, the
    reason in no_range); its table says why instead of failing."""
    report = {"teacher": "t", "tokens": 7, **measured([(1.0, 0.1, 0.99), (2.0, 0.2, 0.98)])}
    with pytest.raises(ValueError) as refusal:
        recommended_range(report)
    report |= {"recommended_range": None, "no_range": str(refusal.value)}
    table = report_table(report)
    assert "| 2 | 0.200 | 0.980 |" in table
    assert f"No recommended range: {refusal.value}." in table and "Recommended range" not in table


def test_the_command_writes_json_markdown_and_a_figure(trained_teacher_dir, tmp_path, capsys):
    records = [
        {"instruction": r["instruction"], "context": None, "response": r["response"]} for r in arithmetic_records(10)
    ]
    data = tmp_path / "dolly.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8-sig")  # a BOM, null contexts
    output = tmp_path / "report"
    argv = ["teacher-report", "--teacher", str(trained_teacher_dir), "--data", str(data), "--output", str(output)]
    assert main([*argv, "--temperatures", "1,2,8", "--top-k", "1,3", "--max-examples", "6"]) == 0
    report = json.loads((output / "teacher_report.json").read_text())
    assert report["examples"] == 6 and [row["temperature"] for row in report["temperatures"]] == [1.0, 2.0, 8.0]
    assert set(report["temperatures"][0]["top_k_mass"]) == {"1", "3"}
    assert report["data_report"]["records"] == report["data_report"]["train"] == 10
    table = (output / "teacher_report.md").read_text()
    assert "| 8 |" in table and table in capsys.readouterr().out
    assert (output / "teacher_report.png").stat().st_size > 10_000
    # The recommendation is the range of the teacher's statistics on the fine grid, over the same tokens.
    tokenizer = AutoTokenizer.from_pretrained(trained_teacher_dir)
    examples = [example for example in tokenize_records(tokenizer, arithmetic_records(6))]
    batch = DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100)(examples)
    teacher = AutoModelForCausalLM.from_pretrained(trained_teacher_dir)
    expected = recommended_range(teacher_statistics(teacher, [batch], len(tokenizer), RANGE_GRID, top_k=(1,)))
    assert tuple(report["recommended_range"]) == expected and f"temperature_max {expected[1]:g}" in table

    # A recipe names the teacher, the data and the lengths.
    recipe = tmp_path / "recipe.yaml"
    fields = {"teacher_model_name_or_path": str(trained_teacher_dir), "dataset": str(data), "dev_num": 0}
    recipe.write_text(yaml.safe_dump({"model_name_or_path": str(trained_teacher_dir), **fields}))
    assert main(["teacher-report", "--recipe", str(recipe), "--max-examples", "6", "--output", str(output)]) == 0
    from_recipe = json.loads((output / "teacher_report.json").read_text())
    assert from_recipe["teacher"] == str(trained_teacher_dir) and tuple(from_recipe["recommended_range"]) == expected


def test_bad_temperatures_are_refused_by_the_command(trained_teacher_dir, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["teacher-report", "--teacher", str(trained_teacher_dir), "--data", "x.jsonl", "--temperatures", "1,0"])
    assert "--temperatures" in capsys.readouterr().err


def test_a_byte_that_is_not_utf8_is_named_by_file_and_line(trained_teacher_dir, tmp_path, capsys):
    data = tmp_path / "dolly.jsonl"
    data.write_bytes(b'{"instruction": "Hi.", "response": "Hello"}\n{"instruction": "Caf\xe9?", "response": "Yes"}\n')
    argv = ["teacher-report", "--teacher", str(trained_teacher_dir), "--data", str(data), "--output", str(tmp_path)]
    assert main(argv) == 2  # a UserError: one line, no traceback
    assert f"dts-llm: error: {data}:2: not UTF-8 text" in capsys.readouterr().err
