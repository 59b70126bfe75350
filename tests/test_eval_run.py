"""An evaluation run: predictions per (suite, seed), resume, results files, the CLI, two processes."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import free_port, tiny_gpt2

import eval.run as run_module
from dts_llm.data import format_prompt
from dts_llm.errors import UserError
from dts_llm.template import parse_prompt
from eval.__main__ import main, resolve_suites
from eval.generate import GenerationSettings
from eval.rouge import suite_score
from eval.run import evaluate_model, predictions_path
from eval.suites import load_suite

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = GenerationSettings(max_length=72, max_prompt_tokens=64, batch_size=2)


@pytest.fixture(scope="module")
def model_dir(tokenizer, tmp_path_factory):
    out = tmp_path_factory.mktemp("model")
    tiny_gpt2(tokenizer, width=32, layers=2, seed=0).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """Two suites in MiniLLM's processed layout (DIR/NAME/valid.jsonl); S-NI has lists of references."""
    root = tmp_path_factory.mktemp("data")
    dolly = [
        {
            "instruction": f"What is {i} plus {i + 1}?",
            "input": "" if i % 2 else "Numbers.",
            "output": f"It is {2 * i + 1}.",
        }
        for i in range(5)
    ]
    sinst = [
        {"instruction": f"Say hi {i} times.", "input": "", "output": ["hi " * i, f"hello {i}"]} for i in range(1, 4)
    ]
    for name, records in (("dolly", dolly), ("sinst", sinst)):
        (root / name).mkdir()
        lines = [json.dumps({**r, "prompt": format_prompt(r["instruction"], r["input"])}) for r in records]
        (root / name / "valid.jsonl").write_text("\n".join(lines) + "\n")
    return root


def suites_of(data_dir):
    return {"dolly": str(data_dir / "dolly"), "sinst": str(data_dir / "sinst")}


def test_run_writes_predictions_results_and_table(model_dir, data_dir, tmp_path):
    result = evaluate_model(
        str(model_dir), suites_of(data_dir), str(tmp_path), seeds=(10, 20), settings=SETTINGS, progress=False
    )
    assert result["seeds"] == [10, 20]
    assert result["params"] > 0 and result["model"] == str(model_dir)
    assert result["settings"]["max_length"] == 72 and result["settings"]["new_tokens"] == 8
    for name, count in (("dolly", 5), ("sinst", 3)):
        suite = load_suite(name, suites_of(data_dir)[name])
        entry = result["suites"][name]
        assert entry["count"] == count and entry["skipped"] == {}
        assert set(entry["per_seed"]) == {"10", "20"}
        for seed in (10, 20):
            records = [json.loads(line) for line in predictions_path(tmp_path, name, seed).read_text().splitlines()]
            assert [r["prompt"] for r in records] == [e.prompt for e in suite.examples]
            assert [tuple(r["references"]) for r in records] == [e.references for e in suite.examples]
            expected = suite_score([r["prediction"] for r in records], suite.examples)
            assert entry["per_seed"][str(seed)] == pytest.approx(expected)
        assert entry["mean"] == pytest.approx(sum(entry["per_seed"].values()) / 2)
    assert json.loads((tmp_path / "results.json").read_text()) == json.loads(json.dumps(result))
    table = (tmp_path / "results.md").read_text()
    assert "dolly" in table and "sinst" in table and str(model_dir) in table
    assert not list(tmp_path.rglob("*.tmp"))  # atomic writes leave no temporary files


