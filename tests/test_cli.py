"""The `dts-llm` command: help, the offline demo, and `sft` / `distill` from YAML recipes."""

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers import base_recipe, free_port, make_cli_workspace, write_recipe

import dts_llm.tasks
from dts_llm.cli import main
from dts_llm.recipe import RECIPE_NAME


def test_console_script_and_module_print_help():
    console_script = str(Path(sys.executable).parent / "dts-llm")
    commands = ([console_script, "--help"], [sys.executable, "-m", "dts_llm", "--help"])
    started = [subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for c in commands]
    for process in started:  # side by side: each start imports torch and transformers
        out, err = process.communicate(timeout=120)
        assert process.returncode == 0, err
        assert "demo" in out


def test_demo_distils_a_student_towards_its_teacher(tmp_path, capsys):
    assert main(["demo", "--output", str(tmp_path)]) == 0
    printed = capsys.readouterr()
    assert "validation: student CE" in printed.out
    # The teacher is saved with its tokenizer, so the trainer does not warn that it has none; no folder is left empty.
    assert "No tokenizer was found with the teacher" not in printed.err
    assert (tmp_path / "teacher" / "tokenizer.json").is_file() and (
        tmp_path / "student" / "model.safetensors"
    ).is_file()
    history = json.loads((tmp_path / "log_history.json").read_text())
    train = [entry for entry in history if "kd_loss" in entry]
    final = history[-1]
    # DTS: the temperature starts at T_init = 3 and ends near T_min = 1 (cosine factor 0 in the last epoch).
    assert train[0]["temperature"] > 2.9
    assert 1.0 <= train[-1]["temperature"] < 1.1
    assert train[-1]["ce_loss"] < 0.5 * train[0]["ce_loss"]
    assert final["eval_ce_loss"] < 1.25 * final["eval_teacher_ce_loss"]


# ---- `dts-llm sft` and `dts-llm distill` from recipes ------------------------------------------


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    return make_cli_workspace(tmp_path_factory.mktemp("cli"))


@pytest.fixture(scope="module")
def sft_teacher(workspace):
    recipe = base_recipe(workspace, "teacher", model_name_or_path=str(workspace / "teacher-init"), max_steps=8)
    assert main(["sft", write_recipe(workspace / "sft.yaml", **recipe)]) == 0
    return workspace / "teacher"


def test_sft_writes_model_tokenizer_and_resolved_recipe(sft_teacher):
    for name in ("model.safetensors", "config.json", "tokenizer.json", RECIPE_NAME):
        assert (sft_teacher / name).is_file(), name
    resolved = yaml.safe_load((sft_teacher / RECIPE_NAME).read_text())
    assert resolved["max_steps"] == 8 and resolved["dev_num"] == 8
    assert resolved["teacher_model_name_or_path"] is None


def test_sft_writes_the_data_report_to_output_dir(sft_teacher):
    report = json.loads((sft_teacher / "data_report.json").read_text())
    assert report["records"] == 40 and report["validation"] == 8 and report["train"] == 32
    assert report["truncated_responses"] == report["dropped_long_prompts"] == report["empty_responses"] == 0


def distill_recipe(workspace, sft_teacher, output: str, **fields) -> dict:
    defaults = {
        "model_name_or_path": str(workspace / "student-init"),
        "teacher_model_name_or_path": str(sft_teacher),
        "max_steps": 6,
        "temperature_policy": "dts",
        "temperature_progress": "step",
    }
    return base_recipe(workspace, output, **{**defaults, **fields})


