"""The sweep's report: per run its trajectory and its row of the table, and the figures comparing runs."""

from __future__ import annotations

import csv
import json
import statistics
from pathlib import Path

import yaml

from eval.rouge import seed_summary

from ..plots import plot_trajectories as plot_runs
from ..plots import pyplot
from ..recipe import RECIPE_NAME
from ..temperature import DTSWindow
from .train import TRAINED_MARK

STEP_KEYS = ("step", "epoch", "temperature", "kd_loss", "ce_loss")
DIAGNOSTICS = (*DTSWindow.NAMES, "teacher_entropy", "student_entropy")
LINE_STYLES = {
    "fixed": "-",
    "reverse-kl": "-",
    "dts": "--",
    "dts-paper": (0, (8, 2)),
    "dts-sequence": (0, (3, 1, 1, 1, 1, 1)),
    "dts-token": (0, (1, 1)),
    "adakd": (0, (5, 2, 1, 2)),
    "on-policy": (0, (4, 1, 4, 4)),
    "seq-kd": (0, (2, 3)),
    "cosine": ":",
    "ctkd": "-.",
    "ctkd-instance": (0, (5, 1, 1, 1)),
}


def trajectory(folder: Path) -> list[dict]:
    """Per logged training step: step, epoch, temperature, kd_loss, ce_loss, then the diagnostics the run
    logged (DTS's rule; the entropies at T with ``log_entropy``)."""
    history = json.loads((folder / TRAINED_MARK).read_text())["log_history"]
    steps = [entry for entry in history if "kd_loss" in entry and "temperature" in entry]
    keys = STEP_KEYS + tuple(name for name in DIAGNOSTICS if any(name in entry for entry in steps))
    return [{key: entry.get(key) for key in keys} for entry in steps]