def test_resume_skips_finished_suite_seed_files(model_dir, data_dir, tmp_path, monkeypatch):
    first = evaluate_model(
        str(model_dir), suites_of(data_dir), str(tmp_path), seeds=(10, 20), settings=SETTINGS, progress=False
    )
    redo = predictions_path(tmp_path, "sinst", 20)
    kept = predictions_path(tmp_path, "dolly", 10)
    kept_mtime = kept.stat().st_mtime_ns
    redo.unlink()  # as if interrupted before (sinst, 20) completed

    calls = []
    real = run_module.generate_responses

    def counting(model, tokenizer, prompts, settings, seed, progress=True):
        calls.append((len(prompts), seed))
        return real(model, tokenizer, prompts, settings, seed, progress)

    monkeypatch.setattr(run_module, "generate_responses", counting)
    second = evaluate_model(
        str(model_dir), suites_of(data_dir), str(tmp_path), seeds=(10, 20), settings=SETTINGS, progress=False
    )
    assert calls == [(3, 20)]
    assert kept.stat().st_mtime_ns == kept_mtime
    assert second["suites"] == first["suites"]  # same seed and layout: the redone file is the same


def test_resume_regenerates_a_file_with_other_prompts(model_dir, data_dir, tmp_path, monkeypatch):
    evaluate_model(
        str(model_dir), suites_of(data_dir), str(tmp_path), seeds=(10,), settings=SETTINGS, limit=2, progress=False
    )
    calls = []
    real = run_module.generate_responses
    monkeypatch.setattr(
        run_module,
        "generate_responses",
        lambda m, t, prompts, *a, **k: calls.append(len(prompts)) or real(m, t, prompts, *a, **k),
    )
    result = evaluate_model(
        str(model_dir), suites_of(data_dir), str(tmp_path), seeds=(10,), settings=SETTINGS, progress=False
    )
    assert calls == [5, 3]
    assert result["suites"]["dolly"]["count"] == 5


def test_greedy_runs_one_pass(model_dir, data_dir, tmp_path):
    greedy = GenerationSettings(max_length=72, max_prompt_tokens=64, batch_size=4, greedy=True)
    result = evaluate_model(
        str(model_dir), {"dolly": str(data_dir / "dolly")}, str(tmp_path), settings=greedy, progress=False
    )
    assert result["seeds"] == [] and list(result["suites"]["dolly"]["per_seed"]) == ["greedy"]
    assert result["suites"]["dolly"]["std"] == 0
    assert [p.name for p in (tmp_path / "predictions" / "dolly").iterdir()] == ["greedy.jsonl"]


def test_prompts_over_max_prompt_tokens_are_cut_counted_and_reported(model_dir, tmp_path, capsys):
    records = [
        {"instruction": "Add 1 and 2.", "response": "3"},
        {"instruction": "Sum these.", "context": "1 + " * 40, "response": "41"},  # about 110 prompt tokens
    ]
    suite = tmp_path / "dolly.jsonl"
    suite.write_text("".join(json.dumps(r) + "\n" for r in records))
    greedy = GenerationSettings(max_length=72, max_prompt_tokens=64, greedy=True)
    output = tmp_path / "out"
    result = evaluate_model(str(model_dir), {"dolly": str(suite)}, str(output), settings=greedy, progress=False)
    assert result["suites"]["dolly"]["cut_prompts"] == 1 and result["suites"]["dolly"]["count"] == 2
    assert json.loads((output / "results.json").read_text())["suites"]["dolly"]["cut_prompts"] == 1
    assert "suite dolly: 1 of 2 prompts over 64 tokens, cut to their first 64" in capsys.readouterr().out


def test_parse_prompt_inverts_the_template():
    assert parse_prompt(format_prompt("Do X.")) == ("Do X.", "")
    assert parse_prompt(format_prompt("Do X.", "Some\n\ncontext.")) == ("Do X.", "Some\n\ncontext.")
    assert parse_prompt("Just a question?") is None


def test_resolve_suites_from_data_dir(data_dir, capsys):
    assert resolve_suites(None, str(data_dir)) == suites_of(data_dir)
    assert "self-inst" in capsys.readouterr().err  # absent suites are noted
    assert resolve_suites("sinst", str(data_dir)) == {"sinst": str(data_dir / "sinst")}
    assert resolve_suites("x=/some/file.jsonl", None) == {"x": "/some/file.jsonl"}
    with pytest.raises(UserError, match="no suites to evaluate"):
        resolve_suites(None, None)


