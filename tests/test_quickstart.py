"""`dts-llm quickstart --fast`: the whole offline pipeline, its files, its table, and resuming."""

import json
import statistics

import pytest
import torch
import yaml
from safetensors.torch import load_file

import dts_llm.commands.quickstart
from dts_llm.cli import main
from dts_llm.commands.quickstart import STUDENTS
from dts_llm.synthetic import FAMILIES, generate

MODELS = ["teacher"] + [name for name, _, _ in STUDENTS]


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory):
    from dts_llm.commands.quickstart import run_quickstart

    out = tmp_path_factory.mktemp("quickstart")
    return out, run_quickstart(str(out), fast=True)


def test_synthetic_data_is_seeded_dolly_format_with_every_family():
    records = generate(300, seed=3)
    assert records == generate(300, seed=3) and records != generate(300, seed=4)
    assert {r["category"] for r in records} == set(FAMILIES)
    assert all(set(r) == {"instruction", "context", "response", "category"} and r["response"] for r in records)
    assert any(r["context"] for r in records) and any(not r["context"] for r in records)


def test_quickstart_writes_data_tokenizer_models_results_and_figure(quickstart):
    out, results = quickstart
    for split in ("train", "validation", "test"):
        assert (out / "data" / f"{split}.jsonl").stat().st_size > 0
    assert (out / "tokenizer" / "tokenizer.json").is_file()
    for name in MODELS:
        assert (out / "models" / name / "model.safetensors").is_file(), name
    for name, _, _ in STUDENTS[1:]:
        history = json.loads((out / "models" / name / "log_history.json").read_text())
        assert any("temperature" in entry and "kd_loss" in entry for entry in history), name
    ctkd = [
        e
        for e in json.loads((out / "models" / "student-kd-ctkd" / "log_history.json").read_text())
        if "ctkd_lambda" in e
    ]
    assert ctkd and ctkd[-1]["ctkd_lambda"] == 1.0  # the adversarial weight ramped up within the first epoch
    assert len({round(e["temperature"], 4) for e in ctkd}) > 1  # and the learnt temperature moved
    figure = (out / "temperature_and_losses.png").read_bytes()
    assert figure.startswith(b"\x89PNG\r\n\x1a\n") and len(figure) > 1000
    assert json.loads((out / "results.json").read_text()) == results


def test_table_has_one_row_per_model_and_the_teacher_beats_the_sft_student(quickstart):
    out, results = quickstart
    table = (out / "results.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert [row.split("|")[1].strip() for row in rows] == MODELS
    scores = {row["model"]: row for row in results["models"]}
    assert all(len(row["rouge_l_per_seed"]) == 3 for row in scores.values())
    # Measured in fast mode (2 CPU cores): teacher 18.6 ROUGE-L sampled / 28.2 greedy, SFT student 1.0 / 2.0.
    assert scores["teacher"]["rouge_l_mean"] > scores["student-sft"]["rouge_l_mean"] + 5
    assert scores["teacher"]["rouge_l_greedy"] > scores["student-sft"]["rouge_l_greedy"] + 5
    assert scores["teacher"]["params"] > scores["student-sft"]["params"]


def test_kd_dts_from_the_exact_teacher_cache_trains_as_the_online_run_and_the_compact_one_reads_its_teacher_ce(
    quickstart,
):
    out, _ = quickstart
    logged = {
        name: [
            entry
            for entry in json.loads((out / "models" / name / "log_history.json").read_text())
            if "kd_loss" in entry
        ]
        for name in ("student-kd-dts", "student-kd-dts-cache-exact", "student-kd-dts-cache-compact")
    }
    online, exact, compact = logged.values()
    assert len(online) == len(exact) == len(compact) > 10
    for key in ("temperature", "loss", "kd_loss", "ce_loss", "teacher_ce_loss"):
        assert [entry[key] for entry in exact] == pytest.approx([entry[key] for entry in online], rel=1e-4), key
    # The teacher's CE of the labels is stored exactly in both kinds; it does not depend on the student.
    assert [e["teacher_ce_loss"] for e in compact] == pytest.approx([e["teacher_ce_loss"] for e in online], rel=1e-4)
    manifests = {
        kind: json.loads((out / "models" / f"teacher-cache-{kind}" / "manifest.json").read_text())
        for kind in ("exact", "compact")
    }
    assert [manifest["kind"] for manifest in manifests.values()] == ["exact", "compact"]
    examples = [{name: split["examples"] for name, split in m["splits"].items()} for m in manifests.values()]
    assert examples[0] == examples[1] and set(examples[0]) == {"train", "validation"}
    settings = manifests["compact"]["settings"]
    assert (settings["top_k"], settings["temperature_min"], settings["temperature_max"]) == (128, 1.0, 3.0)


def test_a_study_trains_every_cell_once_per_training_seed_and_reports_the_spread_over_them(quickstart, capsys):
    out, _ = quickstart
    study = out / "study"
    argv = ["study", "--quickstart", str(out), "--fast", "--families", "dts", "--train-seeds", "1,2"]
    argv += ["--eval-limit", "4", "--output", str(study), "--max_steps", "4"]
    assert main([*argv, "--seed", "3"]) == 2  # the grid sets each run's seed
    assert "--seed: the sweep sets it for each run; give --train-seeds" in capsys.readouterr().err
    assert main(argv) == 0
    result = json.loads((study / "sweep.json").read_text())
    runs = {row["run"]: row for row in result["runs"]}
    assert list(runs) == ["dts-T3-1-seed1", "dts-T3-1-seed2"]
    weights = []
    for seed, name in zip((1, 2), runs, strict=True):
        resolved = yaml.safe_load((study / name / "dts_llm_config.yaml").read_text())
        assert (resolved["seed"], resolved["max_steps"], resolved["temperature_policy"]) == (seed, 4, "dts")
        assert resolved["dataset"] == str(out / "data" / "train.jsonl")
        weights.append(load_file(study / name / "model.safetensors"))
    assert any(not torch.equal(weights[0][key], weights[1][key]) for key in weights[0])  # two training runs
    [cell] = result["cells"]
    means = [row["rouge_l"]["test"]["mean"] for row in runs.values()]
    assert cell["run"] == "dts-T3-1" and cell["train_seeds"] == [1, 2]
    assert cell["rouge_l"]["test"]["per_seed"] == {"1": means[0], "2": means[1]}
    assert cell["rouge_l"]["test"]["mean"] == pytest.approx(statistics.fmean(means))
    assert cell["rouge_l"]["test"]["std"] == pytest.approx(statistics.pstdev(means))
    table = (study / "sweep.md").read_text()
    assert "mean ± std over training seeds 1, 2" in table and "| dts-T3-1 | dts | T 3 -> 1 |" in table
    assert (study / "trajectories.png").read_bytes().startswith(b"\x89PNG")


def test_a_second_run_reuses_every_stage(quickstart, monkeypatch, capsys):
    from dts_llm.commands.quickstart import run_quickstart

    out, results = quickstart
    calls = []
    for child in ("train_in_child", "run_in_child"):
        monkeypatch.setattr(dts_llm.commands.quickstart, child, lambda *args: calls.append(args))
    again = run_quickstart(str(out), fast=True)
    assert calls == []  # no training or caching command ran again
    assert again["models"] == results["models"]
    printed = capsys.readouterr().out
    assert printed.count("(reused)") == 7  # every stage but the report


def test_quickstart_refuses_a_folder_of_other_settings(quickstart):
    from dts_llm.commands.quickstart import run_quickstart

    out, _ = quickstart
    with pytest.raises(ValueError, match="other settings"):
        run_quickstart(str(out), fast=False)
