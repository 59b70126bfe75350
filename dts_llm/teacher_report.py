"""`dts-llm teacher-report`: how peaked the teacher's token distributions are at each temperature.

The temperature that suits a teacher depends on how confident it is: a teacher whose top token
already carries most of the mass needs a higher T before its other tokens say anything. This
report measures, on the response tokens of instruction data (the tokens distillation scores), the
mean entropy of softmax(z / T) in nats and the mean probability mass of the top-k tokens, at each T.
The command that reads a teacher and data and writes the report is ``dts_llm.commands.teacher_report``.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from pathlib import Path

import torch

from .losses import response_rows
from .plots import pyplot

DEFAULT_TEMPERATURES = (1.0, 2.0, 4.0, 8.0, 16.0, 32.0)
DEFAULT_TOP_K = (1, 5, 10)
# The range recommendation (``recommended_range``): measured on a grid a quarter-octave apart from T = 1 to 32,
# the low end where the teacher's top token stops carrying almost everything, the high end where its
# distributions are half-way to uniform.
RANGE_GRID = tuple(2 ** (step / 4) for step in range(21))
PEAKED_TOP_1_MASS = 0.9
FLAT_ENTROPY_SHARE = 0.5


def _row_statistics(logit_rows: torch.Tensor, temperatures: Sequence[float], top_k: Sequence[int]) -> torch.Tensor:
    """Per temperature, the sums over rows of the entropy and of each top-k mass: ``[T, 1 + K]``, in float64."""
    rows = logit_rows.double()  # a report, not a training step: exact sums over a 50k vocabulary
    sums = []
    for t in temperatures:
        log_p = (rows / t).log_softmax(-1)
        p = log_p.exp()
        entropy = -(p * log_p).sum(-1)
        top = p.topk(max(top_k), dim=-1).values.cumsum(-1)
        sums.append(torch.stack([entropy.sum(), *(top[:, k - 1].sum() for k in top_k)]))
    return torch.stack(sums)


@torch.no_grad()
def teacher_statistics(
    teacher,
    batches,
    vocab_size: int,
    temperatures: Sequence[float] = DEFAULT_TEMPERATURES,
    top_k: Sequence[int] = DEFAULT_TOP_K,
    rows_per_chunk: int = 256,
    device: torch.device | str | None = None,
) -> dict:
    """Mean entropy (nats) and top-k mass of the teacher's next-token distributions over the response
    tokens of ``batches`` (dicts with input_ids, attention_mask, labels), at each temperature.

    Logits wider than ``vocab_size`` (padded embeddings) are cut to it, as in the losses. ``device``: where
    the batches go (default: the teacher's first parameter's).
    """
    if any(t <= 0 for t in temperatures):
        raise ValueError(f"temperatures must be positive, got {list(temperatures)}")
    if any(not 1 <= k <= vocab_size for k in top_k):
        raise ValueError(f"top_k values must be in [1, {vocab_size}], got {list(top_k)}")
    device = device or next(teacher.parameters()).device
    totals = torch.zeros(len(temperatures), 1 + len(top_k), dtype=torch.float64)
    tokens = 0
    for batch in batches:
        labels = batch["labels"].to(device)
        logits = teacher(
            input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device), use_cache=False
        ).logits
        rows, _ = response_rows(labels, logits)
        flat = logits.view(-1, logits.size(-1))[:, :vocab_size]
        for start in range(0, rows.numel(), rows_per_chunk):
            totals += _row_statistics(flat[rows[start : start + rows_per_chunk]], temperatures, top_k).double().cpu()
        tokens += rows.numel()
    if tokens == 0:
        raise ValueError("the data has no response token to measure")
    means = (totals / tokens).tolist()
    return {
        "tokens": tokens,
        "max_entropy": math.log(vocab_size),
        "temperatures": [
            {
                "temperature": t,
                "entropy": row[0],
                "top_k_mass": {str(k): mass for k, mass in zip(top_k, row[1:], strict=False)},
            }
            for t, row in zip(temperatures, means, strict=False)
        ],
    }


def _crossing(rows: list[dict], value, level: float) -> float | None:
    """The T at which ``value(row)`` (monotone in T) reaches ``level``, interpolated in log T between the
    measured temperatures; None when it stays on one side of it."""
    for low, high in itertools.pairwise(rows):
        a, b = value(low) - level, value(high) - level
        if a == 0:
            return low["temperature"]
        if a * b < 0:
            t_low, t_high = math.log(low["temperature"]), math.log(high["temperature"])
            return math.exp(t_low + (t_high - t_low) * a / (a - b))
    return rows[-1]["temperature"] if value(rows[-1]) == level else None


def recommended_range(
    report: dict, peaked_mass: float = PEAKED_TOP_1_MASS, flat_share: float = FLAT_ENTROPY_SHARE
) -> tuple[float, float]:
    """``(temperature_min, temperature_max)`` for a scheduled policy, from a report measured at T >= 1
    with top-1 mass (entropy and the top-1 mass are monotone in T, so each end is one crossing):

    - the low end is the lowest T >= 1 at which the mean top-1 mass is at most ``peaked_mass``: below it
      the softened targets are still nearly one-hot, and KD at T says little more than the labels;
    - the high end is the T at which the mean entropy reaches ``flat_share`` of log V: above it the
      targets are closer to uniform than to the teacher's ranking.

    Both rounded to two decimals. A teacher flat at T = 1 or peaked at the report's highest T has no such
    range: that is an error, naming the numbers."""
    rows = [row for row in report["temperatures"] if row["temperature"] >= 1]
    rows.sort(key=lambda row: row["temperature"])
    if not rows or rows[0]["temperature"] != 1.0 or "1" not in rows[0]["top_k_mass"]:
        raise ValueError("a temperature range is recommended from a report measured from T = 1 with top-1 mass")
    level = flat_share * report["max_entropy"]
    top_1 = rows[0]["top_k_mass"]["1"]
    low = 1.0 if top_1 <= peaked_mass else _crossing(rows, lambda row: row["top_k_mass"]["1"], peaked_mass)
    high = _crossing(rows, lambda row: row["entropy"], level) if rows[0]["entropy"] < level else None
    if low is None or high is None or round(high, 2) <= round(low, 2):
        raise ValueError(
            f"the teacher has no temperature range between peaked (top-1 mass <= {peaked_mass}) and flat "
            f"(entropy >= {flat_share} x log V = {level:.2f} nats) over T {rows[0]['temperature']:g} to "
            f"{rows[-1]['temperature']:g}: top-1 mass {top_1:.3f} and entropy {rows[0]['entropy']:.3f} nats at T = 1, "
            f"{rows[-1]['top_k_mass']['1']:.3f} and {rows[-1]['entropy']:.3f} at T = {rows[-1]['temperature']:g}; "
            "set temperature_min and temperature_max by hand"
        )
    return round(low, 2), round(high, 2)


def report_table(report: dict) -> str:
    """The report as a Markdown table, one row per temperature."""
    ks = list(report["temperatures"][0]["top_k_mass"])
    lines = [
        f"Teacher {report['teacher']}: {report['tokens']} response tokens; "
        f"uniform entropy {report['max_entropy']:.2f} nats",
        "",
        "| T | entropy (nats) | " + " | ".join(f"top-{k} mass" for k in ks) + " |",
        "|---|---|" + "---|" * len(ks),
    ]
    for row in report["temperatures"]:
        masses = " | ".join(f"{row['top_k_mass'][k]:.3f}" for k in ks)
        lines.append(f"| {row['temperature']:g} | {row['entropy']:.3f} | {masses} |")
    if report.get("recommended_range") is not None:
        low, high = report["recommended_range"]
        lines += [
            "",
            f"Recommended range: temperature_min {low:g}, temperature_max {high:g} (top-1 mass at most "
            f"{PEAKED_TOP_1_MASS} from T_min; entropy {FLAT_ENTROPY_SHARE} x log V at T_max).",
        ]
    elif "no_range" in report:
        lines += ["", f"No recommended range: {report['no_range']}."]
    return "\n".join(lines) + "\n"


def plot_report(report: dict, path: Path) -> None:
    """Entropy and top-k mass against T (log scale), side by side."""
    plt = pyplot()
    rows = report["temperatures"]
    temperatures = [row["temperature"] for row in rows]
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.plot(temperatures, [row["entropy"] for row in rows], marker="o")
    left.axhline(report["max_entropy"], linestyle="--", color="grey", label="uniform")
    left.set(xscale="log", xlabel="temperature T", ylabel="mean entropy (nats)", title="teacher entropy")
    left.legend()
    for k in rows[0]["top_k_mass"]:
        right.plot(temperatures, [row["top_k_mass"][k] for row in rows], marker="o", label=f"top-{k}")
    right.set(xscale="log", xlabel="temperature T", ylabel="mean probability mass", title="top-k mass")
    right.legend()
    for axes in (left, right):
        axes.set_xticks(temperatures, [f"{t:g}" for t in temperatures])
        axes.minorticks_off()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
