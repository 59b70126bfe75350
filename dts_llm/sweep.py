"""`dts-llm sweep`: one distillation recipe trained under a grid of temperature settings, then compared.

Every run of the grid is a name and the recipe fields it overrides (``{"temperature_policy": "constant",
"temperature_init": 4.0}``); everything else (data, steps, seed, models) comes from the same recipe
and command-line overrides, so the runs differ in their temperature only. Stages, in order:

    check everything -> train each run -> evaluate each run -> table, plots, trajectories

Training runs ``python -m dts_llm distill`` in a child process per run (behind ``--launcher``, e.g.
``accelerate launch --config_file ...``): the same code path as ``dts-llm distill``, a fresh process
(GPU memory, seeds, process groups) for every run, and multi-GPU training without a second code
path. Evaluation runs here with the eval package, after all training, on one device.

Layout of the sweep's output folder::

    <run>/                  the run's output_dir: model, tokenizer, dts_llm_config.yaml, train.log,
                            trainer_state.json (the CLI writes it last: it marks a finished training)
    <run>/run.json          the run's training and evaluation settings, compared on a re-run
    <run>/eval/             eval.run.evaluate_model's output; its results.json marks a finished evaluation
    <run>/trajectory.json   temperature, kd_loss and ce_loss per logged step (also trajectory.csv)
    sweep.json, sweep.md    one row per run
    rouge_l.png             ROUGE-L against T for the fixed runs, the other runs as reference lines
    trajectories.png        temperature, KD loss and CE loss over steps for every run

A re-run skips every finished stage of every run and trains a half-trained run again from its start.
A run trained with other settings (recipe, overrides, launcher) is refused, naming what differs; a run
evaluated with other settings is evaluated again.
"""

from __future__ import annotations

import argparse
import csv
import json
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import yaml

from .data import split_files
from .errors import UserError

FAMILIES = ("fixed", "dts", "cosine", "ctkd", "ctkd-instance")
DEFAULT_FAMILIES = ("fixed", "dts", "ctkd")
LEARNED_FAMILIES = {"ctkd": "ctkd", "ctkd-instance": "ctkd_instance"}  # family -> temperature policy
DEFAULT_FIXED = (1.0, 2.0, 4.0, 8.0, 16.0, 32.0)
DEFAULT_DTS = ((3.0, 1.0), (4.0, 2.0), (8.0, 4.0))  # (T_max, T_min)
DEFAULT_COSINE = ((3.0, 1.0),)
DEFAULT_SEEDS = (10, 20, 30, 40, 50)  # eval.run.DEFAULT_SEEDS (MiniLLM's); eval is imported only when it runs
GRID_FIELDS = ("temperature_policy", "temperature", "temperature_init", "temperature_min", "temperature_max", "output_dir")
TRAINED_MARK = "trainer_state.json"
LINE_STYLES = {"fixed": "-", "dts": "--", "cosine": ":", "ctkd": "-.", "ctkd-instance": (0, (5, 1, 1, 1))}


@dataclass(frozen=True)
class Run:
    """One cell of the grid: its folder name, family, a label for the table, and its recipe fields."""

    name: str
    family: str
    settings: str
    overrides: dict


def parse_families(text: str) -> list[str]:
    """An argparse type: comma-separated family names, each known."""
    families = list(dict.fromkeys(part.strip() for part in text.split(",") if part.strip()))
    unknown = [family for family in families if family not in FAMILIES]
    if unknown or not families:
        raise argparse.ArgumentTypeError(f"unknown family {unknown or text!r}; choose from {', '.join(FAMILIES)}")
    return families


def parse_temperatures(text: str) -> list[float]:
    """An argparse type: comma-separated positive temperatures, e.g. 1,2,4."""
    try:
        values = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated temperatures, got {text!r}") from None
    if not values or any(not value > 0 for value in values):
        raise argparse.ArgumentTypeError(f"temperatures must be positive, got {text!r}")
    return list(dict.fromkeys(values))


def parse_ranges(text: str) -> list[tuple[float, float]]:
    """An argparse type: comma-separated T_max:T_min pairs, e.g. 3:1,8:4."""
    pairs = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        try:
            t_max, t_min = (float(value) for value in part.split(":"))
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected T_max:T_min pairs such as 3:1, got {part!r}") from None
        if not t_min > 0:
            raise argparse.ArgumentTypeError(f"T_min must be positive, got {part!r}")
        if t_min > t_max:
            raise argparse.ArgumentTypeError(f"T_min exceeds T_max in {part!r}; write T_max:T_min")
        pairs.append((t_max, t_min))
    if not pairs:
        raise argparse.ArgumentTypeError(f"no T_max:T_min pair in {text!r}")
    return list(dict.fromkeys(pairs))