def test_cli_with_teacher_outputs(model_dir, data_dir, tmp_path):
    teacher = tmp_path / "teacher.jsonl"
    args = ["rouge", "--model", str(model_dir), "--data-dir", str(data_dir), "--seeds", "30", "--batch-size", "2"]
    args += ["--max-length", "72", "--max-prompt-tokens", "64", "--limit", "2", "--output", str(tmp_path / "out")]
    result = main([*args, "--teacher-outputs", str(teacher), "--no-progress"])
    assert result["seeds"] == [30] and set(result["suites"]) == {"dolly", "sinst"}
    records = [json.loads(line) for line in teacher.read_text().splitlines()]
    assert len(records) == 4
    predictions = [
        json.loads(line) for line in predictions_path(tmp_path / "out", "dolly", 30).read_text().splitlines()
    ]
    first = records[0]
    assert set(first) == {"instruction", "context", "response", "prompt", "suite"}
    assert (first["instruction"], first["context"]) == ("What is 0 plus 1?", "Numbers.")
    assert first["response"] == predictions[0]["prediction"] and first["suite"] == "dolly"
    assert format_prompt(first["instruction"], first["context"]) == first["prompt"]
    # the file reads as raw Dolly records for training (sequence-level KD)
    from dts_llm.records import read_records

    assert [r["response"] for r in read_records(str(teacher))] == [r["response"] for r in records]


def run_cli(model_dir, data_dir, output, processes):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "ACCELERATE_USE_CPU": "true"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    args = ["rouge", "--model", str(model_dir), "--data-dir", str(data_dir), "--seeds", "10,20", "--batch-size", "2"]
    args += ["--max-length", "72", "--max-prompt-tokens", "64", "--output", str(output), "--no-progress"]
    if processes == 1:
        command = [sys.executable, "-m", "eval", *args]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes)]
        command += ["--master_port", str(free_port()), "-m", "eval", *args]
    done = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads((output / "results.json").read_text())


def test_two_processes_give_the_same_predictions_and_scores_as_one(model_dir, data_dir, tmp_path):
    one = run_cli(model_dir, data_dir, tmp_path / "one", 1)
    two = run_cli(model_dir, data_dir, tmp_path / "two", 2)
    assert (one["processes"], two["processes"]) == (1, 2)
    assert two["suites"] == one["suites"]
    for name in ("dolly", "sinst"):  # 5 and 3 examples in batches of 2: the processes get unequal shares
        for seed in (10, 20):
            assert (
                predictions_path(tmp_path / "two", name, seed).read_text()
                == predictions_path(tmp_path / "one", name, seed).read_text()
            )
    assert one["suites"]["dolly"]["per_seed"]["10"] != one["suites"]["dolly"]["per_seed"]["20"] or (
        predictions_path(tmp_path / "one", "dolly", 10).read_text()
        != predictions_path(tmp_path / "one", "dolly", 20).read_text()
    )


def test_resuming_with_other_settings_is_refused(model_dir, data_dir, tmp_path):
    evaluate_model(
        str(model_dir), suites_of(data_dir), str(tmp_path), seeds=(10,), settings=SETTINGS, limit=2, progress=False
    )
    other = GenerationSettings(
        max_length=SETTINGS.max_length, max_prompt_tokens=SETTINGS.max_prompt_tokens, batch_size=1
    )
    with pytest.raises(ValueError, match="differs in \\['settings'\\]"):
        evaluate_model(
            str(model_dir), suites_of(data_dir), str(tmp_path), seeds=(10,), settings=other, limit=2, progress=False
        )


def test_a_failed_write_on_the_main_process_raises_its_own_error():
    def fail():
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        run_module._on_main_then_everywhere(fail, rank=0)
    calls = []
    run_module._on_main_then_everywhere(lambda: calls.append(1), rank=0)
    assert calls == [1]
