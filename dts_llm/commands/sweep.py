"""`dts-llm sweep`: one distillation recipe trained under a grid of temperature settings, then compared.

Every run of the grid (``sweep_grid``) is a name and the recipe fields it overrides (``{"temperature_policy":
"constant", "temperature_init": 4.0}``); everything else (data, steps, seed, models) comes from the same recipe
and command-line overrides, so the runs differ in their temperature only. Stages, in order:

    check everything -> [cache the teacher] -> train each run -> evaluate each run -> table, plots, trajectories

Training runs ``python -m dts_llm distill`` in a child process per run (``train.train_in_child``, behind
``--launcher``, e.g. ``accelerate launch --config_file ...``): the same code path as ``dts-llm distill``, a
fresh process (GPU memory, seeds, process groups) for every run, and multi-GPU training without a second
code path. With ``--teacher-cache`` the teacher runs once before the runs, into a cache that every run reads
(``sweep_cache``). Evaluation runs here with the eval package (``sweep_eval``), after all training, on one
device.

Layout of the sweep's output folder::

    <run>/                  the run's output_dir: model, tokenizer, dts_llm_config.yaml, train.log,
                            trainer_state.json (the CLI writes it last: it marks a finished training)
    <run>/run.json          the run's training and evaluation settings, compared on a re-run
    <run>/eval/             eval.run.evaluate_model's output; its results.json marks a finished evaluation
    <run>/trajectory.json   temperature, kd_loss and ce_loss per logged step (also trajectory.csv)
    sweep.json, sweep.md    one row per run (and, with a teacher cache, the teacher's examples cached vs live)
    cache-teacher.log       the cache-teacher child's output (with --teacher-cache)
    rouge_l.png             ROUGE-L against T for the fixed runs, the other runs as reference lines
    trajectories.png        temperature, KD loss and CE loss over steps for every run

A re-run skips every finished stage of every run and trains a half-trained run again from its start.
A run trained with other settings (recipe, overrides, launcher, teacher cache) is refused, naming what differs; a run
evaluated with other settings is evaluated again.
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import time
from dataclasses import asdict, fields
from pathlib import Path

import yaml

from eval.results import write_json_atomic, write_text_atomic
from eval.run import DEFAULT_SEEDS

from ..data import DataArguments
from ..errors import UserError
from ..models import check_models
from ..options import comma_separated
from ..recipe import ModelArguments, parse_recipe, recipe_flags, recipe_parser
from .sweep_cache import (
    CACHE_FIELDS,
    KINDS,
    LOG_NAME,
    SweepCache,
    cache_note,
    sweep_cache,
    teacher_examples,
    write_cache,
)
from .sweep_eval import Evaluation, check_suites, default_suites, evaluate_run, json_normal, parse_suites
from .sweep_grid import (
    DEFAULT_COSINE,
    DEFAULT_DTS,
    DEFAULT_FAMILIES,
    DEFAULT_FIXED,
    FAMILIES,
    Run,
    build_grid,
    parse_families,
    parse_ranges,
    parse_temperatures,
)
from .sweep_report import (
    cell_rows,
    plot_metric,
    plot_trajectories,
    result_row,
    sweep_table,
    trajectory,
    write_trajectory,
)
from .train import TRAINED_MARK, train_in_child

# Fields every grid sets (a temperature field under its old name too), besides those its runs override.
GRID_FIELDS = (
    "temperature_policy",
    "temperature",
    "temperature_init",
    "temperature_min",
    "temperature_max",
    "output_dir",
)


def distill_arguments(recipe: str, overrides: list[str], run: Run) -> list[str]:
    """`dts-llm distill`'s arguments for ``run`` (but its output_dir): its fields come after the user's overrides."""
    flags = [item for key, value in run.overrides.items() for item in (f"--{key}", str(value))]
    return [recipe, *overrides, *flags]


def _differences(stored: dict, wanted: dict) -> list[str]:
    """The keys (``recipe.<field>`` inside the recipe) whose values differ."""
    keys = []
    for key in sorted(stored.keys() | wanted.keys()):
        old, new = stored.get(key), wanted.get(key)
        if isinstance(old, dict) and isinstance(new, dict):
            keys += [f"{key}.{field}" for field in sorted(old.keys() | new.keys()) if old.get(field) != new.get(field)]
        elif old != new:
            keys.append(key)
    return keys


def check_overrides(overrides: list[str], runs: list[Run], cached: bool = False) -> None:
    """Refuse command-line overrides of the fields the grid sets for its runs (and, with a teacher cache, the
    cache's fields)."""
    grid_fields = {*GRID_FIELDS, *(name for run in runs for name in run.overrides)}
    for flag in overrides:
        name = flag.removeprefix("--").split("=", 1)[0]
        if flag.startswith("--") and (name in grid_fields or (cached and name in CACHE_FIELDS)):
            hint = {
                "output_dir": "give --output for the sweep's folder",
                "seed": "give --train-seeds",
            }.get(name, "give --teacher-cache and --teacher-cache-kind" if name in CACHE_FIELDS else "")
            raise UserError(
                f"--{name}: the sweep sets it for each run; {hint or 'choose the grid with --families etc.'}"
            )


def check_runs(
    recipe: str, overrides: list[str], runs: list[Run], output: Path, launched: bool, cache: SweepCache | None = None
):
    """Parse every run's arguments as `dts-llm distill` will (with the flags naming ``cache``), so unknown
    fields, invalid values and missing models fail before any training; return the recipe's data arguments.

    Under a ``launcher`` the training arguments are checked for their names and types only: building
    them sets up the process group their ``ddp_backend`` asks for, which only the launched processes
    have (the first run then checks the rest before it trains)."""
    if not runs:
        raise UserError("--families: the grid is empty")
    check_overrides(overrides, runs, cached=cache is not None)
    for run in runs:
        argv = [
            *distill_arguments(recipe, run_overrides(overrides, cache), run),
            "--output_dir",
            str(output / run.name),
        ]
        model_args, data_args = _model_and_data_arguments(argv) if launched else _parse_all(argv)
    if data_args.glue_task is not None:
        raise UserError(f"glue_task: the sweep scores ROUGE-L; {recipe} distils GLUE {data_args.glue_task}")
    check_models(model_args, data_args.max_length)
    return data_args


def _parse_all(argv: list[str]):
    model_args, data_args, _, _ = parse_recipe("distill", argv)
    return model_args, data_args


def _model_and_data_arguments(argv: list[str]):
    """Model and data arguments of `dts-llm distill ARGV`, every flag checked by name and type, without
    building the training arguments."""
    parser = recipe_parser("distill")
    namespace, unknown = parser.parse_known_args(recipe_flags(argv[0], parser) + argv[1:])
    if unknown:
        raise ValueError(f"Some specified arguments are not used by the HfArgumentParser: {unknown}")
    return tuple(
        kind(**{f.name: getattr(namespace, f.name) for f in fields(kind) if f.init})
        for kind in (ModelArguments, DataArguments)
    )


def run_overrides(overrides: list[str], cache: SweepCache | None) -> list[str]:
    """Every run's overrides: the user's, then the flags that name the teacher cache."""
    return [*overrides, *cache.flags] if cache is not None else overrides


def training_settings(
    recipe: str, overrides: list[str], run: Run, launcher: str | None, cache: SweepCache | None = None
) -> dict:
    """What a run's trained model depends on: the recipe's fields (its output_dir aside), the overrides,
    the launcher (the number of processes changes the global batch) and the teacher cache's flags."""
    with open(recipe) as f:
        recipe_fields = yaml.safe_load(f) or {}
    recipe_fields.pop("output_dir", None)
    teacher_cache = list(cache.flags) if cache is not None else None
    return json_normal(
        {
            "recipe": recipe_fields,
            "overrides": overrides,
            "run": run.overrides,
            "launcher": launcher,
            "teacher_cache": teacher_cache,
        }
    )


def check_trained_settings(runs: list[Run], wanted: dict[str, dict], output: Path) -> None:
    """Refuse to continue a sweep whose existing runs were trained with other settings."""
    refused = []
    for run in runs:
        record = output / run.name / "run.json"
        if record.is_file():
            differences = _differences(json.loads(record.read_text())["training"], wanted[run.name])
            if differences:
                refused.append(f"{output / run.name} (differs in {', '.join(differences)})")
    if refused:
        raise ValueError(
            "these runs were trained with other settings: "
            + "; ".join(refused)
            + ". Delete them to train them again with these settings, or give another --output"
        )


def train_run(
    run: Run, recipe: str, overrides: list[str], launcher: list[str] | None, folder: Path, settings: dict
) -> bool:
    """Train ``run`` in a child process unless it has finished; True when it trained."""
    if (folder / TRAINED_MARK).is_file():
        return False
    if folder.exists():
        shutil.rmtree(folder)  # a half-trained run starts again
    folder.mkdir(parents=True)
    (folder / "run.json").write_text(json.dumps({"name": run.name, "training": settings}, indent=1))
    train_in_child("distill", distill_arguments(recipe, overrides, run), folder, launcher)
    return True


def _progress(text: str, start: float) -> None:
    print(f"{text} [{time.time() - start:.0f}s]", flush=True)


def run_sweep(
    recipe: str,
    overrides: list[str],
    runs: list[Run],
    output: str,
    eval_data: dict[str, str] | None = None,
    seeds=DEFAULT_SEEDS,
    greedy: bool = False,
    eval_limit: int | None = None,
    eval_batch_size: int = 8,
    launcher: str | None = None,
    teacher_cache: str | None = None,
    teacher_cache_kind: str = KINDS[0],
) -> dict:
    """Train, evaluate and compare ``runs`` of ``recipe`` (plus ``overrides``, `--field value` flags) in
    ``output``; return what sweep.json holds. ``launcher`` prefixes ``-m dts_llm distill`` (default:
    this Python). With ``teacher_cache`` (a folder) the teacher runs once, into a cache of
    ``teacher_cache_kind`` that every run reads."""
    out = Path(output)
    start = time.time()
    cache = sweep_cache(teacher_cache, teacher_cache_kind, runs) if teacher_cache is not None else None
    data_args = check_runs(recipe, overrides, runs, out, launched=launcher is not None, cache=cache)
    suites, limit = (eval_data, eval_limit) if eval_data else default_suites(data_args, eval_limit)
    lengths = (data_args.max_length, data_args.max_prompt_length)
    evaluation = Evaluation(suites, tuple(seeds), greedy, limit, eval_batch_size, *lengths)
    evaluation.generation_settings()  # raises for lengths generation cannot use
    check_suites(evaluation)
    settings = {run.name: training_settings(recipe, overrides, run, launcher, cache) for run in runs}
    check_trained_settings(runs, settings, out)

    prefix = shlex.split(launcher) if launcher else None
    if cache is not None:
        written = write_cache(cache, recipe, overrides, prefix, out / LOG_NAME)
        _progress(f"[teacher cache] {cache.folder}: {'written' if written else 'reused (already written)'}", start)
    for index, run in enumerate(runs, 1):
        trained = train_run(run, recipe, run_overrides(overrides, cache), prefix, out / run.name, settings[run.name])
        _progress(
            f"[train {index}/{len(runs)}] {run.name}: {'trained' if trained else 'skipped (already trained)'}", start
        )
    for index, run in enumerate(runs, 1):
        evaluated = evaluate_run(out / run.name, evaluation)
        _progress(
            f"[eval {index}/{len(runs)}] {run.name}: {'evaluated' if evaluated else 'skipped (already evaluated)'}",
            start,
        )

    trajectories, rows = {}, []
    for run in runs:
        steps = trajectories[run.name] = trajectory(out / run.name)
        write_trajectory(out / run.name, steps)
        rows.append(result_row(run, out / run.name, steps))
    cells = cell_rows(rows) if any(run.cell != run.name for run in runs) else None
    table = (
        sweep_table(cells, evaluation) + "\nPer run:\n\n" + sweep_table(rows, evaluation)
        if cells
        else sweep_table(rows, evaluation)
    )
    teacher = teacher_examples(cache, [out / run.name for run in runs]) if cache is not None else None
    table += cache_note(teacher) if teacher is not None else ""
    result = {
        "recipe": recipe,
        "overrides": overrides,
        "launcher": launcher,
        "evaluation": json_normal(asdict(evaluation)),
        "teacher_cache": teacher,
        "runs": rows,
        **({"cells": cells} if cells else {}),
    }
    write_json_atomic(out / "sweep.json", result)
    write_text_atomic(out / "sweep.md", table)
    plot_metric(cells or rows, list(suites), out / "rouge_l.png")
    plot_trajectories(runs, trajectories, out / "trajectories.png")
    print(f"\n{table}", flush=True)
    _progress(f"report: sweep.md, sweep.json, rouge_l.png, trajectories.png in {out}", start)
    return result


def add_parser(commands) -> argparse.ArgumentParser:
    """`dts-llm sweep`'s options; the --field value flags after them are recipe overrides."""
    parser = commands.add_parser(
        "sweep",
        allow_abbrev=False,  # a recipe flag such as --eval_steps must not pass for a sweep option
        help="Distil a recipe under a grid of temperatures, evaluate, compare: "
        "dts-llm sweep RECIPE.yaml [options] [--field value ...]",
    )
    parser.add_argument(
        "recipe", help="A distillation recipe; --field value flags after the options override it for every run."
    )
    parser.add_argument(
        "--families",
        type=parse_families,
        default=list(DEFAULT_FAMILIES),
        help=f"From {', '.join(FAMILIES)} (default: fixed,dts,ctkd).",
    )
    parser.add_argument("--fixed", type=parse_temperatures, default=list(DEFAULT_FIXED), help="default 1,2,4,8,16,32")
    parser.add_argument(
        "--dts", type=parse_ranges, default=list(DEFAULT_DTS), help="T_max:T_min pairs, default 3:1,4:2,8:4"
    )
    parser.add_argument(
        "--cosine", type=parse_ranges, default=list(DEFAULT_COSINE), help="T_max:T_min pairs, default 3:1"
    )
    parser.add_argument(
        "--train-seeds",
        type=comma_separated(int, "seeds", unique=True),
        help="Train every cell of the grid once per seed (e.g. 10,20,30); the table reports the spread over them.",
    )
    parser.add_argument("--eval-data", type=parse_suites, help="NAME=PATH,... (default: the recipe's validation data)")
    parser.add_argument(
        "--eval-seeds", type=comma_separated(int, "seeds"), default=list(DEFAULT_SEEDS), help="default 10,20,30,40,50"
    )
    parser.add_argument("--greedy", action="store_true", help="One greedy pass instead of sampling per seed.")
    parser.add_argument("--eval-limit", type=int, help="Only the first N examples of each suite.")
    parser.add_argument("--eval-batch-size", type=int, default=8)
    parser.add_argument(
        "--launcher",
        help='Replaces python in "python -m dts_llm distill ...", e.g. "accelerate launch --config_file X".',
    )
    parser.add_argument(
        "--teacher-cache",
        metavar="FOLDER",
        help="Run the teacher once into a cache in FOLDER (or reuse a finished one there); every run reads it.",
    )
    parser.add_argument(
        "--teacher-cache-kind", choices=KINDS, default=KINDS[0], help="exact (default; serves every run) or compact."
    )
    parser.add_argument(
        "--output", default="sweep_output", help="Folder of the runs and the report (default: sweep_output)."
    )
    return parser


def main(args: argparse.Namespace, overrides: list[str]) -> None:
    """`dts-llm sweep` with its parsed options and the recipe overrides that followed them."""
    run_sweep(
        args.recipe,
        overrides,
        build_grid(args.families, args.fixed, args.dts, args.cosine, args.train_seeds),
        args.output,
        eval_data=args.eval_data,
        seeds=args.eval_seeds,
        greedy=args.greedy,
        eval_limit=args.eval_limit,
        eval_batch_size=args.eval_batch_size,
        launcher=args.launcher,
        teacher_cache=args.teacher_cache,
        teacher_cache_kind=args.teacher_cache_kind,
    )
