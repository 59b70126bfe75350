"""`dts-llm study`: the temperature policies compared on one recipe, each trained over several seeds.

A `dts-llm sweep` over the study's grid: constant T = 1 and T = 4 with forward KL, reverse KL at T = 1,
cosine, DTS and its variants (the paper's sign, per sequence, per token), AdaKD and CTKD, every cell trained
once per training seed, so the table's spread is over training runs and not only over sampling seeds.
Without a recipe it runs on the quickstart's data, teacher and student (the quickstart's first four stages,
reused from its folder when they are done there). ``--families dts,on-policy,seq-kd`` compares off-policy,
on-policy and sequence-level KD + DTS instead.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import yaml

from ..options import comma_separated
from .quickstart import DTS, prepare_teacher
from .sweep import run_sweep
from .sweep_grid import DEFAULT_COSINE, DEFAULT_DTS, build_grid, parse_families

STUDY_FAMILIES = ("fixed", "reverse-kl", "cosine", "dts", "dts-paper", "dts-sequence", "dts-token", "adakd", "ctkd")
STUDY_FIXED = (1.0, 4.0)  # vanilla KD, and the constant high T of arXiv 2606.00306
DEFAULT_TRAIN_SEEDS = (10, 20, 30)
# The quickstart student's DTS settings; CTKD as the quickstart trains it (its adversarial weight ramped up
# over the first epoch). The grid sets each run's policy and range; the sweep keeps no checkpoints.
QUICKSTART_STUDENT = {**DTS, "ctkd_lambda_epochs": 1.0, "ctkd_learning_rate": 0.01, "save_strategy": "no"}


def quickstart_recipe(quickstart: str, fast: bool, output: Path) -> tuple[str, dict[str, str], tuple[int, ...]]:
    """The quickstart student's distillation recipe (written to ``output``), its test split and sampling seeds."""
    teacher = prepare_teacher(quickstart, fast, time.time())
    recipe = teacher.student_recipe("study", QUICKSTART_STUDENT)
    recipe.pop("output_dir")  # each run's folder is the sweep's
    output.mkdir(parents=True, exist_ok=True)
    path = output / "study-recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return str(path), {"test": str(teacher.data / "test.jsonl")}, teacher.settings.seeds


def run_study(
    recipe: str | None,
    overrides: list[str],
    output: str,
    families=STUDY_FAMILIES,
    train_seeds=DEFAULT_TRAIN_SEEDS,
    quickstart: str = "quickstart_output",
    fast: bool = False,
    eval_limit: int | None = None,
) -> dict:
    """Train and compare ``families`` on ``recipe`` (default: the quickstart's student) once per training seed."""
    eval_data, sampling_seeds = None, None
    if recipe is None:
        recipe, eval_data, sampling_seeds = quickstart_recipe(quickstart, fast, Path(output))
    grid = build_grid(list(families), STUDY_FIXED, DEFAULT_DTS[:1], DEFAULT_COSINE, list(train_seeds))
    options = {"eval_data": eval_data, "eval_limit": eval_limit}
    if sampling_seeds is not None:
        options.update(seeds=sampling_seeds, eval_batch_size=20)
    return run_sweep(recipe, overrides, grid, output, **options)


def add_parser(commands) -> argparse.ArgumentParser:
    parser = commands.add_parser(
        "study",
        allow_abbrev=False,
        help="Compare the temperature policies on a recipe (default: the quickstart's) over several training seeds.",
    )
    parser.add_argument("--recipe", help="A distillation recipe (default: the quickstart's student).")
    parser.add_argument(
        "--families",
        type=parse_families,
        default=list(STUDY_FAMILIES),
        help=f"default {','.join(STUDY_FAMILIES)}; dts,on-policy,seq-kd compares on-policy and sequence-level KD",
    )
    parser.add_argument(
        "--train-seeds",
        type=comma_separated(int, "seeds", unique=True),
        default=list(DEFAULT_TRAIN_SEEDS),
        help="default 10,20,30",
    )
    parser.add_argument(
        "--quickstart", default="quickstart_output", help="The quickstart's folder (without a recipe)."
    )
    parser.add_argument("--fast", action="store_true", help="The quickstart's --fast data and models.")
    parser.add_argument("--eval-limit", type=int, help="Only the first N evaluation examples.")
    parser.add_argument("--output", default="study_output", help="Folder of the runs and the report.")
    return parser  # the --field value flags after these options override the recipe for every run


def main(args: argparse.Namespace, overrides: list[str]) -> None:
    run_study(
        args.recipe,
        overrides,
        args.output,
        args.families,
        args.train_seeds,
        args.quickstart,
        args.fast,
        args.eval_limit,
    )