def build_grid(
    families: list[str],
    fixed=DEFAULT_FIXED,
    dts=DEFAULT_DTS,
    cosine=DEFAULT_COSINE,
) -> list[Run]:
    """The runs of ``families``, in that order. DTS starts at its T_max (temperature_init = T_max)."""
    runs = []
    for family in families:
        if family == "fixed":
            for t in fixed:
                runs.append(Run(f"fixed-T{t:g}", family, f"T = {t:g}", {"temperature_policy": "constant", "temperature_init": t}))
        elif family in ("dts", "cosine"):
            for t_max, t_min in dts if family == "dts" else cosine:
                fields = {"temperature_min": t_min, "temperature_max": t_max}
                if family == "dts":
                    fields["temperature_init"] = t_max
                name, label = f"{family}-T{t_max:g}-{t_min:g}", f"T {t_max:g} -> {t_min:g}"
                runs.append(Run(name, family, label, {"temperature_policy": family, **fields}))
        else:
            runs.append(Run(family, family, "learned T", {"temperature_policy": LEARNED_FAMILIES[family]}))
    return runs


@dataclass(frozen=True)
class Evaluation:
    """How every run is scored: ROUGE-L on ``suites`` ({name: source}), sampled per seed or greedy."""

    suites: dict
    seeds: tuple[int, ...]
    greedy: bool
    limit: int | None
    batch_size: int
    max_length: int
    max_prompt_tokens: int

    def generation_settings(self):
        from eval.generate import GenerationSettings

        return GenerationSettings(
            max_length=self.max_length,
            max_prompt_tokens=self.max_prompt_tokens,
            greedy=self.greedy,
            batch_size=self.batch_size,
        )


def parse_suites(text: str) -> dict[str, str]:
    """An argparse type: comma-separated NAME=PATH (or PATH, named by its file name)."""
    suites = {}
    for part in (p.strip() for p in text.split(",") if p.strip()):
        name, sep, source = part.partition("=")
        source = source if sep else name
        suites[name.strip() if sep else Path(source).stem] = source.strip()
    if not suites:
        raise argparse.ArgumentTypeError(f"no evaluation data in {text!r}")
    return suites


def default_suites(data_args, limit: int | None) -> tuple[dict[str, str], int | None]:
    """The recipe's validation data as the suite "validation": its validation_file, or the first dev_num
    records of a local dataset (the records training held out); and the example limit that implies. Of a
    folder of split files (``data.split_files``), its one validation file is that data."""
    if data_args.validation_file:
        return {"validation": _validation_file(data_args.validation_file)}, limit
    folder = Path(data_args.dataset)
    splits = split_files(folder) if folder.is_dir() else None
    if splits and splits["validation"]:
        return {"validation": _validation_file(data_args.dataset)}, limit
    if data_args.dev_num and Path(data_args.dataset).is_file():
        return {"validation": data_args.dataset}, min(limit or data_args.dev_num, data_args.dev_num)
    raise UserError(
        "--eval-data: the recipe has no validation data the sweep can read (no validation_file, and dataset "
        "is not a local file with dev_num held out); give --eval-data NAME=PATH"
    )


def _validation_file(source: str) -> str:
    """``source``, or the validation file of ``source`` when it is a folder of split files."""
    folder = Path(source)
    splits = split_files(folder) if folder.is_dir() else None
    if not splits:
        return source
    if len(splits["validation"]) != 1:
        names = ", ".join(file.name for file in splits["validation"]) or "none"
        raise UserError(f"--eval-data: {folder} has {names} as validation files, not one; give --eval-data NAME=PATH")
    return str(splits["validation"][0])


def distill_arguments(recipe: str, overrides: list[str], run: Run, folder: Path) -> list[str]:
    """`dts-llm distill`'s arguments for ``run``: its fields come after the user's overrides."""
    fields = [item for key, value in run.overrides.items() for item in (f"--{key}", str(value))]
    return [recipe, *overrides, *fields, "--output_dir", str(folder)]


def _json_normal(obj):
    """``obj`` as it reads back from JSON (tuples as lists), so stored and wanted settings compare equal."""
    return json.loads(json.dumps(obj))


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