def test_distill_checkpoints_and_resumes_on_the_same_trajectory(workspace, sft_teacher, capsys, monkeypatch):
    recipe = write_recipe(
        workspace / "distill.yaml",
        **distill_recipe(workspace, sft_teacher, "student", save_strategy="steps", save_steps=3),
    )
    assert main(["distill", recipe]) == 0
    out = workspace / "student"
    assert f"dts-llm: done: the model is in {out}\nfinal metrics: loss " in capsys.readouterr().out
    for name in ("model.safetensors", "tokenizer.json", RECIPE_NAME, "checkpoint-3/temperature_policy.json"):
        assert (out / name).is_file(), name
    full = json.loads((out / "checkpoint-6" / "trainer_state.json").read_text())["log_history"]

    # Command-line flags override the recipe: resume from step 3 into another folder.
    resumed_out = workspace / "student-resumed"
    assert (
        main(
            [
                "distill",
                recipe,
                "--output_dir",
                str(resumed_out),
                "--resume_from_checkpoint",
                str(out / "checkpoint-3"),
            ]
        )
        == 0
    )
    resumed = json.loads((resumed_out / "checkpoint-6" / "trainer_state.json").read_text())["log_history"]
    steps = [entry for entry in resumed if "kd_loss" in entry]
    assert [entry["step"] for entry in steps] == list(range(1, 7))
    for mine, theirs in zip(steps, [entry for entry in full if "kd_loss" in entry], strict=False):
        assert mine["temperature"] == pytest.approx(theirs["temperature"], rel=1e-6)
        assert mine["kd_loss"] == pytest.approx(theirs["kd_loss"], rel=1e-4)
    assert yaml.safe_load((resumed_out / RECIPE_NAME).read_text())["output_dir"] == str(resumed_out)

    # Refused in one line before any model loads: other temperature settings, nothing to resume.
    monkeypatch.setattr(dts_llm.tasks, "load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    capsys.readouterr()
    other = ["--output_dir", str(workspace / "other"), "--resume_from_checkpoint", str(out / "checkpoint-3")]
    err = refused(capsys, ["distill", recipe, *other, "--temperature_policy", "constant", "--temperature_init", "2.0"])
    assert (
        "was trained with other temperature settings: temperature_policy (checkpoint 'dts', this run 'constant')"
        in err
    )
    assert "temperature_init (checkpoint 3.0, this run 2.0)" in err
    err = refused(
        capsys, ["distill", recipe, "--output_dir", str(workspace / "other"), "--resume_from_checkpoint", "last"]
    )
    assert f"no complete checkpoint in {workspace / 'other'}" in err


def test_cache_teacher_then_distill_from_the_cache_trains_as_the_live_teacher_does(
    workspace, sft_teacher, capsys, monkeypatch
):
    cache = workspace / "teacher-cache"
    fields = {"eval_strategy": "steps", "eval_steps": 3}
    recipe = write_recipe(
        workspace / "cached.yaml",
        **distill_recipe(workspace, sft_teacher, "cached", teacher_cache=str(cache), **fields),
    )
    assert main(["cache-teacher", recipe]) == 0
    summary = capsys.readouterr().out
    assert f"dts-llm: teacher cache (exact) in {cache}: {{'train': 32, 'validation': 8}} examples" in summary
    live = write_recipe(workspace / "live.yaml", **distill_recipe(workspace, sft_teacher, "live", **fields))
    assert main(["distill", live]) == 0
    import dts_llm.tasks

    load_model = dts_llm.tasks.load_model

    def student_only(path, *args, **kwargs):
        assert path != str(sft_teacher), "the teacher was loaded"
        return load_model(path, *args, **kwargs)

    monkeypatch.setattr(dts_llm.tasks, "load_model", student_only)
    assert main(["distill", recipe]) == 0
    logs = {
        name: json.loads((workspace / name / "trainer_state.json").read_text())["log_history"]
        for name in ("live", "cached")
    }
    assert len(logs["cached"]) == len(logs["live"]) == 9  # 6 steps, 2 evaluations, the summary
    compared = ("loss", "kd_loss", "teacher_ce_loss", "temperature", "eval_loss", "eval_teacher_ce_loss")
    for mine, theirs in zip(logs["cached"], logs["live"], strict=True):
        assert {key: mine[key] for key in compared if key in mine} == pytest.approx(
            {key: theirs[key] for key in compared if key in theirs}, rel=2e-5
        )
    assert yaml.safe_load((workspace / "cached" / RECIPE_NAME).read_text())["teacher_cache"] == str(cache)
    # A recipe the cache was not made for is refused before any model loads, naming what differs.
    monkeypatch.setattr(dts_llm.tasks, "load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    capsys.readouterr()
    err = refused(capsys, ["distill", recipe, "--output_dir", str(workspace / "other"), "--max_length", "120"])
    assert "was made from other recipe settings (max_length: cache 128, now 120)" in err


def test_auto_temperature_bounds_are_measured_once_logged_and_written_to_the_resolved_recipe(
    workspace, sft_teacher, trained_teacher_dir, capsys, caplog, monkeypatch
):
    fields = {"temperature_min": "auto", "temperature_max": "auto", "temperature_init": "auto", "max_steps": 4}
    # The eight-step SFT teacher is still near uniform at T = 1: no range to recommend, said before training.
    flat = write_recipe(workspace / "flat.yaml", **distill_recipe(workspace, sft_teacher, "student-flat", **fields))
    assert main(["distill", flat]) == 2
    assert (
        "dts-llm: error: temperature_min, temperature_max, temperature_init: auto: the teacher has no temperature "
        "range between peaked (top-1 mass <= 0.9) and flat" in capsys.readouterr().err
    )
    assert not (workspace / "student-flat" / "trainer_state.json").exists()

    recipe = distill_recipe(
        workspace, trained_teacher_dir, "student-auto", save_strategy="steps", save_steps=2, **fields
    )
    recipe_path = write_recipe(workspace / "auto.yaml", **recipe)
    with caplog.at_level(logging.WARNING, logger="dts_llm"):
        assert main(["distill", recipe_path]) == 0
    out = workspace / "student-auto"
    # The range `dts-llm teacher-report` recommends for the recipe's teacher on the same examples (the recipe's
    # training split: the first 256, all 32 here).
    assert main(["teacher-report", "--recipe", recipe_path, "--output", str(workspace / "report")]) == 0
    report = json.loads((workspace / "report" / "teacher_report.json").read_text())
    low, high = report["recommended_range"]
    record = json.loads((out / "auto_temperature.json").read_text())
    assert (record["temperature_min"], record["temperature_max"], record["tokens"]) == (low, high, report["tokens"])
    assert f"auto -> temperature range [{low:g}, {high:g}] measured on the teacher's" in caplog.text
    resolved = yaml.safe_load((out / RECIPE_NAME).read_text())
    assert (resolved["temperature_min"], resolved["temperature_max"], resolved["temperature_init"]) == (
        low,
        high,
        high,
    )
    saved = json.loads((out / "checkpoint-2" / "temperature_policy.json").read_text())["settings"]
    assert (saved["temperature_min"], saved["temperature_max"]) == (low, high)
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    assert history[0]["temperature"] <= high and all(
        low <= e["temperature"] <= high for e in history if "kd_loss" in e
    )

    # Resumed: the range is read back, not measured again, and the trajectory continues.
    monkeypatch.setattr("dts_llm.auto_temperature.teacher_statistics", lambda *a, **k: pytest.fail("measured"))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="dts_llm"):
        resumed = ["--output_dir", str(workspace / "student-auto-resumed"), "--overwrite_output_dir", "true"]
        shutil.copytree(out, workspace / "student-auto-resumed")
        checkpoint = str(workspace / "student-auto-resumed" / "checkpoint-2")
        assert main(["distill", recipe_path, *resumed[:2], "--resume_from_checkpoint", checkpoint]) == 0
    assert "as measured before" in caplog.text
    again = json.loads((workspace / "student-auto-resumed" / "trainer_state.json").read_text())["log_history"]
    temperatures = [[e["temperature"] for e in run if "kd_loss" in e] for run in (history, again)]
    assert temperatures[1] == pytest.approx(temperatures[0], rel=1e-6)


def test_the_resolved_recipe_runs_again_as_a_recipe(workspace, sft_teacher):
    from dts_llm.recipe import parse_recipe

    recipe = write_recipe(workspace / "original.yaml", **distill_recipe(workspace, sft_teacher, "student"))
    original = parse_recipe("distill", [recipe])
    if not (workspace / "student" / RECIPE_NAME).is_file():
        pytest.skip("needs the distill run of test_distill_checkpoints_and_resumes_on_the_same_trajectory")
    again = parse_recipe("distill", [str(workspace / "student" / RECIPE_NAME)])
    for before, after in zip(original[:3], again[:3], strict=False):
        assert before == after
    for name in ("learning_rate", "max_steps", "temperature_policy", "temperature_progress", "kd_ratio", "seed"):
        assert getattr(again[3], name) == getattr(original[3], name), name


def test_distill_a_lora_student_saves_adapter_and_merged_model(workspace, sft_teacher):
    recipe = distill_recipe(workspace, sft_teacher, "lora", max_steps=2, merge_lora=True)
    recipe["peft"] = {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": ["c_attn"]}
    assert main(["distill", write_recipe(workspace / "lora.yaml", **recipe)]) == 0
    out = workspace / "lora"
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    assert (out / "merged" / "model.safetensors").is_file()
    assert yaml.safe_load((out / RECIPE_NAME).read_text())["lora_r"] == 4


def refused(capsys, argv: list[str]) -> str:
    """The one line `dts-llm ARGV` prints when it refuses, having exited with status 2."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("dts-llm: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


@pytest.fixture
def no_model_loads(monkeypatch):
    import dts_llm.tasks

    monkeypatch.setattr(dts_llm.tasks, "load_model", lambda *a, **k: pytest.fail("a model was loaded"))


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"learning_rat": 0.1}, "learning_rat"),
        ({"peft": {"r": 4, "rank": 4}}, "peft.rank"),
        ({"peft": {"lora_alpha": 8}}, "sets at least r"),
        ({"peft": {"r": 0}}, "lora_r"),
        ({"merge_lora": True}, "merge_lora"),
        ({"learning_rat": None}, "learning_rat"),
        ({"report_to": ["tensorboard", "wandb"]}, "report_to takes one value"),
        ({"model_name_or_path": "/nonexistent/model"}, "model_name_or_path"),
        ({"teacher_model_name_or_path": None}, "teacher_model_name_or_path"),
        ({"temperature_min": 0.0}, "temperature_min"),
        (
            {"learning_rate": "fast"},
            "argument --learning_rate/--learning-rate: invalid float value: 'fast' (`dts-llm distill --help`",
        ),
        # Above the models' 128 positions: an IndexError in the embedding, mid-training.
        ({"max_length": 512}, "max_length 512 is longer than the context of model_name_or_path"),
        # Torch refuses these only once both models have loaded, or the run silently ignores them.
        ({"learning_rate": -1.0}, "learning_rate must be >= 0, got -1.0"),
        ({"weight_decay": -0.1}, "weight_decay must be >= 0"),
        ({"max_grad_norm": -1.0}, "max_grad_norm must be >= 0"),
        ({"adam_beta1": 1.5}, "adam_beta1 must be in [0, 1)"),
        ({"per_device_train_batch_size": 0}, "per_device_train_batch_size must be >= 1"),
        ({"gradient_accumulation_steps": 0}, "gradient_accumulation_steps must be >= 1"),
        ({"max_steps": -1, "num_train_epochs": 0}, "the run would train nothing"),
    ],
)
def test_bad_recipes_fail_before_any_model_loads(workspace, sft_teacher, fields, message, capsys, no_model_loads):
    recipe = {**distill_recipe(workspace, sft_teacher, "bad"), **fields}
    assert message in refused(capsys, ["distill", write_recipe(workspace / "bad.yaml", **recipe)])
    assert not (workspace / "bad").exists()


def test_an_unwritable_output_dir_fails_before_any_model_loads(workspace, sft_teacher, capsys, no_model_loads):
    recipe = write_recipe(workspace / "bad.yaml", **distill_recipe(workspace, sft_teacher, "bad"))
    below_a_file = workspace / "dolly.jsonl" / "out"
    err = refused(capsys, ["distill", recipe, "--output_dir", str(below_a_file)])
    assert f"output_dir {below_a_file}: {workspace / 'dolly.jsonl'} is a file, not a folder" in err


def test_a_finished_run_is_not_trained_over_unless_asked(workspace, sft_teacher, tmp_path, capsys, no_model_loads):
    """A copy of the sft_teacher fixture's finished run, with a checkpoint: refused; resuming or
    overwriting gets past the check (to the model load), and overwriting clears the old state."""
    finished = tmp_path / "finished"
    shutil.copytree(sft_teacher, finished)
    (finished / "checkpoint-4").mkdir()
    (finished / "checkpoint-4" / "trainer_state.json").write_text('{"global_step": 4}')
    fields = base_recipe(
        workspace, "unused", model_name_or_path=str(workspace / "teacher-init"), output_dir=str(finished)
    )
    recipe = write_recipe(tmp_path / "again.yaml", **fields)
    err = refused(capsys, ["sft", recipe])
    assert f"{finished} holds a trained run (trainer_state.json, model.safetensors, checkpoint-4)" in err
    assert "--resume_from_checkpoint last" in err and "--overwrite_output_dir true" in err
    assert (finished / "trainer_state.json").is_file()
    for flags in (["--resume_from_checkpoint", "last"], ["--overwrite_output_dir", "true"]):
        with pytest.raises(pytest.fail.Exception, match="a model was loaded"):
            main(["sft", recipe, *flags])
    assert not any(
        path.exists()
        for path in (finished / "trainer_state.json", finished / "model.safetensors", finished / "checkpoint-4")
    )
    assert (finished / "tokenizer.json").is_file()


def test_resume_from_checkpoint_takes_true_and_last_as_words(workspace, sft_teacher):
    from dts_llm.recipe import parse_recipe

    recipe = write_recipe(
        workspace / "resume.yaml", **distill_recipe(workspace, sft_teacher, "resume"), resume_from_checkpoint=True
    )
    assert parse_recipe("distill", [recipe])[3].resume_from_checkpoint == "true"
    assert parse_recipe("distill", [recipe, "--resume_from_checkpoint", "last"])[3].resume_from_checkpoint == "last"


@pytest.mark.parametrize("command", ["sft", "distill"])
def test_help_shows_the_recipe_form_and_exits_0(command, capsys):
    assert main([command, "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: dts-llm {command} RECIPE.yaml [--field value ...]\n")
    assert "--learning_rate" in out and "--overwrite_output_dir" in out


def test_a_run_ends_with_a_summary_and_a_model_card(sft_teacher, capsys):
    """The sft_teacher fixture's run (8 steps, logged every step)."""
    history = json.loads((sft_teacher / "trainer_state.json").read_text())["log_history"]
    from dts_llm.commands.train import run_summary

    summary = run_summary(str(sft_teacher), False, history)
    assert summary.splitlines()[0] == f"dts-llm: done: the model is in {sft_teacher}"
    assert f"train_loss {history[-1]['train_loss']:.4g}" in summary and f"loss {history[-2]['loss']:.4g}" in summary
    card = (sft_teacher / "README.md").read_text()
    assert f"fine-tuned from `{sft_teacher.parent / 'teacher-init'}` with `dts-llm sft`" in card
    assert f"| train_loss | {history[-1]['train_loss']:.4g} |" in card


def test_the_deepspeed_accelerator_notice_is_silenced(monkeypatch):
    import logging

    from deepspeed.accelerator import real_accelerator

    from dts_llm.launch import silence_library_notices

    records = []
    handler = logging.Handler()
    handler.emit = records.append
    deepspeed_logger = logging.getLogger("DeepSpeed")
    monkeypatch.setattr(deepspeed_logger, "handlers", [handler])
    monkeypatch.setattr(deepspeed_logger, "filters", [])
    monkeypatch.setattr(real_accelerator, "ds_accelerator", None)
    monkeypatch.delenv("DS_ACCELERATOR", raising=False)
    silence_library_notices()
    real_accelerator.get_accelerator()
    deepspeed_logger.warning("other messages pass")
    assert [record.getMessage() for record in records] == ["other messages pass"]


def test_distill_runs_unchanged_under_accelerate_launch(workspace, sft_teacher):
    """Two CPU processes (gloo): 32 training records at 8 per device make 2 steps for one epoch."""
    recipe = distill_recipe(workspace, sft_teacher, "launched", save_strategy="epoch", ddp_backend="gloo")
    del recipe["max_steps"]
    recipe["num_train_epochs"] = 1
    path = write_recipe(workspace / "launched.yaml", **recipe)
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    launch += ["--main_process_port", str(free_port())]
    done = subprocess.run(
        [*launch, "-m", "dts_llm", "distill", path], env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    out = workspace / "launched"
    assert (out / "model.safetensors").is_file() and (out / RECIPE_NAME).is_file()
    history = json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())["log_history"]
    assert [entry["step"] for entry in history if "kd_loss" in entry] == [1, 2]


def test_sft_of_a_lora_model_trains_only_its_adapters(workspace):
    recipe = base_recipe(workspace, "sft-lora", model_name_or_path=str(workspace / "student-init"), max_steps=2)
    recipe["peft"] = {"r": 4, "lora_alpha": 8, "target_modules": ["c_attn"]}
    assert main(["sft", write_recipe(workspace / "sft-lora.yaml", **recipe)]) == 0
    out = workspace / "sft-lora"
    assert (out / "adapter_model.safetensors").is_file() and not (out / "model.safetensors").exists()
    from safetensors.torch import load_file

    adapter = load_file(str(out / "adapter_model.safetensors"))
    assert adapter and all("lora_" in name for name in adapter)
    assert any(name.endswith("lora_B.weight") and tensor.abs().sum() > 0 for name, tensor in adapter.items())


# ---- `dts-llm eval` ------------------------------------------------------------------------------


def test_dts_llm_eval_rouge_takes_max_new_tokens(workspace, tmp_path):
    from transformers import AutoTokenizer

    argv = [
        "eval",
        "rouge",
        "--model",
        str(workspace / "student-init"),
        "--suites",
        f"dolly={workspace / 'dolly.jsonl'}",
    ]
    argv += ["--greedy", "--limit", "2", "--max-new-tokens", "3", "--no-progress", "--output", str(tmp_path)]
    assert main(argv) == 0
    assert json.loads((tmp_path / "results.json").read_text())["settings"]["new_tokens"] == 3
    tokenizer = AutoTokenizer.from_pretrained(workspace / "student-init")
    predictions = [
        json.loads(line)["prediction"] for line in (tmp_path / "predictions" / "dolly" / "greedy.jsonl").open()
    ]
    assert len(predictions) == 2 and all(len(tokenizer(text)["input_ids"]) <= 3 for text in predictions)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["rouge", "--suites", "dolly=x.jsonl", "--max-new-tokens", "300"], "--max-new-tokens 300 does not fit"),
        (["rouge", "--suites", "dolly"], "--suites dolly: give a source (dolly=PATH) or --data-dir"),
        (
            ["glue", "--task", "sst2", "--model", "/nonexistent/model"],
            "--model: no model found at '/nonexistent/model'",
        ),
    ],
)
def test_dts_llm_eval_refuses_bad_settings_in_one_line(workspace, argv, message, capsys):
    model = [] if "--model" in argv else ["--model", str(workspace / "student-init")]
    assert message in refused(capsys, ["eval", *argv, *model])
