"""`dts-llm sweep`: a small grid trained through `dts-llm distill`, evaluated, tabulated, plotted; re-runs
skip finished runs and redo deleted ones; bad grids and changed settings fail before any training."""

import json

import pytest
from helpers import base_recipe, make_cli_workspace, write_recipe

from dts_llm.cli import main
from dts_llm.commands.sweep_grid import build_grid
from dts_llm.commands.sweep_report import cell_rows
from dts_llm.temperature import TEMPERATURE_POLICIES

CTKD = "ctkd" in TEMPERATURE_POLICIES
FAMILIES = "fixed,dts,ctkd" if CTKD else "fixed,dts"
RUNS = ["fixed-T1", "fixed-T4", "dts-T3-1"] + (["ctkd"] if CTKD else [])
GRID = ["--families", FAMILIES, "--fixed", "1,4", "--dts", "3:1", "--eval-seeds", "1,2", "--eval-limit", "2"]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = make_cli_workspace(tmp_path_factory.mktemp("sweep"))
    recipe = base_recipe(
        root,
        "unused",
        model_name_or_path=str(root / "student-init"),
        teacher_model_name_or_path=str(root / "teacher-init"),
        max_steps=4,
        per_device_train_batch_size=4,  # tiny steps: the test checks the plumbing, not the students
        dev_num=4,
        temperature_progress="step",
        eval_strategy="steps",
        eval_steps=4,
        seed=3,
    )
    return root, write_recipe(root / "recipe.yaml", **recipe)


@pytest.fixture(scope="module")
def sweep(workspace):
    root, recipe = workspace
    output = root / "sweep"
    assert main(["sweep", recipe, *GRID, "--output", str(output)]) == 0
    return recipe, output


def sweep_rows(output) -> dict[str, dict]:
    return {row["run"]: row for row in json.loads((output / "sweep.json").read_text())["runs"]}


def test_every_run_has_a_model_an_evaluation_and_a_trajectory(sweep):
    _, output = sweep
    for name in RUNS:
        for path in (
            "model.safetensors",
            "trainer_state.json",
            "eval/results.json",
            "trajectory.json",
            "trajectory.csv",
        ):
            assert (output / name / path).is_file(), f"{name}/{path}"
        results = json.loads((output / name / "eval" / "results.json").read_text())
        assert set(results["suites"]["validation"]["per_seed"]) == {"1", "2"}
        assert results["suites"]["validation"]["count"] == 2
    for figure in ("rouge_l.png", "trajectories.png"):
        assert (output / figure).read_bytes().startswith(b"\x89PNG\r\n\x1a\n"), figure