def check_overrides(overrides: list[str]) -> None:
    """Refuse command-line overrides of the fields the grid sets for each run."""
    for flag in overrides:
        name = flag.removeprefix("--").split("=", 1)[0]
        if flag.startswith("--") and name in GRID_FIELDS:
            hint = "give --output for the sweep's folder" if name == "output_dir" else "choose the grid with --families etc."
            raise UserError(f"--{name}: the sweep sets it for each run; {hint}")


def check_runs(recipe: str, overrides: list[str], runs: list[Run], output: Path, launched: bool):
    """Parse every run's arguments as `dts-llm distill` will, so unknown fields, invalid values and missing
    models fail before any training; return the recipe's data arguments.

    Under a ``launcher`` the training arguments are checked for their names and types only: building
    them sets up the process group their ``ddp_backend`` asks for, which only the launched processes
    have (the first run then checks the rest before it trains)."""
    from .cli import check_models

    if not runs:
        raise UserError("--families: the grid is empty")
    check_overrides(overrides)
    for run in runs:
        argv = distill_arguments(recipe, overrides, run, output / run.name)
        model_args, data_args = _model_and_data_arguments(argv) if launched else _parse_all(argv)
    if data_args.glue_task is not None:
        raise UserError(f"glue_task: the sweep scores ROUGE-L; {recipe} distils GLUE {data_args.glue_task}")
    check_models(model_args, data_args.max_length)
    return data_args


def _parse_all(argv: list[str]):
    from .recipe import parse_recipe

    model_args, data_args, _, _ = parse_recipe("distill", argv)
    return model_args, data_args


def _model_and_data_arguments(argv: list[str]):
    """Model and data arguments of `dts-llm distill ARGV`, every flag checked by name and type, without
    building the training arguments."""
    from dataclasses import fields

    from .data import DataArguments
    from .recipe import ModelArguments, recipe_flags, recipe_parser

    parser = recipe_parser("distill")
    namespace, unknown = parser.parse_known_args(recipe_flags(argv[0], parser) + argv[1:])
    if unknown:
        raise ValueError(f"Some specified arguments are not used by the HfArgumentParser: {unknown}")
    return tuple(kind(**{f.name: getattr(namespace, f.name) for f in fields(kind) if f.init}) for kind in (ModelArguments, DataArguments))


def check_suites(evaluation: Evaluation) -> None:
    """Read every suite once, so a missing or empty one fails before training."""
    from eval.suites import load_suite

    for name, source in evaluation.suites.items():
        if not load_suite(name, source, limit=evaluation.limit).examples:
            raise ValueError(f"--eval-data: suite {name} ({source}) has no example with a reference")


def training_settings(recipe: str, overrides: list[str], run: Run, launcher: str | None) -> dict:
    """What a run's trained model depends on: the recipe's fields (its output_dir aside), the overrides
    and the launcher (the number of processes changes the global batch)."""
    with open(recipe) as f:
        fields = yaml.safe_load(f) or {}
    fields.pop("output_dir", None)
    return _json_normal({"recipe": fields, "overrides": overrides, "run": run.overrides, "launcher": launcher})


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
            "these runs were trained with other settings: " + "; ".join(refused)
            + ". Delete them to train them again with these settings, or give another --output"
        )


def train_run(run: Run, recipe: str, overrides: list[str], launcher: list[str], folder: Path, settings: dict) -> bool:
    """Train ``run`` in a child process unless it has finished; True when it trained."""
    if (folder / TRAINED_MARK).is_file():
        return False
    if folder.exists():
        shutil.rmtree(folder)  # a half-trained run starts again
    folder.mkdir(parents=True)
    (folder / "run.json").write_text(json.dumps({"name": run.name, "training": settings}, indent=1))
    command = [*launcher, "-m", "dts_llm", "distill", *distill_arguments(recipe, overrides, run, folder)]
    log = folder / "train.log"
    with open(log, "w") as stream:
        done = subprocess.run(command, stdout=stream, stderr=subprocess.STDOUT)
    if done.returncode != 0 or not (folder / TRAINED_MARK).is_file():
        tail = "".join(log.read_text().splitlines(keepends=True)[-20:])
        raise RuntimeError(f"{run.name}: `{shlex.join(command)}` failed (exit {done.returncode}); {log} ends with:\n{tail}")
    return True