def write_trajectory(folder: Path, rows: list[dict]) -> None:
    (folder / "trajectory.json").write_text(json.dumps(rows, indent=1))
    with open(folder / "trajectory.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else list(STEP_KEYS))
        writer.writeheader()
        writer.writerows(rows)


def result_row(run, folder: Path, steps: list[dict]) -> dict:
    """The run's line of the table: ROUGE-L per suite, the temperature it ended at and averaged, eval losses,
    and the teacher cache it read (from its resolved recipe; None: a live teacher)."""
    history = json.loads((folder / TRAINED_MARK).read_text())["log_history"]
    resolved = yaml.safe_load((folder / RECIPE_NAME).read_text())
    evaluated = [entry for entry in history if "eval_ce_loss" in entry]
    scores = json.loads((folder / "eval" / "results.json").read_text())["suites"]
    temperatures = [step["temperature"] for step in steps]
    return {
        "run": run.name,
        "cell": run.cell,
        "train_seed": run.overrides.get("seed"),
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
        "teacher_cache": resolved.get("teacher_cache"),
    }


def _mean(values: list[float | None]) -> float | None:
    return None if any(value is None for value in values) else statistics.fmean(values)


def _paired_differences(cell: dict, reference: dict) -> dict:
    """Per suite, the mean and std over training seeds of the cell's score minus the reference cell's with the
    same seed: the seed moves every policy alike (it fixes the data order), so differences paired by seed
    show what the policy changes."""
    paired = {}
    for suite, scores in cell["rouge_l"].items():
        base = reference["rouge_l"][suite]["per_seed"]
        mean, std = seed_summary([score - base[seed] for seed, score in scores["per_seed"].items()])
        paired[suite] = {"mean": mean, "std": std}
    return paired


def cell_rows(rows: list[dict]) -> list[dict]:
    """One row per cell of a grid trained over several seeds, shaped as a run's row: ROUGE-L per suite as the
    mean and (population) std over the training seeds of each run's mean over sampling seeds, with the mean
    sampling std beside them and the differences from the first cell paired by seed; temperatures and
    evaluation losses averaged over the seeds."""
    cells: dict[str, list[dict]] = {}
    for row in rows:
        cells.setdefault(row["cell"], []).append(row)
    aggregated = []
    for name, runs in cells.items():
        rouge_l = {}
        for suite in runs[0]["rouge_l"]:
            means = [run["rouge_l"][suite]["mean"] for run in runs]
            mean, std = seed_summary(means)
            sampling_std = statistics.fmean(run["rouge_l"][suite]["std"] for run in runs)
            per_seed = {str(run["train_seed"]): score for run, score in zip(runs, means, strict=True)}
            count = runs[0]["rouge_l"][suite]["count"]
            rouge_l[suite] = {
                "mean": mean,
                "std": std,
                "per_seed": per_seed,
                "count": count,
                "sampling_std": sampling_std,
            }
        averaged = ("final_temperature", "mean_temperature", "eval_loss", "eval_ce_loss", "eval_kd_loss")
        cell = {
            **{key: runs[0][key] for key in ("family", "policy", "settings", "teacher_cache")},
            "run": name,
            "overrides": {key: value for key, value in runs[0]["overrides"].items() if key != "seed"},
            "train_seeds": [run["train_seed"] for run in runs],
            "rouge_l": rouge_l,
            **{key: _mean([run[key] for run in runs]) for key in averaged},
        }
        reference = aggregated[0] if aggregated else cell
        cell["paired"] = {"vs": reference["run"], **_paired_differences(cell, reference)}
        aggregated.append(cell)
    return aggregated


def _cell(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def sweep_table(rows: list[dict], evaluation) -> str:
    """One Markdown row per run (or per cell, from ``cell_rows``); ROUGE-L as mean ± std over the sampling
    seeds (or the greedy score), or for cells over the training seeds."""
    suites = list(evaluation.suites)
    scoring = "greedy" if evaluation.greedy else f"seeds {', '.join(map(str, evaluation.seeds))}"
    paired = "train_seeds" in rows[0]
    if paired:
        scoring = (
            f"mean ± std over training seeds {', '.join(map(str, rows[0]['train_seeds']))} of each run's "
            f"score ({scoring}); the mean std over sampling seeds in brackets; vs {rows[0]['run']}: the difference "
            "from its run of the same training seed, mean ± std over the seeds"
        )
    header = [
        "run",
        "policy",
        "settings",
        *(f"ROUGE-L {s}" for s in suites),
        *(f"vs {rows[0]['run']} ({s})" for s in suites if paired),
        "final T",
        "mean T",
        "eval CE",
        "eval KD",
    ]
    lines = [
        f"ROUGE-L x100 ({scoring}); T logged per step, mean over logged steps; eval losses at the last evaluation.",
        "",
        "| " + " | ".join(header) + " |",
        "|---|---|---|" + "---:|" * (len(header) - 3),
    ]
    for row in rows:
        scores = [f"{row['rouge_l'][s]['mean']:.2f} ± {row['rouge_l'][s]['std']:.2f}" for s in suites]
        if paired:
            scores = [
                f"{score} ({row['rouge_l'][s]['sampling_std']:.2f})" for score, s in zip(scores, suites, strict=True)
            ]
            scores += [f"{row['paired'][s]['mean']:+.2f} ± {row['paired'][s]['std']:.2f}" for s in suites]
        cells = [
            row["run"],
            row["policy"],
            row["settings"],
            *scores,
            _cell(row["final_temperature"]),
            _cell(row["mean_temperature"]),
            _cell(row["eval_ce_loss"]),
            _cell(row["eval_kd_loss"]),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_metric(rows: list[dict], suites: list[str], path: Path) -> None:
    """ROUGE-L against T (log2 axis) for the fixed runs, every other run a labelled horizontal line."""
    plt = pyplot()
    figure, axes = plt.subplots(1, len(suites), figsize=(5.5 * len(suites), 4), squeeze=False)
    fixed = sorted(
        (row for row in rows if row["family"] == "fixed"), key=lambda row: row["overrides"]["temperature_init"]
    )
    others = [row for row in rows if row["family"] != "fixed"]
    for axis, suite in zip(axes[0], suites, strict=False):
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
            axis.axhline(
                score, linestyle=LINE_STYLES[row["family"]], color=f"C{index}", label=f"{row['run']}: {score:.2f}"
            )
        axis.set(xlabel="temperature T", ylabel="ROUGE-L", title=suite)
        axis.legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def plot_trajectories(runs, trajectories: dict[str, list[dict]], path: Path) -> None:
    """Temperature, KD loss and CE loss over the logged steps, one line per cell of the grid (its first
    training seed's run), styled by its family."""
    first = list({run.cell: run for run in reversed(runs)}.values())[::-1]
    plot_runs(
        {run.cell: trajectories[run.name] for run in first}, path, {run.cell: LINE_STYLES[run.family] for run in first}
    )
