"""`dts-llm teacher-report`: how peaked the teacher's token distributions are at each temperature.

The temperature that suits a teacher depends on how confident it is: a teacher whose top token
already carries most of the mass needs a higher T before its other tokens say anything. This
report measures, on the response tokens of instruction data (the tokens distillation scores), the
mean entropy of softmax(z / T) in nats and the mean probability mass of the top-k tokens, at each T.
The command that reads a teacher and data and writes the report is ``dts_llm.commands.teacher_report``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch

from .losses import response_rows
from .plots import pyplot

DEFAULT_TEMPERATURES = (1.0, 2.0, 4.0, 8.0, 16.0, 32.0)
DEFAULT_TOP_K = (1, 5, 10)


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
) -> dict:
    """Mean entropy (nats) and top-k mass of the teacher's next-token distributions over the response
    tokens of ``batches`` (dicts with input_ids, attention_mask, labels), at each temperature.

    Logits wider than ``vocab_size`` (padded embeddings) are cut to it, as in the losses.
    """
    if any(t <= 0 for t in temperatures):
        raise ValueError(f"temperatures must be positive, got {list(temperatures)}")
    if any(not 1 <= k <= vocab_size for k in top_k):
        raise ValueError(f"top_k values must be in [1, {vocab_size}], got {list(top_k)}")
    device = next(teacher.parameters()).device
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