def evaluate_run(folder: Path, evaluation: Evaluation) -> bool:
    """ROUGE-L of the run's model unless evaluated with these settings already; True when it evaluated."""
    from eval.run import evaluate_model

    record_path = folder / "run.json"
    record = json.loads(record_path.read_text())
    wanted = _json_normal(asdict(evaluation))
    results = folder / "eval" / "results.json"
    if record.get("evaluation") == wanted and results.is_file():
        return False
    if record.get("evaluation") != wanted and (folder / "eval").exists():
        shutil.rmtree(folder / "eval")  # other settings: eval refuses to resume into their folder
    record_path.write_text(json.dumps({**record, "evaluation": wanted}, indent=1))
    model = folder / "merged" if (folder / "merged").is_dir() else folder  # a LoRA student merged by the CLI
    evaluate_model(
        str(model),
        evaluation.suites,
        str(folder / "eval"),
        seeds=evaluation.seeds,
        settings=evaluation.generation_settings(),
        limit=evaluation.limit,
        progress=False,
    )
    return True


def trajectory(folder: Path) -> list[dict]:
    """Per logged training step: step, epoch, temperature, kd_loss, ce_loss (from the trainer's log history)."""
    history = json.loads((folder / TRAINED_MARK).read_text())["log_history"]
    keys = ("step", "epoch", "temperature", "kd_loss", "ce_loss")
    return [{key: entry.get(key) for key in keys} for entry in history if "kd_loss" in entry and "temperature" in entry]