def test_the_table_has_one_row_per_run_with_its_settings(sweep):
    _, output = sweep
    rows = sweep_rows(output)
    assert list(rows) == RUNS
    assert rows["fixed-T4"]["overrides"] == {"temperature_policy": "constant", "temperature_init": 4.0}
    assert rows["dts-T3-1"]["overrides"] == {
        "temperature_policy": "dts",
        "temperature_min": 1.0,
        "temperature_max": 3.0,
        "temperature_init": 3.0,
    }
    if CTKD:
        assert rows["ctkd"]["overrides"] == {"temperature_policy": "ctkd"}
    for row in rows.values():
        assert 0 <= row["rouge_l"]["validation"]["mean"] <= 100 and row["rouge_l"]["validation"]["std"] >= 0
        assert row["eval_ce_loss"] > 0 and row["final_temperature"] > 0
    # each run's resolved recipe says it trained with its own temperature settings
    import yaml

    resolved = yaml.safe_load((output / "fixed-T4" / "dts_llm_config.yaml").read_text())
    assert resolved["temperature_policy"] == "constant" and resolved["temperature_init"] == 4.0
    table = (output / "sweep.md").read_text()
    lines = [line for line in table.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert [line.split("|")[1].strip() for line in lines] == RUNS
    assert "| fixed-T4 | constant | T = 4 |" in table and "| dts-T3-1 | dts | T 3 -> 1 |" in table


def test_trajectories_are_constant_for_a_fixed_t_and_move_within_the_dts_range(sweep):
    _, output = sweep
    constant = json.loads((output / "fixed-T4" / "trajectory.json").read_text())
    assert [step["step"] for step in constant] == [1, 2, 3, 4]
    assert all(step["temperature"] == pytest.approx(4.0) for step in constant)
    assert all(step["kd_loss"] > 0 and step["ce_loss"] > 0 for step in constant)
    dts = [step["temperature"] for step in json.loads((output / "dts-T3-1" / "trajectory.json").read_text())]
    assert all(1.0 <= t <= 3.0 for t in dts) and dts == sorted(dts, reverse=True) and dts[0] > dts[-1]
    csv_lines = (output / "dts-T3-1" / "trajectory.csv").read_text().splitlines()
    assert csv_lines[0] == "step,epoch,temperature,kd_loss,ce_loss,dts_gap,dts_a,dts_fired,dts_cosine"
    assert len(csv_lines) == 5
    assert "dts_gap" not in constant[0]  # a run logs only its own policy's diagnostics
    row = sweep_rows(output)["dts-T3-1"]
    assert row["final_temperature"] == pytest.approx(dts[-1]) and row["mean_temperature"] == pytest.approx(
        sum(dts) / 4
    )


def test_the_study_families_set_their_policy_range_and_generation_and_train_once_per_training_seed():
    runs = build_grid(
        ["fixed", "reverse-kl", "dts-paper", "dts-token", "adakd", "on-policy", "seq-kd"],
        [4.0],
        [(3.0, 1.0)],
        [],
        [7, 8],
    )
    cells = [
        "fixed-T4",
        "reverse-kl",
        "dts-paper-T3-1",
        "dts-token-T3-1",
        "adakd-T3-1",
        "on-policy-T3-1",
        "seq-kd-T3-1",
    ]
    assert [run.name for run in runs] == [f"{cell}-seed{seed}" for cell in cells for seed in (7, 8)]
    assert [run.cell for run in runs] == [cell for cell in cells for _ in (7, 8)]
    assert [run.overrides["seed"] for run in runs] == [7, 8] * len(cells)
    fields = {run.cell: {k: v for k, v in run.overrides.items() if k != "seed"} for run in runs}
    dts_range = {"temperature_min": 1.0, "temperature_max": 3.0, "temperature_init": 3.0}
    assert fields["reverse-kl"] == {
        "temperature_policy": "constant",
        "temperature_init": 1.0,
        "divergence": "reverse_kl",
    }
    assert fields["dts-paper-T3-1"] == {"temperature_policy": "dts_paper", **dts_range}
    assert fields["dts-token-T3-1"] == {"temperature_policy": "dts_token", **dts_range}
    assert fields["adakd-T3-1"] == {"temperature_policy": "adakd", **dts_range, "temperature_init": 1.73}  # sqrt(3)
    assert fields["on-policy-T3-1"] == {"temperature_policy": "dts", **dts_range, "lmbda": 0.5, "kd_ratio": 1.0}
    assert fields["seq-kd-T3-1"] == {"temperature_policy": "dts", **dts_range, "seq_kd": True}
    assert [run.temperature_range() for run in runs[:4]] == [(4.0, 4.0)] * 2 + [(1.0, 1.0)] * 2
    # Without training seeds a run is its own cell, named as before.
    assert [(run.name, run.cell) for run in build_grid(["dts"], dts=[(3.0, 1.0)])] == [("dts-T3-1", "dts-T3-1")]


def test_cells_aggregate_their_training_seeds_and_differ_from_the_first_cell_paired_by_seed():
    def row(cell: str, seed: int, mean: float, std: float, temperature: float) -> dict:
        scores = {"test": {"mean": mean, "std": std, "per_seed": {}, "count": 5}}
        fields = dict.fromkeys(("policy", "settings", "teacher_cache", "eval_loss", "eval_ce_loss", "eval_kd_loss"))
        overrides = {"temperature_policy": "constant", "seed": seed}
        return {
            **fields,
            "cell": cell,
            "train_seed": seed,
            "family": "fixed",
            "overrides": overrides,
            "rouge_l": scores,
            "final_temperature": temperature,
            "mean_temperature": temperature,
        }

    kd = [row("kd", 1, 30.0, 0.2, 1.0), row("kd", 2, 34.0, 0.4, 1.0)]
    hot = [row("hot", 1, 33.0, 0.6, 4.0), row("hot", 2, 36.0, 0.8, 4.0)]
    cells = {cell["run"]: cell for cell in cell_rows(kd + hot)}
    assert list(cells) == ["kd", "hot"] and cells["hot"]["train_seeds"] == [1, 2]
    assert cells["hot"]["rouge_l"]["test"] == {
        "mean": 34.5,
        "std": 1.5,
        "per_seed": {"1": 33.0, "2": 36.0},
        "count": 5,
        "sampling_std": pytest.approx(0.7),
    }
    # The seeds move both alike: 34.5 ± 1.5 against 32 ± 2 is +3 and +2 paired, 2.5 ± 0.5.
    assert cells["hot"]["paired"] == {"vs": "kd", "test": {"mean": 2.5, "std": 0.5}}
    assert cells["kd"]["paired"] == {"vs": "kd", "test": {"mean": 0.0, "std": 0.0}}
    assert cells["hot"]["overrides"] == {"temperature_policy": "constant"} and cells["hot"]["mean_temperature"] == 4.0


def test_changed_training_settings_are_refused_naming_what_differs(sweep):
    recipe, output = sweep
    before = (output / "fixed-T1" / "model.safetensors").stat().st_mtime_ns
    with pytest.raises(ValueError, match=r"fixed-T1 \(differs in overrides\)"):
        main(["sweep", recipe, *GRID, "--output", str(output), "--learning_rate", "0.001"])
    assert (output / "fixed-T1" / "model.safetensors").stat().st_mtime_ns == before


def test_a_rerun_skips_finished_runs_and_redoes_a_deleted_one(sweep, capsys):
    import shutil

    recipe, output = sweep
    capsys.readouterr()
    kept = [name for name in RUNS if name != "fixed-T4"]
    mtimes = {name: (output / name / "model.safetensors").stat().st_mtime_ns for name in kept}
    shutil.rmtree(output / "fixed-T4")
    assert main(["sweep", recipe, *GRID, "--output", str(output)]) == 0
    printed = capsys.readouterr().out
    for name in kept:
        assert (output / name / "model.safetensors").stat().st_mtime_ns == mtimes[name], name
        assert f"{name}: skipped (already trained)" in printed and f"{name}: skipped (already evaluated)" in printed
    assert "fixed-T4: trained" in printed and "fixed-T4: evaluated" in printed
    assert (output / "fixed-T4" / "eval" / "results.json").is_file()
    assert list(sweep_rows(output)) == RUNS


def test_a_sweep_from_the_teacher_cache_runs_the_teacher_once_and_trains_as_the_live_sweep(sweep, capsys, monkeypatch):
    import yaml

    import dts_llm.commands.sweep
    import dts_llm.commands.sweep_cache

    recipe, output = sweep
    cache, cached = output.parent / "teacher-cache", output.parent / "cached-sweep"
    # One run (each run is a child process): DTS, whose temperature reads the teacher's CE from the cache.
    grid = ["--families", "dts", "--dts", "3:1", "--eval-seeds", "1", "--eval-limit", "1"]
    command = ["sweep", recipe, *grid, "--teacher-cache", str(cache), "--output", str(cached)]
    assert main(command) == 0
    assert f"[teacher cache] {cache}: written" in capsys.readouterr().out
    written = {path.name: path.stat().st_mtime_ns for path in cache.iterdir()}
    # A re-run reuses the cache as it is (cache-teacher, run here in-process, finds it finished) and trains nothing.
    monkeypatch.setattr(dts_llm.commands.sweep_cache, "run_in_child", lambda name, argv, *_: main([name, *argv]))
    monkeypatch.setattr(dts_llm.commands.sweep, "train_in_child", lambda *_: pytest.fail("a run trained again"))
    assert main(command) == 0
    printed = capsys.readouterr().out
    assert f"[teacher cache] {cache}: reused (already written)" in printed and "reused as it was" in printed
    assert {path.name: path.stat().st_mtime_ns for path in cache.iterdir()} == written
    resolved = yaml.safe_load((cached / "dts-T3-1" / "dts_llm_config.yaml").read_text())
    assert resolved["teacher_cache"] == str(cache) and resolved["teacher_cache_kind"] == "exact"
    assert sweep_rows(cached)["dts-T3-1"]["teacher_cache"] == str(cache)
    assert sweep_rows(output)["dts-T3-1"]["teacher_cache"] is None
    mine, live = (json.loads((folder / "dts-T3-1" / "trajectory.json").read_text()) for folder in (cached, output))
    assert [step["step"] for step in mine] == [step["step"] for step in live] == [1, 2, 3, 4]
    for key in ("temperature", "kd_loss", "ce_loss"):
        assert [step[key] for step in mine] == pytest.approx([step[key] for step in live], rel=1e-4), key
    # 40 records, dev_num 4: the teacher ran over 36 + 4 examples once; a live teacher would have run over the
    # run's 4 steps x 4 examples and, at its one evaluation, the 4 validation examples.
    assert json.loads((cached / "sweep.json").read_text())["teacher_cache"] == {
        "folder": str(cache),
        "kind": "exact",
        "teacher_examples": {"train": 36, "validation": 4, "total": 40},
        "live_teacher_examples": {"train": 16, "validation": 4, "total": 20},
    }
    table = (cached / "sweep.md").read_text()
    assert f"from the exact teacher cache {cache}: the teacher ran over 40 examples (36 train, 4 validation)" in table


def test_a_compact_cache_is_refused_for_a_grid_with_a_run_it_cannot_serve(workspace, tmp_path, capsys):
    from dts_llm.commands.sweep_cache import sweep_cache

    _, recipe = workspace
    options = ["--teacher-cache", str(tmp_path / "cache"), "--teacher-cache-kind", "compact"]
    assert (
        main(["sweep", recipe, "--families", "fixed,ctkd-instance", *options, "--output", str(tmp_path / "out")]) == 2
    )
    err = capsys.readouterr().err
    assert (
        "compact cache cannot serve the runs ctkd-instance (CTKD's instance temperature" in err and "fixed" not in err
    )
    assert not (tmp_path / "out").exists() and not (tmp_path / "cache").exists()
    # A grid it serves: one cache normalising over every run's T (widened to T = 1).
    cache = sweep_cache(str(tmp_path / "cache"), "compact", build_grid(["fixed", "dts"], [4.0, 8.0], [(3.0, 2.0)]))
    assert cache.flags[-4:] == ("--teacher_cache_temperature_min", "1", "--teacher_cache_temperature_max", "8")
    exact = [*options[:2], "--output", str(tmp_path / "out"), "--teacher_cache", "x"]
    assert main(["sweep", recipe, "--families", "fixed", *exact]) == 2
    assert "--teacher_cache: the sweep sets it for each run; give --teacher-cache" in capsys.readouterr().err


@pytest.mark.parametrize(
    "options, named",
    [
        (["--fixed", "1,0"], "--fixed"),
        (["--dts", "1:3"], "--dts"),
        (["--cosine", "3-1"], "--cosine"),
        (["--families", "fixed,warm"], "--families"),
    ],
)
def test_invalid_grid_options_fail_before_training(workspace, tmp_path, capsys, options, named):
    _, recipe = workspace
    with pytest.raises(SystemExit):
        main(["sweep", recipe, *options, "--output", str(tmp_path / "out")])
    assert f"argument {named}" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "overrides, named",
    [
        (["--temperature_init", "2"], "--temperature_init"),
        (["--temperature_policy", "cosine"], "--temperature_policy"),
        (["--learning_rat", "0.1"], "--learning_rat"),
        (["--kd_ratio", "2"], "kd_ratio"),
    ],
)
def test_invalid_overrides_fail_before_training(workspace, tmp_path, capsys, overrides, named):
    _, recipe = workspace
    assert (
        main(["sweep", recipe, "--families", "fixed", "--fixed", "2", "--output", str(tmp_path / "out"), *overrides])
        == 2
    )
    err = capsys.readouterr().err
    assert err.startswith("dts-llm: error: ") and named in err
    assert not (tmp_path / "out").exists()


def test_the_validation_data_of_a_folder_of_split_files_is_its_validation_file(tmp_path):
    from dts_llm.commands.sweep_eval import default_suites
    from dts_llm.data import DataArguments
    from dts_llm.errors import UserError

    for name in ("train.jsonl", "validation.jsonl", "test.jsonl"):
        (tmp_path / name).write_text('{"instruction": "a", "response": "b"}\n')
    assert default_suites(DataArguments(dataset=str(tmp_path)), None) == (
        {"validation": str(tmp_path / "validation.jsonl")},
        None,
    )
    given = DataArguments(dataset=str(tmp_path / "train.jsonl"), validation_file=str(tmp_path))
    assert default_suites(given, 5) == ({"validation": str(tmp_path / "validation.jsonl")}, 5)
    (tmp_path / "dev.jsonl").write_text('{"instruction": "a", "response": "b"}\n')
    with pytest.raises(UserError, match=r"dev.jsonl, validation.jsonl as validation files, not one"):
        default_suites(DataArguments(dataset=str(tmp_path)), None)