def write_trajectory(folder: Path, rows: list[dict]) -> None:
    (folder / "trajectory.json").write_text(json.dumps(rows, indent=1))
    with open(folder / "trajectory.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["step", "epoch", "temperature", "kd_loss", "ce_loss"])
        writer.writeheader()
        writer.writerows(rows)


def result_row(run: Run, folder: Path, steps: list[dict]) -> dict:
    """The run's line of the table: ROUGE-L per suite, the temperature it ended at and averaged, eval losses."""
    history = json.loads((folder / TRAINED_MARK).read_text())["log_history"]
    evaluated = [entry for entry in history if "eval_ce_loss" in entry]
    scores = json.loads((folder / "eval" / "results.json").read_text())["suites"]
    temperatures = [step["temperature"] for step in steps]
    return {
        "run": run.name,
        "family": run.family,
        "policy": run.overrides["temperature_policy"],
        "settings": run.settings,
        "overrides": run.overrides,
        "rouge_l": {name: {key: scores[name][key] for key in ("mean", "std", "per_seed", "count")} for name in scores},
        "final_temperature": temperatures[-1] if temperatures else None,
        "mean_temperature": statistics.fmean(temperatures) if temperatures else None,
        "eval_loss": evaluated[-1].get("eval_loss") if evaluated else None,
        "eval_ce_loss": evaluated[-1]["eval_ce_loss"] if evaluated else None,
        "eval_kd_loss": evaluated[-1].get("eval_kd_loss") if evaluated else None,
    }


def _cell(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def sweep_table(rows: list[dict], evaluation: Evaluation) -> str:
    """One Markdown row per run; ROUGE-L as mean ± std over the seeds (or the greedy score)."""
    suites = list(evaluation.suites)
    scoring = "greedy" if evaluation.greedy else f"seeds {', '.join(map(str, evaluation.seeds))}"
    header = ["run", "policy", "settings", *(f"ROUGE-L {s}" for s in suites), "final T", "mean T", "eval CE", "eval KD"]
    lines = [f"ROUGE-L x100 ({scoring}); T logged per step, mean over logged steps; eval losses at the last evaluation.", "",
             "| " + " | ".join(header) + " |", "|---|---|---|" + "---:|" * (len(header) - 3)]
    for row in rows:
        scores = [f"{row['rouge_l'][s]['mean']:.2f} ± {row['rouge_l'][s]['std']:.2f}" for s in suites]
        cells = [row["run"], row["policy"], row["settings"], *scores, _cell(row["final_temperature"]),
                 _cell(row["mean_temperature"]), _cell(row["eval_ce_loss"]), _cell(row["eval_kd_loss"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_metric(rows: list[dict], suites: list[str], path: Path) -> None:
    """ROUGE-L against T (log2 axis) for the fixed runs, every other run a labelled horizontal line."""
    plt = _pyplot()
    figure, axes = plt.subplots(1, len(suites), figsize=(5.5 * len(suites), 4), squeeze=False)
    fixed = sorted((row for row in rows if row["family"] == "fixed"), key=lambda row: row["overrides"]["temperature_init"])
    others = [row for row in rows if row["family"] != "fixed"]
    for axis, suite in zip(axes[0], suites):
        if fixed:
            temperatures = [row["overrides"]["temperature_init"] for row in fixed]
            means = [row["rouge_l"][suite]["mean"] for row in fixed]
            stds = [row["rouge_l"][suite]["std"] for row in fixed]
            axis.errorbar(temperatures, means, yerr=stds, marker="o", capsize=3, color="black", label="fixed T")
            axis.set_xscale("log", base=2)
            axis.set_xticks(temperatures, [f"{t:g}" for t in temperatures])
            axis.minorticks_off()
        for index, row in enumerate(others):
            score = row["rouge_l"][suite]["mean"]
            axis.axhline(score, linestyle=LINE_STYLES[row["family"]], color=f"C{index}", label=f"{row['run']}: {score:.2f}")
        axis.set(xlabel="temperature T", ylabel="ROUGE-L", title=suite)
        axis.legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def plot_trajectories(runs: list[Run], trajectories: dict[str, list[dict]], path: Path) -> None:
    """Temperature (log2 axis), KD loss and CE loss over the logged steps, one line per run."""
    from matplotlib.ticker import FuncFormatter

    plt = _pyplot()
    figure, axes = plt.subplots(1, 3, figsize=(15, 3.8))
    for run in runs:
        steps = trajectories[run.name]
        for axis, key in zip(axes, ("temperature", "kd_loss", "ce_loss")):
            axis.plot([step["step"] for step in steps], [step[key] for step in steps], linestyle=LINE_STYLES[run.family], label=run.name)
    for axis, title in zip(axes, ("temperature T", "KD loss (x T^2)", "student CE loss")):
        axis.set(title=title, xlabel="optimizer step")
    axes[0].set_yscale("log", base=2)
    axes[0].yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    figure.legend(*axes[0].get_legend_handles_labels(), loc="center right", fontsize="small")
    figure.tight_layout(rect=(0, 0, 0.91, 1))
    figure.savefig(path, dpi=110)
    plt.close(figure)


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
) -> dict:
    """Train, evaluate and compare ``runs`` of ``recipe`` (plus ``overrides``, `--field value` flags) in
    ``output``; return what sweep.json holds. ``launcher`` prefixes ``-m dts_llm distill`` (default:
    this Python)."""
    from eval.results import write_json_atomic, write_text_atomic

    out = Path(output)
    start = time.time()
    data_args = check_runs(recipe, overrides, runs, out, launched=launcher is not None)
    suites, limit = (eval_data, eval_limit) if eval_data else default_suites(data_args, eval_limit)
    lengths = (data_args.max_length, data_args.max_prompt_length)
    evaluation = Evaluation(suites, tuple(seeds), greedy, limit, eval_batch_size, *lengths)
    evaluation.generation_settings()  # raises for lengths generation cannot use
    check_suites(evaluation)
    settings = {run.name: training_settings(recipe, overrides, run, launcher) for run in runs}
    check_trained_settings(runs, settings, out)

    prefix = shlex.split(launcher) if launcher else [sys.executable]
    for index, run in enumerate(runs, 1):
        trained = train_run(run, recipe, overrides, prefix, out / run.name, settings[run.name])
        _progress(f"[train {index}/{len(runs)}] {run.name}: {'trained' if trained else 'skipped (already trained)'}", start)
    for index, run in enumerate(runs, 1):
        evaluated = evaluate_run(out / run.name, evaluation)
        _progress(f"[eval {index}/{len(runs)}] {run.name}: {'evaluated' if evaluated else 'skipped (already evaluated)'}", start)

    trajectories, rows = {}, []
    for run in runs:
        steps = trajectories[run.name] = trajectory(out / run.name)
        write_trajectory(out / run.name, steps)
        rows.append(result_row(run, out / run.name, steps))
    table = sweep_table(rows, evaluation)
    result = {
        "recipe": recipe,
        "overrides": overrides,
        "launcher": launcher,
        "evaluation": _json_normal(asdict(evaluation)),
        "runs": rows,
    }
    write_json_atomic(out / "sweep.json", result)
    write_text_atomic(out / "sweep.md", table)
    plot_metric(rows, list(suites), out / "rouge_l.png")
    plot_trajectories(runs, trajectories, out / "trajectories.png")
    print(f"\n{table}", flush=True)
    _progress(f"report: sweep.md, sweep.json, rouge_l.png, trajectories.png in {out}", start)
    return result
